//! `GET /api/v2/audit`: the audit trail, newest first, for admin keys only.

use axum::extract::{RawQuery, State};
use axum::{Extension, Json};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use utoipa::ToSchema;

use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::runs::{parse_limit, parse_query};
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

fn decode_cursor(c: &str) -> Result<i64, ApiError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| ApiError::InvalidCursor)?;
    let text = String::from_utf8(bytes).map_err(|_| ApiError::InvalidCursor)?;
    text.strip_prefix("a1:")
        .and_then(|n| n.parse().ok())
        .ok_or(ApiError::InvalidCursor)
}

/// Lists the audit trail.
#[utoipa::path(
    get,
    path = "/api/v2/audit",
    tag = "audit",
    security(("api_key" = [])),
    params(
        ("action" = Option<String>, Query, description = "e.g. run.created, run.cancelled, webhook.accepted, webhook.rejected, auth.failed"),
        ("actor" = Option<String>, Query, description = "API key id, webhook:<source>, anonymous"),
        ("outcome" = Option<String>, Query, description = "success, denied, or a rejection code"),
        ("limit" = Option<i64>, Query, description = "1 to 500 (default 100)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, body = AuditList),
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
        before: query.get("cursor").map(|c| decode_cursor(c)).transpose()?,
        limit: limit + 1,
    };
    let mut entries = state.store.list_audit(&filter).await?;
    let next_cursor = if entries.len() as i64 > limit {
        entries.truncate(limit as usize);
        entries
            .last()
            .map(|e| URL_SAFE_NO_PAD.encode(format!("a1:{}", e.id)))
    } else {
        None
    };
    Ok(Json(AuditList {
        entries,
        next_cursor,
    }))
}
