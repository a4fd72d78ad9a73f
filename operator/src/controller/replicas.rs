//! Replicas: who owns a Deployment's `spec.replicas`, and when a write counts as a rollout.
//!
//! Without autoscaling the operator applies `replicas` from the spec. With autoscaling the
//! HPA owns the field: a Deployment is created at `minReplicas` (the builders do that when
//! it does not exist yet, so a first install never runs and reports one pod below what the
//! spec asks for), and the operator's later applies leave the field out. When autoscaling is
//! turned on for a Deployment whose `replicas` the operator still holds, the live count is
//! first handed to a second field manager, so that dropping the field from the operator's
//! apply does not reset the Deployment to the default of 1.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::{Resource, ResourceExt};

use super::caches::Child;
use super::error::Error;
use super::pass::Pass;
use crate::consts;

impl Pass<'_> {
    /// When `desired` has no `replicas` but the operator still owns the live field, apply the
    /// live `replicas` under [`consts::REPLICAS_HANDOVER_MANAGER`] first.
    pub(super) async fn hand_over_replicas(
        &self,
        desired: &Deployment,
        live: Option<&Deployment>,
    ) -> Result<(), Error> {
        let Some(live) = live else { return Ok(()) };
        let replicas = live.spec.as_ref().and_then(|s| s.replicas);
        let wants = desired.spec.as_ref().and_then(|s| s.replicas);
        let (None, Some(replicas)) = (wants, replicas) else {
            return Ok(());
        };
        if !manages_replicas(live, consts::FIELD_MANAGER) {
            return Ok(());
        }
        let name = desired.name_any();
        let body = serde_json::json!({
            "apiVersion": Deployment::api_version(&()),
            "kind": Deployment::kind(&()),
            "metadata": {"name": name},
            "spec": {"replicas": replicas},
        });
        let params = PatchParams::apply(consts::REPLICAS_HANDOVER_MANAGER).force();
        match self
            .api::<Deployment>()
            .patch(&name, &params, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                self.wrote(
                    Deployment::KIND,
                    format!("Deployment/{name} (replicas handed to the HPA)"),
                );
                Ok(())
            }
            Err(e) => self.refused_or(Deployment::KIND, &name, e),
        }
    }
}

/// Whether an apply that answered `returned` changed the Deployment that was `live`:
/// created it, or moved its `metadata.generation` (the API server bumps it only when the
/// spec really changed). A server answer without a generation counts as a change.
pub(super) fn rolled(live: Option<&Deployment>, returned: Option<&Deployment>) -> bool {
    match (live, returned) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(l), Some(r)) => {
            r.metadata.generation.is_none() || l.metadata.generation != r.metadata.generation
        }
    }
}

/// Whether `manager` holds `spec.replicas` of `deployment` through server-side apply,
/// according to its `managedFields`.
pub fn manages_replicas(deployment: &Deployment, manager: &str) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.manager.as_deref() == Some(manager) && m.operation.as_deref() == Some("Apply")
        })
        .filter_map(|m| m.fields_v1.as_ref())
        .any(|f| f.0.pointer("/f:spec/f:replicas").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replicas_are_ours_only_when_our_apply_entry_lists_them() {
        let with = |manager: &str, operation: &str, fields: serde_json::Value| {
            serde_json::from_value::<Deployment>(json!({"metadata": {"name": "d", "managedFields": [
                {"manager": manager, "operation": operation, "fieldsType": "FieldsV1", "fieldsV1": fields}
            ]}}))
            .expect("deployment")
        };
        let replicas = json!({"f:spec": {"f:replicas": {}, "f:template": {}}});
        assert!(manages_replicas(
            &with("vm-operator", "Apply", replicas.clone()),
            "vm-operator"
        ));
        assert!(!manages_replicas(
            &with("vm-operator-replicas-handover", "Apply", replicas.clone()),
            "vm-operator"
        ));
        assert!(!manages_replicas(
            &with("vm-operator", "Update", replicas),
            "vm-operator"
        ));
        assert!(!manages_replicas(
            &with(
                "vm-operator",
                "Apply",
                json!({"f:spec": {"f:template": {}}})
            ),
            "vm-operator"
        ));
    }

    #[test]
    fn only_a_moved_generation_counts_as_a_rollout() {
        let at = |g: Option<i64>| {
            let mut d = Deployment::default();
            d.metadata.generation = g;
            d
        };
        assert!(!rolled(Some(&at(Some(3))), None), "no write");
        assert!(rolled(None, Some(&at(Some(1)))), "created");
        assert!(
            !rolled(Some(&at(Some(3))), Some(&at(Some(3)))),
            "a no-op apply"
        );
        assert!(
            rolled(Some(&at(Some(3))), Some(&at(Some(4)))),
            "spec changed"
        );
    }
}
