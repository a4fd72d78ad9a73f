//! Approval steps end to end, on SQLite and PostgreSQL: a run reaches an
//! approval step and waits without a worker slot or a lease; approvers decide
//! through the API; deadlines apply `on_timeout` once; races have one winner.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;
use vm_webapp::model::{RunStatus, StepStatus};
use vm_webapp::steps::llm::LlmBackend;
use vm_webapp::store::approvals::{DecideOutcome, Decision};
use vm_webapp::store::security::AuditFilter;

use support::redis::RedisServer;
use support::{Backend, Reply, TestEnv, send};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use vm_webapp::config::Secret;
use vm_webapp::metrics::Metrics;
use vm_webapp::nudge::Nudge;
use vm_webapp::redis_bus::RedisBus;
use vm_webapp::steps::StepRunner;
use vm_webapp::worker::{Worker, WorkerConfig};

const PLAIN: &str = "plain-key-0123456789abcdef";
const APPROVER: &str = "appr-key-0123456789abcdef";
const ADMIN: &str = "boss-key-0123456789abcdef";
// The plain and approver keys share a tenant: a key sees and decides only
// its own tenant's runs.
const RIVAL: &str = "rival-key-0123456789abcdef";
const HOOKS: &str = "hook-key-0123456789abcdef";
const GITHUB_SECRET: &str = "gh-secret-0123456789abcdef";
// `rival` approves for another tenant; `hooks` for the runs of the webhook
// source `github` (tenant `webhook:github`).
const KEYS: &str = "plain:plain-key-0123456789abcdef:tenant=team,\
                    appr:appr-key-0123456789abcdef:approver:tenant=team,\
                    boss:boss-key-0123456789abcdef:admin,\
                    rival:rival-key-0123456789abcdef:approver:tenant=rivals,\
                    hooks:hook-key-0123456789abcdef:approver:tenant=webhook/github";
const WAIT: Duration = Duration::from_secs(15);

async fn env(backend: Backend) -> TestEnv {
    let webhooks = format!("github:{GITHUB_SECRET},jira:{GITHUB_SECRET}");
    TestEnv::new(
        backend,
        &[("VM_API_KEYS", KEYS), ("VM_WEBHOOK_SECRETS", &webhooks)],
    )
    .await
}

async fn call(app: &Router, method: &str, uri: &str, body: Option<&str>, key: &str) -> Reply {
    let auth = format!("Bearer {key}");
    send(app, method, uri, body, &[("authorization", &auth)]).await
}

/// Creates a run as the plain key and returns its id.
async fn create(app: &Router, steps: Value) -> Uuid {
    let body = json!({"input": {"title": "Q3 report"}, "steps": steps}).to_string();
    let reply = call(app, "POST", "/api/v2/runs", Some(&body), PLAIN).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    reply.body["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("uuid")
}

/// draft → approval → publish, with the approval's options merged in.
fn gated(options: Value) -> Value {
    let mut approval = json!({"kind": "approval", "prompt": "Publish {{prev}}?"});
    if let (Some(a), Some(o)) = (approval.as_object_mut(), options.as_object()) {
        a.extend(o.clone());
    }
    json!([
        {"kind": "template", "template": "draft of {{input.title}}"},
        approval,
        {"kind": "template", "template": "published after {{prev}}"},
    ])
}

fn step_uri(id: Uuid, index: i64, action: &str) -> String {
    format!("/api/v2/runs/{id}/steps/{index}/{action}")
}

async fn decide(app: &Router, id: Uuid, action: &str, body: Option<&str>, key: &str) -> Reply {
    call(app, "POST", &step_uri(id, 1, action), body, key).await
}

fn count(events: &[String], kind: &str) -> usize {
    events.iter().filter(|e| *e == kind).count()
}

async fn audit_actions(env: &TestEnv, run: Uuid) -> Vec<(String, String)> {
    env.store
        .list_audit(&AuditFilter {
            limit: 1_000,
            ..AuditFilter::default()
        })
        .await
        .expect("audit")
        .into_iter()
        .filter(|e| {
            e.target.as_deref() == Some(&run.to_string())
                && e.action.starts_with("approval.")
                && e.outcome == "success"
        })
        .map(|e| (e.action, e.actor))
        .collect()
}

/// The `approval.refused` rows, oldest first, as (actor, target, outcome,
/// detail, tenant).
async fn refusals(env: &TestEnv) -> Vec<(String, Option<String>, String, Value, Option<String>)> {
    let mut rows: Vec<_> = env
        .store
        .list_audit(&AuditFilter {
            action: Some("approval.refused".into()),
            limit: 1_000,
            ..AuditFilter::default()
        })
        .await
        .expect("audit")
        .into_iter()
        .map(|e| {
            let detail = serde_json::from_str(e.detail.as_deref().unwrap_or("null"))
                .expect("detail is JSON");
            (e.actor, e.target, e.outcome, detail, e.tenant)
        })
        .collect();
    rows.reverse();
    rows
}

/// Starts a run through a signed delivery from webhook source `source`.
async fn create_by_webhook(app: &Router, source: &str, nonce: &str, steps: Value) -> Uuid {
    let body = json!({"run": {"input": {"title": "hook"}, "steps": steps}}).to_string();
    let ts = (vm_webapp::model::now_ms() / 1000).to_string();
    let sig =
        vm_webapp::http::webhooks::sign(GITHUB_SECRET.as_bytes(), &ts, nonce, body.as_bytes());
    let reply = send(
        app,
        "POST",
        &format!("/api/v2/webhooks/{source}"),
        Some(&body),
        &[
            ("x-vm-timestamp", &ts),
            ("x-vm-nonce", nonce),
            ("x-vm-signature", &sig),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    reply.body["run_id"]
        .as_str()
        .expect("run_id")
        .parse()
        .expect("uuid")
}

async fn approving_records_the_decision_and_the_run_goes_on(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let id = create(&app, gated(json!({}))).await;
    let detail = env.wait_for(id, RunStatus::Waiting, WAIT).await;
    assert_eq!(detail.steps[1].status, StepStatus::AwaitingApproval);
    assert_eq!(detail.steps[2].status, StepStatus::Pending);
    let events = env.store.list_events(id, 0, 100).await.expect("events");
    let waiting = events
        .iter()
        .find(|e| e.event_type == "step.awaiting_approval")
        .expect("step.awaiting_approval recorded");
    let data = waiting.data.clone().expect("data");
    assert_eq!(data["prompt"], "Publish draft of Q3 report?");
    assert!(data["expires_at"].as_str().is_some(), "{data}");
    let run = call(&app, "GET", &format!("/api/v2/runs/{id}"), None, PLAIN).await;
    assert_eq!(run.body["status"], "waiting");
    assert_eq!(run.body["steps"][1]["status"], "awaiting_approval");
    let approval = &run.body["steps"][1]["approval"];
    assert_eq!(approval["prompt"], "Publish draft of Q3 report?");
    assert_eq!(approval["status"], "pending");
    assert_eq!(approval["expires_at"], data["expires_at"]);
    assert!(
        run.body["steps"][0].get("approval").is_none(),
        "{}",
        run.body
    );

    // Not an approval step, an index past the end, an unknown run.
    let not_approval = call(&app, "POST", &step_uri(id, 0, "approve"), None, APPROVER).await;
    assert_eq!(not_approval.status, StatusCode::CONFLICT);
    assert_eq!(not_approval.body["code"], "step_not_awaiting_approval");
    let not_reached = call(&app, "POST", &step_uri(id, 2, "approve"), None, APPROVER).await;
    assert_eq!(not_reached.body["code"], "step_not_awaiting_approval");
    let past_end = call(&app, "POST", &step_uri(id, 3, "approve"), None, APPROVER).await;
    assert_eq!(past_end.status, StatusCode::NOT_FOUND);
    assert_eq!(past_end.body["code"], "step_not_found");
    let unknown = call(
        &app,
        "POST",
        &step_uri(Uuid::now_v7(), 1, "approve"),
        None,
        APPROVER,
    )
    .await;
    assert_eq!(unknown.body["code"], "run_not_found");
    let bad_json = decide(&app, id, "approve", Some("{nope"), APPROVER).await;
    assert_eq!(bad_json.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_json.body["code"], "invalid_json");

    // The deadline is a day away on the database clock: an expiry now is refused.
    let early = env
        .store
        .decide_approval(id, 1, Decision::Expire, "system", None, None)
        .await
        .expect("decide");
    assert!(matches!(early, DecideOutcome::NotDue), "{early:?}");

    let approved = decide(
        &app,
        id,
        "approve",
        Some(r#"{"comment":"looks right"}"#),
        APPROVER,
    )
    .await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.body);
    assert_eq!(approved.body["status"], "approved");
    assert_eq!(approved.body["decided_by"], "appr");
    assert_eq!(approved.body["comment"], "looks right");

    let done = env.wait_for(id, RunStatus::Succeeded, WAIT).await;
    let output = json!({"approved": true, "by": "appr", "comment": "looks right"});
    assert_eq!(done.steps[1].output, Some(output.clone()));
    assert_eq!(
        done.steps[2].output,
        Some(json!(format!("published after {output}")))
    );
    let events = env.event_types(id).await;
    for kind in ["step.awaiting_approval", "step.approved", "run.succeeded"] {
        assert_eq!(count(&events, kind), 1, "{kind} in {events:?}");
    }
    assert_eq!(
        audit_actions(&env, id).await,
        [("approval.approved".to_string(), "appr".to_string())]
    );

    for action in ["approve", "reject"] {
        let again = decide(&app, id, action, None, ADMIN).await;
        assert_eq!(again.status, StatusCode::CONFLICT);
        assert_eq!(again.body["code"], "approval_already_decided");
        // A client retrying after a lost response learns whose decision won.
        assert_eq!(
            again.body["approval"]["status"], "approved",
            "{}",
            again.body
        );
        assert_eq!(
            again.body["approval"]["decided_by"], "appr",
            "{}",
            again.body
        );
    }
    stop.cancel();
    worker.await.expect("worker");
}

async fn rejecting_fails_the_run_with_reason_rejected(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let id = create(&app, gated(json!({}))).await;
    env.wait_for(id, RunStatus::Waiting, WAIT).await;
    let rejected = decide(
        &app,
        id,
        "reject",
        Some(r#"{"comment":"wrong numbers"}"#),
        ADMIN,
    )
    .await;
    assert_eq!(rejected.status, StatusCode::OK, "{}", rejected.body);
    assert_eq!(rejected.body["status"], "rejected");

    let detail = env.wait_for(id, RunStatus::Failed, WAIT).await;
    assert_eq!(detail.run.error.as_deref(), Some("rejected"));
    assert_eq!(detail.steps[1].status, StepStatus::Rejected);
    let approval = detail.steps[1].approval.as_ref().expect("approval");
    assert_eq!(approval.decision.as_deref(), Some("rejected"));
    assert_eq!(approval.comment.as_deref(), Some("wrong numbers"));
    assert_eq!(approval.decided_by.as_deref(), Some("boss"));
    assert_eq!(detail.steps[2].status, StepStatus::Skipped);
    let events = env.event_types(id).await;
    assert_eq!(events[events.len() - 2..], ["step.rejected", "run.failed"]);
    assert!(!env.store.has_unfinished_jobs().await.expect("jobs"));
    assert_eq!(
        audit_actions(&env, id).await,
        [("approval.rejected".to_string(), "boss".to_string())]
    );
    stop.cancel();
    worker.await.expect("worker");
}

async fn rejecting_with_on_reject_continue_goes_on_with_approved_false(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let id = create(&app, gated(json!({"on_reject": "continue"}))).await;
    env.wait_for(id, RunStatus::Waiting, WAIT).await;
    let rejected = decide(&app, id, "reject", None, APPROVER).await;
    assert_eq!(rejected.status, StatusCode::OK, "{}", rejected.body);
    let detail = env.wait_for(id, RunStatus::Succeeded, WAIT).await;
    assert_eq!(
        detail.steps[1].output,
        Some(json!({"approved": false, "by": "appr", "comment": null}))
    );
    assert_eq!(detail.steps[2].status, StepStatus::Succeeded);
    let events = env.event_types(id).await;
    assert_eq!(count(&events, "step.rejected"), 1, "{events:?}");
    stop.cancel();
    worker.await.expect("worker");
}

async fn an_approval_as_the_last_step_gives_the_run_its_output(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let last =
        json!([{"kind": "approval", "prompt": "Ship {{input.title}}?", "on_reject": "continue"}]);
    let approved = create(&app, last.clone()).await;
    let rejected = create(&app, last).await;
    env.wait_for(approved, RunStatus::Waiting, WAIT).await;
    env.wait_for(rejected, RunStatus::Waiting, WAIT).await;
    let reply = call(
        &app,
        "POST",
        &step_uri(approved, 0, "approve"),
        None,
        APPROVER,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["prompt"], "Ship Q3 report?");
    let reply = call(
        &app,
        "POST",
        &step_uri(rejected, 0, "reject"),
        None,
        APPROVER,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let approved = env.wait_for(approved, RunStatus::Succeeded, WAIT).await;
    assert_eq!(
        approved.run.output,
        Some(json!({"approved": true, "by": "appr", "comment": null}))
    );
    let rejected = env.wait_for(rejected, RunStatus::Succeeded, WAIT).await;
    assert_eq!(
        rejected.run.output,
        Some(json!({"approved": false, "by": "appr", "comment": null}))
    );
    assert_eq!(
        count(&env.event_types(rejected.run.id).await, "run.succeeded"),
        1
    );
    assert!(!env.store.has_unfinished_jobs().await.expect("jobs"));
    stop.cancel();
    worker.await.expect("worker");
}

async fn deadlines_apply_on_timeout_once_with_several_workers(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    // Two workers, so two maintenance loops contend for the expiry.
    let (w1, s1) = env.spawn_worker(2, LlmBackend::Offline);
    let (w2, s2) = env.spawn_worker(2, LlmBackend::Offline);
    let approve = create(
        &app,
        gated(json!({"timeout_s": 1, "on_timeout": "approve"})),
    )
    .await;
    let reject = create(&app, gated(json!({"timeout_s": 1}))).await;

    let approved = env.wait_for(approve, RunStatus::Succeeded, WAIT).await;
    assert_eq!(
        approved.steps[1].output,
        Some(json!({"approved": true, "by": "system", "comment": null}))
    );
    let rejected = env.wait_for(reject, RunStatus::Failed, WAIT).await;
    assert_eq!(rejected.run.error.as_deref(), Some("rejected"));
    // Let both leaders tick again: nothing is applied twice.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let events = env.event_types(approve).await;
    assert_eq!(count(&events, "step.approval_expired"), 1, "{events:?}");
    assert_eq!(count(&events, "step.approved"), 1, "{events:?}");
    assert_eq!(count(&events, "step.succeeded"), 3, "{events:?}");
    let events = env.event_types(reject).await;
    assert_eq!(count(&events, "step.approval_expired"), 1, "{events:?}");
    assert_eq!(count(&events, "step.rejected"), 1, "{events:?}");
    assert_eq!(count(&events, "run.failed"), 1, "{events:?}");
    assert_eq!(
        audit_actions(&env, approve).await,
        [(
            "approval.expired_approved".to_string(),
            "system".to_string()
        )]
    );
    assert_eq!(
        audit_actions(&env, reject).await,
        [(
            "approval.expired_rejected".to_string(),
            "system".to_string()
        )]
    );
    let late = decide(&app, approve, "reject", None, APPROVER).await;
    assert_eq!(late.body["code"], "approval_already_decided");
    s1.cancel();
    s2.cancel();
    w1.await.expect("worker");
    w2.await.expect("worker");
}

async fn a_decision_racing_the_deadline_has_exactly_one_winner(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(4, LlmBackend::Offline);
    let runs: Vec<Uuid> = {
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(create(&app, gated(json!({"timeout_s": 1}))).await);
        }
        ids
    };
    for id in &runs {
        env.wait_for(*id, RunStatus::Waiting, WAIT).await;
    }
    // No leader from here on: the race below is between the request and
    // explicit expiry sweeps only.
    stop.cancel();
    worker.await.expect("worker");
    let deadline = runs.len();
    let mut pending = Vec::new();
    for id in &runs {
        pending.push(
            env.store
                .get_approval(*id, 1)
                .await
                .expect("read")
                .expect("approval"),
        );
    }
    let expires = pending.iter().map(|a| a.expires_at).max().expect("some");
    let wait_ms = (expires - env.store.db_now().await.expect("now")).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;

    let sweeps = (0..3).map(|_| {
        let store = env.store.clone();
        tokio::spawn(async move { store.expire_due_approvals(100).await.expect("sweep").len() })
    });
    let requests = runs.iter().map(|id| {
        let app = app.clone();
        let id = *id;
        tokio::spawn(async move { decide(&app, id, "approve", None, APPROVER).await.status })
    });
    let sweeps: Vec<tokio::task::JoinHandle<usize>> = sweeps.collect();
    let requests: Vec<tokio::task::JoinHandle<StatusCode>> = requests.collect();
    let mut expired = 0;
    for s in sweeps {
        expired += s.await.expect("sweep task");
    }
    let mut approved = 0;
    for r in requests {
        match r.await.expect("request task") {
            StatusCode::OK => approved += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        expired + approved,
        deadline,
        "each approval decided exactly once"
    );
    for id in &runs {
        let events = env.event_types(*id).await;
        let decisions = count(&events, "step.approved") + count(&events, "step.rejected");
        assert_eq!(decisions, 1, "{events:?}");
        assert_eq!(audit_actions(&env, *id).await.len(), 1);
        assert!(env.store.result_count(*id, 1).await.expect("results") <= 1);
    }
}

async fn two_approvers_racing_get_one_200_and_one_409(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(4, LlmBackend::Offline);
    let mut runs = Vec::new();
    for _ in 0..4 {
        runs.push(create(&app, gated(json!({}))).await);
    }
    for id in &runs {
        env.wait_for(*id, RunStatus::Waiting, WAIT).await;
    }
    for id in &runs {
        let (a, b) = tokio::join!(
            decide(&app, *id, "approve", None, APPROVER),
            decide(&app, *id, "reject", None, ADMIN),
        );
        let mut statuses = [a.status, b.status];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT]);
        let loser = if a.status == StatusCode::CONFLICT {
            &a
        } else {
            &b
        };
        assert_eq!(loser.body["code"], "approval_already_decided");
        assert_eq!(audit_actions(&env, *id).await.len(), 1);
    }
    stop.cancel();
    worker.await.expect("worker");
}

async fn only_approver_and_admin_keys_may_decide(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let first = create(&app, gated(json!({}))).await;
    let second = create(&app, gated(json!({}))).await;
    env.wait_for(first, RunStatus::Waiting, WAIT).await;
    env.wait_for(second, RunStatus::Waiting, WAIT).await;

    for action in ["approve", "reject"] {
        let denied = decide(&app, first, action, None, PLAIN).await;
        assert_eq!(denied.status, StatusCode::FORBIDDEN);
        assert_eq!(denied.body["code"], "approver_required");
    }
    let anonymous = send(&app, "POST", &step_uri(first, 1, "approve"), None, &[]).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    // Any key may read the inbox.
    let inbox = call(&app, "GET", "/api/v2/approvals", None, PLAIN).await;
    assert_eq!(inbox.status, StatusCode::OK);
    assert_eq!(inbox.body["approvals"].as_array().map(Vec::len), Some(2));

    assert_eq!(
        decide(&app, first, "approve", None, APPROVER).await.status,
        StatusCode::OK
    );
    assert_eq!(
        decide(&app, second, "approve", None, ADMIN).await.status,
        StatusCode::OK
    );
    env.wait_for(first, RunStatus::Succeeded, WAIT).await;
    let second = env.wait_for(second, RunStatus::Succeeded, WAIT).await;
    assert_eq!(
        second.steps[1].output.as_ref().map(|o| o["by"].clone()),
        Some(json!("boss"))
    );
    stop.cancel();
    worker.await.expect("worker");
}

async fn a_run_cancelled_while_waiting_is_cancelled_and_later_decisions_are_refused(
    backend: Backend,
) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let id = create(&app, gated(json!({}))).await;
    env.wait_for(id, RunStatus::Waiting, WAIT).await;
    let cancelled = call(
        &app,
        "POST",
        &format!("/api/v2/runs/{id}/cancel"),
        None,
        PLAIN,
    )
    .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    assert_eq!(cancelled.body["status"], "cancelled");
    assert_eq!(cancelled.body["steps"][1]["status"], "cancelled");

    let late = decide(&app, id, "approve", None, APPROVER).await;
    assert_eq!(late.status, StatusCode::CONFLICT);
    assert_eq!(late.body["code"], "step_not_awaiting_approval");
    let pending = call(&app, "GET", "/api/v2/approvals", None, PLAIN).await;
    assert_eq!(pending.body["approvals"], json!([]));
    let decided = call(&app, "GET", "/api/v2/approvals?status=decided", None, PLAIN).await;
    assert_eq!(decided.body["approvals"][0]["status"], "cancelled");
    assert!(!env.store.has_unfinished_jobs().await.expect("jobs"));
    assert!(audit_actions(&env, id).await.is_empty());
    stop.cancel();
    worker.await.expect("worker");
}

async fn a_waiting_approval_holds_no_worker_slot_and_no_lease(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    // One slot: if the waiting step held it, the second run could not run.
    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    let waiting = create(&app, gated(json!({}))).await;
    env.wait_for(waiting, RunStatus::Waiting, WAIT).await;
    let other = create(
        &app,
        json!([{"kind": "template", "template": "a"}, {"kind": "delay", "ms": 10}]),
    )
    .await;
    env.wait_for(other, RunStatus::Succeeded, WAIT).await;
    let counts = env.store.queue_counts().await.expect("counts");
    assert_eq!(counts.awaiting_approval, 1, "{counts:?}");
    assert_eq!(counts.running, 0, "no lease is held: {counts:?}");
    assert_eq!(counts.queued, 0, "not claimable: {counts:?}");
    assert_eq!(
        env.store
            .get_run(waiting)
            .await
            .expect("run")
            .expect("exists")
            .run
            .status,
        RunStatus::Waiting
    );
    stop.cancel();
    worker.await.expect("worker");
}

async fn the_inbox_lists_oldest_first_in_cursor_pages(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    let mut runs = Vec::new();
    for _ in 0..3 {
        let id = create(&app, gated(json!({}))).await;
        // One at a time, so that their waits begin in creation order.
        env.wait_for(id, RunStatus::Waiting, WAIT).await;
        runs.push(id);
    }
    let first = call(
        &app,
        "GET",
        "/api/v2/approvals?status=pending&limit=2",
        None,
        PLAIN,
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let page: Vec<Value> = first.body["approvals"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["prompt"], "Publish draft of Q3 report?");
    assert_eq!(page[0]["step_index"], 1);
    assert_eq!(page[0]["status"], "pending");
    assert!(page[0]["waiting_since"].as_str() <= page[1]["waiting_since"].as_str());
    assert!(page[0]["expires_at"].as_str().is_some());
    let cursor = first.body["next_cursor"].as_str().expect("a next page");
    let second = call(
        &app,
        "GET",
        &format!("/api/v2/approvals?limit=2&cursor={cursor}"),
        None,
        PLAIN,
    )
    .await;
    let rest: Vec<Value> = second.body["approvals"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(rest.len(), 1);
    assert!(second.body["next_cursor"].is_null());
    let listed: Vec<String> = page
        .iter()
        .chain(&rest)
        .map(|a| a["run_id"].as_str().unwrap_or_default().to_string())
        .collect();
    let created: Vec<String> = runs.iter().map(Uuid::to_string).collect();
    assert_eq!(listed, created, "oldest first");

    assert_eq!(
        decide(&app, runs[0], "approve", None, APPROVER)
            .await
            .status,
        StatusCode::OK
    );
    let sizes = |r: Reply| r.body["approvals"].as_array().map(Vec::len);
    assert_eq!(
        sizes(call(&app, "GET", "/api/v2/approvals", None, PLAIN).await),
        Some(2)
    );
    assert_eq!(
        sizes(call(&app, "GET", "/api/v2/approvals?status=decided", None, PLAIN).await),
        Some(1)
    );
    assert_eq!(
        sizes(call(&app, "GET", "/api/v2/approvals?status=all", None, PLAIN).await),
        Some(3)
    );
    let bad = call(&app, "GET", "/api/v2/approvals?status=late", None, PLAIN).await;
    assert_eq!(bad.body["code"], "invalid_parameter");
    let bad = call(&app, "GET", "/api/v2/approvals?cursor=abc", None, PLAIN).await;
    assert_eq!(bad.body["code"], "invalid_cursor");
    stop.cancel();
    worker.await.expect("worker");
}

async fn metrics_report_pending_approvals_and_decisions(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let id = create(&app, gated(json!({}))).await;
    env.wait_for(id, RunStatus::Waiting, WAIT).await;
    // The gauge comes from the maintenance snapshot (refreshed every tick).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = support::get_text(&app, "/metrics").await;
        if text.contains("vm_approvals_pending 1\n") {
            assert!(
                text.contains("vm_approval_oldest_pending_seconds "),
                "{text}"
            );
            assert!(
                text.contains("vm_queue_jobs{state=\"awaiting_approval\"} 1"),
                "{text}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        decide(&app, id, "approve", None, APPROVER).await.status,
        StatusCode::OK
    );
    let text = support::get_text(&app, "/metrics").await;
    assert!(
        text.contains("vm_approval_decisions_total{decision=\"approved\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("vm_approval_decisions_total{decision=\"expired_rejected\"} 0"),
        "{text}"
    );
    assert!(text.contains("vm_approval_wait_seconds_count 1"), "{text}");
    assert!(
        text.contains("vm_approval_wait_seconds_bucket{le=\"2592000.0\"} 1"),
        "{text}"
    );
    stop.cancel();
    worker.await.expect("worker");
}

async fn a_pending_approval_survives_backup_and_restore_and_is_decided_there(backend: Backend) {
    let source = env(backend).await;
    let app = source.router();
    let (worker, stop) = source.spawn_worker(1, LlmBackend::Offline);
    let id = create(&app, gated(json!({}))).await;
    source.wait_for(id, RunStatus::Waiting, WAIT).await;
    stop.cancel();
    worker.await.expect("worker");
    let mut file = Vec::new();
    source.store.backup_to(&mut file).await.expect("backup");

    let target = env(backend).await;
    let summary = target
        .store
        .restore_from(&file[..], Default::default())
        .await
        .expect("restore");
    assert!(
        summary
            .rows
            .iter()
            .any(|(table, n)| table == "approvals" && *n == 1),
        "{:?}",
        summary.rows
    );
    let app = target.router();
    let inbox = call(&app, "GET", "/api/v2/approvals", None, PLAIN).await;
    assert_eq!(inbox.body["approvals"][0]["run_id"], id.to_string());
    let (worker, stop) = target.spawn_worker(1, LlmBackend::Offline);
    assert_eq!(
        decide(&app, id, "approve", None, APPROVER).await.status,
        StatusCode::OK
    );
    target.wait_for(id, RunStatus::Succeeded, WAIT).await;
    stop.cancel();
    worker.await.expect("worker");
}

async fn approval_steps_are_validated_at_creation(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    for (step, needle) in [
        (
            json!({"kind": "approval", "prompt": "ok?", "timeout_s": 0}),
            "timeout_s",
        ),
        (
            json!({"kind": "approval", "prompt": "ok?", "timeout_s": 2_592_001}),
            "timeout_s",
        ),
        (
            json!({"kind": "approval", "prompt": "ok?", "on_timeout": "later"}),
            "`reject` or `approve`",
        ),
        (
            json!({"kind": "approval", "prompt": "{{steps.3.output}}"}),
            "steps.3",
        ),
        (json!({"kind": "approval"}), "prompt"),
    ] {
        let body = json!({"steps": [step]}).to_string();
        let reply = call(&app, "POST", "/api/v2/runs", Some(&body), PLAIN).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{step}");
        assert_eq!(reply.body["code"], "invalid_step", "{step}");
        let message = reply.body["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{message}");
    }
    // Nothing was stored, and a store-level expiry of nothing decides nothing.
    assert!(
        env.store
            .expire_due_approvals(10)
            .await
            .expect("sweep")
            .is_empty()
    );
    let outcome = env
        .store
        .decide_approval(Uuid::now_v7(), 0, Decision::Approve, "x", None, None)
        .await
        .expect("decide");
    assert!(matches!(outcome, DecideOutcome::RunNotFound), "{outcome:?}");
}

/// Without `tenant` an approver with several tenants' runs in view (an
/// admin) cannot tell whose run it is approving, nor can a client retrying
/// after a lost response tell from the 409 whose approval it hit.
async fn the_inbox_and_the_409_name_the_runs_tenant(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let team = create(&app, gated(json!({}))).await;
    env.wait_for(team, RunStatus::Waiting, WAIT).await;
    let hook = create_by_webhook(&app, "github", "nonce-tenant-1", gated(json!({}))).await;
    env.wait_for(hook, RunStatus::Waiting, WAIT).await;

    let inbox = call(&app, "GET", "/api/v2/approvals", None, ADMIN).await;
    let tenants: Vec<(String, String)> = inbox.body["approvals"]
        .as_array()
        .expect("approvals")
        .iter()
        .map(|a| {
            (
                a["run_id"].as_str().unwrap_or_default().to_string(),
                a["tenant"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        tenants,
        [
            (team.to_string(), "team".to_string()),
            (hook.to_string(), "webhook:github".to_string())
        ]
    );
    let own = call(&app, "GET", "/api/v2/approvals", None, PLAIN).await;
    assert_eq!(own.body["approvals"][0]["tenant"], "team");
    let detail = call(&app, "GET", &format!("/api/v2/runs/{team}"), None, PLAIN).await;
    assert_eq!(detail.body["steps"][1]["approval"]["tenant"], "team");

    let won = decide(&app, team, "approve", None, APPROVER).await;
    assert_eq!(won.body["tenant"], "team", "{}", won.body);
    let lost = decide(&app, team, "reject", None, ADMIN).await;
    assert_eq!(lost.status, StatusCode::CONFLICT);
    assert_eq!(lost.body["approval"]["tenant"], "team", "{}", lost.body);
    let decided = call(&app, "GET", "/api/v2/approvals?status=decided", None, ADMIN).await;
    assert_eq!(decided.body["approvals"][0]["tenant"], "team");
    // Clients generated from the OpenAPI document get the field too.
    let doc = send(&app, "GET", "/api/v2/openapi.json", None, &[]).await;
    let schema = &doc.body["components"]["schemas"]["ApprovalView"];
    assert_eq!(schema["properties"]["tenant"]["type"], "string", "{schema}");
    assert!(
        schema["required"]
            .as_array()
            .is_some_and(|r| r.contains(&json!("tenant"))),
        "{schema}"
    );
    stop.cancel();
    worker.await.expect("worker");
}

/// An approver of one tenant must not decide (or learn of) another
/// tenant's approvals: the run is hidden as on every run route (404, never
/// 403, which would confirm that the run exists).
async fn an_approver_decides_only_its_own_tenants_approvals(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let id = create(&app, gated(json!({}))).await;
    env.wait_for(id, RunStatus::Waiting, WAIT).await;
    for action in ["approve", "reject"] {
        for key in [RIVAL, HOOKS] {
            let refused = decide(&app, id, action, None, key).await;
            assert_eq!(refused.status, StatusCode::NOT_FOUND, "{}", refused.body);
            assert_eq!(refused.body["code"], "run_not_found");
        }
    }
    let inbox = call(&app, "GET", "/api/v2/approvals?status=all", None, RIVAL).await;
    assert_eq!(inbox.body["approvals"], json!([]));
    let still = env
        .store
        .get_approval(id, 1)
        .await
        .expect("read")
        .expect("approval");
    assert_eq!(still.decision, None, "nothing was decided");
    assert_eq!(
        decide(&app, id, "approve", None, APPROVER).await.status,
        StatusCode::OK
    );
    env.wait_for(id, RunStatus::Succeeded, WAIT).await;
    stop.cancel();
    worker.await.expect("worker");
}

/// A webhook's run belongs to `webhook:<source>`, a tenant no plain
/// `tenant=` can name: without `tenant=webhook/<source>` only an admin could
/// decide it, and every such approval would wait for its deadline.
async fn a_key_with_tenant_webhook_source_decides_that_sources_runs(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let github = create_by_webhook(&app, "github", "nonce-github-1", gated(json!({}))).await;
    let jira = create_by_webhook(&app, "jira", "nonce-jira-0001", gated(json!({}))).await;
    env.wait_for(github, RunStatus::Waiting, WAIT).await;
    env.wait_for(jira, RunStatus::Waiting, WAIT).await;

    // The key sees exactly its source's runs and approvals.
    let inbox = call(&app, "GET", "/api/v2/approvals", None, HOOKS).await;
    let listed: Vec<&str> = inbox.body["approvals"]
        .as_array()
        .expect("approvals")
        .iter()
        .filter_map(|a| a["run_id"].as_str())
        .collect();
    assert_eq!(listed, [github.to_string()]);
    let other = decide(&app, jira, "approve", None, HOOKS).await;
    assert_eq!(other.body["code"], "run_not_found");
    for key in [APPROVER, RIVAL] {
        assert_eq!(
            decide(&app, github, "approve", None, key).await.body["code"],
            "run_not_found"
        );
    }

    let approved = decide(&app, github, "approve", Some(r#"{"comment":"ok"}"#), HOOKS).await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.body);
    assert_eq!(approved.body["decided_by"], "hooks");
    assert_eq!(approved.body["tenant"], "webhook:github");
    let done = env.wait_for(github, RunStatus::Succeeded, WAIT).await;
    assert_eq!(
        done.steps[1].output.as_ref().map(|o| o["by"].clone()),
        Some(json!("hooks"))
    );
    // An admin still decides any source's runs.
    assert_eq!(
        decide(&app, jira, "reject", None, ADMIN).await.status,
        StatusCode::OK
    );
    env.wait_for(jira, RunStatus::Failed, WAIT).await;
    stop.cancel();
    worker.await.expect("worker");
}

/// Refused decisions left no trace: a key probing other tenants' runs, or
/// a plain key trying to approve, was invisible to the audit trail.
async fn refused_decisions_are_audited_with_who_what_and_why(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let id = create(&app, gated(json!({}))).await;
    env.wait_for(id, RunStatus::Waiting, WAIT).await;
    let secret_comment = r#"{"comment":"do not store me"}"#;

    // 403: not an approver.
    assert_eq!(
        decide(&app, id, "approve", Some(secret_comment), PLAIN)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // 404: another tenant's run.
    assert_eq!(
        decide(&app, id, "reject", None, RIVAL).await.status,
        StatusCode::NOT_FOUND
    );
    // 409: not an approval step.
    let first_step = call(&app, "POST", &step_uri(id, 0, "approve"), None, APPROVER).await;
    assert_eq!(first_step.status, StatusCode::CONFLICT);
    // 200, then 409: already decided.
    assert_eq!(
        decide(&app, id, "approve", None, APPROVER).await.status,
        StatusCode::OK
    );
    assert_eq!(
        decide(&app, id, "reject", Some(secret_comment), ADMIN)
            .await
            .status,
        StatusCode::CONFLICT
    );
    // A malformed request asked nothing of the approval: not audited.
    assert_eq!(
        decide(&app, id, "approve", Some("{nope"), APPROVER)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    let run = Some(id.to_string());
    let rows = refusals(&env).await;
    assert_eq!(
        rows,
        [
            (
                "plain".to_string(),
                run.clone(),
                "approver_required".to_string(),
                json!({"decision": "approve", "step_index": 1}),
                Some("team".to_string())
            ),
            (
                "rival".to_string(),
                run.clone(),
                "run_not_found".to_string(),
                json!({"decision": "reject", "step_index": 1}),
                Some("rivals".to_string())
            ),
            (
                "appr".to_string(),
                run.clone(),
                "step_not_awaiting_approval".to_string(),
                json!({"decision": "approve", "step_index": 0}),
                Some("team".to_string())
            ),
            (
                "boss".to_string(),
                run.clone(),
                "approval_already_decided".to_string(),
                json!({"decision": "reject", "step_index": 1, "decided": "approved", "decided_by": "appr"}),
                Some("boss".to_string())
            ),
        ]
    );
    // The success stays one `approval.approved` row; nothing secret anywhere.
    assert_eq!(
        audit_actions(&env, id).await,
        [("approval.approved".to_string(), "appr".to_string())]
    );
    let all = env
        .store
        .list_audit(&AuditFilter {
            limit: 1_000,
            ..AuditFilter::default()
        })
        .await
        .expect("audit");
    let text = serde_json::to_string(&all).expect("json");
    for secret in ["do not store me", PLAIN, APPROVER, ADMIN, RIVAL] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    // Admins find refusals through the API like any audit row.
    let listed = call(
        &app,
        "GET",
        "/api/v2/audit?action=approval.refused&outcome=run_not_found",
        None,
        ADMIN,
    )
    .await;
    assert_eq!(
        listed.body["entries"][0]["actor"], "rival",
        "{}",
        listed.body
    );
    stop.cancel();
    worker.await.expect("worker");
}

/// `on_timeout: approve` queued the next step but woke no worker, so it
/// waited for an idle poll (here 5 s): the step after an expired approval
/// must start about as soon as the expiry is applied.
async fn an_expiry_that_goes_on_wakes_the_workers_at_once(backend: Backend) {
    let env = env(backend).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker_with(2, LlmBackend::Offline, |c| {
        c.poll_interval = Duration::from_secs(5);
    });
    let mut runs = Vec::new();
    runs.push(
        create(
            &app,
            gated(json!({"timeout_s": 1, "on_timeout": "approve"})),
        )
        .await,
    );
    runs.push(
        create(
            &app,
            gated(json!({"timeout_s": 1, "on_reject": "continue"})),
        )
        .await,
    );
    for id in &runs {
        env.wait_for(*id, RunStatus::Succeeded, Duration::from_secs(20))
            .await;
        let events = env.store.list_events(*id, 0, 100).await.expect("events");
        let at = |kind: &str, step: i64| {
            events
                .iter()
                .find(|e| e.event_type == kind && e.step_index == Some(step))
                .map(|e| e.created_at)
                .unwrap_or_else(|| panic!("{kind} of step {step}: {events:?}"))
        };
        let expired = at("step.approval_expired", 1);
        let started = at("step.started", 2);
        assert!(
            started - expired < 400,
            "the next step started {} ms after the expiry",
            started - expired
        );
    }
    stop.cancel();
    worker.await.expect("worker");
}

/// An API process without a worker may lead queue maintenance and apply a
/// deadline: its nudge must reach the workers of other processes through
/// Redis, or the next step waits for their idle poll. Four expiries a
/// quarter of a second apart: without the nudge at least one lands far
/// from the worker's next look at the queue.
async fn an_expiry_applied_by_another_process_nudges_the_workers_through_redis(backend: Backend) {
    let redis = RedisServer::start();
    let env = env(backend).await;
    let bus = RedisBus::new(&Secret::new(redis.url()), Arc::new(Metrics::new())).expect("bus");
    let mut state = env.state();
    state.redis = Some(bus.clone());
    let app = vm_webapp::http::router(state);
    let shutdown = CancellationToken::new();
    // The other process: maintenance only, leading first (every 100 ms;
    // the worker's own loop, every second, never takes over), nudging
    // through Redis only.
    let leader = tokio::spawn(vm_webapp::maintenance::run(
        env.store.clone(),
        "api-elsewhere".into(),
        Duration::from_millis(100),
        Arc::new(Metrics::new()),
        Nudge::new(Arc::new(Notify::new()), Some(bus.clone())),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The worker: polls every 5 s, woken by Redis.
    let wake = Arc::new(Notify::new());
    tokio::spawn(bus.clone().forward_wakeups(wake.clone(), shutdown.clone()));
    let worker = Worker::new(
        env.store.clone(),
        StepRunner::new(LlmBackend::Offline),
        WorkerConfig {
            id: "redis-woken".into(),
            concurrency: 4,
            poll_interval: Duration::from_secs(5),
            lease: env.settings.queue.lease,
            backoff_base: env.settings.queue.backoff_base,
            backoff_max: env.settings.queue.backoff_max,
            shutdown_grace: env.settings.queue.shutdown_grace,
        },
        wake,
    );
    let worker = tokio::spawn(worker.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut runs = Vec::new();
    for _ in 0..4 {
        runs.push(
            create(
                &app,
                gated(json!({"timeout_s": 1, "on_timeout": "approve"})),
            )
            .await,
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut delays = Vec::new();
    for id in &runs {
        env.wait_for(*id, RunStatus::Succeeded, Duration::from_secs(20))
            .await;
        let events = env.store.list_events(*id, 0, 100).await.expect("events");
        let at = |kind: &str, step: i64| {
            events
                .iter()
                .find(|e| e.event_type == kind && e.step_index == Some(step))
                .map(|e| e.created_at)
                .unwrap_or_else(|| panic!("{kind} of step {step}: {events:?}"))
        };
        delays.push(at("step.started", 2) - at("step.approval_expired", 1));
    }
    assert!(
        delays.iter().all(|d| *d < 400),
        "next steps started {delays:?} ms after their expiry"
    );
    shutdown.cancel();
    worker.await.expect("worker");
    leader.await.expect("maintenance");
}

on_both_backends!(
    approving_records_the_decision_and_the_run_goes_on,
    rejecting_fails_the_run_with_reason_rejected,
    rejecting_with_on_reject_continue_goes_on_with_approved_false,
    an_approval_as_the_last_step_gives_the_run_its_output,
    deadlines_apply_on_timeout_once_with_several_workers,
    a_decision_racing_the_deadline_has_exactly_one_winner,
    two_approvers_racing_get_one_200_and_one_409,
    only_approver_and_admin_keys_may_decide,
    a_run_cancelled_while_waiting_is_cancelled_and_later_decisions_are_refused,
    a_waiting_approval_holds_no_worker_slot_and_no_lease,
    the_inbox_lists_oldest_first_in_cursor_pages,
    metrics_report_pending_approvals_and_decisions,
    a_pending_approval_survives_backup_and_restore_and_is_decided_there,
    approval_steps_are_validated_at_creation,
    the_inbox_and_the_409_name_the_runs_tenant,
    an_approver_decides_only_its_own_tenants_approvals,
    a_key_with_tenant_webhook_source_decides_that_sources_runs,
    refused_decisions_are_audited_with_who_what_and_why,
    an_expiry_that_goes_on_wakes_the_workers_at_once,
    an_expiry_applied_by_another_process_nudges_the_workers_through_redis,
);
