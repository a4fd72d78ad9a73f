//! Writes of one pass: apply a child when the cached live object differs from the desired
//! one (server-side apply, one field manager, forced), delete children that are no longer
//! wanted, and record what was written and what the API server refused.

use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use tracing::warn;

use super::caches::Child;
use super::drift::is_subset;
use super::error::{Error, refusal};
use super::pass::Pass;
use crate::builders;
use crate::consts;
use crate::metrics::KindLabels;

impl Pass<'_> {
    /// The namespaced API of `K` in the resource's namespace.
    pub(super) fn api<K: Child>(&self) -> Api<K> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    /// The cached live child `name` of kind `K`.
    pub(super) fn cached<K: Child>(&self, name: &str) -> Option<std::sync::Arc<K>> {
        self.ctx.caches.get::<K>(&self.ns, name)
    }

    /// Apply `desired` unless the cached child already matches; see [`Self::ensure_against`].
    pub(super) async fn ensure<K: Child>(&self, desired: &K) -> Result<Option<K>, Error> {
        let live = self.cached::<K>(&desired.name_any());
        self.ensure_against(desired, live.as_deref()).await
    }

    /// Apply `desired` unless `live` already carries the same applied-hash and every desired
    /// field (compared as the API server stores them, see [`is_subset`]). Returns the object
    /// the server answered with when it wrote; `None` when nothing was written or the write
    /// was refused (then recorded, see [`Self::refused_or`]).
    pub(super) async fn ensure_against<K: Child>(
        &self,
        desired: &K,
        live: Option<&K>,
    ) -> Result<Option<K>, Error> {
        if let Some(live) = live
            && builders::applied_hash(live) == builders::applied_hash(desired)
            && is_subset(
                &serde_json::to_value(desired)?,
                &serde_json::to_value(live)?,
            )
        {
            return Ok(None);
        }
        self.apply(desired).await
    }

    /// Server-side apply of `desired` under the operator's field manager.
    pub(super) async fn apply<K: Child>(&self, desired: &K) -> Result<Option<K>, Error> {
        let name = desired.name_any();
        let params = PatchParams::apply(consts::FIELD_MANAGER).force();
        match self
            .api::<K>()
            .patch(&name, &params, &Patch::Apply(desired))
            .await
        {
            Ok(returned) => {
                self.wrote(K::KIND, format!("{}/{name}", K::KIND));
                Ok(Some(returned))
            }
            Err(e) => self.refused_or(K::KIND, &name, e).map(|()| None),
        }
    }

    /// Delete the child `name` of kind `K` (in the background: its dependents follow).
    pub(super) async fn delete<K: Child>(&self, name: &str, note: String) -> Result<(), Error> {
        match self
            .api::<K>()
            .delete(name, &DeleteParams::background())
            .await
        {
            Ok(_) => {
                self.wrote(K::KIND, note);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => self.refused_or(K::KIND, name, e),
        }
    }

    /// A write that the API server refused for good is recorded (status, event, metric) and
    /// the pass goes on; anything else is handed back so the pass fails and is retried.
    pub(super) fn refused_or(
        &self,
        kind: &'static str,
        name: &str,
        err: kube::Error,
    ) -> Result<(), Error> {
        let Some(mut r) = refusal(&format!("{kind}/{name}"), &err) else {
            return Err(err.into());
        };
        r.message = self.scrub(&r.message);
        self.ctx
            .metrics
            .refused
            .get_or_create(&KindLabels { kind })
            .inc();
        warn!(child = %r.child, code = r.code, reason = %r.reason, message = %r.message, "the API server refused a write");
        if let Ok(mut refused) = self.refused.lock() {
            refused.push(r);
        }
        Ok(())
    }

    /// Count a write of `kind` and remember `note` for the `Applied` event.
    pub(super) fn wrote(&self, kind: &'static str, note: String) {
        self.ctx
            .metrics
            .writes
            .get_or_create(&KindLabels { kind })
            .inc();
        if let Ok(mut written) = self.written.lock() {
            written.push(note);
        }
    }

    /// Whether the resource is the controlling owner of `obj`.
    pub(super) fn owns<K: Resource>(&self, obj: &K) -> bool {
        let uid = self.app.metadata.uid.as_deref();
        obj.owner_references()
            .iter()
            .any(|o| Some(o.uid.as_str()) == uid && o.controller == Some(true))
    }
}
