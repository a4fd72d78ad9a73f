//! `GET /api/v2/metrics/prometheus` and `GET /metrics`: the process's metrics
//! in the OpenMetrics text format. Queue and heartbeat gauges are refreshed
//! from the database first, within a time budget; if the database does not
//! answer, the gauges keep their last values and the failure is counted.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::http::AppState;
use crate::metrics::{Dependency, StateLabels};
use crate::model::now_ms;

const REFRESH_BUDGET: Duration = Duration::from_secs(2);

/// Refreshes the scrape-time gauges from the database.
async fn refresh(state: &AppState) -> Result<(), ()> {
    let now = now_ms();
    let stats = state.store.queue_stats(now).await.map_err(|_| ())?;
    for (s, count, oldest_ms) in stats {
        let labels = StateLabels { state: s };
        state.metrics.queue_jobs.get_or_create(&labels).set(count);
        state
            .metrics
            .queue_oldest_age
            .get_or_create(&labels)
            .set(oldest_ms as f64 / 1000.0);
    }
    let age = match state.store.last_heartbeat().await.map_err(|_| ())? {
        Some(t) => (now - t).max(0) as f64 / 1000.0,
        None => -1.0,
    };
    state.metrics.worker_heartbeat_age.set(age);
    Ok(())
}

/// Prometheus metrics (OpenMetrics text). Also served at `/metrics`.
#[utoipa::path(
    get,
    path = "/api/v2/metrics/prometheus",
    tag = "operations",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String))
)]
pub async fn prometheus(State(state): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(REFRESH_BUDGET, refresh(&state)).await {
        Ok(Ok(())) => {}
        _ => state.metrics.dependency_failed(Dependency::database),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// The same metrics at the conventional root path, for scrapers' defaults.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String))
)]
pub async fn prometheus_alias(state: State<AppState>) -> impl IntoResponse {
    prometheus(state).await
}
