//! The admin HTTP server of `vm-operator run`:
//!
//! - `GET /healthz` — 200 while the process runs (liveness);
//! - `GET /readyz` — 200 once the operator is leading with its controller running, or is a
//!   healthy standby; 503 before that and while shutting down;
//! - `GET /metrics` — Prometheus text format of the operator's registry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

/// Shared state of the admin endpoints.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics to expose.
    pub registry: Arc<Registry>,
    /// What `/readyz` reports.
    pub ready: Arc<AtomicBool>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    match crate::metrics::encode(&s.registry) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serve the admin router on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin server listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use tower::ServiceExt;

    fn state() -> AdminState {
        let mut registry = crate::metrics::registry();
        crate::metrics::Metrics::register(&mut registry);
        AdminState {
            registry: Arc::new(registry),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    async fn get(state: &AdminState, path: &str) -> (StatusCode, String) {
        let response = router(state.clone())
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn readyz_follows_the_ready_flag_while_healthz_stays_ok() {
        let s = state();
        assert_eq!(get(&s, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get(&s, "/healthz").await.0, StatusCode::OK);
        s.ready.store(true, Ordering::Release);
        assert_eq!(get(&s, "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_the_operator_families() {
        let (status, body) = get(&state(), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("vm_operator_reconciles_total"), "{body}");
        assert!(body.contains("# EOF"), "{body}");
    }
}
