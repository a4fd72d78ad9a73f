//! Redis for what it is good at here, never as the queue: wake-ups, token
//! buckets shared by all replicas, and webhook nonces with a TTL.
//!
//! The database stays the only copy of every job. When a run is queued, the
//! API publishes on `vm:jobs:wake`; workers subscribe and claim at once
//! instead of waiting for their poll interval. If Redis is down, publishing
//! fails quietly (counted in `vm_dependency_failures_total{dependency="redis"}`),
//! subscribers retry with backoff, and workers keep polling, so nothing is
//! lost or delayed beyond the poll interval; when Redis returns, wake-ups
//! resume by themselves. Live updates use the same pattern on
//! `vm:events:new` (see [`crate::stream`]): a nudge to poll the event log.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Secret;
use crate::metrics::{Dependency, Metrics};
use crate::model::now_ms;

/// The pub/sub channel that announces new claimable jobs.
pub const WAKE_CHANNEL: &str = "vm:jobs:wake";
/// Budget of one Redis command.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// After a failure, how long every caller skips Redis (and falls back at once)
/// before one tries again. A hung Redis must never make requests wait.
const COOLDOWN_MS: i64 = 5_000;

/// A handle on Redis for publishing, pinging and subscribing. Cheap to clone.
#[derive(Clone)]
pub struct RedisBus {
    client: redis::Client,
    conn: Arc<std::sync::Mutex<Option<ConnectionManager>>>,
    /// Until when (ms) Redis is considered down: callers fail fast.
    open_until: Arc<AtomicI64>,
    /// One caller at a time establishes the connection; the others fail fast.
    connecting: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

/// The URL could not be parsed; the message never repeats it.
#[derive(Debug, thiserror::Error)]
#[error("VM_REDIS_URL is not a valid Redis URL")]
pub struct InvalidRedisUrl;

impl RedisBus {
    /// A bus for `url`. Does not connect: Redis may be down at start-up.
    pub fn new(url: &Secret, metrics: Arc<Metrics>) -> Result<Self, InvalidRedisUrl> {
        crate::install_crypto_provider();
        let client = redis::Client::open(url.expose()).map_err(|_| InvalidRedisUrl)?;
        Ok(Self {
            client,
            conn: Arc::new(std::sync::Mutex::new(None)),
            open_until: Arc::new(AtomicI64::new(0)),
            connecting: Arc::new(AtomicBool::new(false)),
            metrics,
        })
    }

    /// Whether callers currently skip Redis after a recent failure.
    pub fn cooling_down(&self) -> bool {
        now_ms() < self.open_until.load(Ordering::Relaxed)
    }

    fn trip(&self) {
        self.open_until
            .store(now_ms() + COOLDOWN_MS, Ordering::Relaxed);
    }

    async fn connection(&self) -> Result<ConnectionManager, ()> {
        if self.cooling_down() {
            return Err(());
        }
        if let Some(c) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(c.clone());
        }
        if self.connecting.swap(true, Ordering::AcqRel) {
            return Err(());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1);
        let connected = tokio::time::timeout(
            COMMAND_TIMEOUT * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        self.connecting.store(false, Ordering::Release);
        match connected {
            Ok(Ok(conn)) => {
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
                Ok(conn)
            }
            _ => {
                self.trip();
                Err(())
            }
        }
    }

    async fn command<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, ()> {
        let mut conn = self.connection().await?;
        match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            _ => {
                self.trip();
                Err(())
            }
        }
    }

    /// One PING within its budget; for readiness.
    pub async fn ping(&self) -> bool {
        let ok = self.command::<String>(redis::cmd("PING")).await.is_ok();
        if !ok {
            self.metrics.dependency_failed(Dependency::redis);
        }
        ok
    }

    /// Announces new work. Best effort: a failure only costs latency.
    pub async fn notify_enqueued(&self) {
        self.publish(WAKE_CHANNEL).await;
    }

    /// Publishes a nudge on `channel`. Best effort: a failure only costs
    /// latency (the listeners poll anyway).
    pub async fn publish(&self, channel: &'static str) {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg("1");
        if self.command::<i64>(cmd).await.is_err() {
            self.metrics.dependency_failed(Dependency::redis);
            debug!(
                channel,
                "could not publish a nudge; listeners will find the change by polling"
            );
        }
    }

    /// Forwards wake-ups to `wake` until `shutdown`, reconnecting with
    /// backoff whenever the subscription breaks.
    pub async fn forward_wakeups(self, wake: Arc<Notify>, shutdown: CancellationToken) {
        self.forward(WAKE_CHANNEL, wake, shutdown).await;
    }

    /// Notifies `wake` for each message on `channel` (and once on each
    /// (re)subscription, for what was missed meanwhile) until `shutdown`,
    /// reconnecting with backoff whenever the subscription breaks.
    pub async fn forward(
        self,
        channel: &'static str,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        let mut delay = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let subscribed = async {
                let mut pubsub =
                    tokio::time::timeout(COMMAND_TIMEOUT * 2, self.client.get_async_pubsub())
                        .await
                        .map_err(|_| ())?
                        .map_err(|_| ())?;
                tokio::time::timeout(COMMAND_TIMEOUT, pubsub.subscribe(channel))
                    .await
                    .map_err(|_| ())?
                    .map_err(|_| ())?;
                Ok::<_, ()>(pubsub)
            };
            let pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                p = subscribed => p,
            };
            match pubsub {
                Ok(pubsub) => {
                    info!(channel, "subscribed to nudges");
                    delay = Duration::from_millis(200);
                    // Something may have been queued while we were away.
                    wake.notify_one();
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            msg = messages.next() => match msg {
                                Some(_) => wake.notify_one(),
                                None => break,
                            },
                        }
                    }
                    warn!(
                        channel,
                        "nudge subscription lost; polling until Redis is back"
                    );
                    self.metrics.dependency_failed(Dependency::redis);
                }
                Err(()) => {
                    self.metrics.dependency_failed(Dependency::redis);
                    debug!(
                        retry_in_ms = delay.as_millis() as u64,
                        channel, "cannot subscribe to nudges"
                    );
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// Takes one token from the shared bucket `key` (refill `per_second`,
/// capacity `burst`), atomically in Redis, timed by Redis's own clock so that
/// replicas' clocks do not matter. Returns `Ok(None)` when allowed, or the
/// wait until a token is available.
const TOKEN_BUCKET: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local data = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(data[1]) or burst
local ts = tonumber(data[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) / 1000 * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return wait
"#;

impl RedisBus {
    /// Takes a token from the shared bucket `key`; `Ok(None)` when allowed,
    /// `Ok(Some(wait))` when empty, `Err` when Redis cannot answer.
    pub async fn take_token(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<Option<Duration>, ()> {
        let mut conn = self.connection().await?;
        let script = redis::Script::new(TOKEN_BUCKET);
        let mut invocation = script.key(format!("vm:ratelimit:{key}"));
        invocation.arg(per_second).arg(burst);
        match tokio::time::timeout(COMMAND_TIMEOUT, invocation.invoke_async::<i64>(&mut conn)).await
        {
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(wait_ms)) => Ok(Some(Duration::from_millis(wait_ms.max(1) as u64))),
            _ => {
                self.trip();
                self.metrics.dependency_failed(Dependency::redis);
                Err(())
            }
        }
    }

    /// Remembers a webhook nonce for `ttl`; `Ok(false)` when it was already
    /// remembered (a replay), `Err` when Redis cannot answer.
    pub async fn remember_nonce(
        &self,
        source: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<bool, ()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("vm:webhook:nonce:{source}:{nonce}"))
            .arg("1")
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64);
        match self.command::<Option<String>>(cmd).await {
            Ok(set) => Ok(set.is_some()),
            Err(()) => {
                self.metrics.dependency_failed(Dependency::redis);
                Err(())
            }
        }
    }
}

impl RedisBus {
    /// Forgets a webhook nonce. Best effort.
    pub async fn forget_nonce(&self, source: &str, nonce: &str) {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(format!("vm:webhook:nonce:{source}:{nonce}"));
        let _ = self.command::<i64>(cmd).await;
    }
}
