//! `vm-operator render` and `vm-operator crd`: the builders' and the CRD's output as YAML,
//! without a cluster.
//!
//! Render reads a `VmWebapp` manifest and, optionally, Secret manifests and the plans
//! ConfigMap. The pod-template config hash covers the ConfigMap data, the data of every
//! referenced Secret key and the plans; keys of Secrets that were not given hash as
//! "unknown", so the hash printed offline equals the one a reconcile computes only when the
//! same objects are passed with `--secret` and `--config-map`. Owner
//! references need the live object's `metadata.uid`: they are printed only when the input
//! manifest carries one.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::CustomResourceExt;

use crate::builders::{self, BuildError, Inputs};
use crate::crd::VmWebapp;

/// Why rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The input is not a valid `VmWebapp` (or Secret) manifest.
    #[error("invalid manifest: {0}")]
    Parse(#[from] serde_yaml::Error),
    /// Serialising an object failed.
    #[error("cannot serialise object: {0}")]
    Json(#[from] serde_json::Error),
    /// The builders rejected the resource.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// The CRD as YAML, exactly as checked in under `crds/`.
pub fn crd_yaml() -> Result<String, RenderError> {
    Ok(serde_yaml::to_string(&VmWebapp::crd())?)
}

/// Render the children of the `VmWebapp` in `manifest` as a multi-document YAML stream, in
/// apply order. `referenced` are Secret and ConfigMap manifests (told apart by `kind`) whose
/// data feeds the config hash; a ConfigMap counts only when `spec.plans` names it.
pub fn render(manifest: &str, referenced: &[String]) -> Result<String, RenderError> {
    let mut app: VmWebapp = serde_yaml::from_str(manifest)?;
    if app.metadata.namespace.is_none() {
        app.metadata.namespace = Some("default".to_owned());
    }
    let mut known: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
    let mut plans = None;
    for s in referenced {
        let kind: serde_yaml::Value = serde_yaml::from_str(s)?;
        if kind.get("kind").and_then(serde_yaml::Value::as_str) == Some("ConfigMap") {
            let cm: ConfigMap = serde_yaml::from_str(s)?;
            if let Some(r) = &app.spec.plans
                && cm.metadata.name.as_deref() == Some(r.name.as_str())
            {
                plans = cm.data.and_then(|mut d| d.remove(&r.key));
            }
            continue;
        }
        let secret: Secret = serde_yaml::from_str(s)?;
        let name = secret.metadata.name.clone().unwrap_or_default();
        for (k, v) in secret.data.into_iter().flatten() {
            known.insert((name.clone(), k), v.0);
        }
        for (k, v) in secret.string_data.into_iter().flatten() {
            known.insert((name.clone(), k), v.into_bytes());
        }
    }
    let mut inputs = Inputs::offline(&app);
    for (key, value) in inputs.secret_data.iter_mut() {
        *value = known.get(key).cloned();
    }
    inputs.plans = plans;
    let desired = builders::build(&app, &inputs)?;
    let mut out = String::new();
    for obj in desired.objects()? {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&obj)?);
    }
    Ok(out)
}
