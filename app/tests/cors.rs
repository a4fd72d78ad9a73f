//! Preflights from an allowed origin (`VM_CORS_ALLOWED_ORIGINS`) allow what
//! the API's own routes need: a page follows a stream with `fetch()`
//! (`EventSource` cannot send the API key) and resumes it with
//! `Last-Event-ID`, as the console does (that header is not CORS-safelisted,
//! so without it every resume fails); an admin page sets a tenant's plan
//! with `PUT`.

mod support;

use axum::http::StatusCode;
use support::{Backend, TestEnv, send};

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_allows_resuming_a_stream_with_last_event_id() {
    let env = TestEnv::new(
        Backend::Sqlite,
        &[("VM_CORS_ALLOWED_ORIGINS", "https://app.example.com")],
    )
    .await;
    let app = env.router();
    let preflight = send(
        &app,
        "OPTIONS",
        "/api/v2/events/stream",
        None,
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "GET"),
            (
                "access-control-request-headers",
                "authorization,last-event-id",
            ),
        ],
    )
    .await;
    assert_eq!(preflight.status, StatusCode::OK);
    let allowed = preflight.headers["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    for header in ["authorization", "last-event-id"] {
        assert!(
            allowed.split(',').any(|h| h.trim() == header),
            "{header} is not allowed: {allowed}"
        );
    }
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_allows_put_for_setting_a_plan() {
    let env = TestEnv::new(
        Backend::Sqlite,
        &[("VM_CORS_ALLOWED_ORIGINS", "https://app.example.com")],
    )
    .await;
    let app = env.router();
    let preflight = send(
        &app,
        "OPTIONS",
        "/api/v2/tenants/acme/plan",
        None,
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "PUT"),
            (
                "access-control-request-headers",
                "authorization,content-type",
            ),
        ],
    )
    .await;
    assert_eq!(preflight.status, StatusCode::OK);
    let methods = preflight.headers["access-control-allow-methods"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        methods.split(',').any(|m| m.trim() == "PUT"),
        "PUT is not allowed: {methods}"
    );
}
