//! Migration gating: the Deployments move to a new `spec.image` only after `vm-webapp
//! migrate` succeeded with that image in a Job. The Job is read from the cache; it is
//! created when absent, given a TTL once it succeeded (failed Jobs stay for the post-mortem
//! and so that the same image and generation are not retried in a loop), and replaced once
//! the resource's generation has moved on ("the next change retries").

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use tracing::info;

use super::caches::Child;
use super::error::Error;
use super::pass::Pass;
use crate::builders;
use crate::consts::annotations;
use crate::status::Migration;

impl Pass<'_> {
    /// Where the migration Job for `spec.image` stands.
    pub(super) async fn migrate(&self, desired: &Job) -> Result<Migration, Error> {
        let name = desired.name_any();
        let Some(live) = self.cached::<Job>(&name) else {
            if self.apply(desired).await?.is_some() {
                info!(job = %name, image = %self.app.spec.image, "migration job created");
            }
            return Ok(Migration::Running);
        };
        let status = live.status.clone().unwrap_or_default();
        let has = |t: &str| {
            status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == t && c.status == "True")
        };
        if has("Complete") || status.succeeded.unwrap_or(0) > 0 {
            // Jobs are created without a TTL so that failed ones stay; a succeeded one is
            // only kept for a while (the field is mutable, the template is not).
            if live
                .spec
                .as_ref()
                .and_then(|s| s.ttl_seconds_after_finished)
                .is_none()
            {
                let ttl = serde_json::json!({
                    "spec": {"ttlSecondsAfterFinished": builders::SUCCEEDED_JOB_TTL_SECONDS}
                });
                match self
                    .api::<Job>()
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&ttl))
                    .await
                {
                    Ok(_) => self.wrote(Job::KIND, format!("Job/{name} (expiry after success)")),
                    Err(e) => self.refused_or(Job::KIND, &name, e)?,
                }
            }
            return Ok(Migration::Succeeded);
        }
        if has("Failed") {
            let created_for = live
                .annotations()
                .get(annotations::MIGRATION_GENERATION)
                .cloned();
            let current = self.app.metadata.generation.unwrap_or_default().to_string();
            if created_for.as_deref() != Some(current.as_str()) {
                self.delete::<Job>(&name, format!("deleted failed Job/{name} to retry"))
                    .await?;
                return Ok(Migration::Running);
            }
            return Ok(Migration::Failed { job: name });
        }
        Ok(Migration::Running)
    }
}
