//! Request bodies documented as JSON objects are JSON objects: serde reads a
//! struct from a JSON array too (fields by position), so without a check
//! `["a comment"]` decided an approval with that comment and
//! `[{}, [steps]]` created a run. Bad input is a 4xx with a stable code.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use vm_webapp::model::RunStatus;
use vm_webapp::steps::llm::LlmBackend;

use support::{Backend, TestEnv, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_array_does_not_create_a_run() {
    let env = TestEnv::new(Backend::Sqlite, &[]).await;
    let app = env.router();
    let body = r#"[{"name":"Ada"},[{"kind":"template","template":"x"}]]"#;
    let reply = send(&app, "POST", "/api/v2/runs", Some(body), &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.body
    );
    assert_eq!(reply.body["code"], "invalid_request");
    let runs = send(&app, "GET", "/api/v2/runs", None, &[]).await;
    assert_eq!(runs.body["runs"], json!([]), "{}", runs.body);
    // Broken JSON that starts like an array is still invalid JSON.
    let broken = send(&app, "POST", "/api/v2/runs", Some("[{"), &[]).await;
    assert_eq!(broken.status, StatusCode::BAD_REQUEST, "{}", broken.body);
    assert_eq!(broken.body["code"], "invalid_json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_array_does_not_decide_an_approval() {
    let env = TestEnv::new(Backend::Sqlite, &[]).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let id = support::create(
        &app,
        r#"{"input":{},"steps":[{"kind":"approval","prompt":"ship?"}]}"#,
    )
    .await;
    env.wait_for(id, RunStatus::Waiting, Duration::from_secs(15))
        .await;
    let uri = format!("/api/v2/runs/{id}/steps/0/approve");
    for body in [r#"["smuggled comment"]"#, "[]"] {
        let reply = send(&app, "POST", &uri, Some(body), &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            reply.body
        );
        assert_eq!(reply.body["code"], "invalid_request");
    }
    let run = send(&app, "GET", &format!("/api/v2/runs/{id}"), None, &[]).await;
    assert_eq!(run.body["status"], "waiting", "{}", run.body);
    assert_eq!(run.body["steps"][0]["approval"]["status"], "pending");
    // A proper body still decides.
    let ok = send(&app, "POST", &uri, Some(r#"{"comment":"fine"}"#), &[]).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.body["comment"], "fine");
    stop.cancel();
    worker.await.expect("worker");
}
