//! `POST /api/v2/webhooks/{source}`: signed deliveries from other systems.
//!
//! The sender signs `"{timestamp}.{nonce}.{body}"` with HMAC-SHA256 under the
//! source's secret and sends `x-vm-timestamp` (Unix seconds), `x-vm-nonce`
//! (8 to 128 of `A-Z a-z 0-9 - _`) and `x-vm-signature: sha256=<hex>`.
//! Checks, in order: the source is configured (404), the sender's address is
//! allowed (403), the headers are present (401 `missing_signature`) and
//! readable (401 `invalid_timestamp`, `invalid_nonce`, `invalid_signature`:
//! a header that is there but unreadable is never called missing), the
//! timestamp is within the
//! tolerance (401), the signature matches one of the source's secrets (401,
//! several secrets are valid during rotation), and the nonce was not seen in
//! the window (409; remembered in Redis with a TTL, or in the database). A
//! nonce is remembered only after the signature checks out, so nobody can
//! burn another sender's nonces. Every outcome is audited.
//!
//! An accepted body `{"run": {"input": {...}, "steps": [...]}}` starts a run
//! (idempotent on the nonce); any other body is recorded only.

use crate::http::extract::ApiPath;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::runs::{NewRunRequest, create_from_body, parse_create_body};
use crate::http::security::client_ip;
use crate::http::views::ErrorBody;
use crate::model::now_ms;
use crate::steps::parse_steps;
use crate::store::security::NewAudit;

/// Answer to an accepted delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAccepted {
    /// Delivery id.
    pub delivery_id: i64,
    /// The run started by the delivery, if it asked for one.
    pub run_id: Option<Uuid>,
}

/// The signed payload: `"{timestamp}.{nonce}.{body}"`.
pub fn signed_payload(timestamp: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(timestamp.len() + nonce.len() + body.len() + 2);
    payload.extend_from_slice(timestamp.as_bytes());
    payload.push(b'.');
    payload.extend_from_slice(nonce.as_bytes());
    payload.push(b'.');
    payload.extend_from_slice(body);
    payload
}

/// `sha256=<hex>` of the payload under `secret` (what senders compute).
pub fn sign(secret: &[u8], timestamp: &str, nonce: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(&signed_payload(timestamp, nonce, body));
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `signature` (`sha256=<hex>`) matches under any of `secrets`,
/// compared in constant time.
pub fn verify_signature<'a>(
    secrets: impl IntoIterator<Item = &'a [u8]>,
    timestamp: &str,
    nonce: &str,
    body: &[u8],
    signature: &str,
) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let payload = signed_payload(timestamp, nonce, body);
    let mut ok = false;
    for secret in secrets {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
            continue;
        };
        mac.update(&payload);
        ok |= mac.verify_slice(&expected).is_ok();
    }
    ok
}

/// A header's state: absent, present but unreadable (not visible ASCII), or
/// its text. Kind: present but unreadable is `invalid_*`, never `missing_*`.
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ()> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|t| Some(t.trim())).map_err(|_| ()),
    }
}

/// The signature headers, checked for shape only: absent is
/// `missing_signature`; present but unreadable or malformed is
/// `invalid_timestamp`, `invalid_nonce` or `invalid_signature`.
pub fn signature_headers(headers: &HeaderMap) -> Result<(String, i64, String, String), ApiError> {
    let timestamp = header_text(headers, "x-vm-timestamp")
        .map_err(|()| ApiError::InvalidTimestamp)?
        .ok_or(ApiError::MissingSignature("x-vm-timestamp is required"))?;
    let seconds: i64 = timestamp.parse().map_err(|_| ApiError::InvalidTimestamp)?;
    let nonce = header_text(headers, "x-vm-nonce")
        .map_err(|()| ApiError::InvalidNonce)?
        .ok_or(ApiError::MissingSignature("x-vm-nonce is required"))?;
    if !(8..=128).contains(&nonce.len())
        || !nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::InvalidNonce);
    }
    const SHAPE: &str = "x-vm-signature must be sha256=<hex>";
    let signature = header_text(headers, "x-vm-signature")
        .map_err(|()| ApiError::InvalidSignature(SHAPE))?
        .ok_or(ApiError::MissingSignature("x-vm-signature is required"))?;
    Ok((
        timestamp.to_string(),
        seconds,
        nonce.to_string(),
        signature.to_string(),
    ))
}

/// Receives one signed delivery.
#[utoipa::path(
    post,
    path = "/api/v2/webhooks/{source}",
    tag = "webhooks",
    params(
        ("source" = String, Path, description = "Configured webhook source"),
        ("x-vm-timestamp" = String, Header, description = "Unix seconds"),
        ("x-vm-nonce" = String, Header, description = "8 to 128 of A-Z a-z 0-9 - _; single use within the window"),
        ("x-vm-signature" = String, Header, description = "sha256=<hex HMAC-SHA256 of \"{timestamp}.{nonce}.{body}\">"),
    ),
    request_body(content = Object, description = "Any JSON; {\"run\": {\"input\", \"steps\"}} starts a run"),
    responses(
        (status = 202, body = WebhookAccepted),
        (status = 400, description = "invalid_client_address: the trusted proxy header's last entry is not an address; invalid_text (a requested run holds a text the database cannot store)", body = ErrorBody),
        (status = 401, description = "missing_signature (a header is absent), invalid_timestamp, invalid_nonce, invalid_signature (present but unreadable, malformed or not matching), stale_timestamp", body = ErrorBody),
        (status = 403, description = "address_not_allowed", body = ErrorBody),
        (status = 402, description = "quota_exceeded: the `block` allowance of runs of the tenant webhook:<source> is used up; nothing was created and the nonce is not spent, so the sender may retry", body = ErrorBody),
        (status = 404, description = "unknown_webhook_source", body = ErrorBody),
        (status = 409, description = "replayed_nonce", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 422, description = "a requested run is invalid: invalid_request, invalid_step, unknown_step_kind, llm_unavailable (checked before the nonce is spent)", body = ErrorBody),
        (status = 429, description = "rate_limited", body = ErrorBody),
        (status = 503, description = "dependency_unavailable, shutting_down", body = ErrorBody),
    )
)]
pub async fn receive(
    State(state): State<AppState>,
    ApiPath(source): ApiPath<String>,
    req: Request,
) -> Result<(StatusCode, Json<WebhookAccepted>), ApiError> {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (address, outcome) = match client_ip(&req, &state.settings.security) {
        Ok(address) => (address, accept(&state, &source, address, req).await),
        Err(e) => (None, Err(e)),
    };
    let (code, detail) = match &outcome {
        Ok(_) => ("accepted", None),
        Err(e) => (
            e.code(),
            address.map(|a| serde_json::json!({"address": a.to_string()}).to_string()),
        ),
    };
    state.metrics.webhook(code);
    let known = state
        .settings
        .security
        .webhook_secrets
        .iter()
        .any(|s| s.source == source);
    let actor = if known {
        format!("webhook:{source}")
    } else {
        "webhook:unknown".to_string()
    };
    let tenant = crate::config::webhook_tenant(&source);
    let entry = NewAudit {
        actor: &actor,
        // Runs from a webhook belong to the tenant `webhook:<source>`.
        tenant: known.then_some(tenant.as_str()),
        action: if outcome.is_ok() {
            "webhook.accepted"
        } else {
            "webhook.rejected"
        },
        target: known.then_some(source.as_str()),
        outcome: if outcome.is_ok() { "success" } else { code },
        request_id: request_id.as_deref(),
        detail: match &outcome {
            Ok(a) => Some(
                serde_json::json!({"delivery_id": a.delivery_id, "run_id": a.run_id}).to_string(),
            ),
            Err(_) => detail,
        },
    };
    if let Err(e) = state.store.append_audit(&entry).await {
        tracing::warn!(error = %e, "could not audit a webhook delivery");
    }
    outcome.map(|a| (StatusCode::ACCEPTED, Json(a)))
}

async fn accept(
    state: &AppState,
    source: &str,
    address: Option<std::net::IpAddr>,
    req: Request,
) -> Result<WebhookAccepted, ApiError> {
    // Refused before anything is remembered, so the sender's retry lands
    // on another instance and succeeds.
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let security = &state.settings.security;
    let secrets: Vec<&[u8]> = security
        .webhook_secrets
        .iter()
        .filter(|s| s.source == source)
        .map(|s| s.secret.expose().as_bytes())
        .collect();
    if secrets.is_empty() {
        return Err(ApiError::UnknownWebhookSource);
    }
    if !security.webhook_allowed.is_empty() {
        let allowed =
            address.is_some_and(|ip| security.webhook_allowed.iter().any(|net| net.contains(&ip)));
        if !allowed {
            return Err(ApiError::AddressNotAllowed);
        }
    }
    let (timestamp, seconds, nonce, signature) = signature_headers(req.headers())?;
    let tolerance = security.webhook_tolerance;
    let now = now_ms();
    // Checked: an absurd timestamp is stale, not an overflow.
    let skew = (now / 1000).checked_sub(seconds).map(i64::unsigned_abs);
    if skew.is_none_or(|s| s > tolerance.as_secs()) {
        return Err(ApiError::StaleTimestamp);
    }
    let body: Bytes = axum::body::to_bytes(req.into_body(), state.settings.max_body_bytes)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(state.settings.max_body_bytes))?;
    if !verify_signature(secrets, &timestamp, &nonce, &body, &signature) {
        return Err(ApiError::InvalidSignature(
            "the signature does not match the body",
        ));
    }
    // A requested run is validated before the nonce is spent.
    let value: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let run = value
        .as_ref()
        .and_then(|v| v.get("run"))
        .map(|run| run.to_string().into_bytes());
    if let Some(run) = &run {
        let (input, steps) = parse_create_body(run)?;
        parse_steps(&steps, &input)?;
    }
    // Remembered for twice the tolerance: a timestamp can be up to one
    // tolerance in the future or the past.
    let ttl = tolerance * 2;
    if !remember_nonce(state, source, &nonce, ttl).await? {
        return Err(ApiError::ReplayedNonce);
    }
    let done = deliver(state, source, &nonce, &body, run).await;
    if done.is_err() {
        // The delivery did not happen: let the sender's retry of this very
        // delivery through instead of calling it a replay.
        forget_nonce(state, source, &nonce).await;
    }
    done
}

/// Remembers the nonce in the database (the record every instance sharing it
/// sees) and in Redis when configured (seen by instances sharing only Redis);
/// fresh only if neither knew it.
async fn remember_nonce(
    state: &AppState,
    source: &str,
    nonce: &str,
    ttl: std::time::Duration,
) -> Result<bool, ApiError> {
    // The window is measured by the database clock, shared by every instance.
    let in_db = state.store.remember_nonce(source, nonce, ttl).await?;
    let in_redis = match &state.redis {
        Some(bus) => bus.remember_nonce(source, nonce, ttl).await.unwrap_or(true),
        None => true,
    };
    Ok(in_db && in_redis)
}

async fn forget_nonce(state: &AppState, source: &str, nonce: &str) {
    if let Err(e) = state.store.forget_nonce(source, nonce).await {
        tracing::warn!(error = %e, "could not forget a webhook nonce; the sender's retry will be refused as a replay");
    }
    if let Some(bus) = &state.redis {
        bus.forget_nonce(source, nonce).await;
    }
}

async fn deliver(
    state: &AppState,
    source: &str,
    nonce: &str,
    body: &[u8],
    run: Option<Vec<u8>>,
) -> Result<WebhookAccepted, ApiError> {
    let mut run_id = None;
    if let Some(run) = run {
        let request = NewRunRequest {
            body: run,
            idempotency_key: Some(format!("webhook:{source}:{nonce}")),
            correlation_id: None,
            actor: format!("webhook:{source}"),
            // Runs from a webhook belong to the tenant `webhook:<source>`,
            // which a key reaches with `tenant=webhook/<source>`.
            tenant: crate::config::webhook_tenant(source),
            request_id: None,
        };
        let (detail, _) = create_from_body(state, request).await?;
        run_id = Some(detail.run.id);
    }
    let body_sha256 = hex::encode(Sha256::digest(body));
    let delivery_id = state
        .store
        .record_delivery(
            source,
            nonce,
            &body_sha256,
            run_id.map(|id| id.to_string()).as_deref(),
        )
        .await?;
    Ok(WebhookAccepted {
        delivery_id,
        run_id,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_under_any_current_secret_and_nothing_else() {
        let sig = sign(b"old-secret-0123456789", "1700000000", "nonce-123", b"{}");
        let secrets: [&[u8]; 2] = [b"new-secret-0123456789", b"old-secret-0123456789"];
        assert!(verify_signature(
            secrets,
            "1700000000",
            "nonce-123",
            b"{}",
            &sig
        ));
        assert!(
            !verify_signature(secrets, "1700000001", "nonce-123", b"{}", &sig),
            "timestamp is signed"
        );
        assert!(
            !verify_signature(secrets, "1700000000", "nonce-124", b"{}", &sig),
            "nonce is signed"
        );
        assert!(
            !verify_signature(secrets, "1700000000", "nonce-123", b"{ }", &sig),
            "body is signed"
        );
        let only_new: [&[u8]; 1] = [b"new-secret-0123456789"];
        assert!(!verify_signature(
            only_new,
            "1700000000",
            "nonce-123",
            b"{}",
            &sig
        ));
        assert!(!verify_signature(
            secrets,
            "1700000000",
            "nonce-123",
            b"{}",
            "md5=00"
        ));
        assert!(!verify_signature(
            secrets,
            "1700000000",
            "nonce-123",
            b"{}",
            "sha256=zz"
        ));
    }
}
