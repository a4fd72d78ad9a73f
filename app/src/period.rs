//! Billing periods: calendar months in UTC, written `YYYY-MM`.
//!
//! The period a usage row belongs to is taken from the database clock when
//! the row is written (see `store::usage`); this module only parses period
//! names from requests and computes their bounds, so it is pure.

use chrono::{Datelike, NaiveDate, TimeZone, Utc};

/// One UTC calendar month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    /// Year, 2000 to 9999 (9999 up to November: see [`Period::parse`]).
    pub year: i32,
    /// Month, 1 to 12.
    pub month: u32,
}

impl Period {
    /// The last period [`Period::parse`] accepts.
    pub const LAST: Period = Period {
        year: 9999,
        month: 11,
    };

    /// Parses `YYYY-MM` exactly (four-digit year from 2000, two-digit month);
    /// anything else is `None`. The last period is `9999-11`: a period's
    /// [`Period::resets_at`] is the start of the next month, and that of
    /// `9999-12` would be in the year 10000, which RFC 3339 (four-digit
    /// years) cannot write, so `9999-12` is refused like any bad period
    /// rather than answered with a malformed or a clamped timestamp.
    pub fn parse(s: &str) -> Option<Period> {
        let b = s.as_bytes();
        if b.len() != 7
            || b[4] != b'-'
            || !b
                .iter()
                .enumerate()
                .all(|(i, c)| i == 4 || c.is_ascii_digit())
        {
            return None;
        }
        let year: i32 = s[..4].parse().ok()?;
        let month: u32 = s[5..].parse().ok()?;
        let period = Period { year, month };
        ((2000..=9999).contains(&year) && (1..=12).contains(&month) && period <= Period::LAST)
            .then_some(period)
    }

    /// The period containing `ms` (ms since the Unix epoch, UTC).
    pub fn of_ms(ms: i64) -> Period {
        let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
        Period {
            year: t.year(),
            month: t.month(),
        }
    }

    /// The following month.
    pub fn next(self) -> Period {
        if self.month == 12 {
            Period {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Period {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// Its first instant, ms since the Unix epoch.
    pub fn start_ms(self) -> i64 {
        NaiveDate::from_ymd_opt(self.year, self.month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| Utc.from_utc_datetime(&t).timestamp_millis())
            .unwrap_or(0)
    }

    /// The first instant of the next period (exclusive end), ms.
    pub fn end_ms(self) -> i64 {
        self.next().start_ms()
    }

    /// When its allowances reset: the start of the next month, RFC 3339
    /// (always four-digit years for a period [`Period::parse`] accepts).
    pub fn resets_at(self) -> String {
        crate::model::rfc3339(self.end_ms())
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_strictly_and_print_back() {
        assert_eq!(Period::parse("2026-11").unwrap().to_string(), "2026-11");
        for bad in [
            "2026-13",
            "2026-00",
            "26-11",
            "2026-1",
            "2026/11",
            "2026-11-01",
            "１２３４-11",
            "1999-12",
            "",
        ] {
            assert!(Period::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn december_rolls_over_to_january_and_bounds_are_utc_midnights() {
        let dec = Period::parse("2026-12").unwrap();
        assert_eq!(dec.next().to_string(), "2027-01");
        assert_eq!(dec.resets_at(), "2027-01-01T00:00:00.000Z");
        assert_eq!(Period::of_ms(dec.end_ms() - 1), dec);
        assert_eq!(Period::of_ms(dec.end_ms()), dec.next());
    }

    /// Without the upper bound, `9999-12` reset at `+10000-01-01T00:00:00.000Z`
    /// in the 402 body and the usage report: not RFC 3339, which clients
    /// parsing `resets_at` reject.
    #[test]
    fn the_last_period_is_9999_11_so_every_resets_at_is_rfc_3339() {
        assert!(Period::parse("9999-12").is_none());
        let last = Period::parse("9999-11").unwrap();
        assert_eq!(last, Period::LAST);
        assert_eq!(last.resets_at(), "9999-12-01T00:00:00.000Z");
        for p in ["2000-01", "2026-12", "9998-12", "9999-11"] {
            let at = Period::parse(p).unwrap().resets_at();
            assert!(
                chrono::DateTime::parse_from_rfc3339(&at).is_ok() && at.len() == 24,
                "{p}: {at}"
            );
        }
    }
}
