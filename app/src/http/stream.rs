//! Live updates over Server-Sent Events (see [`crate::stream`] for how
//! events reach a stream):
//!
//! - `GET /api/v2/runs/{id}/events/stream`: one run's events, from its first
//!   one (a late subscriber sees the whole history, then what follows), up
//!   to the event that ends the run (`run.succeeded`, `run.failed`,
//!   `run.cancelled`), after which the response ends; resuming at or after
//!   that event answers `204 No Content`, which stops `EventSource`
//! - `GET /api/v2/events/stream`: the events of every run the key may see,
//!   from now on, until the client leaves
//!
//! Each SSE event carries `id:` (the event's id) and a JSON `data:` shaped
//! like an item of `GET /runs/{id}/events` plus `run_id`. A client resumes
//! after the last id it got with the `Last-Event-ID` header (what browsers'
//! `EventSource` sends by itself) or, when it cannot set headers, `?after=`;
//! the header wins when both are given. Idle streams carry a `:heartbeat`
//! comment every `VM_STREAM_HEARTBEAT_MS`. A stream whose client stops
//! reading ends once a write to it (an event or a heartbeat) has made no
//! progress for `VM_STREAM_WRITE_TIMEOUT_MS` (see [`crate::http::conn`]),
//! counted in `vm_stream_drops_total{reason="stalled"}`. An unknown run answers `404`
//! before any stream starts; authentication and rate limits are those of
//! every other route.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Serialize;
use tracing::info;
use uuid::Uuid;

use crate::http::conn::WriteWatch;
use crate::http::extract::ApiPath;
use crate::http::paging::parse_query;
use crate::http::security::Actor;
use crate::http::views::{ErrorBody, EventView};
use crate::http::{AppState, error::ApiError};
use crate::metrics::Metrics;
use crate::model::RunEvent;
use crate::store::feed::{FeedFilter, Visibility};
use crate::stream::SubscribeError;

/// The `data:` of one SSE event: an event as `GET /runs/{id}/events` shows
/// it, with its run.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StreamEventView {
    /// The run.
    pub run_id: Uuid,
    /// The event.
    #[serde(flatten)]
    pub event: EventView,
}

/// The runs `actor` may follow on `GET /events/stream`: every run for admin
/// keys (and the open local mode), its tenant's runs for any other key (as
/// on every run route, see [`crate::http::runs::scope_of`]).
pub fn visibility_for(actor: Option<&Actor>) -> Visibility {
    match actor {
        Some(a) if a.admin => Visibility::All,
        Some(a) => Visibility::Tenant(a.tenant.clone()),
        // Protected routes always carry an actor; without one, see nothing.
        None => Visibility::Tenant(String::new()),
    }
}

/// Where a client resumes: `Last-Event-ID`, else `?after=`, else `None`.
fn resume_after(headers: &HeaderMap, raw: Option<String>) -> Result<Option<i64>, ApiError> {
    let query = parse_query(raw, &["after"])?;
    let parse = |value: &str, what: &str| {
        value
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                ApiError::InvalidParameter(format!("{what}: expected an event id (a whole number)"))
            })
    };
    if let Some(value) = headers.get("last-event-id") {
        let text = value.to_str().map_err(|_| {
            ApiError::InvalidParameter(
                "Last-Event-ID: expected an event id (a whole number)".into(),
            )
        })?;
        // `EventSource` sends an empty header when no event carried an id.
        if !text.trim().is_empty() {
            return parse(text, "Last-Event-ID").map(Some);
        }
    }
    query.get("after").map(|v| parse(v, "after")).transpose()
}

fn sse_event(event: &RunEvent) -> Event {
    let view = StreamEventView {
        run_id: event.run_id,
        event: EventView::of(event),
    };
    let data = serde_json::to_string(&view).unwrap_or_else(|_| "{}".to_string());
    Event::default().id(event.id.to_string()).data(data)
}

/// Counts the stream it belongs to as `stalled` when it is dropped because
/// its connection was closed for a write that made no progress.
struct StallWatch {
    watch: WriteWatch,
    metrics: Arc<Metrics>,
    timeout: Duration,
    holder: String,
}

impl Drop for StallWatch {
    fn drop(&mut self) {
        if self.watch.stalled() {
            self.metrics.stream.dropped("stalled");
            info!(
                actor = %self.holder,
                timeout_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
                "a live-update stream ended: its client took nothing for the write timeout (VM_STREAM_WRITE_TIMEOUT_MS); its place is free again"
            );
        }
    }
}

async fn open(
    state: &AppState,
    actor: Option<&Actor>,
    watch: Option<WriteWatch>,
    filter: FeedFilter,
    after: Option<i64>,
) -> Result<Response, ApiError> {
    let one_run = filter.run.is_some();
    // Counted per key against VM_STREAM_MAX_PER_KEY.
    let holder = actor.map_or("anonymous", |a| a.id.as_str());
    let subscription = state
        .streams
        .subscribe(filter, after, state.redis.as_ref(), holder)
        .await
        .map_err(|e| match e {
            SubscribeError::TooMany => ApiError::TooManyStreams,
            SubscribeError::Store(e) => ApiError::from(e),
        })?;
    let subscription = if one_run {
        subscription.until_run_ends()
    } else {
        subscription
    };
    // A client that stops reading must not keep its stream (and its place
    // under the limits) for ever: from now on, a write to this connection
    // that makes no progress for the write timeout closes it.
    let stall = watch.map(|watch| {
        let timeout = state.settings.stream.write_timeout;
        watch.engage(timeout);
        StallWatch {
            watch,
            metrics: state.metrics.clone(),
            timeout,
            holder: holder.to_string(),
        }
    });
    let events = subscription.into_stream().map(move |event| {
        // Owned by the body: dropped (and counted when stalled) with it.
        let _ = &stall;
        Ok::<_, Infallible>(sse_event(&event))
    });
    let mut response = Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(state.settings.stream.heartbeat)
                .text("heartbeat"),
        )
        .into_response();
    // Proxies that buffer responses (nginx) would hold events back.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// Follows one run's events live (Server-Sent Events).
#[utoipa::path(
    get,
    path = "/api/v2/runs/{id}/events/stream",
    tag = "runs",
    security(("api_key" = [])),
    params(
        ("id" = Uuid, Path, description = "Run id"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event id (wins over `after`)"),
        ("after" = Option<i64>, Query, description = "Resume after this event id, for clients that cannot set headers; without either, the stream starts at the run's first event"),
    ),
    responses(
        (status = 200, description = "An SSE stream: `id:` the event id, `data:` the event as JSON with its `run_id`; `:heartbeat` comments while idle. The response ends after the event that ends the run (`run.succeeded`, `run.failed`, `run.cancelled`), at once for a run already over (its history, then the end); it also ends when a write to the client makes no progress for `VM_STREAM_WRITE_TIMEOUT_MS` or the server stops, and the client then resumes with `Last-Event-ID`", content_type = "text/event-stream", body = StreamEventView),
        (status = 204, description = "The run has ended and nothing follows `Last-Event-ID` (or `after`): the stream is over; `EventSource` stops reconnecting"),
        (status = 400, description = "invalid_parameter: Last-Event-ID or after is not an event id", body = ErrorBody),
        (status = 404, description = "run_not_found", body = ErrorBody),
        (status = 503, description = "too_many_streams, dependency_unavailable", body = ErrorBody),
    )
)]
pub async fn run_stream(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    watch: Option<Extension<WriteWatch>>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let after = resume_after(&headers, raw)?;
    // A malformed id cannot name a run, so it is simply not found.
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::RunNotFound)?;
    // Another tenant's run is not found, as on every run route.
    if !state
        .store
        .run_visible(id, &crate::http::runs::scope_of(actor.as_ref()))
        .await?
    {
        return Err(ApiError::RunNotFound);
    }
    let after = after.unwrap_or(0);
    // Resuming at or after the run's end: nothing will follow. A 204 is what
    // makes `EventSource` stop reconnecting (an empty 200 would have it
    // reconnect for ever, every few seconds).
    if let Some(end) = state.store.run_end_event(id).await?
        && after >= end
    {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let filter = FeedFilter {
        run: Some(id),
        visible: visibility_for(actor.as_ref().map(|Extension(a)| a)),
    };
    open(
        &state,
        actor.as_ref().map(|Extension(a)| a),
        watch.map(|Extension(w)| w),
        filter,
        Some(after),
    )
    .await
}

/// Follows the events of every run the key may see, live (Server-Sent Events).
#[utoipa::path(
    get,
    path = "/api/v2/events/stream",
    tag = "runs",
    security(("api_key" = [])),
    params(
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event id (wins over `after`)"),
        ("after" = Option<i64>, Query, description = "Resume after this event id, for clients that cannot set headers; without either, the stream starts with the next event"),
    ),
    responses(
        (status = 200, description = "An SSE stream: `id:` the event id, `data:` the event as JSON with its `run_id`; `:heartbeat` comments while idle. It stays open until the client leaves; it ends when a write to the client makes no progress for `VM_STREAM_WRITE_TIMEOUT_MS` or the server stops, and the client then resumes with `Last-Event-ID`", content_type = "text/event-stream", body = StreamEventView),
        (status = 400, description = "invalid_parameter: Last-Event-ID or after is not an event id", body = ErrorBody),
        (status = 503, description = "too_many_streams, dependency_unavailable", body = ErrorBody),
    )
)]
pub async fn all_stream(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    watch: Option<Extension<WriteWatch>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let after = resume_after(&headers, raw)?;
    let filter = FeedFilter {
        run: None,
        visible: visibility_for(actor.as_ref().map(|Extension(a)| a)),
    };
    open(
        &state,
        actor.as_ref().map(|Extension(a)| a),
        watch.map(|Extension(w)| w),
        filter,
        after,
    )
    .await
}
