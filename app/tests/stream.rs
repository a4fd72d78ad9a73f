//! Live updates (Server-Sent Events) through the real router, on SQLite and
//! PostgreSQL: history then live events, resuming with `Last-Event-ID`, two
//! API replicas on one database (with and without Redis), the late-commit
//! gap, subscribers that fall behind (a burst, a slow reader, one that stops
//! reading) and continue from the database on the same stream, heartbeats,
//! approval events delivered at once, the limits and the error answers; and
//! the console's page and assets with their CSP.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use sqlx::Connection;
use support::{Backend, TestEnv, create, get_text, send};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;
use vm_webapp::http::{AppState, router};
use vm_webapp::model::RunStatus;
use vm_webapp::redis_bus::RedisBus;
use vm_webapp::steps::llm::LlmBackend;

const HELLO: &str = r#"{"input":{"name":"Ada"},"steps":[{"kind":"template","template":"Hello, {{input.name}}!"},{"kind":"transform","op":"uppercase"}]}"#;
const ONE_STEP: &str = r#"{"steps":[{"kind":"template","template":"x"}]}"#;
const KEYS: &str = "ci:ci-key-0123456789abcdef";

/// One SSE frame.
#[derive(Debug)]
enum Frame {
    Event { id: i64, data: Value },
    Comment(String),
}

/// Reads SSE frames from a response body as they arrive.
struct SseReader {
    body: Body,
    buf: String,
}

impl SseReader {
    fn new(body: Body) -> Self {
        Self {
            body,
            buf: String::new(),
        }
    }

    /// The next frame; `None` when the stream ended; panics after `wait`.
    async fn frame(&mut self, wait: Duration) -> Option<Frame> {
        tokio::time::timeout(wait, self.frame_inner())
            .await
            .unwrap_or_else(|_| panic!("no SSE frame within {wait:?}"))
    }

    /// Like [`SseReader::frame`], but `Err` on a timeout.
    async fn try_frame(&mut self, wait: Duration) -> Result<Option<Frame>, ()> {
        tokio::time::timeout(wait, self.frame_inner())
            .await
            .map_err(|_| ())
    }

    async fn frame_inner(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let mut id = None;
                let mut data = String::new();
                let mut comment = None;
                for line in raw.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        comment = Some(c.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse::<i64>().expect("numeric id"));
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                return Some(match (id, comment) {
                    (Some(id), _) => Frame::Event {
                        id,
                        data: serde_json::from_str(&data).expect("JSON data"),
                    },
                    (None, Some(c)) => Frame::Comment(c),
                    (None, None) => panic!("a frame without id or comment: {raw:?}"),
                });
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(bytes) = frame.into_data() {
                        self.buf
                            .push_str(std::str::from_utf8(&bytes).expect("utf-8"));
                    }
                }
                Some(Err(e)) => panic!("stream error: {e}"),
                None => return None,
            }
        }
    }

    /// The next event (heartbeats skipped); `None` when the stream ended.
    async fn event(&mut self, wait: Duration) -> Option<(i64, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.frame(left).await? {
                Frame::Event { id, data } => return Some((id, data)),
                Frame::Comment(_) => continue,
            }
        }
    }

    /// Whether an event arrives within `wait` (heartbeats skipped).
    async fn event_within(&mut self, wait: Duration) -> Option<(i64, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_frame(left).await {
                Err(()) | Ok(None) => return None,
                Ok(Some(Frame::Event { id, data })) => return Some((id, data)),
                Ok(Some(Frame::Comment(_))) => continue,
            }
        }
    }
}

/// Opens a stream; panics unless it is a 200 event stream.
async fn open(app: &Router, uri: &str, headers: &[(&str, &str)]) -> SseReader {
    let mut req = Request::builder().uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("router answers");
    assert_eq!(res.status(), StatusCode::OK, "GET {uri}");
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    SseReader::new(res.into_body())
}

/// Every event id in the database, ascending.
async fn all_event_ids(env: &TestEnv) -> Vec<i64> {
    env.store
        .feed_after(0, 100_000)
        .await
        .expect("feed")
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// Reads events until `want` ids were seen (asserting increasing, distinct ids).
async fn collect_until(reader: &mut SseReader, seen: &mut Vec<i64>, want: &BTreeSet<i64>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !want.iter().all(|id| seen.contains(id)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some((id, _)) = reader.event_within(left).await else {
            panic!("missing events: want {want:?}, got {seen:?}");
        };
        if let Some(last) = seen.last() {
            assert!(id > *last, "ids go up: {id} after {last} ({seen:?})");
        }
        seen.push(id);
    }
}

async fn a_run_stream_replays_the_history_then_follows_live(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_STREAM_POLL_MS", "50")]).await;
    let app = env.router();
    let id = create(&app, HELLO).await;
    let mut reader = open(&app, &format!("/api/v2/runs/{id}/events/stream"), &[]).await;
    let (first, data) = reader.event(Duration::from_secs(5)).await.expect("event");
    assert_eq!(data["type"], "run.queued");
    assert_eq!(data["run_id"], id.to_string());
    assert!(data["at"].is_string(), "{data}");
    // Another run's events interleave in the log, never on this stream.
    let other = create(&app, HELLO).await;
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let mut ids = vec![first];
    let mut types = vec!["run.queued".to_string()];
    while types.last().map(String::as_str) != Some("run.succeeded") {
        let (id, data) = reader.event(Duration::from_secs(20)).await.expect("event");
        ids.push(id);
        types.push(data["type"].as_str().expect("type").to_string());
    }
    env.wait_for(other, RunStatus::Succeeded, Duration::from_secs(20))
        .await;
    stop.cancel();
    worker.await.expect("worker");
    assert!(
        reader
            .event_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing of the other run"
    );
    // Exactly the run's stored events, in order.
    let stored = env.store.list_events(id, 0, 1000).await.expect("events");
    assert_eq!(ids, stored.iter().map(|e| e.id).collect::<Vec<_>>());
    assert_eq!(types, env.event_types(id).await);
}

/// Reads a stream to its end, skipping heartbeats: its events' ids and
/// types. Panics when it has not ended after `wait`.
async fn read_to_end(reader: &mut SseReader, wait: Duration) -> Vec<(i64, String)> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match reader.try_frame(left).await {
            Err(()) => panic!("the stream did not end within {wait:?}; it sent {events:?}"),
            Ok(None) => return events,
            Ok(Some(Frame::Comment(_))) => continue,
            Ok(Some(Frame::Event { id, data })) => {
                let kind = data["type"].as_str().expect("type").to_string();
                events.push((id, kind));
            }
        }
    }
}

/// A run's stream ends after the event that ends the run: for a subscriber
/// that follows the run live, for one that comes after the end (the
/// history, then the end), and for a cancelled run; resuming after the end
/// answers 204, which stops `EventSource` from reconnecting. Before, the
/// response stayed open for ever (heartbeats only): `curl -N` never
/// returned, and every finished run watched by a client held a place under
/// the stream limits. The all-runs stream stays open.
async fn a_run_stream_ends_after_the_event_that_ends_the_run(backend: Backend) {
    let env = TestEnv::new(
        backend,
        &[
            ("VM_STREAM_POLL_MS", "50"),
            // Heartbeats flowing: an open stream never goes quiet.
            ("VM_STREAM_HEARTBEAT_MS", "100"),
        ],
    )
    .await;
    let app = env.router();
    let mut all = open(&app, "/api/v2/events/stream", &[]).await;
    let id = create(&app, HELLO).await;
    let uri = format!("/api/v2/runs/{id}/events/stream");
    let mut live = open(&app, &uri, &[]).await;
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let followed = read_to_end(&mut live, Duration::from_secs(20)).await;
    let stored: Vec<(i64, String)> = env
        .store
        .list_events(id, 0, 1000)
        .await
        .expect("events")
        .into_iter()
        .map(|e| (e.id, e.event_type))
        .collect();
    assert_eq!(followed, stored, "every event of the run, then the end");
    assert_eq!(followed.last().map(|e| e.1.as_str()), Some("run.succeeded"));
    // After the end: the whole history, then the end.
    let mut late = open(&app, &uri, &[]).await;
    assert_eq!(read_to_end(&mut late, Duration::from_secs(5)).await, stored);
    // Resuming from the middle: the rest, then the end.
    let mid = stored[2].0.to_string();
    let mut resumed = open(&app, &uri, &[("last-event-id", &mid)]).await;
    assert_eq!(
        read_to_end(&mut resumed, Duration::from_secs(5)).await,
        stored[3..]
    );
    // Resuming at the end: nothing will follow, so no stream at all.
    let end = stored.last().expect("events").0.to_string();
    for (uri, header) in [
        (uri.clone(), Some(end.as_str())),
        (format!("{uri}?after={end}"), None),
    ] {
        let headers: Vec<(&str, &str)> = header.map(|h| ("last-event-id", h)).into_iter().collect();
        let reply = send(&app, "GET", &uri, None, &headers).await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "{uri} {header:?}");
    }
    stop.cancel();
    worker.await.expect("worker");
    // A cancelled run's stream ends too (no worker: it is cancelled queued).
    let doomed = create(&app, HELLO).await;
    let doomed_uri = format!("/api/v2/runs/{doomed}/events/stream");
    let mut watching = open(&app, &doomed_uri, &[]).await;
    let (_, data) = watching.event(Duration::from_secs(5)).await.expect("event");
    assert_eq!(data["type"], "run.queued");
    let reply = send(
        &app,
        "POST",
        &format!("/api/v2/runs/{doomed}/cancel"),
        None,
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let rest = read_to_end(&mut watching, Duration::from_secs(5)).await;
    assert_eq!(rest.last().map(|e| e.1.as_str()), Some("run.cancelled"));
    // Ended streams gave their places back; the all-runs stream is open and
    // still follows new runs.
    let metrics = get_text(&app, "/metrics").await;
    assert!(metrics.contains("vm_stream_subscribers 1"), "{metrics}");
    let next = create(&app, ONE_STEP).await;
    loop {
        let (_, data) = all
            .event(Duration::from_secs(10))
            .await
            .expect("still open");
        if data["run_id"] == next.to_string() {
            break;
        }
    }
}

/// Without the catch-up/live seam being exact, a client that reconnects
/// with the last id it got would miss what happened while it was away, or
/// see some events twice.
async fn resuming_with_last_event_id_after_a_disconnect_loses_and_repeats_nothing(
    backend: Backend,
) {
    let env = TestEnv::new(backend, &[("VM_STREAM_POLL_MS", "50")]).await;
    let app = env.router();
    let mut reader = open(&app, "/api/v2/events/stream", &[]).await;
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(create(&app, ONE_STEP).await);
    }
    let mut seen = Vec::new();
    let first: BTreeSet<i64> = all_event_ids(&env).await.into_iter().collect();
    collect_until(&mut reader, &mut seen, &first).await;
    drop(reader);
    // Away: more runs, and the worker runs them all.
    for _ in 0..4 {
        runs.push(create(&app, HELLO).await);
    }
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    for id in &runs {
        env.wait_for(*id, RunStatus::Succeeded, Duration::from_secs(20))
            .await;
    }
    let last = seen.last().copied().expect("some events").to_string();
    let mut reader = open(&app, "/api/v2/events/stream", &[("last-event-id", &last)]).await;
    let everything: BTreeSet<i64> = all_event_ids(&env).await.into_iter().collect();
    // 3 one-step runs (5 events each), 4 two-step runs (7 each).
    assert_eq!(everything.len(), 3 * 5 + 4 * 7);
    collect_until(&mut reader, &mut seen, &everything).await;
    assert_eq!(seen, everything.iter().copied().collect::<Vec<_>>());
    // `?after=` does the same for clients that cannot set headers.
    let mid = seen[seen.len() / 2];
    let mut reader = open(&app, &format!("/api/v2/events/stream?after={mid}"), &[]).await;
    let mut again = Vec::new();
    let rest: BTreeSet<i64> = everything.iter().copied().filter(|id| *id > mid).collect();
    collect_until(&mut reader, &mut again, &rest).await;
    assert_eq!(again, rest.iter().copied().collect::<Vec<_>>());
    stop.cancel();
    worker.await.expect("worker");
}

/// A `Last-Event-ID` beyond the end of the log (the client followed a
/// database that was since replaced: restored from an older backup, or a
/// local one deleted) cannot name an event to resume after: the stream goes
/// on from the log's end instead of silently dropping every new event until
/// the ids catch up with the stale one.
async fn a_last_event_id_beyond_the_log_resumes_from_its_end_not_silently_later(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_STREAM_POLL_MS", "50")]).await;
    let app = env.router();
    let first = create(&app, ONE_STEP).await;
    let last = *all_event_ids(&env).await.last().expect("an event");
    let stale = (last + 10_000).to_string();
    let mut all = open(&app, "/api/v2/events/stream", &[("last-event-id", &stale)]).await;
    let mut one = open(
        &app,
        &format!("/api/v2/runs/{first}/events/stream"),
        &[("last-event-id", &stale)],
    )
    .await;
    let next = create(&app, ONE_STEP).await;
    let (id, data) = all
        .event(Duration::from_secs(10))
        .await
        .expect("the all-runs stream goes on");
    assert!(id > last, "{id} after {last}");
    assert_eq!(data["run_id"], next.to_string());
    assert_eq!(data["type"], "run.queued");
    // The first run's stream is at the end of that run's events: the next
    // one it gets is its own, when there is one.
    let (worker, stop) = env.spawn_worker(1, LlmBackend::Offline);
    env.wait_for(first, RunStatus::Succeeded, Duration::from_secs(20))
        .await;
    let (_, data) = one
        .event(Duration::from_secs(10))
        .await
        .expect("the run's stream goes on");
    assert_eq!(data["run_id"], first.to_string());
    assert_eq!(data["type"], "run.started");
    stop.cancel();
    worker.await.expect("worker");
}

/// The value of a metric line without labels (`name value`) in `/metrics`.
async fn metric(app: &Router, name: &str) -> u64 {
    let text = get_text(app, "/metrics").await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
}

/// Metrics of a stream that fell behind and stayed open: it counted as
/// lagged, it is still one open subscriber, and nothing counts it as dropped.
async fn assert_lagged_not_dropped(app: &Router) {
    assert!(metric(app, "vm_stream_lagged_total").await >= 1);
    let metrics = get_text(app, "/metrics").await;
    assert!(metrics.contains("vm_stream_subscribers 1"), "{metrics}");
    assert!(!metrics.contains("reason=\"slow\""), "{metrics}");
}

/// A burst far beyond the buffer (300 runs created at once, each poll
/// handing a subscriber more events than its channel holds) reaches an
/// all-runs stream whole, on the one connection, while its client reads as
/// fast as it can. Before, the hub cut such a stream off however fast it
/// read: the client reconnected in a storm and the console's runs list went
/// stale.
async fn a_burst_far_beyond_the_buffer_reaches_an_all_runs_stream_whole_on_one_connection(
    backend: Backend,
) {
    let env = TestEnv::new(
        backend,
        &[("VM_STREAM_BUFFER", "4"), ("VM_STREAM_POLL_MS", "20")],
    )
    .await;
    let app = env.router();
    let before = all_event_ids(&env).await.last().copied().unwrap_or(0);
    let mut reader = open(&app, "/api/v2/events/stream", &[]).await;
    const RUNS: usize = 300;
    // The client reads from the start, concurrently with the burst; every
    // run writes exactly one event (`run.queued`) with no worker.
    let reading = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < RUNS {
            let Some((id, data)) = reader.event_within(Duration::from_secs(20)).await else {
                break;
            };
            seen.push((id, data["run_id"].as_str().expect("run_id").to_string()));
        }
        (seen, reader)
    });
    let created: BTreeSet<String> =
        futures::future::join_all((0..RUNS).map(|_| create(&app, ONE_STEP)))
            .await
            .into_iter()
            .map(|id| id.to_string())
            .collect();
    let (seen, mut reader) = reading.await.expect("reader");
    let ids: Vec<i64> = seen.iter().map(|(id, _)| *id).collect();
    let stored: Vec<i64> = all_event_ids(&env)
        .await
        .into_iter()
        .filter(|id| *id > before)
        .collect();
    assert_eq!(stored.len(), RUNS, "one event per run");
    assert_eq!(
        ids.len(),
        RUNS,
        "the stream ended or stalled after {} of {RUNS} events",
        ids.len()
    );
    // Every event once, in increasing id order: exactly the log.
    assert_eq!(ids, stored);
    let runs: BTreeSet<String> = seen.into_iter().map(|(_, run)| run).collect();
    assert_eq!(runs, created);
    assert_lagged_not_dropped(&app).await;
    // Rejoined live: the next event arrives on the same stream.
    let next = create(&app, ONE_STEP).await;
    let (id, data) = reader.event(Duration::from_secs(10)).await.expect("live");
    assert!(id > *ids.last().expect("events"), "{id}");
    assert_eq!(data["run_id"], next.to_string());
}

/// A client that reads slowly (a phone on a bad network) falls behind again
/// and again while runs execute, on an all-runs stream and on one run's
/// stream, and still gets every event once, in order, without a disconnect.
async fn a_slow_reader_falls_behind_and_still_gets_every_event_once(backend: Backend) {
    let env = TestEnv::new(
        backend,
        &[("VM_STREAM_BUFFER", "4"), ("VM_STREAM_POLL_MS", "20")],
    )
    .await;
    let app = env.router();
    let first = create(&app, HELLO).await;
    let all = open(&app, "/api/v2/events/stream?after=0", &[]).await;
    let one = open(&app, &format!("/api/v2/runs/{first}/events/stream"), &[]).await;
    let mut runs = vec![first];
    for _ in 0..11 {
        runs.push(create(&app, HELLO).await);
    }
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    // 12 two-step runs: 7 events each, far beyond a buffer of 4.
    let expected = 12 * 7;
    let slowly = |mut reader: SseReader, want: usize| async move {
        let mut ids = Vec::new();
        while ids.len() < want {
            let Some((id, _)) = reader.event_within(Duration::from_secs(20)).await else {
                break;
            };
            ids.push(id);
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        ids
    };
    let (seen_all, seen_one) = tokio::join!(slowly(all, expected), slowly(one, 7));
    for id in &runs {
        env.wait_for(*id, RunStatus::Succeeded, Duration::from_secs(20))
            .await;
    }
    stop.cancel();
    worker.await.expect("worker");
    assert_eq!(seen_all, all_event_ids(&env).await);
    let of_first = env.store.list_events(first, 0, 1000).await.expect("events");
    assert_eq!(seen_one, of_first.iter().map(|e| e.id).collect::<Vec<_>>());
    assert!(metric(&app, "vm_stream_lagged_total").await >= 1);
    let metrics = get_text(&app, "/metrics").await;
    assert!(metrics.contains("vm_stream_subscribers 0"), "{metrics}");
}

/// A subscriber that stops reading holds only its buffer: the hub takes it
/// off once the buffer is full, and when the client reads again its stream
/// goes on from the database (everything it missed, once, in order) and
/// then live, on the same connection. Before, its stream ended and the
/// client had to reconnect.
async fn a_subscriber_that_stops_reading_continues_from_the_database_when_it_reads_again(
    backend: Backend,
) {
    let env = TestEnv::new(
        backend,
        &[("VM_STREAM_BUFFER", "4"), ("VM_STREAM_POLL_MS", "20")],
    )
    .await;
    let app = env.router();
    create(&app, ONE_STEP).await;
    let mut reader = open(&app, "/api/v2/events/stream?after=0", &[]).await;
    let (first, _) = reader
        .event(Duration::from_secs(5))
        .await
        .expect("caught up");
    for _ in 0..20 {
        create(&app, ONE_STEP).await;
    }
    let mut lagged = 0;
    for _ in 0..100 {
        lagged = metric(&app, "vm_stream_lagged_total").await;
        if lagged > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lagged, 1, "taken off the hub once its buffer was full");
    assert_lagged_not_dropped(&app).await;
    let mut seen = vec![first];
    let everything: BTreeSet<i64> = all_event_ids(&env).await.into_iter().collect();
    assert_eq!(everything.len(), 21);
    collect_until(&mut reader, &mut seen, &everything).await;
    assert_eq!(seen, everything.iter().copied().collect::<Vec<_>>());
    // Live again: a new event arrives without a new catch-up. (The stream
    // may have fallen behind a second time while catching up, when the
    // hub, polling every 20 ms, had not yet handed out the whole backlog as
    // it rejoined: legitimate, and seen on a loaded machine, so the count
    // is compared across the live event rather than held to 1.)
    let before = metric(&app, "vm_stream_lagged_total").await;
    let next = create(&app, ONE_STEP).await;
    let (id, data) = reader.event(Duration::from_secs(10)).await.expect("live");
    assert!(id > *seen.last().expect("events"));
    assert_eq!(data["run_id"], next.to_string());
    assert_eq!(metric(&app, "vm_stream_lagged_total").await, before);
}

/// The real thing: a transaction takes an event id, another commits a later
/// one first. A poller that moved past the first id would never deliver it.
async fn an_event_that_commits_late_is_delivered_in_order_not_skipped(backend: Backend) {
    let env = TestEnv::new(
        backend,
        &[
            ("VM_STREAM_POLL_MS", "20"),
            ("VM_STREAM_GAP_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    let app = env.router();
    let run = create(&app, ONE_STEP).await;
    let mut reader = open(&app, "/api/v2/events/stream", &[]).await;
    let url = env.settings.database.url.expose().to_string();
    let mut late = sqlx::AnyConnection::connect(&url).await.expect("connect");
    let mut tx = late.begin().await.expect("begin");
    let late_id: i64 = match backend {
        Backend::Postgres => sqlx::query_scalar(
            "INSERT INTO run_events (run_id, event_type, created_at) VALUES ($1, 'test.late', 0) RETURNING id",
        )
        .bind(run.to_string())
        .fetch_one(&mut *tx)
        .await
        .expect("insert"),
        // SQLite serialises writers, so a late commit cannot happen; the
        // gap is made by hand: a later id committed first.
        Backend::Sqlite => {
            let next: i64 = sqlx::query_scalar("SELECT MAX(id) + 1 FROM run_events")
                .fetch_one(&mut *tx)
                .await
                .expect("max");
            sqlx::query(
                "INSERT INTO run_events (id, run_id, event_type, created_at) VALUES ($1, $2, 'test.early', 0)",
            )
            .bind(next + 1)
            .bind(run.to_string())
            .execute(&mut *tx)
            .await
            .expect("insert");
            tx.commit().await.expect("commit");
            tx = late.begin().await.expect("begin");
            sqlx::query(
                "INSERT INTO run_events (id, run_id, event_type, created_at) VALUES ($1, $2, 'test.late', 0)",
            )
            .bind(next)
            .bind(run.to_string())
            .execute(&mut *tx)
            .await
            .expect("insert");
            next
        }
    };
    if backend == Backend::Postgres {
        // A later event commits while the first is still in its transaction.
        create(&app, ONE_STEP).await;
    }
    assert!(
        reader
            .event_within(Duration::from_millis(600))
            .await
            .is_none(),
        "nothing may pass the open gap"
    );
    tx.commit().await.expect("commit");
    let (first, data) = reader
        .event(Duration::from_secs(5))
        .await
        .expect("late event");
    assert_eq!((first, data["type"].as_str()), (late_id, Some("test.late")));
    let (second, _) = reader
        .event(Duration::from_secs(5))
        .await
        .expect("next event");
    assert_eq!(second, late_id + 1);
    let metrics = get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_stream_gap_ids_given_up_total 0"),
        "{metrics}"
    );
}

/// An id taken by a transaction that rolls back never commits: the stream
/// waits for it only as long as the gap timeout, then goes on.
async fn a_gap_that_never_fills_is_passed_after_the_gap_timeout(backend: Backend) {
    let env = TestEnv::new(
        backend,
        &[
            ("VM_STREAM_POLL_MS", "20"),
            ("VM_STREAM_GAP_TIMEOUT_MS", "400"),
        ],
    )
    .await;
    let app = env.router();
    let run = create(&app, ONE_STEP).await;
    let mut reader = open(&app, "/api/v2/events/stream", &[]).await;
    let url = env.settings.database.url.expose().to_string();
    let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connect");
    let mut tx = conn.begin().await.expect("begin");
    match backend {
        Backend::Postgres => {
            sqlx::query(
                "INSERT INTO run_events (run_id, event_type, created_at) VALUES ($1, 'test.lost', 0)",
            )
            .bind(run.to_string())
            .execute(&mut *tx)
            .await
            .expect("insert");
            tx.rollback().await.expect("rollback");
        }
        Backend::Sqlite => {
            // An id skipped for good.
            sqlx::query(
                "INSERT INTO run_events (id, run_id, event_type, created_at) \
                 SELECT MAX(id) + 2, $1, 'test.after_gap', 0 FROM run_events",
            )
            .bind(run.to_string())
            .execute(&mut *tx)
            .await
            .expect("insert");
            tx.commit().await.expect("commit");
        }
    }
    let started = std::time::Instant::now();
    if backend == Backend::Postgres {
        create(&app, ONE_STEP).await;
    }
    let (_, data) = reader
        .event(Duration::from_secs(5))
        .await
        .expect("event after the gap");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "held for the gap timeout first ({:?})",
        started.elapsed()
    );
    assert_ne!(data["type"], "test.lost");
    let metrics = get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_stream_gap_ids_given_up_total 1"),
        "{metrics}"
    );
}

/// Two replicas of the API on one database, each with a subscriber, and
/// runs created on both and executed by a worker: each subscriber gets every
/// event, whichever process wrote it. `redis`: the replicas nudge each other
/// and poll only once a minute, so delivery in seconds proves the nudges.
async fn two_replicas_deliver_every_event_to_a_subscriber_of_either(redis: bool) {
    let server = redis.then(support::redis::RedisServer::start);
    let url = server.as_ref().map(|s| s.url()).unwrap_or_default();
    let mut vars = vec![("VM_STREAM_POLL_MS", if redis { "60000" } else { "50" })];
    if redis {
        vars.push(("VM_REDIS_URL", url.as_str()));
    }
    let a = TestEnv::new(Backend::Postgres, &vars).await;
    let db_url = a.settings.database.url.expose().to_string();
    // The second replica: its own process state and pool on the same database.
    let b = TestEnv::at(Some(db_url), &vars).await;
    let shutdown = CancellationToken::new();
    let replica = |env: &TestEnv| -> Router {
        let mut state = AppState::new(env.store.clone(), env.settings.clone());
        if redis {
            let bus = RedisBus::new(
                env.settings.redis_url.as_ref().expect("redis url"),
                state.metrics.clone(),
            )
            .expect("bus");
            tokio::spawn(vm_webapp::stream::publish_commits(
                env.store.clone(),
                bus.clone(),
                shutdown.clone(),
            ));
            state.redis = Some(bus);
        }
        router(state)
    };
    let (app_a, app_b) = (replica(&a), replica(&b));
    let mut on_a = open(&app_a, "/api/v2/events/stream", &[]).await;
    let mut on_b = open(&app_b, "/api/v2/events/stream", &[]).await;
    if redis {
        // Both hubs have subscribed to Redis before anything is written.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A worker of its own (a third process's pool) runs the steps.
    let (worker, stop) = b.spawn_worker(2, LlmBackend::Offline);
    let mut runs = Vec::new();
    for i in 0..6 {
        let app = if i % 2 == 0 { &app_a } else { &app_b };
        runs.push(create(app, HELLO).await);
    }
    for id in &runs {
        a.wait_for(*id, RunStatus::Succeeded, Duration::from_secs(20))
            .await;
    }
    let everything: BTreeSet<i64> = all_event_ids(&a).await.into_iter().collect();
    assert_eq!(everything.len(), 6 * 7);
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    collect_until(&mut on_a, &mut seen_a, &everything).await;
    collect_until(&mut on_b, &mut seen_b, &everything).await;
    assert_eq!(seen_a, everything.iter().copied().collect::<Vec<_>>());
    assert_eq!(seen_a, seen_b);
    stop.cancel();
    worker.await.expect("worker");
    shutdown.cancel();
}

/// Serves `app` over real TCP as `vm-webapp serve` does, on a listener with
/// a small send buffer (so writes to a client that does not read block
/// after a few kilobytes, not megabytes).
async fn serve_over_tcp(app: Router) -> std::net::SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_send_buffer_size(1024).expect("SO_SNDBUF");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(16).expect("listen");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { vm_webapp::http::conn::serve(listener, app).await });
    addr
}

/// A raw TCP client with a small receive buffer that sends a stream's
/// request and then reads nothing: a hung client, its window soon full.
async fn stuck_client(addr: std::net::SocketAddr, uri: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(1024).expect("SO_RCVBUF");
    let mut conn = socket.connect(addr).await.expect("connect");
    let request =
        format!("GET {uri} HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("request");
    conn
}

/// Reads `conn` until the server closes it; panics after `wait`.
async fn read_until_closed(conn: &mut tokio::net::TcpStream, wait: Duration) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(wait, async {
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .expect("the server closed the connection");
}

/// Waits until `vm_stream_subscribers` is `want`.
async fn wait_for_subscribers(app: &Router, want: u64) {
    for _ in 0..100 {
        if metric(app, "vm_stream_subscribers").await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("vm_stream_subscribers never reached {want}");
}

/// A client that stops reading (hung, its TCP window full) loses its
/// stream once a write to it has made no progress for
/// `VM_STREAM_WRITE_TIMEOUT_MS`: the connection closes, its place under the
/// limits is free again and the drop counts as `stalled`. Before, such a
/// stream stayed open for ever and kept its place: a few hung clients
/// locked everyone else out with `503 too_many_streams`.
async fn a_client_that_stops_reading_loses_its_stream_after_the_write_timeout(backend: Backend) {
    let env = TestEnv::new(
        backend,
        &[
            ("VM_STREAM_MAX_SUBSCRIBERS", "1"),
            ("VM_STREAM_WRITE_TIMEOUT_MS", "1000"),
            ("VM_STREAM_HEARTBEAT_MS", "100"),
        ],
    )
    .await;
    let app = env.router();
    // About 2 MiB of events: far more than the socket buffers and what the
    // server buffers itself, so its writes block.
    let run = create(&app, ONE_STEP).await;
    let url = env.settings.database.url.expose().to_string();
    let mut db = sqlx::AnyConnection::connect(&url).await.expect("connect");
    let big = "x".repeat(64 * 1024);
    for _ in 0..32 {
        sqlx::query(
            "INSERT INTO run_events (run_id, event_type, message, created_at) VALUES ($1, 'test.big', $2, 0)",
        )
        .bind(run.to_string())
        .bind(&big)
        .execute(&mut db)
        .await
        .expect("insert");
    }
    let addr = serve_over_tcp(app.clone()).await;
    let mut stuck = stuck_client(addr, "/api/v2/events/stream?after=0").await;
    wait_for_subscribers(&app, 1).await;
    assert_eq!(
        support::send_raw(&app, "GET", "/api/v2/events/stream", None).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "the stuck stream holds the only place"
    );
    // Within the timeout (plus the moment the buffers take to fill, and
    // slack for a loaded machine), the place is free again.
    let started = std::time::Instant::now();
    loop {
        if support::send_raw(&app, "GET", "/api/v2/events/stream", None).await == StatusCode::OK {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the stuck stream still holds its place after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_stream_drops_total{reason=\"stalled\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("vm_stream_subscribers 0"), "{metrics}");
    // Its connection is closed, not only its place freed.
    read_until_closed(&mut stuck, Duration::from_secs(10)).await;
    // A client that reads keeps its stream however long it stays idle: its
    // heartbeats make progress.
    use tokio::io::AsyncReadExt;
    let mut reading = stuck_client(addr, "/api/v2/events/stream").await;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 4096];
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(read) = tokio::time::timeout_at(until, reading.read(&mut buf)).await {
        let n = read.expect("read");
        assert_ne!(n, 0, "a reading client's stream ended");
        received.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    let heartbeats = text.matches(": heartbeat").count();
    assert!(heartbeats >= 10, "{heartbeats} heartbeats");
    let metrics = get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_stream_drops_total{reason=\"stalled\"} 1"),
        "{metrics}"
    );
}

/// Heartbeats are writes like events: a hung client on a stream that only
/// carries heartbeats loses it too, once they have filled its window.
/// Otherwise an idle stream, the common case, would hold its place for ever.
///
/// One backend: the database plays no part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_an_idle_stream_loses_it_too() {
    let env = TestEnv::new(
        Backend::Sqlite,
        &[
            ("VM_STREAM_MAX_SUBSCRIBERS", "1"),
            ("VM_STREAM_WRITE_TIMEOUT_MS", "1000"),
            ("VM_STREAM_HEARTBEAT_MS", "10"),
        ],
    )
    .await;
    let app = env.router();
    let addr = serve_over_tcp(app.clone()).await;
    let _stuck = stuck_client(addr, "/api/v2/events/stream").await;
    wait_for_subscribers(&app, 1).await;
    wait_for_subscribers_within(&app, 0, Duration::from_secs(30)).await;
    let metrics = get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_stream_drops_total{reason=\"stalled\"} 1"),
        "{metrics}"
    );
}

async fn wait_for_subscribers_within(app: &Router, want: u64, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        if metric(app, "vm_stream_subscribers").await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("vm_stream_subscribers never reached {want} within {wait:?}");
}

async fn an_idle_stream_carries_heartbeats(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_STREAM_HEARTBEAT_MS", "100")]).await;
    let app = env.router();
    let mut reader = open(&app, "/api/v2/events/stream", &[]).await;
    for _ in 0..2 {
        match reader.frame(Duration::from_secs(2)).await {
            Some(Frame::Comment(text)) => assert_eq!(text, "heartbeat"),
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }
}

async fn streams_answer_401_without_a_key_and_404_for_an_unknown_run_before_streaming(
    backend: Backend,
) {
    let env = TestEnv::new(backend, &[("VM_API_KEYS", KEYS)]).await;
    let app = env.router();
    let auth = ("authorization", "Bearer ci-key-0123456789abcdef");
    for uri in [
        "/api/v2/events/stream".to_string(),
        format!("/api/v2/runs/{}/events/stream", Uuid::new_v4()),
    ] {
        let reply = send(&app, "GET", &uri, None, &[]).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(reply.body["code"], "unauthorized");
        let reply = send(
            &app,
            "GET",
            &uri,
            None,
            &[("authorization", "Bearer wrong-key-0123456789")],
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{uri}");
    }
    for uri in [
        format!("/api/v2/runs/{}/events/stream", Uuid::new_v4()),
        "/api/v2/runs/not-a-uuid/events/stream".to_string(),
    ] {
        let reply = send(&app, "GET", &uri, None, &[auth]).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(reply.body["code"], "run_not_found");
    }
    for (uri, header) in [
        ("/api/v2/events/stream?after=-1", None),
        ("/api/v2/events/stream?after=x", None),
        ("/api/v2/events/stream?since=1", None),
        ("/api/v2/events/stream", Some("12abc")),
    ] {
        let mut headers = vec![auth];
        if let Some(h) = header {
            headers.push(("last-event-id", h));
        }
        let reply = send(&app, "GET", uri, None, &headers).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{uri} {header:?}");
        assert_eq!(reply.body["code"], "invalid_parameter");
    }
    let run = {
        let reply = send(&app, "POST", "/api/v2/runs", Some(ONE_STEP), &[auth]).await;
        reply.body["id"].as_str().expect("id").to_string()
    };
    let mut reader = open(&app, &format!("/api/v2/runs/{run}/events/stream"), &[auth]).await;
    let (_, data) = reader.event(Duration::from_secs(5)).await.expect("event");
    assert_eq!(data["type"], "run.queued");
}

async fn streams_beyond_the_process_limit_are_refused_with_503(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_STREAM_MAX_SUBSCRIBERS", "1")]).await;
    let app = env.router();
    let first = open(&app, "/api/v2/events/stream", &[]).await;
    let reply = send(&app, "GET", "/api/v2/events/stream", None, &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body["code"], "too_many_streams");
    drop(first);
    let _second = open(&app, "/api/v2/events/stream", &[]).await;
    let metrics = get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("vm_stream_drops_total{reason=\"limit\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("vm_stream_subscribers 1"), "{metrics}");
}

/// One key cannot take every stream of a process: with a key at its own
/// limit (`VM_STREAM_MAX_PER_KEY`), another tenant's key still opens streams,
/// where before one tenant could lock every other out of live updates.
async fn one_key_cannot_take_every_stream_of_a_process(backend: Backend) {
    let keys = "greedy:greedy-key-0123456789abcdef:tenant=a,\
                other:other-key-0123456789abcdef:tenant=b";
    let env = TestEnv::new(
        backend,
        &[
            ("VM_API_KEYS", keys),
            ("VM_STREAM_MAX_SUBSCRIBERS", "3"),
            ("VM_STREAM_MAX_PER_KEY", "2"),
        ],
    )
    .await;
    let app = env.router();
    let greedy = ("authorization", "Bearer greedy-key-0123456789abcdef");
    let other = ("authorization", "Bearer other-key-0123456789abcdef");
    let first = open(&app, "/api/v2/events/stream", &[greedy]).await;
    let _second = open(&app, "/api/v2/events/stream", &[greedy]).await;
    // Bounded: a stream opened by mistake would never end.
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        send(&app, "GET", "/api/v2/events/stream", None, &[greedy]),
    )
    .await
    .expect("refused at once, not streamed");
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.body["code"], "too_many_streams");
    assert!(refused.headers.contains_key("retry-after"));
    // The key's own limit, not only the instance's: the message says both.
    let message = refused.body["message"].as_str().unwrap_or_default();
    assert!(message.contains("this API key"), "{message}");
    let _others = open(&app, "/api/v2/events/stream", &[other]).await;
    // A stream that ends gives its place back to its key.
    drop(first);
    let _third = open(&app, "/api/v2/events/stream", &[greedy]).await;
}

/// Every write path raises the commit signal: with the timer at a minute,
/// only those nudges can deliver a run's events in seconds, through the
/// wait for an approver and the decision. A path that forgot it would show
/// its events a poll interval late.
async fn approval_waits_and_decisions_reach_streams_at_once_not_at_the_next_poll(backend: Backend) {
    let env = TestEnv::new(backend, &[("VM_STREAM_POLL_MS", "60000")]).await;
    let app = env.router();
    let mut all = open(&app, "/api/v2/events/stream", &[]).await;
    let (worker, stop) = env.spawn_worker(2, LlmBackend::Offline);
    let id = create(
        &app,
        // The approval is the last step: its decision writes the run's last
        // events in its own transaction, with no worker activity after it.
        r#"{"steps":[{"kind":"template","template":"draft"},{"kind":"approval","prompt":"Publish {{prev}}?"}]}"#,
    )
    .await;
    let mut types = Vec::new();
    while types.last().map(String::as_str) != Some("step.awaiting_approval") {
        let (_, data) = all.event(Duration::from_secs(5)).await.expect("event");
        types.push(data["type"].as_str().expect("type").to_string());
        if data["type"] == "step.awaiting_approval" {
            assert_eq!(data["data"]["prompt"], "Publish draft?");
        }
    }
    let reply = send(
        &app,
        "POST",
        &format!("/api/v2/runs/{id}/steps/1/approve"),
        Some(r#"{"comment":"fine"}"#),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    while types.last().map(String::as_str) != Some("run.succeeded") {
        let (_, data) = all.event(Duration::from_secs(5)).await.expect("event");
        if data["type"] == "step.approved" {
            assert_eq!(data["data"]["comment"], "fine");
        }
        types.push(data["type"].as_str().expect("type").to_string());
    }
    stop.cancel();
    worker.await.expect("worker");
    assert_eq!(types, env.event_types(id).await);
}

on_both_backends!(
    approval_waits_and_decisions_reach_streams_at_once_not_at_the_next_poll,
    a_run_stream_replays_the_history_then_follows_live,
    a_run_stream_ends_after_the_event_that_ends_the_run,
    a_client_that_stops_reading_loses_its_stream_after_the_write_timeout,
    resuming_with_last_event_id_after_a_disconnect_loses_and_repeats_nothing,
    a_last_event_id_beyond_the_log_resumes_from_its_end_not_silently_later,
    a_burst_far_beyond_the_buffer_reaches_an_all_runs_stream_whole_on_one_connection,
    a_slow_reader_falls_behind_and_still_gets_every_event_once,
    a_subscriber_that_stops_reading_continues_from_the_database_when_it_reads_again,
    an_event_that_commits_late_is_delivered_in_order_not_skipped,
    a_gap_that_never_fills_is_passed_after_the_gap_timeout,
    an_idle_stream_carries_heartbeats,
    streams_answer_401_without_a_key_and_404_for_an_unknown_run_before_streaming,
    streams_beyond_the_process_limit_are_refused_with_503,
    one_key_cannot_take_every_stream_of_a_process,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgresql_deliver_every_event_by_polling() {
    two_replicas_deliver_every_event_to_a_subscriber_of_either(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgresql_deliver_every_event_with_redis_nudges() {
    two_replicas_deliver_every_event_to_a_subscriber_of_either(true).await;
}

/// The console's page and assets come from the binary with a CSP that
/// allows only them; the API keeps its own stricter CSP. A console served
/// under the API's `default-src 'none'` would load nothing, and one with a
/// loose CSP would let injected script run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_and_its_assets_are_served_with_a_csp_that_allows_only_them() {
    let env = TestEnv::new(Backend::Sqlite, &[("VM_API_KEYS", KEYS)]).await;
    let app = env.router();
    let get = |uri: &'static str| {
        let app = app.clone();
        async move {
            let res = app
                .oneshot(
                    Request::builder()
                        .uri(uri)
                        .body(Body::empty())
                        .expect("request"),
                )
                .await
                .expect("router answers");
            let headers = res.headers().clone();
            let status = res.status();
            let body = res.into_body().collect().await.expect("body").to_bytes();
            (
                status,
                headers,
                String::from_utf8(body.to_vec()).expect("utf-8"),
            )
        }
    };
    let (status, headers, html) = get("/console").await;
    assert_eq!(status, StatusCode::OK, "no key needed for the page itself");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/html")
    );
    let csp = headers["content-security-policy"].to_str().expect("csp");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    // No inline script or style for the CSP to block, no external resource.
    assert!(html.contains(r#"<script src="/console/assets/console.js" defer></script>"#));
    assert!(!html.contains("<style") && !html.contains("style=") && !html.contains("onclick"));
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(html.contains(r#"<label for="key">API key</label>"#));
    for (uri, kind) in [
        ("/console/assets/console.js", "text/javascript"),
        ("/console/assets/console.css", "text/css"),
    ] {
        let (status, headers, body) = get(uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap_or("")
                .starts_with(kind),
            "{uri}"
        );
        assert_eq!(headers["content-security-policy"], csp);
        assert!(!body.is_empty());
    }
    let (_, _, script) = get("/console/assets/console.js").await;
    assert!(script.contains("sessionStorage") && script.contains("Authorization"));
    assert!(!script.contains("localStorage") && !script.contains("EventSource("));
    let (status, _, _) = get("/console/assets/missing.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The API's own answers keep the strict policy.
    let (_, headers, _) = get("/api/v2/health/live").await;
    assert_eq!(
        headers["content-security-policy"],
        "default-src 'none'; frame-ancestors 'none'"
    );
}
