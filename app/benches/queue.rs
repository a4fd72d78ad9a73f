//! Queue benchmark: how many no-op steps per second go through the real store
//! and worker, on SQLite and on a throwaway PostgreSQL started exactly as the
//! tests start it, and how long a job waits between enqueue and start.
//!
//! Scenarios, per backend, each on a fresh migrated database:
//! - `raw drain`: a pre-loaded backlog drained by tasks calling
//!   [`Store::claim`] and then [`Store::complete_batch_in_lane`] for what they
//!   claimed (one job per transaction with one task, as the baseline), without
//!   the worker: the cost of the store's statements alone, hence the ceiling
//!   of any worker over this store, printed beside pgqueuer's drain;
//! - `worker drain`: the same backlog drained by [`Worker`]s (1-step and
//!   2-step runs), the cost of the full machinery;
//! - `steady (saturated)`: producers create runs as fast as the workers keep
//!   up (the backlog is held under a cap) while workers consume, for a fixed
//!   window; reports consumed jobs/s;
//! - `steady (paced)`: producers offer half the saturated rate; its p50/p99
//!   enqueue-to-start is the latency of a queue that is keeping up.
//!
//! Figures are printed as a table; nothing about speed is asserted.
//! `VM_BENCH_QUICK=1` shrinks every size for a smoke run of a few seconds per
//! scenario; `VM_BENCH_BACKENDS=sqlite` or `=postgres` runs one backend only.
//! See `docs/benchmarks.md`.

mod peers;
#[path = "../tests/support/mod.rs"]
mod support;

/// The allocator the `vm-webapp` binary ships with (see its `main.rs`), so
/// the in-process scenarios measure the same code as `serve` and `worker`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;
use support::{Backend, TestEnv};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vm_webapp::metrics::{JobLabels, JobOutcome, Metrics};
use vm_webapp::model::{NewRun, RunStatus};
use vm_webapp::steps::llm::LlmBackend;
use vm_webapp::steps::{StepRunner, parse_steps};
use vm_webapp::store::{Completion, CreateOutcome, Store};
use vm_webapp::worker::{DrainReport, Worker, WorkerConfig};

/// Lease for every claim in the bench: long enough that no job is ever
/// rescued, so every figure is first deliveries only.
const LEASE_MS: &str = "30000";
/// The worker's idle poll interval (the `worker` command's documented default).
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Latency samples read back per steady-state scenario.
const MAX_SAMPLES: usize = 1_000;
/// Upper bound on any wait for a queue to empty, so a stuck queue cannot hang the bench.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// CPU time of this process and of the PostgreSQL server under test, so each
/// row can say where the cycles went (Linux `/proc`; zero elsewhere).
struct CpuMeter {
    backend: Backend,
    wall: Instant,
    app: f64,
    pg: f64,
}

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on Linux).
const TICKS: f64 = 100.0;

/// (ppid, own CPU s, reaped children's CPU s) from a `/proc/<pid>/stat` line.
fn proc_stat(line: &str) -> Option<(u32, f64, f64)> {
    let fields: Vec<&str> = line.rsplit_once(')')?.1.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    let ppid = fields.get(1)?.parse().ok()?;
    Some((
        ppid,
        (num(11)? + num(12)?) / TICKS,
        (num(13)? + num(14)?) / TICKS,
    ))
}

fn read_stat(pid: &str) -> Option<(u32, f64, f64)> {
    proc_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds of the postmaster, its live backends and its exited ones.
fn postgres_cpu() -> f64 {
    let pid_file = support::pg::shared()
        .base()
        .join("data")
        .join("postmaster.pid");
    let Some(master) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return 0.0;
    };
    let mut total = read_stat(&master.to_string()).map_or(0.0, |(_, own, reaped)| own + reaped);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if let Some((_, own, _)) = read_stat(pid).filter(|(ppid, _, _)| *ppid == master) {
                total += own;
            }
        }
    }
    total
}

impl CpuMeter {
    fn start(backend: Backend) -> CpuMeter {
        let app = read_stat("self").map_or(0.0, |(_, own, _)| own);
        let pg = if backend == Backend::Postgres {
            postgres_cpu()
        } else {
            0.0
        };
        CpuMeter {
            backend,
            wall: Instant::now(),
            app,
            pg,
        }
    }

    /// "cpu: app 0.60 + pg 1.20 cores" over the time since `start`.
    fn report(&self) -> String {
        let secs = self.wall.elapsed().as_secs_f64().max(1e-6);
        let app = read_stat("self").map_or(0.0, |(_, own, _)| own) - self.app;
        if self.backend == Backend::Postgres {
            let pg = postgres_cpu() - self.pg;
            format!("cpu: app {:.2} + pg {:.2} cores", app / secs, pg / secs)
        } else {
            format!("cpu: app {:.2} cores", app / secs)
        }
    }
}

/// Sizes of one backend's scenarios.
struct Plan {
    /// Jobs drained by one task claiming one job per transaction.
    raw_single: usize,
    /// Jobs drained by the batched raw loop and by the workers.
    backlog: usize,
    /// Tasks of the batched raw loop.
    raw_tasks: usize,
    /// Jobs per claim and per completion transaction in the batched raw
    /// loop: 100, the batch of pgqueuer's drain beside it.
    raw_batch: i64,
    /// Worker "processes", each with its own pool.
    workers: usize,
    /// Jobs each worker runs at once.
    concurrency: usize,
    /// Tasks creating runs (preload and steady state).
    producers: usize,
    /// Warm-up before a steady-state window.
    warmup: Duration,
    /// Length of a steady-state window.
    window: Duration,
}

impl Plan {
    fn new(backend: Backend, quick: bool) -> Plan {
        let (raw_single, backlog) = match (backend, quick) {
            (Backend::Postgres, false) => (5_000, 20_000),
            (Backend::Sqlite, false) => (2_000, 5_000),
            (Backend::Postgres, true) => (500, 2_000),
            (Backend::Sqlite, true) => (300, 1_000),
        };
        Plan {
            raw_single,
            backlog,
            raw_tasks: 4,
            raw_batch: 100,
            workers: 2,
            concurrency: 256,
            producers: 64,
            warmup: if quick {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(1)
            },
            window: if quick {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(10)
            },
        }
    }

    fn shape(&self) -> String {
        format!("{}x{}", self.workers, self.concurrency)
    }
}

/// One line of the results table.
struct Row {
    backend: &'static str,
    mode: String,
    shape: String,
    jobs: u64,
    secs: f64,
    p50_ms: Option<i64>,
    p99_ms: Option<i64>,
    note: String,
}

impl Row {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.jobs as f64 / self.secs
        } else {
            0.0
        }
    }

    fn print_header() {
        println!(
            "{:<8} {:<22} {:>9} {:>7} {:>7} {:>9} {:>8} {:>8}  notes",
            "backend", "mode", "workers", "jobs", "secs", "jobs/s", "p50 ms", "p99 ms"
        );
        println!("{}", "-".repeat(100));
    }

    fn print(&self) {
        let ms = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        println!(
            "{:<8} {:<22} {:>9} {:>7} {:>7.2} {:>9.0} {:>8} {:>8}  {}",
            self.backend,
            self.mode,
            self.shape,
            self.jobs,
            self.secs,
            self.rate(),
            ms(self.p50_ms),
            ms(self.p99_ms),
            self.note
        );
    }
}

fn name(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    }
}

/// A run of `steps` no-op template steps (a constant template: no database
/// reads beyond what the worker always does, no CPU worth measuring).
fn no_op_run(steps: usize) -> NewRun {
    let input = json!({});
    let raw: Vec<Value> = (0..steps)
        .map(|_| json!({"kind": "template", "template": "x"}))
        .collect();
    NewRun {
        steps: parse_steps(&raw, &input).expect("no-op steps are valid"),
        input,
        idempotency_key: None,
        request_hash: "bench".into(),
        correlation_id: String::new(),
        max_attempts: 3,
        actor: "test".into(),
        request_id: None,
        tenant: "anonymous".to_string(),
    }
}

async fn enqueue(store: &Store, template: &NewRun) -> Uuid {
    let mut new = template.clone();
    new.correlation_id = format!("bench-{}", Uuid::new_v4().simple());
    match store.create_run(&new).await.expect("create run") {
        CreateOutcome::Created(run) => run.id,
        other => panic!("expected a new run, got {other:?}"),
    }
}

/// A fresh migrated database.
async fn fresh(backend: Backend) -> TestEnv {
    TestEnv::new(
        backend,
        &[("VM_JOB_LEASE_MS", LEASE_MS), ("LOG_LEVEL", "error")],
    )
    .await
}

/// Creates `runs` runs of `steps` steps with `producers` concurrent tasks.
async fn preload(store: &Store, runs: usize, steps: usize, producers: usize) -> Duration {
    let started = Instant::now();
    let template = no_op_run(steps);
    let mut tasks = JoinSet::new();
    for p in 0..producers {
        let store = store.clone();
        let template = template.clone();
        let mine = runs / producers + usize::from(p < runs % producers);
        tasks.spawn(async move {
            for _ in 0..mine {
                enqueue(&store, &template).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("producer");
    }
    started.elapsed()
}

/// Waits until no job is waiting, queued or running; false on timeout.
async fn wait_empty(store: &Store, done: &Finished, jobs: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    // The workers count each job once its completion has committed, so the
    // wait asks the database nothing until they have counted every job. It
    // used to poll `SELECT 1 FROM jobs LIMIT 1` every 20 ms, a sequential
    // scan over the pages the drain had just emptied (thousands of dead
    // tuples), on the server under test; a GROUP BY every few ms before that
    // came third in pg_stat_statements.
    while done.jobs() < jobs && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    loop {
        // Then the database confirms (a retried or rescued job keeps it waiting).
        if !store.has_unfinished_jobs().await.expect("queue check") {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Jobs the bench's workers have finished for good (result recorded or dead
/// lettered), read from the metrics they share: in-process, so following a
/// drain or holding a backlog cap costs the database server nothing.
#[derive(Clone, Default)]
struct Finished(Arc<Metrics>);

impl Finished {
    fn jobs(&self) -> u64 {
        [JobOutcome::succeeded, JobOutcome::dead_lettered]
            .into_iter()
            .map(|outcome| {
                self.0
                    .jobs_finished
                    .get_or_create(&JobLabels {
                        kind: "template".into(),
                        outcome,
                    })
                    .get()
            })
            .sum()
    }
}

/// "all N runs succeeded" or what went wrong, for the notes column.
async fn outcome(store: &Store, expected: usize) -> String {
    let counts = store.run_counts().await.expect("run counts");
    let ok = counts.get(&RunStatus::Succeeded).copied().unwrap_or(0);
    let dead = store.queue_counts().await.expect("queue counts").dead;
    if ok as usize == expected && dead == 0 {
        format!("{ok} runs ok")
    } else {
        format!("CHECK: {ok}/{expected} runs succeeded, {dead} dead")
    }
}

/// Workers as separate processes would be: each its own pool, sized as the
/// `worker` command sizes it.
async fn spawn_workers(
    env: &TestEnv,
    plan: &Plan,
    wake: &Arc<Notify>,
    done: &Finished,
) -> Vec<(JoinHandle<DrainReport>, CancellationToken)> {
    let mut workers = Vec::new();
    for i in 0..plan.workers {
        // As the `worker` command sizes it: steps hold no connection while
        // they run, so the pool does not grow with concurrency.
        let pool = (plan.concurrency as u32 + 2).min(12);
        let store = Store::connect(&env.settings.database, pool)
            .await
            .expect("worker pool");
        let config = WorkerConfig {
            id: format!("bench-{i}"),
            concurrency: plan.concurrency,
            poll_interval: POLL_INTERVAL,
            lease: env.settings.queue.lease,
            backoff_base: env.settings.queue.backoff_base,
            backoff_max: env.settings.queue.backoff_max,
            shutdown_grace: Duration::from_secs(5),
        };
        let worker = Worker::new(
            store,
            StepRunner::new(LlmBackend::Offline),
            config,
            wake.clone(),
        )
        .with_metrics(done.0.clone());
        let token = CancellationToken::new();
        workers.push((tokio::spawn(worker.run(token.clone())), token));
    }
    workers
}

async fn stop_workers(workers: Vec<(JoinHandle<DrainReport>, CancellationToken)>) {
    for (_, token) in &workers {
        token.cancel();
    }
    for (handle, _) in workers {
        handle.await.expect("worker");
    }
}

/// Drains `jobs` one-step jobs with `tasks` tasks each claiming `batch` jobs
/// per transaction and completing them in one transaction (each task its
/// own usage-counter lane, as the completer's flushers): no worker, no step
/// execution.
async fn raw_drain(
    backend: Backend,
    tasks: usize,
    batch: i64,
    jobs: usize,
    producers: usize,
) -> Row {
    let env = fresh(backend).await;
    preload(&env.store, jobs, 1, producers).await;
    let store = Store::connect(&env.settings.database, tasks as u32 + 2)
        .await
        .expect("raw pool");
    let lease = Duration::from_millis(LEASE_MS.parse().expect("lease"));
    let output = json!("x");
    // One round trip (`SELECT 1`) on the same pool: the floor under every statement.
    let pings = 500;
    let t = Instant::now();
    for _ in 0..pings {
        store.ping().await.expect("ping");
    }
    let ping_ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(pings);
    let cpu = CpuMeter::start(backend);
    let started = Instant::now();
    let mut set = JoinSet::new();
    for task in 0..tasks {
        let store = store.clone();
        let output = output.clone();
        set.spawn(async move {
            let id = format!("raw-{task}");
            let (mut done, mut claims) = (0u64, 0u64);
            let (mut claiming, mut completing) = (Duration::ZERO, Duration::ZERO);
            loop {
                let t = Instant::now();
                let claimed = store.claim(&id, batch, lease).await.expect("claim");
                claiming += t.elapsed();
                claims += 1;
                if claimed.is_empty() {
                    return (done, claims, claiming, completing);
                }
                let t = Instant::now();
                let batch: Vec<Completion> = claimed
                    .into_iter()
                    .map(|job| Completion {
                        job,
                        output: output.clone(),
                    })
                    .collect();
                store
                    .complete_batch_in_lane(&batch, task as u64)
                    .await
                    .expect("complete");
                done += batch.len() as u64;
                completing += t.elapsed();
            }
        });
    }
    let (mut done, mut claims) = (0, 0);
    let (mut claiming, mut completing) = (Duration::ZERO, Duration::ZERO);
    while let Some(n) = set.join_next().await {
        let (d, c, cl, co) = n.expect("raw task");
        (done, claims, claiming, completing) =
            (done + d, claims + c, claiming + cl, completing + co);
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu.report();
    let note = format!(
        "{batch}/tx: {:.2} ms/claim, {:.2} ms/completion, {ping_ms:.2} ms/ping; {cpu}; {}",
        claiming.as_secs_f64() * 1e3 / claims.max(1) as f64,
        // Each task's last claim finds nothing and completes nothing.
        completing.as_secs_f64() * 1e3 / claims.saturating_sub(tasks as u64).max(1) as f64,
        outcome(&env.store, jobs).await
    );
    store.close().await;
    Row {
        backend: name(backend),
        mode: "raw drain".into(),
        shape: format!("{tasks}x{batch}"),
        jobs: done,
        secs,
        p50_ms: None,
        p99_ms: None,
        note,
    }
}

/// Pre-loads `runs` runs of `steps` steps, then times the workers draining them.
async fn worker_drain(backend: Backend, plan: &Plan, runs: usize, steps: usize) -> Row {
    let env = fresh(backend).await;
    let loading = preload(&env.store, runs, steps, plan.producers).await;
    let wake = Arc::new(Notify::new());
    let cpu = CpuMeter::start(backend);
    let started = Instant::now();
    let done = Finished::default();
    let workers = spawn_workers(&env, plan, &wake, &done).await;
    let emptied = wait_empty(&env.store, &done, (runs * steps) as u64, DRAIN_TIMEOUT).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu.report();
    stop_workers(workers).await;
    let mut note = format!(
        "{cpu}; preloaded at {:.0} runs/s; {}",
        runs as f64 / loading.as_secs_f64().max(1e-6),
        outcome(&env.store, runs).await
    );
    if !emptied {
        note.push_str("; TIMED OUT");
    }
    Row {
        backend: name(backend),
        mode: format!("worker drain {steps}-step"),
        shape: plan.shape(),
        jobs: (runs * steps) as u64,
        secs,
        p50_ms: None,
        p99_ms: None,
        note,
    }
}

/// Producers create one-step runs while workers consume them. `rate` paces
/// the producers (runs/s, open loop); `None` lets them go as fast as the
/// workers keep up, holding the backlog under a cap so that the window is a
/// steady state rather than a growing queue.
async fn steady(backend: Backend, plan: &Plan, rate: Option<f64>) -> Row {
    let env = fresh(backend).await;
    // PostgreSQL is the clustered set-up: producers (the API) publish a
    // wake-up on Redis per new run and the workers' process subscribes, as
    // separate `serve` and `worker` processes do. SQLite is local mode: the
    // enqueue wakes the in-process worker directly.
    let wake = Arc::new(Notify::new());
    let redis = (backend == Backend::Postgres).then(support::redis::RedisServer::start);
    let bus = redis.as_ref().map(|r| {
        vm_webapp::redis_bus::RedisBus::new(
            &vm_webapp::config::Secret::new(r.url()),
            Arc::new(vm_webapp::metrics::Metrics::new()),
        )
        .expect("redis url")
    });
    let subscription = CancellationToken::new();
    if let Some(bus) = bus.clone() {
        tokio::spawn(bus.forward_wakeups(wake.clone(), subscription.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let done = Finished::default();
    let workers = spawn_workers(&env, plan, &wake, &done).await;
    let cap = (4 * plan.workers * plan.concurrency) as i64;
    let stop = CancellationToken::new();
    let recording = Arc::new(AtomicBool::new(false));
    let sampled: Arc<Mutex<Vec<Uuid>>> = Arc::default();
    let tickets = Arc::new(AtomicU64::new(0));
    let produced = Arc::new(AtomicU64::new(0));
    let origin = tokio::time::Instant::now();

    // Producers announce new runs the way the API's handler does
    // (`Nudge::enqueued`: the Redis publish runs off the request's path). On
    // PostgreSQL the API process has no worker of its own, so its local
    // wake-up reaches nobody and the workers hear of new runs through Redis.
    let nudge = match &bus {
        Some(bus) => vm_webapp::nudge::Nudge::new(Arc::new(Notify::new()), Some(bus.clone())),
        None => vm_webapp::nudge::Nudge::new(wake.clone(), None),
    };
    let mut producers = JoinSet::new();
    for _ in 0..plan.producers {
        let (store, stop) = (env.store.clone(), stop.clone());
        let nudge = nudge.clone();
        let (done, recording, sampled) = (done.clone(), recording.clone(), sampled.clone());
        let (tickets, produced) = (tickets.clone(), produced.clone());
        let template = no_op_run(1);
        producers.spawn(async move {
            while !stop.is_cancelled() {
                match rate {
                    Some(rate) => {
                        let n = tickets.fetch_add(1, Ordering::Relaxed);
                        let due = origin + Duration::from_secs_f64(n as f64 / rate);
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep_until(due) => {}
                        }
                    }
                    // Runs created and not yet finished (one job each).
                    None if produced.load(Ordering::Relaxed) as i64 - done.jobs() as i64 >= cap => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    None => {}
                }
                let id = enqueue(&store, &template).await;
                nudge.enqueued();
                produced.fetch_add(1, Ordering::Relaxed);
                if recording.load(Ordering::Relaxed) {
                    sampled.lock().expect("samples").push(id);
                }
            }
        });
    }

    let succeeded = |store: Store| async move {
        store
            .run_counts()
            .await
            .expect("run counts")
            .get(&RunStatus::Succeeded)
            .copied()
            .unwrap_or(0)
    };
    tokio::time::sleep(plan.warmup).await;
    let cpu = CpuMeter::start(backend);
    let (s0, p0, t0) = (
        succeeded(env.store.clone()).await,
        produced.load(Ordering::Relaxed),
        Instant::now(),
    );
    recording.store(true, Ordering::Relaxed);
    tokio::time::sleep(plan.window).await;
    recording.store(false, Ordering::Relaxed);
    let (s1, p1, secs) = (
        succeeded(env.store.clone()).await,
        produced.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    let cpu = cpu.report();
    stop.cancel();
    while let Some(done) = producers.join_next().await {
        done.expect("producer");
    }
    // Let the runs created in the window start, so the latency sample has no
    // survivor bias, then stop the workers.
    let emptied = wait_empty(
        &env.store,
        &done,
        produced.load(Ordering::Relaxed),
        DRAIN_TIMEOUT,
    )
    .await;
    stop_workers(workers).await;
    subscription.cancel();
    drop(redis);

    let ids = std::mem::take(&mut *sampled.lock().expect("samples"));
    let (p50, p99, unstarted) = enqueue_to_start(&env.store, &ids).await;
    let offered = (p1 - p0) as f64 / secs;
    let mut note = match rate {
        Some(rate) => format!("offered {rate:.0}/s, enqueued {offered:.0}/s"),
        None => format!("producers flat out (backlog cap {cap}), enqueued {offered:.0}/s"),
    };
    note.push_str(&format!(
        "; {cpu}; latency of {} samples{}",
        ids.len().min(MAX_SAMPLES),
        if bus.is_some() {
            "; wake-ups via Redis"
        } else {
            ""
        }
    ));
    if unstarted > 0 || !emptied {
        note.push_str(&format!("; CHECK: {unstarted} sampled runs never started"));
    }
    Row {
        backend: name(backend),
        mode: if rate.is_some() {
            "steady (paced)".into()
        } else {
            "steady (saturated)".into()
        },
        shape: plan.shape(),
        jobs: (s1 - s0).max(0) as u64,
        secs,
        p50_ms: p50,
        p99_ms: p99,
        note,
    }
}

/// p50 and p99 of `started_at - created_at` over an even sample of `ids`
/// (both stamped with the same clock, in ms), and how many never started.
async fn enqueue_to_start(store: &Store, ids: &[Uuid]) -> (Option<i64>, Option<i64>, usize) {
    let step = ids.len().div_ceil(MAX_SAMPLES).max(1);
    let mut waits = Vec::new();
    let mut unstarted = 0;
    for id in ids.iter().step_by(step) {
        let detail = store
            .get_run(*id)
            .await
            .expect("get run")
            .expect("run exists");
        match detail.run.started_at {
            Some(started) => waits.push(started - detail.run.created_at),
            None => unstarted += 1,
        }
    }
    waits.sort_unstable();
    let pick = |q: f64| {
        (!waits.is_empty()).then(|| waits[((waits.len() - 1) as f64 * q).round() as usize])
    };
    (pick(0.50), pick(0.99), unstarted)
}

async fn bench_backend(backend: Backend, quick: bool, rows: &mut Vec<Row>) {
    let plan = Plan::new(backend, quick);
    let mut record = |row: Row| {
        row.print();
        rows.push(row);
    };
    if selected("raw") {
        record(raw_drain(backend, 1, 1, plan.raw_single, plan.producers).await);
        record(
            raw_drain(
                backend,
                plan.raw_tasks,
                plan.raw_batch,
                plan.backlog,
                plan.producers,
            )
            .await,
        );
    }
    if selected("drain") {
        record(worker_drain(backend, &plan, plan.backlog, 1).await);
        record(worker_drain(backend, &plan, plan.backlog / 2, 2).await);
    }
    if selected("steady") {
        let saturated = steady(backend, &plan, None).await;
        let half = (saturated.rate() / 2.0).max(10.0);
        record(saturated);
        record(steady(backend, &plan, Some(half)).await);
    }
}

/// Whether the scenario group `name` (`raw`, `drain`, `steady`, `peers`,
/// `http`, `slow`) runs: all of them unless `VM_BENCH_ONLY` lists some
/// (comma-separated), for measuring one change without the whole run.
fn selected(name: &str) -> bool {
    match std::env::var("VM_BENCH_ONLY") {
        Ok(only) if !only.trim().is_empty() => only.split(',').any(|s| s.trim() == name),
        _ => true,
    }
}

/// The 1/5/15-minute load averages: other work on the machine skews every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// What the PostgreSQL server under test is and how it is tuned, for the header.
async fn postgres_settings() -> String {
    let server = tokio::task::spawn_blocking(support::pg::shared)
        .await
        .expect("start postgres");
    let mut conn = sqlx::PgConnection::connect(&server.url("postgres"))
        .await
        .expect("connect");
    let mut shown = Vec::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "shared_buffers",
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut conn)
            .await
            .expect("show setting");
        shown.push(format!("{name}={value}"));
    }
    let _ = conn.close().await;
    shown.join(", ")
}

/// One line of the side-by-side table.
struct Compare {
    figure: &'static str,
    ours: Option<f64>,
    peer: Option<f64>,
    unit: &'static str,
    note: String,
}

impl Compare {
    fn print_header() {
        println!(
            "{:<44} {:>12} {:>12} {:>7}  notes",
            "figure", "vm-webapp", "peer", "ratio"
        );
        println!("{}", "-".repeat(100));
    }

    fn print(&self) {
        let v =
            |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.0} {}", self.unit));
        let ratio = match (self.ours, self.peer) {
            (Some(o), Some(p)) if p > 0.0 => format!("{:.2}x", o / p),
            _ => "-".to_string(),
        };
        println!(
            "{:<44} {:>12} {:>12} {:>7}  {}",
            self.figure,
            v(self.ours),
            v(self.peer),
            ratio,
            self.note
        );
    }
}

/// The environment of a `vm-webapp serve` or `worker` under test: no embedded
/// worker (staging), no rate limits, quiet logs.
fn app_env(db_url: &str, root: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("APP_ENV", "staging".into()),
        ("VM_DB_URL", db_url.into()),
        ("VM_WORKSPACE_ROOT", root.display().to_string()),
        ("VM_RATE_LIMIT_IP_RPS", "0".into()),
        ("VM_RATE_LIMIT_KEY_RPS", "0".into()),
        ("VM_JOB_LEASE_MS", LEASE_MS.into()),
        ("LOG_LEVEL", "error".into()),
        ("LOG_FORMAT", "json".into()),
    ]
}

/// Migrates `db_url` with the real binary, then starts `serve` on it.
fn start_serve(db_url: &str, root: &std::path::Path) -> Result<peers::Server, String> {
    let bin = env!("CARGO_BIN_EXE_vm-webapp");
    let migrated = std::process::Command::new(bin)
        .arg("migrate")
        .envs(app_env(db_url, root))
        .output()
        .map_err(|e| e.to_string())?;
    if !migrated.status.success() {
        return Err(format!(
            "migrate failed: {}",
            String::from_utf8_lossy(&migrated.stderr)
        ));
    }
    let port = peers::free_port();
    let child = std::process::Command::new(bin)
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .envs(app_env(db_url, root))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    peers::Server::ready(child, port)
}

const CREATE_BODY: &str =
    r#"{"input":{"name":"Ada"},"steps":[{"kind":"template","template":"Hello, {{input.name}}!"}]}"#;

/// `wrk` figure of one server, or why there is none.
fn wrk_rate(
    server: &Result<peers::Server, String>,
    path: &str,
    body: Option<&str>,
    secs: u64,
) -> (Option<f64>, String) {
    match server {
        Err(e) => (None, e.clone()),
        Ok(s) => match peers::wrk(s.port, path, body, secs) {
            Ok(r) if r.errors > 0 => (Some(r.rate), format!("CHECK: {} non-2xx answers", r.errors)),
            Ok(r) => (Some(r.rate), String::new()),
            Err(e) => (None, e),
        },
    }
}

/// HTTP figures: run creation and liveness against the FastAPI anchor on
/// SQLite, and run creation on PostgreSQL, with the same wrk flags.
fn http_side_by_side(quick: bool, pg_url: Option<String>) -> Vec<Compare> {
    let secs = if quick { 3 } else { 10 };
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = start_serve(
        &format!("sqlite://{}/bench.db", dir.path().display()),
        dir.path(),
    );
    let anchor = peers::Peers::find()
        .and_then(|p| p.fastapi(peers::free_port(), &dir.path().join("anchor.db")));
    let mut rows = Vec::new();
    let (o, on) = wrk_rate(&ours, "/api/v2/runs", Some(CREATE_BODY), secs);
    let (p, pn) = wrk_rate(&anchor, "/api/v2/runs", Some(CREATE_BODY), secs);
    rows.push(Compare {
        figure: "POST /api/v2/runs, SQLite (wrk -t1 -c32)",
        ours: o,
        peer: p,
        unit: "/s",
        note: format!("peer: FastAPI + uvicorn x2 on SQLite. {on} {pn}")
            .trim()
            .to_string(),
    });
    let (o, on) = wrk_rate(&ours, "/api/v2/health/live", None, secs);
    let (p, pn) = wrk_rate(&anchor, "/api/v2/health/live", None, secs);
    rows.push(Compare {
        figure: "GET /api/v2/health/live (wrk -t1 -c32)",
        ours: o,
        peer: p,
        unit: "/s",
        note: format!("{on} {pn}").trim().to_string(),
    });
    drop(ours);
    drop(anchor);
    if let Some(url) = pg_url {
        let ours = start_serve(&url, dir.path());
        let (o, on) = wrk_rate(&ours, "/api/v2/runs", Some(CREATE_BODY), secs);
        rows.push(Compare {
            figure: "POST /api/v2/runs, PostgreSQL (wrk -t1 -c32)",
            ours: o,
            peer: None,
            unit: "/s",
            note: format!("no peer; goal 5000/s. {on}").trim().to_string(),
        });
    }
    rows
}

/// Slow (LLM-like) steps: `runs` one-step runs of a `delay_ms` step drained by
/// one `vm-webapp worker` process at `concurrency`; returns the elapsed time,
/// the ideal time and the worker's peak RSS.
async fn slow_steps(
    runs: usize,
    delay_ms: u64,
    concurrency: usize,
) -> Result<(f64, f64, f64), String> {
    let url = support::pg::shared().create_database().await;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let env = TestEnv::at(Some(url.clone()), &[("LOG_LEVEL", "error")]).await;
    let input = json!({});
    let template = NewRun {
        steps: parse_steps(&[json!({"kind": "delay", "ms": delay_ms})], &input)
            .map_err(|e| format!("{e:?}"))?,
        ..no_op_run(1)
    };
    let mut tasks = JoinSet::new();
    for p in 0..64 {
        let store = env.store.clone();
        let template = template.clone();
        let mine = runs / 64 + usize::from(p < runs % 64);
        tasks.spawn(async move {
            for _ in 0..mine {
                enqueue(&store, &template).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let health = peers::free_port();
    let started = Instant::now();
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_vm-webapp"))
        .args([
            "worker",
            "--concurrency",
            &concurrency.to_string(),
            "--poll-interval-ms",
            "100",
            "--health-host",
            "127.0.0.1",
            "--health-port",
            &health.to_string(),
        ])
        .envs(app_env(&url, dir.path()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pid = worker.id();
    let mut peak = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = loop {
        peak = peak.max(peers::peak_rss_mb(pid).unwrap_or(0.0));
        let counts = env.store.run_counts().await.map_err(|e| e.to_string())?;
        let finished: i64 = counts
            .iter()
            .filter(|(s, _)| s.is_terminal())
            .map(|(_, n)| n)
            .sum();
        if finished as usize >= runs || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let _ = worker.kill();
    let _ = worker.wait();
    let succeeded = done.get(&RunStatus::Succeeded).copied().unwrap_or(0);
    if succeeded as usize != runs {
        return Err(format!("CHECK: {succeeded} of {runs} runs succeeded"));
    }
    let ideal = (runs as f64 / concurrency as f64).ceil() * delay_ms as f64 / 1000.0;
    Ok((secs, ideal, peak))
}

/// The figures issue-level goals are stated in, each beside its peer.
async fn side_by_side(quick: bool, has_pg: bool, rows: &[Row]) -> Vec<Compare> {
    let peers = peers::Peers::find();
    let mut out = Vec::new();
    let pg_rate = |mode: &str| {
        rows.iter()
            .find(|r| r.backend == "postgres" && r.mode == mode)
            .map(Row::rate)
    };
    if has_pg && selected("peers") {
        let jobs = if quick { "5000" } else { "20000" };
        let drain = match &peers {
            Ok(p) => {
                let url = support::pg::shared().create_database().await;
                tokio::task::block_in_place(|| {
                    p.pgqueuer(
                        &url,
                        &["-s", "drain", "--dequeue-batch-size", "100", "--jobs", jobs],
                    )
                })
            }
            Err(e) => Err(e.clone()),
        };
        out.push(Compare {
            figure: "drain, one-step runs (PostgreSQL)",
            ours: pg_rate("worker drain 1-step"),
            peer: drain.as_ref().ok().copied(),
            unit: "/s",
            note: drain.clone().err().unwrap_or_else(|| {
                "peer: pgqueuer 1.6.0 drain, 5 consumers x batches of 100".into()
            }),
        });
        // The same backlog through the store's claim and completion
        // statements alone, 100 jobs a transaction like pgqueuer's: what no
        // worker over this store can exceed.
        let ceiling = rows
            .iter()
            .find(|r| r.backend == "postgres" && r.mode == "raw drain" && r.shape != "1x1");
        if let Some(ceiling) = ceiling {
            out.push(Compare {
                figure: "drain ceiling: store statements, no worker",
                ours: Some(ceiling.rate()),
                peer: drain.as_ref().ok().copied(),
                unit: "/s",
                note: format!(
                    "{} tasks x 100 jobs per claim and per completion; same peer figure",
                    ceiling.shape.split('x').next().unwrap_or("?")
                ),
            });
        }
        let secs = if quick { "5" } else { "15" };
        let steady = match &peers {
            Ok(p) => {
                let url = support::pg::shared().create_database().await;
                tokio::task::block_in_place(|| p.pgqueuer(&url, &["-t", secs]))
            }
            Err(e) => Err(e.clone()),
        };
        out.push(Compare {
            figure: "steady state, saturated (PostgreSQL)",
            ours: pg_rate("steady (saturated)"),
            peer: steady.as_ref().ok().copied(),
            unit: "/s",
            note: steady.err().unwrap_or_else(|| {
                "peer: pgqueuer 1.6.0 defaults (5x10 consumers, 1x10 producer)".into()
            }),
        });
        if let Some(paced) = rows
            .iter()
            .find(|r| r.backend == "postgres" && r.mode == "steady (paced)")
        {
            out.push(Compare {
                figure: "p99 enqueue->start at half rate (PostgreSQL)",
                ours: paced.p99_ms.map(|v| v as f64),
                peer: None,
                unit: "ms",
                note: format!("goal < 50 ms; p50 {} ms", paced.p50_ms.unwrap_or(-1)),
            });
        }
    }
    let pg_url = if has_pg {
        Some(support::pg::shared().create_database().await)
    } else {
        None
    };
    if selected("http") {
        out.extend(tokio::task::block_in_place(|| {
            http_side_by_side(quick, pg_url)
        }));
    }
    if has_pg && selected("slow") {
        let (runs, concurrency) = if quick {
            (2_000, 2_000)
        } else {
            (10_000, 2_500)
        };
        match slow_steps(runs, 5_000, concurrency).await {
            Ok((secs, ideal, rss)) => {
                out.push(Compare {
                    figure: "slow steps (5 s delay), one worker",
                    ours: Some(secs),
                    peer: Some(ideal),
                    unit: "s",
                    note: format!(
                        "{runs} steps, --concurrency {concurrency}; peer column = ideal time; worker peak RSS {rss:.1} MB"
                    ),
                });
            }
            Err(e) => out.push(Compare {
                figure: "slow steps (5 s delay), one worker",
                ours: None,
                peer: None,
                unit: "s",
                note: e,
            }),
        }
    }
    out
}

async fn bench(quick: bool, backends: Vec<Backend>) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "vm-webapp queue benchmark{}: no-op template steps, {cpus} CPUs",
        if quick { " (quick)" } else { "" }
    );
    if backends.contains(&Backend::Postgres) {
        println!(
            "PostgreSQL from the test support, on loopback: {}",
            postgres_settings().await
        );
    }
    println!("SQLite: WAL, synchronous=NORMAL, in a temporary directory");
    println!("load average before: {}", load_average());
    println!();
    Row::print_header();
    let total = Instant::now();
    let mut rows = Vec::new();
    let has_pg = backends.contains(&Backend::Postgres);
    for backend in backends {
        bench_backend(backend, quick, &mut rows).await;
    }
    println!();
    println!(
        "summary ({:.0} s in all; load average after: {}):",
        total.elapsed().as_secs_f64(),
        load_average()
    );
    Row::print_header();
    for row in &rows {
        row.print();
    }
    let compared = side_by_side(quick, has_pg, &rows).await;
    println!();
    println!(
        "side by side, same machine and PostgreSQL server (load average after: {}):",
        load_average()
    );
    Compare::print_header();
    for row in &compared {
        row.print();
    }
    let failed = rows.iter().any(|r| r.note.contains("CHECK"))
        || compared.iter().any(|r| r.note.contains("CHECK"));
    if failed {
        eprintln!("a run did not succeed (CHECK above)");
        std::process::exit(1);
    }
}

fn main() {
    let quick = std::env::var("VM_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let backends = match std::env::var("VM_BENCH_BACKENDS")
        .unwrap_or_default()
        .as_str()
    {
        "sqlite" => vec![Backend::Sqlite],
        "postgres" => vec![Backend::Postgres],
        _ => vec![Backend::Sqlite, Backend::Postgres],
    };
    vm_webapp::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench(quick, backends));
}
