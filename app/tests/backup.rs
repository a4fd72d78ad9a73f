//! Backup and restore, for real: a restore drill on PostgreSQL (10,000 runs
//! with their events and audit rows, backed up while the app serves writes,
//! restored into a fresh database, served again and compared), round trips
//! SQLite → PostgreSQL → SQLite, the refusal of a non-empty target, and the
//! `backup` / `restore` commands as an operator runs them.
//!
//! The drill prints its backup and restore times; run with `--nocapture` to
//! see them (docs/operations.md quotes them as the measured RTO).

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use sqlx::{AnyPool, Row};
use support::{Backend, TestEnv, create, send};
use vm_webapp::model::RunStatus;
use vm_webapp::steps::llm::LlmBackend;
use vm_webapp::store::Store;
use vm_webapp::store::backup::{BackupError, RestoreOptions};

const HELLO: &str = r#"{"input":{"name":"Ada"},"steps":[{"kind":"template","template":"Hello, {{input.name}}!"},{"kind":"transform","op":"uppercase"}]}"#;
const DOOMED: &str = r#"{"input":{},"steps":[{"kind":"template","template":"plain"},{"kind":"template","template":"{{prev.missing}}"}]}"#;
const SLOW: &str = r#"{"input":{},"steps":[{"kind":"delay","ms":60000}]}"#;
const LONG: Duration = Duration::from_secs(30);

/// Backs `store` up into memory.
async fn backup(store: &Store) -> Vec<u8> {
    let mut out = Vec::new();
    store.backup_to(&mut out).await.expect("backup");
    out
}

/// The data lines of a backup: everything but the header and the trailer
/// (which carry the source, the time and the checksum).
fn data_lines(file: &[u8]) -> Vec<String> {
    let text = String::from_utf8(file.to_vec()).expect("utf-8");
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert!(lines.len() >= 2, "a backup has a header and a trailer");
    lines[1..lines.len() - 1].to_vec()
}

async fn count(pool: &AnyPool, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get::<i64, _>(0)
}

/// A handful of runs of every kind through the API and a worker: succeeded,
/// failed (dead-lettered), cancelled, and one still leased when the worker
/// stops; plus webhook rows. Returns the ids.
async fn varied_content(env: &TestEnv) -> Vec<String> {
    let app = env.router();
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(create(&app, HELLO).await);
    }
    let doomed = create(&app, DOOMED).await;
    ids.push(doomed);
    let (worker, stop) = env.spawn_worker(4, LlmBackend::Offline);
    for id in &ids[..8] {
        env.wait_for(*id, RunStatus::Succeeded, LONG).await;
    }
    env.wait_for(doomed, RunStatus::Failed, LONG).await;
    stop.cancel();
    worker.await.expect("worker");
    let cancelled = create(&app, SLOW).await;
    let reply = send(
        &app,
        "POST",
        &format!("/api/v2/runs/{cancelled}/cancel"),
        None,
        &[],
    )
    .await;
    assert!(reply.status.is_success(), "{}", reply.body);
    ids.push(cancelled);
    ids.push(create(&app, SLOW).await); // left queued
    let db = env.raw_pool().await;
    sqlx::query(
        "INSERT INTO webhook_deliveries (source, nonce, received_at, body_sha256, run_id) VALUES ('github', 'n-1', 1700000000000, 'ab', NULL)",
    )
    .execute(&db)
    .await
    .expect("delivery");
    sqlx::query("INSERT INTO webhook_nonces (source, nonce, expires_at) VALUES ('github', 'n-1', 4102444800000)")
        .execute(&db)
        .await
        .expect("nonce");
    db.close().await;
    ids.into_iter().map(|id| id.to_string()).collect()
}

/// The API's view of a run and its events, for comparisons across databases.
async fn api_view(app: &axum::Router, id: &str) -> (serde_json::Value, serde_json::Value) {
    let run = send(app, "GET", &format!("/api/v2/runs/{id}"), None, &[]).await;
    assert_eq!(run.status, StatusCode::OK, "{id}: {}", run.body);
    let events = send(
        app,
        "GET",
        &format!("/api/v2/runs/{id}/events?limit=1000"),
        None,
        &[],
    )
    .await;
    assert_eq!(events.status, StatusCode::OK);
    (run.body, events.body)
}

/// New work on a restored database: the id sequences must have moved past
/// the restored ids, or the first insert collides with a restored row.
async fn serves_new_runs(env: &TestEnv) {
    let app = env.router();
    let id = create(&app, HELLO).await;
    let doomed = create(&app, DOOMED).await;
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    env.wait_for(id, RunStatus::Succeeded, LONG).await;
    env.wait_for(doomed, RunStatus::Failed, LONG).await;
    stop.cancel();
    worker.await.expect("worker");
}

async fn round_trip(from: Backend, to: Backend) {
    let a = TestEnv::new(from, &[]).await;
    let ids = varied_content(&a).await;
    let first = backup(&a.store).await;

    let b = TestEnv::new(to, &[]).await;
    let summary = b
        .store
        .restore_from(&first[..], RestoreOptions::default())
        .await
        .expect("restore");
    assert!(summary.total_rows() > 50, "{summary:?}");
    let second = backup(&b.store).await;
    assert_eq!(
        data_lines(&first),
        data_lines(&second),
        "what was restored is what was backed up"
    );
    let (app_a, app_b) = (a.router(), b.router());
    for id in &ids {
        assert_eq!(
            api_view(&app_a, id).await,
            api_view(&app_b, id).await,
            "{id}"
        );
    }
    serves_new_runs(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_postgres_round_trip_keeps_every_row_and_serves_new_runs() {
    round_trip(Backend::Sqlite, Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_sqlite_round_trip_keeps_every_row_and_serves_new_runs() {
    round_trip(Backend::Postgres, Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_empty_database_is_refused_unless_forced() {
    let a = TestEnv::new(Backend::Sqlite, &[]).await;
    varied_content(&a).await;
    let file = backup(&a.store).await;
    let err = a
        .store
        .restore_from(&file[..], RestoreOptions::default())
        .await
        .expect_err("refused");
    assert!(
        matches!(err, BackupError::NotEmpty { table: "runs" }),
        "{err}"
    );
    assert!(err.to_string().contains("--force"), "{err}");
    // Forced: replaced by the same content, in one transaction.
    a.store
        .restore_from(
            &file[..],
            RestoreOptions {
                replace_existing: true,
            },
        )
        .await
        .expect("forced restore");
    assert_eq!(data_lines(&file), data_lines(&backup(&a.store).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_fails_cleanly_on_an_unmigrated_target() {
    let a = TestEnv::new(Backend::Sqlite, &[]).await;
    let file = backup(&a.store).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let blank = TestEnv::at_unmigrated(
        format!("sqlite://{}/blank.db?mode=rwc", dir.path().display()),
        &[],
    )
    .await;
    let err = blank
        .store
        .restore_from(&file[..], RestoreOptions::default())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("vm-webapp migrate"), "{err}");
}

/// Clones the rows of a template run under `ids` (JSON array of new run ids),
/// in plain SQL, so 10,000 realistic runs cost a second, not minutes of API.
async fn clone_runs(backend: Backend, db: &AnyPool, template: &str, ids: &[String], offset: i64) {
    let ids = serde_json::to_string(ids).expect("ids");
    let with = match backend {
        Backend::Postgres => {
            "WITH n AS (SELECT value AS id, ord FROM jsonb_array_elements_text($1::jsonb) WITH ORDINALITY AS t(value, ord))"
        }
        Backend::Sqlite => "WITH n AS (SELECT value AS id, key + 1 AS ord FROM json_each($1))",
    };
    let statements = [
        "INSERT INTO runs (id, status, input, steps, step_count, idempotency_key, request_hash, correlation_id, output, error, created_at, updated_at, started_at, finished_at) \
         SELECT n.id, r.status, r.input, r.steps, r.step_count, NULL, r.request_hash, 'corr-' || n.ord, r.output, r.error, r.created_at + n.ord, r.updated_at + n.ord, r.started_at + n.ord, r.finished_at + n.ord FROM n, runs r WHERE r.id = $2",
        "INSERT INTO step_results (run_id, step_index, output, attempt, job_id, finished_at) \
         SELECT n.id, s.step_index, s.output, s.attempt, $3 + n.ord * 10 + s.step_index, s.finished_at + n.ord FROM n, step_results s WHERE s.run_id = $2",
        "INSERT INTO dead_jobs (id, run_id, step_index, payload, attempts, last_error, created_at, failed_at) \
         SELECT $3 + n.ord * 10 + d.step_index, n.id, d.step_index, d.payload, d.attempts, d.last_error, d.created_at + n.ord, d.failed_at + n.ord FROM n, dead_jobs d WHERE d.run_id = $2",
        "INSERT INTO run_events (run_id, event_type, step_index, attempt, message, data, created_at) \
         SELECT n.id, e.event_type, e.step_index, e.attempt, e.message, e.data, e.created_at + n.ord FROM n, run_events e WHERE e.run_id = $2 ORDER BY n.ord, e.id",
        "INSERT INTO audit_log (at, actor, action, target, outcome, request_id, detail) \
         SELECT a.at + n.ord, a.actor, a.action, n.id, a.outcome, 'req-' || n.ord, a.detail FROM n, audit_log a WHERE a.target = $2 ORDER BY n.ord, a.id",
    ];
    for sql in statements {
        sqlx::query(&format!("{with} {sql}"))
            .bind(&ids)
            .bind(template)
            .bind(offset)
            .execute(db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// The drill the go-live plan asks for. Without one snapshot transaction,
/// audit rows and events of runs created during the backup would be in the
/// file without their runs (or runs without their first event); without the
/// sequence fix the restored database would refuse its first new job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_drill_10k_runs_backed_up_while_serving_writes_restores_and_serves() {
    drill(Backend::Postgres, 10_000).await;
}

/// The same on the embedded SQLite (one read transaction is its snapshot),
/// smaller, restored into PostgreSQL: the move off SQLite under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_drill_backed_up_while_serving_writes_restores_into_postgres() {
    drill(Backend::Sqlite, 1_000).await;
}

async fn drill(backend: Backend, runs: usize) {
    let a = TestEnv::new(backend, &[]).await;
    let app = a.router();
    // Templates: a succeeded and a dead-lettered run, made by the real worker.
    let ok = create(&app, HELLO).await;
    let doomed = create(&app, DOOMED).await;
    let (worker, stop) = a.spawn_worker(2, LlmBackend::Offline);
    a.wait_for(ok, RunStatus::Succeeded, LONG).await;
    a.wait_for(doomed, RunStatus::Failed, LONG).await;
    let db = a.raw_pool().await;
    let started = Instant::now();
    let mut ids: Vec<String> = (0..runs)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    ids.sort();
    // One run in ten is a dead-lettered failure.
    let failed: Vec<String> = ids.iter().step_by(10).cloned().collect();
    let succeeded: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 0)
        .map(|(_, id)| id.clone())
        .collect();
    clone_runs(backend, &db, &ok.to_string(), &succeeded, 10_000_000).await;
    clone_runs(backend, &db, &doomed.to_string(), &failed, 20_000_000).await;
    println!(
        "drill ({backend:?}): seeded {runs} runs in {} ms",
        started.elapsed().as_millis()
    );

    // Writers keep creating runs (the worker drains them) during the backup.
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(String, bool)>::new()));
    let backing_up = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (app, acked, backing_up, done) =
            (app.clone(), acked.clone(), backing_up.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let id = create(&app, HELLO).await;
                // Read after the acknowledgement: committed before the
                // backup's snapshot when the flag was still down.
                let before = !backing_up.load(Ordering::SeqCst);
                acked.lock().expect("lock").push((id.to_string(), before));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("drill.jsonl");
    backing_up.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let file = tokio::fs::File::create(&path).await.expect("file");
    let mut out = tokio::io::BufWriter::new(file);
    let written = a.store.backup_to(&mut out).await.expect("backup");
    let backup_ms = started.elapsed().as_millis();
    done.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer");
    }
    stop.cancel();
    worker.await.expect("worker");
    let created_meanwhile = acked
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, b)| !b)
        .count();

    let b = TestEnv::new(Backend::Postgres, &[]).await;
    let started = Instant::now();
    let input = tokio::io::BufReader::new(tokio::fs::File::open(&path).await.expect("open"));
    let restored = b
        .store
        .restore_from(input, RestoreOptions::default())
        .await
        .expect("restore");
    let restore_ms = started.elapsed().as_millis();
    let size = std::fs::metadata(&path).expect("size").len();
    println!(
        "drill ({backend:?} to PostgreSQL): backup of {} rows ({:.1} MB) in {backup_ms} ms while {created_meanwhile} runs were created; restore in {restore_ms} ms",
        written.total_rows(),
        size as f64 / 1e6,
    );
    assert_eq!(restored.rows, written.rows);

    // Nothing acknowledged before the backup began is missing.
    let restored_db = b.raw_pool().await;
    let in_b: BTreeSet<String> = sqlx::query("SELECT id FROM runs")
        .fetch_all(&restored_db)
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
    assert!(in_b.len() > runs, "{}", in_b.len());
    for (id, before) in acked.lock().expect("lock").iter() {
        assert!(
            !before || in_b.contains(id),
            "run {id} acknowledged before the backup is missing"
        );
    }
    assert!(ids.iter().all(|id| in_b.contains(id)));
    // One instant: no audit row or event without its run, no succeeded run
    // without all its results.
    for (what, sql) in [
        (
            "audit rows without their run",
            "SELECT COUNT(*) FROM audit_log a WHERE a.action = 'run.created' AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = a.target)",
        ),
        (
            "runs without their run.created audit row",
            "SELECT COUNT(*) FROM runs r WHERE NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.target = r.id AND a.action = 'run.created')",
        ),
        (
            "runs without their run.queued event",
            "SELECT COUNT(*) FROM runs r WHERE NOT EXISTS (SELECT 1 FROM run_events e WHERE e.run_id = r.id AND e.event_type = 'run.queued')",
        ),
        (
            "succeeded runs missing step results",
            "SELECT COUNT(*) FROM runs r WHERE r.status = 'succeeded' AND (SELECT COUNT(*) FROM step_results s WHERE s.run_id = r.id) <> r.step_count",
        ),
    ] {
        assert_eq!(count(&restored_db, sql).await, 0, "{what}");
    }
    assert_eq!(
        count(&restored_db, "SELECT COUNT(*) FROM run_events").await as u64,
        written
            .rows
            .iter()
            .find(|(t, _)| t == "run_events")
            .expect("events")
            .1
    );

    // Byte for byte what was backed up, and the same answers from the API.
    let again = backup(&b.store).await;
    let original = tokio::fs::read(&path).await.expect("read");
    assert_eq!(data_lines(&original), data_lines(&again));
    let app_b = b.router();
    for id in ids
        .iter()
        .step_by(499)
        .chain([ok.to_string(), doomed.to_string()].iter())
    {
        assert_eq!(api_view(&app, id).await, api_view(&app_b, id).await, "{id}");
    }
    let listed = send(&app_b, "GET", "/api/v2/runs?limit=5", None, &[]).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);

    // New work gets ids past every restored one, dead letters included.
    let fresh = create(&app_b, HELLO).await;
    let min_new_job = count(
        &restored_db,
        &format!("SELECT MIN(id) FROM jobs WHERE run_id = '{fresh}'"),
    )
    .await;
    let max_dead = count(&restored_db, "SELECT MAX(id) FROM dead_jobs").await;
    assert!(
        max_dead > 20_000_000,
        "the cloned dead letters are there: {max_dead}"
    );
    assert!(
        min_new_job > max_dead,
        "new job {min_new_job} vs dead letter {max_dead}"
    );
    serves_new_runs(&b).await;
    db.close().await;
    restored_db.close().await;
}

// ---------------------------------------------------------------------------
// The commands
// ---------------------------------------------------------------------------

fn vm(args: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm-webapp"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOG_LEVEL", "warn");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("run vm-webapp")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_back_up_to_a_directory_prune_and_restore_into_a_fresh_file() {
    let a = TestEnv::new(Backend::Sqlite, &[]).await;
    varied_content(&a).await;
    let url_a = a.settings.database.url.expose().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("backups");
    let dir_arg = out_dir.display().to_string();
    for _ in 0..3 {
        let out = vm(
            &["backup", "--output-dir", &dir_arg, "--keep", "2"],
            &[("VM_DB_URL", &url_a)],
        );
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("backup written to"), "{}", text(&out));
    }
    let mut files: Vec<_> = std::fs::read_dir(&out_dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "pruned to --keep: {files:?}");
    let newest = files[1].display().to_string();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files[1])
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "a backup is readable by its owner only: {mode:o}"
        );
    }

    let url_b = format!("sqlite://{}/b.db?mode=rwc", dir.path().display());
    let env_b = [("VM_DB_URL", url_b.as_str()), ("APP_ENV", "local")];
    let out = vm(&["migrate"], &env_b);
    assert!(out.status.success(), "{}", text(&out));
    let out = vm(&["restore", "--input", &newest], &env_b);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("from a sqlite snapshot"),
        "{}",
        text(&out)
    );
    // Twice: refused, the content is there now.
    let out = vm(&["restore", "--input", &newest], &env_b);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not empty"), "{}", text(&out));
    let out = vm(&["restore", "--input", &newest, "--force"], &env_b);
    assert!(out.status.success(), "{}", text(&out));

    let garbage = dir.path().join("garbage.jsonl");
    std::fs::write(&garbage, b"\x00\x01 not a backup").expect("write");
    let out = vm(
        &["restore", "--input", &garbage.display().to_string()],
        &env_b,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not valid at line 1"), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
}

#[test]
fn a_database_url_never_appears_in_backup_or_restore_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = "postgres://backup:SuperSecretPw@127.0.0.1:1/vm";
    let file = dir.path().join("x.jsonl").display().to_string();
    std::fs::write(&file, b"{}\n").expect("write");
    for args in [
        vec!["backup", "--output", file.as_str()],
        vec!["restore", "--input", file.as_str()],
    ] {
        let out = vm(&args, &[("VM_DB_URL", url), ("VM_MIGRATION_DB_URL", url)]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(!text(&out).contains("SuperSecretPw"), "{}", text(&out));
        assert!(text(&out).contains("unreachable"), "{}", text(&out));
    }
    let out = vm(&["backup"], &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap usage error: {}",
        text(&out)
    );
}

#[test]
fn backup_help_names_both_forms() {
    let out = vm(&["backup", "--help"], &[]);
    let help = text(&out);
    assert!(
        help.contains("--output <FILE>") && help.contains("--output-dir <DIR>"),
        "{help}"
    );
}

/// Whatever damage a file suffers (cut anywhere, any byte changed, a line
/// lost), the restore refuses it with an error, never a panic, and commits
/// nothing: the target stays empty.
#[test]
fn damaged_backups_are_refused_whole_and_never_panic() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (file, _source, target, db) = rt.block_on(async {
        let source = TestEnv::new(Backend::Sqlite, &[]).await;
        let app = source.router();
        for _ in 0..3 {
            create(&app, HELLO).await;
        }
        let file = backup(&source.store).await;
        let target = TestEnv::new(Backend::Sqlite, &[]).await;
        let db = target.raw_pool().await;
        (file, source, target, db)
    });
    let lines = file.iter().filter(|b| **b == b'\n').count();
    let mut runner = TestRunner::new(Config {
        cases: 96,
        ..Config::default()
    });
    let damage = (0..file.len(), 1u8..=255, 0u8..3);
    runner
        .run(&damage, |(at, flip, kind)| {
            let damaged: Vec<u8> = match kind {
                0 => file[..at].to_vec(),
                1 => {
                    let mut d = file.clone();
                    d[at] ^= flip;
                    d
                }
                _ => {
                    let drop = at % lines;
                    String::from_utf8_lossy(&file)
                        .lines()
                        .enumerate()
                        .filter(|(i, _)| *i != drop)
                        .map(|(_, l)| format!("{l}\n"))
                        .collect::<String>()
                        .into_bytes()
                }
            };
            let result = rt.block_on(
                target
                    .store
                    .restore_from(&damaged[..], RestoreOptions::default()),
            );
            prop_assert!(result.is_err(), "damage {kind} at {at} was accepted");
            let left = rt.block_on(async {
                count(&db, "SELECT COUNT(*) FROM runs").await
                    + count(&db, "SELECT COUNT(*) FROM audit_log").await
                    + count(&db, "SELECT COUNT(*) FROM run_events").await
            });
            prop_assert_eq!(left, 0, "a refused restore committed rows");
            Ok(())
        })
        .expect("every damaged file is refused");
}

/// Run with the runtime's role (no DELETE on the append-only audit trail),
/// `restore --force` fails naming what it was doing and the database's
/// reason; before, the operator read only "database error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_restore_without_the_owners_rights_says_which_table_and_why() {
    let owner = TestEnv::new(Backend::Postgres, &[]).await;
    create(&owner.router(), HELLO).await;
    let file = backup(&owner.store).await;
    let role = format!("rt_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let db = owner.raw_pool().await;
    sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
        .execute(&db)
        .await
        .expect("role");
    owner.store.grant_runtime_role(&role).await.expect("grants");
    let url = owner
        .settings
        .database
        .url
        .expose()
        .replacen("postgres@", &format!("{role}@"), 1);
    let runtime = TestEnv::at_unmigrated(url, &[]).await;
    let err = runtime
        .store
        .restore_from(
            &file[..],
            RestoreOptions {
                replace_existing: true,
            },
        )
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("empty table audit_log") && text.contains("permission denied"),
        "{text}"
    );
    // Nothing changed: the owner still sees its run.
    assert_eq!(count(&db, "SELECT COUNT(*) FROM runs").await, 1);
}

/// A PostgreSQL server that answers but has no database of the URL's name
/// (a typo, or one never created) is named as such by every command that
/// opens it, instead of a bare "database error" that said nothing, and
/// still without the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_missing_on_the_server_is_named_by_every_command_not_a_bare_database_error() {
    let env = TestEnv::new(Backend::Postgres, &[]).await;
    let url = env.settings.database.url.expose().to_string();
    let (server, _) = url.rsplit_once('/').expect("a database name in the URL");
    let missing = format!("{server}/vm_no_such_database");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("b.jsonl").display().to_string();
    for args in [
        &["migrate"][..],
        &["backup", "--output", &file],
        &["usage", "verify", "--period", "2026-11"],
    ] {
        let out = vm(args, &[("VM_DB_URL", missing.as_str())]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {said}");
        assert!(
            said.contains("does not exist on the server"),
            "{args:?}: {said}"
        );
        assert!(!said.contains("vm_no_such_database"), "{args:?}: {said}");
    }
}

/// Pointed at a file that is not an SQLite database (a wrong path to some
/// other file), the tools that only read say so and leave it alone; they
/// said "database unreachable (check VM_DB_URL, network and credentials)"
/// after the pool's five-second timeout.
#[test]
fn a_file_that_is_not_an_sqlite_database_is_named_as_such_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("notes.txt");
    let content = b"these are not the tables you are looking for\n".repeat(10);
    std::fs::write(&file, &content).expect("write");
    let url = format!("sqlite://{}", file.display());
    let out_file = dir.path().join("b.jsonl").display().to_string();
    for args in [
        &["backup", "--output", &out_file][..],
        &["usage", "verify", "--period", "2026-11"],
        &["migrate"],
    ] {
        let started = Instant::now();
        let out = vm(args, &[("VM_DB_URL", url.as_str())]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {said}");
        assert!(said.contains("not an SQLite database"), "{args:?}: {said}");
        assert!(started.elapsed() < Duration::from_secs(4), "{args:?}");
    }
    assert_eq!(std::fs::read(&file).expect("read"), content);
}

/// A backup only reads: pointed at an SQLite database that does not exist
/// it fails naming the path, creates no database and writes no backup file
/// (it used to create an empty database and back that up).
#[test]
fn a_backup_of_a_sqlite_database_that_does_not_exist_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("elsewhere").join("vm.db");
    let url = format!("sqlite://{}?mode=rwc", missing.display());
    let output = dir.path().join("backups");
    let out = vm(
        &["backup", "--output-dir", &output.display().to_string()],
        &[
            ("VM_DB_URL", url.as_str()),
            ("VM_WORKSPACE_ROOT", &dir.path().display().to_string()),
        ],
    );
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("does not exist"), "{said}");
    assert!(said.contains(&missing.display().to_string()), "{said}");
    assert!(!missing.exists(), "a database was created");
    // Nor the --output-dir: the database is opened before it is made.
    assert!(!output.exists(), "the backup directory was created");
}

/// A restore loads only into a migrated database, so it creates none either:
/// pointed at an SQLite file that does not exist it fails naming the path
/// and says to migrate first, instead of leaving an empty file behind and
/// then calling it unmigrated.
#[test]
fn a_restore_into_a_sqlite_database_that_does_not_exist_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = dir.path().join("snapshot.jsonl");
    std::fs::write(&snapshot, b"").expect("write");
    let missing = dir.path().join("fresh.db");
    let url = format!("sqlite://{}?mode=rwc", missing.display());
    let out = vm(
        &["restore", "--input", &snapshot.display().to_string()],
        &[("VM_DB_URL", url.as_str())],
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("does not exist"), "{said}");
    assert!(said.contains(&missing.display().to_string()), "{said}");
    assert!(said.contains("vm-webapp migrate"), "{said}");
    assert!(!missing.exists(), "a database was created");
}
