//! Usage metering: the append-only ledger, the counters kept with it, the
//! warning thresholds (the reports built from them: [`super::usage_report`]).
//!
//! Every counted thing is one `usage_ledger` row (tenant, meter, quantity,
//! period, source run and step, database time) written in the same
//! transaction as what it counts, together with the `usage_counters` row of
//! its tenant, period and meter, so the two always agree (`vm-webapp usage
//! verify` checks that, and checks the ledger against runs and results):
//!
//! - `runs`: in the run-creation transaction ([`super::group_commit`]), which
//!   also enforces `block` allowances under a lock of the counter row;
//! - `steps` and `llm_tokens`: with the step's result, in the batched
//!   completion ([`super::queue::complete`]), only for deliveries whose fenced
//!   delete succeeded, so a redelivered step is counted once (and a unique
//!   index refuses a second row for the same step and meter);
//! - `approval_decisions`: [`Store::record_usage`] in the decision's
//!   transaction.
//!
//! The period (`YYYY-MM`, UTC) is computed by the database from its own clock
//! in the statement that writes the row ([`period_sql`]), never by a process.
//! Warning thresholds are level-based: after usage is added, every threshold
//! the counter has reached and that is not yet recorded for the period and
//! the allowance in force is recorded once (`usage_warnings`, a primary key
//! on tenant, period, meter, allowance and threshold), with a
//! `tenant.usage_threshold` event on the run that reached it and an audit
//! row. Keyed by the allowance, an upgrade mid-period (100 runs to 10,000)
//! warns again at 80 % and 100 % of the new allowance; a change back to an
//! allowance already warned about does not warn twice.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Value, json};
use sqlx::{Any, Row, Transaction};

use super::events::NewEvent;
use super::tenancy::{assigned_plan, resolve};
#[cfg(test)]
use super::usage_report::{BilledSegment, meter_usage};
pub use super::usage_report::{MeterUsage, PlanSegment, ThresholdReached, UsageReport};
use super::{Result, Store, recordset};
use crate::config::DbBackend;
use crate::metrics::ThresholdLabels;
use crate::model::EventType;
use crate::period::Period;
use crate::plans::{Meter, Overage, Plan, Plans, threshold_label};

/// State shared by every clone of a store (its group-commit writers too).
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) plans: RwLock<Option<Arc<Plans>>>,
    /// `vm_tenant_usage_threshold_total{threshold}`, registered by the
    /// process's metrics.
    pub(crate) crossed: Family<ThresholdLabels, Counter>,
    /// Where this store's writers start among the counter shards.
    shard_offset: ShardOffset,
}

impl Shared {
    /// The counter shard (1 to [`COUNTER_SHARDS`]) that writer `n` of this
    /// store adds to. Writers of one store use different shards and each
    /// store (a process, or each worker of the bench) starts at a random
    /// one, so concurrent transactions seldom update one counter row (and so
    /// wait for each other's commit). Shard 0 is the admission lock of run
    /// creation under a `block` allowance.
    pub(crate) fn counter_shard(&self, n: u64) -> i64 {
        counter_shard(self.shard_offset.0, n)
    }
}

/// A random start among the counter shards, drawn when a store opens.
struct ShardOffset(u64);

impl Default for ShardOffset {
    fn default() -> Self {
        // A version-4 UUID's low 64 bits are random but for two variant bits.
        Self(uuid::Uuid::new_v4().as_u128() as u64)
    }
}

/// Shards a counter is split into, besides shard 0 (see [`Shared::counter_shard`]).
const COUNTER_SHARDS: u64 = 15;

fn counter_shard(offset: u64, n: u64) -> i64 {
    1 + (offset.wrapping_add(n) % COUNTER_SHARDS) as i64
}

/// The UTC month (`YYYY-MM`) of the ms timestamp expression `ms`.
pub(crate) fn period_sql(backend: DbBackend, ms: &str) -> String {
    match backend {
        DbBackend::Postgres => {
            format!("to_char(to_timestamp(({ms}) / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM')")
        }
        DbBackend::Sqlite => format!("strftime('%Y-%m', ({ms}) / 1000, 'unixepoch')"),
    }
}

/// One usage to record with [`Store::record_usage`].
#[derive(Debug, Clone)]
pub struct UsageRecord<'a> {
    /// The run it belongs to; its tenant is charged.
    pub run_id: &'a str,
    /// The step, if the usage is a step's.
    pub step_index: Option<i64>,
    /// What is counted.
    pub meter: Meter,
    /// How much (≥ 1; zero is skipped).
    pub quantity: i64,
    /// What caused it, for the ledger: `approval.decided`, …
    pub source: &'a str,
}

/// A run refused because a `block` allowance is used up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaRefusal {
    /// The tenant.
    pub tenant: String,
    /// The meter whose allowance is used up (`runs`).
    pub meter: Meter,
    /// The allowance of the period.
    pub allowance: i64,
    /// Used so far in the period.
    pub used: i64,
    /// The period (`YYYY-MM`, from the database clock).
    pub period: String,
}

impl QuotaRefusal {
    /// When the allowance resets: the start of the next UTC month (RFC 3339);
    /// `None` (the 402 body's `null`) for a period without a valid reset, such
    /// as a database clock in `9999-12`, rather than an empty or malformed
    /// timestamp.
    pub fn resets_at(&self) -> Option<String> {
        Period::parse(&self.period).map(Period::resets_at)
    }
}

/// A row for the ledger, with its tenant known.
#[derive(Debug, Clone)]
pub(crate) struct UsageRow {
    pub(crate) tenant: String,
    pub(crate) meter: Meter,
    pub(crate) quantity: i64,
    pub(crate) run_id: Option<String>,
    pub(crate) step_index: Option<i64>,
    pub(crate) source: &'static str,
}

/// Where usage was added: the threshold check's input.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Touched {
    pub(crate) tenant: String,
    pub(crate) meter: Meter,
    pub(crate) period: String,
    /// The run that reached a threshold gets the event.
    pub(crate) run_id: String,
}

/// Whether `used` has reached `threshold` (a fraction such as `0.8` or
/// `1.1`) of `allowance`, exactly: the threshold is taken in millionths and
/// the comparison made in integers, so that `1.1 × 50` is 55 and not the
/// floating-point 55.00000000000001 that the 55th unit would miss.
pub(crate) fn threshold_reached(used: i64, threshold: f64, allowance: i64) -> bool {
    let millionths = (threshold * 1e6).round() as i128;
    i128::from(used) * 1_000_000 >= millionths * i128::from(allowance)
}

impl Store {
    /// Records `records` inside the caller's transaction `tx` (the
    /// approval-decision meter uses this in the decision's transaction): one
    /// ledger row each, charged to the run's tenant, the counters updated
    /// with them, and any warning threshold reached recorded once. Call
    /// [`Store::count_crossings`] with the result after `tx` commits.
    ///
    /// On SQLite, call it after the transaction's first write (its first
    /// statement reads the runs' tenants, and a write transaction must take
    /// its lock with a write).
    ///
    /// Errors: [`super::StoreError`] from the database (`Corrupt` for a run
    /// that does not exist); the transaction should then be rolled back.
    pub async fn record_usage(
        &self,
        tx: &mut Transaction<'static, Any>,
        records: &[UsageRecord<'_>],
    ) -> Result<Vec<String>> {
        self.record_usage_at(tx, records, None).await
    }

    /// [`Store::record_usage`] in its own transaction, in `period` instead
    /// of the database clock's month when given (imports, corrections and
    /// tests of the month boundary; `run.created` and `step.succeeded`
    /// usage always takes the month of its run's `created_at` or its
    /// result's `finished_at`). Returns the
    /// thresholds reached, already counted in the metrics.
    pub async fn record_usage_in_period(
        &self,
        records: &[UsageRecord<'_>],
        period: Option<&str>,
    ) -> Result<Vec<String>> {
        // It reads the runs' tenants before it writes.
        let mut tx = self.begin_write().await?;
        let crossed = self.record_usage_at(&mut tx, records, period).await?;
        tx.commit().await?;
        if !crossed.is_empty() {
            self.events.raise();
        }
        self.count_crossings(&crossed);
        Ok(crossed)
    }

    async fn record_usage_at(
        &self,
        tx: &mut Transaction<'static, Any>,
        records: &[UsageRecord<'_>],
        period: Option<&str>,
    ) -> Result<Vec<String>> {
        let mut rows = Vec::with_capacity(records.len());
        for r in records.iter().filter(|r| r.quantity > 0) {
            let tenant: Option<String> = sqlx::query("SELECT tenant FROM runs WHERE id = $1")
                .bind(r.run_id)
                .fetch_optional(&mut **tx)
                .await?
                .map(|row| row.try_get("tenant"))
                .transpose()?;
            let Some(tenant) = tenant else {
                return Err(super::StoreError::Corrupt(format!(
                    "usage for run {} which does not exist",
                    r.run_id
                )));
            };
            rows.push(UsageRow {
                tenant,
                meter: r.meter,
                quantity: r.quantity,
                run_id: Some(r.run_id.to_string()),
                step_index: r.step_index,
                source: known_source(r.source),
            });
        }
        let touched = self
            .add_usage(tx, &rows, period, self.usage.counter_shard(0), None)
            .await?;
        self.note_thresholds(tx, &touched, None).await
    }

    /// Adds ledger rows and their counters in `tx`. Returns what was
    /// touched, for thresholds.
    ///
    /// The period of a row is that of the instant the database stamped on
    /// what it counts, by the same expression ([`period_sql`]): a run's
    /// `created_at` for `run.created`, a step result's `finished_at` for
    /// `step.succeeded`; so `usage verify`, which derives the period of runs
    /// and results from those instants, always agrees with the ledger, also
    /// for a run created in the last millisecond of a month. On SQLite the
    /// clock is read once per statement, not per transaction, so a ledger
    /// statement a moment after the run's could otherwise fall in the next
    /// month. Other rows (and a counted thing not found) take `period` when
    /// given, else the database clock's month. Each row's period is computed
    /// once, by the ledger insert, and the counters are added from what it
    /// returned, so the two never disagree either. Rows are stamped `at` (ms
    /// since the epoch) when given, else by the database clock: run creation
    /// passes the one instant of its batch.
    pub(crate) async fn add_usage(
        &self,
        tx: &mut Transaction<'static, Any>,
        rows: &[UsageRow],
        period: Option<&str>,
        shard: i64,
        at: Option<i64>,
    ) -> Result<Vec<Touched>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let backend = self.backend();
        let batch = Value::Array(
            rows.iter()
                .map(|r| {
                    json!({
                        "tenant": r.tenant, "meter": r.meter.as_str(), "quantity": r.quantity,
                        "run_id": r.run_id, "step_index": r.step_index, "source": r.source,
                    })
                })
                .collect(),
        )
        .to_string();
        let source = recordset(
            backend,
            &[
                ("tenant", "text"),
                ("meter", "text"),
                ("quantity", "bigint"),
                ("run_id", "text"),
                ("step_index", "bigint"),
                ("source", "text"),
            ],
        );
        let run_period = period_sql(backend, "r.created_at");
        let step_period = period_sql(backend, "sr.finished_at");
        let ledger = sqlx::query(&self.sql_at(
            &format!(
            "INSERT INTO usage_ledger (tenant, meter, quantity, period, run_id, step_index, source, at) \
             SELECT s.tenant, s.meter, s.quantity, COALESCE(CASE s.source \
               WHEN 'run.created' THEN (SELECT {run_period} FROM runs r WHERE r.id = s.run_id) \
               WHEN 'step.succeeded' THEN (SELECT {step_period} FROM step_results sr \
                 WHERE sr.run_id = s.run_id AND sr.step_index = s.step_index) END, $2, {{period}}), \
             s.run_id, s.step_index, s.source, {{now}} FROM ({source}) s \
             RETURNING tenant, meter, quantity, period, run_id"
            ),
            3,
        ))
        .bind(&batch)
        .bind(period)
        .bind(at)
        .fetch_all(&mut **tx)
        .await?;
        let mut sums: BTreeMap<(String, String, String), i64> = BTreeMap::new();
        let mut last_run: BTreeMap<(String, Meter, String), String> = BTreeMap::new();
        for row in &ledger {
            let (tenant, meter, period): (String, String, String) = (
                row.try_get("tenant")?,
                row.try_get("meter")?,
                row.try_get("period")?,
            );
            let quantity: i64 = row.try_get("quantity")?;
            if let (Some(m), Some(run)) = (
                Meter::parse(&meter),
                row.try_get::<Option<String>, _>("run_id")?,
            ) {
                last_run.insert((tenant.clone(), m, period.clone()), run);
            }
            let sum = sums.entry((tenant, period, meter)).or_insert(0);
            *sum = sum.saturating_add(quantity);
        }
        let counters = Value::Array(
            sums.into_iter()
                .map(|((tenant, period, meter), used)| {
                    json!({"tenant": tenant, "period": period, "meter": meter, "used": used})
                })
                .collect(),
        )
        .to_string();
        let source = recordset(
            backend,
            &[
                ("tenant", "text"),
                ("period", "text"),
                ("meter", "text"),
                ("used", "bigint"),
            ],
        );
        // Counter rows in key order, so that concurrent writers on
        // PostgreSQL lock them in one order.
        sqlx::query(&self.sql_at(
            &format!(
            "INSERT INTO usage_counters (tenant, period, meter, shard, used, updated_at) \
             SELECT tenant, period, meter, $2, used, {{now}} FROM ({source}) s \
             WHERE true ORDER BY tenant, period, meter \
             ON CONFLICT (tenant, period, meter, shard) DO UPDATE SET used = usage_counters.used + excluded.used, \
             updated_at = excluded.updated_at"
            ),
            3,
        ))
        .bind(&counters)
        .bind(shard)
        .bind(at)
        .execute(&mut **tx)
        .await?;
        Ok(last_run
            .into_iter()
            .map(|((tenant, meter, period), run_id)| Touched {
                tenant,
                meter,
                period,
                run_id,
            })
            .collect())
    }

    /// Records every warning threshold the counters of `touched` have reached
    /// and that is not yet recorded for the period and the allowance in
    /// force: a `usage_warnings` row (once, by its primary key), a `tenant.usage_threshold` event on the
    /// run that reached it and a `usage.threshold_reached` audit row, all in
    /// `tx`, stamped `at` (ms since the epoch) when given, else by the
    /// database clock. Returns the threshold labels newly reached (for the
    /// metric, counted after commit).
    pub(crate) async fn note_thresholds(
        &self,
        tx: &mut Transaction<'static, Any>,
        touched: &[Touched],
        at: Option<i64>,
    ) -> Result<Vec<String>> {
        let Some(plans) = self.plans() else {
            return Ok(Vec::new());
        };
        let mut crossed = Vec::new();
        let mut plan_cache: BTreeMap<String, Option<Plan>> = BTreeMap::new();
        for t in touched {
            if !plan_cache.contains_key(&t.tenant) {
                let assigned = assigned_plan(tx, &t.tenant).await?;
                let plan = resolve(&plans, assigned.as_deref(), &t.tenant).cloned();
                plan_cache.insert(t.tenant.clone(), plan);
            }
            let Some(plan) = plan_cache.get(&t.tenant).and_then(Option::as_ref) else {
                continue;
            };
            let Some(rule) = plan.rule(t.meter) else {
                continue;
            };
            let used: i64 = match sqlx::query(
                "SELECT CAST(SUM(used) AS BIGINT) AS used FROM usage_counters \
                 WHERE tenant = $1 AND period = $2 AND meter = $3 HAVING COUNT(*) > 0",
            )
            .bind(&t.tenant)
            .bind(&t.period)
            .bind(t.meter.as_str())
            .fetch_optional(&mut **tx)
            .await?
            {
                Some(row) => row.try_get("used")?,
                None => continue,
            };
            for &threshold in &plan.warn_at {
                if used <= 0 || !threshold_reached(used, threshold, rule.allowance) {
                    continue;
                }
                let label = threshold_label(threshold);
                let inserted = sqlx::query(&self.sql_at(
                    "INSERT INTO usage_warnings (tenant, period, meter, threshold, used, allowance, run_id, crossed_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, {now}) \
                     ON CONFLICT (tenant, period, meter, allowance, threshold) DO NOTHING RETURNING tenant",
                    8,
                ))
                .bind(&t.tenant)
                .bind(&t.period)
                .bind(t.meter.as_str())
                .bind(&label)
                .bind(used)
                .bind(rule.allowance)
                .bind(&t.run_id)
                .bind(at)
                .fetch_optional(&mut **tx)
                .await?
                .is_some();
                if !inserted {
                    continue;
                }
                let data = json!({
                    "tenant": t.tenant, "period": t.period, "meter": t.meter.as_str(),
                    "threshold": label, "used": used, "allowance": rule.allowance,
                    "plan": plan.name, "overage": rule.overage.as_str(),
                });
                let message = format!(
                    "tenant {} reached {}% of its {} allowance ({used} of {}) in {}{}",
                    t.tenant,
                    (threshold * 100.0).round(),
                    t.meter.as_str(),
                    rule.allowance,
                    t.period,
                    if rule.overage == Overage::Block && used >= rule.allowance {
                        ": new runs are refused until the allowance resets"
                    } else {
                        ""
                    }
                );
                self.insert_events_at(
                    tx,
                    &[NewEvent::run(&t.run_id, EventType::TenantUsageThreshold)
                        .message(message)
                        .data(data.clone())],
                    at,
                )
                .await?;
                sqlx::query(&self.sql_at(
                    "INSERT INTO audit_log (at, actor, action, target, outcome, request_id, detail, tenant) \
                     VALUES ({now}, 'system', 'usage.threshold_reached', $1, 'success', NULL, $2, $1)",
                    3,
                ))
                .bind(&t.tenant)
                .bind(data.to_string())
                .bind(at)
                .execute(&mut **tx)
                .await?;
                crossed.push(label);
            }
        }
        Ok(crossed)
    }

    /// Counts newly reached thresholds in `vm_tenant_usage_threshold_total`.
    pub fn count_crossings(&self, labels: &[String]) {
        for label in labels {
            self.usage
                .crossed
                .get_or_create(&ThresholdLabels {
                    threshold: label.clone(),
                })
                .inc();
        }
    }

    /// The threshold counter family, for the process's metrics registry.
    pub fn threshold_family(&self) -> Family<ThresholdLabels, Counter> {
        self.usage.crossed.clone()
    }

    /// The database clock's current period (`YYYY-MM`, UTC).
    pub async fn current_period(&self) -> Result<String> {
        Ok(sqlx::query(&self.sql("SELECT {period} AS p"))
            .fetch_one(self.pool())
            .await?
            .try_get("p")?)
    }

    /// The period (`YYYY-MM`, UTC) the database assigns to the instant `ms`
    /// (ms since the Unix epoch), by the same expression that stamps usage
    /// rows: for tests of the month boundary and for tools.
    pub async fn period_at(&self, ms: i64) -> Result<String> {
        Ok(sqlx::query(&format!(
            "SELECT {} AS p",
            period_sql(self.backend(), "CAST($1 AS BIGINT)")
        ))
        .bind(ms)
        .fetch_one(self.pool())
        .await?
        .try_get("p")?)
    }
}

/// The distinct (tenant, meter) pairs of `rows`, each with the last run.
pub(crate) fn touched_of<'a>(
    rows: impl Iterator<Item = (&'a str, Meter, Option<&'a str>)>,
    period: &str,
) -> Vec<Touched> {
    let mut last: BTreeMap<(String, Meter), String> = BTreeMap::new();
    for (tenant, meter, run) in rows {
        if let Some(run) = run {
            last.insert((tenant.to_string(), meter), run.to_string());
        }
    }
    last.into_iter()
        .map(|((tenant, meter), run_id)| Touched {
            tenant,
            meter,
            period: period.to_string(),
            run_id,
        })
        .collect()
}

/// Ledger sources are a fixed vocabulary; an unknown one is kept as `other`
/// rather than letting a caller's text into a `'static` slot.
fn known_source(source: &str) -> &'static str {
    match source {
        "approval.decided" => "approval.decided",
        "run.created" => "run.created",
        "step.succeeded" => "step.succeeded",
        "import" => "import",
        _ => "other",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn plans() -> Plans {
        Plans::parse(
            "default_plan: free\nplans:\n  free:\n    meters:\n      runs: {allowance: 100}\n  pro:\n    meters:\n      runs: {allowance: 1000, overage: allow, unit_price: 0.5}\n",
        )
        .unwrap()
    }

    /// The 402 body carried `resets_at: ""` when the period had no reset
    /// that RFC 3339 can write: a client parsing it failed.
    #[test]
    fn a_refusal_without_a_writable_reset_has_none_rather_than_an_empty_timestamp() {
        let refusal = |period: &str| QuotaRefusal {
            tenant: "acme".into(),
            meter: Meter::Runs,
            allowance: 1,
            used: 1,
            period: period.into(),
        };
        assert_eq!(refusal("9999-12").resets_at(), None);
        assert_eq!(
            refusal("2026-11").resets_at().as_deref(),
            Some("2026-12-01T00:00:00.000Z")
        );
    }

    #[test]
    fn thresholds_are_compared_exactly_not_in_floating_point() {
        assert!(threshold_reached(55, 1.1, 50));
        assert!(!threshold_reached(54, 1.1, 50));
        assert!(threshold_reached(4, 0.8, 5));
        assert!(!threshold_reached(3, 0.8, 5));
        assert!(
            threshold_reached(3, 0.8, 3),
            "2.4 rounds up to the 3rd unit"
        );
        assert!(!threshold_reached(2, 0.8, 3));
        assert!(threshold_reached(0, 0.8, 0));
        assert!(threshold_reached(i64::MAX, 10.0, i64::MAX / 10));
    }

    /// A segment of `plan` over `[from, until)` of a 100-long period, with
    /// `runs` runs used during it.
    fn seg<'a>(plan: Option<&'a Plan>, from: i64, until: i64, runs: i64) -> BilledSegment<'a> {
        BilledSegment {
            plan,
            from,
            until,
            used: BTreeMap::from([(Meter::Runs, runs)]),
        }
    }

    #[test]
    fn a_whole_period_on_one_plan_bills_the_overage_at_the_unit_price() {
        let plans = plans();
        let used = BTreeMap::from([(Meter::Runs, 1010)]);
        let m = meter_usage(&used, &[seg(plans.plan("pro"), 0, 100, 1010)], 100);
        let runs = &m[0];
        assert_eq!(runs.allowance, Some(1000));
        assert_eq!(runs.remaining, Some(0));
        assert_eq!(runs.overage, 10);
        assert_eq!(runs.billable_overage, 10);
        assert_eq!(runs.preview, 5.0);
        assert_eq!(m[1].allowance, None, "steps are unlimited");
    }

    #[test]
    fn an_upgrade_half_way_prorates_the_allowance_by_time() {
        let plans = plans();
        let used = BTreeMap::from([(Meter::Runs, 600)]);
        let m = meter_usage(
            &used,
            &[
                seg(plans.plan("free"), 0, 50, 50),
                seg(plans.plan("pro"), 50, 100, 550),
            ],
            100,
        );
        assert_eq!(m[0].prorated_allowance, Some(550.0));
        assert_eq!(m[0].billable_overage, 50);
        assert_eq!(m[0].preview, 25.0);
        assert_eq!(
            m[0].allowance,
            Some(1000),
            "the plan in force now is enforced"
        );
        assert_eq!(m[0].overage, 0);
    }

    /// The plans of the unlimited cases: `pro` allows 100 runs a month and
    /// bills past that at 0.5; `unlimited` does not limit runs.
    fn pro_and_unlimited() -> Plans {
        Plans::parse(
            "default_plan: pro\nplans:\n  pro:\n    meters:\n      runs: {allowance: 100, overage: allow, unit_price: 0.5}\n  unlimited: {}\n",
        )
        .unwrap()
    }

    /// The reviewer's case: 80 runs in the first 10 % of the month on pro
    /// (10 prorated, so 70 over, 35.0 owed), then unlimited. A moment on the
    /// unlimited plan made `prorated_allowance` absent and billed nothing.
    #[test]
    fn an_unlimited_moment_does_not_erase_the_overage_accrued_before_it() {
        let plans = pro_and_unlimited();
        let (pro, unlimited) = (plans.plan("pro"), plans.plan("unlimited"));
        let used = BTreeMap::from([(Meter::Runs, 1080)]);
        let m = meter_usage(
            &used,
            &[seg(pro, 0, 10, 80), seg(unlimited, 10, 100, 1000)],
            100,
        );
        assert_eq!(m[0].prorated_allowance, Some(10.0));
        assert_eq!(
            m[0].billable_overage, 70,
            "the 1000 used unlimited are free"
        );
        assert_eq!(m[0].preview, 35.0);
        assert_eq!(m[0].allowance, None, "unlimited now");
    }

    /// And back: the overage accrued before the unlimited time stays, the
    /// usage during it is free, and the usage after it is billed under the
    /// limiting plan with the allowances of both limited times.
    #[test]
    fn limited_then_unlimited_then_limited_bills_each_time_on_its_own_terms() {
        let plans = pro_and_unlimited();
        let (pro, unlimited) = (plans.plan("pro"), plans.plan("unlimited"));
        let used = BTreeMap::from([(Meter::Runs, 80 + 5000 + 30)]);
        let m = meter_usage(
            &used,
            &[
                seg(pro, 0, 10, 80),
                seg(unlimited, 10, 60, 5000),
                seg(pro, 60, 100, 30),
            ],
            100,
        );
        // 10 + 40 prorated; 110 used under pro: 60 over, of which 70 were
        // already owed after the first time (never taken back).
        assert_eq!(m[0].prorated_allowance, Some(50.0));
        assert_eq!(m[0].billable_overage, 70);
        assert_eq!(m[0].preview, 35.0);
        // Heavier use after the unlimited time adds to what is owed.
        let m = meter_usage(
            &used,
            &[
                seg(pro, 0, 10, 80),
                seg(unlimited, 10, 60, 5000),
                seg(pro, 60, 100, 100),
            ],
            100,
        );
        assert_eq!(m[0].billable_overage, 130, "180 used under pro, 50 allowed");
        assert_eq!(m[0].preview, 65.0);
    }

    /// Unlimited first, then a limiting plan: only the limited time's usage
    /// counts against its prorated allowance.
    #[test]
    fn usage_on_an_unlimited_plan_before_a_limiting_one_is_not_billed() {
        let plans = pro_and_unlimited();
        let (pro, unlimited) = (plans.plan("pro"), plans.plan("unlimited"));
        let used = BTreeMap::from([(Meter::Runs, 10_000 + 60)]);
        let m = meter_usage(
            &used,
            &[seg(unlimited, 0, 50, 10_000), seg(pro, 50, 100, 60)],
            100,
        );
        assert_eq!(m[0].prorated_allowance, Some(50.0));
        assert_eq!(m[0].billable_overage, 10);
        assert_eq!(m[0].preview, 5.0);
        assert_eq!(m[0].allowance, Some(100));
    }

    /// Overage accrued under a plan keeps that plan's price, and a later
    /// upgrade does not take it back.
    #[test]
    fn overage_accrued_before_an_upgrade_is_kept_at_the_earlier_plans_price() {
        let plans = Plans::parse(
            "default_plan: pro\nplans:\n  pro:\n    meters:\n      runs: {allowance: 100, overage: allow, unit_price: 0.5}\n  big:\n    meters:\n      runs: {allowance: 100000, overage: allow, unit_price: 0.1}\n",
        )
        .unwrap();
        let used = BTreeMap::from([(Meter::Runs, 60)]);
        let m = meter_usage(
            &used,
            &[
                seg(plans.plan("pro"), 0, 10, 50),
                seg(plans.plan("big"), 10, 100, 10),
            ],
            100,
        );
        assert_eq!(m[0].billable_overage, 40);
        assert_eq!(m[0].preview, 20.0);
    }

    #[test]
    fn a_meter_no_plan_of_the_period_limits_has_no_prorated_allowance() {
        let plans = pro_and_unlimited();
        let used = BTreeMap::from([(Meter::Steps, 7)]);
        let m = meter_usage(&used, &[seg(plans.plan("pro"), 0, 100, 0)], 100);
        assert_eq!(m[1].prorated_allowance, None);
        assert_eq!((m[1].billable_overage, m[1].preview), (0, 0.0));
    }
}

#[cfg(test)]
mod shard_tests {
    use super::Shared;

    #[test]
    fn writers_of_one_store_add_to_different_shards_never_the_admission_lock() {
        let shared = Shared::default();
        let shards: std::collections::BTreeSet<i64> =
            (0..15).map(|n| shared.counter_shard(n)).collect();
        assert_eq!(shards.len(), 15, "{shards:?}");
        assert!(shards.iter().all(|s| (1..=15).contains(s)), "{shards:?}");
    }
}
