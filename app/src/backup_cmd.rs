//! The `backup` and `restore` commands: files, names, pruning and timing
//! around [`crate::store::backup`], which does the database side.
//!
//! Both connect with the migration credentials when they are set
//! (`VM_MIGRATION_DB_URL`, the schema owner: it may read every table and
//! write the append-only audit trail), else with `VM_DB_URL`. A backup is
//! written to `FILE.partial` (mode 0600: it holds every run's data) and
//! renamed when complete and synced, so a file with the final name is always
//! a whole snapshot.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio::io::BufWriter;
use tracing::info;

use crate::cli::{BackupArgs, RestoreArgs};
use crate::config::Settings;
use crate::runtime::describe;
use crate::store::Store;
use crate::store::backup::{BackupError, RestoreOptions};

/// File names written by `backup --output-dir` start with this.
pub const BACKUP_PREFIX: &str = "vm-webapp-backup-";
/// …and end with this.
pub const BACKUP_SUFFIX: &str = ".jsonl";
/// I/O buffer of the backup file, bytes.
const IO_BUFFER_BYTES: usize = 256 * 1024;

/// The file name of a backup taken at `at`: sortable by name, UTC, ms.
pub fn backup_file_name(at: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "{BACKUP_PREFIX}{}{BACKUP_SUFFIX}",
        at.format("%Y%m%dT%H%M%S%.3fZ")
    )
}

fn explain(e: &BackupError) -> String {
    match e {
        BackupError::Store(s) => describe(s),
        other => other.to_string(),
    }
}

/// Opens the database, never creating a missing SQLite file: a backup
/// pointed at a wrong path fails naming the path instead of backing up an
/// empty database, and a restore needs a migrated database anyway (a file it
/// created would only be refused as unmigrated, and left behind).
async fn connect(settings: &Settings) -> Result<Store, String> {
    let database = settings.migration_database();
    Store::connect_existing(&database, 2)
        .await
        .map_err(|e| crate::runtime::cannot_open(database.backend, &e))
}

/// `vm-webapp backup`: writes one snapshot to `--output`, or a timestamped
/// file in `--output-dir` and prunes that directory to the newest `--keep`
/// backups. Prints the file, its rows and the time taken (ms).
pub async fn backup(settings: &Settings, args: &BackupArgs) -> Result<(), String> {
    // The database first: a missing one leaves no directory behind either.
    let store = connect(settings).await?;
    let path = match (&args.output, &args.output_dir) {
        (Some(file), _) => file.clone(),
        (None, Some(dir)) => {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            dir.join(backup_file_name(chrono::Utc::now()))
        }
        (None, None) => return Err("backup needs --output FILE or --output-dir DIR".into()),
    };
    let started = Instant::now();
    let partial = partial_path(&path);
    let result = write_backup(&store, &partial).await;
    store.close().await;
    let summary = match result {
        Ok(summary) => summary,
        Err(message) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(message);
        }
    };
    tokio::fs::rename(&partial, &path).await.map_err(|e| {
        format!(
            "cannot rename the finished backup to {}: {e}",
            path.display()
        )
    })?;
    let elapsed_ms = started.elapsed().as_millis();
    println!(
        "backup written to {}: {} rows in {} tables, {} bytes, schema version {}, {elapsed_ms} ms",
        path.display(),
        summary.total_rows(),
        summary.rows.len(),
        summary.bytes,
        summary.schema_version
    );
    info!(
        rows = summary.total_rows(),
        bytes = summary.bytes,
        elapsed_ms = elapsed_ms as u64,
        "backup complete"
    );
    if let (Some(dir), Some(keep)) = (&args.output_dir, args.keep) {
        for removed in prune(dir, keep as usize)? {
            println!("pruned {}", removed.display());
        }
    }
    Ok(())
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

async fn write_backup(
    store: &Store,
    partial: &Path,
) -> Result<crate::store::backup::BackupSummary, String> {
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    // Backups hold every run's input and output: readable by their owner only.
    #[cfg(unix)]
    options.mode(0o600);
    let file = options
        .open(partial)
        .await
        .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
    let mut out = BufWriter::with_capacity(IO_BUFFER_BYTES, file);
    let summary = store.backup_to(&mut out).await.map_err(|e| explain(&e))?;
    out.into_inner()
        .sync_all()
        .await
        .map_err(|e| format!("cannot sync {}: {e}", partial.display()))?;
    Ok(summary)
}

/// Deletes complete backups in `dir` beyond the newest `keep` (by name,
/// which is by time), and leftovers of interrupted backups. Returns what it
/// deleted. Files not named by `backup --output-dir` are never touched.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut complete = Vec::new();
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with(BACKUP_PREFIX) {
            continue;
        }
        if name.ends_with(BACKUP_SUFFIX) {
            complete.push(name);
        } else if name.ends_with(&format!("{BACKUP_SUFFIX}.partial")) {
            removed.push(dir.join(name));
        }
    }
    complete.sort_unstable_by(|a, b| b.cmp(a));
    removed.extend(complete.into_iter().skip(keep).map(|n| dir.join(n)));
    for path in &removed {
        std::fs::remove_file(path).map_err(|e| format!("cannot delete {}: {e}", path.display()))?;
    }
    Ok(removed)
}

/// `vm-webapp restore`: loads `--input` into the configured database, which
/// must be migrated and (without `--force`) empty. Prints the rows loaded
/// and the time taken (ms).
pub async fn restore(settings: &Settings, args: &RestoreArgs) -> Result<(), String> {
    let file = tokio::fs::File::open(&args.input)
        .await
        .map_err(|e| format!("cannot open {}: {e}", args.input.display()))?;
    let input = tokio::io::BufReader::with_capacity(IO_BUFFER_BYTES, file);
    let store = connect(settings)
        .await
        .map_err(|e| format!("{e}; a restore loads into a database made by `vm-webapp migrate`"))?;
    let started = Instant::now();
    let options = RestoreOptions {
        replace_existing: args.force,
    };
    let result = store.restore_from(input, options).await;
    store.close().await;
    let summary = result.map_err(|e| explain(&e))?;
    let elapsed_ms = started.elapsed().as_millis();
    println!(
        "restored {} rows in {} tables from a {} snapshot (schema version {}) into the {} database, {elapsed_ms} ms",
        summary.total_rows(),
        summary.rows.len(),
        summary.source_backend,
        summary.schema_version,
        settings.migration_database().backend.as_str(),
    );
    info!(
        rows = summary.total_rows(),
        elapsed_ms = elapsed_ms as u64,
        "restore complete"
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backup_names_sort_by_time() {
        let a = backup_file_name(chrono::DateTime::from_timestamp_millis(1_000).unwrap());
        let b = backup_file_name(chrono::DateTime::from_timestamp_millis(61_000).unwrap());
        assert_eq!(a, "vm-webapp-backup-19700101T000001.000Z.jsonl");
        assert!(a < b);
    }

    /// Pruning by a looser pattern would delete whatever else lives on the
    /// volume; pruning before sorting would delete the newest backups.
    #[test]
    fn prune_keeps_the_newest_backups_and_nothing_else_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        for s in [1, 2, 3, 4] {
            let name = backup_file_name(chrono::DateTime::from_timestamp(s, 0).unwrap());
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        std::fs::write(dir.path().join("vm-webapp-backup-1.jsonl.partial"), b"x").unwrap();
        let removed = prune(dir.path(), 2).unwrap();
        assert_eq!(removed.len(), 3, "{removed:?}");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "notes.txt",
                "vm-webapp-backup-19700101T000003.000Z.jsonl",
                "vm-webapp-backup-19700101T000004.000Z.jsonl"
            ]
        );
    }
}
