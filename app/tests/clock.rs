//! Kind: time that decides ownership comes from the database clock, never
//! from a process's. Two real `vm-webapp worker` processes share one
//! PostgreSQL; one runs with its clock skewed by libfaketime (60 s ahead, or
//! 60 s behind while it holds the job). With process clocks, the ahead worker
//! saw the healthy worker's lease as expired and took the job over at once
//! (`step.lease_expired`, attempt 2), and the behind worker stamped leases
//! that had already run out. The run must finish on its first delivery.
//!
//! Also: a run-creation batch is admitted, stamped and counted at one
//! database instant, tested with a `serve` on SQLite whose clock (SQLite's,
//! in the process) libfaketime moves a month per read.

mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Row;
use support::{Backend, TestEnv};
use vm_webapp::model::{NewRun, RunStatus};
use vm_webapp::steps::parse_steps;
use vm_webapp::store::CreateOutcome;

/// Debian's libfaketime (installed by `make deps`).
fn libfaketime() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("libfaketime is missing: apt-get install faketime (make deps installs it)")
}

/// Starts a worker on `db_url`; `skew` like `+60s` runs its clock that far off.
fn worker(db_url: &str, skew: Option<&str>, log: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm-webapp"));
    cmd.args([
        "worker",
        "--poll-interval-ms",
        "50",
        "--concurrency",
        "2",
        "--health-host",
        "127.0.0.1",
        "--health-port",
        "0",
    ])
    .env_clear()
    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
    .env("APP_ENV", "staging")
    .env("VM_DB_URL", db_url)
    .env("VM_JOB_LEASE_MS", "3000")
    .env("LOG_LEVEL", "info")
    .env("LOG_FORMAT", "json")
    .stdin(Stdio::null())
    .stdout(File::create(log).expect("log"))
    .stderr(Stdio::null());
    if let Some(skew) = skew {
        cmd.env("LD_PRELOAD", libfaketime())
            .env("FAKETIME", skew)
            // Tokio's timers keep the real monotonic clock.
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("FAKETIME_NO_CACHE", "1");
    }
    cmd.spawn().expect("start worker")
}

/// The wall-clock offset (s) the worker believed in, read from the timestamp
/// of its first JSON log line: proves the skew took effect, so the test can fail.
fn logged_offset_s(log: &Path) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json log line");
            let at = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().expect("ts"))
                .expect("rfc3339");
            return at.timestamp() - chrono::Utc::now().timestamp();
        }
        assert!(Instant::now() < deadline, "the worker logged nothing");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn a_skewed_worker_never_takes_over_a_healthy_lease(
    holder_skew: Option<&str>,
    newcomer_skew: Option<&str>,
) {
    let env = TestEnv::new(support::Backend::Postgres, &[]).await;
    let url = env.settings.database.url.expose().to_string();
    let input = json!({});
    let new = NewRun {
        steps: parse_steps(&[json!({"kind": "delay", "ms": 7000})], &input).expect("steps"),
        input,
        idempotency_key: None,
        request_hash: "clock".into(),
        correlation_id: "clock".into(),
        max_attempts: 3,
        actor: "test".into(),
        request_id: None,
        tenant: "anonymous".to_string(),
    };
    let CreateOutcome::Created(run) = env.store.create_run(&new).await.expect("create") else {
        panic!("not created")
    };
    let logs = tempfile::tempdir().expect("dir");
    let mut holder = worker(&url, holder_skew, &logs.path().join("holder"));
    // The holder claims the step before the newcomer exists.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !env
        .event_types(run.id)
        .await
        .contains(&"step.started".to_string())
    {
        assert!(Instant::now() < deadline, "the holder never claimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let newcomer_log = logs.path().join("newcomer");
    let mut newcomer = worker(&url, newcomer_skew, &newcomer_log);
    if let Some(skew) = newcomer_skew.or(holder_skew) {
        let log = if newcomer_skew.is_some() {
            newcomer_log.clone()
        } else {
            logs.path().join("holder")
        };
        let offset = logged_offset_s(&log);
        let expected: i64 = skew.trim_end_matches('s').parse().expect("skew");
        assert!(
            (offset - expected).abs() < 10,
            "the fake clock did not take: offset {offset} s, expected {expected} s"
        );
    }
    let detail = env
        .wait_for(run.id, RunStatus::Succeeded, Duration::from_secs(30))
        .await;
    let _ = holder.kill();
    let _ = newcomer.kill();
    let _ = holder.wait();
    let _ = newcomer.wait();
    let events = env.event_types(run.id).await;
    assert_eq!(
        events.iter().filter(|e| *e == "step.started").count(),
        1,
        "one delivery only: {events:?}"
    );
    assert!(
        !events.contains(&"step.lease_expired".to_string()),
        "{events:?}"
    );
    assert_eq!(detail.steps[0].attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_clock_runs_60_s_ahead_does_not_take_over_a_healthy_lease() {
    a_skewed_worker_never_takes_over_a_healthy_lease(None, Some("+60s")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_clock_runs_60_s_behind_holds_its_lease_like_any_other() {
    a_skewed_worker_never_takes_over_a_healthy_lease(Some("-60s"), None).await;
}

/// Every clock read of a faked process lands 31 days after the previous
/// one, so any two statements that read the clock fall in different months.
const A_MONTH_PER_CLOCK_READ: &str = "@2030-01-31 23:59:59 i2678400.0";

const ACME_KEY: &str = "acme-key-0123456789abcdef";

/// One `POST /api/v2/runs` on a fresh connection; the status code.
async fn post_run(port: u16) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"input": {}, "steps": [{"kind": "template", "template": "hi"}]}"#;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request = format!(
        "POST /api/v2/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Authorization: Bearer {ACME_KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"))
}

/// Kind: a run-creation batch reads the database clock once. On SQLite each
/// statement read it anew, so a batch at midnight at a month's end was
/// admitted (and its warnings checked) against the month of its first
/// statement while its runs and their usage landed in the next: a `block`
/// allowance could be overshot and the warning of the month the runs went
/// into was never recorded. A real `serve` on SQLite (the clock is SQLite's,
/// in the process) runs under libfaketime moving a month per clock read, so
/// every batch straddles a month; on PostgreSQL (`now()` is the
/// transaction's) the same invariants hold with the real clock.
async fn one_batch_is_admitted_stamped_and_counted_at_one_instant(backend: Backend) {
    let plans_dir = tempfile::tempdir().expect("dir");
    let plans = plans_dir.path().join("plans.yaml");
    std::fs::write(
        &plans,
        "default_plan: one\nplans:\n  one:\n    warn_at: [1.0]\n    meters:\n      runs: {allowance: 1, overage: block}\n",
    )
    .expect("plans");
    let plans = plans.display().to_string();
    let keys = format!("acme:{ACME_KEY}:tenant=acme");
    let vars = [
        ("VM_PLANS_FILE", plans.as_str()),
        ("VM_API_KEYS", keys.as_str()),
    ];
    let env = TestEnv::new(backend, &vars).await;
    let url = env.settings.database.url.expose().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm-webapp"));
    cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("APP_ENV", "local")
        .env("VM_WORKSPACE_ROOT", env.dir.path())
        .env("VM_DB_URL", &url)
        .env("VM_PLANS_FILE", &plans)
        .env("VM_API_KEYS", &keys)
        .env("LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if backend == Backend::Sqlite {
        cmd.env("LD_PRELOAD", libfaketime())
            .env("FAKETIME", A_MONTH_PER_CLOCK_READ)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("FAKETIME_NO_CACHE", "1");
    }
    let mut serve = cmd.spawn().expect("start serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break post_run(port).await;
        }
        assert!(
            serve.try_wait().expect("wait").is_none(),
            "serve exited before listening"
        );
        assert!(Instant::now() < deadline, "serve never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = serve.kill();
    let _ = serve.wait();
    assert_eq!(status, 202, "the run is accepted");

    sqlx::any::install_default_drivers();
    let db = sqlx::AnyPool::connect(&url).await.expect("connect");
    let one = |sql: &'static str| column::<i64>(&db, sql);
    let created = one("SELECT created_at FROM runs").await;
    assert_eq!(created.len(), 1, "one run");
    let at = created[0];
    if backend == Backend::Sqlite {
        // Proves the fake clock took, so the test can fail.
        let start = chrono::DateTime::parse_from_rfc3339("2030-01-31T23:59:59Z")
            .expect("rfc3339")
            .timestamp_millis();
        assert!(at > start, "the fake clock did not take: {at}");
    }
    let month = env.store.period_at(at).await.expect("period");
    let periods = |sql: &'static str| column::<String>(&db, sql);
    assert_eq!(
        periods("SELECT period FROM usage_counters WHERE meter = 'runs' AND shard = 0").await,
        vec![month.clone()],
        "the month admitted is the month of the run"
    );
    assert_eq!(
        periods("SELECT period FROM usage_ledger WHERE source = 'run.created'").await,
        vec![month.clone()],
        "the month counted is the month admitted"
    );
    assert_eq!(
        periods("SELECT period FROM usage_warnings WHERE meter = 'runs'").await,
        vec![month],
        "the 100 % warning is recorded in the month the run was counted in"
    );
    for (what, sql) in [
        (
            "the run.queued event",
            "SELECT created_at FROM run_events WHERE event_type = 'run.queued'",
        ),
        (
            "the run.created audit row",
            "SELECT at FROM audit_log WHERE action = 'run.created'",
        ),
        (
            "the ledger row",
            "SELECT at FROM usage_ledger WHERE source = 'run.created'",
        ),
        (
            "the admission lock",
            "SELECT updated_at FROM usage_counters WHERE meter = 'runs' AND shard = 0",
        ),
        (
            "the runs counter",
            "SELECT updated_at FROM usage_counters WHERE meter = 'runs' AND shard > 0",
        ),
        ("the warning", "SELECT crossed_at FROM usage_warnings"),
    ] {
        assert_eq!(
            one(sql).await,
            vec![at],
            "{what} carries the batch's instant"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_creation_batch_on_sqlite_reads_the_clock_once_so_the_month_admitted_is_the_month_counted()
 {
    one_batch_is_admitted_stamped_and_counted_at_one_instant(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_creation_batch_on_postgres_is_admitted_stamped_and_counted_at_one_instant() {
    one_batch_is_admitted_stamped_and_counted_at_one_instant(Backend::Postgres).await;
}

/// The first column of every row `sql` returns.
async fn column<T>(db: &sqlx::AnyPool, sql: &str) -> Vec<T>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    sqlx::query(sql)
        .fetch_all(db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| {
            r.try_get::<T, _>(0)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
        .collect()
}
