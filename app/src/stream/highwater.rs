//! The high-water mark of the event log: the id up to which every event that
//! will ever commit has committed, so a stream may deliver up to it and never
//! find an earlier event later.
//!
//! Event ids come from a sequence, but on PostgreSQL concurrent transactions
//! commit in any order: a poller may read id 10 while id 9 is still in a
//! transaction that commits a moment later. A naive `id > last` poller would
//! advance to 10 and skip 9 for good. So an id that is missing between the
//! mark and a committed id (a gap) holds the mark back until it fills, or
//! until `gap_timeout` has passed since the gap was first seen: the id may
//! also never commit (a rolled-back transaction, a sequence jump after a
//! crash), and a stream must not stall for ever behind it. An event that
//! commits more than `gap_timeout` after its id was taken is the one case a
//! stream can miss; the timeout is far above how long the store's
//! transactions take.

use std::time::{Duration, Instant};

/// A range of ids seen missing, and since when.
#[derive(Debug, Clone, Copy)]
struct Gap {
    first: i64,
    last: i64,
    since: Instant,
}

/// Tracks the mark over successive polls. Pure: the caller passes the time.
#[derive(Debug)]
pub struct HighWater {
    position: i64,
    gap_timeout: Duration,
    gaps: Vec<Gap>,
    given_up: u64,
}

impl HighWater {
    /// A mark at `position`: every id up to it counts as settled.
    pub fn new(position: i64, gap_timeout: Duration) -> Self {
        Self {
            position,
            gap_timeout,
            gaps: Vec::new(),
            given_up: 0,
        }
    }

    /// Every id up to this one is settled.
    pub fn position(&self) -> i64 {
        self.position
    }

    /// How many missing ids were given up on after the timeout, in total.
    pub fn given_up(&self) -> u64 {
        self.given_up
    }

    /// Whether a gap currently holds the mark back.
    pub fn holding(&self) -> bool {
        !self.gaps.is_empty()
    }

    /// Takes the ids of committed events above the mark, ascending (one
    /// poll's read), and returns how many of them, from the first, are
    /// settled now; the mark moves to the last of those. The rest are held
    /// behind a gap and will be read again by the next poll.
    pub fn settle(&mut self, ids: &[i64], now: Instant) -> usize {
        // Every gap in this read starts its clock now (unless seen before),
        // so several lost ids in one read cost one timeout, not one each.
        let mut expected = self.position + 1;
        for &id in ids {
            if id > expected {
                self.note_missing(expected, id - 1, now);
            }
            expected = expected.max(id + 1);
        }
        let mut settled = 0;
        for &id in ids {
            if id <= self.position {
                // Already settled (a repeated read): counts, moves nothing.
                settled += 1;
                continue;
            }
            let first_missing = self.position + 1;
            if id > first_missing {
                // The newest sighting among the missing ids decides.
                let seen = self
                    .gaps
                    .iter()
                    .filter(|g| g.first < id && g.last >= first_missing)
                    .map(|g| g.since)
                    .max()
                    .unwrap_or(now);
                if now.duration_since(seen) < self.gap_timeout {
                    break;
                }
                self.given_up += u64::try_from(id - first_missing).unwrap_or(0);
            }
            self.position = id;
            settled += 1;
        }
        let position = self.position;
        self.gaps.retain(|g| g.last > position);
        for g in &mut self.gaps {
            g.first = g.first.max(position + 1);
        }
        settled
    }

    /// Records ids `first..=last` as missing since `now`, except those
    /// already known missing (which keep their first sighting).
    fn note_missing(&mut self, first: i64, last: i64, now: Instant) {
        let mut known: Vec<(i64, i64)> = self
            .gaps
            .iter()
            .filter(|g| g.last >= first && g.first <= last)
            .map(|g| (g.first, g.last))
            .collect();
        known.sort_unstable();
        let mut next = first;
        for (lo, hi) in known {
            if lo > next {
                self.gaps.push(Gap {
                    first: next,
                    last: lo - 1,
                    since: now,
                });
            }
            next = next.max(hi + 1);
        }
        if next <= last {
            self.gaps.push(Gap {
                first: next,
                last,
                since: now,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn contiguous_ids_settle_at_once() {
        let mut hw = HighWater::new(0, TIMEOUT);
        assert_eq!(hw.settle(&[1, 2, 3], Instant::now()), 3);
        assert_eq!(hw.position(), 3);
        assert!(!hw.holding());
    }

    /// Without holding at the gap, id 11 would be delivered and id 10,
    /// committed a moment later, never would.
    #[test]
    fn a_gap_holds_later_ids_until_it_fills() {
        let t0 = Instant::now();
        let mut hw = HighWater::new(9, TIMEOUT);
        assert_eq!(hw.settle(&[11, 12], t0), 0);
        assert_eq!(hw.position(), 9);
        assert!(hw.holding());
        // The late transaction commits: all three settle, in order.
        assert_eq!(hw.settle(&[10, 11, 12], t0 + Duration::from_millis(30)), 3);
        assert_eq!(hw.position(), 12);
        assert!(!hw.holding());
        assert_eq!(hw.given_up(), 0);
    }

    #[test]
    fn ids_before_the_gap_settle_and_the_rest_wait() {
        let t0 = Instant::now();
        let mut hw = HighWater::new(0, TIMEOUT);
        assert_eq!(hw.settle(&[1, 2, 4, 5], t0), 2);
        assert_eq!(hw.position(), 2);
    }

    #[test]
    fn a_gap_that_never_fills_is_given_up_after_the_timeout() {
        let t0 = Instant::now();
        let mut hw = HighWater::new(0, TIMEOUT);
        assert_eq!(hw.settle(&[1, 3], t0), 1);
        assert_eq!(hw.settle(&[3], t0 + TIMEOUT - Duration::from_millis(1)), 0);
        assert_eq!(hw.settle(&[3, 4], t0 + TIMEOUT), 2);
        assert_eq!(hw.position(), 4);
        assert_eq!(hw.given_up(), 1);
    }

    #[test]
    fn several_gaps_seen_in_one_read_cost_one_timeout() {
        let t0 = Instant::now();
        let mut hw = HighWater::new(0, TIMEOUT);
        assert_eq!(hw.settle(&[2, 4, 6], t0), 0);
        assert_eq!(hw.settle(&[2, 4, 6], t0 + TIMEOUT), 3);
        assert_eq!(hw.given_up(), 3);
    }

    /// A gap filled in part keeps the clock of its first sighting for the
    /// rest: ids trickling in must not restart the wait each time.
    #[test]
    fn a_gap_filling_in_part_keeps_its_first_clock() {
        let t0 = Instant::now();
        let mut hw = HighWater::new(0, TIMEOUT);
        assert_eq!(hw.settle(&[5], t0), 0);
        assert_eq!(hw.settle(&[1, 2, 5], t0 + Duration::from_secs(4)), 2);
        assert_eq!(hw.settle(&[5], t0 + TIMEOUT), 1);
        assert_eq!(hw.position(), 5);
        assert_eq!(hw.given_up(), 2);
    }

    #[test]
    fn a_gap_seen_later_starts_its_own_clock() {
        let t0 = Instant::now();
        let mut hw = HighWater::new(0, TIMEOUT);
        assert_eq!(hw.settle(&[1, 2], t0), 2);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(hw.settle(&[4], t1), 0);
        assert_eq!(hw.settle(&[4], t1 + Duration::from_secs(1)), 0);
        assert_eq!(hw.settle(&[4], t1 + TIMEOUT), 1);
    }
}
