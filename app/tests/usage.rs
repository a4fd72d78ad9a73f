//! Tenants, plans, quotas and usage metering, as reproducible billing cases
//! on SQLite and PostgreSQL: under, at and over an allowance (`block` and
//! `allow`), an upgrade and a downgrade mid-month, the UTC month boundary, a
//! redelivered step, 50 concurrent creates against 10 remaining (PostgreSQL
//! with two API replicas), `usage verify` catching a corrupted counter,
//! tenant isolation, warning thresholds once per period, and the plans
//! file's validation.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use serde_json::{Value, json};
use sqlx::Row;
use support::{Backend, Reply, TestEnv, send};
use uuid::Uuid;
use vm_webapp::model::RunStatus;
use vm_webapp::period::Period;
use vm_webapp::plans::Meter;
use vm_webapp::steps::llm::LlmBackend;
use vm_webapp::store::feed::{FeedFilter, Visibility};
use vm_webapp::store::{Finish, UsageRecord};

const ADMIN: &str = "admin-key-0123456789";
const ACME: &str = "acme-key-0123456789a";
const ACME2: &str = "acme-key-0123456789b";
const GLOBEX: &str = "globex-key-0123456789";
const APPROVER: &str = "acme-appr-0123456789";
const KEYS: &str = "root:admin-key-0123456789:admin,acme1:acme-key-0123456789a:tenant=acme,\
                    acme2:acme-key-0123456789b:tenant=acme,globex:globex-key-0123456789:tenant=globex,\
                    acmeappr:acme-appr-0123456789:approver:tenant=acme,\
                    globexappr:globex-appr-0123456789:approver:tenant=globex";
const GLOBEX_APPROVER: &str = "globex-appr-0123456789";

/// The plans of these cases: `free` blocks past 3 runs, `pro` bills past 5
/// runs at 0.5 each, `metered` blocks steps at 1 (to show that admitted runs
/// finish anyway). acme is on `free`, globex on `pro` by the file.
const PLANS: &str = r#"
default_plan: free
plans:
  free:
    meters:
      runs: {allowance: 3, overage: block}
      llm_tokens: {allowance: 1000, overage: block}
  pro:
    warn_at: [0.4, 1.0]
    meters:
      runs: {allowance: 5, overage: allow, unit_price: 0.5}
      llm_tokens: {allowance: 100000, overage: allow, unit_price: 0.001}
  metered:
    meters:
      steps: {allowance: 1, overage: block}
      llm_tokens: {allowance: 4, overage: block}
  ten:
    meters:
      runs: {allowance: 12, overage: block}
tenants:
  globex: pro
"#;

const HELLO: &str =
    r#"{"input": {"name": "x"}, "steps": [{"kind": "template", "template": "hi"}]}"#;

/// A test environment with the plans and keys above (the plans file lives in
/// the returned directory, which must outlive the environment's settings).
async fn env_with(
    backend: Backend,
    plans: &str,
    extra: &[(&str, &str)],
) -> (TestEnv, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file: PathBuf = dir.path().join("plans.yaml");
    std::fs::write(&file, plans).expect("write plans");
    let file = file.display().to_string();
    let mut vars = vec![
        ("VM_PLANS_FILE", file.as_str()),
        ("VM_API_KEYS", KEYS),
        ("VM_RATE_LIMIT_KEY_RPS", "0"),
        ("VM_RATE_LIMIT_IP_RPS", "0"),
    ];
    vars.extend_from_slice(extra);
    (TestEnv::new(backend, &vars).await, dir)
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn call(app: &Router, method: &str, uri: &str, body: Option<&str>, key: &str) -> Reply {
    send(app, method, uri, body, &[("authorization", &bearer(key))]).await
}

async fn create_as(app: &Router, key: &str) -> Reply {
    call(app, "POST", "/api/v2/runs", Some(HELLO), key).await
}

fn run_id(reply: &Reply) -> Uuid {
    reply.body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("run id")
}

async fn usage_of(app: &Router, tenant: &str, key: &str) -> Value {
    let reply = call(
        app,
        "GET",
        &format!("/api/v2/tenants/{tenant}/usage"),
        None,
        key,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body
}

fn meter<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["meters"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["meter"] == name))
        .expect("meter in report")
}

async fn count(pool: &sqlx::AnyPool, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(pool)
        .await
        .expect("count")
        .try_get::<i64, _>(0)
        .expect("a number")
}

async fn runs_of(env: &TestEnv, tenant: &str) -> i64 {
    count(
        &env.raw_pool().await,
        &format!("SELECT COUNT(*) FROM runs WHERE tenant = '{tenant}'"),
    )
    .await
}

async fn under_the_allowance_runs_are_admitted_counted_and_remaining_shrinks(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    for _ in 0..2 {
        assert_eq!(create_as(&app, ACME).await.status, StatusCode::ACCEPTED);
    }
    let report = usage_of(&app, "acme", ACME).await;
    assert_eq!(report["plan"], "free");
    let runs = meter(&report, "runs");
    assert_eq!(
        (
            runs["used"].as_i64(),
            runs["allowance"].as_i64(),
            runs["remaining"].as_i64()
        ),
        (Some(2), Some(3), Some(1))
    );
    assert_eq!(runs["overage"], 0);
    assert_eq!(report["preview_total"], 0.0);
}

async fn at_the_allowance_the_last_run_is_admitted_and_the_next_is_refused_with_402(
    backend: Backend,
) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    let keyed = |key: &'static str| {
        let app = app.clone();
        async move {
            send(
                &app,
                "POST",
                "/api/v2/runs",
                Some(HELLO),
                &[("authorization", &bearer(ACME)), ("idempotency-key", key)],
            )
            .await
        }
    };
    assert_eq!(keyed("first").await.status, StatusCode::ACCEPTED);
    for _ in 0..2 {
        assert_eq!(create_as(&app, ACME).await.status, StatusCode::ACCEPTED);
    }
    let period = env.store.current_period().await.expect("period");
    // A replay of an admitted run is not a new run: answered, not refused.
    assert_eq!(keyed("first").await.status, StatusCode::OK);
    let refused = create_as(&app, ACME).await;
    assert_eq!(
        refused.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        refused.body
    );
    assert_eq!(refused.body["code"], "quota_exceeded");
    assert_eq!(refused.body["meter"], "runs");
    assert_eq!(refused.body["allowance"], 3);
    assert_eq!(refused.body["period"], period.as_str());
    let next = Period::parse(&period).expect("period").next();
    assert_eq!(
        refused.body["resets_at"],
        format!("{next}-01T00:00:00.000Z").as_str()
    );
    // Nothing created, nothing counted; the refusal is audited.
    assert_eq!(runs_of(&env, "acme").await, 3);
    let pool = env.raw_pool().await;
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM usage_ledger WHERE tenant = 'acme'"
        )
        .await,
        3
    );
    let report = usage_of(&app, "acme", ACME).await;
    assert_eq!(meter(&report, "runs")["used"], 3);
    assert_eq!(meter(&report, "runs")["remaining"], 0);
    let audit = call(
        &app,
        "GET",
        "/api/v2/audit?action=quota.blocked",
        None,
        ADMIN,
    )
    .await;
    let entries = audit.body["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{}", audit.body);
    assert_eq!(entries[0]["actor"], "acme1");
    assert_eq!(entries[0]["outcome"], "denied");
    // Another tenant is not affected by acme's allowance.
    assert_eq!(create_as(&app, GLOBEX).await.status, StatusCode::ACCEPTED);
}

async fn over_an_allow_allowance_runs_are_admitted_and_the_preview_bills_the_overage(
    backend: Backend,
) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    for _ in 0..8 {
        assert_eq!(create_as(&app, GLOBEX).await.status, StatusCode::ACCEPTED);
    }
    let report = usage_of(&app, "globex", GLOBEX).await;
    assert_eq!(report["plan"], "pro");
    let runs = meter(&report, "runs");
    assert_eq!(runs["used"], 8);
    assert_eq!(runs["overage"], 3);
    assert_eq!(runs["billable_overage"], 3);
    assert_eq!(runs["unit_price"], 0.5);
    assert_eq!(runs["preview"], 1.5);
    assert_eq!(report["preview_total"], 1.5);
    // The CSV export carries the same line.
    let csv = support::get_text_as(&app, "/api/v2/usage/export", &bearer(ADMIN)).await;
    let period = env.store.current_period().await.expect("period");
    assert!(
        csv.contains(&format!("globex,{period},pro,runs,8,5,allow,0.5,5,3,1.5")),
        "{csv}"
    );
}

async fn an_upgrade_mid_month_keeps_the_usage_and_applies_the_new_allowance(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    for _ in 0..3 {
        assert_eq!(create_as(&app, ACME).await.status, StatusCode::ACCEPTED);
    }
    assert_eq!(
        create_as(&app, ACME).await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    let changed = call(
        &app,
        "PUT",
        "/api/v2/tenants/acme/plan",
        Some(r#"{"plan": "pro"}"#),
        ADMIN,
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    assert_eq!(changed.body["previous_plan"], "free");
    assert_eq!(changed.body["plan"], "pro");
    assert_eq!(create_as(&app, ACME).await.status, StatusCode::ACCEPTED);
    let report = usage_of(&app, "acme", ACME2).await;
    assert_eq!(report["plan"], "pro");
    assert_eq!(report["plan_segments"].as_array().map(Vec::len), Some(2));
    let runs = meter(&report, "runs");
    assert_eq!(
        (runs["used"].as_i64(), runs["allowance"].as_i64()),
        (Some(4), Some(5))
    );
    // Prorated: mostly free (3) so far in the month, some pro (5).
    let prorated = runs["prorated_allowance"].as_f64().expect("prorated");
    assert!((3.0..=5.0).contains(&prorated), "{prorated}");
    // The change is audited with who made it.
    let audit = call(
        &app,
        "GET",
        "/api/v2/audit?action=tenant.plan_changed",
        None,
        ADMIN,
    )
    .await;
    assert_eq!(audit.body["entries"][0]["actor"], "root");
    assert_eq!(audit.body["entries"][0]["target"], "acme");
}

async fn a_downgrade_below_current_usage_blocks_from_now_on_and_deletes_nothing(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    for _ in 0..5 {
        assert_eq!(create_as(&app, GLOBEX).await.status, StatusCode::ACCEPTED);
    }
    let changed = call(
        &app,
        "PUT",
        "/api/v2/tenants/globex/plan",
        Some(r#"{"plan": "free"}"#),
        ADMIN,
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    let refused = create_as(&app, GLOBEX).await;
    assert_eq!(
        refused.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        refused.body
    );
    assert_eq!(refused.body["allowance"], 3);
    assert_eq!(refused.body["used"], 5);
    assert_eq!(runs_of(&env, "globex").await, 5);
    let report = usage_of(&app, "globex", GLOBEX).await;
    let runs = meter(&report, "runs");
    assert_eq!(
        (runs["used"].as_i64(), runs["overage"].as_i64()),
        (Some(5), Some(2))
    );
    let listed = call(&app, "GET", "/api/v2/runs", None, GLOBEX).await;
    assert_eq!(listed.body["runs"].as_array().map(Vec::len), Some(5));
}

async fn the_month_boundary_is_the_utc_midnight_of_the_database_clock(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    // The expression that stamps every usage row, evaluated by the database.
    let ms = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .expect("time")
            .timestamp_millis()
    };
    for (at, period) in [
        ("2026-11-30T23:59:59.999Z", "2026-11"),
        ("2026-12-01T00:00:00.000Z", "2026-12"),
        ("2026-12-31T23:59:59.999Z", "2026-12"),
        ("2027-01-01T00:00:00.000Z", "2027-01"),
        // Midnight in UTC+2 is still the previous UTC month.
        ("2026-12-01T01:00:00.000+02:00", "2026-11"),
    ] {
        assert_eq!(
            env.store.period_at(ms(at)).await.expect("period"),
            period,
            "{at}"
        );
    }
    // A month used up does not block the next one, and keeps its usage.
    let app = env.router();
    let first = create_as(&app, ACME).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let now = Period::parse(&env.store.current_period().await.expect("period")).expect("period");
    let before = Period::of_ms(now.start_ms() - 1);
    let id = run_id(&first).to_string();
    env.store
        .record_usage_in_period(
            &[UsageRecord {
                run_id: &id,
                step_index: None,
                meter: Meter::Runs,
                quantity: 3,
                source: "import",
            }],
            Some(&before.to_string()),
        )
        .await
        .expect("usage in the previous month");
    assert_eq!(create_as(&app, ACME).await.status, StatusCode::ACCEPTED);
    let past = call(
        &app,
        "GET",
        &format!("/api/v2/tenants/acme/usage?period={before}"),
        None,
        ACME,
    )
    .await;
    assert_eq!(meter(&past.body, "runs")["used"], 3);
    assert_eq!(meter(&past.body, "runs")["remaining"], 0);
    assert_eq!(
        meter(&usage_of(&app, "acme", ACME).await, "runs")["used"],
        2
    );
}

async fn a_redelivered_step_is_counted_once(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    let body = r#"{"steps": [{"kind": "llm", "prompt": "hello there"}]}"#;
    let created = call(&app, "POST", "/api/v2/runs", Some(body), ACME).await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{}", created.body);
    let first = env
        .store
        .claim("a", 1, Duration::from_millis(10))
        .await
        .expect("claim")
        .remove(0);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(env.store.rescue_expired().await.expect("rescue"), 1);
    let second = env
        .store
        .claim("b", 1, Duration::from_secs(60))
        .await
        .expect("claim")
        .remove(0);
    assert_eq!((first.attempt, second.attempt), (1, 2));
    let output = json!({"text": "hi", "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}});
    // The first delivery's late result, the second's, and the second's again.
    assert_eq!(
        env.store.complete(&first, &output).await.expect("complete"),
        Finish::Stale
    );
    assert_eq!(
        env.store
            .complete(&second, &output)
            .await
            .expect("complete"),
        Finish::Recorded
    );
    assert_eq!(
        env.store
            .complete(&second, &output)
            .await
            .expect("complete"),
        Finish::Stale
    );
    let period = env.store.current_period().await.expect("period");
    let used = env
        .store
        .usage_counts("acme", &period)
        .await
        .expect("usage");
    assert_eq!(used.get(&Meter::Steps), Some(&1));
    assert_eq!(used.get(&Meter::LlmTokens), Some(&5));
    let pool = env.raw_pool().await;
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM usage_ledger WHERE meter = 'steps'"
        )
        .await,
        1
    );
    let differences = env
        .store
        .verify_usage(Period::parse(&period).expect("period"))
        .await
        .expect("verify");
    assert!(differences.is_empty(), "{differences:?}");
}

async fn steps_and_llm_tokens_are_metered_and_an_admitted_run_always_finishes(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    env.store
        .assign_plan("acme", "metered", "test", None)
        .await
        .expect("plan");
    let app = env.router();
    // Three steps against a blocking steps allowance of 1 and 4 tokens: the
    // run was admitted, so it runs to the end.
    let body = r#"{"steps": [{"kind": "llm", "prompt": "one two three four five six"}, {"kind": "template", "template": "b"}, {"kind": "transform", "op": "uppercase", "input": "c"}]}"#;
    let created = call(&app, "POST", "/api/v2/runs", Some(body), ACME).await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{}", created.body);
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let detail = env
        .wait_for(
            run_id(&created),
            RunStatus::Succeeded,
            Duration::from_secs(20),
        )
        .await;
    stop.cancel();
    let _ = worker.await;
    let tokens = detail.steps[0].output.as_ref().expect("llm output")["usage"]["total_tokens"]
        .as_i64()
        .expect("tokens");
    let report = usage_of(&app, "acme", ACME).await;
    assert_eq!(meter(&report, "steps")["used"], 3);
    assert_eq!(meter(&report, "steps")["overage"], 2);
    assert_eq!(meter(&report, "llm_tokens")["used"], tokens);
    assert_eq!(
        meter(&report, "runs")["allowance"],
        Value::Null,
        "runs unlimited on metered"
    );
    // The steps allowance (block) is used up: no new run, though runs are unlimited.
    let refused = call(&app, "POST", "/api/v2/runs", Some(HELLO), ACME).await;
    assert_eq!(
        refused.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        refused.body
    );
    assert_eq!(refused.body["meter"], "steps");
    assert_eq!(refused.body["allowance"], 1);
}

/// Two API replicas (two routers, two stores, one database) on PostgreSQL;
/// one on SQLite. Without the lock of the counter row, concurrent batches
/// each read 10 remaining and admit more than 10.
async fn fifty_concurrent_creates_against_ten_remaining_admit_exactly_ten(backend: Backend) {
    let (env, dir) = env_with(backend, PLANS, &[]).await;
    env.store
        .assign_plan("acme", "ten", "test", None)
        .await
        .expect("plan");
    let first = env.router();
    for _ in 0..2 {
        assert_eq!(create_as(&first, ACME).await.status, StatusCode::ACCEPTED);
    }
    let second = match backend {
        Backend::Postgres => {
            let file = dir.path().join("plans.yaml").display().to_string();
            let replica = TestEnv::at_unmigrated(
                env.settings.database.url.expose().to_string(),
                &[
                    ("VM_PLANS_FILE", &file),
                    ("VM_API_KEYS", KEYS),
                    ("VM_RATE_LIMIT_KEY_RPS", "0"),
                    ("VM_RATE_LIMIT_IP_RPS", "0"),
                ],
            )
            .await;
            let router = replica.router();
            std::mem::forget(replica);
            router
        }
        Backend::Sqlite => first.clone(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let app = if i % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        let key = if i % 3 == 0 { ACME2 } else { ACME };
        tasks.spawn(async move { create_as(&app, key).await.status });
    }
    let mut admitted = 0;
    let mut refused = 0;
    while let Some(status) = tasks.join_next().await {
        match status.expect("task") {
            StatusCode::ACCEPTED => admitted += 1,
            StatusCode::PAYMENT_REQUIRED => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((admitted, refused), (10, 40));
    assert_eq!(runs_of(&env, "acme").await, 12);
    let period = env.store.current_period().await.expect("period");
    let used = env
        .store
        .usage_counts("acme", &period)
        .await
        .expect("usage");
    assert_eq!(used.get(&Meter::Runs), Some(&12));
    let differences = env
        .store
        .verify_usage(Period::parse(&period).expect("period"))
        .await
        .expect("verify");
    assert!(differences.is_empty(), "{differences:?}");
}

async fn usage_verify_reports_a_corrupted_counter_and_exits_non_zero(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    for _ in 0..2 {
        assert_eq!(create_as(&app, GLOBEX).await.status, StatusCode::ACCEPTED);
    }
    let period = env.store.current_period().await.expect("period");
    let verify = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_vm-webapp"))
            .args(["usage", "verify", "--period", &period])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("VM_DB_URL", env.settings.database.url.expose())
            .env("VM_WORKSPACE_ROOT", env.dir.path())
            .env("LOG_LEVEL", "error")
            .output()
            .expect("run vm-webapp")
    };
    let clean = verify();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(String::from_utf8_lossy(&clean.stdout).contains("agree"));

    let pool = env.raw_pool().await;
    sqlx::query(
        "UPDATE usage_counters SET used = used + 5 WHERE tenant = 'globex' AND meter = 'runs' \
         AND shard = (SELECT MAX(shard) FROM usage_counters WHERE tenant = 'globex' AND meter = 'runs')",
    )
    .execute(&pool)
    .await
    .expect("corrupt the counter");
    let damaged = verify();
    assert_eq!(damaged.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&damaged.stdout);
    assert!(
        stdout.contains("difference: tenant globex, meter runs: counter vs ledger differ (7 vs 2)"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&damaged.stderr).contains("1 difference(s)"));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_vm-webapp"))
        .args(["usage", "verify", "--period", "2026-13"])
        .env_clear()
        .env("VM_DB_URL", env.settings.database.url.expose())
        .output()
        .expect("run vm-webapp");
    // A bad period is a usage error (2, like a missing one), not a difference (1).
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("YYYY-MM"));
}

async fn a_key_sees_only_its_tenants_runs_and_usage_and_admin_sees_all(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    let acme_run = run_id(&create_as(&app, ACME).await);
    let globex_run = run_id(&create_as(&app, GLOBEX).await);
    // Another tenant's run is indistinguishable from a missing one.
    for (method, uri) in [
        ("GET", format!("/api/v2/runs/{acme_run}")),
        ("GET", format!("/api/v2/runs/{acme_run}/events")),
        ("POST", format!("/api/v2/runs/{acme_run}/cancel")),
        ("GET", format!("/api/v2/runs/{acme_run}/events/stream")),
    ] {
        let reply = call(&app, method, &uri, None, GLOBEX).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method} {uri}");
        assert_eq!(reply.body["code"], "run_not_found");
    }
    let ids = |reply: Reply| -> Vec<String> {
        reply.body["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .map(|r| r["id"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(
        ids(call(&app, "GET", "/api/v2/runs", None, GLOBEX).await),
        vec![globex_run.to_string()]
    );
    // Another key of the same tenant sees the tenant's runs.
    assert_eq!(
        ids(call(&app, "GET", "/api/v2/runs", None, ACME2).await),
        vec![acme_run.to_string()]
    );
    let reply = call(
        &app,
        "GET",
        &format!("/api/v2/runs/{acme_run}"),
        None,
        ACME2,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        ids(call(&app, "GET", "/api/v2/runs", None, ADMIN).await).len(),
        2
    );
    // The live feed: a tenant's streams carry its runs' events only, both in
    // the catch-up read and in the process-wide poll.
    let globex_only = FeedFilter {
        run: None,
        visible: Visibility::Tenant("globex".into()),
    };
    let page = env
        .store
        .feed_page(&globex_only, 0, i64::MAX, 1_000)
        .await
        .expect("feed page");
    assert!(
        !page.is_empty() && page.iter().all(|e| e.run_id == globex_run),
        "{page:?}"
    );
    let polled = env.store.feed_after(0, 1_000).await.expect("feed");
    assert!(polled.iter().any(|e| e.run_id == acme_run));
    let followed: Vec<_> = polled.iter().filter(|e| globex_only.matches(e)).collect();
    assert_eq!(followed.len(), page.len());
    assert!(followed.iter().all(|e| e.run_id == globex_run));
    // Usage: own tenant or admin; export: admin only; plan changes: admin only.
    let other = call(&app, "GET", "/api/v2/tenants/acme/usage", None, GLOBEX).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    assert_eq!(other.body["code"], "tenant_not_found");
    assert_eq!(usage_of(&app, "acme", ADMIN).await["tenant"], "acme");
    let export = call(&app, "GET", "/api/v2/usage/export", None, ACME).await;
    assert_eq!(export.status, StatusCode::FORBIDDEN);
    let plan = call(
        &app,
        "PUT",
        "/api/v2/tenants/acme/plan",
        Some(r#"{"plan":"pro"}"#),
        ACME,
    )
    .await;
    assert_eq!(plan.status, StatusCode::FORBIDDEN);
    // The run and its audit row belong to the tenant.
    let pool = env.raw_pool().await;
    assert_eq!(
        count(
            &pool,
            &format!(
                "SELECT COUNT(*) FROM audit_log WHERE target = '{acme_run}' AND tenant = 'acme'"
            )
        )
        .await,
        1
    );
}

async fn bad_plans_periods_and_tenants_are_4xx_with_stable_codes(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    for (method, uri, body, status, code) in [
        (
            "PUT",
            "/api/v2/tenants/acme/plan",
            Some(r#"{"plan":"platinum"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_plan",
        ),
        (
            "PUT",
            "/api/v2/tenants/acme/plan",
            Some(r#"{"plan":"pro","x":1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "PUT",
            "/api/v2/tenants/acme/plan",
            Some("{"),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "PUT",
            "/api/v2/tenants/a%20b/plan",
            Some(r#"{"plan":"pro"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "GET",
            "/api/v2/tenants/acme/usage?period=2026-13",
            None,
            StatusCode::BAD_REQUEST,
            "invalid_period",
        ),
        (
            "GET",
            "/api/v2/tenants/acme/usage?period=nov",
            None,
            StatusCode::BAD_REQUEST,
            "invalid_period",
        ),
        (
            "GET",
            "/api/v2/tenants/acme/usage?month=2026-11",
            None,
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "GET",
            "/api/v2/usage/export?period=2026-1",
            None,
            StatusCode::BAD_REQUEST,
            "invalid_period",
        ),
    ] {
        let reply = call(&app, method, uri, body, ADMIN).await;
        assert_eq!(
            (reply.status, reply.body["code"].as_str()),
            (status, Some(code)),
            "{method} {uri}: {}",
            reply.body
        );
    }
    // The export is audited.
    let _ = support::get_text_as(&app, "/api/v2/usage/export?period=2026-11", &bearer(ADMIN)).await;
    let audit = call(
        &app,
        "GET",
        "/api/v2/audit?action=usage.exported",
        None,
        ADMIN,
    )
    .await;
    assert_eq!(audit.body["entries"][0]["target"], "2026-11");
}

async fn a_threshold_writes_one_event_and_audit_row_per_period(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    // globex is on pro: runs allowance 5, warn_at 0.4 and 1.0.
    let mut ids = Vec::new();
    for _ in 0..8 {
        let reply = create_as(&app, GLOBEX).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        ids.push(run_id(&reply));
    }
    let mut with_event = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let events = env.event_types(*id).await;
        let n = events
            .iter()
            .filter(|e| *e == "tenant.usage_threshold")
            .count();
        if n > 0 {
            with_event.push((i, n));
        }
    }
    // 40% of 5 is reached by the 2nd run, 100% by the 5th; never again.
    assert_eq!(with_event, vec![(1, 1), (4, 1)]);
    let events = env.store.list_events(ids[4], 0, 100).await.expect("events");
    let event = events
        .iter()
        .find(|e| e.event_type == "tenant.usage_threshold")
        .expect("event");
    assert_eq!(event.data.as_ref().expect("data")["threshold"], "1.0");
    let report = usage_of(&app, "globex", GLOBEX).await;
    assert_eq!(report["thresholds"].as_array().map(Vec::len), Some(2));
    let audit = call(
        &app,
        "GET",
        "/api/v2/audit?action=usage.threshold_reached",
        None,
        ADMIN,
    )
    .await;
    assert_eq!(audit.body["entries"].as_array().map(Vec::len), Some(2));
    let metrics = support::get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_tenant_usage_threshold_total{threshold=\"0.4\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vm_tenant_usage_threshold_total{threshold=\"1.0\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vm_tenant_usage_threshold_total{threshold=\"0.8\"} 0"),
        "{metrics}"
    );
    // No tenant in the labels by default.
    assert!(
        metrics.contains("vm_tenant_usage_used{meter=\"runs\"} 8"),
        "{metrics}"
    );
    assert!(!metrics.contains("tenant=\"globex\""), "{metrics}");
}

async fn an_approval_decision_recorded_by_the_store_is_charged_to_the_runs_tenant(
    backend: Backend,
) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    let id = run_id(&create_as(&app, GLOBEX).await).to_string();
    // What the approval transaction calls, with the database clock's month.
    env.store
        .record_usage_in_period(
            &[UsageRecord {
                run_id: &id,
                step_index: Some(0),
                meter: Meter::ApprovalDecisions,
                quantity: 1,
                source: "approval.decided",
            }],
            None,
        )
        .await
        .expect("record");
    let report = usage_of(&app, "globex", GLOBEX).await;
    assert_eq!(meter(&report, "approval_decisions")["used"], 1);
    let missing = Uuid::now_v7().to_string();
    let err = env
        .store
        .record_usage_in_period(
            &[UsageRecord {
                run_id: &missing,
                step_index: None,
                meter: Meter::ApprovalDecisions,
                quantity: 1,
                source: "approval.decided",
            }],
            None,
        )
        .await
        .expect_err("no such run");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

async fn an_approval_decided_through_the_api_is_metered_once_with_its_step(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let app = env.router();
    let body = json!({"steps": [
        {"kind": "template", "template": "draft"},
        {"kind": "approval", "prompt": "Publish?"},
        {"kind": "template", "template": "published"},
    ]})
    .to_string();
    let created = call(&app, "POST", "/api/v2/runs", Some(&body), ACME).await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{}", created.body);
    let id = run_id(&created);
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    env.wait_for(id, RunStatus::Waiting, Duration::from_secs(20))
        .await;
    let uri = format!("/api/v2/runs/{id}/steps/1/approve");
    // Another tenant's approver neither sees nor decides it.
    let inbox = |key: &'static str| {
        let app = app.clone();
        async move {
            call(&app, "GET", "/api/v2/approvals", None, key).await.body["approvals"]
                .as_array()
                .map_or(0, Vec::len)
        }
    };
    assert_eq!(inbox(GLOBEX_APPROVER).await, 0);
    assert_eq!(inbox(APPROVER).await, 1);
    let foreign = call(&app, "POST", &uri, None, GLOBEX_APPROVER).await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{}", foreign.body);
    assert_eq!(foreign.body["code"], "run_not_found");
    let approved = call(&app, "POST", &uri, None, APPROVER).await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.body);
    let again = call(&app, "POST", &uri, None, APPROVER).await;
    assert_ne!(again.status, StatusCode::OK, "{}", again.body);
    env.wait_for(id, RunStatus::Succeeded, Duration::from_secs(20))
        .await;
    stop.cancel();
    let _ = worker.await;
    let report = usage_of(&app, "acme", ACME).await;
    assert_eq!(meter(&report, "approval_decisions")["used"], 1);
    assert_eq!(meter(&report, "steps")["used"], 3);
    let period = Period::parse(&env.store.current_period().await.expect("period")).expect("period");
    let differences = env.store.verify_usage(period).await.expect("verify");
    assert!(differences.is_empty(), "{differences:?}");
}

/// The expression that stamps usage rows with their period, evaluated by
/// the database, against the bounds `usage verify` uses for runs and results
/// (`Period::start_ms`/`end_ms`): the last millisecond of every month is in
/// that month and the next millisecond in the next, on both backends
/// (SQLite's `strftime` of `ms / 1000` truncates, PostgreSQL's
/// `to_timestamp(ms / 1000.0)` keeps microseconds: they must not round a
/// `.999` over midnight).
async fn the_last_millisecond_of_every_month_is_in_that_month_for_the_database(backend: Backend) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let mut months: Vec<Period> = Vec::new();
    let mut p = Period::parse("2000-01").expect("period");
    while p.year <= 2100 {
        months.push(p);
        p = p.next();
    }
    months.extend((1..=11).map(|m| Period::parse(&format!("9999-{m:02}")).expect("period")));
    for p in months {
        let last = env.store.period_at(p.end_ms() - 1).await.expect("period");
        let next = env.store.period_at(p.end_ms()).await.expect("period");
        assert_eq!(
            (last.as_str(), next.as_str()),
            (p.to_string().as_str(), p.next().to_string().as_str()),
            "{p}"
        );
        assert_eq!(Period::of_ms(p.end_ms() - 1), p);
    }
}

/// A run created, and its step finished, in the last millisecond of
/// October, with its usage written later (on SQLite each statement reads
/// the clock anew, so the ledger statement of a run-creation or completion
/// transaction can fall after midnight): the ledger stamped the usage with
/// the month of the ledger statement, November, while `usage verify`
/// counts the run and its result in October, the month of their
/// `created_at` and `finished_at`, and reported a difference in both.
async fn usage_of_a_run_created_in_the_last_millisecond_of_a_month_is_in_that_month_for_ledger_and_verify(
    backend: Backend,
) {
    let (env, _dir) = env_with(backend, PLANS, &[]).await;
    let october = Period::parse("2026-10").expect("period");
    let november = october.next();
    let pool = env.raw_pool().await;
    let mut ids = Vec::new();
    for at in [october.end_ms() - 1, november.start_ms()] {
        let id = Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO runs (id, status, input, steps, step_count, request_hash, correlation_id, \
             tenant, created_at, updated_at) VALUES ($1, 'succeeded', '{}', \
             '[{\"kind\":\"template\",\"template\":\"hi\"}]', 1, 'h', $1, 'acme', $2, $2)",
        )
        .bind(&id)
        .bind(at)
        .execute(&pool)
        .await
        .expect("run");
        sqlx::query(
            "INSERT INTO step_results (run_id, step_index, output, attempt, job_id, finished_at) \
             VALUES ($1, 0, '{}', 1, 1, $2)",
        )
        .bind(&id)
        .bind(at)
        .execute(&pool)
        .await
        .expect("result");
        ids.push(id);
    }
    for id in &ids {
        env.store
            .record_usage_in_period(
                &[
                    UsageRecord {
                        run_id: id,
                        step_index: None,
                        meter: Meter::Runs,
                        quantity: 1,
                        source: "run.created",
                    },
                    UsageRecord {
                        run_id: id,
                        step_index: Some(0),
                        meter: Meter::Steps,
                        quantity: 1,
                        source: "step.succeeded",
                    },
                ],
                None,
            )
            .await
            .expect("usage written after the month ended");
    }
    for (id, period) in ids.iter().zip([october, november]) {
        let stamped: Vec<String> = sqlx::query("SELECT period FROM usage_ledger WHERE run_id = $1")
            .bind(id)
            .fetch_all(&pool)
            .await
            .expect("ledger")
            .iter()
            .map(|r| r.try_get::<String, _>("period").expect("period"))
            .collect();
        assert_eq!(stamped, vec![period.to_string(); 2], "run {id}");
        let used = env
            .store
            .usage_counts("acme", &period.to_string())
            .await
            .expect("usage");
        assert_eq!(
            (used.get(&Meter::Runs), used.get(&Meter::Steps)),
            (Some(&1), Some(&1)),
            "{period}"
        );
        let differences = env.store.verify_usage(period).await.expect("verify");
        assert!(differences.is_empty(), "{period}: {differences:?}");
    }
}

/// A reproducible invoice across plan changes (October 2026, 31 days; the
/// ledger rows, counters and plan changes written with their times): pro
/// allows 31 runs a month (1 a day) and bills past that at 0.5.
/// - days 1 to 10 on pro, 25 runs: 10 allowed, 15 over (7.5);
/// - days 11 to 20 unlimited, 1000 runs: not billed;
/// - days 21 to 31 on pro again, 15 runs: 21 allowed over both pro times
///   against 40 used, so 19 over, 4 more than before (2.0).
///
/// The unlimited time made the whole preview 0 (and `prorated_allowance`
/// absent): the 15 runs over already owed under pro disappeared.
async fn an_unlimited_time_mid_month_neither_erases_nor_adds_overage(backend: Backend) {
    let (env, _dir) = env_with(
        backend,
        "default_plan: pro\nplans:\n  pro:\n    meters:\n      runs: {allowance: 31, overage: allow, unit_price: 0.5}\n  unlimited: {}\n",
        &[],
    )
    .await;
    let october = Period::parse("2026-10").expect("period");
    let day = |d: i64| october.start_ms() + (d - 1) * 86_400_000;
    let pool = env.raw_pool().await;
    for (at, runs) in [(day(5), 25), (day(15), 1000), (day(25), 15)] {
        sqlx::query(
            "INSERT INTO usage_ledger (tenant, meter, quantity, period, run_id, step_index, source, at) \
             VALUES ('acme', 'runs', $1, '2026-10', NULL, NULL, 'import', $2)",
        )
        .bind(runs)
        .bind(at)
        .execute(&pool)
        .await
        .expect("ledger");
    }
    sqlx::query(
        "INSERT INTO usage_counters (tenant, period, meter, shard, used, updated_at) \
         VALUES ('acme', '2026-10', 'runs', 1, 1040, $1)",
    )
    .bind(day(25))
    .execute(&pool)
    .await
    .expect("counter");
    for (plan, at) in [("unlimited", day(11)), ("pro", day(21))] {
        sqlx::query(
            "INSERT INTO tenant_plan_changes (tenant, plan, changed_at, changed_by) \
             VALUES ('acme', $1, $2, 'root')",
        )
        .bind(plan)
        .bind(at)
        .execute(&pool)
        .await
        .expect("plan change");
    }
    let app = env.router();
    let reply = call(
        &app,
        "GET",
        "/api/v2/tenants/acme/usage?period=2026-10",
        None,
        ADMIN,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let runs = meter(&reply.body, "runs");
    assert_eq!(
        reply.body["plan_segments"].as_array().map(Vec::len),
        Some(3)
    );
    assert_eq!(runs["used"], 1040);
    assert_eq!(runs["prorated_allowance"], 21.0, "{runs}");
    assert_eq!(runs["billable_overage"], 19, "{}", reply.body);
    assert_eq!(runs["preview"], 9.5, "{runs}");
    assert_eq!(reply.body["preview_total"], 9.5);
    let csv =
        support::get_text_as(&app, "/api/v2/usage/export?period=2026-10", &bearer(ADMIN)).await;
    assert!(
        csv.contains("acme,2026-10,pro,runs,1040,31,allow,0.5,21,19,9.5"),
        "{csv}"
    );
}

/// Thresholds were keyed by tenant, period, meter and threshold only: after
/// an upgrade from 5 runs to 20, the 80 % and 100 % reached under the 5
/// silenced the new plan's 80 % (16 runs) and 100 % (20 runs), so a tenant
/// ran into overage without a warning.
async fn an_upgrade_mid_period_warns_again_at_the_new_allowances_thresholds(backend: Backend) {
    let (env, _dir) = env_with(
        backend,
        "default_plan: small\nplans:\n  small:\n    meters:\n      runs: {allowance: 5, overage: block}\n  \
         large:\n    meters:\n      runs: {allowance: 20, overage: allow, unit_price: 0.1}\n",
        &[],
    )
    .await;
    let app = env.router();
    let mut ids = Vec::new();
    let mut create = async |n: usize| {
        for _ in 0..n {
            let reply = create_as(&app, ACME).await;
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
            ids.push(run_id(&reply));
        }
    };
    create(5).await;
    let plan = |name: &'static str| {
        let app = app.clone();
        async move {
            let body = format!(r#"{{"plan":"{name}"}}"#);
            let reply = call(&app, "PUT", "/api/v2/tenants/acme/plan", Some(&body), ADMIN).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        }
    };
    plan("large").await;
    create(15).await;
    // Back to the small allowance, already warned about: no third warning.
    plan("small").await;
    plan("large").await;
    create(1).await;
    let report = usage_of(&app, "acme", ACME).await;
    let reached: Vec<(String, i64, i64)> = report["thresholds"]
        .as_array()
        .expect("thresholds")
        .iter()
        .map(|t| {
            (
                t["threshold"].as_str().unwrap_or_default().to_string(),
                t["allowance"].as_i64().unwrap_or_default(),
                t["used"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        reached,
        vec![
            ("0.8".to_string(), 5, 4),
            ("1.0".to_string(), 5, 5),
            ("0.8".to_string(), 20, 16),
            ("1.0".to_string(), 20, 20),
        ],
        "{}",
        report["thresholds"]
    );
    let mut with_event = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let n = env
            .event_types(*id)
            .await
            .iter()
            .filter(|e| *e == "tenant.usage_threshold")
            .count();
        if n > 0 {
            with_event.push((i + 1, n));
        }
    }
    assert_eq!(with_event, vec![(4, 1), (5, 1), (16, 1), (20, 1)]);
    let metrics = support::get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_tenant_usage_threshold_total{threshold=\"1.0\"} 2"),
        "{metrics}"
    );
}

/// `usage verify` while the app creates runs and the worker records their
/// steps: every table is read in one snapshot, so a step whose result, ledger
/// row and counter commit between two of the verification's reads is never
/// reported as a difference (before, PostgreSQL showed `steps` differences
/// within the first seconds, in each of two runs).
async fn usage_verify_while_serving_reports_no_difference(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_RATE_LIMIT_IP_RPS", "0")]).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(8, LlmBackend::Offline);
    let producing = tokio_util::sync::CancellationToken::new();
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (app, producing) = (app.clone(), producing.clone());
        producers.spawn(async move {
            let mut created = 0;
            while !producing.is_cancelled() {
                support::create(&app, HELLO).await;
                created += 1;
            }
            created
        });
    }
    let period = Period::parse(&env.store.current_period().await.expect("period")).expect("period");
    let mut verified = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < deadline {
        let differences = env.store.verify_usage(period).await.expect("verify");
        assert!(differences.is_empty(), "while serving: {differences:?}");
        verified += 1;
    }
    producing.cancel();
    let mut created = 0;
    while let Some(n) = producers.join_next().await {
        created += n.expect("producer");
    }
    stop.cancel();
    let _ = worker.await;
    assert!(
        verified >= 5 && created >= 50,
        "{verified} verifications over {created} runs"
    );
}

on_both_backends!(
    usage_verify_while_serving_reports_no_difference,
    the_last_millisecond_of_every_month_is_in_that_month_for_the_database,
    usage_of_a_run_created_in_the_last_millisecond_of_a_month_is_in_that_month_for_ledger_and_verify,
    an_unlimited_time_mid_month_neither_erases_nor_adds_overage,
    an_upgrade_mid_period_warns_again_at_the_new_allowances_thresholds,
    an_approval_decided_through_the_api_is_metered_once_with_its_step,
    an_approval_decision_recorded_by_the_store_is_charged_to_the_runs_tenant,
    under_the_allowance_runs_are_admitted_counted_and_remaining_shrinks,
    at_the_allowance_the_last_run_is_admitted_and_the_next_is_refused_with_402,
    over_an_allow_allowance_runs_are_admitted_and_the_preview_bills_the_overage,
    an_upgrade_mid_month_keeps_the_usage_and_applies_the_new_allowance,
    a_downgrade_below_current_usage_blocks_from_now_on_and_deletes_nothing,
    the_month_boundary_is_the_utc_midnight_of_the_database_clock,
    a_redelivered_step_is_counted_once,
    steps_and_llm_tokens_are_metered_and_an_admitted_run_always_finishes,
    fifty_concurrent_creates_against_ten_remaining_admit_exactly_ten,
    usage_verify_reports_a_corrupted_counter_and_exits_non_zero,
    a_key_sees_only_its_tenants_runs_and_usage_and_admin_sees_all,
    bad_plans_periods_and_tenants_are_4xx_with_stable_codes,
    a_threshold_writes_one_event_and_audit_row_per_period,
);

#[tokio::test]
async fn tenant_labels_on_usage_gauges_only_when_asked() {
    let (env, _dir) = env_with(
        Backend::Sqlite,
        PLANS,
        &[("VM_METRICS_TENANT_LABELS", "true")],
    )
    .await;
    let app = env.router();
    assert_eq!(create_as(&app, ACME).await.status, StatusCode::ACCEPTED);
    let metrics = support::get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_tenant_usage_used{tenant=\"acme\",meter=\"runs\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vm_tenant_usage_allowance{tenant=\"acme\",meter=\"runs\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn without_a_plans_file_nothing_is_limited_and_usage_is_still_metered() {
    let env = TestEnv::new(Backend::Sqlite, &[("VM_API_KEYS", KEYS)]).await;
    let app = env.router();
    for _ in 0..5 {
        assert_eq!(create_as(&app, ACME).await.status, StatusCode::ACCEPTED);
    }
    let report = usage_of(&app, "acme", ACME).await;
    assert_eq!(report["plan"], Value::Null);
    assert_eq!(meter(&report, "runs")["used"], 5);
    assert_eq!(meter(&report, "runs")["allowance"], Value::Null);
    let plan = call(
        &app,
        "PUT",
        "/api/v2/tenants/acme/plan",
        Some(r#"{"plan":"pro"}"#),
        ADMIN,
    )
    .await;
    assert_eq!(plan.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(plan.body["code"], "unknown_plan");
}

#[test]
fn a_bad_plans_file_fails_start_up_naming_the_variable_the_plan_and_the_meter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plans.yaml");
    std::fs::write(
        &file,
        "default_plan: free\nplans:\n  free:\n    meters:\n      runs: {allowance: -1}\n      tokens: {allowance: 5}\n",
    )
    .expect("write");
    let path = file.display().to_string();
    let errors = support::settings_from(&[("VM_PLANS_FILE", &path)]).expect_err("invalid");
    assert!(errors.mentions("VM_PLANS_FILE"));
    let text = errors.to_string();
    assert!(
        text.contains("VM_PLANS_FILE: plan `free`, meter `runs`: allowance"),
        "{text}"
    );
    assert!(
        text.contains("plan `free`: unknown meter `tokens`"),
        "{text}"
    );

    let missing = dir.path().join("absent.yaml").display().to_string();
    let errors = support::settings_from(&[("VM_PLANS_FILE", &missing)]).expect_err("missing");
    assert!(
        errors.to_string().contains("VM_PLANS_FILE: cannot read"),
        "{errors}"
    );

    std::fs::write(&file, "default_plan: free\nplans: [free]\n").expect("write");
    let errors = support::settings_from(&[("VM_PLANS_FILE", &path)]).expect_err("shape");
    assert!(errors.mentions("VM_PLANS_FILE"), "{errors}");
}
