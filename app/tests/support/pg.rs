//! A real PostgreSQL server for tests: `initdb` into a temporary directory and
//! `postgres` on a random loopback port, run as the `postgres` user when the
//! tests run as root (PostgreSQL refuses root). One server is shared by all
//! tests of a test binary; each test gets its own database. A watchdog stops
//! the server when the test process exits, however it exits.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::Connection;

/// A running server.
pub struct PgServer {
    pub port: u16,
    pub base: PathBuf,
    bindir: PathBuf,
    as_root: bool,
}

fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("VM_TEST_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.retain(|p| p.join("initdb").exists());
    candidates.sort();
    candidates.pop().expect(
        "PostgreSQL server binaries not found: install postgresql-15 or set VM_TEST_PG_BINDIR",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl PgServer {
    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn data(&self) -> PathBuf {
        self.base.join("data")
    }

    /// Initialises and starts a new server. It is stopped by the watchdog when
    /// this process exits, or earlier by [`PgServer::stop`].
    pub fn start() -> PgServer {
        let base =
            std::env::temp_dir().join(format!("vm-test-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&base).expect("create pg base dir");
        let server = PgServer {
            port: free_port(),
            base,
            bindir: bindir(),
            as_root: is_root(),
        };
        if server.as_root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&server.base)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "cannot hand the test directory to the postgres user");
        }
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(server.data())
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        server.launch();
        server.spawn_watchdog();
        server
    }

    /// Starts (or restarts) the postmaster and waits until it accepts connections.
    pub fn launch(&self) {
        let log = std::fs::File::create(self.base.join("server.log")).expect("log file");
        // `VM_TEST_PG_STOCK=1` (the benchmark) keeps PostgreSQL's own settings
        // (fsync on, full page writes, 128 MB shared buffers), as users run it.
        let stock = std::env::var("VM_TEST_PG_STOCK").is_ok_and(|v| v == "1");
        let tuning: &[&str] = if stock {
            &["-c", "max_connections=300"]
        } else {
            // fsync off keeps tests fast; commits stay synchronous so that an
            // immediate stop (the outage tests) never loses acknowledged work.
            &[
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=64MB",
            ]
        };
        self.command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.base.display()))
            .args(tuning)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start; see {}",
                self.base.join("server.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server immediately (an outage, as far as clients can tell).
    pub fn stop(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn spawn_watchdog(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             kill -QUIT $(head -1 '{data}/postmaster.pid' 2>/dev/null) 2>/dev/null; sleep 1; rm -rf '{base}'",
            pid = std::process::id(),
            data = self.data().display(),
            base = self.base.display(),
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start watchdog");
    }

    /// URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new empty database and returns its URL.
    pub async fn create_database(&self) -> String {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect to postgres");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        let _ = conn.close().await;
        self.url(&name)
    }

    pub fn base(&self) -> &Path {
        &self.base
    }
}

/// The server shared by this test binary.
pub fn shared() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}

/// A fresh database on the shared server.
pub async fn fresh_database() -> String {
    let server = tokio::task::spawn_blocking(shared)
        .await
        .expect("start postgres");
    server.create_database().await
}
