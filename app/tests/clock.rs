//! Kind: time that decides ownership comes from the database clock, never
//! from a process's. Two real `vm-webapp worker` processes share one
//! PostgreSQL; one runs with its clock skewed by libfaketime (60 s ahead, or
//! 60 s behind while it holds the job). With process clocks, the ahead worker
//! saw the healthy worker's lease as expired and took the job over at once
//! (`step.lease_expired`, attempt 2), and the behind worker stamped leases
//! that had already run out. The run must finish on its first delivery.

mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::TestEnv;
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
