//! Test harness: runs the real `keygate` binary on ephemeral ports with its own data dir,
//! captures its logs, and hands out authenticated admin clients. Also finds the test tools
//! (Envoy, grpcurl) that `./scripts/test` installs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate::proto::admin::v1::key_admin_client::KeyAdminClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Admin = KeyAdminClient<InterceptedService<Channel, BearerToken>>;

#[derive(Clone)]
pub struct BearerToken(pub Option<String>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            let v: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

/// A running `keygate serve` process.
pub struct Keygate {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub authz_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    _tmp: Option<tempfile::TempDir>,
}

/// Options for starting keygate.
#[derive(Default, Clone)]
pub struct Options {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Reuse this data dir (restarts); a fresh temp dir otherwise.
    pub data_dir: Option<PathBuf>,
    /// Fixed ports (e.g. for Envoy configs written before keygate starts).
    pub authz_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

pub fn keygate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keygate")
}

impl Keygate {
    pub async fn start() -> Keygate {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Keygate {
        let (tmp, data_dir) = match &opts.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::tempdir().unwrap();
                let d = t.path().join("data");
                (Some(t), d)
            }
        };
        let mut cmd = Command::new(keygate_bin());
        cmd.arg("--log-format")
            .arg("json")
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--authz-addr")
            .arg(
                opts.authz_addr
                    .map(|a| a.to_string())
                    .unwrap_or("127.0.0.1:0".into()),
            )
            .arg("--admin-addr")
            .arg(
                opts.admin_addr
                    .map(|a| a.to_string())
                    .unwrap_or("127.0.0.1:0".into()),
            )
            .args(&opts.args)
            .env("KEYGATE_LOG", "debug")
            .env_remove("KEYGATE_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn keygate");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (authz_addr, admin_addr) = loop {
            if let Some(addrs) = logs.lock().unwrap().iter().find_map(|l| ready_addrs(l)) {
                break addrs;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "keygate exited with {status} before becoming ready:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "keygate not ready within 30 s:\n{}",
                logs.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Keygate {
            child: Some(child),
            data_dir,
            authz_addr,
            admin_addr,
            logs,
            _tmp: tmp,
        }
    }

    /// The admin token keygate generated in its data dir.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub async fn admin(&self) -> Admin {
        self.admin_with_token(Some(self.admin_token())).await
    }

    pub async fn admin_with_token(&self, token: Option<String>) -> Admin {
        let channel = Channel::from_shared(format!("http://{}", self.admin_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to admin port");
        KeyAdminClient::with_interceptor(channel, BearerToken(token))
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// SIGTERM, then wait (bounded) for a clean exit. Returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("keygate did not stop within 20 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Hard kill (no graceful shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Keeps the data dir alive beyond this process (for restarts).
    pub fn take_tempdir(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }
}

impl Drop for Keygate {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ready_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let f = v.get("fields")?;
    if f.get("message")?.as_str()? != "keygate ready" {
        return None;
    }
    Some((
        f.get("authz_addr")?.as_str()?.parse().ok()?,
        f.get("admin_addr")?.as_str()?.parse().ok()?,
    ))
}

/// Every byte of every file under `dir`, for "no plaintext secret on disk" checks.
pub fn all_file_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

pub fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A tool installed by `./scripts/test` into `target/test-venv` (or named by an env var).
/// Missing tools fail the test: these suites must run, never skip.
pub fn test_tool(name: &str, env_var: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_var) {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-venv/bin")
        .join(name);
    assert!(
        venv.exists(),
        "{name} not found at {} and {env_var} is not set: run ./scripts/test (it installs the test tools)",
        venv.display()
    );
    venv
}

pub fn envoy_bin() -> PathBuf {
    test_tool("envoy", "KEYGATE_TEST_ENVOY")
}

pub fn grpcurl_bin() -> PathBuf {
    test_tool("grpcurl", "KEYGATE_TEST_GRPCURL")
}

/// Polls `f` every 5 ms until it returns `Some`, or panics after `limit`.
pub async fn poll_until<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
