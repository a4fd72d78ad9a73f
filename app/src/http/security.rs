//! Who may call what, and how often.
//!
//! - API keys (`VM_API_KEYS`): `Authorization: Bearer <key>` or `x-api-key`.
//!   Only SHA-256 hashes are kept; a presented key is hashed and compared in
//!   constant time against every configured hash, so timing tells nothing. The
//!   key's id, never the key, is the actor. Several keys may be active at once,
//!   which is how keys rotate without downtime. Without keys (local mode only)
//!   the API is open and says so at start-up.
//! - Rate limits: token buckets per client address (before authentication,
//!   so guessing keys is throttled too) and per key id; shared by all replicas
//!   through Redis when configured, in memory otherwise or while Redis is
//!   down. `429 rate_limited` with `Retry-After`.
//! - Hardening: a request timeout, header limits, security headers on every
//!   response, CORS only for configured origins.
//!
//! Probes, metrics and the OpenAPI document are never authenticated or
//! rate-limited: Kubernetes and Prometheus depend on them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiKey, RateLimit, SecuritySettings};
use crate::deadline::Deadline;
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::redis_bus::RedisBus;
use crate::store::security::NewAudit;

/// Most headers a request may carry.
const MAX_HEADERS: usize = 100;
/// Largest total size of a request's headers.
const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Most in-memory buckets kept; the idle ones are dropped beyond this.
const MAX_LOCAL_BUCKETS: usize = 100_000;

/// The authenticated caller, available to handlers as a request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The API key's id, or `anonymous` when the API runs open.
    pub id: String,
    /// Role `admin` (see [`ApiKey::admin`]).
    pub admin: bool,
    /// May decide approval steps: role `approver` or `admin`.
    pub approver: bool,
    /// The tenant that owns what this caller creates ([`ApiKey::tenant`]);
    /// `anonymous` when the API runs open.
    pub tenant: String,
}

/// Finds the key whose hash matches `presented`, comparing against every
/// configured hash (no early exit) in constant time.
pub fn verify_key<'a>(keys: &'a [ApiKey], presented: &str) -> Option<&'a ApiKey> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut found = None;
    for key in keys {
        if bool::from(key.hash.ct_eq(&digest)) {
            found = Some(key);
        }
    }
    found
}

/// What a request presents as its API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresentedKey<'a> {
    /// Neither `Authorization` nor `x-api-key` is there.
    Missing,
    /// A key header is there but unusable: not visible ASCII, empty, or an
    /// `Authorization` scheme other than `Bearer` with no `x-api-key` to
    /// fall back on. Kind: present but unreadable is invalid, not missing.
    Unreadable,
    /// `Authorization: Bearer` and `x-api-key` carry two different keys,
    /// or one of them is repeated with different values: which one the
    /// client meant is not ours to guess (RFC 6750 §2: one method per
    /// request), so none is used. (A repeated header used to be read as its
    /// first value, whichever the others were.)
    Conflicting,
    /// The key's text.
    Key(&'a str),
}

/// The presented key: `Authorization: Bearer …`, else `x-api-key`; the same
/// key in both is that key, two different ones (in the two headers, or in
/// one header repeated) are [`PresentedKey::Conflicting`].
pub fn presented_key(headers: &HeaderMap) -> PresentedKey<'_> {
    let repeated = |name| {
        let mut values = headers.get_all(name).iter();
        let first = values.next();
        values.any(|v| Some(v) != first)
    };
    if repeated(header::AUTHORIZATION.as_str()) || repeated("x-api-key") {
        return PresentedKey::Conflicting;
    }
    let mut unreadable = false;
    let header_key = headers
        .get("x-api-key")
        .map(|value| match value.to_str().map(str::trim) {
            Ok(key) if !key.is_empty() => Some(key),
            _ => None,
        });
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        match value.to_str() {
            Ok(v) => {
                let (scheme, rest) = v.trim().split_once(' ').unwrap_or((v.trim(), ""));
                let key = rest.trim();
                if scheme.eq_ignore_ascii_case("bearer") && !key.is_empty() {
                    return match header_key {
                        Some(Some(other)) if other != key => PresentedKey::Conflicting,
                        _ => PresentedKey::Key(key),
                    };
                }
                unreadable = true;
            }
            Err(_) => unreadable = true,
        }
    }
    match header_key {
        Some(Some(key)) => return PresentedKey::Key(key),
        Some(None) => unreadable = true,
        None => {}
    }
    if unreadable {
        PresentedKey::Unreadable
    } else {
        PresentedKey::Missing
    }
}

/// One entry of a forwarding header: an address, possibly with a port
/// (`203.0.113.7`, `203.0.113.7:5123`, `[2001:db8::1]:443`).
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// The client's address: the peer, or, when a trusted proxy header is
/// configured and present, the last entry of its last line (the one our
/// proxy appended; earlier entries are whatever the client claimed). A last
/// entry that is not an address is refused rather than skipped: skipping it
/// would hand the choice to the client's own entries.
pub fn client_ip(req: &Request, security: &SecuritySettings) -> Result<Option<IpAddr>, ApiError> {
    if let Some(name) = &security.trusted_proxy_header
        && let Some(last_line) = req.headers().get_all(name.as_str()).iter().next_back()
    {
        let last_entry = last_line
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .and_then(parse_forwarded_entry);
        return match last_entry {
            Some(ip) => Ok(Some(ip)),
            None => Err(ApiError::InvalidClientAddress),
        };
    }
    Ok(req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip()))
}

/// Whether an `x-request-id` can be echoed and logged as it is.
fn usable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=128).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic)
}

/// Whether an `x-correlation-id` is short and plain enough for log lines.
fn usable_correlation_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
}

/// Set on a request whose `x-request-id` was present but unusable; [`harden`]
/// answers it `400 invalid_request_id`.
#[derive(Debug, Clone, Copy)]
pub struct UnusableRequestId;

/// Runs before a request id is assigned: an unusable `x-request-id` is taken
/// off (so the answer and the log lines carry a generated one) and the
/// request is marked, to be refused once inside the logged span.
pub async fn screen_request_id(mut req: Request, next: Next) -> Response {
    if req
        .headers()
        .get("x-request-id")
        .is_some_and(|v| !usable_request_id(v))
    {
        req.headers_mut().remove("x-request-id");
        req.extensions_mut().insert(UnusableRequestId);
    }
    next.run(req).await
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets, in Redis when available and in memory otherwise.
pub struct RateLimiter {
    local: Mutex<HashMap<String, Bucket>>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self {
            local: Mutex::new(HashMap::new()),
        }
    }

    fn take_local(&self, key: &str, limit: RateLimit) -> Option<Duration> {
        let mut buckets = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if buckets.len() >= MAX_LOCAL_BUCKETS {
            let idle = Duration::from_secs_f64(f64::from(limit.burst) / limit.per_second);
            buckets.retain(|_, b| now.duration_since(b.updated) < idle);
            // Still full of active keys (an address-rotating flood): start
            // over rather than scan a full map on every request. Memory and
            // CPU stay bounded; limits are lenient for one refill at worst.
            if buckets.len() >= MAX_LOCAL_BUCKETS / 2 {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: f64::from(limit.burst),
            updated: now,
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / limit.per_second,
            ))
        }
    }

    /// Takes one token for `key`; `Err(wait)` when the bucket is empty.
    pub async fn take(
        &self,
        redis: Option<&RedisBus>,
        key: &str,
        limit: RateLimit,
    ) -> Result<(), Duration> {
        if !limit.enabled() {
            return Ok(());
        }
        let wait = match redis {
            Some(bus) => match bus.take_token(key, limit.per_second, limit.burst).await {
                Ok(wait) => wait,
                // Redis down: keep limiting, per replica, rather than not at all.
                Err(()) => self.take_local(key, limit),
            },
            None => self.take_local(key, limit),
        };
        wait.map_or(Ok(()), Err)
    }
}

/// Counts authentication failures between two audit flushes.
#[derive(Default)]
pub struct AuthFailures {
    count: AtomicU64,
}

impl AuthFailures {
    /// One more failure.
    pub fn add(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes one aggregated `auth.failed` audit entry for the failures since
    /// the last flush, if any. Aggregated so that a brute-force attempt cannot
    /// flood the audit table.
    pub async fn flush(&self, state: &AppState) -> u64 {
        let n = self.count.swap(0, Ordering::Relaxed);
        if n > 0 {
            let entry = NewAudit {
                actor: "unknown",
                action: "auth.failed",
                target: None,
                outcome: "denied",
                request_id: None,
                detail: Some(serde_json::json!({"count": n}).to_string()),
                tenant: None,
            };
            if state.store.append_audit(&entry).await.is_err() {
                // Keep the count for the next flush rather than lose it.
                self.count.fetch_add(n, Ordering::Relaxed);
                return 0;
            }
        }
        n
    }
}

fn retry_after(wait: Duration) -> ApiError {
    ApiError::RateLimited(wait.as_secs_f64().ceil().max(1.0) as u64)
}

/// Per-address limit, before authentication.
pub async fn limit_by_address(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let security = &state.settings.security;
    let ip = match client_ip(&req, security) {
        Ok(ip) => ip,
        Err(e) => return e.into_response(),
    };
    if let Some(ip) = ip
        && let Err(wait) = state
            .limiter
            .take(
                state.redis.as_ref(),
                &format!("ip:{ip}"),
                security.rate_per_ip,
            )
            .await
    {
        state.metrics.rate_limited("address");
        return retry_after(wait).into_response();
    }
    next.run(req).await
}

/// Authentication, then the per-key limit. Sets the [`Actor`] extension.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let security = &state.settings.security;
    let actor = if security.api_keys.is_empty() {
        Actor {
            id: "anonymous".to_string(),
            // Reading the audit trail without a key is for a developer's own
            // machine only.
            admin: state.settings.app_env == crate::config::AppEnv::Local,
            approver: state.settings.app_env == crate::config::AppEnv::Local,
            tenant: "anonymous".to_string(),
        }
    } else {
        let presented = match presented_key(req.headers()) {
            PresentedKey::Key(key) => key,
            PresentedKey::Missing => {
                state.auth_failures.add();
                state.metrics.auth_failed("missing");
                return ApiError::Unauthorized(
                    "an API key is required: Authorization: Bearer <key>",
                )
                .into_response();
            }
            PresentedKey::Unreadable => {
                state.auth_failures.add();
                state.metrics.auth_failed("invalid");
                return ApiError::Unauthorized(
                    "the API key header cannot be read: send Authorization: Bearer <key> (or x-api-key) in visible ASCII",
                )
                .into_response();
            }
            PresentedKey::Conflicting => {
                state.auth_failures.add();
                state.metrics.auth_failed("invalid");
                return ApiError::Unauthorized(
                    "the request carries two different keys (in Authorization: Bearer and x-api-key, or in one of them repeated): send one API key, once",
                )
                .into_response();
            }
        };
        let Some(key) = verify_key(&security.api_keys, presented) else {
            state.auth_failures.add();
            state.metrics.auth_failed("invalid");
            return ApiError::Unauthorized("the API key is not valid").into_response();
        };
        if let Err(wait) = state
            .limiter
            .take(
                state.redis.as_ref(),
                &format!("key:{}", key.id),
                security.rate_per_key,
            )
            .await
        {
            state.metrics.rate_limited("key");
            return retry_after(wait).into_response();
        }
        Actor {
            id: key.id.clone(),
            admin: key.admin,
            approver: key.may_approve(),
            tenant: key.tenant.clone(),
        }
    };
    tracing::Span::current().record("actor", actor.id.as_str());
    req.extensions_mut().insert(actor);
    next.run(req).await
}

/// Request timeout, header limits, and the tracing headers every route
/// reads: present but unusable is a 400, never silently dropped.
///
/// The request timeout (`VM_REQUEST_TIMEOUT_MS`) answers `408
/// request_timeout`, except for a request the store has begun to commit a
/// write for ([`Deadline::claim`]): that one is answered with the write's
/// outcome, a little after the deadline at most. The handler runs with the
/// request's [`Deadline`] as [`Deadline::current`], so that the store bounds
/// its statements by the time left (a lock held past it answers 503
/// `dependency_unavailable`) and commits nothing for a request already
/// answered 408.
pub async fn harden(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.extensions().get::<UnusableRequestId>().is_some() {
        return ApiError::InvalidRequestId.into_response();
    }
    if req
        .headers()
        .get("x-correlation-id")
        .is_some_and(|v| !usable_correlation_id(v))
    {
        return ApiError::InvalidCorrelationId.into_response();
    }
    let headers = req.headers();
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || header_bytes > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge.into_response();
    }
    let deadline = Deadline::after(state.settings.security.request_timeout);
    let answer = deadline.clone().scope(next.run(req));
    tokio::pin!(answer);
    tokio::select! {
        // The answer first, as `tokio::time::timeout` polls it: a response
        // ready at the deadline is sent, not replaced by a 408.
        biased;
        response = &mut answer => response,
        () = tokio::time::sleep_until(deadline.at()) => {
            if deadline.expire() {
                ApiError::RequestTimeout.into_response()
            } else {
                // A write claimed the request before the deadline and is
                // committing: its outcome is the answer, not a 408 that
                // would tell the client nothing was done.
                answer.await
            }
        }
    }
}

/// Headers every response carries: no sniffing, no framing, no caching of API
/// answers, no referrer leaks.
pub fn security_headers() -> [(header::HeaderName, HeaderValue); 5] {
    [
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        ),
    ]
}

/// CORS for the configured origins only; `None` when none are configured.
pub fn cors(security: &SecuritySettings) -> Option<tower_http::cors::CorsLayer> {
    if security.cors_origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = security
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            // PUT: `PUT /tenants/{tenant}/plan`.
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::POST,
                axum::http::Method::PUT,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("idempotency-key"),
                header::HeaderName::from_static("x-api-key"),
                header::HeaderName::from_static("x-request-id"),
                header::HeaderName::from_static("x-correlation-id"),
                // Resuming a live-update stream read with fetch().
                header::HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                header::HeaderName::from_static("x-request-id"),
                header::LOCATION,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(id: &str, secret: &str) -> ApiKey {
        ApiKey {
            id: id.into(),
            hash: Sha256::digest(secret.as_bytes()).into(),
            admin: false,
            approver: false,
            tenant: id.into(),
        }
    }

    #[test]
    fn keys_verify_by_hash_and_identify_by_id() {
        let keys = [
            key("old", "old-secret-0123456789"),
            key("new", "new-secret-0123456789"),
        ];
        assert_eq!(
            verify_key(&keys, "old-secret-0123456789").map(|k| k.id.as_str()),
            Some("old")
        );
        assert_eq!(
            verify_key(&keys, "new-secret-0123456789").map(|k| k.id.as_str()),
            Some("new")
        );
        assert!(verify_key(&keys, "new-secret-012345678").is_none());
        assert!(verify_key(&keys, "").is_none());
    }

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_bytes(value).unwrap());
        }
        h
    }

    #[test]
    fn bearer_and_header_keys_are_both_accepted() {
        let h = headers(&[("authorization", b"Bearer abc")]);
        assert_eq!(presented_key(&h), PresentedKey::Key("abc"));
        let h = headers(&[("x-api-key", b"xyz")]);
        assert_eq!(presented_key(&h), PresentedKey::Key("xyz"));
        // Another scheme for a proxy, with the key in x-api-key.
        let h = headers(&[("authorization", b"Basic abc"), ("x-api-key", b"xyz")]);
        assert_eq!(presented_key(&h), PresentedKey::Key("xyz"));
        assert_eq!(presented_key(&HeaderMap::new()), PresentedKey::Missing);
        // The same key in both is that key, and so is one header repeated
        // with the same value.
        let h = headers(&[("authorization", b"Bearer abc"), ("x-api-key", b"abc")]);
        assert_eq!(presented_key(&h), PresentedKey::Key("abc"));
        let h = headers(&[("x-api-key", b"abc"), ("x-api-key", b"abc")]);
        assert_eq!(presented_key(&h), PresentedKey::Key("abc"));
    }

    /// Two different keys are refused whichever is valid: a valid Bearer
    /// with a wrong `x-api-key` used to pass, and the reverse to fail.
    #[test]
    fn two_different_keys_in_one_request_are_refused() {
        for pairs in [
            &[
                ("authorization", &b"Bearer abc"[..]),
                ("x-api-key", &b"xyz"[..]),
            ][..],
            &[
                ("x-api-key", &b"xyz"[..]),
                ("authorization", &b"bearer abc"[..]),
            ],
            // One header repeated with two keys was read as its first.
            &[
                ("authorization", &b"Bearer abc"[..]),
                ("authorization", &b"Bearer xyz"[..]),
            ],
            &[("x-api-key", &b"abc"[..]), ("x-api-key", &b"xyz"[..])],
        ] {
            assert_eq!(
                presented_key(&headers(pairs)),
                PresentedKey::Conflicting,
                "{pairs:?}"
            );
        }
    }

    /// Kind: a key header that is there but cannot be used is reported (and
    /// counted) as invalid; calling it missing sends people looking for a
    /// header they did send.
    #[test]
    fn a_key_header_present_but_unreadable_is_invalid_not_missing() {
        for pairs in [
            &[("authorization", &b"Bearer caf\xc3\xa9-key"[..])][..],
            &[("authorization", &b"Basic abc"[..])],
            &[("authorization", &b"Bearer "[..])],
            &[("x-api-key", &b"\xff\xfe"[..])],
            &[("x-api-key", &b" "[..])],
        ] {
            assert_eq!(
                presented_key(&headers(pairs)),
                PresentedKey::Unreadable,
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn the_client_address_is_the_last_forwarded_entry_and_a_bad_one_is_refused() {
        let security = crate::config::Settings::from_lookup(|k| {
            (k == "VM_TRUSTED_PROXY_HEADER").then(|| "x-forwarded-for".to_string())
        })
        .unwrap()
        .security;
        let request = |value: &[u8]| {
            axum::http::Request::builder()
                .header("x-forwarded-for", HeaderValue::from_bytes(value).unwrap())
                .body(axum::body::Body::empty())
                .unwrap()
        };
        for (value, ip) in [
            (&b"10.0.0.1, 198.51.100.7"[..], "198.51.100.7"),
            (b"10.0.0.1, 198.51.100.7:5123", "198.51.100.7"),
            (b"[2001:db8::1]:443", "2001:db8::1"),
        ] {
            let found = client_ip(&request(value), &security).unwrap();
            assert_eq!(found, Some(ip.parse().unwrap()));
        }
        // Skipping a bad last entry would trust the client's own entries.
        for value in [&b"10.0.0.1, unknown"[..], b"10.0.0.1, \xff", b""] {
            assert!(
                matches!(
                    client_ip(&request(value), &security),
                    Err(ApiError::InvalidClientAddress)
                ),
                "{value:?}"
            );
        }
    }

    #[test]
    fn local_buckets_refill_over_time_and_say_how_long_to_wait() {
        let limiter = RateLimiter::new();
        let limit = RateLimit {
            per_second: 2.0,
            burst: 2,
        };
        assert!(limiter.take_local("k", limit).is_none());
        assert!(limiter.take_local("k", limit).is_none());
        let wait = limiter.take_local("k", limit).expect("empty bucket");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(
            limiter.take_local("other", limit).is_none(),
            "buckets are per key"
        );
    }
}
