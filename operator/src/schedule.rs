//! Cron schedules of `spec.backup`: parsing the five-field syntax the CronJob controller
//! accepts, and the longest gap between two scheduled times, which bounds how old the last
//! successful backup may be before `VmWebappBackupStale` fires.
//!
//! Semantics follow cron (and Kubernetes' CronJob controller): when both day-of-month and
//! day-of-week are restricted, a day matches if either does.

/// Why a schedule cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.backup.schedule {schedule:?}: {reason}")]
pub struct ScheduleError {
    /// The schedule as written.
    pub schedule: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A parsed schedule: the allowed values of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: Vec<u32>,
    hours: Vec<u32>,
    days: [bool; 32],
    months: [bool; 13],
    weekdays: [bool; 7],
    days_restricted: bool,
    weekdays_restricted: bool,
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn field(
    text: &str,
    min: u32,
    max: u32,
    names: &[&str],
    name_base: u32,
) -> Result<Vec<u32>, String> {
    let value = |v: &str| -> Result<u32, String> {
        let upper = v.to_ascii_uppercase();
        if let Some(i) = names.iter().position(|n| *n == upper) {
            return Ok(i as u32 + name_base);
        }
        v.parse::<u32>()
            .map_err(|_| format!("{v:?} is not a number"))
    };
    let mut out = Vec::new();
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("step {s:?} must be a positive number"))?,
            ),
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" || range == "?" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `5/10` means from 5 to the end, every 10.
            (v, if part.contains('/') { max } else { v })
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!("{part:?} is outside {min}-{max}"));
        }
        out.extend((lo..=hi).step_by(step as usize));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl Schedule {
    /// Parses five fields or one of `@hourly`, `@daily` (`@midnight`), `@weekly`,
    /// `@monthly`, `@yearly` (`@annually`).
    pub fn parse(schedule: &str) -> Result<Self, ScheduleError> {
        let fail = |reason: String| ScheduleError {
            schedule: schedule.to_owned(),
            reason,
        };
        let expanded = match schedule.trim() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other if other.starts_with('@') => {
                return Err(fail(format!("{other} is not a supported shorthand")));
            }
            other => other,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(fail(format!(
                "expected five fields (minute hour day-of-month month day-of-week), found {}",
                parts.len()
            )));
        }
        let minutes = field(parts[0], 0, 59, &[], 0).map_err(&fail)?;
        let hours = field(parts[1], 0, 23, &[], 0).map_err(&fail)?;
        let mut days = [false; 32];
        for d in field(parts[2], 1, 31, &[], 0).map_err(&fail)? {
            days[d as usize] = true;
        }
        let mut months = [false; 13];
        for m in field(parts[3], 1, 12, &MONTHS, 1).map_err(&fail)? {
            months[m as usize] = true;
        }
        let mut weekdays = [false; 7];
        // 0-7: both 0 and 7 are Sunday.
        for w in field(parts[4], 0, 7, &WEEKDAYS, 0).map_err(&fail)? {
            weekdays[(w % 7) as usize] = true;
        }
        Ok(Self {
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_restricted: !matches!(parts[2], "*" | "?"),
            weekdays_restricted: !matches!(parts[4], "*" | "?"),
        })
    }

    fn day_matches(&self, days_since_epoch: i64) -> bool {
        let (_, month, day) = civil_from_days(days_since_epoch);
        // 1970-01-01 was a Thursday (4).
        let weekday = (days_since_epoch.rem_euclid(7) + 4) % 7;
        if !self.months[month as usize] {
            return false;
        }
        let dom = self.days[day as usize];
        let dow = self.weekdays[weekday as usize];
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The longest time between two consecutive scheduled runs, in seconds, over four
    /// years (every month length, leap day and weekday alignment occurs in that span).
    /// Errors when the schedule never fires (for example `0 0 30 2 *`).
    pub fn max_gap_seconds(&self) -> Result<i64, String> {
        let offsets: Vec<i64> = self
            .hours
            .iter()
            .flat_map(|h| self.minutes.iter().map(move |m| i64::from(h * 60 + m)))
            .collect();
        let (first, last) = match (offsets.first(), offsets.last()) {
            (Some(f), Some(l)) => (*f, *l),
            _ => return Err("it never fires".into()),
        };
        let within_day = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        // 2024-01-01 is day 19723 since the epoch; scan to 2028-01-01 plus one year so the
        // gap across the end of the span is seen too.
        let start = 19_723;
        let mut previous: Option<i64> = None;
        let mut gap = 0;
        let mut fired_days = 0;
        for day in start..start + 5 * 366 {
            if !self.day_matches(day) {
                continue;
            }
            fired_days += 1;
            let day_start = day * 1440;
            if let Some(p) = previous {
                gap = gap.max(day_start + first - p);
            }
            previous = Some(day_start + last);
        }
        if fired_days < 2 {
            return Err("it fires less than twice in five years".into());
        }
        Ok(gap.max(within_day) * 60)
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// How old the last successful backup may be, in seconds: the longest gap of `schedule`
/// plus the backup Job's deadline (a backup may take that long to finish).
pub fn max_backup_age_seconds(schedule: &str, deadline_seconds: i64) -> Result<i64, ScheduleError> {
    let parsed = Schedule::parse(schedule)?;
    let gap = parsed.max_gap_seconds().map_err(|reason| ScheduleError {
        schedule: schedule.to_owned(),
        reason,
    })?;
    Ok(gap + deadline_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(s: &str) -> i64 {
        Schedule::parse(s)
            .unwrap_or_else(|e| panic!("{e}"))
            .max_gap_seconds()
            .unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn common_schedules_have_the_gaps_people_expect() {
        assert_eq!(gap("@hourly"), 3600);
        assert_eq!(gap("*/15 * * * *"), 900);
        assert_eq!(gap("0 2 * * *"), 86_400);
        assert_eq!(gap("@daily"), 86_400);
        assert_eq!(gap("30 1 * * 0"), 7 * 86_400);
        assert_eq!(gap("0 3 * * MON-FRI"), 3 * 86_400, "Friday to Monday");
        assert_eq!(gap("0 0,12 * * *"), 12 * 3600);
        assert_eq!(gap("0 22,2 * * *"), 20 * 3600);
        // February to March is the longest month gap: 31 days (Jan 1 -> Feb 1).
        assert_eq!(gap("@monthly"), 31 * 86_400);
        assert_eq!(gap("0 0 * * 7"), 7 * 86_400, "7 is Sunday");
    }

    /// Cron ORs restricted day-of-month and day-of-week; ANDing them would make
    /// `0 0 1 * MON` fire rarely and the alert threshold months long.
    #[test]
    fn day_of_month_and_weekday_restrictions_combine_with_or() {
        assert!(gap("0 0 1 * MON") <= 7 * 86_400);
    }

    #[test]
    fn mistakes_are_named() {
        for (s, want) in [
            ("0 2 * *", "five fields"),
            ("61 * * * *", "outside 0-59"),
            ("0 0 * * FOO", "not a number"),
            ("*/0 * * * *", "positive"),
            ("@fortnightly", "not a supported shorthand"),
        ] {
            let err = Schedule::parse(s).expect_err(s).to_string();
            assert!(err.contains(want), "{s}: {err}");
        }
        let never = Schedule::parse("0 0 30 2 *").expect("parses");
        assert!(never.max_gap_seconds().is_err());
        assert_eq!(
            max_backup_age_seconds("@daily", 3600).expect("daily"),
            90_000
        );
    }

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_723 + 59), (2024, 2, 29));
    }
}
