//! The deadline of the HTTP request being served, shared by the layer that
//! answers `408 request_timeout` when it passes ([`crate::http::security::harden`])
//! and the store, whose writes for that request must commit before that
//! answer or not at all.
//!
//! The two race for the request once: a write that is about to commit
//! takes it ([`Deadline::claim`]); the HTTP layer, when the time is up,
//! takes it the other way ([`Deadline::expire`]). Either the request is
//! answered 408 and the write leaves it out (nothing of it is committed),
//! or the write goes ahead and the HTTP layer answers its outcome instead of
//! 408, a little after the deadline at most: the store bounds the
//! statements it sends for a request by the time left ([`Deadline::budget`]),
//! so a lock held past it makes the write fail (503) rather than wait.
//!
//! Before, a run-creation statement that waited for a table lock on
//! PostgreSQL (a migration's `ALTER TABLE`, a `VACUUM FULL`) went on
//! waiting after the client had been answered 408, and committed the run
//! when the lock was released: the client's retry created a second run.
//!
//! The deadline travels with the request's future as a task-local value
//! ([`Deadline::scope`], [`Deadline::current`]); the store's writer tasks,
//! which serve many requests, take it along with each request.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Neither the HTTP layer nor a write has taken the request yet.
const OPEN: u8 = 0;
/// A write is committing for the request: its outcome is the answer.
const CLAIMED: u8 = 1;
/// The request was answered 408: nothing may be committed for it.
const EXPIRED: u8 = 2;

/// Most of the time left that is kept back from the store's statements, so
/// that a write that gives up on a lock answers 503 before the 408.
const MAX_MARGIN: Duration = Duration::from_secs(1);

tokio::task_local! {
    static CURRENT: Arc<Deadline>;
}

/// The deadline of one request, and who has taken it.
#[derive(Debug)]
pub struct Deadline {
    at: Instant,
    timeout: Duration,
    state: AtomicU8,
}

impl Deadline {
    /// A deadline `timeout` from now (the request timeout,
    /// `VM_REQUEST_TIMEOUT_MS`).
    pub fn after(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            at: Instant::now() + timeout,
            timeout,
            state: AtomicU8::new(OPEN),
        })
    }

    /// Runs `future` with `self` as the [`Deadline::current`] of the code
    /// it runs (the request's handler and what it calls in the store).
    pub async fn scope<F: Future>(self: Arc<Self>, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }

    /// The deadline of the request whose future is running, if any (none
    /// outside an HTTP request: the worker, the commands, tests that call
    /// the store directly).
    pub fn current() -> Option<Arc<Self>> {
        CURRENT.try_with(Arc::clone).ok()
    }

    /// When the request is answered 408 unless a write has claimed it.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// How long the store's statements for this request may take, lock
    /// waits included: the time left until [`Deadline::at`] less a margin
    /// (a tenth of the request timeout, at most 1 s) in which a statement
    /// that gave up reaches the HTTP layer as 503 before the 408. `None`
    /// once nothing is left: the write must not be tried (it would answer
    /// after the deadline, or race the 408).
    pub fn budget(&self) -> Option<Duration> {
        self.budget_at(Instant::now())
    }

    /// [`Deadline::budget`] at `now`.
    fn budget_at(&self, now: Instant) -> Option<Duration> {
        let margin = (self.timeout / 10).min(MAX_MARGIN);
        let left = self.at.saturating_duration_since(now);
        Some(left.saturating_sub(margin)).filter(|b| !b.is_zero())
    }

    /// Taken by a write about to commit for this request: true when it may
    /// (the request was not answered 408, and the HTTP layer now waits for
    /// the write's outcome instead of answering 408), false when the
    /// request was already answered 408 and nothing of it may be committed.
    /// A second claim (a write retried) is true again.
    pub fn claim(&self) -> bool {
        match self
            .state
            .compare_exchange(OPEN, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == CLAIMED,
        }
    }

    /// Taken by the HTTP layer when the deadline has passed: true when the
    /// request may be answered 408 (no write claimed it, and none will),
    /// false when a write is committing for it and its outcome must be
    /// awaited (the answer comes at most the write's commit later).
    pub fn expire(&self) -> bool {
        match self
            .state
            .compare_exchange(OPEN, EXPIRED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == EXPIRED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whichever comes first wins, and the other learns it: a claimed
    /// request is never answered 408, an expired one never written.
    #[test]
    fn a_claim_and_an_expiry_exclude_each_other() {
        let claimed = Deadline::after(Duration::from_secs(1));
        assert!(claimed.claim());
        assert!(claimed.claim(), "a retried write claims again");
        assert!(!claimed.expire());
        let expired = Deadline::after(Duration::from_secs(1));
        assert!(expired.expire());
        assert!(expired.expire());
        assert!(!expired.claim());
    }

    /// The store's statements get the time left less a tenth of the
    /// request timeout (at most 1 s), and nothing once it is gone.
    #[test]
    fn the_budget_is_the_time_left_less_a_margin() {
        let ms = Duration::from_millis;
        let short = Deadline::after(ms(500));
        let start = short.at() - ms(500);
        assert_eq!(short.budget_at(start), Some(ms(450)));
        assert_eq!(short.budget_at(start + ms(400)), Some(ms(50)));
        assert_eq!(short.budget_at(start + ms(450)), None);
        assert_eq!(short.budget_at(start + ms(600)), None);
        let long = Deadline::after(Duration::from_secs(30));
        let start = long.at() - Duration::from_secs(30);
        assert_eq!(long.budget_at(start), Some(Duration::from_secs(29)));
    }

    /// The deadline is seen by the code its scope runs, not outside it.
    #[tokio::test]
    async fn the_current_deadline_is_the_scope_s() {
        assert!(Deadline::current().is_none());
        let deadline = Deadline::after(Duration::from_secs(1));
        let seen = deadline
            .clone()
            .scope(async { Deadline::current().map(|d| d.at()) })
            .await;
        assert_eq!(seen, Some(deadline.at()));
    }
}
