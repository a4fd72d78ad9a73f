//! Live updates: every run event, as it commits, to every subscriber that
//! follows its run (or all runs it may see), across API replicas.
//!
//! **The database decides what is delivered.** Each process runs one
//! [`Hub`]: a poller that reads new events from the database
//! ([`Store::feed_after`]) and hands them to its subscribers. It advances
//! only up to the high-water mark ([`highwater`]), so an event that commits
//! late (PostgreSQL commits concurrent transactions out of id order) is never
//! skipped. Every replica polls the same log, so a subscriber of any replica
//! gets every event, whichever replica or worker wrote it.
//!
//! **Nudges only lower latency.** The hub polls on a timer
//! (`VM_STREAM_POLL_MS`), at once when this process commits events
//! ([`crate::store::feed::CommitSignal`]), and, with Redis, when another
//! process announces a commit on [`EVENTS_CHANNEL`] ([`publish_commits`]).
//! A lost nudge costs one poll interval, never an event.
//!
//! **A subscriber** first catches up from the database (from its
//! `Last-Event-ID`, or the run's first event, or the hub's position for
//! everything) up to the hub's position, then registers with the hub and
//! reads live events above it: no gap and no duplicate at the seam, and ids
//! only ever increase on one stream.
//!
//! **Bounded memory, and the database as the buffer.** Each live subscriber
//! has a bounded channel (`VM_STREAM_BUFFER`). One that falls a whole buffer
//! behind (a burst of events in one poll, or a client that reads slowly) is
//! taken off the hub, counted in `vm_stream_lagged_total`; its stream hands
//! out what the channel holds, then catches up from the database again from
//! the last id it handed out, in pages, and rejoins the hub, as a new
//! subscriber does: on the same open stream, with no event lost or repeated
//! and ids only increasing. A stream holds at most its channel and one page;
//! the client sees no disconnect, only a database read per buffer it falls
//! behind. A process serves at most
//! `VM_STREAM_MAX_SUBSCRIBERS` streams, at most `VM_STREAM_MAX_PER_KEY` of
//! them to one API key, so one tenant cannot take them all; a stream whose
//! client stops reading gives its place back after
//! `VM_STREAM_WRITE_TIMEOUT_MS` (enforced where the bytes are written,
//! [`crate::http::conn`]).

pub mod highwater;
pub mod metrics;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Notify, OnceCell, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::StreamSettings;
use crate::metrics::{Dependency, Metrics};
use crate::model::{EventType, RunEvent};
use crate::redis_bus::RedisBus;
use crate::store::feed::FeedFilter;
use crate::store::{Store, StoreError};
use highwater::HighWater;

/// The Redis pub/sub channel on which processes announce committed events.
pub const EVENTS_CHANNEL: &str = "vm:events:new";
/// Most events one poll (or one catch-up page) reads.
const PAGE: i64 = 1000;
/// On start, the hub looks this many ids back for transactions still in
/// flight, so an event committing just after start is not skipped.
const START_WINDOW: i64 = 1000;
/// Polls at most this often, however many nudges arrive.
const MIN_POLL_SPACING: Duration = Duration::from_millis(10);
/// While a gap holds the mark, poll at least this often to see it fill.
const GAP_POLL: Duration = Duration::from_millis(50);
/// Coalesces the Redis announcements of one process.
const PUBLISH_SPACING: Duration = Duration::from_millis(20);

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The process already serves `VM_STREAM_MAX_SUBSCRIBERS` streams, or
    /// `VM_STREAM_MAX_PER_KEY` to this key.
    #[error("too many open streams")]
    TooMany,
    /// The database could not be read to start the hub.
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Subscriber {
    filter: FeedFilter,
    tx: mpsc::Sender<Arc<RunEvent>>,
}

struct Shared {
    /// Every event up to here was handed to the subscribers registered then.
    position: i64,
    subscribers: HashMap<u64, Subscriber>,
    next_id: u64,
}

struct Inner {
    store: Store,
    settings: StreamSettings,
    metrics: Arc<Metrics>,
    started: OnceCell<()>,
    shared: Mutex<Shared>,
    nudge: Arc<Notify>,
    stop: CancellationToken,
    open: AtomicUsize,
    /// Open streams per holder (API key id).
    held: Mutex<HashMap<String, usize>>,
}

/// The process's live-update hub. Cheap to clone; clones share it. Its
/// poller starts with the first subscriber.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl Hub {
    /// A hub reading `store`, not started yet.
    pub fn new(store: Store, settings: StreamSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                settings,
                metrics,
                started: OnceCell::new(),
                shared: Mutex::new(Shared {
                    position: 0,
                    subscribers: HashMap::new(),
                    next_id: 0,
                }),
                nudge: Arc::new(Notify::new()),
                stop: CancellationToken::new(),
                open: AtomicUsize::new(0),
                held: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Ends every stream (they close after what they hold) and the poller:
    /// a graceful stop must not wait on streams that never end by themselves.
    pub fn close(&self) {
        self.inner.stop.cancel();
    }

    /// Makes the poller read now (what a Redis announcement does).
    pub fn nudge(&self) {
        self.inner.nudge.notify_one();
    }

    /// Every event up to this id has been handed to live subscribers.
    pub fn position(&self) -> i64 {
        self.lock().position
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.inner.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the poller once: reads where the log ends, and follows Redis
    /// announcements when `redis` is given.
    async fn ensure_started(&self, redis: Option<&RedisBus>) -> Result<(), StoreError> {
        self.inner
            .started
            .get_or_try_init(|| async {
                let last = self.inner.store.last_event_id().await?;
                let start = (last - START_WINDOW).max(0);
                self.lock().position = start;
                let mut poller = Poller {
                    hub: self.clone(),
                    mark: HighWater::new(start, self.inner.settings.gap_timeout),
                };
                // Settle the start window before the first subscriber takes
                // the position as "now"; what a gap still holds follows.
                while poller.poll().await? {}
                tokio::spawn(poller.run());
                if let Some(redis) = redis {
                    tokio::spawn(redis.clone().forward(
                        EVENTS_CHANNEL,
                        self.inner.nudge.clone(),
                        self.inner.stop.clone(),
                    ));
                }
                Ok::<(), StoreError>(())
            })
            .await
            .map(|_| ())
    }

    /// Opens a subscription for `holder` (the API key id; at most
    /// `VM_STREAM_MAX_PER_KEY` each) to the events `filter` selects with an id above
    /// `after` (at most the log's last id); `None` starts at the hub's
    /// position (only new events).
    ///
    /// Errors: [`SubscribeError::TooMany`] at the per-process limit,
    /// [`SubscribeError::Store`] when the database cannot be read.
    pub async fn subscribe(
        &self,
        filter: FeedFilter,
        after: Option<i64>,
        redis: Option<&RedisBus>,
        holder: &str,
    ) -> Result<Subscription, SubscribeError> {
        let slot = StreamSlot::take(self, holder)?;
        self.ensure_started(redis).await?;
        let cursor = match after {
            // An id beyond the log's end names no event: the client followed
            // a database since replaced (an older backup restored, a local
            // one deleted). Resume from the end, or every new event would be
            // skipped until the ids caught up. An id any replica handed out
            // is committed, so it is never above the log's end.
            Some(after) if after > self.position() => {
                after.min(self.inner.store.last_event_id().await?)
            }
            Some(after) => after,
            None => self.position(),
        };
        Ok(Subscription {
            hub: self.clone(),
            filter,
            cursor,
            page: VecDeque::new(),
            phase: Phase::CatchUp,
            until_run_ends: false,
            _slot: slot,
        })
    }

    /// Registers a live subscriber; returns its receiver and the position
    /// from which the hub will hand it events (exclusive).
    fn register(&self, filter: FeedFilter) -> (u64, mpsc::Receiver<Arc<RunEvent>>, i64) {
        let (tx, rx) = mpsc::channel(self.inner.settings.buffer);
        let mut shared = self.lock();
        let id = shared.next_id;
        shared.next_id += 1;
        shared.subscribers.insert(id, Subscriber { filter, tx });
        (id, rx, shared.position)
    }

    fn unregister(&self, id: u64) {
        self.lock().subscribers.remove(&id);
    }

    /// Hands settled events to the subscribers and moves the position, under
    /// one lock, so a subscriber registering in between sees either all of a
    /// batch live or none of it.
    ///
    /// A subscriber whose channel is full is removed at the first event it
    /// could not take, before any later one: its channel then holds only
    /// events below every event it missed, and dropping the sender tells its
    /// [`Subscription`] to read the rest from the database (see
    /// [`Phase::Live`]).
    fn dispatch(&self, events: &[RunEvent], position: i64) {
        let mut shared = self.lock();
        let mut off = Vec::new();
        for event in events {
            let event = Arc::new(event.clone());
            for (id, sub) in &shared.subscribers {
                if !sub.filter.matches(&event) {
                    continue;
                }
                match sub.tx.try_send(event.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => off.push((*id, true)),
                    Err(mpsc::error::TrySendError::Closed(_)) => off.push((*id, false)),
                }
            }
            for (id, lagged) in off.drain(..) {
                if shared.subscribers.remove(&id).is_some() && lagged {
                    self.inner.metrics.stream.lagged.inc();
                    debug!(
                        "a live-update subscriber fell a whole buffer behind; it continues from the database"
                    );
                }
            }
        }
        shared.position = shared.position.max(position);
    }
}

/// One open stream's place under the per-process and per-key limits, and
/// its gauge.
struct StreamSlot {
    hub: Hub,
    holder: String,
}

impl StreamSlot {
    fn take(hub: &Hub, holder: &str) -> Result<Self, SubscribeError> {
        {
            let mut held = hub.inner.held.lock().unwrap_or_else(|p| p.into_inner());
            let count = held.entry(holder.to_string()).or_insert(0);
            if *count >= hub.inner.settings.max_per_key {
                hub.inner.metrics.stream.dropped("limit");
                return Err(SubscribeError::TooMany);
            }
            *count += 1;
        }
        let release_key = || {
            let mut held = hub.inner.held.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = held.get_mut(holder) {
                *count -= 1;
                if *count == 0 {
                    held.remove(holder);
                }
            }
        };
        let max = hub.inner.settings.max_subscribers;
        let taken = hub
            .inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            release_key();
            hub.inner.metrics.stream.dropped("limit");
            return Err(SubscribeError::TooMany);
        }
        hub.inner.metrics.stream.subscribers.inc();
        Ok(Self {
            hub: hub.clone(),
            holder: holder.to_string(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        {
            let mut held = self
                .hub
                .inner
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(count) = held.get_mut(&self.holder) {
                *count -= 1;
                if *count == 0 {
                    held.remove(&self.holder);
                }
            }
        }
        self.hub.inner.open.fetch_sub(1, Ordering::AcqRel);
        self.hub.inner.metrics.stream.subscribers.dec();
    }
}

/// The process-wide reader of the event log.
struct Poller {
    hub: Hub,
    mark: HighWater,
}

impl Poller {
    async fn run(mut self) {
        let inner = self.hub.inner.clone();
        let mut committed = inner.store.commit_signal().subscribe();
        let mut delay = inner.settings.poll_interval;
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                _ = inner.stop.cancelled() => return,
                _ = inner.nudge.notified() => {}
                changed = committed.changed() => {
                    if changed.is_err() {
                        // The store is gone: nothing more will commit here.
                        return;
                    }
                }
                _ = tokio::time::sleep(delay) => {}
            }
            let started = Instant::now();
            match self.poll().await {
                Ok(more) => {
                    failures = 0;
                    delay = if more {
                        Duration::ZERO
                    } else if self.mark.holding() {
                        GAP_POLL.min(inner.settings.poll_interval)
                    } else {
                        inner.settings.poll_interval
                    };
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    inner.metrics.dependency_failed(Dependency::database);
                    delay = inner.settings.poll_interval * failures.min(10);
                    warn!(error = %e, "live updates cannot read new events; retrying");
                }
            }
            // Many nudges in a burst make one poll each MIN_POLL_SPACING.
            let spent = started.elapsed();
            if spent < MIN_POLL_SPACING {
                tokio::time::sleep(MIN_POLL_SPACING - spent).await;
            }
        }
    }

    /// One read; true when a full page came back (more may be waiting).
    async fn poll(&mut self) -> Result<bool, StoreError> {
        let store = &self.hub.inner.store;
        let events = store.feed_after(self.mark.position(), PAGE).await?;
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        let before = self.mark.given_up();
        let settled = self.mark.settle(&ids, Instant::now());
        let given_up = self.mark.given_up() - before;
        if given_up > 0 {
            self.hub.inner.metrics.stream.gaps_given_up.inc_by(given_up);
            warn!(
                ids = given_up,
                "live updates stopped waiting for event ids that did not commit within the gap timeout"
            );
        }
        self.hub.dispatch(&events[..settled], self.mark.position());
        Ok(settled == events.len() && events.len() as i64 == PAGE)
    }
}

enum Phase {
    /// Reading the database up to the hub's position.
    CatchUp,
    /// Registered: reading the database up to `upto`, while live events
    /// above it wait in `rx`.
    Bridge {
        id: u64,
        rx: mpsc::Receiver<Arc<RunEvent>>,
        upto: i64,
    },
    /// Following the hub. When the hub drops the sender (this subscriber
    /// fell a whole buffer behind, the only reason it does), the channel is
    /// drained first, then the phase goes back to `CatchUp` from the last id
    /// handed out: the database holds every event the channel could not.
    Live {
        id: u64,
        rx: mpsc::Receiver<Arc<RunEvent>>,
    },
    Done,
}

/// One subscriber's events, in increasing id order, each once. Ends after
/// the run's end event when it follows one run ([`Subscription::until_run_ends`]),
/// and otherwise only when the database failed during a catch-up or the hub
/// closed; the client then resumes with the last id it got. Falling a whole
/// buffer behind does not end it: it continues from the database (see the
/// module docs).
pub struct Subscription {
    hub: Hub,
    filter: FeedFilter,
    cursor: i64,
    page: VecDeque<RunEvent>,
    phase: Phase,
    until_run_ends: bool,
    _slot: StreamSlot,
}

impl Subscription {
    /// Ends the subscription after the first event that ends a run
    /// ([`crate::model::EventType::RUN_ENDS`]): for one run's stream, which
    /// has nothing more to follow then. Events of the run recorded after its
    /// end (a `tenant.usage_threshold` its last step reached) are not sent.
    pub fn until_run_ends(mut self) -> Self {
        self.until_run_ends = true;
        self
    }

    /// The next event, or `None` when the stream is over.
    pub async fn next(&mut self) -> Option<RunEvent> {
        loop {
            if let Some(event) = self.page.pop_front() {
                if event.id > self.cursor {
                    self.cursor = event.id;
                    if self.until_run_ends && EventType::ends_run(&event.event_type) {
                        // The run is over: leave the hub and end after this one.
                        self.page.clear();
                        self.end(false);
                    }
                    return Some(event);
                }
                continue;
            }
            if self.hub.inner.stop.is_cancelled() {
                self.end(true);
                return None;
            }
            let store = self.hub.inner.store.clone();
            match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::CatchUp => {
                    let upto = self.hub.position();
                    match store.feed_page(&self.filter, self.cursor, upto, PAGE).await {
                        Ok(page) if page.len() as i64 == PAGE => {
                            self.page.extend(page);
                            self.phase = Phase::CatchUp;
                        }
                        Ok(page) => {
                            self.page.extend(page);
                            let (id, rx, upto) = self.hub.register(self.filter.clone());
                            self.phase = Phase::Bridge { id, rx, upto };
                        }
                        Err(e) => return self.failed(&e),
                    }
                }
                Phase::Bridge { id, rx, upto } => {
                    let from = self.page.back().map_or(self.cursor, |e| e.id);
                    if from >= upto {
                        self.phase = Phase::Live { id, rx };
                        continue;
                    }
                    match store.feed_page(&self.filter, from, upto, PAGE).await {
                        Ok(page) => {
                            let full = page.len() as i64 == PAGE;
                            self.page.extend(page);
                            self.phase = if full {
                                Phase::Bridge { id, rx, upto }
                            } else {
                                Phase::Live { id, rx }
                            };
                        }
                        Err(e) => {
                            self.hub.unregister(id);
                            return self.failed(&e);
                        }
                    }
                }
                Phase::Live { id, mut rx } => {
                    let stop = self.hub.inner.stop.clone();
                    tokio::select! {
                        _ = stop.cancelled() => {
                            self.hub.unregister(id);
                            self.hub.inner.metrics.stream.dropped("shutdown");
                            return None;
                        }
                        received = rx.recv() => match received {
                            Some(event) => {
                                self.page.push_back((*event).clone());
                                self.phase = Phase::Live { id, rx };
                            }
                            // Lagged: the hub took this subscriber off after
                            // the channel's last event. Everything above the
                            // cursor is in the database; read it, then rejoin.
                            None => self.phase = Phase::CatchUp,
                        },
                    }
                }
                Phase::Done => return None,
            }
        }
    }

    fn end(&mut self, shutdown: bool) {
        if shutdown && !matches!(self.phase, Phase::Done) {
            self.hub.inner.metrics.stream.dropped("shutdown");
        }
        if let Phase::Bridge { id, .. } | Phase::Live { id, .. } = self.phase {
            self.hub.unregister(id);
        }
        self.phase = Phase::Done;
    }

    fn failed(&mut self, e: &StoreError) -> Option<RunEvent> {
        self.hub
            .inner
            .metrics
            .dependency_failed(Dependency::database);
        warn!(error = %e, "a live-update stream cannot catch up from the database; it ends and the client resumes");
        self.phase = Phase::Done;
        None
    }

    /// The subscription as a stream of events.
    pub fn into_stream(self) -> BoxStream<'static, RunEvent> {
        futures::stream::unfold(self, |mut sub| async move {
            sub.next().await.map(|event| (event, sub))
        })
        .boxed()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Phase::Bridge { id, .. } | Phase::Live { id, .. } = self.phase {
            self.hub.unregister(id);
        }
    }
}

/// Announces this process's event commits on Redis ([`EVENTS_CHANNEL`]), so
/// other replicas' hubs poll at once; at most one message per 20 ms. Runs
/// until `shutdown`. Best effort: a failed publish costs latency only.
pub async fn publish_commits(store: Store, redis: RedisBus, shutdown: CancellationToken) {
    let mut committed = store.commit_signal().subscribe();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = committed.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        redis.publish(EVENTS_CHANNEL).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PUBLISH_SPACING) => {}
        }
    }
}
