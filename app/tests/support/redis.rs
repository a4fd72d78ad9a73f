//! A real `redis-server` on a random loopback port, stoppable and restartable
//! on the same port to simulate an outage. Killed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A running (or stopped) server.
pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    /// Starts a server with persistence off.
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// Starts a server that requires `password`.
    pub fn start_with_password(password: &str) -> RedisServer {
        Self::start_with(Some(password.to_string()))
    }

    fn start_with(password: Option<String>) -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let server = RedisServer {
            port,
            password,
            child: Mutex::new(None),
        };
        server.launch();
        server
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// Starts the process and waits until it accepts connections.
    pub fn launch(&self) {
        let mut cmd = Command::new("redis-server");
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (make deps)");
        *self.child.lock().expect("lock") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freezes the process (SIGSTOP): connections stay open but nothing answers,
    /// the way a hung or partitioned Redis behaves.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused process.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = self.child.lock().expect("lock").as_ref() {
            let _ = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status();
        }
    }

    /// Kills the process (an outage).
    pub fn stop(&self) {
        self.resume();
        if let Some(mut child) = self.child.lock().expect("lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
