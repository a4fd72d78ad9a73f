//! The event log read as a feed, for live streams ([`crate::stream`]): every
//! run's events in id order after a position, and the signal a process raises
//! when it has committed new events.
//!
//! Event ids come from one sequence (PostgreSQL `BIGSERIAL`, SQLite
//! `AUTOINCREMENT`). On PostgreSQL concurrent transactions may commit out of
//! id order, so a reader that sees id 10 may not see id 9 yet: deciding when a
//! gap is settled is the stream hub's job ([`crate::stream::highwater`]);
//! these reads only return what is committed. On SQLite writers are
//! serialised, so ids commit in order.

use std::sync::Arc;

use sqlx::Row;
use sqlx::any::AnyRow;
use tokio::sync::watch;
use uuid::Uuid;

use super::{Result, Store, parse_json, parse_uuid};
use crate::model::{EventType, RunEvent};

/// Which runs' events a reader may see: the "runs the key may see" of
/// `GET /api/v2/events/stream`, as one parameter of every feed read, so that
/// a narrower scope (a tenant's runs) is one new variant with its SQL
/// condition here and its test in [`Visibility::allows`] (which then needs
/// the run's owner on the rows [`Store::feed_after`] reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    /// Every run.
    All,
    /// The runs of one tenant (a key without the admin role).
    Tenant(String),
}

impl Visibility {
    /// An SQL condition on the run id column `run_column`, ANDed into the
    /// catch-up reads; when it needs a value, it is placeholder `$param` and
    /// the value is returned with it, for the caller to bind.
    fn sql_condition(&self, run_column: &str, param: usize) -> (String, Option<String>) {
        match self {
            Visibility::All => ("TRUE".to_string(), None),
            Visibility::Tenant(tenant) => (
                format!("{run_column} IN (SELECT id FROM runs WHERE tenant = ${param})"),
                Some(tenant.clone()),
            ),
        }
    }

    /// Whether an event read by the process-wide poller is visible.
    pub fn allows(&self, event: &RunEvent) -> bool {
        match self {
            Visibility::All => true,
            Visibility::Tenant(tenant) => event.tenant.as_deref() == Some(tenant.as_str()),
        }
    }
}

/// What one subscriber follows: one run, or every run it may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedFilter {
    /// Only this run's events, when set.
    pub run: Option<Uuid>,
    /// The runs the caller may see.
    pub visible: Visibility,
}

impl FeedFilter {
    /// Whether `event` belongs to this feed.
    pub fn matches(&self, event: &RunEvent) -> bool {
        self.run.is_none_or(|r| r == event.run_id) && self.visible.allows(event)
    }
}

/// Raised after a transaction that wrote run events commits, so this
/// process's stream hub polls at once (and, with Redis, other replicas are
/// nudged). Only lowers latency: the hub polls on a timer as well. Cheap to
/// clone; clones share one signal.
#[derive(Clone)]
pub struct CommitSignal(Arc<watch::Sender<u64>>);

impl Default for CommitSignal {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }
}

impl CommitSignal {
    /// Says that events were committed.
    pub(crate) fn raise(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees each raise (coalesced when several come at once).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// The run's tenant comes along (one primary-key lookup per event) for
/// [`Visibility::allows`].
const FEED_COLUMNS: &str = "id, run_id, event_type, step_index, attempt, message, data, created_at, \
     (SELECT tenant FROM runs WHERE runs.id = run_events.run_id) AS tenant";

fn event_from_row(row: &AnyRow) -> Result<RunEvent> {
    Ok(RunEvent {
        id: row.try_get("id")?,
        run_id: parse_uuid(&row.try_get::<String, _>("run_id")?)?,
        event_type: row.try_get("event_type")?,
        step_index: row.try_get("step_index")?,
        attempt: row.try_get("attempt")?,
        message: row.try_get("message")?,
        data: row
            .try_get::<Option<String>, _>("data")?
            .map(|d: String| parse_json(&d, "event data"))
            .transpose()?,
        created_at: row.try_get("created_at")?,
        tenant: row.try_get("tenant")?,
    })
}

impl Store {
    /// The signal raised after events commit (see [`CommitSignal`]).
    pub fn commit_signal(&self) -> &CommitSignal {
        &self.events
    }

    /// The highest committed event id, 0 when there is none.
    pub async fn last_event_id(&self) -> Result<i64> {
        let row = sqlx::query("SELECT MAX(id) AS id FROM run_events")
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get::<Option<i64>, _>("id")?.unwrap_or(0))
    }

    /// Committed events of every run with an id above `after`, in id order,
    /// at most `limit`: what the stream hub polls.
    pub async fn feed_after(&self, after: i64, limit: i64) -> Result<Vec<RunEvent>> {
        let rows = sqlx::query(&format!(
            "SELECT {FEED_COLUMNS} FROM run_events WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// The id of the event that ended run `run` (`run.succeeded`,
    /// `run.failed` or `run.cancelled`), or `None` while it has not ended:
    /// a run's stream ends after it, and a client resuming at or beyond it
    /// has nothing more to follow.
    pub async fn run_end_event(&self, run: Uuid) -> Result<Option<i64>> {
        let ends = EventType::RUN_ENDS
            .iter()
            .map(|t| format!("'{}'", t.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let row = sqlx::query(&format!(
            "SELECT MIN(id) AS id FROM run_events WHERE run_id = $1 AND event_type IN ({ends})"
        ))
        .bind(run.to_string())
        .fetch_one(self.pool())
        .await?;
        Ok(row.try_get::<Option<i64>, _>("id")?)
    }

    /// Events that `filter` selects with an id in `(after, upto]`, in id
    /// order, at most `limit`: a subscriber's catch-up before it follows the
    /// hub.
    pub async fn feed_page(
        &self,
        filter: &FeedFilter,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<RunEvent>> {
        // Two statements, not one with `($1 = '' OR run_id = $1)`: a run's
        // catch-up must use the (run_id, id) key, not scan by id.
        let sql = match filter.run {
            Some(_) => format!(
                "SELECT {FEED_COLUMNS} FROM run_events \
                 WHERE id > $1 AND id <= $2 AND run_id = $4 AND {{visible}} ORDER BY id LIMIT $3"
            ),
            None => format!(
                "SELECT {FEED_COLUMNS} FROM run_events \
                 WHERE id > $1 AND id <= $2 AND {{visible}} ORDER BY id LIMIT $3"
            ),
        };
        let next_param = if filter.run.is_some() { 5 } else { 4 };
        let (visible, value) = filter.visible.sql_condition("run_id", next_param);
        let sql = sql.replace("{visible}", &visible);
        let mut query = sqlx::query(&sql).bind(after).bind(upto).bind(limit);
        if let Some(run) = filter.run {
            query = query.bind(run.to_string());
        }
        if let Some(value) = value {
            query = query.bind(value);
        }
        let rows = query.fetch_all(self.pool()).await?;
        rows.iter().map(event_from_row).collect()
    }
}
