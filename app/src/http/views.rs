//! The JSON shapes of the API: what handlers return and what the OpenAPI
//! document describes, from the same types.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::http::API_PREFIX;
use crate::model::{Run, RunDetail, RunEvent, RunStatus, StepStatus, rfc3339};
use crate::steps::StepSpec;

/// Every error answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `invalid_step`.
    pub code: String,
    /// What went wrong and how to fix it.
    pub message: String,
}

/// Body of `POST /runs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRunRequest {
    /// Input object, available to templates as `input`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub input: Option<Map<String, Value>>,
    /// Steps, executed in order.
    #[schema(value_type = Vec<StepSpec>)]
    pub steps: Vec<Value>,
}

/// A run in lists.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunSummary {
    /// Run id (UUIDv7).
    pub id: Uuid,
    /// Lifecycle status.
    pub status: RunStatus,
    /// Carried by every log line about the run.
    pub correlation_id: String,
    /// Number of steps.
    pub step_count: usize,
    /// Why the run failed.
    pub error: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// RFC 3339, when the first step was claimed.
    pub started_at: Option<String>,
    /// RFC 3339, when the run reached a terminal status.
    pub finished_at: Option<String>,
}

/// One step of a run.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepView {
    /// Position in the run.
    pub index: usize,
    /// Step kind.
    pub kind: String,
    /// Where the step is.
    pub status: StepStatus,
    /// Deliveries so far.
    pub attempts: i64,
    /// Recorded result.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// Last error (retry reason or final failure).
    pub error: Option<String>,
    /// The step as submitted.
    pub spec: StepSpec,
    /// For an approval step that was reached: its rendered prompt, deadline
    /// and decision (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalView>,
}

/// Links of a run.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunLinks {
    /// This run.
    #[serde(rename = "self")]
    pub self_: String,
    /// Its events.
    pub events: String,
}

/// A run with its steps.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunView {
    /// Summary fields.
    #[serde(flatten)]
    pub summary: RunSummary,
    /// The caller's input.
    #[schema(value_type = Object)]
    pub input: Value,
    /// Each step's state.
    pub steps: Vec<StepView>,
    /// The last step's output once the run succeeded.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// Related resources.
    pub links: RunLinks,
}

/// A page of runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    /// Newest first.
    pub runs: Vec<RunSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// One transition of a run.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    /// Increasing id.
    pub id: i64,
    /// `run.queued`, `step.started`, `step.retry_scheduled`, …
    #[serde(rename = "type")]
    pub event_type: String,
    /// Step concerned.
    pub step_index: Option<i64>,
    /// Delivery concerned.
    pub attempt: Option<i64>,
    /// Human-readable detail.
    pub message: Option<String>,
    /// Structured detail.
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    /// RFC 3339.
    pub at: String,
}

/// A page of events.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    /// The run.
    pub run_id: Uuid,
    /// In order.
    pub events: Vec<EventView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// Body of `POST /runs/{id}/steps/{index}/approve` and `…/reject` (optional).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    /// Why, in the approver's words; at most 2,000 characters.
    #[serde(default)]
    pub comment: Option<String>,
}

/// One approval step, pending or decided.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalView {
    /// The run.
    pub run_id: Uuid,
    /// The approval step's index in the run.
    pub step_index: i64,
    /// The tenant that owns the run: the creating key's tenant, or
    /// `webhook:<source>` for a run a webhook delivery started.
    pub tenant: String,
    /// The prompt, rendered when the step was reached.
    pub prompt: String,
    /// `pending`, `approved`, `rejected`, `expired_approved`,
    /// `expired_rejected` or `cancelled`.
    pub status: String,
    /// RFC 3339, when the step began waiting.
    pub waiting_since: String,
    /// RFC 3339, when `on_timeout` applies.
    pub expires_at: String,
    /// `reject` or `approve`.
    pub on_timeout: String,
    /// `fail` or `continue`.
    pub on_reject: String,
    /// The deciding API key id (`system` for an expiry).
    pub decided_by: Option<String>,
    /// The approver's comment.
    pub comment: Option<String>,
    /// RFC 3339, when decided.
    pub decided_at: Option<String>,
    /// Related resources.
    pub links: ApprovalLinks,
}

/// Links of an approval.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalLinks {
    /// The run.
    pub run: String,
    /// `POST` here to approve.
    pub approve: String,
    /// `POST` here to reject.
    pub reject: String,
}

/// A page of approvals.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalList {
    /// Oldest request first.
    pub approvals: Vec<ApprovalView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl ApprovalView {
    /// From a stored approval.
    pub fn of(a: &crate::model::ApprovalRecord) -> Self {
        let step = format!("{API_PREFIX}/runs/{}/steps/{}", a.run_id, a.step_index);
        Self {
            run_id: a.run_id,
            step_index: a.step_index,
            tenant: a.tenant.clone(),
            prompt: a.prompt.clone(),
            status: a.decision.clone().unwrap_or_else(|| "pending".into()),
            waiting_since: rfc3339(a.requested_at),
            expires_at: rfc3339(a.expires_at),
            on_timeout: a.on_timeout.clone(),
            on_reject: a.on_reject.clone(),
            decided_by: a.decided_by.clone(),
            comment: a.comment.clone(),
            decided_at: a.decided_at.map(rfc3339),
            links: ApprovalLinks {
                run: format!("{API_PREFIX}/runs/{}", a.run_id),
                approve: format!("{step}/approve"),
                reject: format!("{step}/reject"),
            },
        }
    }
}

/// One dependency in a readiness answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DependencyView {
    /// `ok`, `error` or `disabled`.
    pub status: &'static str,
    /// A short fixed phrase; never a secret or a driver message.
    pub reason: &'static str,
}

/// Dependencies checked by readiness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Dependencies {
    /// The database (decides readiness).
    pub database: DependencyView,
    /// The worker: in-process, or the freshest heartbeat of separate workers.
    pub worker: DependencyView,
    /// Redis (wake-ups only; never decides readiness).
    pub redis: DependencyView,
}

/// Readiness answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyView {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// Each dependency.
    pub dependencies: Dependencies,
    /// Set while shutting down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// Liveness answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct LiveView {
    /// Always `live`.
    pub status: &'static str,
}

impl RunSummary {
    /// From a stored run.
    pub fn of(run: &Run) -> Self {
        Self {
            id: run.id,
            status: run.status,
            correlation_id: run.correlation_id.clone(),
            step_count: run.steps.len(),
            error: run.error.clone(),
            created_at: rfc3339(run.created_at),
            updated_at: rfc3339(run.updated_at),
            started_at: run.started_at.map(rfc3339),
            finished_at: run.finished_at.map(rfc3339),
        }
    }
}

impl RunView {
    /// From a run and its step states.
    pub fn of(detail: &RunDetail) -> Self {
        let run = &detail.run;
        Self {
            summary: RunSummary::of(run),
            input: run.input.clone(),
            steps: detail
                .steps
                .iter()
                .zip(&run.steps)
                .map(|(state, spec)| StepView {
                    index: state.index,
                    kind: state.kind.to_string(),
                    status: state.status,
                    attempts: state.attempts,
                    output: state.output.clone(),
                    error: state.error.clone(),
                    spec: spec.clone(),
                    approval: state.approval.as_ref().map(ApprovalView::of),
                })
                .collect(),
            output: run.output.clone(),
            links: RunLinks {
                self_: format!("{API_PREFIX}/runs/{}", run.id),
                events: format!("{API_PREFIX}/runs/{}/events", run.id),
            },
        }
    }
}

impl EventView {
    /// From a stored event.
    pub fn of(e: &RunEvent) -> Self {
        Self {
            id: e.id,
            event_type: e.event_type.clone(),
            step_index: e.step_index,
            attempt: e.attempt,
            message: e.message.clone(),
            data: e.data.clone(),
            at: rfc3339(e.created_at),
        }
    }
}
