//! Tenants: which runs a caller may see ([`Scope`], the one filter every
//! run route applies), and which plan a tenant is on.
//!
//! A tenant's plan is, in order: its newest assignment made through the API
//! (`tenant_plan_changes`, append-only, stamped with the database clock),
//! when that plan still exists in the plans file; else the file's `tenants`
//! map; else the file's `default_plan`. Without a plans file there is no
//! plan and nothing is limited.

use sqlx::{AnyConnection, Row};
use uuid::Uuid;

use super::{Result, Store};
use crate::plans::{Plan, Plans};

/// Which tenants' runs a caller may see. Store reads that take a scope
/// answer "not found" for a run outside it, so another tenant's run is
/// indistinguishable from a missing one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant (admin keys, and the open local mode).
    All,
    /// Only this tenant's runs.
    Tenant(String),
}

impl Scope {
    /// Whether a run of `tenant` is visible in this scope.
    pub fn admits(&self, tenant: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(t) => t == tenant,
        }
    }

    /// The one tenant this scope is limited to, if any.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Tenant(t) => Some(t),
        }
    }
}

/// One plan assignment made through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanChange {
    /// The plan assigned.
    pub plan: String,
    /// From when, database clock, ms since the Unix epoch.
    pub changed_at: i64,
    /// The admin key id that made it.
    pub changed_by: String,
}

/// The plan of `tenant` given its newest API assignment `assigned`.
pub(crate) fn resolve<'a>(
    plans: &'a Plans,
    assigned: Option<&str>,
    tenant: &str,
) -> Option<&'a Plan> {
    assigned
        .and_then(|name| plans.plan(name))
        .or_else(|| plans.plan(plans.file_plan_of(tenant)))
}

/// The newest API assignment of `tenant`, read on `conn` (inside the
/// caller's transaction when it has one).
pub(crate) async fn assigned_plan(
    conn: &mut AnyConnection,
    tenant: &str,
) -> Result<Option<String>> {
    Ok(sqlx::query(
        "SELECT plan FROM tenant_plan_changes WHERE tenant = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(tenant)
    .fetch_optional(conn)
    .await?
    .map(|r| r.try_get::<String, _>("plan"))
    .transpose()?)
}

impl Store {
    /// Installs the validated plans (`VM_PLANS_FILE`); `None` removes every
    /// limit. Shared by every clone of this store, including its
    /// group-commit writers.
    pub fn with_plans(self, plans: Option<std::sync::Arc<Plans>>) -> Self {
        *self.usage.plans.write().unwrap_or_else(|p| p.into_inner()) = plans;
        self
    }

    /// The installed plans, if any.
    pub fn plans(&self) -> Option<std::sync::Arc<Plans>> {
        self.usage
            .plans
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The tenant that owns run `id`, or `None` when there is no such run.
    pub async fn run_tenant(&self, id: Uuid) -> Result<Option<String>> {
        Ok(sqlx::query("SELECT tenant FROM runs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?
            .map(|r| r.try_get::<String, _>("tenant"))
            .transpose()?)
    }

    /// Whether run `id` exists and `scope` may see it: the check every run
    /// route makes before touching a run (routes answer 404 when false).
    pub async fn run_visible(&self, id: Uuid, scope: &Scope) -> Result<bool> {
        Ok(self
            .run_tenant(id)
            .await?
            .is_some_and(|tenant| scope.admits(&tenant)))
    }

    /// The plan `tenant` is on now, or `None` without plans.
    pub async fn plan_of(&self, tenant: &str) -> Result<Option<Plan>> {
        let Some(plans) = self.plans() else {
            return Ok(None);
        };
        let mut conn = self.pool().acquire().await?;
        let assigned = assigned_plan(&mut conn, tenant).await?;
        Ok(resolve(&plans, assigned.as_deref(), tenant).cloned())
    }

    /// Puts `tenant` on `plan` from the database's now on, and writes the
    /// `tenant.plan_changed` audit row by `actor` in the same transaction.
    /// Usage so far stays; the caller has checked that `plan` exists.
    /// Returns the time of the change (database clock, ms).
    pub async fn assign_plan(
        &self,
        tenant: &str,
        plan: &str,
        actor: &str,
        request_id: Option<&str>,
    ) -> Result<i64> {
        let before = self.plan_of(tenant).await?.map(|p| p.name);
        let mut tx = self.begin().await?;
        let at: i64 = sqlx::query(&self.sql(
            "INSERT INTO tenant_plan_changes (tenant, plan, changed_at, changed_by) \
             VALUES ($1, $2, {now}, $3) RETURNING changed_at",
        ))
        .bind(tenant)
        .bind(plan)
        .bind(actor)
        .fetch_one(&mut *tx)
        .await?
        .try_get("changed_at")?;
        sqlx::query(&self.sql(
            "INSERT INTO audit_log (at, actor, action, target, outcome, request_id, detail, tenant) \
             VALUES ({now}, $1, 'tenant.plan_changed', $2, 'success', $3, $4, $2)",
        ))
        .bind(actor)
        .bind(tenant)
        .bind(request_id)
        .bind(serde_json::json!({"from": before, "to": plan}).to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(at)
    }

    /// The API's plan assignments of `tenant`, oldest first.
    pub async fn plan_changes(&self, tenant: &str) -> Result<Vec<PlanChange>> {
        sqlx::query(
            "SELECT plan, changed_at, changed_by FROM tenant_plan_changes WHERE tenant = $1 ORDER BY id",
        )
        .bind(tenant)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(PlanChange {
                plan: r.try_get("plan")?,
                changed_at: r.try_get("changed_at")?,
                changed_by: r.try_get("changed_by")?,
            })
        })
        .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_admits_its_tenant_only_and_all_admits_everyone() {
        let acme = Scope::Tenant("acme".into());
        assert!(acme.admits("acme"));
        assert!(!acme.admits("globex"));
        assert!(Scope::All.admits("globex"));
    }

    #[test]
    fn an_assignment_to_a_plan_the_file_no_longer_has_falls_back_to_the_file() {
        let plans = Plans::parse(
            "default_plan: free\nplans:\n  free: {}\n  pro: {}\ntenants:\n  acme: pro\n",
        )
        .unwrap();
        assert_eq!(resolve(&plans, Some("gone"), "acme").unwrap().name, "pro");
        assert_eq!(resolve(&plans, Some("free"), "acme").unwrap().name, "free");
        assert_eq!(resolve(&plans, None, "other").unwrap().name, "free");
    }
}
