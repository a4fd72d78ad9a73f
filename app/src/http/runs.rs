//! Run lifecycle endpoints.
//!
//! - `POST /api/v2/runs`: create (`202`; `200` when an `Idempotency-Key` replays)
//! - `GET /api/v2/runs?status=&limit=&cursor=`: list, newest first
//! - `GET /api/v2/runs/{id}`: one run with the state and output of each step
//! - `GET /api/v2/runs/{id}/events?after=&limit=`: transitions in order
//! - `POST /api/v2/runs/{id}/cancel`: cancel a queued, running or waiting run
//!
//! A key sees and touches only its tenant's runs (another tenant's run is
//! `404 run_not_found`, like a missing one); admin keys see every tenant's
//! ([`scope_of`]). Creation is charged to the key's tenant and refused with
//! `402 quota_exceeded` past a `block` allowance.
//!
//! Bodies are parsed by hand (not by an extractor) so that every client
//! mistake gets our JSON error with a precise message. The body is read as
//! JSON whatever its `Content-Type`, so `curl -d` works as is.

use crate::http::extract::ApiPath;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::LlmMode;
use crate::http::paging::{self, parse_limit, parse_query};
use crate::http::security::Actor;
use crate::http::views::{
    CreateRunRequest, ErrorBody, EventList, EventView, RunList, RunSummary, RunView,
};
use crate::http::{API_PREFIX, AppState, error::ApiError};
use crate::model::{NewRun, Run, RunDetail, RunFilter, RunStatus, StepState, StepStatus};
use crate::steps::{StepSpec, parse_steps};
use crate::store::{CancelOutcome, CreateOutcome, Scope};

/// Tag of run-list cursors.
const RUNS_CURSOR: &str = "v1";
/// Default and largest page of `GET /runs`.
const RUNS_PAGE: (i64, i64) = (50, 200);
/// Default and largest page of `GET /runs/{id}/events`.
const EVENTS_PAGE: (i64, i64) = (500, 1000);

/// The detail of a run that was just created: first step queued, rest pending.
fn fresh_detail(run: Run) -> RunDetail {
    let steps = StepState::all(&run.steps, |index| {
        if index == 0 {
            StepStatus::Queued
        } else {
            StepStatus::Pending
        }
    });
    RunDetail { run, steps }
}

pub(crate) fn body_bytes(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::InvalidRequest("request body could not be read".into())
        }
    })
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ()> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| ()),
    }
}

/// A header value usable as an id in logs: short and plain.
fn plain_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Parses a create-run body: `{"input": {...}, "steps": [...]}`.
pub fn parse_create_body(bytes: &[u8]) -> Result<(Value, Vec<Value>), ApiError> {
    let request: CreateRunRequest = crate::http::body::from_json_object(bytes)?;
    Ok((
        Value::Object(request.input.unwrap_or_default()),
        request.steps,
    ))
}

/// Creates a run.
#[utoipa::path(
    post,
    path = "/api/v2/runs",
    tag = "runs",
    security(("api_key" = [])),
    request_body(content = CreateRunRequest, description = "Input and steps. Read as JSON whatever the Content-Type."),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Replays the original run for a repeated key; 409 for the same key with another body"),
        ("x-correlation-id" = Option<String>, Header, description = "Correlation id carried by the run's log lines"),
    ),
    responses(
        (status = 202, description = "Run queued", body = RunView,
            headers(("Location" = String, description = "The run: `/api/v2/runs/{id}`"))),
        (status = 200, description = "Idempotent replay of the original run", body = RunView,
            headers(
                ("Location" = String, description = "The original run: `/api/v2/runs/{id}`"),
                ("idempotent-replayed" = String, description = "`true`"),
            )),
        (status = 400, description = "invalid_json, invalid_idempotency_key, invalid_correlation_id, invalid_request_id, invalid_text (a text the database cannot store, such as a NUL byte)", body = ErrorBody),
        (status = 402, description = "quota_exceeded: the tenant's `block` allowance of runs is used up for the period; the body adds `meter`, `allowance`, `used`, `period` and `resets_at` (start of the next UTC month). Nothing was created or counted.", body = ErrorBody),
        (status = 409, description = "idempotency_key_conflict", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 422, description = "invalid_request, invalid_step, unknown_step_kind, llm_unavailable", body = ErrorBody),
        (status = 503, description = "dependency_unavailable, shutting_down", body = ErrorBody),
    )
)]
pub async fn create_run(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body, state.settings.max_body_bytes)?;
    let idempotency_key = match header_str(&headers, "idempotency-key") {
        Ok(None) => None,
        Ok(Some(k))
            if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Some(k.to_string())
        }
        _ => return Err(ApiError::InvalidIdempotencyKey),
    };
    let request_id = header_str(&headers, "x-request-id").ok().flatten();
    let correlation_id = header_str(&headers, "x-correlation-id")
        .ok()
        .flatten()
        .filter(|v| plain_id(v))
        .or(request_id.filter(|v| plain_id(v)))
        .map(str::to_string);
    let (actor, tenant) = actor.map_or_else(
        || ("anonymous".to_string(), "anonymous".to_string()),
        |Extension(a)| (a.id, a.tenant),
    );
    let request = NewRunRequest {
        body: bytes.to_vec(),
        // Scoped to the caller: two clients never collide on a key, and no
        // client can claim the keys webhooks use (`webhook:…`).
        idempotency_key: idempotency_key.map(|k| format!("key:{actor}:{k}")),
        correlation_id,
        actor,
        tenant,
        request_id: request_id.map(str::to_string),
    };
    let (detail, created) = create_from_body(&state, request).await?;
    // A replay names the run too: it answers a client whose first answer
    // was lost, and that client follows `Location` like any other.
    let location = format!("{API_PREFIX}/runs/{}", detail.run.id);
    if created {
        Ok((
            StatusCode::ACCEPTED,
            [(header::LOCATION, location)],
            Json(RunView::of(&detail)),
        )
            .into_response())
    } else {
        Ok((
            StatusCode::OK,
            [
                (header::LOCATION.as_str(), location.as_str()),
                ("idempotent-replayed", "true"),
            ],
            Json(RunView::of(&detail)),
        )
            .into_response())
    }
}

/// A request to create a run, from the API or from a webhook.
pub struct NewRunRequest {
    /// The JSON body `{"input", "steps"}`.
    pub body: Vec<u8>,
    /// Replays the original run when repeated.
    pub idempotency_key: Option<String>,
    /// Correlation id; generated when absent.
    pub correlation_id: Option<String>,
    /// Who asks (for the audit trail).
    pub actor: String,
    /// The tenant that will own the run and be charged for it.
    pub tenant: String,
    /// The request it came in (for the audit trail).
    pub request_id: Option<String>,
}

/// Validates and stores a run, wakes the workers and audits the creation.
/// Returns the run and whether it is new (false: an idempotent replay).
pub async fn create_from_body(
    state: &AppState,
    request: NewRunRequest,
) -> Result<(RunDetail, bool), ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let (input, raw_steps) = parse_create_body(&request.body)?;
    let steps = parse_steps(&raw_steps, &input)?;
    if state.settings.llm_mode() == LlmMode::Unavailable
        && steps.iter().any(|s| matches!(s, StepSpec::Llm { .. }))
    {
        return Err(ApiError::LlmUnavailable);
    }
    let request_hash = hex::encode(Sha256::digest(
        json!({"input": input, "steps": raw_steps})
            .to_string()
            .as_bytes(),
    ));
    let new = NewRun {
        input,
        steps,
        idempotency_key: request.idempotency_key,
        request_hash,
        correlation_id: request
            .correlation_id
            .unwrap_or_else(|| Uuid::new_v4().to_string()),
        max_attempts: i64::from(state.settings.queue.max_attempts),
        actor: request.actor.clone(),
        request_id: request.request_id.clone(),
        tenant: request.tenant.clone(),
    };
    // The audit row of the creation is written in the run's own transaction.
    match state.store.create_run(&new).await? {
        CreateOutcome::Created(run) => {
            tracing::info!(run_id = %run.id, correlation_id = %run.correlation_id, steps = run.steps.len(), actor = %request.actor, "run queued");
            state.nudge().enqueued();
            Ok((fresh_detail(run), true))
        }
        CreateOutcome::Existing(detail) => Ok((*detail, false)),
        CreateOutcome::Conflict => Err(ApiError::IdempotencyConflict),
        CreateOutcome::QuotaExceeded(refusal) => {
            tracing::info!(tenant = %refusal.tenant, meter = refusal.meter.as_str(), allowance = refusal.allowance, period = %refusal.period, actor = %request.actor, "run refused: allowance used up");
            Err(ApiError::QuotaExceeded(Box::new(refusal)))
        }
    }
}

/// Encodes a run-list cursor (opaque to clients).
pub fn encode_cursor(last: Uuid) -> String {
    paging::encode_cursor(RUNS_CURSOR, last)
}

/// Decodes a run-list cursor.
pub fn decode_cursor(cursor: &str) -> Result<Uuid, ApiError> {
    paging::decode_cursor(RUNS_CURSOR, cursor)
}

/// Lists runs, newest first.
#[utoipa::path(
    get,
    path = "/api/v2/runs",
    tag = "runs",
    security(("api_key" = [])),
    params(
        ("status" = Option<RunStatus>, Query, description = "Only runs in this status"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 200 (default 50)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, body = RunList),
        (status = 400, description = "invalid_parameter, invalid_cursor", body = ErrorBody),
        (status = 503, description = "dependency_unavailable", body = ErrorBody),
    )
)]
pub async fn list_runs(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<RunList>, ApiError> {
    let query = parse_query(raw, &["status", "limit", "cursor"])?;
    let status = match query.get("status") {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::InvalidParameter(format!(
                "status: expected one of {}",
                RunStatus::ALL.map(RunStatus::as_str).join(", ")
            ))
        })?),
    };
    let limit = parse_limit(&query, RUNS_PAGE)?;
    let before = query.get("cursor").map(|c| decode_cursor(c)).transpose()?;
    let mut runs = state
        .store
        .list_runs(&RunFilter {
            status,
            before,
            limit: limit + 1,
            scope: scope_of(actor.as_ref()),
        })
        .await?;
    let next_cursor = paging::next_page(&mut runs, limit, |r| encode_cursor(r.id));
    Ok(Json(RunList {
        runs: runs.iter().map(RunSummary::of).collect(),
        next_cursor,
    }))
}

/// Which runs the caller may see: admin keys (and the open local mode) all,
/// any other key its tenant's only. Every run route applies it.
pub fn scope_of(actor: Option<&Extension<Actor>>) -> Scope {
    match actor {
        Some(Extension(a)) if !a.admin => Scope::Tenant(a.tenant.clone()),
        Some(_) => Scope::All,
        // Protected routes always carry an actor; without one, see nothing.
        None => Scope::Tenant(String::new()),
    }
}

/// 404 unless run `id` exists and the caller's scope admits it.
async fn visible(state: &AppState, id: Uuid, scope: &Scope) -> Result<(), ApiError> {
    if state.store.run_visible(id, scope).await? {
        Ok(())
    } else {
        Err(ApiError::RunNotFound)
    }
}

pub(crate) fn parse_run_id(id: &str) -> Result<Uuid, ApiError> {
    // A malformed id cannot name a run, so it is simply not found.
    Uuid::parse_str(id).map_err(|_| ApiError::RunNotFound)
}

/// One run with the state and output of each step.
#[utoipa::path(
    get,
    path = "/api/v2/runs/{id}",
    tag = "runs",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Run id")),
    responses(
        (status = 200, body = RunView),
        (status = 400, description = "invalid_parameter: the id is not valid percent-encoded UTF-8 (a well-formed id that is not a UUID is run_not_found)", body = ErrorBody),
        (status = 404, description = "run_not_found", body = ErrorBody),
        (status = 503, description = "dependency_unavailable", body = ErrorBody),
    )
)]
pub async fn get_run(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RunView>, ApiError> {
    let id = parse_run_id(&id)?;
    visible(&state, id, &scope_of(actor.as_ref())).await?;
    let detail = state
        .store
        .get_run(id)
        .await?
        .ok_or(ApiError::RunNotFound)?;
    Ok(Json(RunView::of(&detail)))
}

/// The run's transitions, in order.
#[utoipa::path(
    get,
    path = "/api/v2/runs/{id}/events",
    tag = "runs",
    security(("api_key" = [])),
    params(
        ("id" = Uuid, Path, description = "Run id"),
        ("after" = Option<i64>, Query, description = "Only events with a larger id (`next_after` of the previous page)"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 1000 (default 500)"),
    ),
    responses(
        (status = 200, body = EventList),
        (status = 400, description = "invalid_parameter", body = ErrorBody),
        (status = 404, description = "run_not_found", body = ErrorBody),
    )
)]
pub async fn list_events(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    ApiPath(id): ApiPath<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<EventList>, ApiError> {
    let id = parse_run_id(&id)?;
    let query = parse_query(raw, &["after", "limit"])?;
    let after = match query.get("after") {
        None => 0,
        Some(v) => v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::InvalidParameter("after: expected an event id (a whole number)".into())
        })?,
    };
    let limit = parse_limit(&query, EVENTS_PAGE)?;
    visible(&state, id, &scope_of(actor.as_ref())).await?;
    let events = state.store.list_events(id, after, limit).await?;
    let next_after = (events.len() as i64 == limit)
        .then(|| events.last().map(|e| e.id))
        .flatten();
    Ok(Json(EventList {
        run_id: id,
        events: events.iter().map(EventView::of).collect(),
        next_after,
    }))
}

/// Cancels a queued, running or waiting run; pending steps are dropped and
/// a pending approval closes as `cancelled`.
#[utoipa::path(
    post,
    path = "/api/v2/runs/{id}/cancel",
    tag = "runs",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "Run id")),
    responses(
        (status = 200, description = "Cancelled", body = RunView),
        (status = 400, description = "invalid_parameter: the id is not valid percent-encoded UTF-8 (a well-formed id that is not a UUID is run_not_found)", body = ErrorBody),
        (status = 404, description = "run_not_found", body = ErrorBody),
        (status = 409, description = "run_not_cancellable", body = ErrorBody),
        (status = 503, description = "dependency_unavailable", body = ErrorBody),
    )
)]
pub async fn cancel_run(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RunView>, ApiError> {
    let id = parse_run_id(&id)?;
    visible(&state, id, &scope_of(actor.as_ref())).await?;
    let actor = actor.map_or_else(|| "anonymous".to_string(), |Extension(a)| a.id);
    let request_id = header_str(&headers, "x-request-id").ok().flatten();
    // The audit row of the cancellation is written in its own transaction.
    match state.store.cancel_run(id, &actor, request_id).await? {
        CancelOutcome::Cancelled(detail) => {
            tracing::info!(run_id = %id, correlation_id = %detail.run.correlation_id, %actor, "run cancelled");
            Ok(Json(RunView::of(&detail)))
        }
        CancelOutcome::NotFound => Err(ApiError::RunNotFound),
        CancelOutcome::NotCancellable(status) => Err(ApiError::NotCancellable(status)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(id)).unwrap(), id);
        assert!(decode_cursor("not-base64!").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("v2:x")).is_err());
    }
}
