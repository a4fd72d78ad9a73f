//! Probes.
//!
//! - `GET /api/v2/health/live`: `200 {"status":"live"}` while the process can
//!   answer at all; touches no dependency, so a database outage never gets the
//!   pod restarted.
//! - `GET /api/v2/health/ready`: `200 {"status":"ready",…}` or
//!   `503 {"status":"not_ready",…}` with `dependencies.database`, `.worker` and
//!   `.redis`, each `{"status": "ok"|"error"|"disabled", "reason": …}`. The
//!   worker is checked in-process when it runs here, else through the
//!   freshest heartbeat in the database; only the database, an in-process
//!   worker and shutdown decide readiness. Each
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
        None => match tokio::time::timeout(DB_CHECK_TIMEOUT, state.store.last_heartbeat()).await {
            Ok(Ok(Some(t))) if now_ms() - t <= state.worker_stall_after.as_millis() as i64 => {
                dep("ok", "a worker reported a recent heartbeat")
            }
            Ok(Ok(Some(_))) => dep("error", "no worker heartbeat within the window; runs stay queued"),
            Ok(Ok(None)) => dep("error", "no worker has reported a heartbeat; runs stay queued"),
            _ => dep("error", "worker heartbeat check failed"),
        },
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
    // Redis only speeds up wake-ups: reported, but never a reason to be unready.
    let redis = match &state.redis {
        None => dep("disabled", "not configured"),
        Some(bus) => {
            if bus.ping().await {
                dep("ok", "reachable")
            } else {
                dep("error", "redis unreachable; workers fall back to polling")
            }
        }
    };
    let shutting_down = state.is_shutting_down();
    // A stalled in-process worker makes this process unfit to serve; a
    // missing separate worker does not: runs are durable and are accepted
    // (the `worker` entry and the queue metrics tell on-call people).
    let own_worker_failed = state.worker.is_some() && worker["status"] == "error";
    let healthy = !shutting_down && database["status"] == "ok" && !own_worker_failed;
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
