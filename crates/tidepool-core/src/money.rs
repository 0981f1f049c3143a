//! Money: `i64` nano-units (1e-9) of an account's currency. No floats anywhere on the money path.
//!
//! Rounding rule: a cost is `ceil(tokens × price_per_mtok / 1_000_000)` nano-units, computed in
//! `u128`, so a request is never billed below its exact price and never by more than one nano-unit
//! above it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{CoreError, TokenCount};

/// Nano-units per whole currency unit.
pub const NANOS_PER_UNIT: i64 = 1_000_000_000;

/// An amount of money in nano-units of some currency. The currency travels beside it (price book,
/// account); `Nanos` alone never crosses a currency boundary.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Nanos(pub i64);

impl Nanos {
    pub const ZERO: Self = Self(0);

    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }

    pub fn checked_sub(self, other: Self) -> Option<Self> {
        self.0.checked_sub(other.0).map(Self)
    }

    /// The cost of `tokens` at `price_per_mtok` (nano-units per million tokens), rounded up.
    /// `None` for a negative price (a config error) or an overflow.
    pub fn cost_of(tokens: TokenCount, price_per_mtok: Self) -> Option<Self> {
        let price = u64::try_from(price_per_mtok.0).ok()?;
        let scaled = u128::from(tokens).checked_mul(u128::from(price))?;
        i64::try_from(scaled.div_ceil(1_000_000)).ok().map(Self)
    }
}

impl Nanos {
    /// Parses a decimal amount of whole currency units with at most nine fractional digits
    /// (`"10"`, `"0.25"`, `"-1.5"`) exactly, without floats.
    pub fn parse_decimal(text: &str) -> Result<Self, CoreError> {
        let invalid = || CoreError::InvalidAmount {
            value: text.chars().take(64).collect(),
        };
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) || fraction.len() > 9 {
            return Err(invalid());
        }
        if digits.contains('.') && fraction.is_empty() {
            return Err(invalid());
        }
        let whole: i64 = whole.parse().map_err(|_| invalid())?;
        let mut padded = fraction.to_owned();
        while padded.len() < 9 {
            padded.push('0');
        }
        let fraction: i64 = padded.parse().map_err(|_| invalid())?;
        let value = whole
            .checked_mul(NANOS_PER_UNIT)
            .and_then(|w| w.checked_add(fraction))
            .ok_or_else(invalid)?;
        Ok(Self(if negative { -value } else { value }))
    }
}

impl fmt::Display for Nanos {
    /// Formats as a decimal amount with nine fractional digits, e.g. `1.250000000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let unit = NANOS_PER_UNIT.unsigned_abs();
        write!(f, "{sign}{}.{:09}", abs / unit, abs % unit)
    }
}

/// An ISO-4217-style currency code: three uppercase ASCII letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    pub const USD: Self = Self(*b"USD");

    pub fn parse(code: &str) -> Result<Self, CoreError> {
        match code.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_uppercase()) => Ok(Self([*a, *b, *c])),
            _ => Err(CoreError::UnknownCurrency {
                code: code.chars().take(8).collect(),
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        // The bytes are validated ASCII uppercase at construction.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl TryFrom<String> for Currency {
    type Error = CoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Currency> for String {
    fn from(value: Currency) -> Self {
        value.as_str().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn decimal_amounts_parse_exactly() {
        assert_eq!(Nanos::parse_decimal("10").ok(), Some(Nanos(10_000_000_000)));
        assert_eq!(Nanos::parse_decimal("0.25").ok(), Some(Nanos(250_000_000)));
        assert_eq!(
            Nanos::parse_decimal("-1.5").ok(),
            Some(Nanos(-1_500_000_000))
        );
        assert_eq!(Nanos::parse_decimal("0.000000001").ok(), Some(Nanos(1)));
        for bad in [
            "",
            "1.",
            ".5",
            "1.0000000001",
            "1e3",
            "abc",
            "99999999999999999999",
            "1,5",
        ] {
            assert!(
                Nanos::parse_decimal(bad).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    proptest! {
        #[test]
        fn decimal_roundtrips_through_display(value in -1_000_000_000_000_000_i64..1_000_000_000_000_000) {
            let shown = Nanos(value).to_string();
            prop_assert_eq!(Nanos::parse_decimal(&shown).ok(), Some(Nanos(value)));
        }
    }

    #[test]
    fn cost_rounds_up() {
        // 0.15 per 1M tokens = 150_000_000 nanos per Mtok: 1 token costs 150 nanos exactly.
        assert_eq!(Nanos::cost_of(1, Nanos(150_000_000)), Some(Nanos(150)));
        // 1 nano per Mtok: one token costs 1e-6 nanos, billed as 1.
        assert_eq!(Nanos::cost_of(1, Nanos(1)), Some(Nanos(1)));
        assert_eq!(Nanos::cost_of(0, Nanos(1)), Some(Nanos(0)));
        assert_eq!(Nanos::cost_of(1, Nanos(-1)), None);
    }

    #[test]
    fn display() {
        assert_eq!(Nanos(1_250_000_000).to_string(), "1.250000000");
        assert_eq!(Nanos(-5).to_string(), "-0.000000005");
    }

    #[test]
    fn currency() {
        assert_eq!(Currency::parse("CNY").unwrap().as_str(), "CNY");
        assert!(Currency::parse("usd").is_err());
        assert!(Currency::parse("USDT").is_err());
    }

    proptest! {
        #[test]
        fn cost_is_exact_ceiling(tokens in 0u32.., price in 0i64..1_000_000_000_000) {
            let cost = Nanos::cost_of(tokens, Nanos(price)).unwrap().0;
            let exact = i128::from(tokens) * i128::from(price);
            prop_assert!(i128::from(cost) * 1_000_000 >= exact);
            prop_assert!(i128::from(cost - 1) * 1_000_000 < exact || cost == 0);
        }

        #[test]
        fn cost_is_monotonic(tokens in 0u32..u32::MAX, price in 0i64..1_000_000_000_000) {
            let a = Nanos::cost_of(tokens, Nanos(price)).unwrap();
            let b = Nanos::cost_of(tokens + 1, Nanos(price)).unwrap();
            prop_assert!(b >= a);
        }
    }
}
