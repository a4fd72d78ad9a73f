//! The event log: every transition of a run, in order. Writers add events in
//! the same transaction as the change they record; readers page by event id.

use serde_json::Value;
use sqlx::{Any, Row, Transaction};
use uuid::Uuid;

use super::{Result, Store, json_text, parse_json, recordset};
use crate::model::{EventType, RunEvent};

/// An event about to be inserted.
pub(crate) struct NewEvent<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) event_type: EventType,
    pub(crate) step_index: Option<i64>,
    pub(crate) attempt: Option<i64>,
    pub(crate) message: Option<String>,
    pub(crate) data: Option<Value>,
}

impl<'a> NewEvent<'a> {
    pub(crate) fn run(run_id: &'a str, event_type: EventType) -> Self {
        Self {
            run_id,
            event_type,
            step_index: None,
            attempt: None,
            message: None,
            data: None,
        }
    }

    pub(crate) fn step(
        run_id: &'a str,
        event_type: EventType,
        step_index: i64,
        attempt: i64,
    ) -> Self {
        Self {
            step_index: Some(step_index),
            attempt: Some(attempt),
            ..Self::run(run_id, event_type)
        }
    }

    pub(crate) fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    pub(crate) fn data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    fn to_json(&self) -> Value {
        serde_json::json!({
            "run_id": self.run_id,
            "event_type": self.event_type.as_str(),
            "step_index": self.step_index,
            "attempt": self.attempt,
            "message": self.message,
            "data": self.data.as_ref().map(json_text),
        })
    }
}

/// `INSERT … SELECT` of events from one JSON array parameter (`$1`),
/// stamped `$2` (ms since the epoch; the database clock when NULL).
pub(crate) fn insert_events_sql(store: &Store) -> String {
    store.sql_at(
        &format!(
        "INSERT INTO run_events (run_id, event_type, step_index, attempt, message, data, created_at) \
         SELECT run_id, event_type, step_index, attempt, message, data, {{now}} FROM ({}) s",
        recordset(
            store.backend(),
            &[
                ("run_id", "text"),
                ("event_type", "text"),
                ("step_index", "bigint"),
                ("attempt", "bigint"),
                ("message", "text"),
                ("data", "text"),
            ]
        )
        ),
        2,
    )
}

impl Store {
    /// Inserts `events` in order within `tx`, in one statement.
    pub(crate) async fn insert_events(
        &self,
        tx: &mut Transaction<'static, Any>,
        events: &[NewEvent<'_>],
    ) -> Result<()> {
        self.insert_events_at(tx, events, None).await
    }

    /// [`Store::insert_events`] stamped `at` (ms since the epoch) instead
    /// of the database clock when given.
    pub(crate) async fn insert_events_at(
        &self,
        tx: &mut Transaction<'static, Any>,
        events: &[NewEvent<'_>],
        at: Option<i64>,
    ) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let batch = Value::Array(events.iter().map(NewEvent::to_json).collect()).to_string();
        sqlx::query(&insert_events_sql(self))
            .bind(batch)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Events of a run in order, after event id `after`, at most `limit`.
    pub async fn list_events(&self, run_id: Uuid, after: i64, limit: i64) -> Result<Vec<RunEvent>> {
        let rows = sqlx::query(
            "SELECT id, event_type, step_index, attempt, message, data, created_at FROM run_events \
             WHERE run_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(run_id.to_string())
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(RunEvent {
                    id: row.try_get("id")?,
                    run_id,
                    event_type: row.try_get("event_type")?,
                    step_index: row.try_get("step_index")?,
                    attempt: row.try_get("attempt")?,
                    message: row.try_get("message")?,
                    data: row
                        .try_get::<Option<String>, _>("data")?
                        .map(|d: String| parse_json(&d, "event data"))
                        .transpose()?,
                    created_at: row.try_get("created_at")?,
                    tenant: None,
                })
            })
            .collect()
    }
}
