//! Security rules, each with a test that fails if the rule breaks: key
//! rotation, every webhook rejection, replay across instances, rate limits with
//! `Retry-After`, the audit trail, hardening headers, CORS, and the narrow
//! database role on a real PostgreSQL.

mod support;

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use serde_json::json;
use support::redis::RedisServer;
use support::{Backend, TestEnv, send};
use vm_webapp::config::Secret;
use vm_webapp::http::webhooks::sign;
use vm_webapp::http::{AppState, router};
use vm_webapp::model::now_ms;
use vm_webapp::redis_bus::RedisBus;

const OLD: &str = "old-key-0123456789abcdef";
const NEW: &str = "new-key-0123456789abcdef";
const OPS: &str = "ops-key-0123456789abcdef";
const KEYS: &str =
    "old:old-key-0123456789abcdef,new:new-key-0123456789abcdef,ops:ops-key-0123456789abcdef:admin";
const GH_OLD: &str = "gh-secret-old-0123456789";
const GH_NEW: &str = "gh-secret-new-0123456789";
const HELLO: &str = r#"{"steps":[{"kind":"template","template":"hi"}]}"#;

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Sends a signed webhook.
async fn deliver(
    app: &Router,
    source: &str,
    secret: &str,
    ts: i64,
    nonce: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> support::Reply {
    let ts = ts.to_string();
    let sig = sign(secret.as_bytes(), &ts, nonce, body.as_bytes());
    let mut headers: Vec<(&str, &str)> = vec![
        ("x-vm-timestamp", &ts),
        ("x-vm-nonce", nonce),
        ("x-vm-signature", &sig),
    ];
    headers.extend_from_slice(extra);
    send(
        app,
        "POST",
        &format!("/api/v2/webhooks/{source}"),
        Some(body),
        &headers,
    )
    .await
}

fn now_s() -> i64 {
    now_ms() / 1000
}

#[tokio::test]
async fn two_keys_work_at_once_so_keys_rotate_without_downtime_and_the_key_id_is_the_actor() {
    let env = TestEnv::new(Backend::Sqlite, &[("VM_API_KEYS", KEYS)]).await;
    let app = env.router();
    for key in [OLD, NEW] {
        let auth = bearer(key);
        let created = send(
            &app,
            "POST",
            "/api/v2/runs",
            Some(HELLO),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(created.status, StatusCode::ACCEPTED, "{}", created.body);
    }
    let listed = send(&app, "GET", "/api/v2/runs", None, &[("x-api-key", NEW)]).await;
    // Each key is its own tenant: NEW sees the one run it created.
    assert_eq!(listed.body["runs"].as_array().map(Vec::len), Some(1));
    assert_eq!(listed.status, StatusCode::OK);
    // Two different keys in one request (in the two headers, or in one
    // repeated): refused whichever is valid, and nothing is created; the
    // same key in both is that key.
    let new_bearer = bearer(NEW);
    for headers in [
        [
            ("authorization", new_bearer.as_str()),
            ("x-api-key", "not-the-same-key-0123"),
        ],
        [
            ("authorization", "Bearer not-the-same-key-0123"),
            ("x-api-key", NEW),
        ],
        // One header repeated: it was read as its first value.
        [
            ("authorization", new_bearer.as_str()),
            ("authorization", "Bearer not-the-same-key-0123"),
        ],
        [("x-api-key", NEW), ("x-api-key", "not-the-same-key-0123")],
    ] {
        let refused = send(&app, "POST", "/api/v2/runs", Some(HELLO), &headers).await;
        assert_eq!(
            (refused.status, refused.body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "{headers:?}: {}",
            refused.body
        );
        assert!(
            refused.body["message"]
                .as_str()
                .is_some_and(|m| m.contains("two different keys") && !m.contains(NEW)),
            "{}",
            refused.body
        );
    }
    let both = send(
        &app,
        "GET",
        "/api/v2/runs",
        None,
        &[("authorization", new_bearer.as_str()), ("x-api-key", NEW)],
    )
    .await;
    assert_eq!(both.status, StatusCode::OK);
    assert_eq!(
        listed.body["runs"].as_array().map(Vec::len),
        both.body["runs"].as_array().map(Vec::len),
        "the refused requests created nothing"
    );

    let missing = send(&app, "GET", "/api/v2/runs", None, &[]).await;
    assert_eq!(
        (missing.status, missing.body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    assert_eq!(missing.headers["www-authenticate"], "Bearer");
    let wrong = send(
        &app,
        "GET",
        "/api/v2/runs",
        None,
        &[("authorization", "Bearer old-key-0123456789abcdeX")],
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(
        !wrong.body.to_string().contains("old-key"),
        "the key is never echoed"
    );

    // Probes, metrics and the document stay open for Kubernetes and Prometheus.
    for uri in [
        "/api/v2/health/live",
        "/api/v2/health/ready",
        "/api/v2/openapi.json",
    ] {
        assert_eq!(
            send(&app, "GET", uri, None, &[]).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
    assert_eq!(
        support::send_raw(&app, "GET", "/metrics", None).await,
        StatusCode::OK
    );

    let audit = env
        .store
        .list_audit(&vm_webapp::store::security::AuditFilter {
            action: Some("run.created".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("audit");
    let actors: Vec<&str> = audit.iter().map(|e| e.actor.as_str()).collect();
    assert_eq!(actors, ["new", "old"]);
    assert!(
        audit
            .iter()
            .all(|e| e.request_id.is_some() && e.target.is_some())
    );
}

#[tokio::test]
async fn every_webhook_rejection_has_its_status_and_code_and_an_accepted_delivery_starts_a_run() {
    let env = TestEnv::new(
        Backend::Sqlite,
        &[
            (
                "VM_WEBHOOK_SECRETS",
                "github:gh-secret-old-0123456789,github:gh-secret-new-0123456789",
            ),
            ("VM_WEBHOOK_ALLOWED_CIDRS", "10.0.0.0/8"),
            ("VM_TRUSTED_PROXY_HEADER", "x-forwarded-for"),
        ],
    )
    .await;
    let app = env.router();
    let inside = [("x-forwarded-for", "203.0.113.9, 10.1.2.3")];
    let run_body = r#"{"run":{"input":{"who":"hook"},"steps":[{"kind":"template","template":"from {{input.who}}"}]}}"#;

    let unknown = deliver(&app, "gitlab", GH_NEW, now_s(), "nonce-0001", "{}", &inside).await;
    assert_eq!(
        (unknown.status, unknown.body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_webhook_source"))
    );
    // The proxy header's last entry is what our proxy saw; an earlier,
    // client-supplied entry in the allowed range does not help.
    let outside = deliver(
        &app,
        "github",
        GH_NEW,
        now_s(),
        "nonce-0002",
        "{}",
        &[("x-forwarded-for", "10.9.9.9, 198.51.100.7")],
    )
    .await;
    assert_eq!(
        (outside.status, outside.body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("address_not_allowed"))
    );
    let unsigned = send(&app, "POST", "/api/v2/webhooks/github", Some("{}"), &inside).await;
    assert_eq!(
        (unsigned.status, unsigned.body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_signature"))
    );
    let stale = deliver(
        &app,
        "github",
        GH_NEW,
        now_s() - 301,
        "nonce-0003",
        "{}",
        &inside,
    )
    .await;
    assert_eq!(
        (stale.status, stale.body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("stale_timestamp"))
    );
    let future = deliver(
        &app,
        "github",
        GH_NEW,
        now_s() + 301,
        "nonce-0004",
        "{}",
        &inside,
    )
    .await;
    assert_eq!(future.body["code"], "stale_timestamp");
    let forged = deliver(
        &app,
        "github",
        "not-the-secret-0123456",
        now_s(),
        "nonce-0005",
        "{}",
        &inside,
    )
    .await;
    assert_eq!(
        (forged.status, forged.body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_signature"))
    );

    // Both secrets are valid while the source rotates.
    let accepted = deliver(
        &app,
        "github",
        GH_OLD,
        now_s(),
        "nonce-0006",
        run_body,
        &inside,
    )
    .await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.body);
    let run_id: uuid::Uuid = accepted.body["run_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("run started");
    assert!(env.store.get_run(run_id).await.expect("get").is_some());
    let also = deliver(
        &app,
        "github",
        GH_NEW,
        now_s(),
        "nonce-0007",
        "{\"event\":\"ping\"}",
        &inside,
    )
    .await;
    assert_eq!(also.status, StatusCode::ACCEPTED);
    assert!(also.body["run_id"].is_null());

    let replay = deliver(
        &app,
        "github",
        GH_OLD,
        now_s(),
        "nonce-0006",
        run_body,
        &inside,
    )
    .await;
    assert_eq!(
        (replay.status, replay.body["code"].as_str()),
        (StatusCode::CONFLICT, Some("replayed_nonce"))
    );
    // A forged delivery cannot burn a fresh nonce: the real one still goes through.
    let burned = deliver(
        &app,
        "github",
        "not-the-secret-0123456",
        now_s(),
        "nonce-0008",
        "{}",
        &inside,
    )
    .await;
    assert_eq!(burned.status, StatusCode::UNAUTHORIZED);
    let real = deliver(&app, "github", GH_NEW, now_s(), "nonce-0008", "{}", &inside).await;
    assert_eq!(real.status, StatusCode::ACCEPTED);

    let audit = env
        .store
        .list_audit(&vm_webapp::store::security::AuditFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("audit");
    let mut outcomes: Vec<(String, String)> = audit
        .iter()
        .filter(|e| e.action.starts_with("webhook."))
        .map(|e| (e.action.clone(), e.outcome.clone()))
        .collect();
    outcomes.reverse();
    let expected: Vec<(String, String)> = [
        ("webhook.rejected", "unknown_webhook_source"),
        ("webhook.rejected", "address_not_allowed"),
        ("webhook.rejected", "missing_signature"),
        ("webhook.rejected", "stale_timestamp"),
        ("webhook.rejected", "stale_timestamp"),
        ("webhook.rejected", "invalid_signature"),
        ("webhook.accepted", "success"),
        ("webhook.accepted", "success"),
        ("webhook.rejected", "replayed_nonce"),
        ("webhook.rejected", "invalid_signature"),
        ("webhook.accepted", "success"),
    ]
    .iter()
    .map(|(a, o)| (a.to_string(), o.to_string()))
    .collect();
    assert_eq!(outcomes, expected);
    assert!(
        audit
            .iter()
            .any(|e| e.action == "run.created" && e.actor == "webhook:github")
    );
    assert!(!audit.iter().any(|e| format!("{e:?}").contains("gh-secret")));
}

fn with_redis(env: &TestEnv, redis: &RedisServer) -> AppState {
    let mut state = env.state();
    state.redis =
        Some(RedisBus::new(&Secret::new(redis.url()), state.metrics.clone()).expect("bus"));
    state
}

#[tokio::test]
async fn a_nonce_replayed_to_another_instance_is_caught_through_redis_or_the_shared_database() {
    let vars = [("VM_WEBHOOK_SECRETS", "github:gh-secret-new-0123456789")];
    // Two instances with separate databases: only Redis can tell them apart.
    let redis = RedisServer::start();
    let a = TestEnv::new(Backend::Sqlite, &vars).await;
    let b = TestEnv::new(Backend::Sqlite, &vars).await;
    let (app_a, app_b) = (
        router(with_redis(&a, &redis)),
        router(with_redis(&b, &redis)),
    );
    let first = deliver(
        &app_a,
        "github",
        GH_NEW,
        now_s(),
        "shared-nonce-1",
        "{}",
        &[],
    )
    .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let again = deliver(
        &app_b,
        "github",
        GH_NEW,
        now_s(),
        "shared-nonce-1",
        "{}",
        &[],
    )
    .await;
    assert_eq!(again.body["code"], "replayed_nonce");

    // Without Redis, instances sharing one database catch it there.
    let shared = TestEnv::new(Backend::Postgres, &vars).await;
    let (one, two) = (shared.router(), router(shared.state()));
    assert_eq!(
        deliver(&one, "github", GH_NEW, now_s(), "shared-nonce-2", "{}", &[])
            .await
            .status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        deliver(&two, "github", GH_NEW, now_s(), "shared-nonce-2", "{}", &[])
            .await
            .body["code"],
        "replayed_nonce"
    );
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_per_key_and_per_address_but_never_on_probes() {
    let env = TestEnv::new(
        Backend::Sqlite,
        &[
            ("VM_API_KEYS", KEYS),
            ("VM_RATE_LIMIT_KEY_RPS", "1"),
            ("VM_RATE_LIMIT_KEY_BURST", "3"),
            ("VM_RATE_LIMIT_IP_RPS", "1"),
            ("VM_RATE_LIMIT_IP_BURST", "5"),
            ("VM_TRUSTED_PROXY_HEADER", "x-forwarded-for"),
        ],
    )
    .await;
    let app = env.router();
    let old = bearer(OLD);
    let new = bearer(NEW);
    for i in 0..3 {
        let ok = send(
            &app,
            "GET",
            "/api/v2/runs",
            None,
            &[
                ("authorization", &old),
                ("x-forwarded-for", &format!("10.0.0.{i}")),
            ],
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK, "request {i}");
    }
    let limited = send(
        &app,
        "GET",
        "/api/v2/runs",
        None,
        &[("authorization", &old), ("x-forwarded-for", "10.0.0.9")],
    )
    .await;
    assert_eq!(
        (limited.status, limited.body["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=2).contains(&retry), "{retry}");
    let other_key = send(
        &app,
        "GET",
        "/api/v2/runs",
        None,
        &[("authorization", &new), ("x-forwarded-for", "10.0.0.10")],
    )
    .await;
    assert_eq!(other_key.status, StatusCode::OK, "buckets are per key");

    // One address, many guesses: limited before the key is even checked.
    let mut codes = Vec::new();
    for _ in 0..7 {
        let r = send(
            &app,
            "GET",
            "/api/v2/runs",
            None,
            &[
                ("authorization", "Bearer guess-0123456789abcdef"),
                ("x-forwarded-for", "192.0.2.1"),
            ],
        )
        .await;
        codes.push(r.status.as_u16());
    }
    assert_eq!(codes, [401, 401, 401, 401, 401, 429, 429]);

    for _ in 0..200 {
        assert_eq!(
            send(
                &app,
                "GET",
                "/api/v2/health/live",
                None,
                &[("x-forwarded-for", "192.0.2.1")]
            )
            .await
            .status,
            StatusCode::OK
        );
    }
    assert_eq!(
        support::send_raw(&app, "GET", "/metrics", None).await,
        StatusCode::OK
    );
    let metrics = support::get_text(&app, "/metrics").await;
    assert!(
        metrics.contains(r#"vm_rate_limited_total{reason="key"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"vm_rate_limited_total{reason="address"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"vm_auth_failures_total{reason="invalid"} 5"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn replicas_share_one_bucket_through_redis() {
    let redis = RedisServer::start();
    let vars = [
        ("VM_API_KEYS", KEYS),
        ("VM_RATE_LIMIT_KEY_RPS", "1"),
        ("VM_RATE_LIMIT_KEY_BURST", "4"),
    ];
    let a = TestEnv::new(Backend::Sqlite, &vars).await;
    let b = TestEnv::new(Backend::Sqlite, &vars).await;
    let (app_a, app_b) = (
        router(with_redis(&a, &redis)),
        router(with_redis(&b, &redis)),
    );
    let auth = bearer(OLD);
    let mut codes = Vec::new();
    for i in 0..6 {
        let app = if i % 2 == 0 { &app_a } else { &app_b };
        codes.push(
            send(
                app,
                "GET",
                "/api/v2/runs",
                None,
                &[("authorization", &auth)],
            )
            .await
            .status
            .as_u16(),
        );
    }
    assert_eq!(
        codes,
        [200, 200, 200, 200, 429, 429],
        "one bucket of 4 for both replicas"
    );
    // Redis gone: each replica limits on its own rather than not at all.
    redis.stop();
    let r = send(
        &app_a,
        "GET",
        "/api/v2/runs",
        None,
        &[("authorization", &bearer(NEW))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn the_audit_trail_records_each_action_and_only_admin_keys_read_it() {
    let env = TestEnv::new(Backend::Postgres, &[("VM_API_KEYS", KEYS)]).await;
    let state = env.state();
    let app = router(state.clone());
    let old = bearer(OLD);
    let ops = bearer(OPS);
    let created = send(
        &app,
        "POST",
        "/api/v2/runs",
        Some(HELLO),
        &[("authorization", &old), ("x-request-id", "req-create-1")],
    )
    .await;
    let id = created.body["id"].as_str().expect("id").to_string();
    let cancelled = send(
        &app,
        "POST",
        &format!("/api/v2/runs/{id}/cancel"),
        None,
        &[("authorization", &old), ("x-request-id", "req-cancel-1")],
    )
    .await;
    assert_eq!(cancelled.status, StatusCode::OK);
    for _ in 0..3 {
        send(
            &app,
            "GET",
            "/api/v2/runs",
            None,
            &[("authorization", "Bearer nope-0123456789abcdef")],
        )
        .await;
    }
    assert_eq!(state.auth_failures.flush(&state).await, 3);
    assert_eq!(state.auth_failures.flush(&state).await, 0, "counted once");

    let denied = send(
        &app,
        "GET",
        "/api/v2/audit",
        None,
        &[("authorization", &old)],
    )
    .await;
    assert_eq!(
        (denied.status, denied.body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let all = send(
        &app,
        "GET",
        "/api/v2/audit",
        None,
        &[("authorization", &ops)],
    )
    .await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    let entries = all.body["entries"].as_array().expect("entries");
    let summary: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or(""),
                e["actor"].as_str().unwrap_or(""),
                e["outcome"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("auth.failed", "unknown", "denied"),
            ("run.cancelled", "old", "success"),
            ("run.created", "old", "success")
        ]
    );
    assert_eq!(entries[0]["detail"], json!({"count": 3}).to_string());
    assert_eq!(entries[1]["request_id"], "req-cancel-1");
    assert_eq!(entries[1]["target"], id.as_str());
    let filtered = send(
        &app,
        "GET",
        "/api/v2/audit?action=run.created&limit=1",
        None,
        &[("authorization", &ops)],
    )
    .await;
    assert_eq!(filtered.body["entries"].as_array().map(Vec::len), Some(1));
    assert!(filtered.body["next_cursor"].is_null());
    let paged = send(
        &app,
        "GET",
        "/api/v2/audit?limit=1",
        None,
        &[("authorization", &ops)],
    )
    .await;
    let cursor = paged.body["next_cursor"]
        .as_str()
        .expect("more pages")
        .to_string();
    let next = send(
        &app,
        "GET",
        &format!("/api/v2/audit?limit=1&cursor={cursor}"),
        None,
        &[("authorization", &ops)],
    )
    .await;
    assert_eq!(next.body["entries"][0]["action"], "run.cancelled");
}

#[tokio::test]
async fn responses_carry_security_headers_and_cors_answers_only_configured_origins() {
    let env = TestEnv::new(
        Backend::Sqlite,
        &[("VM_CORS_ALLOWED_ORIGINS", "https://app.example.com")],
    )
    .await;
    let app = env.router();
    for uri in [
        "/api/v2/health/live",
        "/api/v2/runs/nope",
        "/api/v2/nowhere",
    ] {
        let r = send(
            &app,
            "GET",
            uri,
            None,
            &[("origin", "https://app.example.com")],
        )
        .await;
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{uri}");
        assert_eq!(r.headers["x-frame-options"], "DENY");
        assert_eq!(r.headers["cache-control"], "no-store");
        assert!(r.headers.contains_key("content-security-policy"));
        assert_eq!(
            r.headers["access-control-allow-origin"],
            "https://app.example.com"
        );
    }
    let foreign = send(
        &app,
        "GET",
        "/api/v2/health/live",
        None,
        &[("origin", "https://evil.example")],
    )
    .await;
    assert!(!foreign.headers.contains_key("access-control-allow-origin"));

    let closed = TestEnv::new(Backend::Sqlite, &[]).await.router();
    let r = send(
        &closed,
        "GET",
        "/api/v2/health/live",
        None,
        &[("origin", "https://app.example.com")],
    )
    .await;
    assert!(
        !r.headers.contains_key("access-control-allow-origin"),
        "CORS is off unless configured"
    );

    let many: Vec<(String, String)> = (0..120)
        .map(|i| (format!("x-h-{i}"), "v".to_string()))
        .collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let too_many = send(&closed, "GET", "/api/v2/runs", None, &refs).await;
    assert_eq!(
        (too_many.status, too_many.body["code"].as_str()),
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Some("headers_too_large")
        )
    );
}

/// `migrate` is documented as safe to run concurrently (two migration Jobs
/// of a rollout, a Job retried beside its predecessor). Its grants to the
/// runtime role were not: PostgreSQL refuses a GRANT on an ACL another
/// transaction is changing ("tuple concurrently updated"), and two or three
/// of four concurrent runs exited 1 with "cannot grant the runtime role its
/// rights: database error".
#[tokio::test]
async fn concurrent_migrations_that_grant_the_runtime_role_all_succeed() {
    use sqlx::Connection;
    let server = tokio::task::spawn_blocking(support::pg::shared)
        .await
        .expect("postgres");
    let db = format!("t_grants_{}", uuid::Uuid::new_v4().simple());
    let suffix = &db[9..17];
    let mut admin = sqlx::PgConnection::connect(&server.url("postgres"))
        .await
        .expect("connect");
    for sql in [
        format!("CREATE ROLE vm_gowner_{suffix} LOGIN PASSWORD 'owner-pw'"),
        format!("CREATE ROLE vm_gruntime_{suffix} LOGIN PASSWORD 'runtime-pw'"),
        format!("CREATE DATABASE {db} OWNER vm_gowner_{suffix}"),
    ] {
        sqlx::query(&sql).execute(&mut admin).await.expect("setup");
    }
    let owner_url = format!(
        "postgres://vm_gowner_{suffix}:owner-pw@127.0.0.1:{}/{db}",
        server.port
    );
    let role = format!("vm_gruntime_{suffix}");
    let migrate = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_vm-webapp"))
            .arg("migrate")
            .env_clear()
            .envs([
                ("APP_ENV", "staging"),
                ("VM_DB_URL", owner_url.as_str()),
                ("VM_RUNTIME_DB_ROLE", role.as_str()),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run migrate")
    };
    // The schema first, so that the concurrent runs below meet only in
    // their grants (where they failed) and not in the migrator's lock.
    let first = migrate().wait_with_output().expect("migrate");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for round in 0..3 {
        let runs: Vec<_> = (0..6).map(|_| migrate()).collect();
        for run in runs {
            let out = run.wait_with_output().expect("migrate");
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Without the grants, a compromised runtime could rewrite history or the schema.
#[tokio::test]
async fn the_runtime_role_works_but_cannot_change_the_schema_or_rewrite_the_audit_trail() {
    use sqlx::Connection;
    let server = tokio::task::spawn_blocking(support::pg::shared)
        .await
        .expect("postgres");
    let db = format!("t_roles_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&server.url("postgres"))
        .await
        .expect("connect");
    for sql in [
        format!(
            "CREATE ROLE vm_owner_{0} LOGIN PASSWORD 'owner-pw'",
            &db[8..16]
        ),
        format!(
            "CREATE ROLE vm_runtime_{0} LOGIN PASSWORD 'runtime-pw'",
            &db[8..16]
        ),
        format!("CREATE DATABASE {db} OWNER vm_owner_{0}", &db[8..16]),
    ] {
        sqlx::query(&sql).execute(&mut admin).await.expect("setup");
    }
    let suffix = &db[8..16];
    let owner_url = format!(
        "postgres://vm_owner_{suffix}:owner-pw@127.0.0.1:{}/{db}",
        server.port
    );
    let runtime_url = format!(
        "postgres://vm_runtime_{suffix}:runtime-pw@127.0.0.1:{}/{db}",
        server.port
    );

    // `vm-webapp migrate` as an operator runs it: owner URL for DDL, grants for the runtime.
    let role = format!("vm_runtime_{suffix}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vm-webapp"))
        .arg("migrate")
        .env_clear()
        .envs([
            ("APP_ENV", "staging"),
            ("VM_DB_URL", runtime_url.as_str()),
            ("VM_MIGRATION_DB_URL", owner_url.as_str()),
            ("VM_RUNTIME_DB_ROLE", role.as_str()),
        ])
        .output()
        .expect("run migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let env = TestEnv::at_unmigrated(
        runtime_url.clone(),
        &[
            ("APP_ENV", "staging"),
            ("VM_WEBHOOK_SECRETS", "github:gh-secret-new-0123456789"),
        ],
    )
    .await;
    env.store
        .ensure_schema()
        .await
        .expect("the runtime can read the migration history");
    let app = env.router();
    let created = send(&app, "POST", "/api/v2/runs", Some(HELLO), &[]).await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{}", created.body);
    let (worker, stop) = env.spawn_worker(1, vm_webapp::steps::llm::LlmBackend::Offline);
    let id = created.body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    env.wait_for(
        id,
        vm_webapp::model::RunStatus::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    stop.cancel();
    worker.await.expect("worker");

    let mut runtime = sqlx::PgConnection::connect(&runtime_url)
        .await
        .expect("runtime connects");
    for forbidden in [
        "CREATE TABLE evil (id int)",
        "ALTER TABLE runs ADD COLUMN evil int",
        "DROP TABLE jobs",
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        // The usage ledger and plan history are append-only like the audit trail.
        "UPDATE usage_ledger SET quantity = 0",
        "DELETE FROM usage_ledger",
        "DELETE FROM tenant_plan_changes",
    ] {
        let err = sqlx::query(forbidden)
            .execute(&mut runtime)
            .await
            .expect_err(forbidden);
        assert!(
            err.to_string().contains("permission denied")
                || err.to_string().contains("must be owner"),
            "{forbidden}: {err}"
        );
    }
    // Replay detection works with the runtime's rights (it updates nonces).
    let first = deliver(&app, "github", GH_NEW, now_s(), "role-nonce-1", "{}", &[]).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let replay = deliver(&app, "github", GH_NEW, now_s(), "role-nonce-1", "{}", &[]).await;
    assert_eq!(replay.body["code"], "replayed_nonce", "{}", replay.body);
    let rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'run.created'")
            .fetch_one(&mut runtime)
            .await
            .expect("read audit");
    assert_eq!(rows, 1, "the run creation was audited by the runtime role");
    let metered: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM usage_ledger WHERE meter IN ('runs', 'steps')")
            .fetch_one(&mut runtime)
            .await
            .expect("read the usage ledger");
    assert_eq!(
        metered, 2,
        "the run and its step were metered by the runtime role"
    );
}

#[tokio::test]
async fn a_request_that_outlives_the_timeout_gets_408_request_timeout() {
    use axum::middleware::from_fn_with_state;
    use axum::routing::get;
    let env = TestEnv::new(Backend::Sqlite, &[("VM_REQUEST_TIMEOUT_MS", "100")]).await;
    let state = env.state();
    let slow = Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                "late"
            }),
        )
        .route("/fast", get(|| async { axum::Json(json!({"ok": true})) }))
        .layer(from_fn_with_state(
            state.clone(),
            vm_webapp::http::security::harden,
        ))
        .with_state(state);
    let started = std::time::Instant::now();
    let r = send(&slow, "GET", "/slow", None, &[]).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::REQUEST_TIMEOUT, Some("request_timeout"))
    );
    assert!(started.elapsed() < Duration::from_millis(800));
    assert_eq!(
        send(&slow, "GET", "/fast", None, &[]).await.status,
        StatusCode::OK
    );
}

/// A handler whose write was claimed before the deadline (the store is
/// committing it) is answered with its outcome, not 408, even when that
/// comes after the deadline: a 408 would tell the client nothing was done.
/// A handler that claims nothing still gets its 408 on time, and a claim
/// that comes after the 408 is refused.
#[tokio::test]
async fn a_request_whose_write_is_committing_is_answered_with_its_outcome_not_408() {
    use axum::middleware::from_fn_with_state;
    use axum::routing::get;
    use vm_webapp::deadline::Deadline;
    let env = TestEnv::new(Backend::Sqlite, &[("VM_REQUEST_TIMEOUT_MS", "200")]).await;
    let state = env.state();
    let (late_claim, claimed_late) = tokio::sync::oneshot::channel::<bool>();
    let late_claim = std::sync::Arc::new(std::sync::Mutex::new(Some(late_claim)));
    let app = Router::new()
        .route(
            "/claimed",
            get(|| async {
                let deadline = Deadline::current().expect("a deadline");
                assert!(deadline.claim());
                tokio::time::sleep(Duration::from_millis(400)).await;
                axum::Json(json!({"committed": true}))
            }),
        )
        .route(
            "/unclaimed",
            get(move || {
                let late_claim = late_claim.clone();
                async move {
                    let deadline = Deadline::current().expect("a deadline");
                    // Past the deadline, from a task of its own (as the store's
                    // writer is): the request was answered 408 meanwhile.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        if let Some(tell) = late_claim.lock().expect("lock").take() {
                            let _ = tell.send(deadline.claim());
                        }
                    });
                    tokio::time::sleep(Duration::from_millis(1_000)).await;
                    "late"
                }
            }),
        )
        .layer(from_fn_with_state(
            state.clone(),
            vm_webapp::http::security::harden,
        ))
        .with_state(state);
    let started = std::time::Instant::now();
    let r = send(&app, "GET", "/claimed", None, &[]).await;
    assert_eq!(
        (r.status, r.body["committed"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    let started = std::time::Instant::now();
    let r = send(&app, "GET", "/unclaimed", None, &[]).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::REQUEST_TIMEOUT, Some("request_timeout"))
    );
    assert!(started.elapsed() < Duration::from_millis(400));
    assert_eq!(
        claimed_late.await,
        Ok(false),
        "a claim after the 408 is refused"
    );
}

/// Without this, a delivery refused during a rollout would spend its nonce
/// and the sender's retry would be refused as a replay.
#[tokio::test]
async fn a_delivery_refused_during_shutdown_is_accepted_when_retried_elsewhere() {
    let env = TestEnv::new(
        Backend::Postgres,
        &[("VM_WEBHOOK_SECRETS", "github:gh-secret-new-0123456789")],
    )
    .await;
    let draining = env.state();
    draining
        .shutting_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let body = r#"{"run":{"steps":[{"kind":"template","template":"hi"}]}}"#;
    let ts = now_s();
    let refused = deliver(
        &router(draining),
        "github",
        GH_NEW,
        ts,
        "rollout-nonce-1",
        body,
        &[],
    )
    .await;
    assert_eq!(
        (refused.status, refused.body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down"))
    );
    let retried = deliver(
        &env.router(),
        "github",
        GH_NEW,
        ts,
        "rollout-nonce-1",
        body,
        &[],
    )
    .await;
    assert_eq!(retried.status, StatusCode::ACCEPTED, "{}", retried.body);
    assert!(retried.body["run_id"].is_string());
    // An invalid run is refused before the nonce is spent, too.
    let bad = deliver(
        &env.router(),
        "github",
        GH_NEW,
        ts,
        "rollout-nonce-2",
        r#"{"run":{"steps":[{"kind":"nope"}]}}"#,
        &[],
    )
    .await;
    assert_eq!(bad.body["code"], "unknown_step_kind");
    let fixed = deliver(
        &env.router(),
        "github",
        GH_NEW,
        ts,
        "rollout-nonce-2",
        body,
        &[],
    )
    .await;
    assert_eq!(fixed.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn an_absurd_timestamp_is_stale_not_a_panic() {
    let env = TestEnv::new(
        Backend::Sqlite,
        &[("VM_WEBHOOK_SECRETS", "github:gh-secret-new-0123456789")],
    )
    .await;
    for ts in [i64::MIN, i64::MAX, 0] {
        let r = deliver(
            &env.router(),
            "github",
            GH_NEW,
            ts,
            "absurd-nonce",
            "{}",
            &[],
        )
        .await;
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("stale_timestamp")),
            "{ts}"
        );
    }
}

#[tokio::test]
async fn without_keys_only_local_mode_may_read_the_audit_trail() {
    let local = TestEnv::new(Backend::Sqlite, &[]).await;
    assert_eq!(
        send(&local.router(), "GET", "/api/v2/audit", None, &[])
            .await
            .status,
        StatusCode::OK
    );
    let staging = TestEnv::new(Backend::Sqlite, &[("APP_ENV", "staging")]).await;
    let r = send(&staging.router(), "GET", "/api/v2/audit", None, &[]).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
}

/// A hung Redis (connections open, no answers) must cost requests at most one
/// short timeout, then be skipped, and never hold readiness past its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_skipped_quickly_and_never_decides_readiness() {
    let redis = RedisServer::start();
    let env = TestEnv::new(Backend::Sqlite, &[("VM_API_KEYS", KEYS)]).await;
    let state = with_redis(&env, &redis);
    let app = router(state);
    let auth = bearer(OLD);
    assert_eq!(
        send(
            &app,
            "GET",
            "/api/v2/runs",
            None,
            &[("authorization", &auth)]
        )
        .await
        .status,
        StatusCode::OK
    );
    redis.pause();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (app, auth) = (app.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            send(
                &app,
                "GET",
                "/api/v2/runs",
                None,
                &[("authorization", &auth)],
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.expect("task"),
            StatusCode::OK,
            "limits fall back to this process"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let ready = send(&app, "GET", "/api/v2/health/ready", None, &[]).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.body["dependencies"]["redis"]["status"], "error");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "readiness took {:?}",
        started.elapsed()
    );
    redis.resume();
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_caller() {
    let env = TestEnv::new(Backend::Sqlite, &[("VM_API_KEYS", KEYS)]).await;
    let app = env.router();
    let (old, new) = (bearer(OLD), bearer(NEW));
    let a = send(
        &app,
        "POST",
        "/api/v2/runs",
        Some(HELLO),
        &[("authorization", &old), ("idempotency-key", "same")],
    )
    .await;
    let b = send(
        &app,
        "POST",
        "/api/v2/runs",
        Some(HELLO),
        &[("authorization", &new), ("idempotency-key", "same")],
    )
    .await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_ne!(
        a.body["id"], b.body["id"],
        "another caller's key does not replay my run"
    );
    let again = send(
        &app,
        "POST",
        "/api/v2/runs",
        Some(HELLO),
        &[("authorization", &old), ("idempotency-key", "same")],
    )
    .await;
    assert_eq!(
        (again.status, &again.body["id"]),
        (StatusCode::OK, &a.body["id"])
    );
}

/// A request whose header values are raw bytes (not visible ASCII allowed).
async fn send_bytes(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
    headers: &[(&str, &[u8])],
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        req = req.header(
            *name,
            axum::http::HeaderValue::from_bytes(value).expect("header bytes"),
        );
    }
    let req = req
        .body(axum::body::Body::from(body.unwrap_or("").to_string()))
        .expect("request");
    let res = app.clone().oneshot(req).await.expect("router answers");
    let (status, headers) = (res.status(), res.headers().clone());
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, headers, value)
}

/// Kind (issue 11): a header the app reads that is present but unreadable is
/// `invalid_*`, never `missing_*` and never silently ignored. One case per
/// header the app reads: the webhook signature headers, the API key headers,
/// `x-request-id`, `x-correlation-id`, `Idempotency-Key` and the trusted
/// proxy header. Without it, a sender with a mangled header is told to add a
/// header it already sends.
#[tokio::test]
async fn every_header_present_but_unreadable_is_invalid_not_missing() {
    let env = TestEnv::new(
        Backend::Sqlite,
        &[
            ("VM_API_KEYS", KEYS),
            ("VM_WEBHOOK_SECRETS", "github:gh-secret-new-0123456789"),
            ("VM_TRUSTED_PROXY_HEADER", "x-forwarded-for"),
        ],
    )
    .await;
    let app = env.router();
    let ts = now_s().to_string();
    let good_sig = sign(GH_NEW.as_bytes(), &ts, "nonce-0101", b"{}");
    let webhook = |ts: &[u8], nonce: &[u8], sig: Vec<u8>| {
        let (ts, nonce) = (ts.to_vec(), nonce.to_vec());
        let app = app.clone();
        async move {
            send_bytes(
                &app,
                "POST",
                "/api/v2/webhooks/github",
                Some("{}"),
                &[
                    ("x-vm-timestamp", &ts),
                    ("x-vm-nonce", &nonce),
                    ("x-vm-signature", &sig),
                ],
            )
            .await
        }
    };
    let ts_bytes = ts.as_bytes();
    for (case, (status, _, body), code) in [
        (
            "non-ASCII signature",
            webhook(ts_bytes, b"nonce-0101", b"sha256=\xc3\xa9".to_vec()).await,
            "invalid_signature",
        ),
        (
            "non-ASCII timestamp",
            webhook(b"17\xff", b"nonce-0101", good_sig.clone().into_bytes()).await,
            "invalid_timestamp",
        ),
        (
            "timestamp not seconds",
            webhook(b"yesterday", b"nonce-0101", good_sig.clone().into_bytes()).await,
            "invalid_timestamp",
        ),
        (
            "non-ASCII nonce",
            webhook(
                ts_bytes,
                b"nonce-\xe2\x82\xac",
                good_sig.clone().into_bytes(),
            )
            .await,
            "invalid_nonce",
        ),
        (
            "short nonce",
            webhook(ts_bytes, b"n1", good_sig.clone().into_bytes()).await,
            "invalid_nonce",
        ),
    ] {
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some(code)),
            "{case}: {body}"
        );
    }
    // Absent is still missing.
    let (status, _, body) = send_bytes(
        &app,
        "POST",
        "/api/v2/webhooks/github",
        Some("{}"),
        &[
            ("x-vm-timestamp", ts.as_bytes()),
            ("x-vm-nonce", b"nonce-0102"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_signature"))
    );

    // API keys: unreadable is counted as invalid and says so.
    for header in [
        ("authorization", &b"Bearer caf\xc3\xa9-key-0123456789"[..]),
        ("x-api-key", &b"\xff\xfe0123456789abcdef"[..]),
        ("authorization", &b"Basic b2xkOmtleQ=="[..]),
    ] {
        let (status, _, body) = send_bytes(&app, "GET", "/api/v2/runs", None, &[header]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{header:?}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot be read")),
            "{header:?}: {body}"
        );
    }
    let metrics = support::get_text(&app, "/metrics").await;
    assert!(
        metrics.contains(r#"vm_auth_failures_total{reason="invalid"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"vm_auth_failures_total{reason="missing"} 0"#),
        "{metrics}"
    );

    let key: (&str, &[u8]) = ("x-api-key", NEW.as_bytes());
    // x-request-id: refused, and the answer carries a generated id instead.
    let (status, headers, body) = send_bytes(
        &app,
        "GET",
        "/api/v2/runs",
        None,
        &[key, ("x-request-id", b"req-\xc3\xa9")],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request_id")),
        "{body}"
    );
    let echoed = headers["x-request-id"].to_str().expect("ASCII id");
    assert!(uuid::Uuid::parse_str(echoed).is_ok(), "{echoed}");
    // x-correlation-id (refused instead of silently dropped), Idempotency-Key
    // (read by the runs handler), and the trusted proxy header whose last
    // entry is not an address.
    for (method, body, header, code) in [
        (
            "POST",
            Some(HELLO),
            ("x-correlation-id", &b"order 42/\xff"[..]),
            "invalid_correlation_id",
        ),
        (
            "POST",
            Some(HELLO),
            ("idempotency-key", &b"k-\xc3\xa9"[..]),
            "invalid_idempotency_key",
        ),
        (
            "GET",
            None,
            ("x-forwarded-for", &b"10.0.0.1, \xff"[..]),
            "invalid_client_address",
        ),
    ] {
        let (status, _, reply) =
            send_bytes(&app, method, "/api/v2/runs", body, &[key, header]).await;
        assert_eq!(
            (status, reply["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{header:?}: {reply}"
        );
    }
    // Readable values still pass.
    let (status, _, body) = send_bytes(
        &app,
        "POST",
        "/api/v2/runs",
        Some(HELLO),
        &[
            key,
            ("x-request-id", b"req-0001"),
            ("x-correlation-id", b"order-42"),
            ("x-forwarded-for", b"10.0.0.1, 198.51.100.7:5123"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["correlation_id"], "order-42", "{body}");
}

/// Kind (issue 11): 404 and 405 answers count in `vm_http_requests_total`
/// under fixed labels. Without it a flood of 404s never reaches the
/// error-rate SLI; with raw paths or methods as labels, a scanner would
/// create a series per path it tries.
#[tokio::test]
async fn unmatched_routes_and_wrong_methods_are_counted_under_fixed_labels() {
    let env = TestEnv::new(Backend::Sqlite, &[]).await;
    let app = env.router();
    for path in [
        "/wp-admin/setup.php",
        "/api/v2/nothing/here",
        "/api/v2/runs/x/y/z",
    ] {
        let reply = send(&app, "GET", path, None, &[]).await;
        assert_eq!(reply.body["code"], "route_not_found", "{path}");
    }
    let reply = send(&app, "DELETE", "/api/v2/runs", None, &[]).await;
    assert_eq!(reply.body["code"], "method_not_allowed");
    let reply = send(&app, "BREW", "/api/v2/health/live", None, &[]).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    let reply = send(&app, "BREW", "/coffee", None, &[]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);

    let text = support::get_text(&app, "/metrics").await;
    for line in [
        r#"vm_http_requests_total{method="GET",route="unmatched",status_class="4xx"} 3"#,
        r#"vm_http_requests_total{method="DELETE",route="/api/v2/runs",status_class="4xx"} 1"#,
        r#"vm_http_requests_total{method="other",route="/api/v2/health/live",status_class="4xx"} 1"#,
        r#"vm_http_requests_total{method="other",route="unmatched",status_class="4xx"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    for raw in ["wp-admin", "nothing/here", "x/y/z", "BREW", "coffee"] {
        assert!(!text.contains(raw), "{raw} became a label value:\n{text}");
    }
}
