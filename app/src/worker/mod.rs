//! The worker: claims jobs, executes their steps, and records the outcome.
//!
//! One loop claims up to `concurrency` jobs at a time and executes each in its
//! own task. Outcomes: success → handed to the [`completer`], which records
//! results in batches (one transaction for all the steps that finished
//! meanwhile) and the run moves on; transient failure → retried with
//! exponential backoff and jitter; permanent failure or attempts exhausted →
//! dead-lettered and the run fails with the reason; an approval step →
//! handed over to the approvers ([`Store::await_approval`]): its slot frees at
//! once and no lease is held while it waits.
//!
//! Leases: one statement per tick (a third of the lease, at most a second)
//! renews every job the worker holds ([`Store::extend_leases`]); a job missing
//! from the answer was lost (its run was cancelled, or its lease expired and it
//! was rescued) and its task is stopped, so a cancelled step stops within about
//! a second. Rescue of expired leases and the queue gauges run in
//! [`crate::maintenance`], which this loop starts and only one process leads.
//!
//! Shutdown: when the token is cancelled the loop stops claiming, in-flight
//! jobs get `shutdown_grace` to finish, and whatever is still running then is
//! aborted and released back to the queue without spending an attempt.

pub mod completer;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::metrics::{Dependency, JobOutcome, KindLabels, Metrics};
use crate::model::{ClaimedJob, now_ms};
use crate::steps::template::TemplateContext;
use crate::steps::{StepError, StepRunner, StepSpec};
use crate::store::{Finish, Store, StoreError};
use completer::Completer;

/// Worker tuning.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Identifies this worker in leases and logs.
    pub id: String,
    /// Jobs executed at once. Not capped by a constant: a waiting step costs a
    /// task (a few KB), no connection and no timer, so thousands of slow
    /// (LLM-like) steps fit in one worker; memory is the bound.
    pub concurrency: usize,
    /// Sleep between claims when the queue is empty and nobody wakes us.
    pub poll_interval: Duration,
    /// Lease length; every held job's lease is renewed each tick (a third of
    /// it, at most a second), in one statement.
    pub lease: Duration,
    /// First retry delay.
    pub backoff_base: Duration,
    /// Retry delay ceiling.
    pub backoff_max: Duration,
    /// Time given to in-flight jobs after shutdown is requested.
    pub shutdown_grace: Duration,
}

impl WorkerConfig {
    /// A worker id unique to this process: host name (the pod name in a
    /// cluster) plus a random suffix.
    pub fn default_id() -> String {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
    }
}

/// Live facts about the worker, read by health checks.
#[derive(Debug, Default)]
pub struct WorkerState {
    /// Last time (ms) the loop completed a pass; 0 before the first.
    pub last_pass_ms: AtomicI64,
    /// Jobs executing now.
    pub in_flight: AtomicUsize,
}

/// What a finished worker reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Jobs that finished within the grace period after shutdown was requested.
    pub drained: usize,
    /// Jobs aborted at the deadline and handed back to the queue.
    pub released: usize,
}

/// A worker over one store.
pub struct Worker {
    store: Store,
    runner: StepRunner,
    config: WorkerConfig,
    wake: Arc<Notify>,
    /// Other processes' workers, nudged when this worker's maintenance
    /// queues a step (an approval's deadline).
    redis: Option<crate::redis_bus::RedisBus>,
    state: Arc<WorkerState>,
    metrics: Arc<Metrics>,
    force: CancellationToken,
}

/// How often a worker records its heartbeat.
pub const HEARTBEAT_EVERY_MS: i64 = 5_000;

/// The delay before retry number `attempt` (1-based): exponential from `base`,
/// capped at `max`, with "equal jitter" (half fixed, half random) so that
/// retries of many jobs spread out but never come back immediately.
pub fn backoff(attempt: i64, base: Duration, max: Duration) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(30);
    let full = base.saturating_mul(1u32 << exp).min(max);
    let half = full / 2;
    let jitter_ms = rand::rng().random_range(0..=half.as_millis() as u64);
    half + Duration::from_millis(jitter_ms)
}

impl Worker {
    /// A worker; `wake` is notified when new work is enqueued in this process.
    pub fn new(store: Store, runner: StepRunner, config: WorkerConfig, wake: Arc<Notify>) -> Self {
        Self {
            store,
            runner,
            config,
            wake,
            redis: None,
            state: Arc::new(WorkerState::default()),
            metrics: Arc::new(Metrics::new()),
            force: CancellationToken::new(),
        }
    }

    /// `force`, once cancelled during the drain, ends the grace period at
    /// once: running steps are stopped and released to the queue without
    /// spending an attempt (a second Ctrl-C locally).
    pub fn with_force(mut self, force: CancellationToken) -> Self {
        self.force = force;
        self
    }

    /// Records claims, outcomes and durations in `metrics` (shared with the
    /// process's HTTP server).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Nudges the workers of other processes through `redis` when this
    /// worker's queue maintenance queues a step.
    pub fn with_redis(mut self, redis: Option<crate::redis_bus::RedisBus>) -> Self {
        self.redis = redis;
        self
    }

    /// Shared live state, for health checks.
    pub fn state(&self) -> Arc<WorkerState> {
        self.state.clone()
    }

    /// The lease renewal tick: a third of the lease, at most a second (so a
    /// cancel reaches a running step within about a second).
    fn renew_every(&self) -> Duration {
        (self.config.lease / 3).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// Runs until `shutdown` is cancelled, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> DrainReport {
        let cfg = &self.config;
        info!(worker = %cfg.id, concurrency = cfg.concurrency, poll_interval_ms = cfg.poll_interval.as_millis() as u64, "worker started");
        let maintenance_stop = CancellationToken::new();
        let maintenance = tokio::spawn(crate::maintenance::run(
            self.store.clone(),
            cfg.id.clone(),
            cfg.poll_interval
                .clamp(Duration::from_millis(100), Duration::from_secs(1)),
            self.metrics.clone(),
            crate::nudge::Nudge::new(self.wake.clone(), self.redis.clone()),
            maintenance_stop.clone(),
        ));
        let completer = Completer::start(self.store.clone());
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut in_flight: HashMap<tokio::task::Id, InFlight> = HashMap::new();
        let mut last_beat = 0i64;
        let mut renew = tokio::time::interval(self.renew_every());
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        // The idle poll: a deadline that only a claim moves, so that the
        // lease-renewal tick (every second at most) neither claims nor
        // postpones it, and `poll_interval` means what it says.
        let poll = tokio::time::sleep(cfg.poll_interval);
        tokio::pin!(poll);
        let mut claim = true;

        while !shutdown.is_cancelled() {
            while let Some(done) = tasks.try_join_next_with_id() {
                Self::forget(&mut in_flight, done);
                // A slot freed: claim, whatever woke the loop.
                claim = true;
            }
            let now = now_ms();
            if now - last_beat >= HEARTBEAT_EVERY_MS {
                match self.store.heartbeat(&cfg.id, in_flight.len() as i64).await {
                    Ok(()) => last_beat = now,
                    Err(e) => {
                        self.metrics.dependency_failed(Dependency::database);
                        warn!(error = %e, "could not record the worker heartbeat");
                    }
                }
            }
            let free = cfg.concurrency.saturating_sub(in_flight.len());
            let mut claimed_all = false;
            if free > 0 && claim {
                poll.as_mut()
                    .reset(tokio::time::Instant::now() + cfg.poll_interval);
                match self.store.claim(&cfg.id, free as i64, cfg.lease).await {
                    Ok(jobs) => {
                        claimed_all = !jobs.is_empty() && jobs.len() == free;
                        for job in jobs {
                            let kind = KindLabels {
                                kind: job.step.kind().to_string(),
                            };
                            self.metrics.jobs_claimed.get_or_create(&kind).inc();
                            self.metrics
                                .queue_wait
                                .get_or_create(&kind)
                                .observe(job.waited_ms as f64 / 1000.0);
                            let executing = Arc::new(AtomicBool::new(true));
                            let handle = tasks.spawn(self.job_task(
                                job.clone(),
                                completer.clone(),
                                executing.clone(),
                            ));
                            in_flight.insert(
                                handle.id(),
                                InFlight {
                                    job,
                                    abort: handle,
                                    executing,
                                    started: Instant::now(),
                                },
                            );
                        }
                    }
                    Err(e) => {
                        self.metrics.dependency_failed(Dependency::database);
                        warn!(error = %e, "could not claim jobs; retrying after the poll interval");
                    }
                }
            }
            self.state
                .in_flight
                .store(in_flight.len(), Ordering::Relaxed);
            self.state.last_pass_ms.store(now_ms(), Ordering::Relaxed);
            if claimed_all {
                // The queue may hold more: claim again as soon as a slot frees
                // (the select below wakes on a finished job).
                tokio::task::yield_now().await;
            }
            claim = true;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = &mut poll => {
                    // Rearmed here too: a full worker does not claim, and a
                    // finished sleep would otherwise wake the loop at once.
                    poll.as_mut()
                        .reset(tokio::time::Instant::now() + cfg.poll_interval);
                }
                _ = renew.tick() => {
                    self.renew_leases(&mut in_flight).await;
                    claim = false;
                }
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => Self::forget(&mut in_flight, done),
            }
        }

        let report = self.drain(tasks, in_flight).await;
        completer.close().await;
        maintenance_stop.cancel();
        let _ = maintenance.await;
        if let Err(e) = self
            .store
            .forget_worker(&cfg.id, Duration::from_secs(86_400))
            .await
        {
            warn!(error = %e, "could not remove the worker heartbeat");
        }
        info!(
            drained = report.drained,
            released = report.released,
            "worker stopped"
        );
        report
    }

    /// Renews every held lease in one statement and stops the steps whose
    /// claim was lost.
    async fn renew_leases(&self, in_flight: &mut HashMap<tokio::task::Id, InFlight>) {
        let held: Vec<(i64, i64)> = in_flight
            .values()
            .filter(|f| f.executing.load(Ordering::Acquire))
            .map(|f| (f.job.id, f.job.attempt))
            .collect();
        if held.is_empty() {
            return;
        }
        let kept = match self
            .store
            .extend_leases(&self.config.id, &held, self.config.lease)
            .await
        {
            Ok(kept) => kept,
            Err(e) => {
                self.metrics.dependency_failed(Dependency::database);
                warn!(error = %e, jobs = held.len(), "could not renew leases; retrying next tick");
                return;
            }
        };
        for f in in_flight.values() {
            // A step that finished executing meanwhile may already be recorded
            // (its job row gone): only a step still running has lost anything.
            if !kept.contains(&f.job.id) && f.executing.swap(false, Ordering::AcqRel) {
                f.abort.abort();
                self.metrics.observe_job(
                    f.job.step.kind(),
                    JobOutcome::abandoned,
                    f.started.elapsed(),
                );
                info!(job_id = f.job.id, run_id = %f.job.run_id, correlation_id = %f.job.correlation_id,
                    "claim lost (run cancelled or lease taken over); step stopped");
            }
        }
    }

    fn forget(
        in_flight: &mut HashMap<tokio::task::Id, InFlight>,
        done: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => {
                if e.is_panic() {
                    error!(
                        "a job task panicked; its lease will expire and the job will be retried"
                    );
                }
                e.id()
            }
        };
        in_flight.remove(&id);
    }

    async fn drain(
        &self,
        mut tasks: JoinSet<()>,
        mut in_flight: HashMap<tokio::task::Id, InFlight>,
    ) -> DrainReport {
        let mut report = DrainReport::default();
        if !in_flight.is_empty() {
            info!(
                jobs = in_flight.len(),
                grace_ms = self.config.shutdown_grace.as_millis() as u64,
                "draining in-flight jobs"
            );
        }
        let deadline = tokio::time::sleep(self.config.shutdown_grace);
        tokio::pin!(deadline);
        // Leases are still renewed while steps drain: a grace period longer
        // than the lease must not hand a finishing step to another worker.
        let mut renew = tokio::time::interval(self.renew_every());
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        while !tasks.is_empty() {
            tokio::select! {
                Some(done) = tasks.join_next_with_id() => {
                    Self::forget(&mut in_flight, done);
                    report.drained += 1;
                }
                _ = renew.tick() => self.renew_leases(&mut in_flight).await,
                _ = &mut deadline => break,
                _ = self.force.cancelled() => {
                    info!(jobs = tasks.len(), "stopping at once: releasing running steps");
                    break;
                }
            }
        }
        tasks.abort_all();
        while let Some(done) = tasks.join_next_with_id().await {
            // Tasks that completed between the deadline and the abort count as drained.
            if let Ok((id, ())) = done {
                in_flight.remove(&id);
                report.drained += 1;
            }
        }
        report.released = self
            .release_all(in_flight.into_values().map(|f| f.job).collect())
            .await;
        self.state.in_flight.store(0, Ordering::Relaxed);
        report
    }

    /// Gives `jobs` back to the queue at shutdown, [`RELEASE_CONCURRENCY`]
    /// at a time; returns how many were released. Once one release finds
    /// the database unreachable the rest are not tried: each would wait out
    /// the pool's 5 s acquire timeout (or SQLite's 10 s busy timeout) in
    /// turn, and 256 jobs held shutdown for over 20 minutes. Their leases
    /// run out instead and they are delivered again.
    async fn release_all(&self, jobs: Vec<ClaimedJob>) -> usize {
        use futures::StreamExt as _;
        let gone = Arc::new(AtomicBool::new(false));
        let outcomes: Vec<Option<bool>> = futures::stream::iter(jobs)
            .map(|job| release_one(self.store.clone(), job, gone.clone()))
            .buffer_unordered(RELEASE_CONCURRENCY)
            .collect()
            .await;
        let skipped = outcomes.iter().filter(|o| o.is_none()).count();
        if skipped > 0 {
            warn!(
                jobs = skipped,
                "database unavailable at shutdown: jobs not released; their leases will expire instead"
            );
        }
        outcomes.iter().filter(|o| **o == Some(true)).count()
    }

    fn job_task(
        &self,
        job: ClaimedJob,
        completer: Completer,
        executing: Arc<AtomicBool>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let store = self.store.clone();
        let runner = self.runner.clone();
        let cfg = self.config.clone();
        let metrics = self.metrics.clone();
        let span = tracing::info_span!(
            "job",
            job_id = job.id,
            run_id = %job.run_id,
            correlation_id = %job.correlation_id,
            step = job.step_index,
            kind = job.step.kind(),
            attempt = job.attempt,
        );
        async move {
            let started = Instant::now();
            let kind = job.step.kind();
            let outcome = process(store, runner, cfg, job, completer, executing).await;
            if let Some(outcome) = outcome {
                metrics.observe_job(kind, outcome, started.elapsed());
            }
        }
        .instrument(span)
    }
}

/// A job this worker holds.
struct InFlight {
    job: ClaimedJob,
    abort: AbortHandle,
    /// True while the step executes; cleared (once) when it finishes or is
    /// stopped, so a finished step is never counted as lost.
    executing: Arc<AtomicBool>,
    started: Instant,
}

/// Executes one claimed job and records its outcome; `None` when the step was
/// stopped by the loop (which counted it).
async fn process(
    store: Store,
    runner: StepRunner,
    cfg: WorkerConfig,
    job: ClaimedJob,
    completer: Completer,
    executing: Arc<AtomicBool>,
) -> Option<JobOutcome> {
    debug!("step started");
    // Steps without references (constant templates, delays) skip two reads.
    let loaded = if job.step.needs_context() {
        store.run_context(job.run_id).await
    } else {
        Ok((serde_json::Value::Null, Vec::new()))
    };
    let context = match loaded {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "could not load the run context");
            if !executing.swap(false, Ordering::AcqRel) {
                return None;
            }
            let delay = backoff(job.attempt, cfg.backoff_base, cfg.backoff_max);
            persist(|| {
                store.retry(
                    &job,
                    "could not load run context (database unavailable)",
                    delay,
                )
            })
            .await;
            return Some(JobOutcome::retried);
        }
    };
    let ctx = TemplateContext {
        input: &context.0,
        outputs: &context.1,
    };
    let index = usize::try_from(job.step_index).unwrap_or(usize::MAX);
    let outcome = runner.execute(&job.step, index, &ctx).await;
    // From here the loop no longer stops this task: the outcome is recorded
    // (or found stale by its fencing token).
    if !executing.swap(false, Ordering::AcqRel) {
        return None;
    }
    match outcome {
        // An approval step's "output" is its rendered prompt: the step now
        // waits for a decision without this worker (no slot, no lease).
        Ok(serde_json::Value::String(prompt)) if matches!(job.step, StepSpec::Approval { .. }) => {
            match persist(|| store.await_approval(&job, &prompt)).await {
                Some(Some(expires_at)) => {
                    info!(
                        expires_at = %crate::model::rfc3339(expires_at),
                        "approval step waiting for a decision"
                    );
                    Some(JobOutcome::awaiting_approval)
                }
                Some(None) => {
                    info!("approval step reached but its claim was no longer valid");
                    Some(JobOutcome::abandoned)
                }
                // Not recorded: the lease runs out and the step is delivered again.
                None => Some(JobOutcome::abandoned),
            }
        }
        Ok(output) => match completer.complete(job, output).await {
            Some(Finish::Stale) => {
                info!("step finished but its claim was no longer valid; result discarded");
                Some(JobOutcome::abandoned)
            }
            _ => {
                debug!("step succeeded");
                Some(JobOutcome::succeeded)
            }
        },
        Err(StepError::Transient {
            message,
            retry_after,
        }) if job.attempt < job.max_attempts => {
            let delay = backoff(job.attempt, cfg.backoff_base, cfg.backoff_max)
                .max(retry_after.unwrap_or_default());
            warn!(error = %message, delay_ms = delay.as_millis() as u64, "step failed; retry scheduled");
            persist(|| store.retry(&job, &message, delay)).await;
            Some(JobOutcome::retried)
        }
        Err(e) => {
            let message = e.to_string();
            warn!(error = %message, "step failed for good; dead-lettered");
            persist(|| store.dead_letter(&job, &message)).await;
            Some(JobOutcome::dead_lettered)
        }
    }
}

/// One release of [`Worker::release_all`]: `None` when not tried (the
/// database was found unreachable), else whether it was released.
async fn release_one(store: Store, job: ClaimedJob, gone: Arc<AtomicBool>) -> Option<bool> {
    if gone.load(Ordering::Relaxed) {
        return None;
    }
    match store.release(&job).await {
        Ok(Finish::Recorded) => {
            info!(job_id = job.id, run_id = %job.run_id, correlation_id = %job.correlation_id, "released unfinished job to the queue");
            Some(true)
        }
        Ok(Finish::Stale) => Some(false),
        Err(e) => {
            gone.fetch_or(e.is_unavailable(), Ordering::Relaxed);
            warn!(job_id = job.id, error = %e, "could not release job; its lease will expire instead");
            Some(false)
        }
    }
}

/// Releases in flight at once at shutdown: a worker may hold thousands of
/// slow steps, and one release each in turn is one round trip each.
const RELEASE_CONCURRENCY: usize = 16;

/// Records an outcome, retrying briefly while the database is unavailable.
/// If it still cannot, the lease runs out and the job is delivered again, so
/// giving up here loses nothing. `None` however it ended; see
/// [`persist_or_why`] for a caller that needs to know.
pub(crate) async fn persist<F, Fut, T>(write: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    persist_or_why(write).await.ok()
}

/// Why [`persist_or_why`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unrecorded {
    /// The database stayed unreachable through [`PERSIST_BUDGET`].
    Unavailable,
    /// The write was refused for another reason (logged at `error`).
    Refused,
}

/// How long [`persist_or_why`] keeps trying an unreachable database: up to
/// six tries, 100 ms doubling to at most 2 s apart, and no new try once this
/// has passed since the first. A try can itself wait the pool's 5 s acquire
/// timeout, so without the budget six tries took 35 s, and a result waiting
/// behind them waited as long.
pub(crate) const PERSIST_BUDGET: Duration = Duration::from_secs(10);

/// [`persist`], telling an unreachable database (which every other write
/// would meet too) from a write refused on its own account.
pub(crate) async fn persist_or_why<F, Fut, T>(mut write: F) -> Result<T, Unrecorded>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    for tries in 1..=6 {
        match write().await {
            Ok(f) => return Ok(f),
            Err(e) if e.is_unavailable() => {
                if tries == 6 || started.elapsed() + delay >= PERSIST_BUDGET {
                    warn!(error = %e, "database unavailable while recording a step outcome; the job will be redelivered after its lease");
                    break;
                }
                warn!(error = %e, "database unavailable while recording a step outcome; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                error!(error = %e, "could not record a step outcome; the job will be redelivered after its lease");
                return Err(Unrecorded::Refused);
            }
        }
    }
    Err(Unrecorded::Unavailable)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_respects_the_ceiling() {
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1_000);
        for _ in 0..50 {
            let d1 = backoff(1, base, max);
            assert!(d1 >= Duration::from_millis(50) && d1 <= base, "{d1:?}");
            let d3 = backoff(3, base, max);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let d20 = backoff(20, base, max);
            assert!(d20 >= Duration::from_millis(500) && d20 <= max, "{d20:?}");
        }
    }
}
