//! Credits as exact integers of micro-credits.
//!
//! Every amount in creditd is a whole number of micro-credits (10⁻⁶ credit):
//! `i64` in Rust, integers in Redis and Lua, `NUMERIC(24,6)` in PostgreSQL,
//! decimal strings on the wire. A value that cannot be represented exactly
//! is an error, never rounded and never zero.

use std::{fmt, str::FromStr};

use rust_decimal::Decimal;

/// Micro-credits per credit.
pub const MICROS_PER_CREDIT: i64 = 1_000_000;

/// The largest amount accepted in one request field or one grant: one
/// billion credits. Redis Lua computes with IEEE doubles, exact up to 2⁵³
/// (about 9 × 10⁹ credits in micro-credits); this bound keeps every sum the
/// scripts form far inside that range.
pub const MAX_AMOUNT: Credits = Credits(1_000_000_000 * MICROS_PER_CREDIT);

/// The largest balance one account may reach (grants can be refused above
/// it), for the same reason as [`MAX_AMOUNT`].
pub const MAX_BALANCE: Credits = Credits(4_000_000_000 * MICROS_PER_CREDIT);

/// An exact amount of credits, stored as micro-credits. May be negative
/// (an overdrawn balance); request amounts are checked to be non-negative
/// where the API requires it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Credits(i64);

/// Why a decimal string is not an amount of credits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("is empty")]
    Empty,
    #[error(
        "is not a plain decimal number like \"12\" or \"0.25\" (digits, optionally '.' and more digits; a leading '-' only where negative amounts are allowed)"
    )]
    Syntax,
    #[error("has more than 6 fractional digits (the smallest unit is 0.000001 credit)")]
    TooPrecise,
    #[error("is beyond the largest accepted amount (1000000000 credits)")]
    TooLarge,
    #[error("must not be negative")]
    Negative,
    #[error("must be greater than zero")]
    NotPositive,
}

impl Credits {
    pub const ZERO: Credits = Credits(0);

    pub const fn from_micros(micros: i64) -> Self {
        Credits(micros)
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    pub fn from_whole(credits: i64) -> Option<Self> {
        credits.checked_mul(MICROS_PER_CREDIT).map(Credits)
    }

    /// Parses a request amount: the plain decimal grammar of
    /// [`plain_decimal`] (`-?[0-9]+(\.[0-9]+)?`: digits on both sides of a
    /// '.', so `.5` and `5.` are refused) with at most 6 fractional
    /// digits, bounded by [`MAX_AMOUNT`] in absolute value. No whitespace.
    pub fn parse(text: &str) -> Result<Self, AmountError> {
        if text.is_empty() {
            return Err(AmountError::Empty);
        }
        let Some((negative, whole, frac)) = plain_decimal(text, true) else {
            return Err(AmountError::Syntax);
        };
        if frac.len() > 6 {
            return Err(AmountError::TooPrecise);
        }
        let whole = whole.trim_start_matches('0');
        // 10 digits exceed MAX_AMOUNT already; refuse before any overflow.
        if whole.len() > 10 {
            return Err(AmountError::TooLarge);
        }
        let whole: i64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| AmountError::Syntax)? };
        let mut frac_micros: i64 = 0;
        for (i, b) in frac.bytes().enumerate() {
            frac_micros += i64::from(b - b'0') * 10_i64.pow(5 - i as u32);
        }
        let magnitude = whole * MICROS_PER_CREDIT + frac_micros;
        if magnitude > MAX_AMOUNT.0 {
            return Err(AmountError::TooLarge);
        }
        Ok(Credits(if negative { -magnitude } else { magnitude }))
    }

    /// Parses amount text stored before the grammar required digits on
    /// both sides of the '.' (`.5`, `5.`); for data already written, never
    /// for requests.
    pub fn parse_stored(text: &str) -> Result<Self, AmountError> {
        let mut fixed = text.to_string();
        if fixed.ends_with('.') {
            fixed.push('0');
        }
        if let Some(rest) = fixed.strip_prefix("-.") {
            fixed = format!("-0.{rest}");
        } else if let Some(rest) = fixed.strip_prefix('.') {
            fixed = format!("0.{rest}");
        }
        Self::parse(&fixed)
    }

    /// Parses an amount that must be zero or more (no sign at all: "-0"
    /// is refused too).
    pub fn parse_non_negative(text: &str) -> Result<Self, AmountError> {
        let value = Self::parse(text)?;
        if text.starts_with('-') {
            return Err(AmountError::Negative);
        }
        Ok(value)
    }

    /// Parses an amount that must be more than zero.
    pub fn parse_positive(text: &str) -> Result<Self, AmountError> {
        let value = Self::parse_non_negative(text)?;
        if value.0 == 0 {
            return Err(AmountError::NotPositive);
        }
        Ok(value)
    }

    /// The exact decimal value, for PostgreSQL `NUMERIC`.
    pub fn to_decimal(self) -> Decimal {
        Decimal::new(self.0, 6)
    }

    /// Converts a PostgreSQL `NUMERIC`; fails if it has more than 6
    /// fractional digits or does not fit.
    pub fn try_from_decimal(value: Decimal) -> Result<Self, AmountError> {
        let scaled = value.checked_mul(Decimal::from(MICROS_PER_CREDIT)).ok_or(AmountError::TooLarge)?;
        if !scaled.fract().is_zero() {
            return Err(AmountError::TooPrecise);
        }
        i64::try_from(scaled).map(Credits).map_err(|_| AmountError::TooLarge)
    }

    pub fn checked_add(self, other: Credits) -> Option<Credits> {
        self.0.checked_add(other.0).map(Credits)
    }

    pub fn checked_sub(self, other: Credits) -> Option<Credits> {
        self.0.checked_sub(other.0).map(Credits)
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn max(self, other: Credits) -> Credits {
        Credits(self.0.max(other.0))
    }

    pub fn min(self, other: Credits) -> Credits {
        Credits(self.0.min(other.0))
    }
}

impl fmt::Display for Credits {
    /// Canonical form: no exponent, no '+', no trailing fractional zeros.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let magnitude = self.0.unsigned_abs();
        let whole = magnitude / MICROS_PER_CREDIT as u64;
        let frac = magnitude % MICROS_PER_CREDIT as u64;
        if frac == 0 {
            return write!(f, "{sign}{whole}");
        }
        let frac = format!("{frac:06}");
        write!(f, "{sign}{whole}.{}", frac.trim_end_matches('0'))
    }
}

impl FromStr for Credits {
    type Err = AmountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Credits::parse(s)
    }
}

/// The one grammar of decimal text in requests (amounts, quantities,
/// prices): `-?[0-9]+(\.[0-9]+)?`, the '-' only when `signed`. Returns
/// the sign, the whole digits and the fractional digits ("" when none).
pub fn plain_decimal(text: &str, signed: bool) -> Option<(bool, &str, &str)> {
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) if signed => (true, rest),
        Some(_) => return None,
        None => (false, text),
    };
    let (whole, frac) = match body.split_once('.') {
        Some((w, f)) => {
            if f.is_empty() {
                return None;
            }
            (w, f)
        }
        None => (body, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) {
        return None;
    }
    Some((negative, whole, frac))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_formats_canonically() {
        let cases = [
            ("0", "0"),
            ("1", "1"),
            ("0.25", "0.25"),
            ("1.500000", "1.5"),
            ("0.5", "0.5"),
            ("5.0", "5"),
            ("-3.000001", "-3.000001"),
            ("0001000", "1000"),
            ("1000000000", "1000000000"),
        ];
        for (input, canonical) in cases {
            assert_eq!(Credits::parse(input).unwrap().to_string(), canonical, "{input}");
        }
    }

    #[test]
    fn rejects_what_cannot_be_exact() {
        assert_eq!(Credits::parse(""), Err(AmountError::Empty));
        assert_eq!(Credits::parse("1e3"), Err(AmountError::Syntax));
        assert_eq!(Credits::parse("+1"), Err(AmountError::Syntax));
        assert_eq!(Credits::parse("1.2.3"), Err(AmountError::Syntax));
        assert_eq!(Credits::parse("."), Err(AmountError::Syntax));
        // Digits on both sides of the point: one grammar, no shorthand.
        assert_eq!(Credits::parse("1."), Err(AmountError::Syntax));
        assert_eq!(Credits::parse(".5"), Err(AmountError::Syntax));
        assert_eq!(Credits::parse("-.5"), Err(AmountError::Syntax));
        assert_eq!(Credits::parse("-"), Err(AmountError::Syntax));
        assert_eq!(Credits::parse("--1"), Err(AmountError::Syntax));
        assert_eq!(Credits::parse_stored(".5").unwrap().to_string(), "0.5");
        assert_eq!(Credits::parse_stored("5.").unwrap().to_string(), "5");
        assert_eq!(Credits::parse("NaN"), Err(AmountError::Syntax));
        assert_eq!(Credits::parse("0.0000001"), Err(AmountError::TooPrecise));
        assert_eq!(Credits::parse("1000000000.000001"), Err(AmountError::TooLarge));
        assert_eq!(Credits::parse("99999999999999999999999"), Err(AmountError::TooLarge));
        assert_eq!(Credits::parse_positive("0"), Err(AmountError::NotPositive));
        assert_eq!(Credits::parse_positive("-1"), Err(AmountError::Negative));
        assert_eq!(Credits::parse_non_negative("-0.1"), Err(AmountError::Negative));
        assert_eq!(Credits::parse_non_negative("-0"), Err(AmountError::Negative));
        assert_eq!(Credits::parse(" 5"), Err(AmountError::Syntax));
        assert_eq!(Credits::parse_non_negative("0"), Ok(Credits::ZERO));
    }

    #[test]
    fn decimal_round_trip_refuses_extra_precision() {
        let d: Decimal = "1.0000001".parse().unwrap();
        assert_eq!(Credits::try_from_decimal(d), Err(AmountError::TooPrecise));
        let d: Decimal = "12.340000".parse().unwrap();
        assert_eq!(Credits::try_from_decimal(d).unwrap().micros(), 12_340_000);
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(m in -MAX_AMOUNT.micros()..=MAX_AMOUNT.micros()) {
            let c = Credits::from_micros(m);
            prop_assert_eq!(Credits::parse(&c.to_string()).unwrap(), c);
        }

        #[test]
        fn decimal_round_trip_is_exact(m in -MAX_AMOUNT.micros()..=MAX_AMOUNT.micros()) {
            let c = Credits::from_micros(m);
            prop_assert_eq!(Credits::try_from_decimal(c.to_decimal()).unwrap(), c);
            prop_assert_eq!(c.to_decimal().to_string().parse::<Decimal>().unwrap(), c.to_decimal());
        }

        #[test]
        fn parse_agrees_with_rust_decimal(whole in 0u64..1_000_000_000, frac in 0u32..1_000_000, digits in 0usize..=6) {
            let frac_text = format!("{frac:06}");
            let text = if digits == 0 { whole.to_string() } else { format!("{whole}.{}", &frac_text[..digits]) };
            let expected: Decimal = text.parse().unwrap();
            prop_assert_eq!(Credits::parse(&text).unwrap().to_decimal(), expected);
        }
    }
}
