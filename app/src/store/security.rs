//! Security records: the append-only audit trail, webhook deliveries, the
//! database copy of seen webhook nonces, and the grants that give the
//! runtime's database role exactly the rights it needs.

use serde::Serialize;
use sqlx::Row;

use super::{Result, Store, StoreError};
use crate::config::DbBackend;

/// One audit entry to append.
#[derive(Debug, Clone)]
pub struct NewAudit<'a> {
    /// Who: an API key id, `webhook:<source>`, `anonymous`, or `system`.
    pub actor: &'a str,
    /// What: `run.created`, `run.cancelled`, `approval.approved`, `approval.refused`,
    /// `webhook.accepted`, `webhook.rejected`, `auth.failed`, ….
    pub action: &'a str,
    /// On what (a run id, a webhook source), if anything.
    pub target: Option<&'a str>,
    /// `success`, `denied`, or a rejection reason code.
    pub outcome: &'a str,
    /// The request it came from.
    pub request_id: Option<&'a str>,
    /// Short non-secret detail (JSON text).
    pub detail: Option<String>,
    /// The tenant of the actor, if it has one.
    pub tenant: Option<&'a str>,
}

/// A stored audit entry.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Increasing id.
    pub id: i64,
    /// Time, ms since the Unix epoch.
    pub at: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: Option<String>,
    /// How it ended.
    pub outcome: String,
    /// Request id.
    pub request_id: Option<String>,
    /// Detail (JSON text).
    pub detail: Option<String>,
    /// The tenant of the actor (absent for system rows and failed
    /// authentications).
    pub tenant: Option<String>,
}

/// Filters of the audit listing.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this action.
    pub action: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this outcome.
    pub outcome: Option<String>,
    /// Only entries older than this id.
    pub before: Option<i64>,
    /// Page size.
    pub limit: i64,
}

/// Tables the runtime may read and write.
const RUNTIME_TABLES: [&str; 13] = [
    "runs",
    "jobs",
    "approvals",
    "step_results",
    "dead_jobs",
    "run_events",
    "worker_heartbeats",
    "webhook_deliveries",
    "queue_stats",
    "maintenance_leader",
    "usage_counters",
    "usage_thresholds",
    "usage_warnings",
];

/// Append-only tables: the runtime may add rows and read them, never
/// rewrite or delete them (like the audit trail).
const APPEND_ONLY_TABLES: [&str; 3] = ["audit_log", "usage_ledger", "tenant_plan_changes"];

/// The advisory lock key that serialises [`Store::grant_runtime_role`]
/// across concurrent `migrate` runs (an arbitrary constant, "vmgrant").
const GRANT_LOCK_KEY: i64 = 0x76_6d67_7261_6e74;

impl Store {
    /// Appends one audit entry.
    pub async fn append_audit(&self, entry: &NewAudit<'_>) -> Result<()> {
        sqlx::query(&self.sql(
            "INSERT INTO audit_log (at, actor, action, target, outcome, request_id, detail, tenant) \
             VALUES ({now}, $1, $2, $3, $4, $5, $6, $7)",
        ))
        .bind(entry.actor)
        .bind(entry.action)
        .bind(entry.target)
        .bind(entry.outcome)
        .bind(entry.request_id)
        .bind(entry.detail.clone())
        .bind(entry.tenant)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Audit entries, newest first.
    pub async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let mut clauses = Vec::new();
        let mut binds: Vec<String> = Vec::new();
        for (column, value) in [
            ("action", &filter.action),
            ("actor", &filter.actor),
            ("outcome", &filter.outcome),
        ] {
            if let Some(v) = value {
                binds.push(v.clone());
                clauses.push(format!("{column} = ${}", binds.len()));
            }
        }
        let mut n = binds.len();
        if filter.before.is_some() {
            n += 1;
            clauses.push(format!("id < ${n}"));
        }
        let mut sql =
            "SELECT id, at, actor, action, target, outcome, request_id, detail, tenant FROM audit_log"
                .to_string();
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", n + 1));
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b);
        }
        if let Some(before) = filter.before {
            q = q.bind(before);
        }
        q.bind(filter.limit)
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    outcome: r.try_get("outcome")?,
                    request_id: r.try_get("request_id")?,
                    detail: r.try_get("detail")?,
                    tenant: r.try_get("tenant")?,
                })
            })
            .collect()
    }

    /// Remembers a webhook nonce for `window` after the database's now; false
    /// when it was already remembered (a replay). Expired nonces are dropped on
    /// the way. The window is measured by the database clock, so processes
    /// with skewed clocks agree on it.
    pub async fn remember_nonce(
        &self,
        source: &str,
        nonce: &str,
        window: std::time::Duration,
    ) -> Result<bool> {
        let window = super::ms(window);
        let inserted = sqlx::query(&self.sql(
            "INSERT INTO webhook_nonces (source, nonce, expires_at) VALUES ($1, $2, {now} + $3) \
             ON CONFLICT (source, nonce) DO NOTHING RETURNING nonce",
        ))
        .bind(source)
        .bind(nonce)
        .bind(window)
        .fetch_optional(self.pool())
        .await?
        .is_some();
        if !inserted {
            // A nonce whose window has passed may be reused: take it over.
            let n = sqlx::query(&self.sql(
                "UPDATE webhook_nonces SET expires_at = {now} + $3 \
                 WHERE source = $1 AND nonce = $2 AND expires_at < {now}",
            ))
            .bind(source)
            .bind(nonce)
            .bind(window)
            .execute(self.pool())
            .await?
            .rows_affected();
            return Ok(n == 1);
        }
        sqlx::query(&self.sql("DELETE FROM webhook_nonces WHERE expires_at < {now}"))
            .execute(self.pool())
            .await?;
        Ok(true)
    }

    /// Forgets a nonce (its delivery failed, so a retry must not count as a replay).
    pub async fn forget_nonce(&self, source: &str, nonce: &str) -> Result<()> {
        sqlx::query("DELETE FROM webhook_nonces WHERE source = $1 AND nonce = $2")
            .bind(source)
            .bind(nonce)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Records an accepted webhook delivery; returns its id.
    pub async fn record_delivery(
        &self,
        source: &str,
        nonce: &str,
        body_sha256: &str,
        run_id: Option<&str>,
    ) -> Result<i64> {
        let row = sqlx::query(&self.sql(
            "INSERT INTO webhook_deliveries (source, nonce, received_at, body_sha256, run_id) \
             VALUES ($1, $2, {now}, $3, $4) RETURNING id",
        ))
        .bind(source)
        .bind(nonce)
        .bind(body_sha256)
        .bind(run_id)
        .fetch_one(self.pool())
        .await?;
        Ok(row.try_get("id")?)
    }

    /// Gives `role` what the runtime needs and nothing more (PostgreSQL):
    /// read and write data tables, read the migration history, append to and
    /// read the audit trail, use the sequences; no DDL, no audit rewrite.
    /// Idempotent; run by `vm-webapp migrate` as the schema owner.
    ///
    /// Concurrent calls (two migration Jobs, or `migrate` run twice at once)
    /// take turns on a transaction-scoped advisory lock: PostgreSQL refuses
    /// a `GRANT` that changes an ACL another transaction is changing
    /// ("tuple concurrently updated"), and of four concurrent `migrate`
    /// runs two or three failed so. Errors: [`StoreError::Corrupt`] for a
    /// role name that is not letters, digits and `_`; a database error
    /// when the owner may not grant.
    pub async fn grant_runtime_role(&self, role: &str) -> Result<()> {
        if self.backend != DbBackend::Postgres {
            return Ok(());
        }
        if role.is_empty() || !role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(StoreError::Corrupt(
                "runtime role name must be letters, digits and _".into(),
            ));
        }
        let quoted = format!("\"{role}\"");
        let mut statements = vec![
            format!("GRANT USAGE ON SCHEMA public TO {quoted}"),
            format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {quoted}",
                RUNTIME_TABLES.join(", ")
            ),
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_nonces TO {quoted}"),
            format!("GRANT SELECT ON _sqlx_migrations TO {quoted}"),
            format!(
                "REVOKE UPDATE, DELETE, TRUNCATE ON {} FROM {quoted}",
                APPEND_ONLY_TABLES.join(", ")
            ),
            format!(
                "GRANT SELECT, INSERT ON {} TO {quoted}",
                APPEND_ONLY_TABLES.join(", ")
            ),
            format!("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {quoted}"),
        ];
        statements.push(format!("REVOKE CREATE ON SCHEMA public FROM {quoted}"));
        let mut tx = self.pool().begin().await?;
        sqlx::query(&format!("SELECT pg_advisory_xact_lock({GRANT_LOCK_KEY})"))
            .execute(&mut *tx)
            .await?;
        for sql in &statements {
            sqlx::query(sql).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
