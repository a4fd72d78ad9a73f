//! The HTTP surface, all under `/api/v2`:
//!
//! - `GET /health/live`, `GET /health/ready` (see [`health`])
//! - `POST /runs`, `GET /runs`, `GET /runs/{id}`, `GET /runs/{id}/events`,
//!   `POST /runs/{id}/cancel` (see [`runs`])
//! - `GET /metrics/prometheus`, and `GET /metrics` at the root (see [`metrics`])
//! - `GET /runs/{id}/events/stream`, `GET /events/stream`: live updates as
//!   Server-Sent Events (see [`stream`])
//! - `POST /runs/{id}/steps/{index}/approve`, `POST /runs/{id}/steps/{index}/reject`,
//!   `GET /approvals`: approval steps (see [`approvals`])
//! - `POST /webhooks/{source}`: signed deliveries (see [`webhooks`])
//! - `GET /audit`: the audit trail, admin keys only (see [`audit`])
//! - `PUT /tenants/{tenant}/plan`, `GET /tenants/{tenant}/usage`,
//!   `GET /usage/export`: plans and usage (see [`tenants`])
//! - `GET /console` at the root: the web console (see [`console`])
//! - `GET /openapi.json`: the OpenAPI document, generated from the same
//!   registrations that build the router, so the two cannot drift apart
//! - `views`: the JSON shapes
//!
//! Runs and the audit trail need an API key and are rate-limited; webhooks are
//! signed and rate-limited; probes, metrics and the document are open (see
//! [`security`]). Every response carries security headers and
//! `x-request-id` (the caller's, or a generated UUID),
//! and every log line of a request is inside a span carrying it. Unknown
//! routes and methods answer JSON errors like everything else, and are
//! counted in `vm_http_requests_total` (route `unmatched` for a 404). A
//! header the app reads that is present but unreadable answers `invalid_*`,
//! never `missing_*` and never silently ignored.

pub mod approvals;
pub mod audit;
pub mod body;
pub mod conn;
pub mod console;
pub mod error;
pub mod extract;
pub mod health;
pub mod metrics;
pub mod paging;
pub mod runs;
pub mod security;
pub mod stream;
pub mod tenants;
pub mod views;
pub mod webhooks;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::{Request, Response};
use axum::middleware::from_fn_with_state;
use axum::response::IntoResponse;
use tokio::sync::Notify;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;
use tracing::Span;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::config::Settings;
use crate::http::error::ApiError;
use crate::metrics::Metrics;
use crate::redis_bus::RedisBus;
use crate::store::Store;
use crate::worker::WorkerState;

/// Prefix of every route.
pub const API_PREFIX: &str = "/api/v2";

/// Shared state of all handlers: one reference-counted pointer to
/// [`AppParts`], so the clone axum makes for each handler and middleware of
/// a request is one atomic increment. (The fields used to be cloned one by
/// one: about a dozen contended reference counts per clone, 4–5% of `serve`'s
/// CPU when creating runs.) Fields are read through `Deref`; `DerefMut`
/// (for setting up a process, before it serves) copies the parts when they
/// are shared, so it never changes the state of a router already built.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl std::ops::Deref for AppState {
    type Target = AppParts;
    fn deref(&self) -> &AppParts {
        &self.0
    }
}

impl std::ops::DerefMut for AppState {
    fn deref_mut(&mut self) -> &mut AppParts {
        Arc::make_mut(&mut self.0)
    }
}

/// What [`AppState`] holds.
#[derive(Clone)]
pub struct AppParts {
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
    /// How old the worker's last loop pass (in-process) or the freshest
    /// heartbeat (separate workers) may be before the worker counts as stalled.
    pub worker_stall_after: Duration,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// Redis, when configured: wake-ups, shared rate limits, webhook nonces.
    pub redis: Option<RedisBus>,
    /// Rate-limit buckets kept in this process.
    pub limiter: Arc<security::RateLimiter>,
    /// Authentication failures since the last audit flush.
    pub auth_failures: Arc<security::AuthFailures>,
    /// Live updates: this process's event hub (see [`crate::stream`]).
    pub streams: crate::stream::Hub,
}

impl AppState {
    /// Announces newly queued work to this process's worker and, through
    /// Redis, to the others.
    pub fn nudge(&self) -> crate::nudge::Nudge {
        crate::nudge::Nudge::new(self.wake.clone(), self.redis.clone())
    }

    /// State for a process serving `store` with `settings`.
    /// Installs the settings' plans in `store` and registers its usage
    /// metrics.
    pub fn new(store: Store, settings: Arc<Settings>) -> Self {
        let store = store.with_plans(settings.plans.clone());
        let metrics = Arc::new(Metrics::new());
        let thresholds: Vec<String> = settings
            .plans
            .as_ref()
            .map(|p| {
                p.all_thresholds()
                    .into_iter()
                    .map(crate::plans::threshold_label)
                    .collect()
            })
            .unwrap_or_default();
        metrics.register_usage(
            store.threshold_family(),
            &thresholds,
            settings.metrics_tenant_labels,
        );
        Self(Arc::new(AppParts {
            streams: crate::stream::Hub::new(
                store.clone(),
                settings.stream.clone(),
                metrics.clone(),
            ),
            store,
            worker_stall_after: settings.queue.worker_stale_after,
            settings,
            wake: Arc::new(Notify::new()),
            shutting_down: Arc::new(AtomicBool::new(false)),
            worker: None,
            metrics,
            redis: None,
            limiter: Arc::new(security::RateLimiter::new()),
            auth_failures: Arc::new(security::AuthFailures::default()),
        }))
    }

    /// True once shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// The OpenAPI document's fixed parts; paths and schemas come from the
/// annotated handlers as they are registered.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "vmwebapp API",
        description = "Runs of steps on a durable queue, with probes and metrics. Errors are `{\"code\", \"message\"}` with a stable code."
    ),
    tags(
        (name = "runs", description = "Run lifecycle"),
        (name = "approvals", description = "Approval steps: the inbox and the decisions"),
        (name = "health", description = "Kubernetes probes"),
        (name = "webhooks", description = "Signed deliveries from other systems"),
        (name = "audit", description = "The audit trail"),
        (name = "tenants", description = "Plans, quotas and usage per tenant"),
        (name = "operations", description = "Metrics and this document"),
    )
)]
struct ApiDoc;

/// Declares the `api_key` bearer scheme that protected operations require.
struct ApiKeyScheme;

impl utoipa::Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "api_key",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "An API key from VM_API_KEYS (also accepted as `x-api-key`)",
                        ))
                        .build(),
                ),
            );
    }
}

/// Probes and metrics: everything the worker's health port serves too.
fn probe_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health::live))
        .routes(routes!(health::ready))
        .routes(routes!(metrics::prometheus))
        .routes(routes!(metrics::prometheus_alias))
}

/// Every API route, registered once for both the router and the document.
/// With `state` the routes get their guards (rate limits, then API keys);
/// without, only the document is wanted.
fn api_routes(state: Option<&AppState>) -> OpenApiRouter<AppState> {
    let mut protected = OpenApiRouter::new()
        .routes(routes!(runs::create_run, runs::list_runs))
        .routes(routes!(runs::get_run))
        .routes(routes!(runs::list_events))
        .routes(routes!(runs::cancel_run))
        .routes(routes!(stream::run_stream))
        .routes(routes!(stream::all_stream))
        .routes(routes!(approvals::approve))
        .routes(routes!(approvals::reject))
        .routes(routes!(approvals::list))
        .routes(routes!(audit::list))
        .routes(routes!(tenants::set_plan))
        .routes(routes!(tenants::usage))
        .routes(routes!(tenants::export));
    document_guarded(protected.get_openapi_mut());
    let mut signed = OpenApiRouter::new().routes(routes!(webhooks::receive));
    if let Some(state) = state {
        // The last layer added runs first: the address limit, then the key.
        protected = protected
            .route_layer(from_fn_with_state(state.clone(), security::authenticate))
            .route_layer(from_fn_with_state(
                state.clone(),
                security::limit_by_address,
            ));
        signed = signed.route_layer(from_fn_with_state(
            state.clone(),
            security::limit_by_address,
        ));
    }
    OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi())
        .merge(probe_routes())
        .merge(protected)
        .merge(signed)
        .routes(routes!(openapi_json))
}

/// Lists what any operation behind the guards can answer before or besides
/// its own outcome, on every operation of `doc` that does not list it
/// already: the API-key guard's 401 ([`security::authenticate`]) and the
/// rate limits' 429 ([`security::limit_by_address`], then the key's bucket)
/// answer before any handler runs, and every one of these handlers reads
/// the database, so each can answer 503 `dependency_unavailable`. A
/// handler's annotation would have to remember them (most did not).
fn document_guarded(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{Content, Ref, ResponseBuilder};
    let answers = [
        (
            "401",
            "unauthorized: no API key, an unknown one, an unreadable header, \
             or two different keys (in Authorization and x-api-key, or a header repeated)",
        ),
        (
            "429",
            "rate_limited: the address or the key is over its rate limit; \
             `Retry-After` says when to try again",
        ),
        (
            "503",
            "dependency_unavailable: the database is unavailable; retry later",
        ),
    ];
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            for (status, description) in answers {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| {
                        ResponseBuilder::new()
                            .description(description)
                            .content(
                                "application/json",
                                Content::new(Some(Ref::from_schema_name("ErrorBody"))),
                            )
                            .into()
                    });
            }
        }
    }
}

/// The OpenAPI document, generated from the handlers' annotations.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api_routes(None).into_openapi();
    // Applied last: merging the routes' components would drop it otherwise.
    utoipa::Modify::modify(&ApiKeyScheme, &mut doc);
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/api/v2/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
async fn openapi_json() -> axum::Json<serde_json::Value> {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    axum::Json(
        DOC.get_or_init(|| serde_json::to_value(openapi()).unwrap_or_default())
            .clone(),
    )
}

/// The full API router.
pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.max_body_bytes;
    let (routes, _) = api_routes(Some(&state)).split_for_parts();
    let routes = routes
        .merge(console::routes())
        .layer(DefaultBodyLimit::max(body_limit));
    with_common_layers(routes, &state).with_state(state)
}

/// The worker's health router: probes and metrics only.
pub fn health_router(state: AppState) -> Router {
    let (routes, _) = probe_routes().split_for_parts();
    with_common_layers(routes, &state).with_state(state)
}

/// Where the routed layer leaves the matched route template for [`track`],
/// which runs outside routing and so cannot see it on the request.
#[derive(Clone, Default)]
struct RouteSlot(Arc<std::sync::OnceLock<String>>);

/// Counts and times every request, routed or not: a 404 from the fallback
/// counts under the fixed route `unmatched`, a 405 under its route template,
/// a timeout or a panic under the route it hit. Methods outside the standard
/// set share the label `other`, so no raw path or method becomes a label.
async fn track(
    axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let slot = RouteSlot::default();
    req.extensions_mut().insert(slot.clone());
    let method = crate::metrics::method_label(req.method());
    let response = next.run(req).await;
    let route = slot
        .0
        .get()
        .map_or(crate::metrics::UNMATCHED_ROUTE, String::as_str);
    metrics.observe_http(method, route, response.status().as_u16(), started.elapsed());
    response
}

/// Records the matched route template for [`track`].
async fn note_route(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let (Some(path), Some(slot)) = (
        req.extensions().get::<MatchedPath>(),
        req.extensions().get::<RouteSlot>(),
    ) {
        let _ = slot.0.set(path.as_str().to_string());
    }
    next.run(req).await
}

fn with_common_layers(router: Router<AppState>, state: &AppState) -> Router<AppState> {
    // The 405 fallback is set before the route layer, so that the layer
    // wraps it and a wrong method is counted under its route template.
    let mut router = router
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .route_layer(axum::middleware::from_fn(note_route))
        .fallback(|| async { ApiError::RouteNotFound })
        .layer(from_fn_with_state(state.clone(), security::harden))
        .layer(tower::util::option_layer(security::cors(
            &state.settings.security,
        )));
    for (name, value) in security::security_headers() {
        router = router.layer(SetResponseHeaderLayer::if_not_present(name, value));
    }
    router
        .layer(CatchPanicLayer::custom(|_| ApiError::Internal.into_response()))
        .layer(from_fn_with_state(state.metrics.clone(), track))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<_>| {
                    let request_id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %request_id, actor = tracing::field::Empty)
                })
                .on_request(())
                .on_response(|res: &Response<_>, latency: Duration, _span: &Span| {
                    tracing::info!(status = res.status().as_u16(), latency_ms = latency.as_millis() as u64, "request finished");
                })
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::from_fn(security::screen_request_id))
}
