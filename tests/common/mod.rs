//! Test harness: runs the real `keygate` binary on ephemeral ports with its own data dir,
//! captures its logs, and hands out authenticated admin clients. Also finds the test tools
//! (Envoy, grpcurl, the venv's python) that `./scripts/test` installs.
#![allow(dead_code)]

pub mod admin;
pub mod envoy;
pub mod gateway;
pub mod postgres;
pub mod redis;
pub mod sdk;
pub mod secrets;
pub mod split;

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

pub use postgres::postgres_for;

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

/// Lines a child process wrote, collected by a reader thread.
pub type Logs = Arc<Mutex<Vec<String>>>;

/// A running `keygate` process of any shape (`serve`, `control-plane`, `authz`), started with
/// `--log-format json` and `KEYGATE_LOG=debug`, its stderr captured line by line. Killed on drop.
pub struct Proc {
    child: Option<Child>,
    logs: Logs,
    reader: Option<std::thread::JoinHandle<()>>,
    /// What the process is, for panic messages (e.g. "control plane A").
    pub what: String,
    /// From the "keygate ready" line (`wait_ready`), when that listener exists.
    pub authz_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

impl Proc {
    /// Spawns `keygate --log-format json <args…>` with `env` on top of the test's environment
    /// (minus the token variables, which a test passes explicitly when it means to).
    pub fn spawn(what: &str, args: &[String], env: &[(String, String)]) -> Proc {
        let mut cmd = Command::new(keygate_bin());
        cmd.arg("--log-format")
            .arg("json")
            .args(args)
            .env("KEYGATE_LOG", "debug")
            .env("KEYGATE_METRICS_ADDR", "127.0.0.1:0")
            .env_remove("KEYGATE_ADMIN_TOKEN")
            .env_remove("KEYGATE_SUBSCRIBER_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what} ({}): {e}", keygate_bin()));
        let logs: Logs = Arc::default();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Proc {
            child: Some(child),
            logs,
            reader: Some(reader),
            what: what.to_string(),
            authz_addr: None,
            admin_addr: None,
        }
    }

    /// Waits (bounded, 30 s) for the "keygate ready" log line and records the listener
    /// addresses it names. Panics, with the logs, if the process exits first.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((authz, admin)) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| ready_addrs(l))
            {
                self.authz_addr = authz;
                self.admin_addr = admin;
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.join_reader();
                panic!(
                    "{} exited with {status} before becoming ready:\n{}",
                    self.what,
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within 30 s:\n{}",
                self.what,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (bounded) for the process to exit on its own; returns its exit code (`None`:
    /// killed by a signal). Panics, with the logs, if it is still running after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self
                .child
                .as_mut()
                .unwrap_or_else(|| panic!("{} was already stopped", self.what));
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                self.join_reader();
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {limit:?}:\n{}",
                self.what,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The OS process id (while running).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The log lines that parse as JSON.
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The JSON log lines whose `fields.message` is `message`.
    pub fn log_messages(&self, message: &str) -> Vec<serde_json::Value> {
        self.log_json()
            .into_iter()
            .filter(|v| v["fields"]["message"] == message)
            .collect()
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
                self.join_reader();
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not stop within 20 s after SIGTERM", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Hard kill (SIGKILL: no graceful shutdown, nothing flushed).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.join_reader();
        }
    }

    /// After the process exited: read its stderr to the end.
    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `keygate serve` process.
pub struct Keygate {
    proc: Proc,
    pub data_dir: PathBuf,
    pub authz_addr: SocketAddr,
    pub admin_addr: SocketAddr,
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

fn addr_arg(a: Option<SocketAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or("127.0.0.1:0".into())
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
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--authz-addr".into(),
            addr_arg(opts.authz_addr),
            "--admin-addr".into(),
            addr_arg(opts.admin_addr),
        ];
        args.extend(opts.args.iter().cloned());
        if std::env::var("KEYGATE_TEST_STORE").as_deref() == Ok("postgres")
            && !args.iter().any(|a| a == "--store")
        {
            args.push("--store".into());
            args.push(postgres_for(&data_dir).await);
        }
        let mut proc = Proc::spawn("keygate", &args, &opts.env);
        proc.wait_ready().await;
        let (Some(authz_addr), Some(admin_addr)) = (proc.authz_addr, proc.admin_addr) else {
            panic!(
                "keygate serve's ready line lacks authz_addr or admin_addr:\n{}",
                proc.logs()
            );
        };
        Keygate {
            proc,
            data_dir,
            authz_addr,
            admin_addr,
            _tmp: tmp,
        }
    }

    /// The admin token keygate generated in its data dir.
    pub fn admin_token(&self) -> String {
        read_admin_token(&self.data_dir)
    }

    pub async fn admin(&self) -> Admin {
        self.admin_with_token(Some(self.admin_token())).await
    }

    pub async fn admin_with_token(&self, token: Option<String>) -> Admin {
        admin_client(self.admin_addr, token).await
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// SIGTERM, then wait (bounded) for a clean exit. Returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        self.proc.stop()
    }

    /// Hard kill (no graceful shutdown).
    pub fn kill(&mut self) {
        self.proc.kill()
    }

    /// Keeps the data dir alive beyond this process (for restarts).
    pub fn take_tempdir(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }
}

/// Writes `contents` to `path` readable by its owner only, as keygate requires of key and token
/// files (SPEC §9 "Files"; a file others can read is refused).
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `<data_dir>/admin.token`, as keygate generated it.
pub fn read_admin_token(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("admin.token"))
        .unwrap_or_else(|e| panic!("reading {}/admin.token: {e}", data_dir.display()))
        .trim()
        .to_string()
}

/// A KeyAdmin client on `addr` presenting `token` (none: no authorization header).
pub async fn admin_client(addr: SocketAddr, token: Option<String>) -> Admin {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to admin port");
    KeyAdminClient::with_interceptor(channel, BearerToken(token))
}

/// The listener addresses named by a "keygate ready" log line (each when present).
fn ready_addrs(line: &str) -> Option<(Option<SocketAddr>, Option<SocketAddr>)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let f = v.get("fields")?;
    if f.get("message")?.as_str()? != "keygate ready" {
        return None;
    }
    let addr = |k: &str| {
        f.get(k)
            .and_then(|a| a.as_str())
            .and_then(|a| a.parse().ok())
    };
    Some((addr("authz_addr"), addr("admin_addr")))
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
            } else if let Ok(bytes) = std::fs::read(&p) {
                // (A file renamed away between listing and reading, e.g. a cache's temporary
                // copy, is simply not there any more.)
                out.push((p.clone(), bytes));
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

/// The `/metrics` listener a process named in its "keygate ready" line.
pub fn metrics_addr(logs: &str) -> SocketAddr {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| {
            let f = v.get("fields")?;
            (f.get("message")?.as_str()? == "keygate ready")
                .then(|| f.get("metrics_addr")?.as_str()?.parse().ok())?
        })
        .expect("the ready line names metrics_addr")
}

/// Polls `f` every 5 ms until it returns `Some`, or panics after `limit`.
/// The ext_authz answer's gRPC code for `key` on `service` (0 = allowed).
pub async fn check_code(authz: std::net::SocketAddr, key: &str, service: &str) -> i32 {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let mut client = AuthorizationClient::connect(format!("http://{authz}"))
        .await
        .unwrap();
    client
        .check(keygate::bench::check_request(key, service, "127.0.0.1"))
        .await
        .unwrap()
        .into_inner()
        .status
        .map(|s| s.code)
        .unwrap_or(-1)
}

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

/// The values of header `name` (any case) among `headers`, in order.
pub fn header_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The last `n` lines of `s` (for panic messages).
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
