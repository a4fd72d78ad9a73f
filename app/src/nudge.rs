//! Announcing newly queued work, so that workers claim it at once instead of
//! at their next idle poll: the in-process worker's [`Notify`], and a Redis
//! nudge on `vm:jobs:wake` for every other process when Redis is configured.
//!
//! Every path that queues a step announces it the same way: run creation,
//! an approver's decision, and the maintenance leader applying an approval
//! step's `on_timeout`.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::redis_bus::RedisBus;

/// Where newly queued work is announced. Cheap to clone.
#[derive(Clone, Default)]
pub struct Nudge {
    local: Option<Arc<Notify>>,
    redis: Option<RedisBus>,
}

impl Nudge {
    /// Announces to `local` (this process's worker, if it has one) and, when
    /// configured, through `redis` to the workers of other processes.
    pub fn new(local: Arc<Notify>, redis: Option<RedisBus>) -> Self {
        Self {
            local: Some(local),
            redis,
        }
    }

    /// Announces that work was queued. Never waits: the Redis publish runs
    /// off the caller's path (a slow Redis must not slow a request or a
    /// maintenance tick), and a lost nudge costs only latency.
    pub fn enqueued(&self) {
        if let Some(local) = &self.local {
            local.notify_one();
        }
        if let Some(redis) = self.redis.clone() {
            tokio::spawn(async move { redis.notify_enqueued().await });
        }
    }
}
