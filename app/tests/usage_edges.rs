//! Edge cases of tenants, plans and usage found by trying the feature as a
//! new user would: plans files with a name written twice, too large or not
//! a file; webhook tenants with long source names; huge allowances on the
//! metrics scrape; spreadsheet formulas in the usage export; and the exit
//! code of `usage verify` for a bad period.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use axum::Router;
use axum::http::StatusCode;
use support::{Backend, Reply, TestEnv, send};
use vm_webapp::plans::Plans;

const ADMIN: &str = "admin-key-0123456789";

async fn call(app: &Router, method: &str, uri: &str, body: Option<&str>, key: &str) -> Reply {
    send(
        app,
        method,
        uri,
        body,
        &[("authorization", &format!("Bearer {key}"))],
    )
    .await
}

const HELLO: &str =
    r#"{"input": {"name": "x"}, "steps": [{"kind": "template", "template": "hi"}]}"#;

/// A test environment with `keys` and the plans text `plans` (the returned
/// directory holds the file and must outlive the environment).
async fn env_with(backend: Backend, keys: &str, plans: &str) -> (TestEnv, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file: PathBuf = dir.path().join("plans.yaml");
    std::fs::write(&file, plans).expect("write plans");
    let file = file.display().to_string();
    let env = TestEnv::new(
        backend,
        &[
            ("VM_PLANS_FILE", file.as_str()),
            ("VM_API_KEYS", keys),
            ("VM_RATE_LIMIT_KEY_RPS", "0"),
            ("VM_RATE_LIMIT_IP_RPS", "0"),
        ],
    )
    .await;
    (env, dir)
}

#[test]
fn a_plans_file_naming_a_plan_a_meter_or_a_tenant_twice_is_refused() {
    for (yaml, name) in [
        (
            "default_plan: free\nplans:\n  free:\n    meters:\n      runs: {allowance: 1}\n  free:\n    meters:\n      runs: {allowance: 1000}\n",
            "free",
        ),
        (
            "default_plan: free\nplans:\n  free:\n    meters:\n      runs: {allowance: 1}\n      runs: {allowance: 100}\n",
            "runs",
        ),
        (
            "default_plan: free\nplans:\n  free: {}\n  pro: {}\ntenants:\n  acme: pro\n  acme: free\n",
            "acme",
        ),
    ] {
        let problems = Plans::parse(yaml)
            .expect_err("a name written twice is a mistake, not the last one winning")
            .join("\n");
        assert!(
            problems.contains("duplicate") && problems.contains(name),
            "{name}: {problems}"
        );
    }
}

#[test]
fn a_plans_file_that_is_not_a_regular_file_or_is_too_large_is_refused_without_reading_it_all() {
    // /dev/zero never ends: reading it whole would hang start-up.
    let errors =
        support::settings_from(&[("VM_PLANS_FILE", "/dev/zero")]).expect_err("not a regular file");
    assert!(errors.to_string().contains("VM_PLANS_FILE"), "{errors}");
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("plans.yaml");
    let mut text = String::from("default_plan: free\nplans:\n  free: {}\n");
    while text.len() <= 2 * 1024 * 1024 {
        text.push_str("# padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&big, text).expect("write");
    let errors = support::settings_from(&[("VM_PLANS_FILE", &big.display().to_string())])
        .expect_err("too large");
    let text = errors.to_string();
    assert!(
        text.contains("VM_PLANS_FILE") && text.contains("larger than"),
        "{text}"
    );
}

/// `webhook:` plus a source of up to 64 characters: the tenant of its runs.
fn long_webhook_tenant() -> String {
    format!("webhook:{}", "s".repeat(64))
}

#[test]
fn a_plans_file_may_assign_a_plan_to_a_webhook_tenant_with_a_long_source() {
    let yaml = format!(
        "default_plan: free\nplans:\n  free: {{}}\n  pro: {{}}\ntenants:\n  \"{}\": pro\n",
        long_webhook_tenant()
    );
    let plans = Plans::parse(&yaml).expect("a webhook tenant is a tenant");
    assert_eq!(plans.file_plan_of(&long_webhook_tenant()), "pro");
}

async fn a_webhook_tenant_with_a_long_source_has_a_usage_report_and_a_plan_like_any_tenant(
    backend: Backend,
) {
    let (env, _dir) = env_with(
        backend,
        "root:admin-key-0123456789:admin",
        "default_plan: free\nplans:\n  free: {}\n  pro: {}\n",
    )
    .await;
    let app = env.router();
    let tenant = long_webhook_tenant();
    let usage = call(
        &app,
        "GET",
        &format!("/api/v2/tenants/{tenant}/usage?period=2026-11"),
        None,
        ADMIN,
    )
    .await;
    assert_eq!(usage.status, StatusCode::OK, "{}", usage.body);
    assert_eq!(usage.body["tenant"], tenant.as_str());
    let plan = call(
        &app,
        "PUT",
        &format!("/api/v2/tenants/{tenant}/plan"),
        Some(r#"{"plan":"pro"}"#),
        ADMIN,
    )
    .await;
    assert_eq!(plan.status, StatusCode::OK, "{}", plan.body);
    // Still not any text: a name past `webhook:` must be a source name.
    let bad = call(
        &app,
        "GET",
        &format!("/api/v2/tenants/webhook:{}/usage", "s".repeat(65)),
        None,
        ADMIN,
    )
    .await;
    assert_eq!(bad.status, StatusCode::NOT_FOUND, "{}", bad.body);
}

async fn huge_allowances_of_several_tenants_do_not_break_the_metrics_scrape(backend: Backend) {
    let (env, _dir) = env_with(
        backend,
        "root:admin-key-0123456789:admin,a:a-key-0123456789abcdef,b:b-key-0123456789abcdef",
        "default_plan: big\nplans:\n  big:\n    meters:\n      runs: {allowance: 9223372036854775807}\n",
    )
    .await;
    let app = env.router();
    for key in ["a-key-0123456789abcdef", "b-key-0123456789abcdef"] {
        let reply = call(&app, "POST", "/api/v2/runs", Some(HELLO), key).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    }
    let metrics = support::get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_tenant_usage_allowance{meter=\"runs\"} 9223372036854775807"),
        "the sum saturates instead of overflowing:\n{metrics}"
    );
}

async fn a_tenant_name_a_spreadsheet_would_read_as_a_formula_is_neutralised_in_the_export(
    backend: Backend,
) {
    let (env, _dir) = env_with(
        backend,
        "root:admin-key-0123456789:admin,f:f-key-0123456789abcdef:tenant=-A1",
        "default_plan: -plan\nplans:\n  -plan: {}\n",
    )
    .await;
    let app = env.router();
    let reply = call(
        &app,
        "POST",
        "/api/v2/runs",
        Some(HELLO),
        "f-key-0123456789abcdef",
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    let csv = support::get_text_as(&app, "/api/v2/usage/export", &format!("Bearer {ADMIN}")).await;
    let lines: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(lines.len(), 4, "{csv}");
    for line in lines {
        for cell in line.split(',') {
            assert!(
                !cell.starts_with(['=', '+', '-', '@']),
                "cell {cell:?} of {line:?} would be a formula"
            );
        }
        assert!(line.starts_with("'-A1,"), "{line}");
        assert!(line.contains(",'-plan,"), "{line}");
    }
}

#[test]
fn usage_verify_with_a_bad_period_is_a_usage_error_exit_2_not_a_difference() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 9999-12 would reset in the year 10000, which RFC 3339 cannot write.
    for period in ["2026-13", "2026-1", "0000-01", "9999-12"] {
        let out = Command::new(env!("CARGO_BIN_EXE_vm-webapp"))
            .args(["usage", "verify", "--period", period])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("VM_WORKSPACE_ROOT", dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run vm-webapp");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{period}: {stderr}");
        assert!(
            stderr.contains("YYYY-MM") && stderr.contains("2000-01 to 9999-11"),
            "{period}: {stderr}"
        );
    }
}

async fn overage_used_on_an_allow_plan_is_still_priced_after_a_downgrade_to_a_block_plan(
    backend: Backend,
) {
    // pro bills past 2 runs at 0.5; free blocks past 1 and has no price.
    let (env, _dir) = env_with(
        backend,
        "root:admin-key-0123456789:admin,a:a-key-0123456789abcdef",
        "default_plan: pro\nplans:\n  pro:\n    meters:\n      runs: {allowance: 2, overage: allow, unit_price: 0.5}\n  free:\n    meters:\n      runs: {allowance: 1, overage: block}\n",
    )
    .await;
    let app = env.router();
    for _ in 0..5 {
        let reply = call(
            &app,
            "POST",
            "/api/v2/runs",
            Some(HELLO),
            "a-key-0123456789abcdef",
        )
        .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    }
    let down = call(
        &app,
        "PUT",
        "/api/v2/tenants/a/plan",
        Some(r#"{"plan":"free"}"#),
        ADMIN,
    )
    .await;
    assert_eq!(down.status, StatusCode::OK, "{}", down.body);
    let report = call(&app, "GET", "/api/v2/tenants/a/usage", None, ADMIN).await;
    let runs = &report.body["meters"][0];
    assert_eq!(runs["meter"], "runs");
    assert_eq!(runs["allowance"], 1, "the plan in force now is enforced");
    // 3 or 4 units past the prorated allowance (2 on pro, 1 on free),
    // depending on the day of the month the test runs.
    let billable = runs["billable_overage"].as_i64().expect("billable");
    assert!((3..=4).contains(&billable), "{runs}");
    assert_eq!(
        runs["unit_price"], 0.5,
        "the price they were used at: {runs}"
    );
    assert_eq!(runs["preview"], billable as f64 * 0.5, "{runs}");
}

async fn a_warning_threshold_is_reached_at_exactly_its_share_of_the_allowance(backend: Backend) {
    // 1.1 × 50 is 55.00000000000001 in floating point: the 110% warning must
    // still come with the 55th run, not the 56th.
    let (env, _dir) = env_with(
        backend,
        "root:admin-key-0123456789:admin,a:a-key-0123456789abcdef",
        "default_plan: pro\nplans:\n  pro:\n    warn_at: [1.1]\n    meters:\n      runs: {allowance: 50, overage: allow, unit_price: 0.1}\n",
    )
    .await;
    let app = env.router();
    for _ in 0..55 {
        let reply = call(
            &app,
            "POST",
            "/api/v2/runs",
            Some(HELLO),
            "a-key-0123456789abcdef",
        )
        .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    }
    let report = call(&app, "GET", "/api/v2/tenants/a/usage", None, ADMIN).await;
    let thresholds = report.body["thresholds"].as_array().expect("thresholds");
    assert_eq!(thresholds.len(), 1, "{}", report.body);
    assert_eq!(thresholds[0]["threshold"], "1.1");
    assert_eq!(thresholds[0]["used"], 55);
}

#[test]
fn a_unit_price_so_large_that_the_preview_would_be_infinite_is_refused() {
    // 1e300 × a few units × 1e6 (the preview's rounding) is infinite, which
    // JSON writes as null and the CSV as `inf`.
    let problems = Plans::parse(
        "default_plan: free\nplans:\n  free:\n    meters:\n      runs: {allowance: 1, overage: allow, unit_price: 1e300}\n",
    )
    .expect_err("an absurd price")
    .join("\n");
    assert!(
        problems.contains("plan `free`, meter `runs`: unit_price"),
        "{problems}"
    );
    Plans::parse(
        "default_plan: free\nplans:\n  free:\n    meters:\n      runs: {allowance: 1, overage: allow, unit_price: 1000000}\n",
    )
    .expect("a large but real price");
}

async fn a_period_given_twice_is_refused_rather_than_one_of_them_silently_chosen(backend: Backend) {
    let (env, _dir) = env_with(
        backend,
        "root:admin-key-0123456789:admin",
        "default_plan: free\nplans:\n  free: {}\n",
    )
    .await;
    let app = env.router();
    for uri in [
        "/api/v2/tenants/root/usage?period=2026-11&period=2026-10",
        "/api/v2/usage/export?period=2026-11&period=2026-10",
    ] {
        let reply = call(&app, "GET", uri, None, ADMIN).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{uri}: {}",
            reply.body
        );
        assert_eq!(reply.body["code"], "invalid_parameter", "{uri}");
    }
}

async fn concurrent_repeats_of_one_idempotency_key_at_the_last_allowed_run_are_replays_not_402(
    backend: Backend,
) {
    // free blocks past 1 run: the first request with the key takes the last
    // run; its concurrent repeats replay it (200), even when they share a
    // batch with it (the admin's unlimited runs keep the writer busy so that
    // the repeats queue up together).
    let (env, _dir) = env_with(
        backend,
        "root:admin-key-0123456789:admin,a:a-key-0123456789abcdef",
        "default_plan: free\nplans:\n  free:\n    meters:\n      runs: {allowance: 1, overage: block}\n  big: {}\ntenants:\n  root: big\n",
    )
    .await;
    let app = env.router();
    let requests = (0..160).map(|i| {
        let app = app.clone();
        async move {
            let headers: Vec<(&str, &str)> = if i % 2 == 0 {
                vec![("authorization", "Bearer admin-key-0123456789")]
            } else {
                vec![
                    ("authorization", "Bearer a-key-0123456789abcdef"),
                    ("idempotency-key", "the-same-one"),
                ]
            };
            (
                i % 2,
                send(&app, "POST", "/api/v2/runs", Some(HELLO), &headers).await,
            )
        }
    });
    let replies = futures::future::join_all(requests).await;
    let mut statuses: Vec<u16> = replies
        .iter()
        .filter(|(keyed, _)| *keyed == 1)
        .map(|(_, r)| r.status.as_u16())
        .collect();
    statuses.sort_unstable();
    let created = statuses.iter().filter(|s| **s == 202).count();
    let replayed = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!((created, replayed), (1, 79), "{statuses:?}");
}

async fn a_meter_no_tenant_is_limited_on_has_no_allowance_gauge(backend: Backend) {
    // Only runs are limited: a `steps` allowance of 0 would read as "used
    // 1 of 0" (an infinite ratio) on a dashboard.
    let (env, _dir) = env_with(
        backend,
        "root:admin-key-0123456789:admin,a:a-key-0123456789abcdef",
        "default_plan: free\nplans:\n  free:\n    meters:\n      runs: {allowance: 10, overage: block}\n",
    )
    .await;
    let app = env.router();
    let run = call(
        &app,
        "POST",
        "/api/v2/runs",
        Some(HELLO),
        "a-key-0123456789abcdef",
    )
    .await;
    assert_eq!(run.status, StatusCode::ACCEPTED, "{}", run.body);
    let id: uuid::Uuid = run.body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    env.store
        .record_usage_in_period(
            &[vm_webapp::store::UsageRecord {
                run_id: &id.to_string(),
                step_index: Some(0),
                meter: vm_webapp::plans::Meter::Steps,
                quantity: 1,
                source: "import",
            }],
            None,
        )
        .await
        .expect("record a step");
    let metrics = support::get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_tenant_usage_used{meter=\"steps\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vm_tenant_usage_allowance{meter=\"runs\"} 10"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("vm_tenant_usage_allowance{meter=\"steps\"}"),
        "{metrics}"
    );
}

/// `usage verify` on `vars` (plus a clean environment), for a valid period.
fn verify_with(vars: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vm-webapp"))
        .args(["usage", "verify", "--period", "2026-11"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOG_LEVEL", "error")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run vm-webapp")
}

/// A verify pointed at a wrong workspace or path created an empty SQLite
/// database there and ended with a misleading "run `vm-webapp migrate`"
/// (which would then have made it agree): a check must never create the
/// thing it checks.
#[test]
fn usage_verify_of_a_sqlite_database_that_does_not_exist_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("workspace");
    let explicit = dir.path().join("elsewhere").join("vm.db");
    let explicit_url = format!("sqlite://{}?mode=rwc", explicit.display());
    let root_text = root.display().to_string();
    for vars in [
        vec![("VM_WORKSPACE_ROOT", root_text.as_str())],
        vec![
            ("VM_WORKSPACE_ROOT", root_text.as_str()),
            ("VM_DB_URL", explicit_url.as_str()),
        ],
    ] {
        let out = verify_with(&vars);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{vars:?}: {stderr}");
        assert!(
            stderr.contains("does not exist") && stderr.contains("nothing was created"),
            "{vars:?}: {stderr}"
        );
        assert!(!stderr.contains("migrate"), "{vars:?}: {stderr}");
    }
    assert!(!root.exists(), "the workspace was created");
    assert!(
        !explicit.parent().expect("dir").exists(),
        "a database was created"
    );
}

/// The PostgreSQL side: a database that does not exist is a failure that
/// names the problem, without the URL's password.
#[test]
fn usage_verify_of_a_postgres_database_that_does_not_exist_fails_without_the_password() {
    let url = support::pg::shared()
        .url("no_such_database")
        .replace("postgres://postgres@", "postgres://postgres:hunter2-pw@");
    let out = verify_with(&[("VM_DB_URL", url.as_str())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot open the postgres database"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// Without the bound, `period=9999-12` answered 200 with `resets_at`
/// `+10000-01-01T00:00:00.000Z`, which RFC 3339 parsers reject.
async fn a_period_resetting_in_the_year_10000_is_refused_and_every_answered_reset_is_rfc_3339(
    backend: Backend,
) {
    let (env, _dir) = env_with(
        backend,
        "root:admin-key-0123456789:admin",
        "default_plan: free\nplans:\n  free: {}\n",
    )
    .await;
    let app = env.router();
    for uri in [
        "/api/v2/tenants/root/usage?period=9999-12",
        "/api/v2/usage/export?period=9999-12",
    ] {
        let reply = call(&app, "GET", uri, None, ADMIN).await;
        assert_eq!(
            (reply.status, reply.body["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_period")),
            "{uri}: {}",
            reply.body
        );
        // 9999-12 is written YYYY-MM: the message names the range it is outside.
        let message = reply.body["message"].as_str().unwrap_or_default();
        assert!(message.contains("2000-01 to 9999-11"), "{message}");
    }
    for period in ["9999-11", "2000-01"] {
        let reply = call(
            &app,
            "GET",
            &format!("/api/v2/tenants/root/usage?period={period}"),
            None,
            ADMIN,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let at = reply.body["resets_at"].as_str().expect("resets_at");
        assert!(
            chrono::DateTime::parse_from_rfc3339(at).is_ok() && at.len() == 24,
            "{period}: {at}"
        );
    }
}

/// A webhook's runs count against the allowance of `webhook:<source>` like
/// any tenant's: past a `block` allowance the delivery answers `402
/// quota_exceeded`, which the OpenAPI document did not list for the webhook
/// route (nor the 422 of an invalid requested run), so a generated client
/// had no type for it. The refused delivery's nonce is not spent: once there
/// is room, the sender's retry of the same delivery starts the run.
async fn a_webhook_past_its_tenants_allowance_is_a_documented_402_and_its_retry_goes_through(
    backend: Backend,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plans.yaml");
    std::fs::write(
        &file,
        "default_plan: tiny\nplans:\n  tiny:\n    meters:\n      runs: {allowance: 1, overage: block}\n  big: {}\n",
    )
    .expect("write plans");
    let file = file.display().to_string();
    let secret = "gh-secret-0123456789abcdef";
    let env = TestEnv::new(
        backend,
        &[
            ("VM_PLANS_FILE", file.as_str()),
            ("VM_API_KEYS", "root:admin-key-0123456789:admin"),
            ("VM_WEBHOOK_SECRETS", &format!("github:{secret}")),
            ("VM_RATE_LIMIT_KEY_RPS", "0"),
            ("VM_RATE_LIMIT_IP_RPS", "0"),
        ],
    )
    .await;
    let app = env.router();
    let body = format!(r#"{{"run": {HELLO}}}"#);
    let deliver = |nonce: &'static str| {
        let app = app.clone();
        let body = body.clone();
        async move {
            let ts = (vm_webapp::model::now_ms() / 1000).to_string();
            let sig =
                vm_webapp::http::webhooks::sign(secret.as_bytes(), &ts, nonce, body.as_bytes());
            send(
                &app,
                "POST",
                "/api/v2/webhooks/github",
                Some(&body),
                &[
                    ("x-vm-timestamp", &ts),
                    ("x-vm-nonce", nonce),
                    ("x-vm-signature", &sig),
                ],
            )
            .await
        }
    };
    assert_eq!(deliver("nonce-first-1").await.status, StatusCode::ACCEPTED);
    let refused = deliver("nonce-second-2").await;
    assert_eq!(
        (refused.status, refused.body["code"].as_str()),
        (StatusCode::PAYMENT_REQUIRED, Some("quota_exceeded")),
        "{}",
        refused.body
    );
    let moved = call(
        &app,
        "PUT",
        "/api/v2/tenants/webhook:github/plan",
        Some(r#"{"plan":"big"}"#),
        ADMIN,
    )
    .await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.body);
    let retried = deliver("nonce-second-2").await;
    assert_eq!(retried.status, StatusCode::ACCEPTED, "{}", retried.body);

    let doc = call(&app, "GET", "/api/v2/openapi.json", None, ADMIN).await;
    let responses = &doc.body["paths"]["/api/v2/webhooks/{source}"]["post"]["responses"];
    for status in ["402", "422", "503"] {
        assert!(
            responses.get(status).is_some(),
            "the webhook route does not document {status}: {responses}"
        );
    }
}

on_both_backends!(
    a_period_resetting_in_the_year_10000_is_refused_and_every_answered_reset_is_rfc_3339,
    a_meter_no_tenant_is_limited_on_has_no_allowance_gauge,
    a_webhook_tenant_with_a_long_source_has_a_usage_report_and_a_plan_like_any_tenant,
    huge_allowances_of_several_tenants_do_not_break_the_metrics_scrape,
    a_tenant_name_a_spreadsheet_would_read_as_a_formula_is_neutralised_in_the_export,
    overage_used_on_an_allow_plan_is_still_priced_after_a_downgrade_to_a_block_plan,
    a_warning_threshold_is_reached_at_exactly_its_share_of_the_allowance,
    a_period_given_twice_is_refused_rather_than_one_of_them_silently_chosen,
    concurrent_repeats_of_one_idempotency_key_at_the_last_allowed_run_are_replays_not_402,
    a_webhook_past_its_tenants_allowance_is_a_documented_402_and_its_retry_goes_through,
);
