//! Usage reports: what a tenant used in a period against the plans in force
//! during it, and the invoice preview ([`meter_usage`], the billing rules in
//! one place), read from the counters and the ledger that
//! [`super::usage`] writes; and the per-tenant gauges of `/metrics`.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row;

use super::tenancy::resolve;
use super::{Result, Store};
use crate::period::Period;
use crate::plans::{Meter, Overage, Plan, Plans};

/// One meter of a tenant's period.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MeterUsage {
    /// `runs`, `steps`, `llm_tokens`, `approval_decisions`.
    pub meter: String,
    /// Used in the period.
    pub used: i64,
    /// The allowance of the plan in force (now, or at the end of a past
    /// period); absent when the meter is unlimited.
    pub allowance: Option<i64>,
    /// `allowance − used`, at least 0; absent when unlimited.
    pub remaining: Option<i64>,
    /// `used − allowance`, at least 0.
    pub overage: i64,
    /// `block` or `allow`; absent when unlimited.
    pub overage_policy: Option<String>,
    /// Price of one unit past the allowance: that of the last plan of the
    /// period whose overage policy for this meter is `allow` (else of the
    /// plan in force). With one plan in the period, `preview` is
    /// `billable_overage × unit_price`; across plan changes each unit is
    /// priced at the plan it was used under (see `preview`).
    pub unit_price: f64,
    /// The allowances of the plans that limited this meter during the
    /// period, each prorated by the time it was in force (equals
    /// `allowance` without a plan change; a time on an unlimited plan adds
    /// nothing); absent when no plan of the period limited it.
    pub prorated_allowance: Option<f64>,
    /// Units billed past the allowances: at each plan of the period, the
    /// larger of the overage so far and (usage under limiting plans so far
    /// − ⌈their prorated allowances so far⌉). Usage under a plan that does
    /// not limit the meter is not billed, and overage accrued before a plan
    /// change is never taken back. Equals `used − ⌈prorated_allowance⌉`
    /// (at least 0) with one plan.
    pub billable_overage: i64,
    /// The billable overage, each unit at the `unit_price` of the plan in
    /// force when it became billable, rounded to 6 decimals.
    pub preview: f64,
}

/// A plan in force during part of a period.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PlanSegment {
    /// The plan.
    pub plan: String,
    /// From (ms since the epoch, database clock).
    pub from: i64,
    /// Until (exclusive).
    pub until: i64,
}

/// A warning threshold reached in the period.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ThresholdReached {
    /// The meter.
    pub meter: String,
    /// The fraction of the allowance (`0.8`, `1.0`).
    pub threshold: String,
    /// Usage when it was reached.
    pub used: i64,
    /// The allowance in force when it was reached: a threshold is reached
    /// once per allowance, so after an upgrade the new allowance's
    /// thresholds are reached (and listed) too.
    pub allowance: i64,
    /// The run that reached it.
    pub run_id: Option<String>,
    /// When (ms, database clock).
    pub crossed_at: i64,
}

/// A tenant's usage in one period.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    /// The tenant.
    pub tenant: String,
    /// `YYYY-MM`.
    pub period: String,
    /// When the period's allowances reset (RFC 3339).
    pub resets_at: String,
    /// The plan in force (now, or at the end of a past period); absent
    /// without plans.
    pub plan: Option<String>,
    /// The plans in force during the period, in order.
    pub plan_segments: Vec<PlanSegment>,
    /// Every meter.
    pub meters: Vec<MeterUsage>,
    /// Sum of the meters' previews.
    pub preview_total: f64,
    /// Warning thresholds reached.
    pub thresholds: Vec<ThresholdReached>,
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// A plan in force during part of a period, with what was used meanwhile:
/// the input of [`meter_usage`].
#[derive(Debug, Clone)]
pub(crate) struct BilledSegment<'a> {
    /// The plan (`None` without plans).
    pub(crate) plan: Option<&'a Plan>,
    /// From (ms, database clock).
    pub(crate) from: i64,
    /// Until (exclusive).
    pub(crate) until: i64,
    /// Units used while this plan was in force, per meter.
    pub(crate) used: BTreeMap<Meter, i64>,
}

/// Builds the meters of a report from the counters and the plan segments
/// (pure: the billing rules in one place).
///
/// The invoice preview bills usage under the terms of the plan in force
/// when it was used, and nothing once owed disappears. Walking the segments
/// in time order, for each meter:
/// - a segment whose plan limits the meter adds its allowance prorated by
///   its share of the month to the allowance so far, and its usage to the
///   usage so far; the billable overage becomes the larger of what it was
///   and `usage so far − ⌈allowance so far⌉`, and what this adds is priced
///   at that plan's `unit_price`;
/// - a segment whose plan does not limit the meter (unlimited) bills
///   nothing for what was used during it, and takes nothing away from the
///   overage already accrued.
///
/// Unused allowance carries forward within the month (an upgrade does not
/// bill usage the prorated allowances together cover), overage never
/// carries back (a later upgrade, or an unlimited plan, does not erase it).
pub(crate) fn meter_usage(
    used: &BTreeMap<Meter, i64>,
    segments: &[BilledSegment<'_>],
    period_ms: i64,
) -> Vec<MeterUsage> {
    let last = segments.last().and_then(|s| s.plan);
    Meter::ALL
        .iter()
        .map(|&meter| {
            let used = used.get(&meter).copied().unwrap_or(0);
            let rule = last.and_then(|p| p.rule(meter));
            let mut allowance_so_far: Option<f64> = None;
            let mut used_so_far: i64 = 0;
            let mut billable: i64 = 0;
            let mut preview = 0.0;
            for segment in segments {
                let Some(r) = segment.plan.and_then(|p| p.rule(meter)) else {
                    continue;
                };
                let share = (segment.until - segment.from) as f64 / period_ms.max(1) as f64;
                let allowance =
                    round6(allowance_so_far.unwrap_or(0.0) + r.allowance as f64 * share);
                allowance_so_far = Some(allowance);
                used_so_far =
                    used_so_far.saturating_add(segment.used.get(&meter).copied().unwrap_or(0));
                let owed = billable.max(used_so_far - allowance.ceil() as i64);
                preview += (owed - billable) as f64 * r.unit_price;
                billable = owed;
            }
            // Overage is shown at the price of the last plan of the period
            // that allowed overage of this meter (the preview itself prices
            // each unit at the plan it was used under).
            let unit_price = segments
                .iter()
                .rev()
                .filter_map(|s| s.plan.and_then(|p| p.rule(meter)))
                .find(|r| r.overage == Overage::Allow)
                .or(rule)
                .map_or(0.0, |r| r.unit_price);
            MeterUsage {
                meter: meter.as_str().to_string(),
                used,
                allowance: rule.map(|r| r.allowance),
                remaining: rule.map(|r| (r.allowance - used).max(0)),
                overage: rule.map_or(0, |r| (used - r.allowance).max(0)),
                overage_policy: rule.map(|r| r.overage.as_str().to_string()),
                unit_price,
                prorated_allowance: allowance_so_far,
                billable_overage: billable,
                preview: round6(preview),
            }
        })
        .collect()
}

impl Store {
    /// Per meter, the ledger's units of `tenant` in `period` stamped before
    /// `until` (ms, database clock): the usage under each plan of a period
    /// with plan changes.
    async fn ledger_sums_before(
        &self,
        tenant: &str,
        period: &str,
        until: i64,
    ) -> Result<BTreeMap<Meter, i64>> {
        let rows = sqlx::query(
            "SELECT meter, CAST(SUM(quantity) AS BIGINT) AS used FROM usage_ledger \
             WHERE tenant = $1 AND period = $2 AND at < $3 GROUP BY meter",
        )
        .bind(tenant)
        .bind(period)
        .bind(until)
        .fetch_all(self.pool())
        .await?;
        let mut out = BTreeMap::new();
        for row in &rows {
            if let Some(m) = Meter::parse(&row.try_get::<String, _>("meter")?) {
                out.insert(m, row.try_get::<i64, _>("used")?);
            }
        }
        Ok(out)
    }

    /// Used per meter of `tenant` in `period` (the counters).
    pub async fn usage_counts(&self, tenant: &str, period: &str) -> Result<BTreeMap<Meter, i64>> {
        let rows = sqlx::query(
            "SELECT meter, CAST(SUM(used) AS BIGINT) AS used FROM usage_counters \
                 WHERE tenant = $1 AND period = $2 GROUP BY meter",
        )
        .bind(tenant)
        .bind(period)
        .fetch_all(self.pool())
        .await?;
        let mut out = BTreeMap::new();
        for row in &rows {
            let meter: String = row.try_get("meter")?;
            if let Some(m) = Meter::parse(&meter) {
                out.insert(m, row.try_get::<i64, _>("used")?);
            }
        }
        Ok(out)
    }

    /// Tenants with usage in `period`, in name order.
    pub async fn tenants_with_usage(&self, period: &str) -> Result<Vec<String>> {
        sqlx::query("SELECT DISTINCT tenant FROM usage_counters WHERE period = $1 ORDER BY tenant")
            .bind(period)
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(|r| Ok(r.try_get("tenant")?))
            .collect()
    }

    /// The plans in force for `tenant` during `period`, with their bounds
    /// (clipped to the period and to the database's now for the current
    /// period's preview denominator, which stays the whole month).
    async fn plan_segments(
        &self,
        plans: &Plans,
        tenant: &str,
        period: Period,
    ) -> Result<Vec<(String, i64, i64)>> {
        let (start, end) = (period.start_ms(), period.end_ms());
        let changes = self.plan_changes(tenant).await?;
        let before = changes
            .iter()
            .rev()
            .find(|c| c.changed_at < start)
            .map(|c| c.plan.as_str());
        let mut current = resolve(plans, before, tenant).map(|p| p.name.clone());
        let mut from = start;
        let mut out = Vec::new();
        for c in changes
            .iter()
            .filter(|c| c.changed_at >= start && c.changed_at < end)
        {
            if let Some(plan) = current.take()
                && c.changed_at > from
            {
                out.push((plan, from, c.changed_at));
            }
            from = c.changed_at;
            current = resolve(plans, Some(&c.plan), tenant).map(|p| p.name.clone());
        }
        if let Some(plan) = current {
            out.push((plan, from, end));
        }
        Ok(out)
    }

    /// `tenant`'s usage in `period`: per meter used, allowance, remaining,
    /// overage and the invoice preview (allowances prorated by the time each
    /// plan was in force), and the thresholds reached.
    pub async fn usage_report(&self, tenant: &str, period: Period) -> Result<UsageReport> {
        let name = period.to_string();
        let used = self.usage_counts(tenant, &name).await?;
        let plans = self.plans();
        let segments = match &plans {
            Some(plans) => self.plan_segments(plans, tenant, period).await?,
            None => Vec::new(),
        };
        let mut billed = Vec::with_capacity(segments.len());
        let mut before = BTreeMap::new();
        for (i, (plan, from, until)) in segments.iter().enumerate() {
            // Usage up to the end of this segment: the ledger's rows stamped
            // before it ends, and all of the counters for the last one (so
            // rows stamped outside the month, imports, count in the last).
            let upto = if i + 1 == segments.len() {
                used.clone()
            } else {
                self.ledger_sums_before(tenant, &name, *until).await?
            };
            let during = Meter::ALL
                .iter()
                .map(|m| {
                    let (now, then) = (
                        upto.get(m).copied().unwrap_or(0),
                        before.get(m).copied().unwrap_or(0),
                    );
                    (*m, (now - then).max(0))
                })
                .collect();
            before = upto;
            billed.push(BilledSegment {
                plan: plans.as_ref().and_then(|p| p.plan(plan)),
                from: *from,
                until: *until,
                used: during,
            });
        }
        let meters = meter_usage(&used, &billed, period.end_ms() - period.start_ms());
        let thresholds = sqlx::query(
            "SELECT meter, threshold, used, allowance, run_id, crossed_at FROM usage_warnings \
             WHERE tenant = $1 AND period = $2 ORDER BY crossed_at, meter, allowance, threshold",
        )
        .bind(tenant)
        .bind(&name)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(ThresholdReached {
                meter: r.try_get("meter")?,
                threshold: r.try_get("threshold")?,
                used: r.try_get("used")?,
                allowance: r.try_get("allowance")?,
                run_id: r.try_get("run_id")?,
                crossed_at: r.try_get("crossed_at")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(UsageReport {
            tenant: tenant.to_string(),
            period: name,
            resets_at: period.resets_at(),
            plan: segments.last().map(|(p, _, _)| p.clone()),
            plan_segments: segments
                .iter()
                .map(|(plan, from, until)| PlanSegment {
                    plan: plan.clone(),
                    from: *from,
                    until: *until,
                })
                .collect(),
            preview_total: round6(meters.iter().map(|m| m.preview).sum()),
            meters,
            thresholds,
        })
    }

    /// Used and allowance per tenant and meter in the current period, for
    /// the gauges: (tenant, meter, used, allowance or `None` if unlimited).
    pub async fn usage_gauges(&self) -> Result<Vec<(String, Meter, i64, Option<i64>)>> {
        let rows = sqlx::query(&self.sql(
            "SELECT tenant, meter, CAST(SUM(used) AS BIGINT) AS used FROM usage_counters \
             WHERE period = {period} GROUP BY tenant, meter ORDER BY tenant",
        ))
        .fetch_all(self.pool())
        .await?;
        let plans = self.plans();
        // The newest API assignment of every tenant, in one query.
        let mut assigned: BTreeMap<String, String> = BTreeMap::new();
        if plans.is_some() {
            for row in sqlx::query(
                "SELECT tenant, plan FROM tenant_plan_changes c \
                 WHERE id = (SELECT MAX(id) FROM tenant_plan_changes WHERE tenant = c.tenant)",
            )
            .fetch_all(self.pool())
            .await?
            {
                assigned.insert(row.try_get("tenant")?, row.try_get("plan")?);
            }
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let tenant: String = row.try_get("tenant")?;
            let Some(meter) = Meter::parse(&row.try_get::<String, _>("meter")?) else {
                continue;
            };
            let allowance = plans
                .as_ref()
                .and_then(|p| resolve(p, assigned.get(&tenant).map(String::as_str), &tenant))
                .and_then(|p| p.rule(meter))
                .map(|r| r.allowance);
            out.push((tenant, meter, row.try_get("used")?, allowance));
        }
        Ok(out)
    }
}
