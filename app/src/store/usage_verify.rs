//! `vm-webapp usage verify`: recomputes a period's usage two ways and
//! reports every difference.
//!
//! 1. The counters against the ledger: each `usage_counters` row must equal
//!    the sum of its ledger rows (they are written in one transaction).
//! 2. The ledger against what it counts: `runs` against the runs created in
//!    the period, `steps` against the step results recorded in it, and
//!    `llm_tokens` against the `usage` of the `llm` steps' outputs.
//!
//! Usage recorded with an injected period (imports) only takes part in the
//! first check. `approval_decisions` only takes part in the first check too:
//! the approvals tables are not this module's.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{Any, Row, Transaction};

use super::queue::complete::llm_tokens;
use super::{Result, Store};
use crate::period::Period;
use crate::steps::StepSpec;

/// One difference found by [`Store::verify_usage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDifference {
    /// The tenant.
    pub tenant: String,
    /// The meter (`runs`, …).
    pub meter: String,
    /// What was compared: `counter vs ledger`, `ledger vs runs`, …
    pub check: &'static str,
    /// The first side's value.
    pub left: i64,
    /// The second side's value.
    pub right: i64,
}

impl std::fmt::Display for UsageDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tenant {}, meter {}: {} differ ({} vs {})",
            self.tenant, self.meter, self.check, self.left, self.right
        )
    }
}

type Sums = BTreeMap<(String, String), i64>;

fn compare(
    out: &mut Vec<UsageDifference>,
    check: &'static str,
    left: &Sums,
    right: &Sums,
    meters: &[&str],
) {
    let keys: BTreeSet<&(String, String)> = left
        .keys()
        .chain(right.keys())
        .filter(|(_, m)| meters.contains(&m.as_str()))
        .collect();
    for key in keys {
        let (l, r) = (
            left.get(key).copied().unwrap_or(0),
            right.get(key).copied().unwrap_or(0),
        );
        if l != r {
            out.push(UsageDifference {
                tenant: key.0.clone(),
                meter: key.1.clone(),
                check,
                left: l,
                right: r,
            });
        }
    }
}

impl Store {
    async fn sums(
        tx: &mut Transaction<'static, Any>,
        sql: &str,
        period: Period,
        by_period: bool,
    ) -> Result<Sums> {
        let mut q = sqlx::query(sql);
        q = if by_period {
            q.bind(period.to_string())
        } else {
            q.bind(period.start_ms()).bind(period.end_ms())
        };
        let mut out = Sums::new();
        for row in q.fetch_all(&mut **tx).await? {
            out.insert(
                (row.try_get("tenant")?, row.try_get("meter")?),
                row.try_get("n")?,
            );
        }
        Ok(out)
    }

    /// Every difference between the counters, the ledger and the runs and
    /// results of `period`; empty when all agree. Every table is read in one
    /// snapshot ([`Store::begin_snapshot`]), so a verification while the
    /// app serves sees each step's result, ledger row and counter together
    /// or not at all. Errors: the database's.
    pub async fn verify_usage(&self, period: Period) -> Result<Vec<UsageDifference>> {
        let mut tx = self.begin_snapshot().await?;
        let tx = &mut tx;
        let counters = Self::sums(
            tx,
            "SELECT tenant, meter, CAST(SUM(used) AS BIGINT) AS n FROM usage_counters \
             WHERE period = $1 GROUP BY tenant, meter",
            period,
            true,
        )
        .await?;
        let ledger = Self::sums(
            tx,
            "SELECT tenant, meter, CAST(SUM(quantity) AS BIGINT) AS n FROM usage_ledger \
             WHERE period = $1 GROUP BY tenant, meter",
            period,
            true,
        )
        .await?;
        // Ledger rows written by the run and step paths, not injected.
        let metered = Self::sums(
            tx,
            "SELECT tenant, meter, CAST(SUM(quantity) AS BIGINT) AS n FROM usage_ledger \
             WHERE period = $1 AND source IN ('run.created', 'step.succeeded') \
             GROUP BY tenant, meter",
            period,
            true,
        )
        .await?;
        let runs = Self::sums(
            tx,
            "SELECT tenant, 'runs' AS meter, COUNT(*) AS n FROM runs \
             WHERE created_at >= $1 AND created_at < $2 GROUP BY tenant",
            period,
            false,
        )
        .await?;
        let steps = Self::sums(
            tx,
            "SELECT runs.tenant AS tenant, 'steps' AS meter, COUNT(*) AS n FROM step_results \
                 JOIN runs ON runs.id = step_results.run_id \
                 WHERE step_results.finished_at >= $1 AND step_results.finished_at < $2 \
                 GROUP BY runs.tenant",
            period,
            false,
        )
        .await?;
        let mut tokens = Sums::new();
        let rows = sqlx::query(
            "SELECT runs.tenant AS tenant, runs.steps AS steps, step_results.step_index AS step_index, \
             step_results.output AS output FROM step_results JOIN runs ON runs.id = step_results.run_id \
             WHERE step_results.finished_at >= $1 AND step_results.finished_at < $2",
        )
        .bind(period.start_ms())
        .bind(period.end_ms())
        .fetch_all(&mut **tx)
        .await?;
        for row in &rows {
            let steps: Vec<StepSpec> =
                serde_json::from_str(&row.try_get::<String, _>("steps")?).unwrap_or_default();
            let index: i64 = row.try_get("step_index")?;
            let Some(step) = usize::try_from(index).ok().and_then(|i| steps.get(i)) else {
                continue;
            };
            let output: serde_json::Value =
                serde_json::from_str(&row.try_get::<String, _>("output")?).unwrap_or_default();
            let n = llm_tokens(step, &output);
            if n > 0 {
                *tokens
                    .entry((row.try_get("tenant")?, "llm_tokens".to_string()))
                    .or_insert(0) += n;
            }
        }
        let mut out = Vec::new();
        compare(
            &mut out,
            "counter vs ledger",
            &counters,
            &ledger,
            &["runs", "steps", "llm_tokens", "approval_decisions"],
        );
        compare(&mut out, "ledger vs runs", &metered, &runs, &["runs"]);
        compare(
            &mut out,
            "ledger vs step results",
            &metered,
            &steps,
            &["steps"],
        );
        compare(
            &mut out,
            "ledger vs llm outputs",
            &metered,
            &tokens,
            &["llm_tokens"],
        );
        Ok(out)
    }
}
