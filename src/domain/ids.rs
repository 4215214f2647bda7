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

/// Why a free-text field (a name, a description, a reason, a note, a
/// label value, a URL) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("is longer than {0} characters")]
    TooLong(usize),
    #[error("has a control character (U+{0:04X}); free text must not contain U+0000-U+001F or U+007F-U+009F")]
    Control(u32),
}

/// The one rule for free text: at most `max` characters (Unicode scalar
/// values) and no control character (Unicode category Cc: U+0000 to
/// U+001F, U+007F to U+009F; so no NUL, tab or newline). Empty is allowed
/// here; callers that require a value say so.
pub fn check_text(value: &str, max: usize) -> Result<(), TextError> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(TextError::Control(c as u32));
    }
    if value.chars().count() > max {
        return Err(TextError::TooLong(max));
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
    #[error("value of {0:?} {1}")]
    BadValue(String, TextError),
}

impl LabelError {
    /// The request field to name: `labels`, or `labels["<key>"]` for one
    /// entry.
    pub fn field(&self) -> String {
        match self {
            LabelError::TooMany => "labels".to_string(),
            LabelError::BadKey(key) | LabelError::BadValue(key, _) => format!("labels[{key:?}]"),
        }
    }

    /// What is wrong, for the message after the field.
    pub fn detail(&self) -> String {
        match self {
            LabelError::TooMany => "has more than 16 entries".to_string(),
            LabelError::BadKey(_) => {
                "has a key that is empty, longer than 64 characters or outside [A-Za-z0-9._-]".into()
            }
            LabelError::BadValue(_, e) => e.to_string(),
        }
    }
}

/// Labels: at most 16 entries, keys 1..=64 of `[A-Za-z0-9._-]`, values
/// free text (`check_text`) of at most 256 characters.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    if labels.len() > 16 {
        return Err(LabelError::TooMany);
    }
    for (key, value) in labels {
        if check(key, 64, LABEL_KEY_ALPHABET, |c| c.is_ascii_alphanumeric() || "._-".contains(c)).is_err() {
            return Err(LabelError::BadKey(key.clone()));
        }
        check_text(value, 256).map_err(|e| LabelError::BadValue(key.clone(), e))?;
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
        assert_eq!(LabelError::BadKey("bad key".into()).field(), "labels[\"bad key\"]");
        let mut labels = BTreeMap::new();
        labels.insert("k".to_string(), "a\0b".to_string());
        let e = check_labels(&labels).unwrap_err();
        assert_eq!(e, LabelError::BadValue("k".into(), TextError::Control(0)));
        assert_eq!(e.field(), "labels[\"k\"]");
    }

    #[test]
    fn text() {
        assert!(check_text("", 10).is_ok());
        assert!(check_text("Équipe — 東京 ✓", 20).is_ok());
        assert_eq!(check_text("a\0b", 10), Err(TextError::Control(0)));
        assert_eq!(check_text("a\nb", 10), Err(TextError::Control(10)));
        assert_eq!(check_text("a\u{7f}", 10), Err(TextError::Control(0x7f)));
        assert_eq!(check_text("a\u{85}", 10), Err(TextError::Control(0x85)));
        assert_eq!(check_text("ééé", 2), Err(TextError::TooLong(2)));
    }
}
