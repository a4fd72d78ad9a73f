//! The API's error type: every failure becomes a JSON body
//! `{"code": "...", "message": "..."}` with a stable `code`.
//!
//! Client mistakes are 4xx and say what to fix. Server-side failures are
//! logged with the request's span (which carries its request id) and answered
//! with a generic message: their details never leave the process.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::model::RunStatus;
use crate::steps::StepValidationError;
use crate::store::StoreError;

/// Everything a handler can answer instead of success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_json`: the body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// 422 `invalid_request`: JSON, but not the expected shape.
    #[error("{0}")]
    InvalidRequest(String),
    /// 422 `unknown_step_kind` / `invalid_step`: a step is wrong.
    #[error(transparent)]
    InvalidStep(#[from] StepValidationError),
    /// 422 `llm_unavailable`: `llm` steps need an endpoint that is not configured.
    #[error(
        "this deployment has no LLM endpoint configured (KIMI_API_KEY), so runs with llm steps cannot be accepted"
    )]
    LlmUnavailable,
    /// 413 `payload_too_large`.
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// 400 `invalid_parameter`: a query parameter or header is wrong.
    #[error("{0}")]
    InvalidParameter(String),
    /// 400 `invalid_cursor`.
    #[error("cursor is not one this API issued; start again without it")]
    InvalidCursor,
    /// 400 `invalid_idempotency_key`.
    #[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
    InvalidIdempotencyKey,
    /// 400 `invalid_request_id`: `x-request-id` is present but unusable.
    #[error("x-request-id must be 1 to 128 visible ASCII characters")]
    InvalidRequestId,
    /// 400 `invalid_correlation_id`: `x-correlation-id` is present but unusable.
    #[error("x-correlation-id must be 1 to 128 of A-Z a-z 0-9 - _ . :")]
    InvalidCorrelationId,
    /// 400 `invalid_client_address`: the trusted proxy header is present, but
    /// its last entry (the one the proxy added) is not an IP address.
    #[error("the last entry of the trusted proxy header is not an IP address")]
    InvalidClientAddress,
    /// 404 `run_not_found`.
    #[error("run not found")]
    RunNotFound,
    /// 404 `step_not_found`: the run has no step with that index.
    #[error("the run has no step with that index")]
    StepNotFound,
    /// 409 `approval_already_decided`: the approval step was already
    /// approved, rejected or expired. The body's `approval` is the approval
    /// as decided (decision, by whom, comment), so a client retrying after a
    /// lost response can tell whether its own decision won.
    #[error("this approval step was already decided")]
    ApprovalAlreadyDecided(Option<Box<crate::http::views::ApprovalView>>),
    /// 409 `step_not_awaiting_approval`: the step is not an approval step,
    /// has not been reached yet, or its run ended while it waited.
    #[error("this step is not waiting for an approval")]
    StepNotAwaitingApproval,
    /// 403 `approver_required`: deciding approvals needs a key with the
    /// `approver` or `admin` role.
    #[error("deciding approvals needs an API key with the approver or admin role")]
    ApproverRequired,
    /// 404 `route_not_found`.
    #[error("no such route")]
    RouteNotFound,
    /// 405 `method_not_allowed`.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 409 `idempotency_key_conflict`: the key was used with a different body.
    #[error("Idempotency-Key was already used with a different request body")]
    IdempotencyConflict,
    /// 409 `run_not_cancellable`: the run already finished.
    #[error("run is already {} and cannot be cancelled", .0.as_str())]
    NotCancellable(RunStatus),
    /// 503 `dependency_unavailable`: the database cannot be reached right now.
    #[error("the database is unavailable; retry later")]
    DependencyUnavailable,
    /// 503 `shutting_down`.
    #[error("the server is shutting down; retry on another instance")]
    ShuttingDown,
    /// 503 `too_many_streams`: this instance serves as many live-update
    /// streams as it may (`VM_STREAM_MAX_SUBSCRIBERS`), or as many to this
    /// key (`VM_STREAM_MAX_PER_KEY`).
    #[error(
        "this instance serves as many live-update streams as it may, in all or to this API key; close one or retry later"
    )]
    TooManyStreams,
    /// 401 `unauthorized`: no or wrong API key.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403 `forbidden`: the key may not do this.
    #[error("this API key may not do this")]
    Forbidden,
    /// 429 `rate_limited`, with `Retry-After` seconds.
    #[error("too many requests; retry after {0} s")]
    RateLimited(u64),
    /// 431 `headers_too_large`.
    #[error("request headers are too many or too large")]
    HeadersTooLarge,
    /// 408 `request_timeout`.
    #[error("the request took longer than the server's limit")]
    RequestTimeout,
    /// 404 `unknown_webhook_source`.
    #[error("no webhook source of that name is configured")]
    UnknownWebhookSource,
    /// 401 `missing_signature`: a signature header is absent.
    #[error("{0}")]
    MissingSignature(&'static str),
    /// 401 `invalid_signature`: the signature does not match the body, or
    /// `x-vm-signature` is present but not `sha256=<hex>`.
    #[error("{0}")]
    InvalidSignature(&'static str),
    /// 401 `invalid_timestamp`: `x-vm-timestamp` is present but not Unix seconds.
    #[error("x-vm-timestamp must be Unix seconds")]
    InvalidTimestamp,
    /// 401 `invalid_nonce`: `x-vm-nonce` is present but not 8 to 128 of `A-Z a-z 0-9 - _`.
    #[error("x-vm-nonce must be 8 to 128 of A-Z a-z 0-9 - _")]
    InvalidNonce,
    /// 401 `stale_timestamp`.
    #[error("the timestamp is outside the accepted window")]
    StaleTimestamp,
    /// 409 `replayed_nonce`.
    #[error("this nonce was already used")]
    ReplayedNonce,
    /// 403 `address_not_allowed`.
    #[error("the sender's address is not allowed")]
    AddressNotAllowed,
    /// 400 `invalid_text`: a text value the database cannot store (a NUL
    /// byte, for PostgreSQL). Refused as the client's mistake, never a 500.
    #[error("a text value contains a character that cannot be stored (such as a NUL byte)")]
    InvalidText,
    /// 402 `quota_exceeded`: the tenant's `block` allowance is used up for
    /// the period; the body adds `meter`, `allowance`, `used`, `period` and
    /// `resets_at`.
    #[error("the {} allowance of {} for {} is used up; it resets at {}", .0.meter.as_str(), .0.allowance, .0.period, .0.resets_at().unwrap_or_else(|| "the start of the next month".into()))]
    QuotaExceeded(Box<crate::store::QuotaRefusal>),
    /// 422 `unknown_plan`: the plan is not in the plans file (or there is no
    /// plans file).
    #[error("{0}")]
    UnknownPlan(String),
    /// 400 `invalid_period`: `period` is not a `YYYY-MM` month.
    #[error("period must be a month as YYYY-MM (UTC) from 2000-01 to 9999-11, such as 2026-11")]
    InvalidPeriod,
    /// 404 `tenant_not_found`: not a tenant name, or not one this key may see.
    #[error("tenant not found")]
    TenantNotFound,
    /// 500 `internal`.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidParameter(_)
            | ApiError::InvalidCursor
            | ApiError::InvalidIdempotencyKey
            | ApiError::InvalidText
            | ApiError::InvalidRequestId
            | ApiError::InvalidCorrelationId
            | ApiError::InvalidClientAddress => StatusCode::BAD_REQUEST,
            ApiError::InvalidRequest(_)
            | ApiError::InvalidStep(_)
            | ApiError::LlmUnavailable
            | ApiError::UnknownPlan(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::QuotaExceeded(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::InvalidPeriod => StatusCode::BAD_REQUEST,
            ApiError::TenantNotFound => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RunNotFound | ApiError::RouteNotFound | ApiError::StepNotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::ApprovalAlreadyDecided(_) | ApiError::StepNotAwaitingApproval => {
                StatusCode::CONFLICT
            }
            ApiError::ApproverRequired => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::IdempotencyConflict | ApiError::NotCancellable(_) => StatusCode::CONFLICT,
            ApiError::DependencyUnavailable | ApiError::ShuttingDown | ApiError::TooManyStreams => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Unauthorized(_)
            | ApiError::MissingSignature(_)
            | ApiError::InvalidSignature(_)
            | ApiError::InvalidTimestamp
            | ApiError::InvalidNonce
            | ApiError::StaleTimestamp => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::AddressNotAllowed => StatusCode::FORBIDDEN,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnknownWebhookSource => StatusCode::NOT_FOUND,
            ApiError::ReplayedNonce => StatusCode::CONFLICT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::InvalidStep(e) => e.code,
            ApiError::LlmUnavailable => "llm_unavailable",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::InvalidParameter(_) => "invalid_parameter",
            ApiError::InvalidCursor => "invalid_cursor",
            ApiError::InvalidIdempotencyKey => "invalid_idempotency_key",
            ApiError::InvalidRequestId => "invalid_request_id",
            ApiError::InvalidCorrelationId => "invalid_correlation_id",
            ApiError::InvalidClientAddress => "invalid_client_address",
            ApiError::RunNotFound => "run_not_found",
            ApiError::RouteNotFound => "route_not_found",
            ApiError::StepNotFound => "step_not_found",
            ApiError::ApprovalAlreadyDecided(_) => "approval_already_decided",
            ApiError::StepNotAwaitingApproval => "step_not_awaiting_approval",
            ApiError::ApproverRequired => "approver_required",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::IdempotencyConflict => "idempotency_key_conflict",
            ApiError::NotCancellable(_) => "run_not_cancellable",
            ApiError::DependencyUnavailable => "dependency_unavailable",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::TooManyStreams => "too_many_streams",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::HeadersTooLarge => "headers_too_large",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::UnknownWebhookSource => "unknown_webhook_source",
            ApiError::MissingSignature(_) => "missing_signature",
            ApiError::InvalidSignature(_) => "invalid_signature",
            ApiError::InvalidTimestamp => "invalid_timestamp",
            ApiError::InvalidNonce => "invalid_nonce",
            ApiError::StaleTimestamp => "stale_timestamp",
            ApiError::ReplayedNonce => "replayed_nonce",
            ApiError::AddressNotAllowed => "address_not_allowed",
            ApiError::InvalidText => "invalid_text",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::UnknownPlan(_) => "unknown_plan",
            ApiError::InvalidPeriod => "invalid_period",
            ApiError::TenantNotFound => "tenant_not_found",
            ApiError::Internal => "internal",
        }
    }
}

/// At most one "database unavailable" line per [`LogThrottle::EVERY_MS`]:
/// during an outage every request is refused, and one line each came to
/// tens of thousands of lines in seconds. Each refusal is still counted in
/// `vm_http_requests_total{status_class="5xx"}`, and the line says how
/// many were held back since the last one.
static UNAVAILABLE_LOG: LogThrottle = LogThrottle::new();

/// Lets a repeated log line through at most once per [`Self::EVERY_MS`],
/// counting the ones held back.
struct LogThrottle {
    /// When a line last went through: ms since the process's first line.
    last_ms: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogThrottle {
    const EVERY_MS: u64 = 5_000;

    const fn new() -> Self {
        Self {
            last_ms: std::sync::atomic::AtomicU64::new(u64::MAX),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when this line may go
    /// through now, else `None` (and it is counted).
    fn take(&self) -> Option<u64> {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now_ms = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis();
        self.take_at(u64::try_from(now_ms).unwrap_or(u64::MAX - 1))
    }

    /// [`Self::take`] at `now_ms` (ms on a monotonic clock).
    fn take_at(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last_ms.load(Relaxed);
        let due = last == u64::MAX || now_ms.saturating_sub(last) >= Self::EVERY_MS;
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms, Relaxed, Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            if let Some(suppressed) = UNAVAILABLE_LOG.take() {
                tracing::warn!(error = %e, suppressed, "database unavailable; answering 503");
            }
            ApiError::DependencyUnavailable
        } else if matches!(e, StoreError::InvalidText(_)) {
            ApiError::InvalidText
        } else {
            tracing::error!(error = ?e, "store error");
            ApiError::Internal
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = json!({"code": self.code(), "message": self.to_string()});
        if let ApiError::QuotaExceeded(refusal) = &self {
            body["meter"] = json!(refusal.meter.as_str());
            body["allowance"] = json!(refusal.allowance);
            body["used"] = json!(refusal.used);
            body["period"] = json!(refusal.period);
            body["resets_at"] = json!(refusal.resets_at());
        }
        if let ApiError::ApprovalAlreadyDecided(Some(approval)) = &self {
            body["approval"] = json!(approval);
        }
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::RateLimited(seconds) => {
                headers.insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from(*seconds),
                );
            }
            ApiError::Unauthorized(_) => {
                headers.insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
            }
            _ if status == StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::LogThrottle;

    #[test]
    fn a_throttled_line_goes_through_once_per_interval_with_the_count_held_back() {
        let throttle = LogThrottle::new();
        assert_eq!(throttle.take_at(1_000), Some(0));
        assert_eq!(throttle.take_at(1_001), None);
        assert_eq!(throttle.take_at(5_999), None);
        assert_eq!(throttle.take_at(6_000), Some(2));
        assert_eq!(throttle.take_at(6_001), None);
        assert_eq!(throttle.take_at(60_000), Some(1));
    }
}
