//! The HTTP surface, all under `/api/v2`:
//!
//! - `GET /health/live`, `GET /health/ready` (see [`health`])
//! - `POST /runs`, `GET /runs`, `GET /runs/{id}`, `GET /runs/{id}/events`,
//!   `POST /runs/{id}/cancel` (see [`runs`])
//!
//! Every response carries `x-request-id` (the caller's, or a generated UUID),
//! and every log line of a request is inside a span carrying it. Unknown
//! routes and methods answer JSON errors like everything else.

pub mod error;
pub mod health;
pub mod runs;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Request, Response};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::sync::Notify;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::config::Settings;
use crate::http::error::ApiError;
use crate::store::Store;
use crate::worker::WorkerState;

/// Prefix of every route.
pub const API_PREFIX: &str = "/api/v2";

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// Notified when a run is queued, so an in-process worker claims at once.
    pub wake: Arc<Notify>,
    /// Set when SIGTERM arrives: readiness fails and new runs are refused.
    pub shutting_down: Arc<AtomicBool>,
    /// The in-process worker's live state, when there is one.
    pub worker: Option<Arc<WorkerState>>,
    /// How old the worker's last loop pass may be before it counts as stalled.
    pub worker_stall_after: Duration,
}

impl AppState {
    /// State for a process serving `store` with `settings`.
    pub fn new(store: Store, settings: Arc<Settings>) -> Self {
        Self {
            store,
            settings,
            wake: Arc::new(Notify::new()),
            shutting_down: Arc::new(AtomicBool::new(false)),
            worker: None,
            worker_stall_after: Duration::from_secs(30),
        }
    }

    /// True once shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// The probe routes, shared by `serve` and the worker's health port.
pub fn health_routes() -> Router<AppState> {
    Router::new()
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
}

/// The full API router.
pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.max_body_bytes;
    let api = health_routes()
        .route("/runs", post(runs::create_run).get(runs::list_runs))
        .route("/runs/{id}", get(runs::get_run))
        .route("/runs/{id}/events", get(runs::list_events))
        .route("/runs/{id}/cancel", post(runs::cancel_run));
    with_common_layers(
        Router::new()
            .nest(API_PREFIX, api)
            .layer(DefaultBodyLimit::max(body_limit)),
    )
    .with_state(state)
}

/// The worker's health router: probes only.
pub fn health_router(state: AppState) -> Router {
    with_common_layers(Router::new().nest(API_PREFIX, health_routes())).with_state(state)
}

fn with_common_layers(router: Router<AppState>) -> Router<AppState> {
    router
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(CatchPanicLayer::custom(|_| ApiError::Internal.into_response()))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<_>| {
                    let request_id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %request_id)
                })
                .on_request(())
                .on_response(|res: &Response<_>, latency: Duration, _span: &Span| {
                    tracing::info!(status = res.status().as_u16(), latency_ms = latency.as_millis() as u64, "request finished");
                })
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}
