//! The backup CronJob: `vm-webapp backup --output-dir /var/backups/vm --keep <retention>`
//! on `spec.backup.schedule` (UTC), one at a time, with the image the Deployments serve and
//! the migration credentials, writing to the claim named in `spec.backup`.

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::pod::{self, Workload};
use super::{BuildError, Ident, names};
use crate::consts::component;
use crate::crd::VmWebapp;

/// Finished backup Jobs kept for inspection, each of successes and failures.
pub const JOB_HISTORY: i32 = 3;
/// A run missed by more than this many seconds (the CronJob controller was down, or the
/// previous backup was still running) is skipped rather than started late.
pub const STARTING_DEADLINE_SECONDS: i64 = 600;
/// Retries of a failed backup pod within one scheduled run.
pub const BACKOFF_LIMIT: i32 = 2;

/// The CronJob of `spec.backup`, `None` when backups are off. Errors when the schedule
/// cannot be read (the CRD checks only its length).
pub(super) fn cron_job(
    app: &VmWebapp,
    id: &Ident,
    image: &str,
    config_hash: &str,
) -> Result<Option<CronJob>, BuildError> {
    let Some(backup) = &app.spec.backup else {
        return Ok(None);
    };
    crate::schedule::max_backup_age_seconds(&backup.schedule, backup.active_deadline_seconds)?;
    let labels = id.labels(component::BACKUP);
    Ok(Some(CronJob {
        metadata: id.meta(names::backup(&id.name), component::BACKUP),
        spec: Some(CronJobSpec {
            schedule: backup.schedule.trim().to_owned(),
            time_zone: Some("Etc/UTC".into()),
            concurrency_policy: Some("Forbid".into()),
            starting_deadline_seconds: Some(STARTING_DEADLINE_SECONDS),
            successful_jobs_history_limit: Some(JOB_HISTORY),
            failed_jobs_history_limit: Some(JOB_HISTORY),
            suspend: Some(backup.suspend),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(JobSpec {
                    backoff_limit: Some(BACKOFF_LIMIT),
                    active_deadline_seconds: Some(backup.active_deadline_seconds),
                    template: pod::template(app, id, Workload::Backup, image, config_hash),
                    ..JobSpec::default()
                }),
            },
        }),
        status: None,
    }))
}
