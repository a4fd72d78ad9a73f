//! Events on the `VmWebapp` for what a person should see: one Normal `Applied` event per
//! pass that wrote something, a Warning when `Degraded` turns on or changes (a missing
//! Secret, a failed migration, a refused write, an API server that keeps failing), Normal
//! `MigrationStarted` and `Ready`. Events are best effort: a failure to publish is logged
//! and never fails the pass. Notes carry names and the API server's messages, never a
//! Secret value.

use kube::Resource;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use super::pass::Pass;
use crate::consts::{condition, reason};
use crate::crd::VmWebappStatus;
use crate::status;

impl Pass<'_> {
    /// The Normal `Applied` event listing this pass's writes, if it wrote anything.
    pub(super) async fn applied_event(&self) {
        let written = self.written.lock().map(|w| w.clone()).unwrap_or_default();
        if written.is_empty() {
            return;
        }
        let mut note = format!("applied {}", written.join(", "));
        truncate(&mut note, 1000); // events.k8s.io notes are limited to 1 kB
        self.publish(EventType::Normal, "Applied", "Reconcile", note)
            .await;
    }

    /// Events for the condition transitions from `previous` to `new`.
    pub(super) async fn transition_events(
        &self,
        previous: Option<&VmWebappStatus>,
        new: &VmWebappStatus,
    ) {
        let before = status::find(previous, condition::DEGRADED);
        if let Some(d) = status::find(Some(new), condition::DEGRADED)
            && d.status == "True"
            && before.is_none_or(|b| {
                b.status != "True" || b.reason != d.reason || b.message != d.message
            })
        {
            self.publish(
                EventType::Warning,
                &d.reason,
                "Reconcile",
                d.message.clone(),
            )
            .await;
        }
        let progressing = status::find(Some(new), condition::PROGRESSING);
        let was = status::find(previous, condition::PROGRESSING);
        if let Some(p) = progressing
            && p.reason == reason::MIGRATION_RUNNING
            && was.is_none_or(|w| w.reason != p.reason)
        {
            self.publish(
                EventType::Normal,
                "MigrationStarted",
                "Migrate",
                p.message.clone(),
            )
            .await;
        }
        let ready = status::find(Some(new), condition::READY);
        let was_ready = status::find(previous, condition::READY);
        if let Some(r) = ready
            && r.status == "True"
            && was_ready.is_none_or(|w| w.status != "True")
        {
            self.publish(EventType::Normal, "Ready", "Reconcile", r.message.clone())
                .await;
        }
    }

    /// Events are best effort: a failure is logged, never fails the pass.
    pub(super) async fn publish(&self, type_: EventType, reason: &str, action: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&event, &self.app.object_ref(&()))
            .await
        {
            warn!(error = %e, reason, "cannot publish event");
        }
    }
}

/// Cut `s` to at most `max` bytes on a character boundary.
pub(super) fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_event_notes_are_cut_on_a_character_boundary() {
        let mut s = "é".repeat(600);
        truncate(&mut s, 1000);
        assert_eq!(s.len(), 1000);
        let mut odd = format!("a{}", "é".repeat(600));
        truncate(&mut odd, 1000);
        assert_eq!(odd.len(), 999);
    }
}
