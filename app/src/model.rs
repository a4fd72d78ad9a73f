//! The domain: runs, their steps, their events, and the jobs the queue hands to
//! workers. These types are what the store returns and the HTTP layer renders.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::steps::StepSpec;

/// Where a job is in the queue (the `jobs.state` column). Finished jobs leave
/// the table: a result goes to `step_results`, a failure to `dead_jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// An earlier step of the run has not finished.
    Waiting,
    /// Claimable from its `run_at`.
    Queued,
    /// Leased by a worker until `lease_expires_at`.
    Running,
    /// An approval step waiting for a person's decision: not claimable, no
    /// lease; `run_at` is when the wait began. The decision (or its expiry)
    /// takes the job out of the queue (see `store::approvals`).
    AwaitingApproval,
}

impl JobState {
    /// Every state, in queue order.
    pub const ALL: [JobState; 4] = [
        JobState::Waiting,
        JobState::Queued,
        JobState::Running,
        JobState::AwaitingApproval,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::AwaitingApproval => "awaiting_approval",
        }
    }

    /// Parses a stored name; `None` for a state this build does not know.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// What an event records (the `type` of a run event). Readers keep the stored
/// text, so an event type written by a newer version still lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// The run was accepted.
    RunQueued,
    /// Its first step was claimed.
    RunStarted,
    /// Its last step succeeded.
    RunSucceeded,
    /// A step failed for good.
    RunFailed,
    /// Cancelled on request.
    RunCancelled,
    /// A worker claimed the step (one per delivery).
    StepStarted,
    /// The step's result was recorded.
    StepSucceeded,
    /// A delivery failed and the step will be retried after a delay.
    StepRetryScheduled,
    /// The step failed for good and moved to the dead letters.
    StepDeadLettered,
    /// A worker gave the step back at shutdown without spending an attempt.
    StepReleased,
    /// The lease ran out before the step finished; it will be delivered again.
    StepLeaseExpired,
    /// The run was cancelled while this step was claimed or awaited approval.
    StepCancelled,
    /// An approval step waits for a decision (data: `prompt`, `expires_at`).
    StepAwaitingApproval,
    /// An approval step was approved (by a person, or by expiry with
    /// `on_timeout: approve`).
    StepApproved,
    /// An approval step was rejected (by a person, or by expiry).
    StepRejected,
    /// An approval step's deadline passed; its `on_timeout` was applied.
    StepApprovalExpired,
    /// The run's tenant reached a warning threshold of an allowance (once
    /// per tenant, period, meter and threshold; on the run that reached it).
    TenantUsageThreshold,
}

impl EventType {
    /// The events that end a run, one per run: after one of them a run's
    /// live stream ends.
    pub const RUN_ENDS: [EventType; 3] = [
        EventType::RunSucceeded,
        EventType::RunFailed,
        EventType::RunCancelled,
    ];

    /// Whether the stored name `name` is one of [`EventType::RUN_ENDS`].
    pub fn ends_run(name: &str) -> bool {
        Self::RUN_ENDS.iter().any(|t| t.as_str() == name)
    }

    /// The stored and serialised name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::RunQueued => "run.queued",
            EventType::RunStarted => "run.started",
            EventType::RunSucceeded => "run.succeeded",
            EventType::RunFailed => "run.failed",
            EventType::RunCancelled => "run.cancelled",
            EventType::StepStarted => "step.started",
            EventType::StepSucceeded => "step.succeeded",
            EventType::StepRetryScheduled => "step.retry_scheduled",
            EventType::StepDeadLettered => "step.dead_lettered",
            EventType::StepReleased => "step.released",
            EventType::StepLeaseExpired => "step.lease_expired",
            EventType::StepCancelled => "step.cancelled",
            EventType::StepAwaitingApproval => "step.awaiting_approval",
            EventType::StepApproved => "step.approved",
            EventType::StepRejected => "step.rejected",
            EventType::StepApprovalExpired => "step.approval_expired",
            EventType::TenantUsageThreshold => "tenant.usage_threshold",
        }
    }
}

/// Lifecycle of a run: `queued → running → succeeded | failed | cancelled`,
/// with `running ⇄ waiting` while an approval step waits for a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Accepted; no step has started yet.
    Queued,
    /// At least one step has been claimed by a worker.
    Running,
    /// An approval step waits for a person's decision; no worker holds it.
    Waiting,
    /// Every step succeeded.
    Succeeded,
    /// A step failed permanently or exhausted its attempts.
    Failed,
    /// Cancelled on request; pending steps were dropped.
    Cancelled,
}

impl RunStatus {
    /// All statuses, in lifecycle order.
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Waiting,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// The stored and serialised name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Waiting => "waiting",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored or query-string name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True once nothing more will happen to the run.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

/// State of one step as shown to API clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Waits for the steps before it.
    Pending,
    /// Ready to be claimed (possibly after a retry delay).
    Queued,
    /// Claimed by a worker.
    Running,
    /// An approval step waiting for a decision.
    AwaitingApproval,
    /// Its result is recorded.
    Succeeded,
    /// Dead-lettered.
    Failed,
    /// Dropped before it started because the run was cancelled or failed earlier.
    Skipped,
    /// Claimed by a worker (or awaiting approval) when the run was
    /// cancelled; its attempts are kept.
    Cancelled,
    /// An approval step that was rejected (by a person or by expiry) and
    /// failed its run (`on_reject: fail`).
    Rejected,
}

/// A run as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Run id (UUIDv7, so ids sort by creation time).
    pub id: Uuid,
    /// Current status.
    pub status: RunStatus,
    /// Carried by every log line about this run and its jobs.
    pub correlation_id: String,
    /// The caller's input, available to step templates as `input`.
    pub input: Value,
    /// The steps, in execution order.
    pub steps: Vec<StepSpec>,
    /// The last step's output once the run succeeded.
    pub output: Option<Value>,
    /// Why the run failed.
    pub error: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_at: i64,
    /// Last change, ms since the Unix epoch.
    pub updated_at: i64,
    /// First claim of a step.
    pub started_at: Option<i64>,
    /// Reaching a terminal status.
    pub finished_at: Option<i64>,
}

/// The state of one step of a run, assembled from the queue and the results.
#[derive(Debug, Clone, Serialize)]
pub struct StepState {
    /// Position in the run.
    pub index: usize,
    /// Step kind name.
    pub kind: &'static str,
    /// Where the step is.
    pub status: StepStatus,
    /// Deliveries so far.
    pub attempts: i64,
    /// The recorded result.
    pub output: Option<Value>,
    /// The last error seen (a retry reason or the final failure).
    pub error: Option<String>,
    /// For an approval step that was reached: its prompt, deadline and decision.
    pub approval: Option<ApprovalRecord>,
}

impl StepState {
    /// One state per step, with no attempt, output or error yet, and the
    /// status `status(index)`.
    pub fn all(steps: &[StepSpec], status: impl Fn(usize) -> StepStatus) -> Vec<StepState> {
        steps
            .iter()
            .enumerate()
            .map(|(index, spec)| StepState {
                index,
                kind: spec.kind(),
                status: status(index),
                attempts: 0,
                output: None,
                error: None,
                approval: None,
            })
            .collect()
    }
}

/// One approval as stored (`store::approvals`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApprovalRecord {
    /// The run.
    pub run_id: Uuid,
    /// The approval step's index.
    pub step_index: i64,
    /// The tenant that owns the run (`webhook:<source>` for a webhook's run).
    pub tenant: String,
    /// The rendered prompt.
    pub prompt: String,
    /// When the step began waiting, ms since the epoch (database clock).
    pub requested_at: i64,
    /// When `on_timeout` applies, ms since the epoch (database clock).
    pub expires_at: i64,
    /// `reject` or `approve`.
    pub on_timeout: String,
    /// `fail` or `continue`.
    pub on_reject: String,
    /// `None` while pending; else a [`DecisionKind`] name or `cancelled`.
    pub decision: Option<String>,
    /// The deciding API key id, `system` for an expiry.
    pub decided_by: Option<String>,
    /// The approver's comment.
    pub comment: Option<String>,
    /// When decided, ms since the epoch (database clock).
    pub decided_at: Option<i64>,
}

/// A run with the state of each of its steps.
#[derive(Debug, Clone)]
pub struct RunDetail {
    /// The run.
    pub run: Run,
    /// One entry per step, in order.
    pub steps: Vec<StepState>,
}

/// One recorded transition of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunEvent {
    /// Increasing id; events of a run are ordered by it.
    pub id: i64,
    /// The run.
    pub run_id: Uuid,
    /// What happened, e.g. `run.queued`, `step.started`, `step.retry_scheduled`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The step concerned, if any.
    pub step_index: Option<i64>,
    /// The delivery attempt concerned, if any.
    pub attempt: Option<i64>,
    /// Human-readable detail.
    pub message: Option<String>,
    /// Structured detail.
    pub data: Option<Value>,
    /// When, ms since the Unix epoch.
    pub created_at: i64,
    /// The run's tenant, when the read carried it (the live feed's reads
    /// do, for [`crate::store::feed::Visibility::allows`]); never serialised.
    #[serde(skip)]
    pub tenant: Option<String>,
}

/// A job a worker has claimed, with the fencing token it must present to finish it.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    /// Job id.
    pub id: i64,
    /// The run the step belongs to.
    pub run_id: Uuid,
    /// The run's correlation id, for logs.
    pub correlation_id: String,
    /// Position of the step in the run.
    pub step_index: i64,
    /// Number of steps in the run.
    pub step_count: i64,
    /// What to execute.
    pub step: StepSpec,
    /// Delivery number, starting at 1; the fencing token.
    pub attempt: i64,
    /// Attempts allowed before dead-lettering.
    pub max_attempts: i64,
    /// How long the job waited between becoming claimable and this claim
    /// (ms, measured by the database clock).
    pub waited_ms: i64,
}

/// What the caller asks for when creating a run.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// Input object for templates.
    pub input: Value,
    /// Steps to execute in order (validated).
    pub steps: Vec<StepSpec>,
    /// `Idempotency-Key` header, if sent.
    pub idempotency_key: Option<String>,
    /// Hash of the request that carries the idempotency key.
    pub request_hash: String,
    /// Correlation id (from `x-correlation-id`, else the request id, else generated).
    pub correlation_id: String,
    /// Attempts each step gets.
    pub max_attempts: i64,
    /// Who asked (API key id, `anonymous`, or `webhook:<source>`): the audit
    /// row of the creation is written in the same transaction as the run.
    pub actor: String,
    /// The request id, for the audit row.
    pub request_id: Option<String>,
    /// The tenant that owns the run and is charged for it (the key's
    /// tenant; `anonymous` in the open local mode).
    pub tenant: String,
}

/// Filter and page for listing runs.
#[derive(Debug, Clone)]
pub struct RunFilter {
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// Only runs older than this id (the cursor).
    pub before: Option<Uuid>,
    /// Page size.
    pub limit: i64,
    /// Whose runs: [`crate::store::Scope::All`] or one tenant's.
    pub scope: crate::store::Scope,
}

/// Current time in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Renders ms since the epoch as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
