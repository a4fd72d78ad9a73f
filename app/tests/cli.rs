//! The `vm-webapp` binary as an operator meets it: real processes with a
//! controlled environment, real signals, real ports, SQLite files and a real
//! PostgreSQL. Covers configuration checks and fail-fast, secret hygiene,
//! `migrate`, SIGTERM drain and release, and the standalone `worker`.
//!
//! Every wait is bounded, and every child process is killed if a test fails.

mod support;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for a command that should finish at once (config, migrate).
const QUICK: Duration = Duration::from_secs(20);
/// Upper bound for a run to finish or a server to come up.
const SLOW: Duration = Duration::from_secs(25);

const DB_PASSWORD: &str = "SuperSecretPw";
const API_KEY: &str = "sk-very-secret";
const REDIS_PASSWORD: &str = "RedisSecret";
const CLIENT_KEY: &str = "client-key-SuperSecret-0001";
const API_KEYS: &str = "client:client-key-SuperSecret-0001:admin";

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A `vm-webapp` command with an empty environment except `PATH`, quiet-ish
/// JSON logs, and whatever the test adds.
fn vm(args: &[&str], vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm-webapp"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd.env("LOG_LEVEL", "info").env("LOG_FORMAT", "json");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A running child whose output goes to files; killed when dropped, so a
/// failing assertion never leaves a server behind.
struct Proc {
    name: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command) -> Proc {
        let dir = tempfile::tempdir().expect("tempdir for output");
        let out = dir.path().join("stdout");
        let err = dir.path().join("stderr");
        cmd.stdout(File::create(&out).expect("stdout file"));
        cmd.stderr(File::create(&err).expect("stderr file"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            out,
            err,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Both streams, for assertions and panic messages.
    fn output(&self) -> String {
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit; panics (and kills it) after `timeout`.
    async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.name,
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM, as the kubelet does.
    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "could not send SIGTERM to {}", self.name);
    }

    /// Panics with the process output unless it is still running.
    fn assert_running(&mut self) {
        if let Some(status) = self.try_status() {
            panic!(
                "{} exited early with {status}\n{}",
                self.name,
                self.output()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command to completion (bounded) and returns its exit status and
/// combined output.
async fn run(name: &str, cmd: Command) -> (ExitStatus, String) {
    let mut p = Proc::spawn(name, cmd);
    let status = p.wait(QUICK).await;
    (status, p.output())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A port on which nothing listens (bound, then released).
fn closed_port() -> u16 {
    free_port()
}

fn assert_no_secret(output: &str) {
    for secret in [DB_PASSWORD, API_KEY, REDIS_PASSWORD, CLIENT_KEY] {
        assert!(
            !output.contains(secret),
            "output leaks {secret:?}:\n{output}"
        );
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), so a
/// server that stopped accepting shows up as an error rather than a hang.
async fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
             Authorization: Bearer {CLIENT_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, payload) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("malformed response: {text:?}")))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status line: {head:?}")))?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let payload = if chunked {
            dechunk(payload)
        } else {
            payload.to_string()
        };
        // Metrics are text: anything that is not JSON comes back as a string.
        let value = if payload.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&payload).unwrap_or(Value::String(payload))
        };
        Ok((status, value))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other(format!("{method} {path} timed out"))))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Like [`http`], but the request must get an answer.
async fn call(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    http(port, method, path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on port {port} failed: {e}"))
}

/// Waits until the process answers `live` on `port`.
async fn wait_live(p: &mut Proc, port: u16) {
    let deadline = Instant::now() + SLOW;
    loop {
        p.assert_running();
        if let Ok((200, body)) = http(port, "GET", "/api/v2/health/live", None).await {
            assert_eq!(body, json!({"status": "live"}));
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never answered on port {port}\n{}",
            p.name,
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create_run(port: u16, body: Value) -> String {
    let (status, reply) = call(port, "POST", "/api/v2/runs", Some(&body)).await;
    assert_eq!(status, 202, "create run: {reply}");
    assert_eq!(reply["status"], "queued", "{reply}");
    reply["id"].as_str().expect("run id").to_string()
}

async fn events(port: u16, id: &str) -> Vec<Value> {
    let (status, body) = call(port, "GET", &format!("/api/v2/runs/{id}/events"), None).await;
    assert_eq!(status, 200, "{body}");
    body["events"].as_array().cloned().unwrap_or_default()
}

async fn wait_event(p: &mut Proc, port: u16, id: &str, event: &str) {
    let deadline = Instant::now() + SLOW;
    loop {
        p.assert_running();
        let all = events(port, id).await;
        if all.iter().any(|e| e["type"] == event) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "run {id} has no {event} event: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_status(p: &mut Proc, port: u16, id: &str, wanted: &str) -> Value {
    let deadline = Instant::now() + SLOW;
    loop {
        p.assert_running();
        let (status, run) = call(port, "GET", &format!("/api/v2/runs/{id}"), None).await;
        assert_eq!(status, 200, "{run}");
        if run["status"] == wanted {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "run {id} did not reach {wanted}: {run}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn event_types(all: &[Value], step: i64) -> Vec<String> {
    all.iter()
        .filter(|e| e["step_index"] == step)
        .map(|e| e["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A `serve` in local mode over the embedded SQLite under `root`.
fn local_serve(root: &Path, port: u16, extra: &[(&str, &str)]) -> Proc {
    let root = root.display().to_string();
    let port = port.to_string();
    let mut vars = vec![("APP_ENV", "local"), ("VM_WORKSPACE_ROOT", root.as_str())];
    vars.extend_from_slice(extra);
    Proc::spawn("serve", vm(&["serve", "--port", &port], &vars))
}

// ---------------------------------------------------------------------------
// check-config and fail-fast
// ---------------------------------------------------------------------------

#[tokio::test]
async fn check_config_accepts_a_valid_local_environment_and_prints_a_summary() {
    let root = tempfile::tempdir().expect("tempdir");
    let root_s = root.path().display().to_string();
    let (status, output) = run(
        "check-config",
        vm(&["check-config"], &[("VM_WORKSPACE_ROOT", &root_s)]),
    )
    .await;
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("configuration ok"), "{output}");
    for line in [
        "app_env: local",
        "managed_mode: false",
        "database: embedded sqlite",
        "embedded_worker: true",
        "llm: offline",
    ] {
        assert!(output.contains(line), "summary lacks {line:?}:\n{output}");
    }
    // check-config touches nothing: no database file is created.
    assert!(
        std::fs::read_dir(root.path())
            .expect("read root")
            .next()
            .is_none(),
        "check-config wrote to the workspace"
    );
}

#[tokio::test]
async fn check_config_names_every_variable_at_fault_in_one_go() {
    let (status, output) = run(
        "check-config",
        vm(
            &["check-config"],
            &[
                ("APP_ENV", "prod"),
                ("VM_ENABLE_MANAGED_MODE", "true"),
                ("PORT", "abc"),
                ("LOG_FORMAT", "xml"),
            ],
        ),
    )
    .await;
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(!output.contains("configuration ok"), "{output}");
    for variable in ["APP_ENV", "VM_DB_URL", "VM_REDIS_URL", "PORT", "LOG_FORMAT"] {
        assert!(
            output.contains(&format!("{variable}:")),
            "{variable} is not named:\n{output}"
        );
    }
}

#[tokio::test]
async fn managed_mode_without_database_or_redis_fails_before_binding_a_port() {
    let port = free_port();
    let mut p = Proc::spawn(
        "serve",
        vm(
            &["serve", "--port", &port.to_string()],
            &[
                ("VM_ENABLE_MANAGED_MODE", "true"),
                ("APP_ENV", "production"),
            ],
        ),
    );
    // Watch the port for the whole life of the process: nothing may ever accept.
    let deadline = Instant::now() + QUICK;
    let status = loop {
        assert!(
            std::net::TcpStream::connect_timeout(
                &([127, 0, 0, 1], port).into(),
                Duration::from_millis(50)
            )
            .is_err(),
            "something listened on {port} although the configuration is invalid\n{}",
            p.output()
        );
        if let Some(status) = p.try_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not fail fast\n{}",
            p.output()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let output = p.output();
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains("VM_DB_URL") && output.contains("VM_REDIS_URL"),
        "{output}"
    );
    assert!(
        output.contains("VM_ENABLE_MANAGED_MODE"),
        "the message should say why: {output}"
    );
    assert!(!output.contains("listening"), "{output}");
    TcpListener::bind(("127.0.0.1", port)).expect("the port is still free");
}

// ---------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_secret_is_printed_by_check_config_or_a_failing_serve() {
    let pg_url = format!(
        "postgres://user:{DB_PASSWORD}@127.0.0.1:{}/db",
        closed_port()
    );
    let redis_url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:1");
    let secrets = [
        ("APP_ENV", "staging"),
        ("VM_DB_URL", pg_url.as_str()),
        ("VM_REDIS_URL", redis_url.as_str()),
        ("KIMI_API_KEY", API_KEY),
        // Debug logs must not leak either: libraries log at this level.
        ("LOG_LEVEL", "debug"),
    ];

    let (status, output) = run("check-config", vm(&["check-config"], &secrets)).await;
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(
        output.contains("database: postgres") && output.contains("redis: configured"),
        "{output}"
    );
    assert_no_secret(&output);

    for format in ["json", "pretty"] {
        let port = free_port().to_string();
        let mut cmd = vm(&["serve", "--port", &port], &secrets);
        cmd.env("LOG_FORMAT", format);
        let (status, output) = run("serve", cmd).await;
        assert!(
            !status.success(),
            "serve started against an unreachable database\n{output}"
        );
        assert_eq!(status.code(), Some(1), "{output}");
        assert!(
            output.contains("VM_DB_URL") || output.contains("database"),
            "{output}"
        );
        assert_no_secret(&output);
    }

    let bad_url = format!("mysql://u:{DB_PASSWORD}@h/db");
    let (status, output) = run(
        "check-config",
        vm(
            &["check-config"],
            &[
                ("APP_ENV", "staging"),
                ("VM_DB_URL", &bad_url),
                ("KIMI_API_KEY", API_KEY),
            ],
        ),
    )
    .await;
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("VM_DB_URL"), "{output}");
    assert_no_secret(&output);

    let (status, output) = run(
        "serve",
        vm(
            &["serve", "--port", &free_port().to_string()],
            &[("APP_ENV", "staging"), ("VM_DB_URL", &bad_url)],
        ),
    )
    .await;
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("VM_DB_URL"), "{output}");
    assert_no_secret(&output);
}

/// Kind: an error about a secret-bearing setting names the entry by its
/// position (and its id only once the entry parsed), never any other part of
/// the value. Each malformed value below carries a secret-looking part; no
/// 6-character window of it may reach stdout or stderr. Without this, a
/// message quoting "the bad entry" prints the credential (an `id:`-less API
/// key was echoed whole).
#[tokio::test]
async fn check_config_never_repeats_any_part_of_a_malformed_secret_setting() {
    // Random-looking, so that no window of it is an ordinary word of a message.
    const SECRET: &str = "Xq7vT2mPz9LkW4rB8nJc5yHd3gFs6aE1";
    const REPORTED: &str = "averyveryverylongsecretkeywithoutid";
    let short = &SECRET[..10];
    let cases = [
        ("VM_API_KEYS", SECRET.to_string()),
        ("VM_API_KEYS", format!("{SECRET}:")),
        ("VM_API_KEYS", format!("not an id {SECRET}:{SECRET}")),
        ("VM_API_KEYS", format!("ci:{short}")),
        ("VM_API_KEYS", format!("ci:{SECRET}:{SECRET}")),
        ("VM_API_KEYS", format!("ci:{SECRET}\t{SECRET}")),
        ("VM_WEBHOOK_SECRETS", SECRET.to_string()),
        ("VM_WEBHOOK_SECRETS", format!("not a source:{SECRET}")),
        ("VM_WEBHOOK_SECRETS", format!("github:{short}")),
        ("VM_DB_URL", format!("mysql://u:{SECRET}@db/app")),
        ("VM_DB_URL", format!("postgres://u:{SECRET}@db:nope/app")),
        (
            "VM_MIGRATION_DB_URL",
            format!("postgres://u:{SECRET}@[::1/app"),
        ),
        ("VM_REDIS_URL", format!("http://:{SECRET}@r:6379")),
        ("VM_REDIS_URL", format!("redis://:{SECRET}@r:nope")),
        ("KIMI_API_KEY", format!("{SECRET} {SECRET}")),
    ];
    for (variable, value) in cases {
        let (status, output) = run(
            "check-config",
            vm(&["check-config"], &[(variable, value.as_str())]),
        )
        .await;
        assert_eq!(status.code(), Some(2), "{variable}={value:?}:\n{output}");
        assert!(
            output.contains(&format!("{variable}:")),
            "{variable} is not named:\n{output}"
        );
        for start in 0..=SECRET.len() - 6 {
            let window = &SECRET[start..start + 6];
            assert!(
                !output.contains(window),
                "{variable} leaks {window:?}:\n{output}"
            );
        }
    }
    // The case from the report gets the right diagnosis, by position.
    let (_, output) = run(
        "check-config",
        vm(&["check-config"], &[("VM_API_KEYS", REPORTED)]),
    )
    .await;
    assert!(
        output.contains("VM_API_KEYS: entry 1:") && output.contains("id missing"),
        "{output}"
    );
    assert!(!output.contains("veryverylong"), "{output}");
}

/// A mistyped variable name silently left its setting at the default
/// (`VM_API_KEY` left the API open): check-config names it and the setting
/// it probably means, without its value.
#[tokio::test]
async fn check_config_names_a_mistyped_variable_and_the_setting_it_means() {
    const KEY: &str = "ci:Xq7vT2mPz9LkW4rB8nJc5yHd3gFs6aE1";
    let (status, output) = run(
        "check-config",
        vm(
            &["check-config"],
            &[("VM_API_KEY", KEY), ("LOG_LEVLE", "debug")],
        ),
    )
    .await;
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(
        output.contains("VM_API_KEY is not a setting and is ignored; did you mean VM_API_KEYS?")
            && output.contains("did you mean LOG_LEVEL?"),
        "{output}"
    );
    assert!(!output.contains("Xq7vT2"), "{output}");
}

/// Kind: every setting is validated, so nothing the app's operator relies on
/// is silenced by a typo. `LOG_LEVEL=verbose` used to pass check-config and
/// then hide every log line of `serve`.
#[tokio::test]
async fn an_unparsable_log_level_fails_check_config_and_serve_naming_the_variable() {
    let (status, output) = run(
        "check-config",
        vm(&["check-config"], &[("LOG_LEVEL", "verbose")]),
    )
    .await;
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains("LOG_LEVEL:") && output.contains("`verbose` is not a level"),
        "{output}"
    );
    assert!(!output.contains("configuration ok"), "{output}");
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let (status, output) = run(
        "serve",
        vm(
            &["serve", "--port", &port.to_string()],
            &[
                ("LOG_LEVEL", "verbose"),
                ("VM_WORKSPACE_ROOT", &root.path().display().to_string()),
            ],
        ),
    )
    .await;
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("LOG_LEVEL:"), "{output}");
    // A mistyped target keeps `info` for everything else: start-up warnings
    // still show.
    let (status, output) = run(
        "check-config",
        vm(&["check-config"], &[("LOG_LEVEL", "vm_webap=debug")]),
    )
    .await;
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("log: info,vm_webap=debug"), "{output}");
}

// ---------------------------------------------------------------------------
// migrate
// ---------------------------------------------------------------------------

async fn migrate_twice_then_serve_refuses_unmigrated(url: &str, unmigrated_url: &str) {
    let vars = [("APP_ENV", "staging"), ("VM_DB_URL", url)];
    let (status, first) = run("migrate", vm(&["migrate"], &vars)).await;
    assert_eq!(status.code(), Some(0), "{first}");
    assert!(first.contains("applied migrations"), "{first}");
    let (status, second) = run("migrate", vm(&["migrate"], &vars)).await;
    assert_eq!(status.code(), Some(0), "{second}");
    assert!(second.contains("up to date"), "{second}");
    assert!(!second.contains("applied migrations"), "{second}");

    // Outside local mode, a serving process never applies DDL itself.
    let port = free_port();
    let mut serve = Proc::spawn(
        "serve",
        vm(
            &["serve", "--port", &port.to_string()],
            &[("APP_ENV", "staging"), ("VM_DB_URL", unmigrated_url)],
        ),
    );
    let status = serve.wait(QUICK).await;
    let output = serve.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("vm-webapp migrate"),
        "the message should say what to run: {output}"
    );
    TcpListener::bind(("127.0.0.1", port))
        .expect("serve bound its port although it refused to start");
}

/// A failing command printed its error twice, as a log line on stdout and
/// as a line on stderr: a person read it twice, and a script that keeps
/// stdout (or a log pipeline that takes both) stored it twice.
#[test]
fn a_failing_command_prints_its_error_once_on_stderr_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-database");
    std::fs::write(&file, "plain text").expect("write");
    let url = format!("sqlite://{}", file.display());
    for format in ["json", "pretty"] {
        let out = vm(
            &["migrate"],
            &[
                ("APP_ENV", "staging"),
                ("VM_DB_URL", &url),
                ("LOG_FORMAT", format),
            ],
        )
        .output()
        .expect("run vm-webapp");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let all = format!("--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
        assert_eq!(out.status.code(), Some(1), "{format}: {all}");
        assert_eq!(
            stderr.matches("not an SQLite database").count(),
            1,
            "{format}: {all}"
        );
        assert!(
            !stdout.contains("not an SQLite database"),
            "{format}: {all}"
        );
        // Said once, not "cannot open the database: cannot open the file".
        assert_eq!(stderr.matches("cannot open").count(), 1, "{format}: {all}");
    }
}

/// Pretty logs are for people at a terminal; written to a pipe or a file
/// (a pod's log, `> out.log`) they must be plain text, not colour codes.
#[test]
fn pretty_logs_written_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/x.db?mode=rwc", dir.path().display());
    let out = vm(
        &["migrate"],
        &[
            ("APP_ENV", "staging"),
            ("VM_DB_URL", &url),
            ("LOG_FORMAT", "pretty"),
            ("LOG_LEVEL", "info"),
        ],
    )
    .output()
    .expect("run vm-webapp");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("migrations complete"), "{stdout}");
    assert!(!stdout.contains('\u{1b}'), "escape codes in: {stdout:?}");
}

#[tokio::test]
async fn migrate_is_idempotent_on_sqlite_and_serve_refuses_an_unmigrated_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/x.db?mode=rwc", dir.path().display());
    let empty = format!("sqlite://{}/empty.db?mode=rwc", dir.path().display());
    migrate_twice_then_serve_refuses_unmigrated(&url, &empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_on_postgres_and_serve_refuses_an_unmigrated_database() {
    let url = support::pg::fresh_database().await;
    let empty = support::pg::fresh_database().await;
    migrate_twice_then_serve_refuses_unmigrated(&url, &empty).await;
}

// ---------------------------------------------------------------------------
// SIGTERM
// ---------------------------------------------------------------------------

/// What `/health/ready` looks like to a prober during shutdown.
#[derive(Debug, Default)]
struct ProbeLog {
    not_ready: usize,
    ready: usize,
    refused: usize,
}

/// Probes readiness until the process exits; returns what was seen and the exit status.
async fn probe_until_exit(
    p: &mut Proc,
    port: u16,
    timeout: Duration,
) -> (ProbeLog, ExitStatus, Duration) {
    let start = Instant::now();
    let mut log = ProbeLog::default();
    loop {
        if let Some(status) = p.try_status() {
            return (log, status, start.elapsed());
        }
        match http(port, "GET", "/api/v2/health/ready", None).await {
            Ok((503, body)) => {
                assert_eq!(body["status"], "not_ready", "{body}");
                log.not_ready += 1;
            }
            Ok((200, _)) => log.ready += 1,
            Ok((code, body)) => panic!("unexpected readiness answer {code}: {body}"),
            Err(_) => log.refused += 1,
        }
        if start.elapsed() > timeout {
            let _ = p.child.kill();
            panic!(
                "{} did not exit within {timeout:?} of SIGTERM\n{}",
                p.name,
                p.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_step_finish_and_a_restart_completes_the_run() {
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut serve = local_serve(root.path(), port, &[]);
    wait_live(&mut serve, port).await;
    assert!(
        serve.stdout().contains("Create a first run"),
        "local mode prints a first-run hint\n{}",
        serve.output()
    );

    let id = create_run(
        port,
        json!({"input": {"name": "Ada"}, "steps": [
            {"kind": "delay", "ms": 1500},
            {"kind": "template", "template": "Hello, {{input.name}}!"}
        ]}),
    )
    .await;
    wait_event(&mut serve, port, &id, "step.started").await;
    serve.terminate();
    let (probes, status, took) = probe_until_exit(&mut serve, port, Duration::from_secs(15)).await;
    let output = serve.output();
    assert_eq!(status.code(), Some(0), "{output}");
    // Readiness must never claim `ready` once shutdown has begun.
    assert_eq!(
        probes.ready, 0,
        "ready answered 200 after SIGTERM: {probes:?}"
    );
    // The in-flight delay (1.5 s) is waited for, well inside the 20 s default grace.
    assert!(
        took >= Duration::from_millis(700),
        "exited after {took:?}: the in-flight step was not waited for\n{output}"
    );
    assert!(output.contains("stopped cleanly"), "{output}");
    // A clean stop leaves one self-contained database file: SQLite folds the
    // WAL into it when the last connection (the run-creation thread's too)
    // closes.
    let wal = root
        .path()
        .join(format!("{}-wal", vm_webapp::config::EMBEDDED_DB_FILE));
    let left = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert_eq!(left, 0, "{} bytes left in the WAL after a clean stop", left);

    let mut again = local_serve(root.path(), port, &[]);
    wait_live(&mut again, port).await;
    let run = wait_status(&mut again, port, &id, "succeeded").await;
    assert_eq!(run["steps"][0]["attempts"], 1, "{run}");
    assert_eq!(run["steps"][0]["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][1]["output"], "Hello, Ada!", "{run}");
    let all = events(port, &id).await;
    assert_eq!(
        event_types(&all, 0),
        ["step.started", "step.succeeded"],
        "{all:?}"
    );
    again.terminate();
    assert_eq!(
        again.wait(QUICK).await.code(),
        Some(0),
        "{}",
        again.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_short_grace_releases_the_step_and_a_restart_completes_the_run() {
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let grace = [("VM_SHUTDOWN_GRACE_MS", "200")];
    let mut serve = local_serve(root.path(), port, &grace);
    wait_live(&mut serve, port).await;
    let id = create_run(
        port,
        json!({"steps": [{"kind": "delay", "ms": 4000}, {"kind": "template", "template": "after the delay"}]}),
    )
    .await;
    wait_event(&mut serve, port, &id, "step.started").await;
    serve.terminate();
    let started = Instant::now();
    let status = serve.wait(Duration::from_secs(10)).await;
    let output = serve.output();
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "exit took {:?}; the grace is 200 ms\n{output}",
        started.elapsed()
    );

    let mut again = local_serve(root.path(), port, &[]);
    wait_live(&mut again, port).await;
    let all = events(port, &id).await;
    let step0 = event_types(&all, 0);
    assert_eq!(&step0[..2], ["step.started", "step.released"], "{all:?}");
    let run = wait_status(&mut again, port, &id, "succeeded").await;
    // Releasing on shutdown does not spend an attempt.
    assert_eq!(run["steps"][0]["attempts"], 1, "{run}");
    assert_eq!(run["output"], "after the delay", "{run}");
    let all = events(port, &id).await;
    assert_eq!(
        event_types(&all, 0),
        [
            "step.started",
            "step.released",
            "step.started",
            "step.succeeded"
        ],
        "{all:?}"
    );
    again.terminate();
    assert_eq!(
        again.wait(QUICK).await.code(),
        Some(0),
        "{}",
        again.output()
    );
}

/// A clean stop while another process holds SQLite's write lock (a
/// `sqlite3` shell in `BEGIN IMMEDIATE`, a backup tool): the cleanup writes
/// of the stop (the worker's heartbeat removal, the maintenance lease given
/// up) are given up quickly instead of each waiting out the 10 s busy
/// timeout, about 20 s in all; their rows expire by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_another_process_holds_the_sqlite_write_lock_stops_quickly() {
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut serve = local_serve(root.path(), port, &[]);
    wait_live(&mut serve, port).await;
    let file = root.path().join(vm_webapp::config::EMBEDDED_DB_FILE);
    let other = rusqlite::Connection::open(&file).expect("open the database");
    // The embedded worker has beaten and leads queue maintenance: both
    // rows are there for the stop to clean up.
    let deadline = Instant::now() + QUICK;
    loop {
        let rows: i64 = other
            .query_row(
                "SELECT (SELECT COUNT(*) FROM worker_heartbeats) \
                 + (SELECT COUNT(*) FROM maintenance_leader WHERE expires_at > 0)",
                [],
                |r| r.get(0),
            )
            .expect("read");
        if rows == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat or leader\n{}",
            serve.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    other
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    serve.terminate();
    let started = Instant::now();
    let status = serve.wait(Duration::from_secs(60)).await;
    let took = started.elapsed();
    let output = serve.output();
    other.execute_batch("ROLLBACK").expect("release the lock");
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("stopped cleanly"), "{output}");
    assert!(
        took < Duration::from_secs(5),
        "the stop took {took:?} while the write lock was held\n{output}"
    );
}

/// Locally a person presses Ctrl-C twice when the first waits for a long
/// step: the second signal must end the process at once instead of sitting
/// out the whole grace (20 s by default), and give the step back to the queue
/// (released, no attempt spent) rather than leave it to a lease expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_serve_at_once_and_releases_the_running_step() {
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut serve = local_serve(root.path(), port, &[]);
    wait_live(&mut serve, port).await;
    assert!(
        serve.stdout().contains("press it again to stop at once"),
        "the banner says how to stop:\n{}",
        serve.output()
    );
    // Start-up warnings are printed once (a log line), not twice.
    let output = serve.output();
    assert_eq!(
        output.matches("VM_API_KEYS is not set").count(),
        1,
        "{output}"
    );
    assert!(!output.contains("WARNING: no VM_API_KEYS"), "{output}");
    let id = create_run(port, json!({"steps": [{"kind": "delay", "ms": 60000}]})).await;
    wait_event(&mut serve, port, &id, "step.started").await;
    serve.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    serve.assert_running();
    let started = Instant::now();
    serve.terminate();
    let status = serve.wait(Duration::from_secs(10)).await;
    let output = serve.output();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the second signal took {:?} to stop serve\n{output}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("second stop signal"), "{output}");

    let db = vm_webapp::config::DatabaseSettings {
        url: vm_webapp::config::Secret::new(format!(
            "sqlite://{}/{}",
            root.path().display(),
            vm_webapp::config::EMBEDDED_DB_FILE
        )),
        backend: vm_webapp::config::DbBackend::Sqlite,
        embedded: true,
    };
    let store = vm_webapp::store::Store::connect(&db, 1)
        .await
        .expect("open the database");
    let run_id = uuid::Uuid::parse_str(&id).expect("run id");
    let events: Vec<String> = store
        .list_events(run_id, 0, 100)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert!(
        events.contains(&"step.released".to_string()),
        "the running step goes back to the queue: {events:?}"
    );
    let detail = store.get_run(run_id).await.expect("run").expect("exists");
    assert_eq!(
        (detail.steps[0].status, detail.steps[0].attempts),
        (vm_webapp::model::StepStatus::Queued, 0),
        "released without spending an attempt"
    );
}

/// The README's first run is the one the banner prints: one example, so
/// what a newcomer reads is what the terminal shows (they once differed in
/// their steps).
#[test]
fn the_readme_first_run_is_the_command_the_banner_prints() {
    let readme = include_str!("../../README.md");
    let banner = vm_webapp::runtime::banner(
        "127.0.0.1:8000".parse().expect("address"),
        Duration::from_secs(20),
        false,
    );
    let command = banner
        .lines()
        .find(|l| l.contains("curl -s -X POST"))
        .expect("the banner shows a first run")
        .trim();
    assert!(
        readme.contains(command),
        "README.md lacks the banner's command:\n{command}"
    );
    assert!(
        command.contains(r#""kind":"llm""#),
        "the first run shows every instant kind, llm included: {command}"
    );
}

/// Every error code the API can answer is in the README's list, so a client
/// author reading it can handle them all (`quota_exceeded`, `unknown_plan`,
/// `invalid_period`, `tenant_not_found` and `invalid_text` were missing).
#[test]
fn the_readme_lists_every_error_code() {
    let readme = include_str!("../../README.md");
    let source = include_str!("../src/http/error.rs");
    let body = &source[source.find("pub fn code(&self)").expect("ApiError::code")..];
    let body = &body[..body.find("\n    }\n").expect("end of ApiError::code")];
    let codes: Vec<&str> = body
        .lines()
        .filter_map(|l| l.split("=> \"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(codes.len() > 30, "parsed {codes:?}");
    let missing: Vec<&&str> = codes
        .iter()
        .filter(|c| !readme.contains(&format!("`{c}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md lacks error codes {missing:?}"
    );
}

/// With VM_API_KEYS set, every route but the probes wants a key: the
/// banner's commands carry the header (they answered 401 as printed) and it
/// says where KEY comes from. Without keys they stay as the README shows them.
#[test]
fn the_banner_commands_carry_a_key_when_keys_are_required() {
    let addr = "127.0.0.1:8000".parse().expect("address");
    let with_keys = vm_webapp::runtime::banner(addr, Duration::from_secs(20), true);
    let curls: Vec<&str> = with_keys.lines().filter(|l| l.contains("curl ")).collect();
    assert_eq!(curls.len(), 2, "{with_keys}");
    for line in curls {
        assert_eq!(
            line.matches(r#"-H "Authorization: Bearer $KEY""#).count(),
            line.matches("curl ").count(),
            "{line}"
        );
    }
    assert!(with_keys.contains("VM_API_KEYS"), "{with_keys}");
    let open = vm_webapp::runtime::banner(addr, Duration::from_secs(20), false);
    assert!(!open.contains("Authorization"), "{open}");
}

/// A port in use must stop `serve` before it opens the database or starts
/// the embedded worker (which used to claim jobs for a moment), and say how
/// to pick another port.
#[tokio::test]
async fn a_port_in_use_fails_before_the_database_is_touched_and_says_how_to_move() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let root = tempfile::tempdir().expect("tempdir");
    let (status, output) = run(
        "serve",
        vm(
            &["serve", "--port", &port.to_string()],
            &[("VM_WORKSPACE_ROOT", &root.path().display().to_string())],
        ),
    )
    .await;
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("in use") && output.contains("make run PORT=8001"),
        "{output}"
    );
    assert!(
        std::fs::read_dir(root.path())
            .expect("read root")
            .next()
            .is_none(),
        "serve opened the database although it could not listen\n{output}"
    );
    drop(taken);
}

/// Readiness must be observable as `503 not_ready` for as long as the process
/// drains, so that probers see "going away" instead of a refused connection.
/// Without this the contract's "flips to not_ready while shutting down" is
/// never visible from outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn serve_answers_not_ready_while_it_drains_after_sigterm() {
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut serve = local_serve(root.path(), port, &[]);
    wait_live(&mut serve, port).await;
    let id = create_run(port, json!({"steps": [{"kind": "delay", "ms": 1500}]})).await;
    wait_event(&mut serve, port, &id, "step.started").await;
    serve.terminate();
    let (probes, status, _) = probe_until_exit(&mut serve, port, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", serve.output());
    // The drain lasts about a second; probes every few milliseconds must mostly
    // be answered 503, not refused (a stray 503 in the instant between the flag
    // and the listener closing does not count).
    assert!(
        probes.not_ready >= 10 && probes.not_ready > probes.refused,
        "readiness was not observable as not_ready during the drain: {probes:?}"
    );
}

// ---------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------

/// The files `serve` writes are capped at this many bytes: room for the
/// migrated database and a few hundred runs.
const DISK_BYTES: u64 = 2 << 20;

/// A `vm-webapp` command as [`vm`] makes it, whose files cannot grow past
/// `bytes` (RLIMIT_FSIZE, set by util-linux's `prlimit`; SIGXFSZ ignored,
/// so a write past the cap fails instead of killing the process). SQLite
/// then meets what a full disk does: a write cut short is `SQLITE_FULL`, a
/// write past the cap `SQLITE_IOERR_WRITE`, and a `COMMIT` that fails so
/// rolls its transaction back. No filesystem is mounted, so this runs
/// unprivileged. `None` when `prlimit` cannot be run.
fn vm_on_a_small_disk(bytes: u64, args: &[&str], vars: &[(&str, &str)]) -> Option<Command> {
    let found = Command::new("prlimit")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return None;
    }
    let plain = vm(args, vars);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "trap '' XFSZ; exec prlimit --fsize={bytes}: -- \"$0\" \"$@\""
        ))
        .arg(plain.get_program())
        .args(plain.get_args())
        .env_clear();
    for (key, value) in plain.get_envs() {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    cmd.stdin(Stdio::null());
    Some(cmd)
}

/// Gives the disk of a process started by [`vm_on_a_small_disk`] its room back.
fn free_the_disk(p: &Proc) {
    let ok = Command::new("prlimit")
        .args(["--pid", &p.pid().to_string(), "--fsize=unlimited:"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "prlimit could not lift the file size cap of {}", p.name);
}

/// A run whose input takes a few pages, to fill the disk quickly.
fn bulky_run() -> Value {
    json!({"input": {"pad": "x".repeat(16 * 1024)}, "steps": [{"kind": "template", "template": "ok"}]})
}

fn small_run() -> Value {
    json!({"steps": [{"kind": "template", "template": "ok"}]})
}

/// `serve` on SQLite while the disk fills up under concurrent `POST
/// /api/v2/runs`, then has room again; `plans` loads a plans file, so that
/// run creation goes through the sqlx pool instead of the SQLite writer
/// thread. Full: creations answer 503 `dependency_unavailable` at once and
/// readiness says the database refuses writes. Room again: creations are
/// stored within seconds, readiness is ready, the worker runs them, and
/// SIGTERM under load completes.
///
/// Without closing a pool connection whose `COMMIT` SQLite refused (and
/// rolled back itself), sqlx reused it believing a transaction open, its
/// next rollback kept SQLite's write lock, and every creation (on either
/// path: the worker's transactions use the pool too) waited out the busy
/// timeout for good, 408 or 503 after 10 s, with readiness `ready`; on the
/// pool path a full disk also answered 500 `internal`.
async fn full_disk_degrades_and_recovers(plans: bool) {
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("sqlite://{}/vm.db?mode=rwc", root.path().display());
    let plans_file = root.path().join("plans.yaml");
    std::fs::write(
        &plans_file,
        "default_plan: open\nplans:\n  open:\n    meters:\n      runs: {allowance: 1000000, overage: allow, unit_price: 0}\n",
    )
    .expect("plans file");
    let plans_file = plans_file.display().to_string();
    let mut vars = vec![
        ("APP_ENV", "local"),
        (
            "VM_WORKSPACE_ROOT",
            root.path().to_str().expect("utf-8 path"),
        ),
        ("VM_DB_URL", url.as_str()),
        ("VM_SHUTDOWN_GRACE_MS", "2000"),
        ("VM_RATE_LIMIT_IP_RPS", "100000"),
        ("VM_RATE_LIMIT_IP_BURST", "100000"),
        ("VM_RATE_LIMIT_KEY_RPS", "100000"),
        ("VM_RATE_LIMIT_KEY_BURST", "100000"),
        // The logs are capped like the database; warnings say enough.
        ("LOG_LEVEL", "warn"),
    ];
    if plans {
        vars.push(("VM_PLANS_FILE", plans_file.as_str()));
    }
    let port_arg = port.to_string();
    let Some(cmd) = vm_on_a_small_disk(DISK_BYTES, &["serve", "--port", &port_arg], &vars) else {
        eprintln!(
            "skipped: util-linux's prlimit is not installed, so no file size cap can stand in for a full disk"
        );
        return;
    };
    let mut serve = Proc::spawn("serve", cmd);
    wait_live(&mut serve, port).await;

    // Fill the disk: concurrent creations until one is refused, then a
    // little longer, so that commits fail on several connections at once.
    let refused = std::sync::Arc::new(std::sync::Mutex::new(None::<(u16, Value)>));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (refused, stop) = (refused.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match http(port, "POST", "/api/v2/runs", Some(&bulky_run())).await {
                        Ok((202, _)) => {}
                        Ok(answer) => {
                            refused.lock().expect("lock").get_or_insert(answer);
                        }
                        Err(e) => {
                            let e = json!({"error": e.to_string()});
                            refused.lock().expect("lock").get_or_insert((0, e));
                        }
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while refused.lock().expect("lock").is_none() {
        serve.assert_running();
        assert!(
            Instant::now() < deadline,
            "the disk never filled up\n{}",
            serve.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    let first = refused.lock().expect("lock").take().expect("a refusal");
    assert_eq!(first.0, 503, "{first:?}\n{}", serve.output());
    assert_eq!(first.1["code"], "dependency_unavailable", "{first:?}");

    // Full: refused at once (a small run may still fit in the last few
    // bytes, so until the first refusal), and readiness says why.
    let mut answered = None;
    for _ in 0..50 {
        let started = Instant::now();
        let (status, body) = call(port, "POST", "/api/v2/runs", Some(&small_run())).await;
        if status != 202 {
            answered = Some((status, body, started.elapsed()));
            break;
        }
    }
    let (status, body, took) = answered.expect("a creation refused while the disk is full");
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("dependency_unavailable")),
        "{body}"
    );
    assert!(took < Duration::from_secs(3), "refused after {took:?}");
    let (status, ready) = call(port, "GET", "/api/v2/health/ready", None).await;
    assert_eq!(status, 503, "ready while the disk is full: {ready}");
    assert_eq!(
        ready["dependencies"]["database"]["reason"],
        "database refuses writes (disk full or I/O error)",
        "{ready}"
    );

    // Room again: creations are stored within seconds, without a restart.
    free_the_disk(&serve);
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        serve.assert_running();
        match http(port, "POST", "/api/v2/runs", Some(&small_run())).await {
            Ok((202, run)) => break run["id"].as_str().expect("run id").to_string(),
            answer => assert!(
                Instant::now() < deadline,
                "creations still fail after the disk has room: {answer:?}\n{}",
                serve.output()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let started = Instant::now();
    create_run(port, small_run()).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Ready again once refusals have stopped for a few seconds and a probe
    // write commits.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, ready) = call(port, "GET", "/api/v2/health/ready", None).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready after the disk has room: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_status(&mut serve, port, &id, "succeeded").await;

    // SIGTERM under load completes.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                while http(port, "POST", "/api/v2/runs", Some(&small_run()))
                    .await
                    .is_ok()
                {}
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    serve.terminate();
    let status = serve.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", serve.output());
    for client in clients {
        client.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_degrades_creation_through_the_pool_and_it_recovers_once_there_is_room() {
    full_disk_degrades_and_recovers(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_degrades_creation_on_the_sqlite_writer_thread_and_it_recovers_once_there_is_room()
 {
    full_disk_degrades_and_recovers(false).await;
}

// ---------------------------------------------------------------------------
// The standalone worker
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_serves_probes_drains_jobs_from_an_api_only_serve_and_exits_on_sigterm() {
    let url = support::pg::fresh_database().await;
    let base = [("APP_ENV", "staging"), ("VM_DB_URL", url.as_str())];
    let (status, output) = run("migrate", vm(&["migrate"], &base)).await;
    assert_eq!(status.code(), Some(0), "{output}");

    // An API-only serve: managed mode keeps the worker out of the API process.
    let api_port = free_port();
    let mut managed = base.to_vec();
    managed.extend([
        ("VM_ENABLE_MANAGED_MODE", "true"),
        ("VM_REDIS_URL", "redis://127.0.0.1:1"),
    ]);
    let mut serve = Proc::spawn(
        "serve",
        vm(&["serve", "--port", &api_port.to_string()], &managed),
    );
    wait_live(&mut serve, api_port).await;
    let (code, ready) = call(api_port, "GET", "/api/v2/health/ready", None).await;
    assert_eq!(
        code, 200,
        "an API-only serve is ready without a worker: {ready}"
    );
    assert_eq!(ready["dependencies"]["database"]["status"], "ok", "{ready}");

    let body = json!({"input": {"name": "Ada"}, "steps": [
        {"kind": "template", "template": "Hello, {{input.name}}!"},
        {"kind": "transform", "op": "uppercase"}
    ]});
    let id = create_run(api_port, body).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, run) = call(api_port, "GET", &format!("/api/v2/runs/{id}"), None).await;
    assert_eq!(
        run["status"], "queued",
        "an API-only serve executed a job: {run}"
    );

    let health_port = free_port();
    let mut worker = Proc::spawn(
        "worker",
        vm(
            &[
                "worker",
                "--poll-interval-ms",
                "50",
                "--concurrency",
                "2",
                "--health-host",
                "127.0.0.1",
                "--health-port",
                &health_port.to_string(),
            ],
            &base,
        ),
    );
    wait_live(&mut worker, health_port).await;
    let run = wait_status(&mut serve, api_port, &id, "succeeded").await;
    assert_eq!(run["output"], "HELLO, ADA!", "{run}");
    worker.assert_running();

    let deadline = Instant::now() + QUICK;
    let ready = loop {
        let (code, ready) = call(health_port, "GET", "/api/v2/health/ready", None).await;
        if code == 200 {
            break ready;
        }
        assert!(
            Instant::now() < deadline,
            "worker never became ready: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["dependencies"]["database"]["status"], "ok", "{ready}");
    assert_eq!(ready["dependencies"]["worker"]["status"], "ok", "{ready}");
    let (code, _) = call(health_port, "GET", "/api/v2/runs", None).await;
    assert_eq!(code, 404, "the worker's health port serves probes only");

    // A job in flight when SIGTERM arrives is drained before exit.
    let id = create_run(api_port, json!({"steps": [{"kind": "delay", "ms": 1000}]})).await;
    wait_event(&mut serve, api_port, &id, "step.started").await;
    worker.terminate();
    let (probes, status, _) =
        probe_until_exit(&mut worker, health_port, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.output());
    assert_eq!(
        probes.ready, 0,
        "worker answered ready after SIGTERM: {probes:?}"
    );
    let run = wait_status(&mut serve, api_port, &id, "succeeded").await;
    assert_eq!(run["steps"][0]["attempts"], 1, "{run}");

    serve.terminate();
    assert_eq!(
        serve.wait(QUICK).await.code(),
        Some(0),
        "{}",
        serve.output()
    );
}

/// See `serve_answers_not_ready_while_it_drains_after_sigterm`: the worker's
/// probes must keep answering (ready: 503) until its in-flight jobs are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn worker_answers_not_ready_while_it_drains_after_sigterm() {
    use vm_webapp::model::NewRun;
    use vm_webapp::store::CreateOutcome;

    let env = support::TestEnv::new(support::Backend::Sqlite, &[]).await;
    let url = format!("sqlite://{}/test.db?mode=rwc", env.dir.path().display());
    let health_port = free_port();
    let mut worker = Proc::spawn(
        "worker",
        vm(
            &[
                "worker",
                "--poll-interval-ms",
                "50",
                "--health-host",
                "127.0.0.1",
                "--health-port",
                &health_port.to_string(),
            ],
            &[("APP_ENV", "staging"), ("VM_DB_URL", &url)],
        ),
    );
    wait_live(&mut worker, health_port).await;
    let input = json!({});
    let new = NewRun {
        steps: vm_webapp::steps::parse_steps(&[json!({"kind": "delay", "ms": 1500})], &input)
            .expect("steps"),
        input,
        idempotency_key: None,
        request_hash: "drain".into(),
        correlation_id: "drain".into(),
        max_attempts: 3,
        actor: "test".into(),
        request_id: None,
        tenant: "anonymous".to_string(),
    };
    let id = match env.store.create_run(&new).await.expect("create run") {
        CreateOutcome::Created(run) => run.id,
        other => panic!("expected a new run, got {other:?}"),
    };
    let deadline = Instant::now() + SLOW;
    while !env
        .event_types(id)
        .await
        .iter()
        .any(|e| e == "step.started")
    {
        worker.assert_running();
        assert!(
            Instant::now() < deadline,
            "the worker never started the step"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.terminate();
    let (probes, status, _) =
        probe_until_exit(&mut worker, health_port, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.output());
    // The drain lasts about a second; probes every few milliseconds must mostly
    // be answered 503, not refused (a stray 503 in the instant between the flag
    // and the listener closing does not count).
    assert!(
        probes.not_ready >= 10 && probes.not_ready > probes.refused,
        "readiness was not observable as not_ready during the drain: {probes:?}"
    );
}

/// Processes that reach the database and the LLM endpoint, at trace level,
/// still print no secret: neither the database password, nor the API key in
/// the bearer header, nor the Redis password.
/// The full managed set-up (migrate, API-only serve, separate worker) with
/// real secrets configured: a real PostgreSQL password in the URL, a Redis that
/// requires a password, an LLM key. Logs at trace level, error bodies and
/// metrics of both processes must never contain any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_error_bodies_or_metrics_of_a_managed_deployment() {
    let fake = support::fake_llm::FakeLlm::start(vec![
        support::fake_llm::Answer::Status(500),
        support::fake_llm::Answer::Text("a summary"),
    ])
    .await;
    let redis = support::redis::RedisServer::start_with_password(REDIS_PASSWORD);
    let plain = support::pg::fresh_database().await;
    let url = plain.replacen("postgres@", &format!("postgres:{DB_PASSWORD}@"), 1);
    assert_ne!(url, plain, "the URL carries a password");
    let redis_url = redis.url();
    assert!(redis_url.contains(REDIS_PASSWORD));
    let vars = [
        ("APP_ENV", "production"),
        ("VM_ENABLE_MANAGED_MODE", "true"),
        ("VM_API_KEYS", API_KEYS),
        ("VM_DB_URL", url.as_str()),
        ("VM_REDIS_URL", redis_url.as_str()),
        ("KIMI_API_KEY", API_KEY),
        ("KIMI_BASE_URL", fake.base_url.as_str()),
        ("VM_JOB_BACKOFF_BASE_MS", "50"),
        ("LOG_LEVEL", "trace"),
        ("LOG_FORMAT", "json"),
    ];
    let (status, migrate_output) = run("migrate", vm(&["migrate"], &vars)).await;
    assert_eq!(status.code(), Some(0), "{migrate_output}");
    assert_no_secret(&migrate_output);

    let port = free_port();
    let health_port = free_port();
    let mut serve = Proc::spawn("serve", vm(&["serve", "--port", &port.to_string()], &vars));
    let mut worker = Proc::spawn(
        "worker",
        vm(
            &[
                "worker",
                "--poll-interval-ms",
                "100",
                "--health-port",
                &health_port.to_string(),
                "--health-host",
                "127.0.0.1",
            ],
            &vars,
        ),
    );
    wait_live(&mut serve, port).await;
    wait_live(&mut worker, health_port).await;

    let mut bodies = Vec::new();
    let id = create_run(port, json!({"input": {"topic": "queues"}, "steps": [{"kind": "llm", "prompt": "Explain {{input.topic}}"}]})).await;
    let run = wait_status(&mut serve, port, &id, "succeeded").await;
    assert_eq!(run["output"]["text"], "a summary", "{run}");
    assert_eq!(run["steps"][0]["attempts"], 2, "the 500 was retried: {run}");
    let requests = fake.requests();
    assert_eq!(
        requests[0].0.as_deref(),
        Some(format!("Bearer {API_KEY}").as_str()),
        "the key was used"
    );
    bodies.push(run.to_string());
    for (method, path, body) in [
        (
            "POST",
            "/api/v2/runs".to_string(),
            Some(json!({"steps": [{"kind": "nope"}]})),
        ),
        ("GET", "/api/v2/runs/not-a-run".to_string(), None),
        ("GET", format!("/api/v2/runs/{id}/events"), None),
        ("GET", "/api/v2/health/ready".to_string(), None),
        ("GET", "/metrics".to_string(), None),
    ] {
        let (_, reply) = call(port, method, &path, body.as_ref()).await;
        bodies.push(reply.to_string());
    }
    let (code, ready) = call(port, "GET", "/api/v2/health/ready", None).await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["dependencies"]["redis"]["status"], "ok", "{ready}");
    assert_eq!(ready["dependencies"]["worker"]["status"], "ok", "{ready}");
    for path in ["/metrics", "/api/v2/health/ready"] {
        let (_, reply) = call(health_port, "GET", path, None).await;
        bodies.push(reply.to_string());
    }
    let metrics = bodies
        .iter()
        .find(|b| b.contains("vm_jobs_claimed_total"))
        .cloned()
        .unwrap_or_default();
    assert!(!metrics.is_empty(), "metrics were scraped");
    for body in &bodies {
        assert_no_secret(body);
    }

    serve.terminate();
    worker.terminate();
    assert_eq!(
        serve.wait(QUICK).await.code(),
        Some(0),
        "{}",
        serve.output()
    );
    assert_eq!(
        worker.wait(QUICK).await.code(),
        Some(0),
        "{}",
        worker.output()
    );
    for p in [&serve, &worker] {
        let output = p.output();
        assert!(
            output.contains("\"level\":\"TRACE\""),
            "trace logging was on"
        );
        assert_no_secret(&output);
    }
    // JSON lines carry the ids on-call people search by.
    let api_log = serve.output();
    assert!(
        api_log.contains("\"request_id\""),
        "request lines carry request_id"
    );
    let worker_log = worker.output();
    assert!(
        worker_log.contains(&format!("\"run_id\":\"{id}\"")),
        "job lines carry run_id"
    );
    assert!(
        worker_log.contains("\"correlation_id\""),
        "job lines carry correlation_id"
    );
}
