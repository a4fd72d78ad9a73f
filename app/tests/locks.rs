//! A PostgreSQL table lock held past the request timeout (a migration's
//! `ALTER TABLE` from a newer version during a rolling upgrade, a `VACUUM
//! FULL`): the request is answered 503 `dependency_unavailable`, and what it
//! asked for is not done once the lock is released, so that a client's
//! retry does not create a second run.

mod support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use sqlx::Connection;
use support::{Backend, TestEnv, create, send};
use vm_webapp::model::RunStatus;

const RUN: &str = r#"{"steps":[{"kind":"template","template":"hi"}]}"#;

/// The request timeout of these tests (ms): long enough for the store to
/// answer 503 before the 408 on a loaded test machine.
const TIMEOUT_MS: &str = "1500";

/// A connection of the test's own, outside the app's pool, that holds
/// `lock` (`LOCK TABLE …`) in an open transaction.
async fn hold(env: &TestEnv, lock: &str) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(env.settings.database.url.expose())
        .await
        .expect("connect");
    sqlx::raw_sql(&format!("BEGIN; {lock}"))
        .execute(&mut conn)
        .await
        .expect("take the lock");
    conn
}

async fn count(env: &TestEnv, sql: &str) -> i64 {
    let pool = env.raw_pool().await;
    let n: i64 = sqlx::query_scalar(sql)
        .fetch_one(&pool)
        .await
        .expect("count");
    pool.close().await;
    n
}

/// The answer to a request made while a lock is held: 503
/// `dependency_unavailable`, about when the request timeout ends (not
/// after it: the 408 would have come first).
fn assert_unavailable(reply: &support::Reply, waited: Duration) {
    assert_eq!(
        (reply.status, reply.body["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("dependency_unavailable")
        ),
        "{}",
        reply.body
    );
    assert!(
        waited > Duration::from_millis(1_000) && waited < Duration::from_millis(3_000),
        "answered after {waited:?}"
    );
}

/// Creation while `LOCK TABLE runs IN SHARE MODE` is held past the request
/// timeout, with and without an idempotency key, in parallel: each request is
/// answered 503 and no run is created once the lock is released. Before,
/// the creation statement waited for the lock and committed when it was
/// released, after the client had been answered 408.
async fn creation_under_a_held_lock_creates_nothing(vars: &[(&str, &str)]) {
    let mut all = vec![("VM_REQUEST_TIMEOUT_MS", TIMEOUT_MS)];
    all.extend_from_slice(vars);
    let env = TestEnv::new(Backend::Postgres, &all).await;
    let app = env.router();
    let holder = hold(&env, "LOCK TABLE runs IN SHARE MODE").await;
    let started = Instant::now();
    let replies = futures::future::join_all((0..4).map(|i| {
        let app = app.clone();
        async move {
            let key = format!("k{i}");
            let headers: Vec<(&str, &str)> = if i % 2 == 0 {
                vec![("idempotency-key", key.as_str())]
            } else {
                Vec::new()
            };
            send(&app, "POST", "/api/v2/runs", Some(RUN), &headers).await
        }
    }))
    .await;
    let waited = started.elapsed();
    for reply in &replies {
        assert_unavailable(reply, waited);
    }
    // Held a while longer, then released: a statement still waiting for it
    // would commit now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.close().await.expect("release the lock");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for table in ["runs", "jobs", "run_events", "usage_ledger"] {
        assert_eq!(
            count(&env, &format!("SELECT COUNT(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }
    let audited = count(
        &env,
        "SELECT COUNT(*) FROM audit_log WHERE action = 'run.created'",
    )
    .await;
    assert_eq!(audited, 0);
    // The lock gone, creation works again (the store is not left broken).
    let id = create(&app, RUN).await;
    assert!(env.store.run_exists(id).await.expect("read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_under_a_held_table_lock_answers_503_and_creates_nothing() {
    creation_under_a_held_lock_creates_nothing(&[]).await;
}

/// The general creation path (a plans file loaded: admission reads and
/// locks usage counters in a transaction of several statements) too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_with_plans_under_a_held_table_lock_answers_503_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plans.yaml");
    std::fs::write(
        &file,
        "default_plan: capped\nplans:\n  capped:\n    meters:\n      runs: {allowance: 100, overage: block, unit_price: 0}\n",
    )
    .expect("write plans");
    let file = file.display().to_string();
    creation_under_a_held_lock_creates_nothing(&[("VM_PLANS_FILE", &file)]).await;
}

/// A cancellation while `LOCK TABLE jobs IN SHARE MODE` is held past the
/// request timeout: answered 503, and the run is still queued once the
/// lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_under_a_held_table_lock_answers_503_and_cancels_nothing() {
    let env = TestEnv::new(Backend::Postgres, &[("VM_REQUEST_TIMEOUT_MS", TIMEOUT_MS)]).await;
    let app = env.router();
    let id = create(&app, RUN).await;
    let holder = hold(&env, "LOCK TABLE jobs IN SHARE MODE").await;
    let started = Instant::now();
    let reply = send(
        &app,
        "POST",
        &format!("/api/v2/runs/{id}/cancel"),
        None,
        &[],
    )
    .await;
    assert_unavailable(&reply, started.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.close().await.expect("release the lock");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let detail = env.store.get_run(id).await.expect("read").expect("run");
    assert_eq!(detail.run.status, RunStatus::Queued);
    let cancelled = count(
        &env,
        &format!(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'run.cancelled' AND target = '{id}'"
        ),
    )
    .await;
    assert_eq!(cancelled, 0);
    let again = send(
        &app,
        "POST",
        &format!("/api/v2/runs/{id}/cancel"),
        None,
        &[],
    )
    .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
}

/// A lock released before the request's time is up is waited for: the
/// bound on the creation is the request timeout, not a shorter one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_released_in_time_is_waited_for_and_the_run_created() {
    let env = TestEnv::new(Backend::Postgres, &[("VM_REQUEST_TIMEOUT_MS", TIMEOUT_MS)]).await;
    let app = env.router();
    // A first creation, so that the writer's connection has its bound set.
    create(&app, RUN).await;
    let holder = hold(&env, "LOCK TABLE runs IN SHARE MODE").await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        holder.close().await.expect("release the lock");
    });
    let started = Instant::now();
    let reply = send(&app, "POST", "/api/v2/runs", Some(RUN), &[]).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert!(started.elapsed() >= Duration::from_millis(500));
    release.await.expect("released");
    assert_eq!(count(&env, "SELECT COUNT(*) FROM runs").await, 2);
}

/// The bound on creation statements is the writer's own: a migration run
/// by the app (local mode, on the store's pool) after creations still waits
/// for its locks past the request timeout, as `vm-webapp migrate` does.
/// Migration 12 drops an index concurrently, which waits for every open
/// transaction that read `runs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_still_waits_for_its_locks_past_the_request_timeout() {
    let env = TestEnv::new(Backend::Postgres, &[("VM_REQUEST_TIMEOUT_MS", "300")]).await;
    let app = env.router();
    for _ in 0..3 {
        create(&app, RUN).await;
    }
    let db = env.raw_pool().await;
    // The schema as version 11 left it.
    for sql in [
        "CREATE INDEX runs_status_id ON runs (status, id)",
        "DELETE FROM _sqlx_migrations WHERE version = 12",
    ] {
        sqlx::query(sql).execute(&db).await.expect(sql);
    }
    let mut reader = db.begin().await.expect("begin");
    sqlx::query("SELECT COUNT(*) FROM runs")
        .fetch_one(&mut *reader)
        .await
        .expect("read runs");
    let store = env.store.clone();
    let migrating = tokio::spawn(async move { store.migrate().await });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        !migrating.is_finished(),
        "the migration waits for the reader"
    );
    reader.commit().await.expect("end the reader");
    let applied = tokio::time::timeout(Duration::from_secs(30), migrating)
        .await
        .expect("migration finished")
        .expect("task")
        .expect("migrate");
    assert_eq!(applied, vec![12]);
    db.close().await;
}
