//! One gateway for the end-to-end suites: a real `keygate serve`, a recording upstream standing
//! in for the model vendors, and a real Envoy in front of them running a shipped config with
//! either data plane (`envoy/envoy.yaml`, ext_authz; `envoy/module.yaml`, the keygate dynamic
//! module fed by the same keygate's snapshot stream). Every gateway has its own processes and
//! ports, so tests run in parallel.

use std::net::SocketAddr;
use std::time::Duration;

use super::admin::{latest_revision, snapshot_reaches};
use super::envoy::{
    ChunkedRequest, Envoy, EnvoyRun, HttpResponse, ModuleFiles, Upstream, http_get, http_post,
};
use super::{Admin, Keygate, Options, poll_until, tail};

/// Which data plane Envoy uses. The suites that use [`on_both_planes!`] run every test against
/// both, with the same assertions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    /// `envoy/envoy.yaml`: the ext_authz filter calling `keygate serve`.
    ExtAuthz,
    /// `envoy/module.yaml`: the keygate dynamic module inside Envoy, fed by the same
    /// `keygate serve`'s snapshot stream.
    Module,
}

/// Runs each named `async fn name(plane: Plane)` once per data plane, as `<name>::ext_authz`
/// and `<name>::module`.
#[macro_export]
macro_rules! on_both_planes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ext_authz() {
                super::$name($crate::common::gateway::Plane::ExtAuthz).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn module() {
                super::$name($crate::common::gateway::Plane::Module).await
            }
        }
    )*};
}

/// The subscriber token the module's Envoy presents to keygate's snapshot stream.
pub const SUBSCRIBER_TOKEN: &str = "e2e-subscriber-token-0123456789abcdef";

/// The Envoy counter of bytes read from downstream connections (the listener's
/// `stat_prefix: gateway` in both shipped configs).
const DOWNSTREAM_RX_BYTES: &str = "http.gateway.downstream_cx_rx_bytes_total";

pub struct Gateway {
    // Envoy first: dropped (killed) before keygate and the upstream.
    pub envoy: Envoy,
    pub keygate: Keygate,
    pub upstream: Upstream,
    pub admin: Admin,
    pub plane: Plane,
    _module_dir: Option<tempfile::TempDir>,
}

impl Gateway {
    pub async fn start(plane: Plane) -> Gateway {
        Self::start_with(plane, &[]).await
    }

    /// `settings`: data-plane settings as (name, value), e.g. ("credential_query_param",
    /// "key"): `--credential-query-param key` for keygate, a `filter_config` key for the module.
    pub async fn start_with(plane: Plane, settings: &[(&str, &str)]) -> Gateway {
        let mut args = Vec::new();
        if plane == Plane::ExtAuthz {
            for (k, v) in settings {
                args.push(format!("--{}", k.replace('_', "-")));
                args.push(v.to_string());
            }
        }
        let keygate = Keygate::start_with(Options {
            args,
            env: vec![("KEYGATE_SUBSCRIBER_TOKEN".into(), SUBSCRIBER_TOKEN.into())],
            ..Default::default()
        })
        .await;
        let admin = keygate.admin().await;
        let upstream = Upstream::start().await;
        let (envoy, module_dir) = match plane {
            Plane::ExtAuthz => (Envoy::start(keygate.authz_addr, upstream.addr).await, None),
            Plane::Module => {
                let dir = tempfile::tempdir().unwrap();
                let token = dir.path().join("subscriber.token");
                super::write_private(&token, SUBSCRIBER_TOKEN);
                let files = ModuleFiles {
                    control_plane: format!("http://{}", keygate.admin_addr),
                    master_key_file: keygate.data_dir.join("master.key"),
                    data_dir: dir.path().join("module-data"),
                    subscriber_token_file: token,
                    extra_settings: settings
                        .iter()
                        .map(|(k, v)| format!("\"{k}\":\"{v}\""))
                        .collect::<Vec<_>>()
                        .join(","),
                };
                let envoy = Envoy::start_module(&files, upstream.addr, &EnvoyRun::module()).await;
                (envoy, Some(dir))
            }
        };
        Gateway {
            envoy,
            keygate,
            upstream,
            admin,
            plane,
            _module_dir: module_dir,
        }
    }

    /// Envoy's listener (where clients connect).
    pub fn listener(&self) -> SocketAddr {
        self.envoy.listener
    }

    pub async fn get(&self, target: &str, headers: &[(&str, &str)]) -> HttpResponse {
        http_get(self.envoy.listener, target, headers)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GET {target} through Envoy failed: {e}\n{}",
                    self.diagnostics()
                )
            })
    }

    /// GET expecting `status`, with every log in the panic message otherwise.
    pub async fn expect(
        &self,
        target: &str,
        headers: &[(&str, &str)],
        status: u16,
    ) -> HttpResponse {
        let r = self.get(target, headers).await;
        assert_eq!(
            r.status,
            status,
            "GET {target}: expected HTTP {status}, got {} {}\n{}",
            r.status,
            r.text(),
            self.diagnostics()
        );
        r
    }

    /// POST `body` (with its content-length) to `target` through Envoy.
    pub async fn post(&self, target: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        http_post(self.envoy.listener, target, headers, body)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "POST {target} through Envoy failed: {e}\n{}",
                    self.diagnostics()
                )
            })
    }

    /// POST expecting `status`, with every log in the panic message otherwise.
    pub async fn post_expect(
        &self,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        status: u16,
    ) -> HttpResponse {
        let r = self.post(target, headers, body).await;
        assert_eq!(
            r.status,
            status,
            "POST {target}: expected HTTP {status}, got {} {}\n{}",
            r.status,
            r.text(),
            self.diagnostics()
        );
        r
    }

    /// Starts a POST with a chunked body: the head goes out now, the chunks as the test sends
    /// them ([`ChunkedRequest::send`]), the end with [`ChunkedRequest::finish`].
    pub async fn chunked_post(&self, target: &str, headers: &[(&str, &str)]) -> ChunkedRequest {
        ChunkedRequest::start(self.envoy.listener, "POST", target, headers)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "POST {target} (chunked) through Envoy failed: {e}\n{}",
                    self.diagnostics()
                )
            })
    }

    /// Bytes Envoy has read from downstream connections so far.
    pub async fn envoy_rx_bytes(&self) -> u64 {
        self.envoy.stat(DOWNSTREAM_RX_BYTES).await
    }

    /// Waits (bounded) until Envoy has read at least `total` bytes from downstream and has
    /// finished handling that read: Envoy runs one worker (`--concurrency 1`), which counts the
    /// bytes and hands them to the filters in one go, so a request it answers afterwards (a
    /// credential-less GET, 401) was handled after them.
    pub async fn envoy_has_handled(&self, total: u64) {
        let envoy = &self.envoy;
        poll_until(
            Duration::from_secs(10),
            "Envoy to read the bytes sent",
            || async move { (envoy.stat(DOWNSTREAM_RX_BYTES).await >= total).then_some(()) },
        )
        .await;
        self.expect("/openai/v1/models", &[], 401).await;
    }

    pub fn diagnostics(&self) -> String {
        format!(
            "--- Envoy stderr:\n{}\n--- Envoy access log:\n{}\n--- keygate log (tail):\n{}",
            self.envoy.stderr(),
            self.envoy.stdout(),
            tail(&self.keygate.logs(), 40)
        )
    }

    /// The first access log line `matches` accepts, waiting (bounded) for Envoy to write it.
    pub async fn access_log_line(
        &self,
        what: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let envoy = &self.envoy;
        let matches = &matches;
        let found = tokio::time::timeout(Duration::from_secs(15), async move {
            loop {
                if let Some(l) = envoy.access_log().into_iter().find(matches) {
                    return l;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no access log line {what} within 15 s:\n{}",
                self.envoy.stdout()
            )
        })
    }

    /// Waits (bounded) until keygate's live snapshot includes every committed change, so the
    /// next request is decided on the current state.
    pub async fn settle(&mut self) {
        let revision = latest_revision(&mut self.admin).await;
        snapshot_reaches(
            &self.admin,
            revision,
            Duration::from_secs(10),
            "keygate's snapshot to reach the last commit",
        )
        .await;
        if self.plane == Plane::Module {
            // The module reports the version it decides from (set on a request).
            let envoy = &self.envoy;
            poll_until(
                Duration::from_secs(10),
                "the module's snapshot to reach the last commit",
                || async move {
                    let _ = http_get(envoy.listener, "/openai/v1/models", &[]).await;
                    (envoy
                        .stat("dynamicmodulescustom.keygate_snapshot_version")
                        .await
                        >= revision)
                        .then_some(())
                },
            )
            .await;
        }
    }
}
