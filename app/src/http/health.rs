//! Probes.
//!
//! - `GET /api/v2/health/live`: `200 {"status":"live"}` while the process can
//!   answer at all; touches no dependency, so a database outage never gets the
//!   pod restarted.
//! - `GET /api/v2/health/ready`: `200 {"status":"ready",…}` or
//!   `503 {"status":"not_ready",…}` with `dependencies.database`, `.worker` and
//!   `.redis`, each `{"status": "ok"|"error"|"disabled", "reason": …}`. Each
//!   check is bounded in time; the answer flips to `not_ready` as soon as
//!   shutdown begins. Reasons are fixed phrases, never driver messages.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::http::AppState;
use crate::model::now_ms;

/// Budget of the database check.
const DB_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /health/live`.
pub async fn live() -> Json<Value> {
    Json(json!({"status": "live"}))
}

fn dep(status: &str, reason: &str) -> Value {
    json!({"status": status, "reason": reason})
}

/// `GET /health/ready`.
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = match tokio::time::timeout(DB_CHECK_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => dep("ok", "reachable"),
        Ok(Err(_)) => dep("error", "database unreachable"),
        Err(_) => dep("error", "database check timed out"),
    };
    let worker = match &state.worker {
        None => dep("disabled", "no worker in this process"),
        Some(w) => {
            let last = w.last_pass_ms.load(Ordering::Relaxed);
            let age = now_ms() - last;
            if last == 0 {
                dep("error", "worker has not started")
            } else if age > state.worker_stall_after.as_millis() as i64 {
                dep("error", "worker loop stalled")
            } else {
                dep("ok", "polling")
            }
        }
    };
    let redis = match &state.settings.redis_url {
        None => dep("disabled", "not configured"),
        Some(_) => dep("disabled", "configured but not used by this build"),
    };
    let shutting_down = state.is_shutting_down();
    let healthy = !shutting_down && database["status"] == "ok" && worker["status"] != "error";
    let mut body = json!({
        "status": if healthy { "ready" } else { "not_ready" },
        "dependencies": {"database": database, "worker": worker, "redis": redis},
    });
    if shutting_down {
        body["reason"] = json!("shutting down");
    }
    let code = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body))
}
