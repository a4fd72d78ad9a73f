//! `GET /api/v2/metrics/prometheus` and `GET /metrics`: the process's metrics
//! in the OpenMetrics text format. Queue gauges are read from the snapshot the
//! queue-maintenance leader keeps fresh, and the heartbeat age from the database, within a time budget; if the database does not
//! answer, the gauges keep their last values and the failure is counted.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::http::AppState;
use crate::metrics::{Dependency, StateLabels};

const REFRESH_BUDGET: Duration = Duration::from_secs(2);

/// Refreshes the scrape-time gauges from the database.
async fn refresh(state: &AppState) -> Result<(), ()> {
    // A snapshot the maintenance leader keeps fresh: four rows, no scan.
    let (stats, snapshot_age) = state.store.queue_stats().await.map_err(|_| ())?;
    state
        .metrics
        .queue_snapshot_age
        .set(snapshot_age.map_or(-1.0, |ms| ms as f64 / 1000.0));
    for stat in stats {
        if stat.state == crate::model::JobState::AwaitingApproval.as_str() {
            state.metrics.approvals_pending.set(stat.jobs);
            state
                .metrics
                .approval_oldest_pending
                .set(stat.oldest_age_ms as f64 / 1000.0);
        }
        let labels = StateLabels { state: stat.state };
        state
            .metrics
            .queue_jobs
            .get_or_create(&labels)
            .set(stat.jobs);
        state
            .metrics
            .queue_oldest_age
            .get_or_create(&labels)
            .set(stat.oldest_age_ms as f64 / 1000.0);
    }
    let age = match state.store.heartbeat_age_ms().await.map_err(|_| ())? {
        Some(ms) => ms as f64 / 1000.0,
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
