//! A Redis server of a test's own (Debian's `redis-server`), on a port the test chooses, that it
//! can stop and start again (the rate-limit sharing suites stop Redis mid-run). Killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct OwnRedis {
    child: Child,
    pub port: u16,
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
}

impl OwnRedis {
    /// Starts it on `port` (keeping nothing on disk) and waits, bounded, until it accepts
    /// connections.
    pub fn start(port: u16) -> OwnRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        OwnRedis {
            child,
            port,
            url: format!("redis://127.0.0.1:{port}"),
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
