//! Calendar months and days in UTC: budgets reset and statements close on month boundaries;
//! the usage rollups are kept per day.

use std::fmt;

use crate::LedgerError;

const MS_PER_DAY: i64 = 86_400_000;

/// A calendar month in UTC, e.g. `2026-11`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    pub year: i32,
    /// 1..=12
    pub month: u8,
}

impl Month {
    /// The month containing `ms` (milliseconds since the Unix epoch).
    pub fn of_ms(ms: i64) -> Self {
        let (year, month, _) = civil_from_days(ms.div_euclid(MS_PER_DAY));
        Self { year, month }
    }

    /// Parses `YYYY-MM`.
    pub fn parse(text: &str) -> Result<Self, LedgerError> {
        let bad = || LedgerError::OutOfRange {
            field: "month (expected YYYY-MM)",
        };
        let (year, month) = text.split_once('-').ok_or_else(bad)?;
        if year.len() != 4 || month.len() != 2 {
            return Err(bad());
        }
        let year: i32 = year.parse().map_err(|_| bad())?;
        let month: u8 = month.parse().map_err(|_| bad())?;
        if !(1..=12).contains(&month) {
            return Err(bad());
        }
        Ok(Self { year, month })
    }

    /// The first millisecond of this month.
    pub fn start_ms(self) -> i64 {
        days_from_civil(self.year, self.month, 1).saturating_mul(MS_PER_DAY)
    }

    /// The first millisecond of the next month.
    pub fn end_ms(self) -> i64 {
        self.next().start_ms()
    }

    #[must_use]
    pub fn next(self) -> Self {
        if self.month == 12 {
            Self {
                year: self.year.saturating_add(1),
                month: 1,
            }
        } else {
            Self {
                year: self.year,
                month: self.month.saturating_add(1),
            }
        }
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// A calendar day in UTC, e.g. `2026-12-06`, held as its day number since 1970-01-01 (what the
/// usage rollups store: it sorts and ranges as an integer on both stores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(i64);

impl Day {
    /// The day containing `ms` (milliseconds since the Unix epoch).
    pub fn of_ms(ms: i64) -> Self {
        Self(ms.div_euclid(MS_PER_DAY))
    }

    /// The day `days` after 1970-01-01 (before it when negative).
    pub fn from_days_since_epoch(days: i64) -> Self {
        Self(days)
    }

    /// This day's number: days since 1970-01-01.
    pub fn days_since_epoch(self) -> i64 {
        self.0
    }

    /// Parses `YYYY-MM-DD`.
    pub fn parse(text: &str) -> Result<Self, LedgerError> {
        let bad = || LedgerError::OutOfRange {
            field: "day (expected YYYY-MM-DD)",
        };
        let mut parts = text.split('-');
        let (Some(year), Some(month), Some(day), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if year.len() != 4 || month.len() != 2 || day.len() != 2 {
            return Err(bad());
        }
        let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if !(digits(year) && digits(month) && digits(day)) {
            return Err(bad());
        }
        let year: i32 = year.parse().map_err(|_| bad())?;
        let month: u8 = month.parse().map_err(|_| bad())?;
        let day: u8 = day.parse().map_err(|_| bad())?;
        if !(1..=12).contains(&month) || day == 0 {
            return Err(bad());
        }
        let parsed = Self(days_from_civil(year, month, day));
        // A day past the month's end (2026-02-30) lands in the next month.
        if civil_from_days(parsed.0) != (year, month, day) {
            return Err(bad());
        }
        Ok(parsed)
    }

    /// The first millisecond of this day.
    pub fn start_ms(self) -> i64 {
        self.0.saturating_mul(MS_PER_DAY)
    }

    /// The month this day is in.
    pub fn month(self) -> Month {
        let (year, month, _) = civil_from_days(self.0);
        Month { year, month }
    }

    /// The day `days` later (earlier when negative), saturating at the ends of `i64`.
    #[must_use]
    pub fn saturating_add_days(self, days: i64) -> Self {
        Self(self.0.saturating_add(days))
    }
}

impl Month {
    /// The first day of this month.
    pub fn first_day(self) -> Day {
        Day::of_ms(self.start_ms())
    }

    /// The last day of this month.
    pub fn last_day(self) -> Day {
        Day::of_ms(self.end_ms()).saturating_add_days(-1)
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (year, month, day) = civil_from_days(self.0);
        write!(f, "{year:04}-{month:02}-{day:02}")
    }
}

/// Howard Hinnant's `civil_from_days`: day number since 1970-01-01 → (year, month, day).
#[expect(
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "calendar arithmetic on day numbers from an i64 of milliseconds (|days| < 2^37), \
              no money; every intermediate fits i64 and the final year fits i32 for any real date"
)]
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if m <= 2 { y + 1 } else { y };
    (
        year.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
        m as u8,
        d as u8,
    )
}

/// Howard Hinnant's `days_from_civil`: (year, month, day) → day number since 1970-01-01.
#[expect(
    clippy::arithmetic_side_effects,
    reason = "calendar arithmetic on an i32 year widened to i64, no money; cannot overflow"
)]
fn days_from_civil(year: i32, month: u8, day: u8) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn known_months() {
        assert_eq!(Month::of_ms(0).to_string(), "1970-01");
        // 2026-11-15T00:00:00Z
        assert_eq!(Month::of_ms(1_794_700_800_000).to_string(), "2026-11");
        let nov = Month::parse("2026-11").unwrap();
        assert_eq!(nov.start_ms(), 1_793_491_200_000);
        assert_eq!(Month::of_ms(nov.start_ms()), nov);
        assert_eq!(Month::of_ms(nov.start_ms() - 1).to_string(), "2026-10");
        assert_eq!(nov.next().next().to_string(), "2027-01");
        assert_eq!(
            Month::parse("2024-02").unwrap().end_ms() - Month::parse("2024-02").unwrap().start_ms(),
            29 * MS_PER_DAY
        );
        assert!(Month::parse("2026-13").is_err());
        assert!(Month::parse("26-11").is_err());
        assert!(Month::of_ms(-1).to_string() == "1969-12");
    }

    #[test]
    fn known_days() {
        assert_eq!(Day::of_ms(0).to_string(), "1970-01-01");
        assert_eq!(Day::of_ms(-1).to_string(), "1969-12-31");
        assert_eq!(Day::of_ms(-1).days_since_epoch(), -1);
        // 2026-11-15T00:00:00Z and the millisecond before it.
        let day = Day::of_ms(1_794_700_800_000);
        assert_eq!(day.to_string(), "2026-11-15");
        assert_eq!(day.start_ms(), 1_794_700_800_000);
        assert_eq!(Day::of_ms(1_794_700_800_000 - 1).to_string(), "2026-11-14");
        assert_eq!(Day::parse("2026-11-15").unwrap(), day);
        assert_eq!(day.month().to_string(), "2026-11");
        let nov = Month::parse("2026-11").unwrap();
        assert_eq!(nov.first_day().to_string(), "2026-11-01");
        assert_eq!(nov.last_day().to_string(), "2026-11-30");
        assert_eq!(
            Month::parse("2024-02").unwrap().last_day().to_string(),
            "2024-02-29"
        );
        assert_eq!(
            Day::parse("2024-02-29")
                .unwrap()
                .saturating_add_days(1)
                .to_string(),
            "2024-03-01"
        );
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "2026-00-10",
            "2026-01-00",
            "2026-1-01",
            "26-01-01",
            "2026-01-01-",
            "2026/01/01",
            "+026-01-01",
            "2026-01-+1",
            "",
            "2026-01",
        ] {
            assert!(Day::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn day_contains_its_instants(ms in -10_000_000_000_000i64..10_000_000_000_000) {
            let d = Day::of_ms(ms);
            prop_assert!(d.start_ms() <= ms);
            prop_assert!(ms < d.saturating_add_days(1).start_ms());
            prop_assert_eq!(Day::parse(&d.to_string()).unwrap(), d);
            prop_assert_eq!(d.month(), Month::of_ms(ms));
        }

        #[test]
        fn month_contains_its_instants(ms in -10_000_000_000_000i64..10_000_000_000_000) {
            let m = Month::of_ms(ms);
            prop_assert!(m.start_ms() <= ms);
            prop_assert!(ms < m.end_ms());
            prop_assert_eq!(Month::parse(&m.to_string()).unwrap(), m);
        }
    }
}
