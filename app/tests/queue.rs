//! The queue's behavioural suite: every scenario runs on SQLite and on a real
//! PostgreSQL started by the tests.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::fake_llm::{Answer, FakeLlm};
use support::{Backend, TestEnv};
use uuid::Uuid;
use vm_webapp::config::Secret;
use vm_webapp::model::{NewRun, RunStatus, StepStatus};
use vm_webapp::steps::llm::{LlmBackend, LlmClient};
use vm_webapp::steps::parse_steps;
use vm_webapp::store::{CancelOutcome, CreateOutcome, Finish, QueueCounts};
use vm_webapp::worker::DrainReport;

const LONG: Duration = Duration::from_secs(20);

fn new_run(input: Value, steps: Value, key: Option<&str>) -> NewRun {
    let raw = steps.as_array().expect("steps array").clone();
    NewRun {
        steps: parse_steps(&raw, &input).expect("valid steps"),
        request_hash: format!("{input}{steps}"),
        input,
        idempotency_key: key.map(str::to_string),
        correlation_id: format!("corr-{}", Uuid::new_v4()),
        max_attempts: 3,
        actor: "test".into(),
        request_id: None,
        tenant: "anonymous".to_string(),
    }
}

async fn enqueue(env: &TestEnv, input: Value, steps: Value) -> Uuid {
    match env
        .store
        .create_run(&new_run(input, steps, None))
        .await
        .expect("create")
    {
        CreateOutcome::Created(run) => run.id,
        other => panic!("expected a new run, got {other:?}"),
    }
}

fn remote(fake: &FakeLlm, timeout_ms: u64) -> LlmBackend {
    LlmBackend::Remote(
        LlmClient::new(
            &fake.base_url,
            "kimi-test",
            Some(Secret::new("sk-test-secret")),
            Duration::from_millis(timeout_ms),
        )
        .expect("client"),
    )
}

async fn wait_for_event(env: &TestEnv, id: Uuid, event: &str) {
    let deadline = tokio::time::Instant::now() + LONG;
    while !env.event_types(id).await.iter().any(|e| e == event) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {event} event for {id}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn run_executes_steps_in_order_and_records_every_transition(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let id = enqueue(
        &env,
        json!({"name": "Ada"}),
        json!([
            {"kind": "template", "template": "Hello, {{input.name}}!"},
            {"kind": "transform", "op": "uppercase"},
            {"kind": "llm", "prompt": "Summarise: {{prev}}"}
        ]),
    )
    .await;
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let detail = env.wait_for(id, RunStatus::Succeeded, LONG).await;
    stop.cancel();
    worker.await.expect("worker");

    assert_eq!(detail.steps[0].output, Some(json!("Hello, Ada!")));
    assert_eq!(detail.steps[1].output, Some(json!("HELLO, ADA!")));
    let text = detail.steps[2]
        .output
        .as_ref()
        .and_then(|o| o["text"].as_str())
        .unwrap_or_default();
    assert!(text.contains("Summarise: HELLO, ADA!"), "{text}");
    assert_eq!(detail.run.output, detail.steps[2].output);
    assert!(
        detail
            .steps
            .iter()
            .all(|s| s.status == StepStatus::Succeeded && s.attempts == 1)
    );
    assert_eq!(
        env.event_types(id).await,
        [
            "run.queued",
            "run.started",
            "step.started",
            "step.succeeded",
            "step.started",
            "step.succeeded",
            "step.started",
            "step.succeeded",
            "run.succeeded"
        ]
    );
    assert_eq!(
        env.store.queue_counts().await.expect("counts"),
        QueueCounts::default()
    );
}

async fn transient_llm_failure_is_retried_with_backoff_then_succeeds(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let fake = FakeLlm::start(vec![
        Answer::Status(500),
        Answer::Status(503),
        Answer::Text("fine"),
    ])
    .await;
    let id = enqueue(
        &env,
        json!({}),
        json!([{"kind": "llm", "prompt": "hi", "system": "be brief", "max_tokens": 5}]),
    )
    .await;
    let (worker, stop) = env.spawn_worker(1, remote(&fake, 2_000));
    let detail = env.wait_for(id, RunStatus::Succeeded, LONG).await;
    stop.cancel();
    worker.await.expect("worker");

    assert_eq!(detail.steps[0].attempts, 3);
    assert_eq!(
        detail.steps[0].output.as_ref().map(|o| o["text"].clone()),
        Some(json!("fine"))
    );
    let events = env.event_types(id).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| *e == "step.retry_scheduled")
            .count(),
        2,
        "{events:?}"
    );
    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    let (auth, body) = &requests[0];
    assert_eq!(auth.as_deref(), Some("Bearer sk-test-secret"));
    assert_eq!(body["model"], "kimi-test");
    assert_eq!(body["max_tokens"], 5);
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    );
    assert_eq!(env.store.result_count(id, 0).await.expect("count"), 1);
}

async fn rejected_credentials_fail_the_run_without_retry(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let fake = FakeLlm::start(vec![Answer::Status(401)]).await;
    let id = enqueue(
        &env,
        json!({}),
        json!([{"kind": "llm", "prompt": "hi"}, {"kind": "transform", "op": "trim"}]),
    )
    .await;
    let (worker, stop) = env.spawn_worker(1, remote(&fake, 2_000));
    let detail = env.wait_for(id, RunStatus::Failed, LONG).await;
    stop.cancel();
    worker.await.expect("worker");

    assert_eq!(fake.requests().len(), 1, "a 401 must not be retried");
    let error = detail.run.error.unwrap_or_default();
    assert!(error.contains("401"), "{error}");
    assert!(!error.contains("sk-test-secret"));
    assert_eq!(detail.steps[0].status, StepStatus::Failed);
    assert_eq!(detail.steps[1].status, StepStatus::Skipped);
    assert_eq!(
        env.store.queue_counts().await.expect("counts"),
        QueueCounts {
            dead: 1,
            ..QueueCounts::default()
        }
    );
    let events = env.event_types(id).await;
    assert_eq!(
        events[events.len() - 2..],
        ["step.dead_lettered", "run.failed"]
    );
}

async fn llm_timeouts_are_retried_then_dead_lettered_after_max_attempts(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let fake = FakeLlm::start(vec![Answer::Slow(Duration::from_secs(5))]).await;
    let id = enqueue(&env, json!({}), json!([{"kind": "llm", "prompt": "hi"}])).await;
    let (worker, stop) = env.spawn_worker(1, remote(&fake, 200));
    let detail = env.wait_for(id, RunStatus::Failed, LONG).await;
    stop.cancel();
    worker.await.expect("worker");

    assert_eq!(fake.requests().len(), 3, "max attempts is 3");
    assert_eq!(detail.steps[0].attempts, 3);
    let error = detail.run.error.unwrap_or_default();
    assert!(
        error.contains("timed out") && error.contains("3 attempt"),
        "{error}"
    );
}

async fn an_unreachable_llm_fails_its_runs_cleanly_while_other_runs_proceed(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}/v1", closed.local_addr().expect("addr"));
    drop(closed);
    let llm = LlmBackend::Remote(
        LlmClient::new(
            &base,
            "m",
            Some(Secret::new("sk-x")),
            Duration::from_millis(500),
        )
        .expect("client"),
    );
    let doomed = enqueue(&env, json!({}), json!([{"kind": "llm", "prompt": "hi"}])).await;
    let fine = enqueue(
        &env,
        json!({}),
        json!([{"kind": "template", "template": "unaffected"}]),
    )
    .await;
    let (worker, stop) = env.spawn_worker(2, llm);
    let ok = env.wait_for(fine, RunStatus::Succeeded, LONG).await;
    let failed = env.wait_for(doomed, RunStatus::Failed, LONG).await;
    stop.cancel();
    worker.await.expect("worker");
    assert_eq!(ok.run.output, Some(json!("unaffected")));
    assert_eq!(failed.steps[0].attempts, 3, "retried up to the limit");
    assert!(failed.run.error.unwrap_or_default().contains("unreachable"));
}

async fn bad_reference_in_output_fails_the_run_permanently(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let id = enqueue(
        &env,
        json!({}),
        json!([{"kind": "template", "template": "plain"}, {"kind": "template", "template": "{{prev.missing}}"}]),
    )
    .await;
    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    let detail = env.wait_for(id, RunStatus::Failed, LONG).await;
    stop.cancel();
    worker.await.expect("worker");
    assert_eq!(detail.steps[0].status, StepStatus::Succeeded);
    assert_eq!(detail.steps[1].status, StepStatus::Failed);
    assert_eq!(
        detail.steps[1].attempts, 1,
        "a permanent error is not retried"
    );
    assert!(
        detail
            .run
            .error
            .unwrap_or_default()
            .contains("prev.missing")
    );
}

async fn killed_worker_job_is_redelivered_after_lease(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_JOB_LEASE_MS", "600")]).await;
    let id = enqueue(
        &env,
        json!({}),
        json!([{"kind": "delay", "ms": 1200}, {"kind": "template", "template": "after"}]),
    )
    .await;
    let (doomed, _stop) = env.spawn_worker(1, LlmBackend::Offline);
    wait_for_event(&env, id, "step.started").await;
    // Aborting the worker drops its job tasks mid-step without releasing
    // anything: exactly what a killed pod leaves behind.
    doomed.abort();
    let _ = doomed.await;

    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    let detail = env.wait_for(id, RunStatus::Succeeded, LONG).await;
    stop.cancel();
    worker.await.expect("worker");

    assert_eq!(
        detail.steps[0].attempts, 2,
        "the step was delivered a second time"
    );
    assert_eq!(detail.steps[1].output, Some(json!("after")));
    assert_eq!(
        env.store.result_count(id, 0).await.expect("count"),
        1,
        "recorded exactly once"
    );
    let events = env.event_types(id).await;
    assert!(
        events.contains(&"step.lease_expired".to_string()),
        "{events:?}"
    );
    assert_eq!(events.iter().filter(|e| *e == "step.succeeded").count(), 2);
}

async fn stale_claim_cannot_finish_a_newer_delivery(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let id = enqueue(
        &env,
        json!({}),
        json!([{"kind": "template", "template": "x"}]),
    )
    .await;
    let first = env
        .store
        .claim("a", 1, Duration::from_millis(10))
        .await
        .expect("claim")
        .remove(0);
    // Leases are measured by the database clock: let this one run out.
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(env.store.rescue_expired().await.expect("rescue"), 1);
    let second = env
        .store
        .claim("b", 1, Duration::from_secs(60))
        .await
        .expect("claim")
        .remove(0);
    assert_eq!((first.attempt, second.attempt), (1, 2));

    // Without the attempt check, the first worker would overwrite the second's work.
    assert_eq!(
        env.store
            .complete(&first, &json!("stale"))
            .await
            .expect("complete"),
        Finish::Stale
    );
    assert_eq!(
        env.store
            .retry(&first, "x", Duration::ZERO)
            .await
            .expect("retry"),
        Finish::Stale
    );
    assert_eq!(
        env.store.dead_letter(&first, "x").await.expect("dead"),
        Finish::Stale
    );
    assert!(
        env.store
            .extend_leases("a", &[(first.id, first.attempt)], Duration::from_secs(60))
            .await
            .expect("extend")
            .is_empty(),
        "the stale worker's renewal renews nothing"
    );
    assert_eq!(
        env.store
            .extend_leases("b", &[(second.id, second.attempt)], Duration::from_secs(60))
            .await
            .expect("extend")
            .into_iter()
            .collect::<Vec<_>>(),
        [second.id],
        "the current holder renews"
    );
    assert_eq!(
        env.store
            .complete(&second, &json!("fresh"))
            .await
            .expect("complete"),
        Finish::Recorded
    );
    assert_eq!(
        env.store
            .complete(&second, &json!("again"))
            .await
            .expect("complete"),
        Finish::Stale
    );

    let detail = env.store.get_run(id).await.expect("get").expect("run");
    assert_eq!(detail.run.status, RunStatus::Succeeded);
    assert_eq!(detail.run.output, Some(json!("fresh")));
    assert_eq!(env.store.result_count(id, 0).await.expect("count"), 1);
}

/// Without the per-row decode, one step this build cannot read (a newer
/// version's step kind during a rolling upgrade) would block every claim.
async fn an_unreadable_step_is_set_aside_and_does_not_block_the_queue(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let odd = enqueue(
        &env,
        json!({}),
        json!([{"kind": "template", "template": "x"}]),
    )
    .await;
    let fine = enqueue(
        &env,
        json!({}),
        json!([{"kind": "template", "template": "y"}]),
    )
    .await;
    // Damaged beyond JSON, or with a kind that is not a string: the claim
    // statement itself must not fail on them (the step.started event reads
    // the kind in SQL).
    let garbled = enqueue(
        &env,
        json!({}),
        json!([{"kind": "template", "template": "z"}]),
    )
    .await;
    let odd_kind = enqueue(
        &env,
        json!({}),
        json!([{"kind": "template", "template": "w"}]),
    )
    .await;
    let raw = env.raw_pool().await;
    for (run, payload) in [
        (odd, "{\"kind\":\"future_kind\",\"x\":1}"),
        (garbled, "not json at all"),
        (odd_kind, "{\"kind\":5}"),
    ] {
        sqlx::query("UPDATE jobs SET payload = $2 WHERE run_id = $1")
            .bind(run.to_string())
            .bind(payload)
            .execute(&raw)
            .await
            .expect("corrupt the payload");
    }
    raw.close().await;

    let claimed = env
        .store
        .claim("w", 10, Duration::from_secs(60))
        .await
        .expect("claim");
    assert_eq!(
        claimed.iter().map(|j| j.run_id).collect::<Vec<_>>(),
        [fine],
        "the readable job is claimed"
    );
    // Set aside for 30 s, an attempt spent each time; dead-lettered after the last.
    for i in 0..2 {
        assert!(
            env.store
                .claim("w", 10, Duration::from_secs(60))
                .await
                .expect("claim")
                .is_empty(),
            "set aside, not claimable yet (round {i})"
        );
        // The database clock decides when it is due: move its `run_at` back
        // instead of waiting the 30 s.
        let raw = env.raw_pool().await;
        sqlx::query("UPDATE jobs SET run_at = run_at - 31000 WHERE run_id = $1")
            .bind(odd.to_string())
            .execute(&raw)
            .await
            .expect("rewind");
        raw.close().await;
        let again = env
            .store
            .claim("w", 10, Duration::from_secs(60))
            .await
            .expect("claim");
        assert!(again.is_empty(), "round {i}");
    }
    let detail = env.store.get_run(odd).await.expect("get").expect("run");
    assert_eq!(detail.run.status, RunStatus::Failed);
    assert!(
        detail
            .run
            .error
            .unwrap_or_default()
            .contains("cannot read the `future_kind` step")
    );
    let events = env.event_types(odd).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| *e == "step.retry_scheduled")
            .count(),
        2,
        "{events:?}"
    );
}

/// Cancels racing claims and completions must neither fail nor leave a run or
/// a job half-way. (The lock order that keeps PostgreSQL from aborting one of
/// them as a deadlock is reviewed in `Store::cancel_run`; this load does not
/// reproduce the narrow window reliably, so it guards the outcome, not the
/// window.)
async fn cancels_racing_completions_always_settle_cleanly(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let mut ids = Vec::new();
    for i in 0..120 {
        ids.push(
            enqueue(
                &env,
                json!({"i": i}),
                json!([{"kind": "template", "template": "{{input.i}}"}, {"kind": "transform", "op": "length"}, {"kind": "template", "template": "end"}]),
            )
            .await,
        );
    }
    let workers: Vec<_> = (0..2)
        .map(|_| env.spawn_worker(8, LlmBackend::Offline))
        .collect();
    let mut cancels = Vec::new();
    for id in ids.iter().copied() {
        let store = env.store.clone();
        cancels.push(tokio::spawn(async move {
            store.cancel_run(id, "test", None).await
        }));
        tokio::task::yield_now().await;
    }
    for c in cancels {
        let outcome = c.await.expect("task").expect("a cancel never fails");
        assert!(!matches!(outcome, CancelOutcome::NotFound));
    }
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let counts = env.store.run_counts().await.expect("counts");
        let settled = counts.get(&RunStatus::Succeeded).copied().unwrap_or(0)
            + counts.get(&RunStatus::Cancelled).copied().unwrap_or(0);
        if settled == ids.len() as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "runs not settled: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (handle, stop) in workers {
        stop.cancel();
        handle.await.expect("worker");
    }
    assert_eq!(
        env.store.queue_counts().await.expect("counts"),
        QueueCounts::default(),
        "no job left behind"
    );
}

async fn lease_expiring_on_the_last_attempt_dead_letters_the_job(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_JOB_MAX_ATTEMPTS", "1")]).await;
    let mut run = new_run(
        json!({}),
        json!([{"kind": "template", "template": "x"}]),
        None,
    );
    run.max_attempts = 1;
    let CreateOutcome::Created(created) = env.store.create_run(&run).await.expect("create") else {
        panic!("not created")
    };
    env.store
        .claim("a", 1, Duration::from_millis(10))
        .await
        .expect("claim");
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(env.store.rescue_expired().await.expect("rescue"), 1);
    let detail = env
        .store
        .get_run(created.id)
        .await
        .expect("get")
        .expect("run");
    assert_eq!(detail.run.status, RunStatus::Failed);
    assert!(
        detail
            .run
            .error
            .unwrap_or_default()
            .contains("lease expired")
    );
}

/// Kind: a cancelled run must not contradict its events, and a running step
/// must stop within about a second (the lease renewal tick), not finish its
/// work or hold its slot until the next renewal.
async fn cancelling_a_run_stops_its_running_step_within_a_second(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_SHUTDOWN_GRACE_MS", "20000")]).await;
    let id = enqueue(
        &env,
        json!({}),
        json!([{"kind": "delay", "ms": 25000}, {"kind": "template", "template": "never"}]),
    )
    .await;
    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    wait_for_event(&env, id, "step.started").await;
    let CancelOutcome::Cancelled(detail) = env
        .store
        .cancel_run(id, "test", None)
        .await
        .expect("cancel")
    else {
        panic!("expected the run to be cancelled")
    };
    assert_eq!(detail.run.status, RunStatus::Cancelled);
    // The step learns of the cancel at the next renewal tick (≤ 1 s): after
    // that, stopping the worker has nothing to drain or release, although
    // the grace period would wait 20 s for a step still running.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    stop.cancel();
    let report = tokio::time::timeout(Duration::from_secs(2), worker)
        .await
        .expect("the cancelled step no longer holds the worker")
        .expect("worker");
    assert_eq!(report, DrainReport::default());

    let detail = env.store.get_run(id).await.expect("get").expect("run");
    assert_eq!(detail.run.status, RunStatus::Cancelled);
    let view: Vec<(StepStatus, i64)> = detail
        .steps
        .iter()
        .map(|s| (s.status, s.attempts))
        .collect();
    assert_eq!(
        view,
        [(StepStatus::Cancelled, 1), (StepStatus::Skipped, 0)],
        "the started step shows its attempt, as the events do"
    );
    let events = env.store.list_events(id, 0, 100).await.expect("events");
    let cancelled: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "step.cancelled")
        .map(|e| (e.step_index, e.attempt))
        .collect();
    assert_eq!(cancelled, [(Some(0), Some(1))]);
    assert_eq!(env.store.result_count(id, 0).await.expect("count"), 0);
    assert_eq!(
        env.store.queue_counts().await.expect("counts"),
        QueueCounts::default()
    );
    assert!(matches!(
        env.store
            .cancel_run(id, "test", None)
            .await
            .expect("cancel"),
        CancelOutcome::NotCancellable(RunStatus::Cancelled)
    ));
    assert!(matches!(
        env.store
            .cancel_run(Uuid::now_v7(), "test", None)
            .await
            .expect("cancel"),
        CancelOutcome::NotFound
    ));
}

async fn shutdown_lets_in_flight_jobs_finish_within_the_grace_period(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_SHUTDOWN_GRACE_MS", "5000")]).await;
    let id = enqueue(
        &env,
        json!({}),
        json!([{"kind": "delay", "ms": 400}, {"kind": "template", "template": "second"}]),
    )
    .await;
    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    wait_for_event(&env, id, "step.started").await;
    stop.cancel();
    let report = worker.await.expect("worker");
    assert_eq!((report.drained, report.released), (1, 0));
    let detail = env.store.get_run(id).await.expect("get").expect("run");
    assert_eq!(detail.steps[0].status, StepStatus::Succeeded);
    assert_eq!(
        detail.steps[1].status,
        StepStatus::Queued,
        "no new claims after shutdown"
    );
}

async fn shutdown_releases_jobs_that_outlive_the_grace_period(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_SHUTDOWN_GRACE_MS", "100")]).await;
    let id = enqueue(&env, json!({}), json!([{"kind": "delay", "ms": 3000}])).await;
    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    wait_for_event(&env, id, "step.started").await;
    stop.cancel();
    let report = worker.await.expect("worker");
    assert_eq!((report.drained, report.released), (0, 1));
    let detail = env.store.get_run(id).await.expect("get").expect("run");
    assert_eq!(detail.steps[0].status, StepStatus::Queued);
    assert_eq!(
        detail.steps[0].attempts, 0,
        "a release does not spend an attempt"
    );
    assert!(
        env.event_types(id)
            .await
            .contains(&"step.released".to_string())
    );

    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    let detail = env.wait_for(id, RunStatus::Succeeded, LONG).await;
    stop.cancel();
    worker.await.expect("worker");
    assert_eq!(detail.steps[0].attempts, 1);
}

async fn idempotency_key_returns_the_original_run_or_a_conflict(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let steps = json!([{"kind": "template", "template": "x"}]);
    let first = new_run(json!({"a": 1}), steps.clone(), Some("key-1"));
    let CreateOutcome::Created(run) = env.store.create_run(&first).await.expect("create") else {
        panic!("not created")
    };
    match env.store.create_run(&first).await.expect("replay") {
        CreateOutcome::Existing(detail) => assert_eq!(detail.run.id, run.id),
        other => panic!("expected the original run, got {other:?}"),
    }
    let different = new_run(json!({"a": 2}), steps, Some("key-1"));
    assert!(matches!(
        env.store.create_run(&different).await.expect("conflict"),
        CreateOutcome::Conflict
    ));
    assert_eq!(
        env.store
            .run_counts()
            .await
            .expect("counts")
            .values()
            .sum::<i64>(),
        1
    );
}

async fn migrations_are_idempotent(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    assert!(
        env.store
            .migrate()
            .await
            .expect("second migrate")
            .is_empty()
    );
    assert_eq!(
        env.store.schema_version().await.expect("version"),
        env.store.expected_schema_version()
    );
    env.store.ensure_schema().await.expect("schema is current");
}

async fn several_workers_drain_hundreds_of_jobs_exactly_once(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let runs = if backend == Backend::Postgres {
        300
    } else {
        100
    };
    let mut ids = Vec::new();
    for i in 0..runs {
        ids.push(
            enqueue(
                &env,
                json!({"i": i}),
                json!([{"kind": "template", "template": "{{input.i}}"}, {"kind": "transform", "op": "length"}]),
            )
            .await,
        );
    }
    let workers: Vec<_> = (0..4)
        .map(|_| env.spawn_worker(8, LlmBackend::Offline))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let counts = env.store.run_counts().await.expect("counts");
        if counts.get(&RunStatus::Succeeded).copied().unwrap_or(0) == runs {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (handle, stop) in workers {
        stop.cancel();
        handle.await.expect("worker");
    }
    assert_eq!(
        env.store.queue_counts().await.expect("counts"),
        QueueCounts::default(),
        "nothing stuck or dead"
    );
    for (i, id) in ids.iter().enumerate() {
        for step in 0..2 {
            assert_eq!(env.store.result_count(*id, step).await.expect("count"), 1);
        }
        let detail = env.store.get_run(*id).await.expect("get").expect("run");
        assert_eq!(detail.run.output, Some(json!(i.to_string().len())));
        let started = env
            .event_types(*id)
            .await
            .iter()
            .filter(|e| *e == "step.started")
            .count();
        assert_eq!(started, 2, "each step claimed once while leases were valid");
    }
}

/// Without a single leader, every worker pod would rescue and recount the
/// queue (the GROUP BY every scrape used to run). One holder of several leads;
/// leadership passes on when the leader gives it up, and also when it simply
/// stops renewing (a hung process kept a session advisory lock forever). The
/// snapshot the leader writes is what scrapes read.
async fn queue_maintenance_has_one_leader_and_keeps_the_gauge_snapshot(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let ttl = Duration::from_millis(400);
    let store = &env.store;
    assert!(
        store.lead_maintenance("a", ttl).await.expect("lead"),
        "an uncontended holder leads"
    );
    assert!(
        !store.lead_maintenance("b", ttl).await.expect("lead"),
        "one leader per database"
    );
    assert!(
        store.lead_maintenance("a", ttl).await.expect("lead"),
        "the leader renews"
    );
    store.resign_maintenance("a").await.expect("resign");
    assert!(
        store.lead_maintenance("b", ttl).await.expect("lead"),
        "passed on when given up"
    );
    // "b" stops renewing (hung): "a" takes over once the lease has expired.
    assert!(!store.lead_maintenance("a", ttl).await.expect("lead"));
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(
        store.lead_maintenance("a", ttl).await.expect("lead"),
        "taken over after expiry"
    );
    assert!(
        !store.lead_maintenance("b", ttl).await.expect("lead"),
        "the former leader does not come back"
    );

    enqueue(
        &env,
        json!({}),
        json!([{"kind": "template", "template": "a"}, {"kind": "template", "template": "b"}]),
    )
    .await;
    let (before, _) = env.store.queue_stats().await.expect("stats");
    assert!(
        before.iter().all(|s| s.jobs == 0),
        "no snapshot yet: {before:?}"
    );
    env.store.refresh_queue_stats().await.expect("refresh");
    let (after, stale) = env.store.queue_stats().await.expect("stats");
    let jobs = |state: &str| after.iter().find(|s| s.state == state).map(|s| s.jobs);
    assert_eq!(
        (
            jobs("queued"),
            jobs("waiting"),
            jobs("running"),
            jobs("dead")
        ),
        (Some(1), Some(1), Some(0), Some(0))
    );
    assert!(stale.is_some_and(|ms| ms < 5_000), "{stale:?}");
}

/// Without renewals during the drain, a grace period longer than the lease
/// let the step's lease run out while it finished: it was rescued and run
/// again by another delivery, and its own result was refused as stale.
async fn leases_are_renewed_while_steps_drain_at_shutdown(backend: Backend) {
    let env = TestEnv::new(
        backend,
        &[
            ("VM_JOB_LEASE_MS", "600"),
            ("VM_SHUTDOWN_GRACE_MS", "10000"),
        ],
    )
    .await;
    let id = enqueue(&env, json!({}), json!([{"kind": "delay", "ms": 2500}])).await;
    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    wait_for_event(&env, id, "step.started").await;
    stop.cancel();
    let report = worker.await.expect("worker");
    assert_eq!(
        report,
        DrainReport {
            drained: 1,
            released: 0
        }
    );
    let detail = env.store.get_run(id).await.expect("get").expect("run");
    assert_eq!(
        detail.run.status,
        RunStatus::Succeeded,
        "{:?}",
        detail.steps
    );
    assert_eq!(detail.steps[0].attempts, 1);
    let events = env.event_types(id).await;
    assert!(
        !events.contains(&"step.lease_expired".to_string()),
        "{events:?}"
    );
}

/// Concurrent creations share group-commit batches (on PostgreSQL without
/// plans, one statement per batch): every run gets exactly its jobs (first
/// `queued`, the rest `waiting`), one `run.queued` event with its step count,
/// one `run.created` audit row with actor and request id, one `runs` usage
/// ledger row and its count in the counters; a key repeated in the batch
/// stores one run and counts it once.
async fn concurrent_creations_store_each_run_with_its_rows_once(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let steps =
        json!([{"kind": "template", "template": "a"}, {"kind": "transform", "op": "uppercase"}]);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..48 {
        let store = env.store.clone();
        // Every fourth request repeats one idempotency key.
        let key = (i % 4 == 0).then(|| "shared-key".to_string());
        let mut new = new_run(
            json!({"i": if key.is_some() { 0 } else { i }}),
            steps.clone(),
            None,
        );
        new.idempotency_key = key;
        new.request_id = Some(format!("req-{i}"));
        new.actor = format!("actor-{i}");
        tasks.spawn(async move { (i, store.create_run(&new).await.expect("create")) });
    }
    let mut created = Vec::new();
    let mut shared = std::collections::BTreeSet::new();
    // The request that stored the shared key's run (the others replay it).
    let mut shared_creator = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, outcome) = joined.expect("task");
        let (run, stored) = match outcome {
            CreateOutcome::Created(run) => (run, true),
            CreateOutcome::Existing(detail) => (detail.run, false),
            other => panic!("request {i}: {other:?}"),
        };
        if i % 4 != 0 {
            assert!(stored, "request {i} has its own key-less run");
            created.push((i, run.id));
            continue;
        }
        shared.insert(run.id);
        if stored {
            shared_creator.push((i, run.id));
        }
    }
    assert_eq!(shared.len(), 1, "one run for the repeated key: {shared:?}");
    assert_eq!(shared_creator.len(), 1, "stored once: {shared_creator:?}");
    created.extend(shared_creator);
    assert_eq!(created.len(), 37);
    let audit = env
        .store
        .list_audit(&vm_webapp::store::security::AuditFilter {
            action: Some("run.created".into()),
            actor: None,
            outcome: None,
            before: None,
            limit: 1000,
        })
        .await
        .expect("audit");
    assert_eq!(audit.len(), 37, "one audit row per stored run");
    for (i, id) in &created {
        let detail = env.store.get_run(*id).await.expect("get").expect("run");
        assert_eq!(detail.run.status, RunStatus::Queued);
        let states: Vec<StepStatus> = detail.steps.iter().map(|s| s.status).collect();
        assert_eq!(states, [StepStatus::Queued, StepStatus::Pending], "run {i}");
        let events = env.store.list_events(*id, 0, 10).await.expect("events");
        assert_eq!(events.len(), 1, "run {i}: {events:?}");
        assert_eq!(events[0].event_type, "run.queued");
        assert_eq!(events[0].data, Some(json!({"steps": 2})));
        let row = audit
            .iter()
            .find(|a| a.target.as_deref() == Some(id.to_string().as_str()))
            .unwrap_or_else(|| panic!("run {i}: no audit row"));
        assert_eq!(row.actor, format!("actor-{i}"));
        assert_eq!(row.request_id.as_deref(), Some(format!("req-{i}").as_str()));
        assert_eq!(row.tenant.as_deref(), Some("anonymous"));
    }
    let period = vm_webapp::period::Period::of_ms(detail_created_at(&env, created[0].1).await);
    let counts = env
        .store
        .usage_counts("anonymous", &period.to_string())
        .await
        .expect("counts");
    assert_eq!(counts.get(&vm_webapp::plans::Meter::Runs), Some(&37));
    assert!(
        env.store
            .verify_usage(period)
            .await
            .expect("verify")
            .is_empty(),
        "the ledger, the counters and the runs agree"
    );
}

async fn detail_created_at(env: &TestEnv, id: Uuid) -> i64 {
    env.store
        .get_run(id)
        .await
        .expect("get")
        .expect("run")
        .run
        .created_at
}

/// `poll_interval` is the idle poll: a run created without a wake-up is
/// claimed at the worker's next poll, not at its lease-renewal tick (every
/// second at most), which used to claim too and so made any poll interval
/// above a second behave as one second.
async fn the_idle_poll_interval_is_kept_above_a_second(backend: Backend) {
    let env = TestEnv::new(backend, &[]).await;
    let (handle, stop) = env.spawn_worker_with(4, LlmBackend::Offline, |c| {
        c.poll_interval = Duration::from_millis(3_000);
        c.lease = Duration::from_millis(600);
    });
    // The worker's first pass claims nothing; the next poll is 3 s later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = enqueue(
        &env,
        json!({}),
        json!([{"kind": "template", "template": "x"}]),
    )
    .await;
    let run = env.wait_for(id, RunStatus::Succeeded, LONG).await;
    let waited = run.run.started_at.expect("started") - run.run.created_at;
    assert!(
        waited >= 2_000,
        "started {waited} ms after creation: something other than the 3 s poll claimed it"
    );
    stop.cancel();
    handle.await.expect("worker");
}

on_both_backends!(
    the_idle_poll_interval_is_kept_above_a_second,
    concurrent_creations_store_each_run_with_its_rows_once,
    leases_are_renewed_while_steps_drain_at_shutdown,
    queue_maintenance_has_one_leader_and_keeps_the_gauge_snapshot,
    run_executes_steps_in_order_and_records_every_transition,
    transient_llm_failure_is_retried_with_backoff_then_succeeds,
    rejected_credentials_fail_the_run_without_retry,
    llm_timeouts_are_retried_then_dead_lettered_after_max_attempts,
    an_unreachable_llm_fails_its_runs_cleanly_while_other_runs_proceed,
    bad_reference_in_output_fails_the_run_permanently,
    killed_worker_job_is_redelivered_after_lease,
    stale_claim_cannot_finish_a_newer_delivery,
    lease_expiring_on_the_last_attempt_dead_letters_the_job,
    an_unreadable_step_is_set_aside_and_does_not_block_the_queue,
    cancels_racing_completions_always_settle_cleanly,
    cancelling_a_run_stops_its_running_step_within_a_second,
    shutdown_lets_in_flight_jobs_finish_within_the_grace_period,
    shutdown_releases_jobs_that_outlive_the_grace_period,
    idempotency_key_returns_the_original_run_or_a_conflict,
    migrations_are_idempotent,
    several_workers_drain_hundreds_of_jobs_exactly_once,
);

/// On PostgreSQL a run's two updates (claimed, finished) change no indexed
/// column, so they are heap-only tuples (HOT) on the row's page: no new entry
/// in any index of `runs`. An index on `status` (or on any column the claim
/// or the completion sets) makes every one of them a full update with an
/// entry per index, the cost migration 12 removed from the drain. The
/// statistics count HOT updates; backends report them within about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_run_updates_stay_on_their_page() {
    use sqlx::Row;
    let env = TestEnv::new(Backend::Postgres, &[]).await;
    let db = env.raw_pool().await;
    let runs = 60;
    for i in 0..runs {
        enqueue(
            &env,
            json!({"i": i}),
            json!([{"kind": "template", "template": "{{input.i}}"}]),
        )
        .await;
    }
    let (handle, stop) = env.spawn_worker(8, LlmBackend::Offline);
    let deadline = tokio::time::Instant::now() + LONG;
    let (updates, hot) = loop {
        let row = sqlx::query(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'runs'",
        )
        .fetch_one(&db)
        .await
        .expect("table statistics");
        let (updates, hot): (i64, i64) = (row.get("n_tup_upd"), row.get("n_tup_hot_upd"));
        if updates >= 2 * runs || tokio::time::Instant::now() > deadline {
            break (updates, hot);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.cancel();
    handle.await.expect("worker");
    assert!(updates >= 2 * runs, "{updates} run updates reported");
    assert!(
        hot * 10 >= updates * 9,
        "{hot} of {updates} run updates were heap-only"
    );
}

/// Completing a batch finds its jobs by primary key. Written with the
/// constant `state = 'running'`, the completion let PostgreSQL read the
/// partial index of running jobs instead, whole: an entry for every claim
/// since the last vacuum, dead ones included (bitmap scans never mark
/// them), so each batch cost more the more jobs had run (7 ms for one job,
/// ten seconds into the steady-state bench). Here autovacuum is off for
/// `jobs`, 300 runs leave their dead entries behind, and 30 more must be
/// completed without reading them. (The leases are long so that the rescue,
/// which reads the entries whose lease has run out, reads none.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_completions_do_not_read_the_dead_entries_of_finished_jobs() {
    use sqlx::Row;
    let env = TestEnv::new(Backend::Postgres, &[("VM_JOB_LEASE_MS", "600000")]).await;
    let db = env.raw_pool().await;
    sqlx::query("ALTER TABLE jobs SET (autovacuum_enabled = false)")
        .execute(&db)
        .await
        .expect("autovacuum off");
    // Index entries read from `jobs_leased`, once `deleted` jobs are counted
    // (backends report their statistics up to seconds after a commit, all
    // counters of a transaction at once).
    let leased_reads_after = |deleted: i64| {
        let db = db.clone();
        async move {
            let deadline = tokio::time::Instant::now() + LONG;
            loop {
                let row = sqlx::query(
                    "SELECT (SELECT n_tup_del FROM pg_stat_user_tables WHERE relname = 'jobs') AS del, \
                       (SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = 'jobs_leased') AS reads",
                )
                .fetch_one(&db)
                .await
                .expect("statistics");
                let (del, reads): (i64, i64) = (row.get("del"), row.get("reads"));
                if del >= deleted {
                    return reads;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{del} of {deleted} job deletions reported"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let drain = |runs: usize| {
        let env = &env;
        async move {
            for i in 0..runs {
                enqueue(
                    env,
                    json!({"i": i}),
                    json!([{"kind": "template", "template": "{{input.i}}"}]),
                )
                .await;
            }
            let (handle, stop) = env.spawn_worker(16, LlmBackend::Offline);
            let deadline = tokio::time::Instant::now() + LONG;
            while env.store.has_unfinished_jobs().await.expect("queue") {
                assert!(tokio::time::Instant::now() < deadline, "jobs left");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stop.cancel();
            handle.await.expect("worker");
        }
    };
    drain(300).await;
    let before = leased_reads_after(300).await;
    drain(30).await;
    let read = leased_reads_after(330).await - before;
    assert!(
        read < 300,
        "completing 30 jobs read {read} entries of the running jobs' index"
    );
}

/// A completion and a lease renewal can hold rows of the same jobs (a step
/// finishing as its worker's tick renews it). Each locks its rows in the
/// order of its input, so both must send their jobs in id order: in
/// different orders they deadlock, and PostgreSQL stalls one of them for a
/// second (`deadlock_timeout`) before it aborts the other, as the drain
/// bench showed once the renewal sent its jobs in hash-map order. Here the
/// lower job is locked elsewhere and each statement is given the two jobs
/// in reverse order: while it waits for the lower one it must not hold the
/// higher one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_completions_and_lease_renewals_lock_jobs_in_id_order() {
    use vm_webapp::store::Completion;
    let env = TestEnv::new(Backend::Postgres, &[]).await;
    let db = env.raw_pool().await;
    for i in 0..2 {
        enqueue(
            &env,
            json!({"i": i}),
            json!([{"kind": "template", "template": "x"}]),
        )
        .await;
    }
    let lease = Duration::from_secs(60);
    let mut jobs = env.store.claim("w", 2, lease).await.expect("claim");
    assert_eq!(jobs.len(), 2);
    jobs.sort_by_key(|j| j.id);
    let (low, high) = (jobs[0].clone(), jobs[1].clone());
    let renewal = {
        let (store, l, h) = (env.store.clone(), low.clone(), high.clone());
        move || {
            tokio::spawn(async move {
                store
                    .extend_leases("w", &[(h.id, h.attempt), (l.id, l.attempt)], lease)
                    .await
                    .map(|_| ())
            })
        }
    };
    lower_first(&db, low.id, high.id, "lease renewal", renewal).await;
    let completion = {
        let (store, l, h) = (env.store.clone(), low.clone(), high.clone());
        move || {
            tokio::spawn(async move {
                let done = [h, l].map(|job| Completion {
                    job,
                    output: json!("x"),
                });
                store.complete_batch(&done).await.map(|_| ())
            })
        }
    };
    lower_first(&db, low.id, high.id, "completion", completion).await;
}

/// Starts `statement` while job `low` is locked by another transaction and
/// requires it not to hold job `high` while it waits; then lets it finish.
async fn lower_first(
    db: &sqlx::AnyPool,
    low: i64,
    high: i64,
    name: &str,
    statement: impl FnOnce() -> tokio::task::JoinHandle<Result<(), vm_webapp::store::StoreError>>,
) {
    let mut blocker = db.begin().await.expect("begin");
    sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(low)
        .fetch_one(&mut *blocker)
        .await
        .expect("lock the lower job");
    let task = statement();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut probe = db.begin().await.expect("begin");
    let high_free = sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE NOWAIT")
        .bind(high)
        .fetch_optional(&mut *probe)
        .await
        .is_ok();
    probe.rollback().await.expect("rollback");
    assert!(
        high_free,
        "the {name} locked the higher job while it waited for the lower one"
    );
    blocker.rollback().await.expect("release");
    task.await.expect("task").expect(name);
}

/// The rescue reads the index of running jobs by their lease, where every
/// job finished since the last vacuum left a dead entry whose lease has run
/// out. As a bitmap scan (the planner's choice once such entries pile up)
/// it read all of them twice a second (two reads a pass) until autovacuum
/// came, at most once a minute; a plain index scan marks them dead as it
/// passes, so each is read once. Here 20,000 finished jobs (written
/// directly, as many claims and completions would leave them; autovacuum
/// off) must be marked by one pass, read with `pageinspect`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rescue_marks_the_dead_entries_it_passes() {
    use sqlx::Row;
    let env = TestEnv::new(Backend::Postgres, &[]).await;
    let db = env.raw_pool().await;
    let finished = 20_000;
    for sql in [
        "ALTER TABLE jobs SET (autovacuum_enabled = false)".to_string(),
        "CREATE EXTENSION IF NOT EXISTS pageinspect".to_string(),
        // Claimed (running, a lease long gone), then finished (deleted); and
        // 200 jobs still running under a lease that has not run out.
        format!(
            "INSERT INTO jobs (run_id, correlation_id, step_index, step_count, payload, state, \
               attempt, max_attempts, run_at, lease_expires_at, locked_by, created_at) \
             SELECT 'r' || g, 'c', 0, 1, '{{}}', 'running', 1, 3, 0, \
               CASE WHEN g <= {finished} THEN g ELSE 9000000000000 + g END, 'w', 0 \
             FROM generate_series(1, {finished} + 200) AS g"
        ),
        format!("DELETE FROM jobs WHERE lease_expires_at <= {finished}"),
    ] {
        sqlx::query(&sql).execute(&db).await.expect(&sql);
    }
    assert_eq!(env.store.rescue_expired().await.expect("rescue"), 0);
    let dead: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM generate_series(1, \
           (pg_relation_size('jobs_leased') / 8192)::int - 1) AS b, \
           LATERAL bt_page_items('jobs_leased', b) AS i WHERE i.dead",
    )
    .fetch_one(&db)
    .await
    .expect("index items")
    .get("n");
    assert!(
        dead >= finished * 9 / 10,
        "{dead} of {finished} entries of finished jobs marked dead by the rescue"
    );
}

/// Migration 12 drops an index of `runs` while the API serves. A plain
/// `DROP INDEX` waits for an exclusive lock behind any open transaction that
/// read `runs` (a backup, a report), and every later query on `runs` queues
/// behind that wait: the API stalled for as long as the reader ran. Dropped
/// concurrently, only the migration waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migration_12_waits_for_readers_without_blocking_the_api() {
    use sqlx::Row;
    let env = TestEnv::new(Backend::Postgres, &[]).await;
    enqueue(
        &env,
        json!({}),
        json!([{"kind": "template", "template": "x"}]),
    )
    .await;
    let db = env.raw_pool().await;
    // The schema as version 11 left it.
    for sql in [
        "CREATE INDEX runs_status_id ON runs (status, id)",
        "DELETE FROM _sqlx_migrations WHERE version = 12",
    ] {
        sqlx::query(sql).execute(&db).await.expect(sql);
    }
    // A long reader of `runs`, still open.
    let mut reader = db.begin().await.expect("begin");
    sqlx::query("SELECT COUNT(*) FROM runs")
        .fetch_one(&mut *reader)
        .await
        .expect("read runs");

    let store = env.store.clone();
    let migrating = tokio::spawn(async move { store.migrate().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!migrating.is_finished(), "the drop waits for the reader");
    let run_read = tokio::time::timeout(
        Duration::from_secs(3),
        sqlx::query("SELECT COUNT(*) AS n FROM runs").fetch_one(&db),
    )
    .await
    .expect("a read of runs queued behind the waiting migration")
    .expect("count");
    assert_eq!(run_read.get::<i64, _>("n"), 1);

    reader.commit().await.expect("end the reader");
    let applied = tokio::time::timeout(LONG, migrating)
        .await
        .expect("migration finished")
        .expect("task")
        .expect("migrate");
    assert_eq!(applied, vec![12]);
    let left =
        sqlx::query("SELECT COUNT(*) AS n FROM pg_indexes WHERE indexname = 'runs_status_id'")
            .fetch_one(&db)
            .await
            .expect("indexes");
    assert_eq!(left.get::<i64, _>("n"), 0, "the index is gone");
}

/// Records the statements sqlx sends on the thread it follows (its
/// `sqlx::query` events), by their summary: the first words of each. It is
/// the process's global subscriber, set once: a scoped one (`set_default`)
/// missed events while other tests' threads ran queries with none.
#[derive(Default)]
struct Statements {
    thread: std::sync::Mutex<Option<std::thread::ThreadId>>,
    seen: std::sync::Mutex<Vec<String>>,
}

impl Statements {
    /// The global recorder, installed on first use.
    fn global() -> &'static Statements {
        static GLOBAL: std::sync::OnceLock<&'static Statements> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| {
            use tracing_subscriber::layer::SubscriberExt;
            let recorder: &'static Statements = Box::leak(Box::default());
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(recorder))
                .expect("no other global subscriber in this test binary");
            recorder
        })
    }

    /// Follows the current thread from now on and forgets what was seen.
    fn follow_this_thread(&self) {
        *self.thread.lock().expect("thread") = Some(std::thread::current().id());
        self.take();
    }

    /// The statements seen since the last call.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().expect("statements"))
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for &'static Statements {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Summary(Option<String>);
        impl tracing::field::Visit for Summary {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "summary" {
                    self.0 = Some(value.to_string());
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "summary" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        if event.metadata().target() != "sqlx::query"
            || *self.thread.lock().expect("thread") != Some(std::thread::current().id())
        {
            return;
        }
        let mut summary = Summary(None);
        event.record(&mut summary);
        self.seen
            .lock()
            .expect("statements")
            .push(summary.0.unwrap_or_default());
    }
}

/// A claim and a lease renewal are one statement each, one round trip, as
/// the worker loop's latency needs: they commit without waiting for their
/// WAL flush through `set_config` in the statement itself. Written as
/// `BEGIN`, `SET LOCAL synchronous_commit = off`, the statement and `COMMIT`,
/// each cost four round trips, and claims held their rows locked across
/// three of them (the steady-state bench gained about 7% without them).
#[tokio::test(flavor = "current_thread")]
async fn postgres_claims_and_lease_renewals_are_one_round_trip_each() {
    let env = TestEnv::new(Backend::Postgres, &[]).await;
    for i in 0..3 {
        enqueue(
            &env,
            json!({"i": i}),
            json!([{"kind": "template", "template": "x"}]),
        )
        .await;
    }
    let seen = Statements::global();
    seen.follow_this_thread();
    let lease = Duration::from_secs(30);
    let jobs = env.store.claim("w", 10, lease).await.expect("claim");
    let claimed = seen.take();
    let held: Vec<(i64, i64)> = jobs.iter().map(|j| (j.id, j.attempt)).collect();
    let kept = env
        .store
        .extend_leases("w", &held, lease)
        .await
        .expect("renew");
    let renewed = seen.take();
    assert_eq!(jobs.len(), 3);
    assert_eq!(kept.len(), 3);
    // Anything else on this thread meanwhile (a new pooled connection's own
    // queries) is not the claim's: the claim is its one statement, with no
    // transaction control or setting around it.
    for (what, sent, head) in [
        ("a claim", &claimed, "WITH claimable"),
        ("a lease renewal", &renewed, "WITH held"),
    ] {
        let own = sent.iter().filter(|s| s.starts_with(head)).count();
        let around = sent.iter().filter(|s| {
            let s = s.to_ascii_uppercase();
            ["BEGIN", "SET", "COMMIT"].iter().any(|c| s.starts_with(c))
        });
        assert_eq!(own, 1, "{what} sent {sent:?}");
        assert_eq!(around.count(), 0, "{what} sent {sent:?}");
    }
}
