//! Status computation: what the reconcile observed in, `VmWebappStatus` out. Pure and
//! deterministic: `lastTransitionTime` is carried over from the previous status while a
//! condition's status is unchanged, so a steady state computes an identical status and the
//! controller writes nothing (no hot loop through its own status writes).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::consts::{condition, reason};
use crate::crd::VmWebappStatus;

/// Where the migration for `spec.image` stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Migration {
    /// Nothing to migrate: disabled, or the Deployments already run `spec.image`.
    #[default]
    NotNeeded,
    /// The Job for `spec.image` is running (or was just created).
    Running,
    /// The Job for `spec.image` succeeded; the Deployments move to it now.
    Succeeded,
    /// The Job for `spec.image` failed; the old image keeps serving.
    Failed {
        /// Name of the failed Job.
        job: String,
    },
}

/// Rollout facts of one Deployment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rollout {
    /// Whether the Deployment exists.
    pub exists: bool,
    /// Pods ready.
    pub ready: i32,
    /// Pods available (ready for `minReadySeconds`).
    pub available: i32,
    /// Whether the Deployment controller has finished rolling out its current template.
    pub complete: bool,
    /// Whether every pod runs the current template (no old ReplicaSet left), even while an
    /// autoscaler is still adding pods: scaling is not a rollout.
    pub settled: bool,
    /// Image of its first container.
    pub image: Option<String>,
}

impl Rollout {
    /// Facts of a live Deployment (or of none).
    pub fn of(d: Option<&Deployment>) -> Self {
        let Some(d) = d else { return Self::default() };
        let status = d.status.clone().unwrap_or_default();
        let spec = d.spec.as_ref();
        let wanted = spec
            .and_then(|s| s.replicas)
            .unwrap_or(status.replicas.unwrap_or(0));
        let seen = status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
        let updated = status.updated_replicas.unwrap_or(0);
        let available = status.available_replicas.unwrap_or(0);
        let total = status.replicas.unwrap_or(0);
        Self {
            exists: true,
            ready: status.ready_replicas.unwrap_or(0),
            available,
            complete: seen && updated == wanted && available == wanted && total == wanted,
            settled: seen && updated == total,
            image: spec
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|p| p.containers.first())
                .and_then(|c| c.image.clone()),
        }
    }
}

/// Everything one reconcile pass observed or did that the status reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `metadata.generation` of the resource.
    pub generation: Option<i64>,
    /// `spec.image`.
    pub spec_image: String,
    /// `spec.suspend`.
    pub suspended: bool,
    /// Missing Secrets or keys, as `secret/key` (names only, never values).
    pub missing_secrets: Vec<String>,
    /// The plans ConfigMap key (`spec.plans`) when it is missing, as `configmap/key`.
    pub missing_config_map: Option<String>,
    /// A spec mistake the schema could not catch.
    pub invalid_spec: Option<String>,
    /// Migration state for `spec.image`.
    pub migration: Migration,
    /// The API Deployment as last seen.
    pub api: Rollout,
    /// The worker Deployment as last seen.
    pub worker: Rollout,
    /// Whether this pass changed a Deployment (so a rollout has just started).
    pub deployments_changed: bool,
    /// Fewest API pods the spec asks for (`replicas`, or the HPA's `minReplicas`): never
    /// Ready below it.
    pub api_min_ready: i32,
    /// The same for the worker.
    pub worker_min_ready: i32,
    /// Writes the API server refused in this pass, as `Kind/name: message (HTTP code
    /// reason)`, with no Secret value.
    pub refused: Vec<String>,
    /// The last error of a streak of failed passes (transport, 5xx, 429), once it is
    /// long enough to report.
    pub api_errors: Option<String>,
    /// Scheduled backups as the CronJob reports them, when `spec.backup` is set.
    pub backup: Option<crate::crd::BackupStatus>,
}

/// Compute the status for `observed`, keeping transition times from `previous`.
pub fn compute(
    previous: Option<&VmWebappStatus>,
    observed: &Observed,
    now: Timestamp,
) -> VmWebappStatus {
    let o = observed;
    let degraded: Option<(&str, String)> = if let Some(msg) = &o.invalid_spec {
        Some((reason::INVALID_SPEC, msg.clone()))
    } else if let Some(missing) = &o.missing_config_map {
        Some((
            reason::CONFIG_MAP_MISSING,
            format!(
                "the plans ConfigMap key {missing} (spec.plans) was not found, or is not UTF-8 text; create it in this namespace (pods are not changed until it exists)"
            ),
        ))
    } else if !o.missing_secrets.is_empty() {
        Some((
            reason::SECRET_MISSING,
            format!(
                "referenced Secret keys not found: {}; create them in this namespace (pods are not changed until they exist)",
                o.missing_secrets.join(", ")
            ),
        ))
    } else if !o.refused.is_empty() {
        let mut message = format!(
            "the API server refused to apply {}. Fix the cause (quota, admission policy, LimitRange or spec); the operator retries with backoff and clears this condition once the write succeeds",
            o.refused.join("; ")
        );
        cut(&mut message, 4000);
        Some((reason::APPLY_FAILED, message))
    } else if let Migration::Failed { job } = &o.migration {
        Some((
            reason::MIGRATION_FAILED,
            format!(
                "migration Job {job} for image {} failed; the previous image keeps serving. Inspect `kubectl logs job/{job}`, then change the spec (or delete the Job) to retry",
                o.spec_image
            ),
        ))
    } else if let Some(error) = &o.api_errors {
        let mut message = format!(
            "reconcile passes keep failing on API errors; retrying with backoff. Last error: {error}"
        );
        cut(&mut message, 4000);
        Some((reason::API_ERRORS, message))
    } else {
        None
    };

    let below_minimum =
        o.api.available < o.api_min_ready || o.worker.available < o.worker_min_ready;
    let rolling = o.deployments_changed || !o.api.settled || !o.worker.settled || below_minimum;
    let progressing: (bool, &str, String) = if o.suspended {
        (
            false,
            reason::SUSPENDED,
            "spec.suspend is true: children are not changed".into(),
        )
    } else if degraded.is_some() {
        (
            false,
            degraded.as_ref().map_or(reason::AS_EXPECTED, |d| d.0),
            "blocked, see the Degraded condition".into(),
        )
    } else if o.migration == Migration::Running {
        (
            true,
            reason::MIGRATION_RUNNING,
            format!("migrating the database for image {}", o.spec_image),
        )
    } else if rolling && !o.deployments_changed && o.api.settled && o.worker.settled {
        (
            true,
            reason::ROLLING_OUT,
            format!(
                "waiting for pods: {} of {} API and {} of {} worker pods available",
                o.api.available, o.api_min_ready, o.worker.available, o.worker_min_ready
            ),
        )
    } else if rolling {
        (
            true,
            reason::ROLLING_OUT,
            "Deployments are rolling out".into(),
        )
    } else {
        (
            false,
            reason::RECONCILED,
            "all children are up to date".into(),
        )
    };

    let serving_current = o.api.image.as_deref() == Some(o.spec_image.as_str());
    let ready: (bool, &str, String) = if let Some((r, m)) = &degraded {
        (false, r, m.clone())
    } else if o.api.exists
        && o.worker.exists
        && o.api.settled
        && o.worker.settled
        && !below_minimum
        && serving_current
        && !o.deployments_changed
    {
        (
            true,
            reason::AVAILABLE,
            format!(
                "serving image {} with {} API and {} worker pods ready",
                o.spec_image, o.api.ready, o.worker.ready
            ),
        )
    } else if o.suspended {
        (
            false,
            reason::SUSPENDED,
            "spec.suspend is true and the children are not at the desired state".into(),
        )
    } else {
        (false, progressing.1, progressing.2.clone())
    };

    let conditions = vec![
        condition(
            previous,
            condition::READY,
            ready.0,
            ready.1,
            &ready.2,
            o.generation,
            now,
        ),
        condition(
            previous,
            condition::PROGRESSING,
            progressing.0,
            progressing.1,
            &progressing.2,
            o.generation,
            now,
        ),
        match &degraded {
            Some((r, m)) => condition(previous, condition::DEGRADED, true, r, m, o.generation, now),
            None => condition(
                previous,
                condition::DEGRADED,
                false,
                reason::AS_EXPECTED,
                "no problem detected",
                o.generation,
                now,
            ),
        },
    ];
    VmWebappStatus {
        observed_generation: o.generation,
        conditions,
        api_ready_replicas: o.api.ready,
        worker_ready_replicas: o.worker.ready,
        serving_image: o.api.image.clone(),
        backup: o.backup.clone(),
    }
}

/// Cut `s` to at most `max` bytes on a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn condition(
    previous: Option<&VmWebappStatus>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The condition of `type_` in `status`, if any.
pub fn find<'a>(status: Option<&'a VmWebappStatus>, type_: &str) -> Option<&'a Condition> {
    status.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Observed {
        let r = Rollout {
            exists: true,
            ready: 2,
            available: 2,
            complete: true,
            settled: true,
            image: Some("img:1".into()),
        };
        Observed {
            generation: Some(4),
            spec_image: "img:1".into(),
            api: r.clone(),
            worker: r,
            api_min_ready: 2,
            worker_min_ready: 2,
            ..Observed::default()
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).expect("valid timestamp")
    }

    fn get<'a>(s: &'a VmWebappStatus, type_: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    #[test]
    fn a_healthy_installation_is_ready_and_not_progressing() {
        let s = compute(None, &healthy(), t(100));
        assert_eq!(get(&s, "Ready").status, "True");
        assert_eq!(get(&s, "Progressing").status, "False");
        assert_eq!(get(&s, "Degraded").status, "False");
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(s.serving_image.as_deref(), Some("img:1"));
    }

    #[test]
    fn recomputing_an_unchanged_state_yields_an_identical_status() {
        // Without this, every pass would write a fresh timestamp and retrigger the controller.
        let first = compute(None, &healthy(), t(100));
        let second = compute(Some(&first), &healthy(), t(200));
        assert_eq!(first, second);
    }

    #[test]
    fn transition_time_moves_only_when_a_condition_flips() {
        let first = compute(None, &healthy(), t(100));
        let mut o = healthy();
        o.missing_secrets = vec!["db/url".into()];
        let second = compute(Some(&first), &o, t(200));
        assert_eq!(get(&second, "Ready").last_transition_time, Time(t(200)));
        assert_eq!(
            get(&second, "Progressing").last_transition_time,
            Time(t(100))
        );
    }

    #[test]
    fn a_missing_secret_degrades_and_names_the_secret_and_key() {
        let mut o = healthy();
        o.missing_secrets = vec!["vm-db/url".into()];
        let s = compute(None, &o, t(1));
        let d = get(&s, "Degraded");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "SecretMissing")
        );
        assert!(d.message.contains("vm-db/url"));
        assert_eq!(get(&s, "Ready").status, "False");
    }

    #[test]
    fn a_failed_migration_reports_migration_failed_and_the_serving_image() {
        let mut o = healthy();
        o.spec_image = "img:2".into();
        o.migration = Migration::Failed {
            job: "shop-migrate-abc".into(),
        };
        let s = compute(None, &o, t(1));
        assert_eq!(get(&s, "Degraded").reason, "MigrationFailed");
        assert!(get(&s, "Degraded").message.contains("shop-migrate-abc"));
        assert_eq!(s.serving_image.as_deref(), Some("img:1"));
    }

    #[test]
    fn a_running_migration_is_progressing_and_not_ready() {
        let mut o = healthy();
        o.spec_image = "img:2".into();
        o.migration = Migration::Running;
        let s = compute(None, &o, t(1));
        assert_eq!(get(&s, "Progressing").reason, "MigrationRunning");
        assert_eq!(get(&s, "Ready").status, "False");
    }

    #[test]
    fn changed_deployments_are_progressing_until_the_rollout_completes() {
        let mut o = healthy();
        o.deployments_changed = true;
        let s = compute(None, &o, t(1));
        assert_eq!(
            (
                get(&s, "Progressing").status.as_str(),
                get(&s, "Ready").status.as_str()
            ),
            ("True", "False")
        );
    }

    #[test]
    fn a_first_install_below_the_autoscaling_minimum_is_not_ready() {
        // Without this an autoscaled first install turned Ready with one pod, then flipped
        // to RollingOut when the HPA raised it to minReplicas, then back (a GitOps flap).
        let mut o = healthy();
        o.api_min_ready = 3;
        let s = compute(None, &o, t(1));
        assert_eq!(get(&s, "Ready").status, "False");
        assert_eq!(get(&s, "Progressing").reason, "RollingOut");
        assert!(get(&s, "Ready").message.contains("2 of 3 API"), "{s:?}");
    }

    #[test]
    fn an_autoscaler_adding_pods_is_not_a_rollout_and_keeps_ready() {
        // HPA scale-ups after the install must not flip Ready either.
        let mut o = healthy();
        o.api.complete = false; // 4 wanted, 2 available, all on the current template
        let s = compute(None, &o, t(1));
        assert_eq!(get(&s, "Ready").status, "True");
        assert_eq!(get(&s, "Progressing").status, "False");
    }

    #[test]
    fn a_refused_write_degrades_with_apply_failed_and_names_the_child() {
        let mut o = healthy();
        o.refused = vec![
            "Deployment/shop-api: deployments.apps \"shop-api\" is forbidden: exceeded quota (HTTP 403 Forbidden)".into(),
        ];
        let s = compute(None, &o, t(1));
        let d = get(&s, "Degraded");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "ApplyFailed")
        );
        assert!(d.message.contains("Deployment/shop-api"), "{}", d.message);
        assert!(d.message.contains("exceeded quota"), "{}", d.message);
        assert_eq!(get(&s, "Ready").status, "False");
        // The next pass without the refusal clears it.
        let cleared = compute(Some(&s), &healthy(), t(2));
        assert_eq!(get(&cleared, "Degraded").status, "False");
        assert_eq!(get(&cleared, "Ready").status, "True");
    }

    #[test]
    fn a_streak_of_api_errors_degrades_with_api_errors() {
        let mut o = healthy();
        o.api_errors =
            Some("the server is currently unable to handle the request (HTTP 503)".into());
        let s = compute(None, &o, t(1));
        assert_eq!(get(&s, "Degraded").reason, "ApiErrors");
        assert!(get(&s, "Degraded").message.contains("HTTP 503"));
    }
}
