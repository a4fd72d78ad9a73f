//! Dependency outages with real servers: PostgreSQL stopped and restarted
//! under load, Redis killed and restarted. The app must degrade (not ready,
//! 503 with `dependency_unavailable`, polling instead of wake-ups), lose
//! nothing, and recover by itself.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use support::pg::PgServer;
use support::redis::RedisServer;
use support::{TestEnv, create, send};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vm_webapp::model::RunStatus;
use vm_webapp::redis_bus::RedisBus;
use vm_webapp::steps::StepRunner;
use vm_webapp::steps::llm::LlmBackend;
use vm_webapp::worker::{Worker, WorkerConfig};

const RUN: &str = r#"{"steps":[{"kind":"delay","ms":200},{"kind":"template","template":"done"}]}"#;

async fn started_within(env: &TestEnv, id: Uuid, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if env
            .store
            .get_run(id)
            .await
            .ok()
            .flatten()
            .is_some_and(|d| d.run.status != RunStatus::Queued)
        {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A PostgreSQL server of the test's own (the test stops it) and an
/// environment on a fresh database of it, with `vars` set.
async fn own_server(vars: &[(&str, &str)]) -> (PgServer, TestEnv) {
    let server = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start postgres");
    let url = server.create_database().await;
    let env = TestEnv::at(Some(url), vars).await;
    (server, env)
}

/// Starts a stopped server again, off the async runtime (it waits for the
/// postmaster to accept connections).
async fn restart(server: PgServer) -> PgServer {
    tokio::task::spawn_blocking(move || {
        server.launch();
        server
    })
    .await
    .expect("restart postgres")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_degrades_to_not_ready_and_recovers_without_restart() {
    let (server, env) = own_server(&[("VM_JOB_LEASE_MS", "2000")]).await;
    let app = env.router();
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let mut accepted = Vec::new();
    for _ in 0..3 {
        accepted.push(create(&app, RUN).await);
    }

    // Immediate shutdown: clients see their connections die mid-flight.
    server.stop();

    let live = send(&app, "GET", "/api/v2/health/live", None, &[]).await;
    assert_eq!(
        live.status,
        StatusCode::OK,
        "liveness never checks dependencies"
    );
    let t0 = Instant::now();
    let ready = send(&app, "GET", "/api/v2/health/ready", None, &[]).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "readiness must answer within its budget"
    );
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.body
    );
    assert_eq!(ready.body["dependencies"]["database"]["status"], "error");
    let refused = send(&app, "POST", "/api/v2/runs", Some(RUN), &[]).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    assert_eq!(refused.body["code"], "dependency_unavailable");
    assert!(
        !refused.body.to_string().contains("postgres://"),
        "no connection string in errors"
    );
    // Concurrent creations share a batch: when the database cannot be
    // reached, all of them are answered after about one wait for it, not
    // one more wait each (retried one by one, eight took over 40 s).
    let t0 = Instant::now();
    let refusals = futures::future::join_all(
        (0..8).map(|_| send(&app, "POST", "/api/v2/runs", Some(RUN), &[])),
    )
    .await;
    let waited = t0.elapsed();
    for r in &refusals {
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
        assert_eq!(r.body["code"], "dependency_unavailable");
    }
    assert!(
        waited < Duration::from_secs(16),
        "eight creations took {waited:?}"
    );

    let server = restart(server).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = send(&app, "GET", "/api/v2/health/ready", None, &[]).await;
        if ready.status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readiness did not recover: {}",
            ready.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    accepted.push(create(&app, RUN).await);
    for id in &accepted {
        env.wait_for(*id, RunStatus::Succeeded, Duration::from_secs(30))
            .await;
        assert_eq!(env.store.result_count(*id, 0).await.expect("count"), 1);
    }
    stop.cancel();
    worker.await.expect("worker");
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wakeups_cut_latency_and_polling_covers_a_redis_outage() {
    let redis = RedisServer::start();
    let env = TestEnv::at(None, &[]).await;
    let mut state = env.state();
    let url = vm_webapp::config::Secret::new(redis.url());
    state.redis = Some(RedisBus::new(&url, state.metrics.clone()).expect("bus"));
    let app = vm_webapp::http::router(state.clone());

    // A worker that polls rarely, fed only by Redis wake-ups.
    let wake = Arc::new(tokio::sync::Notify::new());
    let shutdown = CancellationToken::new();
    let poll = Duration::from_secs(6);
    let config = WorkerConfig {
        id: "redis-test".into(),
        concurrency: 2,
        poll_interval: poll,
        lease: Duration::from_secs(5),
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(1),
    };
    let worker = Worker::new(
        env.store.clone(),
        StepRunner::new(LlmBackend::Offline),
        config,
        wake.clone(),
    );
    let worker = tokio::spawn(worker.run(shutdown.clone()));
    let bus = state.redis.clone().expect("bus");
    tokio::spawn(bus.clone().forward_wakeups(wake.clone(), shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // With Redis: claimed well before the poll interval.
    let id = create(&app, RUN).await;
    let latency = started_within(&env, id, poll).await.expect("started");
    assert!(
        latency < Duration::from_secs(2),
        "wake-up latency {latency:?}"
    );
    let ready = send(&app, "GET", "/api/v2/health/ready", None, &[]).await;
    assert_eq!(
        ready.body["dependencies"]["redis"]["status"], "ok",
        "{}",
        ready.body
    );

    // Redis down: still ready, redis reported, jobs found by polling.
    redis.stop();
    let ready = send(&app, "GET", "/api/v2/health/ready", None, &[]).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    assert_eq!(ready.body["dependencies"]["redis"]["status"], "error");
    let during = create(&app, RUN).await;
    env.wait_for(
        during,
        RunStatus::Succeeded,
        poll * 2 + Duration::from_secs(3),
    )
    .await;
    let metrics = support::get_text(&app, "/metrics").await;
    assert!(
        metrics.contains(r#"vm_dependency_failures_total{dependency="redis"}"#),
        "{metrics}"
    );

    // Redis back: wake-ups resume by themselves.
    redis.launch();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let id = create(&app, RUN).await;
        if started_within(&env, id, Duration::from_secs(1))
            .await
            .is_some()
        {
            break;
        }
        env.wait_for(id, RunStatus::Succeeded, poll * 2).await;
        assert!(
            Instant::now() < deadline,
            "wake-ups did not resume after Redis came back"
        );
    }
    shutdown.cancel();
    worker.await.expect("worker");
}

/// A worker's finished steps during an outage: the batch completer gives the
/// whole batch up after one retry cycle (the jobs' leases then run out and
/// they are delivered again), instead of retrying each result alone while
/// the results behind them wait; once the database is back it records at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_completer_gives_up_a_batch_at_once_during_an_outage_and_recovers() {
    use vm_webapp::store::Finish;
    use vm_webapp::worker::completer::Completer;

    let (server, env) = own_server(&[]).await;
    let app = env.router();
    const ONE_STEP: &str = r#"{"steps":[{"kind":"template","template":"done"}]}"#;
    for _ in 0..8 {
        create(&app, ONE_STEP).await;
    }
    let jobs = env
        .store
        .claim("outage", 8, Duration::from_secs(600))
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 8);
    // A claim commits without waiting for its WAL flush; a run created after
    // it commits with one, so the claims survive the immediate stop below.
    create(&app, ONE_STEP).await;
    let completer = Completer::start(env.store.clone());

    server.stop();
    let t0 = Instant::now();
    let answers = futures::future::join_all(
        jobs.iter()
            .map(|job| completer.complete(job.clone(), serde_json::json!("done"))),
    )
    .await;
    let waited = t0.elapsed();
    assert!(answers.iter().all(Option::is_none), "{answers:?}");
    // A batch gives up after the completer's 10 s budget, and two flushers
    // share the eight; retried one by one, the last result waited out a
    // budget per result before it (over a minute).
    assert!(
        waited < Duration::from_secs(25),
        "eight results took {waited:?}"
    );

    let server = restart(server).await;
    // Nothing was recorded, so each claim is still valid and its result is
    // recorded once the database answers again.
    let deadline = Instant::now() + Duration::from_secs(30);
    for job in &jobs {
        loop {
            match completer
                .complete(job.clone(), serde_json::json!("done"))
                .await
            {
                Some(finish) => {
                    assert_eq!(finish, Finish::Recorded);
                    break;
                }
                None => assert!(Instant::now() < deadline, "not recorded after the outage"),
            }
        }
        assert_eq!(
            env.store.result_count(job.run_id, 0).await.expect("count"),
            1
        );
    }
    completer.close().await;
    server.stop();
}

/// A worker stopped while the database is down: its in-flight jobs cannot be
/// released, and after the first release finds the database unreachable the
/// rest are not tried (their leases run out instead). One by one, each
/// waited out the pool's acquire timeout, and so did each statement of a
/// maintenance tick: eight jobs held shutdown for 60 s, now about 10 s,
/// and a worker's thousands of slow steps for hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_during_an_outage_does_not_release_its_jobs_one_by_one() {
    let (server, env) = own_server(&[]).await;
    let app = env.router();
    const SLOW: &str = r#"{"steps":[{"kind":"delay","ms":60000}]}"#;
    for _ in 0..8 {
        create(&app, SLOW).await;
    }
    let (worker, stop) = env.spawn_worker_with(8, LlmBackend::Offline, |c| {
        c.shutdown_grace = Duration::from_millis(100);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.store.queue_counts().await.expect("counts").running < 8 {
        assert!(
            Instant::now() < deadline,
            "the worker did not claim the jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    server.stop();
    let t0 = Instant::now();
    stop.cancel();
    let report = worker.await.expect("worker");
    let took = t0.elapsed();
    assert_eq!(report.released, 0, "{report:?}");
    // One release timeout, then the heartbeat's removal and the maintenance
    // lease's resignation, each failing after the pool's 5 s.
    assert!(took < Duration::from_secs(25), "shutdown took {took:?}");
}
