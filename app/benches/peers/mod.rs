//! The peers `make bench` measures beside vm-webapp in the same run, on the
//! same machine and the same PostgreSQL server: pgqueuer 1.6.0's own benchmark
//! script (`tools/benchmark.py` from its sdist) and a FastAPI + uvicorn anchor
//! (`fastapi_anchor.py`), driven by `wrk` with the same flags as vm-webapp.
//! `setup.sh` installs them (a virtualenv under `.venv-bench`, the sdist under
//! `var/bench`); when they are missing the peer columns say why.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the peers live, relative to the workspace root.
pub struct Peers {
    root: PathBuf,
    python: PathBuf,
    pgqueuer_script: PathBuf,
}

/// The workspace root (the bench runs with the app crate as its directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

impl Peers {
    /// The installed peers, or why they are not there.
    pub fn find() -> Result<Peers, String> {
        let root = workspace_root();
        let python = root.join(".venv-bench/bin/python");
        let pgqueuer_script = root.join("var/bench/pgqueuer-1.6.0/tools/benchmark.py");
        for p in [&python, &pgqueuer_script] {
            if !p.exists() {
                return Err(format!(
                    "{} is missing: run app/benches/peers/setup.sh (make bench does)",
                    p.strip_prefix(&root).unwrap_or(p).display()
                ));
            }
        }
        Ok(Peers {
            root,
            python,
            pgqueuer_script,
        })
    }

    /// libpq environment for a `postgres://user@host:port/db` URL.
    fn pg_env(url: &str) -> Vec<(String, String)> {
        let rest = url.trim_start_matches("postgres://");
        let (user, rest) = rest.split_once('@').unwrap_or(("postgres", rest));
        let (hostport, db) = rest.split_once('/').unwrap_or((rest, "postgres"));
        let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
        [
            ("PGUSER", user),
            ("PGHOST", host),
            ("PGPORT", port),
            ("PGDATABASE", db),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Installs pgqueuer's schema into the (fresh) database at `url`, then runs
    /// its benchmark script with `args` and returns its rate (jobs/s).
    pub fn pgqueuer(&self, url: &str, args: &[&str]) -> Result<f64, String> {
        let env = Self::pg_env(url);
        let install = Command::new(&self.python)
            .args(["-m", "pgqueuer", "install"])
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot start pgqueuer: {e}"))?;
        if !install.status.success() {
            return Err(format!(
                "pgqueuer install failed: {}",
                String::from_utf8_lossy(&install.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ));
        }
        let out = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        let run = Command::new(&self.python)
            .arg(&self.pgqueuer_script)
            .args(args)
            .arg("--output-json")
            .arg(out.path())
            .envs(env)
            .env("PGQUEUER_TABLEFMT", "plain")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot start pgqueuer's benchmark: {e}"))?;
        if !run.status.success() {
            return Err(format!(
                "pgqueuer benchmark failed: {}",
                String::from_utf8_lossy(&run.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ));
        }
        let result: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path()).map_err(|e| e.to_string())?)
                .map_err(|e| format!("pgqueuer wrote no result: {e}"))?;
        result["rate"]
            .as_f64()
            .ok_or_else(|| "pgqueuer's result has no rate".to_string())
    }

    /// Starts the FastAPI anchor (uvicorn, 2 workers) on `port`, storing runs
    /// in the SQLite file `db`, and waits until it answers.
    pub fn fastapi(&self, port: u16, db: &Path) -> Result<Server, String> {
        let child = Command::new(&self.python)
            .args([
                "-m",
                "uvicorn",
                "fastapi_anchor:app",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--workers",
                "2",
                "--log-level",
                "warning",
                "--no-access-log",
            ])
            .current_dir(self.root.join("app/benches/peers"))
            .env("ANCHOR_DB", db)
            // Its own process group, so that stopping it stops its workers
            // too (killed alone, uvicorn leaves them running, and they took
            // CPU from every figure measured after them).
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start uvicorn: {e}"))?;
        Server::ready(child, port)
    }
}

/// A server process, stopped when dropped.
pub struct Server {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Server {
    /// Waits (up to 30 s) until `GET /api/v2/health/live` answers 200.
    pub fn ready(mut child: Child, port: u16) -> Result<Server, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the server exited at start-up ({status})"));
            }
            let ok = std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .and_then(|mut s| {
                    use std::io::{Read, Write};
                    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                    s.write_all(
                        b"GET /api/v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    )
                    .ok()?;
                    let mut buf = [0u8; 12];
                    s.read_exact(&mut buf).ok()?;
                    Some(buf.ends_with(b"200"))
                })
                .unwrap_or(false);
            if ok {
                return Ok(Server { child, port });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("the server did not answer within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The process group the child leads, if it leads one (see
        // `fastapi`); for a child that leads none this names no group.
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!("kill -KILL -{} 2>/dev/null", self.child.id()),
            ])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `wrk` measured.
pub struct WrkResult {
    /// Requests per second.
    pub rate: f64,
    /// Answers that were not 2xx/3xx (a failed run of the bench).
    pub errors: u64,
}

/// `wrk -t1 -c32 -d<secs>s` against `path` on `port`, POSTing `body` (JSON)
/// when given, else GET.
pub fn wrk(port: u16, path: &str, body: Option<&str>, secs: u64) -> Result<WrkResult, String> {
    let script = tempfile::Builder::new()
        .suffix(".lua")
        .tempfile()
        .map_err(|e| e.to_string())?;
    if let Some(body) = body {
        let lua = format!(
            "wrk.method = \"POST\"\nwrk.body = [[{body}]]\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
        );
        std::fs::write(script.path(), lua).map_err(|e| e.to_string())?;
    }
    let out = Command::new("wrk")
        .args(["-t1", "-c32", &format!("-d{secs}s"), "-s"])
        .arg(script.path())
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .map_err(|e| format!("cannot start wrk (apt-get install wrk): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let rate = field("Requests/sec:")
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("wrk printed no rate: {text}"))?;
    let errors = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(WrkResult { rate, errors })
}

/// Peak resident memory of process `pid` in MB (`VmHWM`, Linux).
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18_080)
}
