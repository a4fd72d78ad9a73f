//! Approval endpoints:
//!
//! - `POST /api/v2/runs/{id}/steps/{index}/approve`: approve a waiting
//!   approval step (`{"comment": "…"}` optional); the run goes on
//! - `POST /api/v2/runs/{id}/steps/{index}/reject`: reject it; the run fails
//!   with reason `rejected`, or goes on with `approved: false` when the step
//!   says `on_reject: continue`
//! - `GET /api/v2/approvals?status=pending|decided|all&limit=&cursor=`: the
//!   inbox, oldest request first
//!
//! Deciding needs a key with the `approver` or `admin` role (403
//! `approver_required` otherwise); listing needs any key. Like every run
//! route, a key sees and decides only its tenant's runs' approvals (another
//! tenant's run is `404 run_not_found`); admin keys see all. The decision is one
//! store transaction ([`crate::store::Store::decide_approval`]): of two
//! approvers racing, or an approver racing the deadline, exactly one wins and
//! the other answers 409. A refused decision (403, 404, 409) is audited as
//! `approval.refused` with its code as the outcome.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};

use crate::http::extract::ApiPath;
use crate::http::paging::{self, parse_limit, parse_query};
use crate::http::runs::{body_bytes, header_str, parse_run_id, scope_of};
use crate::http::security::Actor;
use crate::http::views::{ApprovalList, ApprovalView, DecisionRequest, ErrorBody};
use crate::http::{AppState, error::ApiError};
use crate::store::Scope;
use crate::store::approvals::{ApprovalFilter, ApprovalStatus, DecideOutcome, Decision};
use crate::store::security::NewAudit;

/// Longest accepted comment, in characters.
pub const MAX_COMMENT_CHARS: usize = 2_000;
/// Tag of approval-list cursors.
const APPROVALS_CURSOR: &str = "p1";
/// Default and largest page of `GET /approvals`.
const APPROVALS_PAGE: (i64, i64) = (50, 200);

/// Parses the optional decision body: empty, or `{"comment": "…"}`.
fn parse_comment(bytes: &[u8]) -> Result<Option<String>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let request: DecisionRequest = crate::http::body::from_json_object(bytes)?;
    match request.comment {
        Some(c) if c.chars().count() > MAX_COMMENT_CHARS => Err(ApiError::InvalidRequest(format!(
            "comment: at most {MAX_COMMENT_CHARS} characters are allowed"
        ))),
        Some(c) if c.contains('\0') => Err(ApiError::InvalidText),
        Some(c) if c.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// A step index from the path; anything but a whole number names no step.
fn parse_index(index: &str) -> Result<i64, ApiError> {
    index
        .parse::<i64>()
        .ok()
        .filter(|i| *i >= 0)
        .ok_or(ApiError::StepNotFound)
}

/// Decides, and audits a refusal: `approval.refused` by the caller, on the
/// run (when the path names one), with the refusal's code as the outcome and
/// the decision asked for and the step in the detail (never the comment or
/// the key). A request that is malformed (400, 422) or that the server could
/// not serve (503) asked nothing of the approval and is not audited.
async fn decide(
    state: AppState,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    (id, index): (String, String),
    body: Result<Bytes, BytesRejection>,
    decision: Decision,
) -> Result<Json<ApprovalView>, ApiError> {
    let actor = actor.map(|Extension(a)| a);
    let request_id = header_str(&headers, "x-request-id").ok().flatten();
    let outcome = decide_as(
        &state,
        actor.as_ref(),
        request_id,
        (&id, &index),
        body,
        decision,
    )
    .await;
    if let Err(refusal) = &outcome
        && matches!(
            refusal,
            ApiError::ApproverRequired
                | ApiError::RunNotFound
                | ApiError::StepNotFound
                | ApiError::ApprovalAlreadyDecided(_)
                | ApiError::StepNotAwaitingApproval
        )
    {
        audit_refusal(
            &state,
            actor.as_ref(),
            request_id,
            (&id, &index),
            decision,
            refusal,
        )
        .await;
    }
    outcome
}

/// Writes the `approval.refused` row of [`decide`]. A failure to write it
/// is logged, and the caller still gets its answer.
async fn audit_refusal(
    state: &AppState,
    actor: Option<&Actor>,
    request_id: Option<&str>,
    (id, index): (&str, &str),
    decision: Decision,
    refusal: &ApiError,
) {
    // Only a well-formed run id is kept: the path is the caller's text.
    let run = parse_run_id(id).ok().map(|r| r.to_string());
    let mut detail = serde_json::json!({
        "decision": match decision {
            Decision::Approve => "approve",
            Decision::Reject => "reject",
            Decision::Expire => "expire",
        },
        "step_index": parse_index(index).ok(),
    });
    if let ApiError::ApprovalAlreadyDecided(Some(approval)) = refusal {
        detail["decided"] = approval.status.clone().into();
        detail["decided_by"] = approval.decided_by.clone().into();
    }
    let entry = NewAudit {
        actor: actor.map_or("anonymous", |a| a.id.as_str()),
        action: "approval.refused",
        target: run.as_deref(),
        outcome: refusal.code(),
        request_id,
        detail: Some(detail.to_string()),
        tenant: actor.map(|a| a.tenant.as_str()),
    };
    if let Err(e) = state.store.append_audit(&entry).await {
        tracing::warn!(error = %e, code = refusal.code(), "could not audit a refused approval decision");
    }
}

async fn decide_as(
    state: &AppState,
    actor: Option<&Actor>,
    request_id: Option<&str>,
    (id, index): (&str, &str),
    body: Result<Bytes, BytesRejection>,
    decision: Decision,
) -> Result<Json<ApprovalView>, ApiError> {
    let Some(actor) = actor.filter(|a| a.approver) else {
        return Err(ApiError::ApproverRequired);
    };
    let bytes = body_bytes(body, state.settings.max_body_bytes)?;
    let comment = parse_comment(&bytes)?;
    let run_id = parse_run_id(id)?;
    let step_index = parse_index(index)?;
    // Another tenant's run is not found, as on every run route.
    let scope = if actor.admin {
        Scope::All
    } else {
        Scope::Tenant(actor.tenant.clone())
    };
    if !state.store.run_visible(run_id, &scope).await? {
        return Err(ApiError::RunNotFound);
    }
    match state
        .store
        .decide_approval(
            run_id,
            step_index,
            decision,
            &actor.id,
            comment.as_deref(),
            request_id,
        )
        .await?
    {
        DecideOutcome::Decided(decided) => {
            state
                .metrics
                .observe_approval(decided.kind, decided.waited_ms);
            tracing::info!(run_id = %run_id, step = step_index, decision = decided.kind.as_str(), actor = %actor.id, "approval decided");
            // The next step (if any) is queued: wake the workers.
            state.nudge().enqueued();
            Ok(Json(ApprovalView::of(&decided.approval)))
        }
        DecideOutcome::RunNotFound => Err(ApiError::RunNotFound),
        DecideOutcome::StepNotFound => Err(ApiError::StepNotFound),
        DecideOutcome::AlreadyDecided => {
            let decided = state.store.get_approval(run_id, step_index).await?;
            Err(ApiError::ApprovalAlreadyDecided(
                decided.map(|a| Box::new(ApprovalView::of(&a))),
            ))
        }
        DecideOutcome::NotAwaiting | DecideOutcome::NotDue => {
            Err(ApiError::StepNotAwaitingApproval)
        }
    }
}

/// Approves a waiting approval step; the run goes on.
#[utoipa::path(
    post,
    path = "/api/v2/runs/{id}/steps/{index}/approve",
    tag = "approvals",
    security(("api_key" = [])),
    request_body(content = Option<DecisionRequest>, description = "Optional comment. Read as JSON whatever the Content-Type; an empty body is no comment."),
    params(
        ("id" = uuid::Uuid, Path, description = "Run id"),
        ("index" = i64, Path, description = "The approval step's index"),
    ),
    responses(
        (status = 200, description = "Approved: the step succeeds with `{\"approved\": true, \"by\", \"comment\"}`", body = ApprovalView),
        (status = 400, description = "invalid_json, invalid_text, invalid_parameter", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "approver_required: the key has neither the approver nor the admin role", body = ErrorBody),
        (status = 404, description = "run_not_found, step_not_found", body = ErrorBody),
        (status = 409, description = "approval_already_decided (with `approval`: the approval as decided), step_not_awaiting_approval", body = ErrorBody),
        (status = 422, description = "invalid_request: unknown field, or a comment over 2,000 characters", body = ErrorBody),
        (status = 503, description = "dependency_unavailable", body = ErrorBody),
    )
)]
pub async fn approve(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    ApiPath(path): ApiPath<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ApprovalView>, ApiError> {
    decide(state, actor, headers, path, body, Decision::Approve).await
}

/// Rejects a waiting approval step; the run fails with reason `rejected`, or
/// goes on with `approved: false` when the step has `on_reject: continue`.
#[utoipa::path(
    post,
    path = "/api/v2/runs/{id}/steps/{index}/reject",
    tag = "approvals",
    security(("api_key" = [])),
    request_body(content = Option<DecisionRequest>, description = "Optional comment. Read as JSON whatever the Content-Type; an empty body is no comment."),
    params(
        ("id" = uuid::Uuid, Path, description = "Run id"),
        ("index" = i64, Path, description = "The approval step's index"),
    ),
    responses(
        (status = 200, description = "Rejected", body = ApprovalView),
        (status = 400, description = "invalid_json, invalid_text, invalid_parameter", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "approver_required: the key has neither the approver nor the admin role", body = ErrorBody),
        (status = 404, description = "run_not_found, step_not_found", body = ErrorBody),
        (status = 409, description = "approval_already_decided (with `approval`: the approval as decided), step_not_awaiting_approval", body = ErrorBody),
        (status = 422, description = "invalid_request: unknown field, or a comment over 2,000 characters", body = ErrorBody),
        (status = 503, description = "dependency_unavailable", body = ErrorBody),
    )
)]
pub async fn reject(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    ApiPath(path): ApiPath<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ApprovalView>, ApiError> {
    decide(state, actor, headers, path, body, Decision::Reject).await
}

/// The approval inbox, oldest request first.
#[utoipa::path(
    get,
    path = "/api/v2/approvals",
    tag = "approvals",
    security(("api_key" = [])),
    params(
        ("status" = Option<String>, Query, description = "`pending` (default), `decided` or `all`"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 200 (default 50)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, body = ApprovalList),
        (status = 400, description = "invalid_parameter, invalid_cursor", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 503, description = "dependency_unavailable", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<ApprovalList>, ApiError> {
    let query = parse_query(raw, &["status", "limit", "cursor"])?;
    let status = match query.get("status").map(String::as_str) {
        None | Some("pending") => ApprovalStatus::Pending,
        Some("decided") => ApprovalStatus::Decided,
        Some("all") => ApprovalStatus::All,
        Some(_) => {
            return Err(ApiError::InvalidParameter(
                "status: expected one of pending, decided, all".into(),
            ));
        }
    };
    let limit = parse_limit(&query, APPROVALS_PAGE)?;
    let after = query
        .get("cursor")
        .map(|c| paging::decode_cursor(APPROVALS_CURSOR, c))
        .transpose()?;
    let mut approvals = state
        .store
        .list_approvals(&ApprovalFilter {
            status,
            after,
            limit: limit + 1,
            scope: scope_of(actor.as_ref()),
        })
        .await?;
    let next_cursor = paging::next_page(&mut approvals, limit, |a| {
        paging::encode_cursor(
            APPROVALS_CURSOR,
            crate::store::approvals::ApprovalKey {
                requested_at: a.requested_at,
                run_id: a.run_id,
                step_index: a.step_index,
            },
        )
    });
    Ok(Json(ApprovalList {
        approvals: approvals.iter().map(ApprovalView::of).collect(),
        next_cursor,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decision_bodies_are_optional_and_bounded() {
        assert_eq!(parse_comment(b"").unwrap(), None);
        assert_eq!(parse_comment(b"{}").unwrap(), None);
        assert_eq!(
            parse_comment(br#"{"comment":"ship it"}"#)
                .unwrap()
                .as_deref(),
            Some("ship it")
        );
        assert!(matches!(
            parse_comment(b"{not json").unwrap_err(),
            ApiError::InvalidJson(_)
        ));
        assert!(matches!(
            parse_comment(br#"{"comment":"x","extra":1}"#).unwrap_err(),
            ApiError::InvalidRequest(_)
        ));
        assert!(matches!(
            parse_comment(br#"{"comment":5}"#).unwrap_err(),
            ApiError::InvalidRequest(_)
        ));
        let long = format!(r#"{{"comment":"{}"}}"#, "é".repeat(MAX_COMMENT_CHARS + 1));
        assert!(matches!(
            parse_comment(long.as_bytes()).unwrap_err(),
            ApiError::InvalidRequest(_)
        ));
        assert!(matches!(
            parse_comment(br#"{"comment":"a\u0000b"}"#).unwrap_err(),
            ApiError::InvalidText
        ));
    }

    #[test]
    fn step_indexes_that_are_not_whole_numbers_name_no_step() {
        assert_eq!(parse_index("3").unwrap(), 3);
        for bad in ["-1", "x", "1.5", ""] {
            assert!(matches!(parse_index(bad), Err(ApiError::StepNotFound)));
        }
    }
}
