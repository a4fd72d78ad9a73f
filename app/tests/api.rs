//! The HTTP API through the real router, on SQLite and on PostgreSQL: the run
//! lifecycle, idempotency, pagination, probes, and every client mistake
//! answered with a 4xx and a stable code.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use support::{Backend, TestEnv, create, send};
use vm_webapp::model::RunStatus;
use vm_webapp::steps::llm::LlmBackend;

const HELLO: &str = r#"{"input":{"name":"Ada"},"steps":[{"kind":"template","template":"Hello, {{input.name}}!"},{"kind":"transform","op":"uppercase"}]}"#;

async fn a_run_goes_from_accepted_to_succeeded_with_its_events(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let app = env.router();
    let reply = send(
        &app,
        "POST",
        "/api/v2/runs",
        Some(HELLO),
        &[("x-correlation-id", "order-42")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.body["status"], "queued");
    assert_eq!(reply.body["correlation_id"], "order-42");
    assert_eq!(reply.body["steps"][0]["status"], "queued");
    assert_eq!(reply.body["steps"][1]["status"], "pending");
    let id = reply.body["id"].as_str().expect("id").to_string();
    assert_eq!(
        reply.headers["location"],
        format!("/api/v2/runs/{id}").as_str()
    );

    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    env.wait_for(
        id.parse().expect("uuid"),
        RunStatus::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    stop.cancel();
    worker.await.expect("worker");

    let run = send(&app, "GET", &format!("/api/v2/runs/{id}"), None, &[]).await;
    assert_eq!(run.status, StatusCode::OK);
    assert_eq!(run.body["status"], "succeeded");
    assert_eq!(run.body["output"], "HELLO, ADA!");
    assert_eq!(run.body["steps"][0]["output"], "Hello, Ada!");
    assert_eq!(run.body["steps"][1]["attempts"], 1);
    assert!(run.body["finished_at"].is_string());

    let events = send(&app, "GET", &format!("/api/v2/runs/{id}/events"), None, &[]).await;
    let types: Vec<&str> = events.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        [
            "run.queued",
            "run.started",
            "step.started",
            "step.succeeded",
            "step.started",
            "step.succeeded",
            "run.succeeded"
        ]
    );
    let page = send(
        &app,
        "GET",
        &format!("/api/v2/runs/{id}/events?after=2&limit=2"),
        None,
        &[],
    )
    .await;
    let ids: Vec<i64> = page.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] > 2 && ids[1] > ids[0]);
    assert_eq!(page.body["next_after"], ids[1]);
}

async fn idempotency_key_replays_the_original_run_and_rejects_a_different_body(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let app = env.router();
    let key = [("idempotency-key", "create-order-42")];
    let first = send(&app, "POST", "/api/v2/runs", Some(HELLO), &key).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    // Same content, different key order and whitespace: still the same request.
    let same = r#"{ "steps":[{"template":"Hello, {{input.name}}!","kind":"template"},{"op":"uppercase","kind":"transform"}], "input":{"name":"Ada"} }"#;
    let replay = send(&app, "POST", "/api/v2/runs", Some(same), &key).await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.body["id"], first.body["id"]);
    let other = send(
        &app,
        "POST",
        "/api/v2/runs",
        Some(r#"{"steps":[{"kind":"delay","ms":1}]}"#),
        &key,
    )
    .await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(other.body["code"], "idempotency_key_conflict");
    let list = send(&app, "GET", "/api/v2/runs", None, &[]).await;
    assert_eq!(list.body["runs"].as_array().map(Vec::len), Some(1));
}

/// A client that retries a create after a lost answer follows `Location`
/// to the run; the replay answered 200 without it, so that client had
/// nowhere to go (and the documented header was only on the 202).
async fn an_idempotent_replay_carries_the_location_of_the_original_run(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let app = env.router();
    let key = [("idempotency-key", "retry-after-a-lost-answer")];
    let first = send(&app, "POST", "/api/v2/runs", Some(HELLO), &key).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let location = format!("/api/v2/runs/{}", first.body["id"].as_str().expect("id"));
    assert_eq!(first.headers["location"], location.as_str());
    let replay = send(&app, "POST", "/api/v2/runs", Some(HELLO), &key).await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.headers["location"], location.as_str());
    assert_eq!(
        send(&app, "GET", &location, None, &[]).await.body["id"],
        first.body["id"],
        "the location names the original run"
    );
}

async fn runs_are_listed_newest_first_with_cursor_pages_and_a_status_filter(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let app = env.router();
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(create(&app, HELLO).await.to_string());
    }
    let mut seen = Vec::new();
    let mut uri = "/api/v2/runs?limit=2".to_string();
    loop {
        let page = send(&app, "GET", &uri, None, &[]).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        for run in page.body["runs"].as_array().expect("runs") {
            seen.push(run["id"].as_str().expect("id").to_string());
        }
        match page.body["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/api/v2/runs?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    created.reverse();
    assert_eq!(seen, created, "every run once, newest first");

    let cancel = send(
        &app,
        "POST",
        &format!("/api/v2/runs/{}/cancel", created[0]),
        None,
        &[],
    )
    .await;
    assert_eq!(cancel.status, StatusCode::OK);
    assert_eq!(cancel.body["status"], "cancelled");
    let cancelled = send(&app, "GET", "/api/v2/runs?status=cancelled", None, &[]).await;
    assert_eq!(cancelled.body["runs"].as_array().map(Vec::len), Some(1));
    let queued = send(
        &app,
        "GET",
        "/api/v2/runs?status=queued&limit=10",
        None,
        &[],
    )
    .await;
    assert_eq!(queued.body["runs"].as_array().map(Vec::len), Some(4));
    let again = send(
        &app,
        "POST",
        &format!("/api/v2/runs/{}/cancel", created[0]),
        None,
        &[],
    )
    .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.body["code"], "run_not_cancellable");
}

async fn every_client_mistake_is_a_4xx_with_a_stable_code(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_MAX_BODY_BYTES", "2048")]).await;
    let app = env.router();
    let unknown = uuid::Uuid::now_v7();
    let big = format!(
        r#"{{"steps":[{{"kind":"template","template":"{}"}}]}}"#,
        "x".repeat(4096)
    );
    let long_key = "k".repeat(300);
    // (method, uri, body, headers, expected status, expected code)
    type Case<'a> = (
        &'a str,
        String,
        Option<String>,
        Vec<(&'a str, &'a str)>,
        StatusCode,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/v2/runs".into(),
            Some("{not json".into()),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(String::new()),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some("[1,2]".into()),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(r#"{"input":{}}"#.into()),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(r#"{"steps":[],"extra":1}"#.into()),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(r#"{"steps":{}}"#.into()),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(r#"{"input":[1],"steps":[]}"#.into()),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(r#"{"steps":[]}"#.into()),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_step",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(r#"{"steps":[{"kind":"teleport"}]}"#.into()),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_step_kind",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(r#"{"steps":[{"kind":"llm"}]}"#.into()),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_step",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(r#"{"steps":[{"kind":"delay","ms":-1}]}"#.into()),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_step",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(r#"{"steps":[{"kind":"template","template":"{{input.x"}]}"#.into()),
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_step",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(big),
            vec![],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "POST",
            "/api/v2/runs".into(),
            Some(HELLO.into()),
            vec![("idempotency-key", long_key.as_str())],
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
        ),
        (
            "GET",
            "/api/v2/runs?cursor=bogus".into(),
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
        ),
        (
            "GET",
            "/api/v2/runs?limit=0".into(),
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "GET",
            "/api/v2/runs?limit=abc".into(),
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "GET",
            "/api/v2/runs?status=done".into(),
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "GET",
            "/api/v2/runs?stauts=queued".into(),
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "GET",
            format!("/api/v2/runs/{unknown}"),
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "run_not_found",
        ),
        (
            "GET",
            "/api/v2/runs/not-a-uuid".into(),
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "run_not_found",
        ),
        (
            "GET",
            format!("/api/v2/runs/{unknown}/events"),
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "run_not_found",
        ),
        (
            "GET",
            format!("/api/v2/runs/{unknown}/events?after=-1"),
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "POST",
            format!("/api/v2/runs/{unknown}/cancel"),
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "run_not_found",
        ),
        (
            "GET",
            "/api/v2/nope".into(),
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "route_not_found",
        ),
        (
            "DELETE",
            "/api/v2/runs".into(),
            None,
            vec![],
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (method, uri, body, headers, status, code) in cases {
        let reply = send(&app, method, &uri, body.as_deref(), &headers).await;
        assert_eq!(reply.status, status, "{method} {uri}: {}", reply.body);
        assert_eq!(reply.body["code"], code, "{method} {uri}: {}", reply.body);
        assert!(
            reply.body["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{method} {uri}"
        );
        assert!(reply.headers.contains_key("x-request-id"), "{method} {uri}");
    }
    let list = send(&app, "GET", "/api/v2/runs", None, &[]).await;
    assert_eq!(
        list.body["runs"],
        json!([]),
        "no rejected request created a run"
    );
}

async fn llm_steps_are_refused_when_no_endpoint_is_configured(backend: Backend) {
    let env = TestEnv::new(backend, &[("APP_ENV", "staging")]).await;
    let app = env.router();
    let reply = send(
        &app,
        "POST",
        "/api/v2/runs",
        Some(r#"{"steps":[{"kind":"llm","prompt":"hi"}]}"#),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.body["code"], "llm_unavailable");
    create(&app, HELLO).await;
}

async fn probes_tell_the_truth_and_readiness_flips_on_shutdown(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let mut state = env.state();
    // Heartbeats are stamped and aged by the database clock: a short window
    // lets the test watch one go stale.
    state.worker_stall_after = Duration::from_millis(600);
    let app = vm_webapp::http::router(state.clone());
    let live = send(
        &app,
        "GET",
        "/api/v2/health/live",
        None,
        &[("x-request-id", "probe-1")],
    )
    .await;
    assert_eq!(
        (live.status, live.body.clone()),
        (StatusCode::OK, json!({"status": "live"}))
    );
    assert_eq!(live.headers["x-request-id"], "probe-1");
    let ready = send(&app, "GET", "/api/v2/health/ready", None, &[]).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    assert_eq!(ready.body["status"], "ready");
    assert_eq!(ready.body["dependencies"]["database"]["status"], "ok");
    // No worker anywhere: reported, but the API stays ready (runs are durable).
    assert_eq!(ready.body["dependencies"]["worker"]["status"], "error");
    assert_eq!(ready.body["dependencies"]["redis"]["status"], "disabled");
    env.store.heartbeat("worker-a", 0).await.expect("beat");
    let ready = send(&app, "GET", "/api/v2/health/ready", None, &[]).await;
    assert_eq!(
        ready.body["dependencies"]["worker"]["status"], "ok",
        "{}",
        ready.body
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    let ready = send(&app, "GET", "/api/v2/health/ready", None, &[]).await;
    assert_eq!(
        ready.body["dependencies"]["worker"]["status"], "error",
        "a stale heartbeat is not a live worker"
    );
    assert_eq!(ready.status, StatusCode::OK);

    state.shutting_down.store(true, Ordering::SeqCst);
    let ready = send(&app, "GET", "/api/v2/health/ready", None, &[]).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.body["status"], "not_ready");
    let refused = send(&app, "POST", "/api/v2/runs", Some(HELLO), &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.body["code"], "shutting_down");
    let live = send(&app, "GET", "/api/v2/health/live", None, &[]).await;
    assert_eq!(
        live.status,
        StatusCode::OK,
        "liveness never depends on shutdown or dependencies"
    );
}

async fn the_api_answers_over_real_http(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(axum::serve(listener, env.router()).into_future());
    vm_webapp::install_crypto_provider();
    let client = reqwest::Client::new();
    // Sent exactly as `curl -d` sends it: form content type, JSON body.
    let res = client
        .post(format!("http://{addr}/api/v2/runs"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(HELLO)
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), reqwest::StatusCode::ACCEPTED);
    assert!(res.headers().contains_key("x-request-id"));
    let body: serde_json::Value = res.json().await.expect("json");
    assert_eq!(body["status"], "queued");
    server.abort();
}

async fn metrics_count_requests_jobs_and_queue_with_bounded_labels(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let state = env.state();
    let app = vm_webapp::http::router(state.clone());
    let fake = support::fake_llm::FakeLlm::start(vec![
        support::fake_llm::Answer::Status(500),
        support::fake_llm::Answer::Text("ok"),
    ])
    .await;
    let llm =
        vm_webapp::steps::llm::LlmClient::new(&fake.base_url, "m", None, Duration::from_secs(2))
            .expect("client");
    let runner = vm_webapp::steps::StepRunner::new(LlmBackend::Remote(llm))
        .with_metrics(state.metrics.clone());
    let config = vm_webapp::worker::WorkerConfig {
        id: "metrics-worker".into(),
        concurrency: 2,
        poll_interval: Duration::from_millis(20),
        lease: Duration::from_secs(5),
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(20),
        shutdown_grace: Duration::from_secs(1),
    };
    let id = create(
        &app,
        r#"{"steps":[{"kind":"template","template":"a"},{"kind":"llm","prompt":"{{prev}}"}]}"#,
    )
    .await;
    // Scrapes read the snapshot the maintenance leader refreshes (no worker
    // runs yet, so take the leader's turn here).
    env.store.refresh_queue_stats().await.expect("snapshot");
    let queued = support::get_text(&app, "/metrics").await;
    assert!(
        queued.contains(r#"vm_queue_jobs{state="queued"} 1"#),
        "{queued}"
    );
    assert!(
        queued.contains(r#"vm_queue_jobs{state="waiting"} 1"#),
        "{queued}"
    );

    let worker =
        vm_webapp::worker::Worker::new(env.store.clone(), runner, config, state.wake.clone())
            .with_metrics(state.metrics.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    env.wait_for(id, RunStatus::Succeeded, Duration::from_secs(20))
        .await;
    send(&app, "GET", &format!("/api/v2/runs/{id}"), None, &[]).await;

    // The worker's maintenance loop (leader) refreshes the queue snapshot
    // within a tick: the scrape sees the emptied queue without scanning it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = support::get_text(&app, "/api/v2/metrics/prometheus").await;
        let empty = ["waiting", "queued", "running"]
            .iter()
            .all(|s| text.contains(&format!("vm_queue_jobs{{state=\"{s}\"}} 0")));
        if empty || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.cancel();
    handle.await.expect("worker");
    assert!(
        text.lines().any(|l| l
            .strip_prefix("vm_queue_snapshot_age_seconds ")
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|age| (0.0..5.0).contains(&age))),
        "a fresh snapshot is reported: {text}"
    );
    for expected in [
        r#"vm_http_requests_total{method="POST",route="/api/v2/runs",status_class="2xx"} 1"#,
        r#"vm_http_requests_total{method="GET",route="/api/v2/runs/{id}",status_class="2xx"} 1"#,
        r#"vm_http_request_duration_seconds_count{method="POST",route="/api/v2/runs"} 1"#,
        r#"vm_jobs_claimed_total{kind="template"} 1"#,
        r#"vm_jobs_claimed_total{kind="llm"} 2"#,
        r#"vm_job_queue_wait_seconds_count{kind="llm"} 2"#,
        r#"vm_jobs_finished_total{kind="llm",outcome="retried"} 1"#,
        r#"vm_jobs_finished_total{kind="llm",outcome="succeeded"} 1"#,
        r#"vm_job_duration_seconds_count{kind="template",outcome="succeeded"} 1"#,
        r#"vm_llm_request_duration_seconds_count{outcome="status_5xx"} 1"#,
        r#"vm_llm_request_duration_seconds_count{outcome="ok"} 1"#,
        r#"vm_dependency_failures_total{dependency="llm"} 1"#,
        r#"vm_queue_jobs{state="queued"} 0"#,
        r#"vm_queue_jobs{state="dead"} 0"#,
        "vm_queue_oldest_job_age_seconds",
        "vm_worker_heartbeat_age_seconds",
        r#"vm_build_info{version=""#,
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
    assert!(
        !text.contains(&id.to_string()),
        "a run id leaked into a metric label"
    );
}

/// Without this, the document would tell clients that a protected operation
/// never answers 429 (the rate limits run before every handler) and that
/// most never answer 503 (every one of them reads the database): only create,
/// list, cancel, the streams and the approvals said so. Behaviour decides
/// for 429: each operation with the api_key scheme, called once its key's
/// bucket is empty, answers 429 and must document it; an operation that
/// answers 429 must document it too.
async fn every_guarded_operation_documents_its_429_and_503_with_the_error_body(backend: Backend) {
    let key = "ops-key-0123456789abcdef";
    let env = TestEnv::new(
        backend,
        &[
            ("VM_API_KEYS", &format!("ops:{key}:admin")),
            ("VM_RATE_LIMIT_KEY_RPS", "1"),
            ("VM_RATE_LIMIT_KEY_BURST", "1"),
        ],
    )
    .await;
    let app = env.router();
    let doc = send(&app, "GET", "/api/v2/openapi.json", None, &[]).await;
    assert_eq!(doc.status, StatusCode::OK);
    let error_body = json!({"$ref": "#/components/schemas/ErrorBody"});
    let auth = format!("Bearer {key}");
    let mut guarded = Vec::new();
    for (path, item) in doc.body["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            let keyed = operation["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("api_key").is_some()));
            if !keyed {
                continue;
            }
            let method = method.to_uppercase();
            let uri = path
                .replace("{id}", "0190a0b0-0000-7000-8000-000000000000")
                .replace("{index}", "0")
                .replace("{tenant}", "anonymous");
            // The bucket holds one request and refills one a second: the
            // second call in a row finds it empty (a third covers a slow
            // machine refilling it in between).
            let mut limited = None;
            for _ in 0..3 {
                let reply = send(&app, &method, &uri, None, &[("authorization", &auth)]).await;
                if reply.status == StatusCode::TOO_MANY_REQUESTS {
                    limited = Some(reply);
                    break;
                }
            }
            let limited =
                limited.unwrap_or_else(|| panic!("{method} {path} is never rate limited"));
            assert_eq!(limited.body["code"], "rate_limited", "{method} {path}");
            for status in ["429", "503"] {
                assert_eq!(
                    operation["responses"][status]["content"]["application/json"]["schema"],
                    error_body,
                    "{method} {path} does not document its {status} with the error body"
                );
            }
            guarded.push(format!("{method} {path}"));
        }
    }
    assert_eq!(guarded.len(), 14, "{guarded:?}");
}

/// A template that repeats a reference multiplies its text at every step:
/// 64 KiB referenced 100 times is 6.4 MB, and two more such steps were
/// gigabytes in the worker (a 25 KB request grew `serve` to 4.9 GB). The
/// step fails for good at once, with the reason, and the run fails.
async fn a_template_that_would_render_past_the_bound_fails_its_run(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let app = env.router();
    let body = json!({"steps": [
        {"kind": "template", "template": "x".repeat(64 * 1024)},
        {"kind": "template", "template": "{{prev}}".repeat(100)},
        {"kind": "template", "template": "{{prev}}".repeat(100)},
    ]})
    .to_string();
    let id = create(&app, &body).await;
    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    let detail = env
        .wait_for(id, RunStatus::Failed, Duration::from_secs(20))
        .await;
    stop.cancel();
    worker.await.expect("worker");
    let step = &detail.steps[1];
    assert_eq!(step.attempts, 1, "a permanent failure: {step:?}");
    assert!(step.output.is_none(), "{step:?}");
    let error = step.error.as_deref().unwrap_or_default();
    assert!(error.contains("rendered text would be longer"), "{error}");
    assert!(detail.steps[2].output.is_none());
}

on_both_backends!(
    a_template_that_would_render_past_the_bound_fails_its_run,
    metrics_count_requests_jobs_and_queue_with_bounded_labels,
    a_run_goes_from_accepted_to_succeeded_with_its_events,
    idempotency_key_replays_the_original_run_and_rejects_a_different_body,
    an_idempotent_replay_carries_the_location_of_the_original_run,
    runs_are_listed_newest_first_with_cursor_pages_and_a_status_filter,
    every_client_mistake_is_a_4xx_with_a_stable_code,
    llm_steps_are_refused_when_no_endpoint_is_configured,
    probes_tell_the_truth_and_readiness_flips_on_shutdown,
    the_api_answers_over_real_http,
    every_guarded_operation_documents_its_429_and_503_with_the_error_body,
);

/// Without this, a route added to the router but not annotated (or an
/// annotation for a route that no longer exists) would go unnoticed.
#[tokio::test]
async fn every_route_is_in_the_openapi_document_and_every_documented_route_answers() {
    let env = TestEnv::new(Backend::Sqlite, &[]).await;
    let app = env.router();
    let doc = send(&app, "GET", "/api/v2/openapi.json", None, &[]).await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(
        doc.body["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );
    let paths = doc.body["paths"].as_object().expect("paths");
    let mut documented: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|ops| ops.keys())
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    documented.sort();
    let mut expected: Vec<(String, String)> = [
        ("GET", "/api/v2/health/live"),
        ("GET", "/api/v2/health/ready"),
        ("GET", "/api/v2/metrics/prometheus"),
        ("GET", "/metrics"),
        ("GET", "/api/v2/openapi.json"),
        ("POST", "/api/v2/runs"),
        ("GET", "/api/v2/runs"),
        ("GET", "/api/v2/runs/{id}"),
        ("GET", "/api/v2/runs/{id}/events"),
        ("GET", "/api/v2/runs/{id}/events/stream"),
        ("GET", "/api/v2/events/stream"),
        ("POST", "/api/v2/runs/{id}/cancel"),
        ("GET", "/api/v2/audit"),
        ("POST", "/api/v2/webhooks/{source}"),
        ("POST", "/api/v2/runs/{id}/steps/{index}/approve"),
        ("POST", "/api/v2/runs/{id}/steps/{index}/reject"),
        ("GET", "/api/v2/approvals"),
        ("PUT", "/api/v2/tenants/{tenant}/plan"),
        ("GET", "/api/v2/tenants/{tenant}/usage"),
        ("GET", "/api/v2/usage/export"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    expected.sort();
    assert_eq!(documented, expected);

    // Every documented operation is served by the router (not a 404/405 fallback).
    let id = create(&app, HELLO).await;
    for (method, path) in &documented {
        let uri = path
            .replace("{id}", &id.to_string())
            .replace("{source}", "github")
            .replace("{index}", "0")
            .replace("{tenant}", "anonymous");
        let body = (method == "POST" && uri.ends_with("/runs")).then_some(HELLO);
        // Not JSON on success: metrics text and the usage CSV; streams never
        // end: only their status is read.
        if uri.contains("metrics") || uri.ends_with("/usage/export") || uri.ends_with("/stream") {
            assert_eq!(
                support::send_raw(&app, method, &uri, body).await,
                StatusCode::OK,
                "{uri}"
            );
            continue;
        }
        let reply = send(&app, method, &uri, body, &[]).await;
        assert!(
            !["route_not_found", "method_not_allowed"]
                .contains(&reply.body["code"].as_str().unwrap_or("")),
            "{method} {uri} is documented but not routed ({})",
            reply.body
        );
    }
    assert_eq!(
        doc.body["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );
    assert_eq!(
        doc.body["paths"]["/api/v2/runs"]["post"]["security"],
        json!([{"api_key": []}])
    );
    assert!(
        doc.body["paths"]["/api/v2/health/ready"]["get"]["security"].is_null(),
        "probes need no key"
    );
    let schemas = doc.body["components"]["schemas"]
        .as_object()
        .expect("schemas");
    for name in [
        "RunView",
        "RunList",
        "EventList",
        "ErrorBody",
        "StepSpec",
        "ReadyView",
        "CreateRunRequest",
        "ApprovalView",
        "ApprovalList",
        "DecisionRequest",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert!(
        schemas["RunStatus"]["enum"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("waiting"))),
        "{}",
        schemas["RunStatus"]
    );
}

/// Without this, an operation behind the API-key guard would tell clients
/// it never answers 401 (most did not list it), and a route that needs a key
/// without declaring the `api_key` scheme would go unnoticed. Which
/// operations are protected is asked of the router itself: each documented
/// operation is called without a key on an instance that has keys.
#[tokio::test]
async fn every_operation_that_needs_an_api_key_documents_its_401_with_the_error_body() {
    let env = TestEnv::new(
        Backend::Sqlite,
        &[("VM_API_KEYS", "ops:ops-key-0123456789abcdef")],
    )
    .await;
    let app = env.router();
    let doc = send(&app, "GET", "/api/v2/openapi.json", None, &[]).await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.body["components"]["schemas"]["ErrorBody"].is_object());
    let error_body = json!({"$ref": "#/components/schemas/ErrorBody"});
    let paths = doc.body["paths"].as_object().expect("paths");
    let mut protected = Vec::new();
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("path item") {
            let method = method.to_uppercase();
            let uri = path
                .replace("{id}", "0190a0b0-0000-7000-8000-000000000000")
                .replace("{source}", "github")
                .replace("{index}", "0")
                .replace("{tenant}", "anonymous");
            let keyed = operation["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("api_key").is_some()));
            let status = support::send_raw(&app, &method, &uri, None).await;
            if keyed {
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} declares the api_key scheme but answers without a key"
                );
            }
            if status == StatusCode::UNAUTHORIZED {
                assert!(
                    keyed || path.starts_with("/api/v2/webhooks/"),
                    "{method} {path} needs a key but does not declare the api_key scheme"
                );
                assert_eq!(
                    operation["responses"]["401"]["content"]["application/json"]["schema"],
                    error_body,
                    "{method} {path} answers 401 but does not document it with the error body"
                );
                protected.push(format!("{method} {path}"));
            }
        }
    }
    // The runs, approvals, audit, tenants and stream routes.
    assert_eq!(protected.len(), 14, "{protected:?}");
    assert!(
        doc.body["paths"]["/api/v2/runs/{id}/cancel"]["post"]["responses"]["503"]["content"]["application/json"]
            ["schema"]
            == error_body,
        "cancel documents its 503"
    );
}
