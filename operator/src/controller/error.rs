//! What can go wrong in a pass, and which failures are worth retrying.
//!
//! The API server answers a write it will not accept with a 4xx `Status` (`Invalid` 422,
//! `Forbidden` 403 for quota, admission webhooks and policies, `BadRequest` 400, …): retrying
//! the same write changes nothing until someone changes the spec, the quota or the policy.
//! Such a refusal is a [`Refusal`], reported in the status (`Degraded`, reason
//! `ApplyFailed`) and in a Warning event, and the pass still finishes. Transport errors,
//! 5xx, 429 and 409 (a conflict is a race, not a verdict) are [`Error`]s: the pass fails
//! and is retried with per-object backoff; after a few in a row the status says so too.

use std::fmt;

/// Why a reconcile pass failed (transient: the pass is retried with backoff). Spec mistakes
/// and refused writes are not errors: they become a `Degraded` condition and a Warning event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API server failed.
    #[error("kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// An object could not be serialised.
    #[error("cannot serialise object: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The object has no namespace (cannot happen for a namespaced kind from the API).
    #[error("the VmWebapp has no namespace")]
    MissingNamespace,
}

impl Error {
    /// Fixed label of `vm_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(_)) => "api_status",
            Self::Kube(_) => "api_transport",
            Self::Serialize(_) => "serialize",
            Self::MissingNamespace => "invalid_object",
        }
    }

    /// A short description for the status and events: the server's message, or the
    /// transport failure, without the request URL's query.
    pub fn summary(&self) -> String {
        match self {
            Self::Kube(kube::Error::Api(s)) => {
                format!("{} (HTTP {} {})", s.message, s.code, s.reason)
            }
            other => other.to_string(),
        }
    }
}

/// A write the API server refused for good (until something changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `Kind/name` of the child.
    pub child: String,
    /// HTTP status code (4xx).
    pub code: u16,
    /// The `Status` reason (`Forbidden`, `Invalid`, …).
    pub reason: String,
    /// The API server's message.
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (HTTP {} {})",
            self.child, self.message, self.code, self.reason
        )
    }
}

/// Whether `err` is a refusal (a 4xx other than 409 Conflict and 429 Too Many Requests)
/// rather than something a retry may cure; the refusal of `child` when it is.
pub fn refusal(child: &str, err: &kube::Error) -> Option<Refusal> {
    match err {
        kube::Error::Api(s) if (400..500).contains(&s.code) && !matches!(s.code, 409 | 429) => {
            Some(Refusal {
                child: child.to_owned(),
                code: s.code,
                reason: s.reason.clone(),
                message: s.message.clone(),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Status::failure("m", reason).with_code(code).boxed())
    }

    #[test]
    fn client_errors_are_refusals_but_conflicts_throttling_and_server_errors_are_retried() {
        for (code, reason) in [(403, "Forbidden"), (422, "Invalid"), (400, "BadRequest")] {
            let r = refusal("Deployment/d", &api(code, reason)).expect("refused");
            assert_eq!((r.code, r.reason.as_str()), (code, reason));
        }
        for (code, reason) in [
            (409, "Conflict"),
            (429, "TooManyRequests"),
            (500, "InternalError"),
            (503, "ServiceUnavailable"),
        ] {
            assert_eq!(refusal("Deployment/d", &api(code, reason)), None, "{code}");
        }
    }
}
