//! Tenants, plans and usage:
//!
//! - `PUT /api/v2/tenants/{tenant}/plan` `{"plan": "pro"}` (admin): the
//!   tenant's plan from now on (database clock); usage so far stays, the new
//!   allowances apply from the change, the invoice preview prorates by time
//!   in the period. Stored in the database, overriding the plans file's map.
//! - `GET /api/v2/tenants/{tenant}/usage?period=YYYY-MM` (that tenant's keys
//!   or admin; another tenant is `404 tenant_not_found`): per meter used,
//!   allowance, remaining, overage and the invoice preview.
//! - `GET /api/v2/usage/export?period=YYYY-MM` (admin): CSV for billing,
//!   one line per tenant and meter, streamed tenant by tenant.
//!
//! Plan changes and exports are audited (`tenant.plan_changed`,
//! `usage.exported`); runs refused by a quota are audited by the store
//! (`quota.blocked`). Without `period` the database clock's month is used.

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::ApiPath;
use crate::http::paging::parse_query;
use crate::http::security::Actor;
use crate::http::views::ErrorBody;
use crate::period::Period;
use crate::plans::valid_tenant;
use crate::store::security::NewAudit;
use crate::store::usage::UsageReport;

/// Body of `PUT /tenants/{tenant}/plan`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    /// A plan of the plans file.
    pub plan: String,
}

/// Answer of `PUT /tenants/{tenant}/plan`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanAssigned {
    /// The tenant.
    pub tenant: String,
    /// Its plan from now on.
    pub plan: String,
    /// The plan it had until now (absent without one).
    pub previous_plan: Option<String>,
    /// When the change took effect (RFC 3339, database clock).
    pub effective_from: String,
}

fn admin(actor: &Option<Extension<Actor>>) -> bool {
    actor.as_ref().is_some_and(|Extension(a)| a.admin)
}

fn request_id(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-request-id").and_then(|v| v.to_str().ok())
}

/// The `period` query parameter, else the database clock's month.
async fn period_of(state: &AppState, raw: Option<String>) -> Result<Period, ApiError> {
    let query = parse_query(raw, &["period"])?;
    match query.get("period") {
        Some(p) => Period::parse(p).ok_or(ApiError::InvalidPeriod),
        None => {
            let now = state.store.current_period().await?;
            Period::parse(&now).ok_or(ApiError::Internal)
        }
    }
}

/// Changes a tenant's plan from now on.
#[utoipa::path(
    put,
    path = "/api/v2/tenants/{tenant}/plan",
    tag = "tenants",
    security(("api_key" = [])),
    params(("tenant" = String, Path, description = "Tenant name (1 to 64 of letters, digits, - _ :, or webhook:<source>)")),
    request_body(content = PlanRequest, description = "The plan, from the plans file"),
    responses(
        (status = 200, body = PlanAssigned),
        (status = 400, description = "invalid_json, invalid_parameter (not a tenant name)", body = ErrorBody),
        (status = 403, description = "forbidden: not an admin key", body = ErrorBody),
        (status = 422, description = "unknown_plan (also when VM_PLANS_FILE is not set), invalid_request", body = ErrorBody),
    )
)]
pub async fn set_plan(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    ApiPath(tenant): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PlanAssigned>, ApiError> {
    if !admin(&actor) {
        return Err(ApiError::Forbidden);
    }
    if !valid_tenant(&tenant) {
        return Err(ApiError::InvalidParameter(
            "tenant: expected 1 to 64 of letters, digits, -, _ or :, or webhook:<source>".into(),
        ));
    }
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(state.settings.max_body_bytes)
        } else {
            ApiError::InvalidRequest("request body could not be read".into())
        }
    })?;
    let request: PlanRequest = crate::http::body::from_json_object(&bytes)?;
    let Some(plans) = state.store.plans() else {
        return Err(ApiError::UnknownPlan(
            "no plans are configured (VM_PLANS_FILE is not set)".into(),
        ));
    };
    if plans.plan(&request.plan).is_none() {
        let known: Vec<&str> = plans.plans.keys().map(String::as_str).collect();
        return Err(ApiError::UnknownPlan(format!(
            "unknown plan; the plans are: {}",
            known.join(", ")
        )));
    }
    let previous_plan = state.store.plan_of(&tenant).await?.map(|p| p.name);
    let actor_id = actor.map_or_else(|| "anonymous".to_string(), |Extension(a)| a.id);
    let at = state
        .store
        .assign_plan(&tenant, &request.plan, &actor_id, request_id(&headers))
        .await?;
    tracing::info!(%tenant, plan = %request.plan, actor = %actor_id, "tenant plan changed");
    Ok(Json(PlanAssigned {
        tenant,
        plan: request.plan,
        previous_plan,
        effective_from: crate::model::rfc3339(at),
    }))
}

/// A tenant's usage in a period, with the invoice preview.
#[utoipa::path(
    get,
    path = "/api/v2/tenants/{tenant}/usage",
    tag = "tenants",
    security(("api_key" = [])),
    params(
        ("tenant" = String, Path, description = "Tenant name"),
        ("period" = Option<String>, Query, description = "UTC month YYYY-MM (default: the current one)"),
    ),
    responses(
        (status = 200, body = UsageReport),
        (status = 400, description = "invalid_period, invalid_parameter", body = ErrorBody),
        (status = 404, description = "tenant_not_found: not a tenant name, or another tenant's (only admin keys see every tenant)", body = ErrorBody),
    )
)]
pub async fn usage(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    ApiPath(tenant): ApiPath<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<UsageReport>, ApiError> {
    let allowed = actor
        .as_ref()
        .is_some_and(|Extension(a)| a.admin || a.tenant == tenant);
    if !allowed || !valid_tenant(&tenant) {
        return Err(ApiError::TenantNotFound);
    }
    let period = period_of(&state, raw).await?;
    Ok(Json(state.store.usage_report(&tenant, period).await?))
}

/// Header line of the usage export.
pub const EXPORT_HEADER: &str = "tenant,period,plan,meter,used,allowance,overage_policy,unit_price,prorated_allowance,billable_overage,preview\n";

/// A name as a CSV cell: names are `[A-Za-z0-9_:-]`, so nothing needs
/// quoting, but one starting with `-` (or `=`, `+`, `@`) would be read as a
/// formula by a spreadsheet, so it gets a leading `'` (OWASP's advice).
fn text_cell(name: &str) -> String {
    if name.starts_with(['=', '+', '-', '@']) {
        format!("'{name}")
    } else {
        name.to_string()
    }
}

/// One tenant's CSV lines.
fn csv_lines(report: &UsageReport) -> String {
    let mut out = String::new();
    let opt = |v: Option<String>| v.unwrap_or_default();
    for m in &report.meters {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{}\n",
            text_cell(&report.tenant),
            report.period,
            opt(report.plan.as_deref().map(text_cell)),
            m.meter,
            m.used,
            opt(m.allowance.map(|a| a.to_string())),
            opt(m.overage_policy.clone()),
            m.unit_price,
            opt(m.prorated_allowance.map(|a| a.to_string())),
            m.billable_overage,
            m.preview
        ));
    }
    out
}

/// Every tenant's usage in a period, as CSV for billing.
#[utoipa::path(
    get,
    path = "/api/v2/usage/export",
    tag = "tenants",
    security(("api_key" = [])),
    params(("period" = Option<String>, Query, description = "UTC month YYYY-MM (default: the current one)")),
    responses(
        (status = 200, description = "CSV: tenant, period, plan, meter, used, allowance, overage_policy, unit_price, prorated_allowance, billable_overage, preview", content_type = "text/csv", body = String),
        (status = 400, description = "invalid_period, invalid_parameter", body = ErrorBody),
        (status = 403, description = "forbidden: not an admin key", body = ErrorBody),
    )
)]
pub async fn export(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    if !admin(&actor) {
        return Err(ApiError::Forbidden);
    }
    let period = period_of(&state, raw).await?;
    let tenants = state.store.tenants_with_usage(&period.to_string()).await?;
    let actor_id = actor.map_or_else(|| "anonymous".to_string(), |Extension(a)| a.id);
    state
        .store
        .append_audit(&NewAudit {
            actor: &actor_id,
            action: "usage.exported",
            target: Some(&period.to_string()),
            outcome: "success",
            request_id: request_id(&headers),
            detail: Some(
                json!({"period": period.to_string(), "tenants": tenants.len()}).to_string(),
            ),
            tenant: None,
        })
        .await?;
    // One tenant's report at a time: memory stays flat whatever the tenants.
    let store = state.store.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(8);
    tokio::spawn(async move {
        if tx.send(Ok(EXPORT_HEADER.to_string())).await.is_err() {
            return;
        }
        for tenant in tenants {
            let line = match store.usage_report(&tenant, period).await {
                Ok(report) => Ok(csv_lines(&report)),
                Err(e) => {
                    tracing::error!(error = %e, "usage export failed part-way");
                    Err(std::io::Error::other("usage export failed"))
                }
            };
            let failed = line.is_err();
            if tx.send(line).await.is_err() || failed {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"usage-{period}.csv\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
