//! Validation of client-chosen identifiers, idempotency keys and labels.
//!
//! Identifiers end up inside Redis key names under a `{t:<tenant>}` hash tag,
//! so the alphabet excludes braces, spaces and anything a key parser could
//! trip on.

use std::collections::BTreeMap;

/// Why a client-chosen string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("is required")]
    Empty,
    #[error("is longer than {0} characters")]
    TooLong(usize),
    #[error("has a character outside {0}")]
    Alphabet(&'static str),
}

const ID_ALPHABET: &str = "[A-Za-z0-9._:@-]";
const LABEL_KEY_ALPHABET: &str = "[A-Za-z0-9._-]";
const KEY_ALPHABET: &str = "printable ASCII";

/// Tenant and account ids: 1 to 128 characters of `[A-Za-z0-9._:@-]`.
pub fn check_id(value: &str) -> Result<(), IdError> {
    check(value, 128, ID_ALPHABET, |c| c.is_ascii_alphanumeric() || "._:@-".contains(c))
}

/// Idempotency keys: 1 to 128 printable ASCII characters.
pub fn check_idempotency_key(value: &str) -> Result<(), IdError> {
    check(value, 128, KEY_ALPHABET, |c| c.is_ascii_graphic())
}

fn check(value: &str, max: usize, alphabet: &'static str, ok: impl Fn(char) -> bool) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty);
    }
    if value.len() > max {
        return Err(IdError::TooLong(max));
    }
    if !value.chars().all(ok) {
        return Err(IdError::Alphabet(alphabet));
    }
    Ok(())
}

/// Why a label set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("has more than 16 entries")]
    TooMany,
    #[error("key {0:?} is empty, longer than 64 characters or outside [A-Za-z0-9._-]")]
    BadKey(String),
    #[error("value of {0:?} is longer than 256 characters")]
    ValueTooLong(String),
}

/// Labels: at most 16 entries, keys 1..=64 of `[A-Za-z0-9._-]`, values ≤ 256.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    if labels.len() > 16 {
        return Err(LabelError::TooMany);
    }
    for (key, value) in labels {
        if check(key, 64, LABEL_KEY_ALPHABET, |c| c.is_ascii_alphanumeric() || "._-".contains(c)).is_err() {
            return Err(LabelError::BadKey(key.clone()));
        }
        if value.chars().count() > 256 {
            return Err(LabelError::ValueTooLong(key.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("user-42").is_ok());
        assert!(check_id("a.b:c@d_e").is_ok());
        assert_eq!(check_id(""), Err(IdError::Empty));
        assert_eq!(check_id("{t:x}"), Err(IdError::Alphabet(ID_ALPHABET)));
        assert_eq!(check_id("a b"), Err(IdError::Alphabet(ID_ALPHABET)));
        assert_eq!(check_id(&"x".repeat(129)), Err(IdError::TooLong(128)));
        assert!(check_idempotency_key("run-1/step{2}").is_ok());
        assert!(check_idempotency_key("with space").is_err());
    }

    #[test]
    fn labels() {
        let mut labels = BTreeMap::new();
        labels.insert("agent".to_string(), "bot".to_string());
        assert!(check_labels(&labels).is_ok());
        labels.insert("bad key".to_string(), String::new());
        assert_eq!(check_labels(&labels), Err(LabelError::BadKey("bad key".into())));
    }
}
