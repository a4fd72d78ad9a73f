//! `GET /api/v2/audit`: the audit trail, newest first, for admin keys only.

use axum::extract::{RawQuery, State};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::paging::{self, parse_limit, parse_query};
use crate::http::security::Actor;
use crate::http::views::ErrorBody;
use crate::store::security::{AuditEntry, AuditFilter};

/// A page of audit entries.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    /// Newest first.
    pub entries: Vec<AuditEntry>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Tag of audit cursors.
const AUDIT_CURSOR: &str = "a1";

/// Lists the audit trail.
#[utoipa::path(
    get,
    path = "/api/v2/audit",
    tag = "audit",
    security(("api_key" = [])),
    params(
        ("action" = Option<String>, Query, description = "e.g. run.created, run.cancelled, approval.approved, approval.refused, webhook.accepted, webhook.rejected, auth.failed"),
        ("actor" = Option<String>, Query, description = "API key id, webhook:<source>, anonymous"),
        ("outcome" = Option<String>, Query, description = "success, denied, or a rejection code"),
        ("limit" = Option<i64>, Query, description = "1 to 500 (default 100)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, body = AuditList),
        (status = 400, description = "invalid_parameter, invalid_cursor, invalid_text (a filter the database cannot store, such as a NUL byte)", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: not an admin key", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<AuditList>, ApiError> {
    if !actor.is_some_and(|Extension(a)| a.admin) {
        return Err(ApiError::Forbidden);
    }
    let query = parse_query(raw, &["action", "actor", "outcome", "limit", "cursor"])?;
    let limit = parse_limit(&query, (100, 500))?;
    let filter = AuditFilter {
        action: query.get("action").cloned(),
        actor: query.get("actor").cloned(),
        outcome: query.get("outcome").cloned(),
        before: query
            .get("cursor")
            .map(|c| paging::decode_cursor(AUDIT_CURSOR, c))
            .transpose()?,
        limit: limit + 1,
    };
    let mut entries = state.store.list_audit(&filter).await?;
    let next_cursor = paging::next_page(&mut entries, limit, |e| {
        paging::encode_cursor(AUDIT_CURSOR, e.id)
    });
    Ok(Json(AuditList {
        entries,
        next_cursor,
    }))
}
