//! The commands (`backup` and `restore` live in [`crate::backup_cmd`],
//! `usage verify` in [`crate::usage_cmd`]):
//! settings first, then the store, then the servers and the
//! worker, then a graceful stop on SIGTERM or Ctrl-C.
//!
//! Exit codes: 0 success, 1 runtime failure (database unreachable, port in
//! use, schema behind), 2 invalid configuration.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cli::{Cli, Command, ServeArgs, WorkerArgs};
use crate::config::{AppEnv, LlmMode, Settings};
use crate::http::{self, AppState};
use crate::redis_bus::RedisBus;
use crate::steps::StepRunner;
use crate::steps::llm::LlmBackend;
use crate::store::{Store, StoreError};
use crate::worker::{Worker, WorkerConfig};

/// Exit code for an invalid configuration.
pub const EXIT_CONFIG: u8 = 2;

/// Runs one command to completion.
pub async fn run(cli: Cli) -> ExitCode {
    // Names only: a variable's value is never read here.
    let misspelled = crate::config::misspelled_variables(
        std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()),
    );
    for (name, meant) in &misspelled {
        eprintln!(
            "vm-webapp: warning: {name} is not a setting and is ignored; did you mean {meant}?"
        );
    }
    let settings = match Settings::from_env() {
        Ok(s) => Arc::new(s),
        Err(errors) => {
            eprintln!("vm-webapp: invalid configuration:");
            for e in &errors.0 {
                eprintln!("  - {e}");
            }
            eprintln!(
                "Fix these and run `vm-webapp check-config` (or `make check-config`) again; .env.example describes every variable."
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if matches!(cli.command, Command::CheckConfig) {
        println!("configuration ok\n{}", settings.summary());
        return ExitCode::SUCCESS;
    }
    crate::install_crypto_provider();
    crate::telemetry::init(&settings);
    for (name, meant) in &misspelled {
        warn!(variable = %name, meant = %meant, "a variable that is not a setting is ignored");
    }
    let result = match cli.command {
        Command::Serve(args) => serve(settings, args).await,
        Command::Worker(args) => worker(settings, args).await,
        Command::Migrate => migrate(settings).await,
        Command::CheckConfig => Ok(()),
        Command::Backup(args) => crate::backup_cmd::backup(&settings, &args).await,
        Command::Restore(args) => crate::backup_cmd::restore(&settings, &args).await,
        Command::Usage(args) => crate::usage_cmd::run(&settings, &args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Once, on stderr, where a terminal, a Job's log and a script
            // all look for it (a log line too printed it twice, once on
            // stdout).
            eprintln!("vm-webapp: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Opens the store. Local mode migrates on start so one command is a working
/// system; everywhere else the schema must already be migrated (by the
/// `migrate` Job), so serving processes never need DDL rights.
pub async fn open_store(settings: &Settings, pool_size: u32) -> Result<Store, String> {
    let store = Store::connect(&settings.database, pool_size)
        .await
        .map_err(|e| cannot_open(settings.database.backend, &e))?;
    if settings.app_env == AppEnv::Local {
        store
            .migrate()
            .await
            .map_err(|e| format!("cannot migrate the database: {}", describe(&e)))?;
    } else {
        store.ensure_schema().await.map_err(|e| describe(&e))?;
    }
    Ok(store.with_plans(settings.plans.clone()))
}

/// Why `backend`'s database could not be opened, for a command's one error
/// line: "cannot open the postgres database: <why>", except for an SQLite
/// file error, which already says which file could not be opened and why.
pub(crate) fn cannot_open(backend: crate::config::DbBackend, e: &StoreError) -> String {
    match e {
        StoreError::SqliteFile { .. } => describe(e),
        _ => format!(
            "cannot open the {} database: {}",
            backend.as_str(),
            describe(e)
        ),
    }
}

/// A store error for a person, without connection strings or driver detail
/// that might echo them.
///
/// A server that answers but refuses the connection says why by SQLSTATE,
/// which names no secret: a database that does not exist (a typo in the URL,
/// or one never created) and refused credentials are told apart from a bare
/// "database error", which is all a new user got for either.
pub(crate) fn describe(e: &StoreError) -> String {
    match e {
        // SQLite's own words name the file's state (read-only directory,
        // full disk, locked), never a secret: the URL of a file has none.
        StoreError::Unavailable(sqlx::Error::Database(db))
        | StoreError::Database(sqlx::Error::Database(db))
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() =>
        {
            format!(
                "SQLite refused it: {} (check the file, the permissions of its directory and the free space)",
                db.message()
            )
        }
        StoreError::Unavailable(_) => {
            "database unreachable (check VM_DB_URL, network and credentials)".into()
        }
        StoreError::Migrate(m) => format!("migration error: {m}"),
        StoreError::Database(sqlx::Error::Database(db)) => match db.code().as_deref() {
            Some("3D000") => "the database named in the URL does not exist on the server (check VM_DB_URL, or VM_MIGRATION_DB_URL for migrate and backup; create it first)".into(),
            Some("28000" | "28P01") => "the server refused the user or password of the URL (check VM_DB_URL, or VM_MIGRATION_DB_URL for migrate and backup)".into(),
            _ => e.to_string(),
        },
        other => other.to_string(),
    }
}

fn log_llm_mode(settings: &Settings) {
    match settings.llm_mode() {
        LlmMode::Remote => {
            info!(model = %settings.llm.model, base_url = %settings.llm.base_url, "llm steps use the configured endpoint")
        }
        LlmMode::Offline => {
            warn!("KIMI_API_KEY is not set: llm steps use the built-in deterministic offline model")
        }
        LlmMode::Unavailable => {
            warn!("KIMI_API_KEY is not set: runs with llm steps will be refused")
        }
    }
}

fn build_worker(
    state: &AppState,
    poll_interval: Duration,
    concurrency: usize,
) -> Result<Worker, String> {
    let settings = &state.settings;
    let llm = LlmBackend::from_settings(settings)
        .map_err(|_| "cannot build the LLM client".to_string())?;
    let config = WorkerConfig {
        id: WorkerConfig::default_id(),
        concurrency,
        poll_interval,
        lease: settings.queue.lease,
        backoff_base: settings.queue.backoff_base,
        backoff_max: settings.queue.backoff_max,
        shutdown_grace: settings.queue.shutdown_grace,
    };
    let runner = StepRunner::new(llm).with_metrics(state.metrics.clone());
    Ok(
        Worker::new(state.store.clone(), runner, config, state.wake.clone())
            .with_metrics(state.metrics.clone())
            .with_redis(state.redis.clone()),
    )
}

/// Makes `flag` (readiness's "shutting down") true from inside the signal
/// handler of SIGTERM and SIGINT, so a probe answered after the signal arrives
/// already says `not_ready`, before the async shutdown path has even run.
fn not_ready_on_signal(flag: &Arc<std::sync::atomic::AtomicBool>) {
    #[cfg(unix)]
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, flag.clone()) {
            warn!(error = %e, "cannot watch shutdown signals; readiness flips when shutdown starts instead");
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn bind(host: &str, port: u16, hint: &str) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                format!("cannot listen on {host}:{port}: the port is in use by another process; stop it, or {hint}")
            } else {
                format!("cannot listen on {host}:{port}: {e}")
            }
        })
}

/// Resolves once a second SIGTERM or Ctrl-C arrives, after the first one
/// started a graceful stop: the person at the terminal wants out now.
async fn second_signal(first: CancellationToken) {
    first.cancelled().await;
    shutdown_signal().await;
    warn!(
        "second stop signal: not waiting for running steps; they are released to the queue and run again"
    );
}

/// Ends the worker's grace period now: its running steps are released to the
/// queue (no attempt spent). Bounded, so an unreachable database cannot hold
/// the exit: whatever is not released then comes back when its lease expires.
async fn release_at_once(
    force: &CancellationToken,
    worker: tokio::task::JoinHandle<crate::worker::DrainReport>,
) {
    force.cancel();
    let abort = worker.abort_handle();
    if tokio::time::timeout(Duration::from_secs(3), worker)
        .await
        .is_err()
    {
        abort.abort();
    }
}

/// Shared state with Redis attached when configured.
fn app_state(store: &Store, settings: &Arc<Settings>) -> Result<AppState, String> {
    let mut state = AppState::new(store.clone(), settings.clone());
    if let Some(url) = &settings.redis_url {
        state.redis = Some(RedisBus::new(url, state.metrics.clone()).map_err(|e| e.to_string())?);
        info!("redis configured: wake-ups on new runs, polling as the fallback");
    }
    Ok(state)
}

/// Starts forwarding Redis wake-ups to the local worker, if Redis is configured.
fn forward_wakeups(state: &AppState, shutdown: &CancellationToken) {
    if let Some(redis) = state.redis.clone() {
        tokio::spawn(redis.forward_wakeups(state.wake.clone(), shutdown.clone()));
    }
}

/// With Redis, announces this process's event commits so that every API
/// replica's live updates poll at once (they poll on a timer regardless).
fn announce_commits(state: &AppState, shutdown: &CancellationToken) {
    if let Some(redis) = state.redis.clone() {
        tokio::spawn(crate::stream::publish_commits(
            state.store.clone(),
            redis,
            shutdown.clone(),
        ));
    }
}

/// Says loudly when the API runs without keys.
fn log_auth_mode(settings: &Settings) {
    let keys = &settings.security.api_keys;
    if keys.is_empty() {
        // Once, as a log line: a second, plain copy only repeated it.
        warn!(
            "VM_API_KEYS is not set: THE API IS OPEN TO ANYONE WHO CAN REACH IT (allowed outside production only)"
        );
    } else {
        let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        info!(keys = ?ids, "API keys required");
    }
}

/// Writes the aggregated authentication failures to the audit trail once a minute.
fn flush_auth_failures(state: &AppState, shutdown: &CancellationToken) {
    let state = state.clone();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => {
                    state.auth_failures.flush(&state).await;
                    return;
                }
            }
            state.auth_failures.flush(&state).await;
        }
    });
}

/// The example run the banner prints, also the README's first run: one step
/// of each instant kind, `llm` answered offline without a key.
pub const FIRST_RUN_BODY: &str = r#"{"input":{"name":"Ada"},"steps":[{"kind":"template","template":"Hello, {{input.name}}!"},{"kind":"transform","op":"uppercase"},{"kind":"llm","prompt":"Write one line about {{prev}}"}]}"#;

/// What a local `serve` prints once it listens: where, a first run, and how
/// to stop. With `keys_required` (`VM_API_KEYS` set) the commands carry the
/// `Authorization` header, so the one a newcomer copies is not a 401.
pub fn banner(addr: SocketAddr, grace: Duration, keys_required: bool) -> String {
    let (auth, key_line) = if keys_required {
        (
            r#" -H "Authorization: Bearer $KEY""#,
            "API keys are required (VM_API_KEYS): KEY=<one of them> first.\n",
        )
    } else {
        ("", "")
    };
    format!(
        "vm-webapp is listening on http://{addr}\n\
         {key_line}\
         Create a first run:\n  \
         curl -s -X POST http://{addr}/api/v2/runs{auth} -d '{FIRST_RUN_BODY}'\n\
         Then: curl -s{auth} http://{addr}/api/v2/runs/<id>  and  curl -s{auth} http://{addr}/api/v2/runs/<id>/events\n\
         Ctrl-C stops after running steps finish (up to {} s, VM_SHUTDOWN_GRACE_MS); press it again to stop at once.",
        grace.as_secs()
    )
}

async fn serve(settings: Arc<Settings>, args: ServeArgs) -> Result<(), String> {
    let port = args.port.unwrap_or(settings.port);
    // The port first: when it is taken, nothing else (database, worker) starts.
    let hint = if settings.app_env == AppEnv::Local {
        "pick another port: make run PORT=8001 (or serve --port 8001, or PORT=8001)"
    } else {
        "pick another port with --port or PORT"
    };
    let listener = bind(&args.host, port, hint).await?;
    let store = open_store(&settings, 10).await?;
    log_llm_mode(&settings);
    log_auth_mode(&settings);
    let mut state = app_state(&store, &settings)?;
    let shutdown = CancellationToken::new();
    announce_commits(&state, &shutdown);
    let streams = state.streams.clone();
    let mut worker_task = None;
    let force_stop = CancellationToken::new();
    if settings.embedded_worker() {
        let worker = build_worker(&state, Duration::from_millis(500), 4)?;
        state.worker = Some(worker.state());
        forward_wakeups(&state, &shutdown);
        worker_task = Some(tokio::spawn(
            worker.with_force(force_stop.clone()).run(shutdown.clone()),
        ));
    } else {
        // No worker here: still contend for queue maintenance, so the queue
        // gauges stay fresh and expired leases are rescued even while every
        // worker is down (the leader is whichever process gets there first).
        tokio::spawn(crate::maintenance::run(
            store.clone(),
            format!("api-{}", crate::worker::WorkerConfig::default_id()),
            crate::store::queue::rescue::MAINTENANCE_EVERY,
            state.metrics.clone(),
            state.nudge(),
            shutdown.clone(),
        ));
    }
    let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    info!(%addr, app_env = settings.app_env.as_str(), database = settings.database.backend.as_str(), embedded_worker = settings.embedded_worker(), "vm-webapp serving");
    if settings.app_env == AppEnv::Local {
        println!(
            "{}",
            banner(
                addr,
                settings.queue.shutdown_grace,
                !settings.security.api_keys.is_empty()
            )
        );
    }

    flush_auth_failures(&state, &shutdown);
    let flag = state.shutting_down.clone();
    not_ready_on_signal(&flag);
    let stop = shutdown.clone();
    let delay = settings.shutdown_delay;
    let forced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forced_by_signal = forced.clone();
    let app = http::router(state);
    // Connections carry the peer's address and the write deadline that
    // live-update streams engage (a client that stops reading cannot hold
    // its stream, nor delay the graceful stop, for ever).
    let server = http::conn::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        // Readiness fails first and keeps being answered while the worker
        // drains (and for the configured delay), so load balancers see
        // `not_ready` and stop sending traffic before the listener closes.
        flag.store(true, Ordering::SeqCst);
        info!("shutdown requested: not ready, draining requests and jobs (a second signal stops at once)");
        stop.cancel();
        // Live-update streams never end by themselves: end them, so the
        // drain waits only for real requests. Clients resume elsewhere.
        streams.close();
        let force = second_signal(stop.clone());
        tokio::pin!(force);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut force => {
                forced_by_signal.store(true, Ordering::SeqCst);
                if let Some(task) = worker_task {
                    release_at_once(&force_stop, task).await;
                }
                return;
            }
        }
        if let Some(mut task) = worker_task {
            tokio::select! {
                _ = &mut task => {}
                _ = &mut force => {
                    forced_by_signal.store(true, Ordering::SeqCst);
                    release_at_once(&force_stop, task).await;
                }
            }
        }
    });
    if let Err(e) = server.await {
        return Err(format!("server error: {e}"));
    }
    shutdown.cancel();
    close_store(&store).await;
    if forced.load(Ordering::SeqCst) {
        info!("stopped at once");
    } else {
        info!("stopped cleanly");
    }
    Ok(())
}

/// Closes the pool, bounded: a forced stop must not hang on a connection.
async fn close_store(store: &Store) {
    if tokio::time::timeout(Duration::from_secs(2), store.close())
        .await
        .is_err()
    {
        warn!("database connections did not close within 2 s");
    }
}

async fn worker(settings: Arc<Settings>, args: WorkerArgs) -> Result<(), String> {
    let concurrency = usize::try_from(args.concurrency).unwrap_or(4);
    // Steps do not hold connections while they run (leases are renewed and
    // results recorded in batches), so the pool does not grow with concurrency.
    let store = open_store(&settings, (concurrency as u32 + 2).min(12)).await?;
    log_llm_mode(&settings);
    let mut state = app_state(&store, &settings)?;
    let worker = build_worker(
        &state,
        Duration::from_millis(args.poll_interval_ms),
        concurrency,
    )?;
    state.worker = Some(worker.state());
    // A slow poll interval must not look like a stall.
    state.worker_stall_after = state.worker_stall_after.max(Duration::from_millis(
        args.poll_interval_ms.saturating_mul(3),
    ));
    let listener = bind(
        &args.health_host,
        args.health_port,
        "pick another probe port with --health-port",
    )
    .await?;
    info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "worker probes serving");

    let shutdown = CancellationToken::new();
    // The probes outlive the drain, so `not_ready` is visible while it lasts.
    let probes_stop = CancellationToken::new();
    let flag = state.shutting_down.clone();
    not_ready_on_signal(&flag);
    let state_for_wakeups = state.clone();
    let probes = axum::serve(listener, http::health_router(state)).with_graceful_shutdown({
        let probes_stop = probes_stop.clone();
        async move { probes_stop.cancelled().await }
    });
    let probes = tokio::spawn(async move { probes.await });
    forward_wakeups(&state_for_wakeups, &shutdown);
    announce_commits(&state_for_wakeups, &shutdown);
    let force_stop = CancellationToken::new();
    let mut worker_task = tokio::spawn(worker.with_force(force_stop.clone()).run(shutdown.clone()));
    shutdown_signal().await;
    flag.store(true, Ordering::SeqCst);
    info!(
        "shutdown requested: no new claims, draining in-flight jobs (a second signal stops at once)"
    );
    shutdown.cancel();
    let force = second_signal(shutdown.clone());
    tokio::pin!(force);
    let forced = tokio::select! {
        _ = &mut worker_task => false,
        _ = &mut force => {
            release_at_once(&force_stop, worker_task).await;
            true
        }
    };
    if !forced {
        tokio::select! {
            _ = tokio::time::sleep(settings.shutdown_delay) => {}
            _ = &mut force => {}
        }
    }
    probes_stop.cancel();
    let _ = probes.await;
    close_store(&store).await;
    if forced {
        info!("stopped at once");
    } else {
        info!("stopped cleanly");
    }
    Ok(())
}

async fn migrate(settings: Arc<Settings>) -> Result<(), String> {
    // DDL runs as the schema owner when a separate URL is given, so the
    // runtime's own role never needs those rights.
    let database = settings.migration_database();
    let store = Store::connect(&database, 2)
        .await
        .map_err(|e| cannot_open(database.backend, &e))?;
    let applied = store.migrate().await.map_err(|e| describe(&e))?;
    if let Some(role) = &settings.security.runtime_db_role {
        store
            .grant_runtime_role(role)
            .await
            .map_err(|e| format!("cannot grant the runtime role its rights: {}", describe(&e)))?;
        println!(
            "granted the runtime role {role} read/write on data, append-only on the audit trail, no DDL"
        );
    }
    let version = store.schema_version().await.map_err(|e| describe(&e))?;
    if applied.is_empty() {
        println!("database schema is up to date (version {version})");
    } else {
        println!("applied migrations {applied:?}; schema is at version {version}");
    }
    info!(?applied, version, "migrations complete");
    store.close().await;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// An SQLite refusal is described in SQLite's words (here a read-only
    /// database) with what to check, not as a bare "database error" or
    /// "database unreachable (check … network and credentials)", which sent
    /// people looking at the wrong thing.
    #[tokio::test]
    async fn an_sqlite_refusal_is_described_in_sqlites_words() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_sqlite_store(dir.path(), "r.db").await;
        let mut conn = store.pool().acquire().await.unwrap();
        sqlx::query("PRAGMA query_only = 1")
            .execute(&mut *conn)
            .await
            .unwrap();
        let refused: StoreError = sqlx::query("CREATE TABLE t (a)")
            .execute(&mut *conn)
            .await
            .unwrap_err()
            .into();
        let text = describe(&refused);
        assert!(
            text.starts_with("SQLite refused it: attempt to write a readonly database")
                && text.contains("permissions of its directory")
                && !text.contains("network"),
            "{text}"
        );
    }
}
