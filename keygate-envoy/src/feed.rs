//! The snapshot feed: one subscription to the control plane per Envoy process (not per
//! worker, not per filter config), on a thread the module owns. It is `keygate authz`'s own
//! subscriber: the encrypted last-good cache in `data_dir` is served from the first request,
//! updates are applied in order and published with an atomic swap that workers read without
//! a lock, and the last good snapshot stays when the control plane is away.
//!
//! Configs with the same feed settings share one feed (Envoy creates a new filter config on
//! every listener update); the feed stops when the last config using it is destroyed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use keygate::crypto::{KeyHasher, MasterKey, Secret};
use keygate::distribution::subscriber::{
    ClientTls, EndpointFields, Subscriber, SubscriberConfig, SubscriberStatus,
    control_plane_endpoint, usage_sink,
};
use keygate::health::HealthSources;
use keygate::snapshot::SnapshotCell;
use keygate::usage::UsageRecorder;

use crate::settings::FilterSettings;

/// What makes two configs share a feed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FeedKey {
    control_plane: String,
    master_key_file: PathBuf,
    data_dir: PathBuf,
    subscriber_token_file: Option<PathBuf>,
    tls: ClientTls,
    metrics_addr: Option<std::net::SocketAddr>,
}

/// A running subscription and what the filter reads from it.
pub struct Feed {
    key: FeedKey,
    pub cell: SnapshotCell,
    pub hasher: KeyHasher,
    pub usage: UsageRecorder,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        // The feed thread flushes usage and exits; nothing here waits for it (this runs on
        // Envoy's main thread).
        let _ = self.stop.send(true);
    }
}

static FEEDS: Mutex<Vec<Weak<Feed>>> = Mutex::new(Vec::new());

/// The feed for `settings`: the running one with the same settings, or a new one.
pub fn feed_for(settings: &FilterSettings) -> Result<Arc<Feed>, String> {
    let key = FeedKey {
        control_plane: settings.control_plane.clone(),
        master_key_file: settings.master_key_file.clone(),
        data_dir: settings.data_dir.clone(),
        subscriber_token_file: settings.subscriber_token_file.clone(),
        tls: settings.tls(),
        metrics_addr: settings.metrics_addr,
    };
    let mut feeds = FEEDS.lock().unwrap_or_else(|p| p.into_inner());
    feeds.retain(|w| w.strong_count() > 0);
    let live: Vec<Arc<Feed>> = feeds.iter().filter_map(Weak::upgrade).collect();
    if let Some(f) = live.iter().find(|f| f.key == key) {
        return Ok(f.clone());
    }
    // Two subscriptions must never write one cache file.
    if live.iter().any(|f| f.key.data_dir == key.data_dir) {
        return Err(format!(
            "keygate filter_config: data_dir {} is already used by a keygate filter config with other control_plane, token or TLS settings: give each its own data_dir (or restart Envoy to change them)",
            key.data_dir.display()
        ));
    }
    let feed = Arc::new(start(key)?);
    feeds.push(Arc::downgrade(&feed));
    Ok(feed)
}

fn read_token(file: &Option<PathBuf>) -> Result<Secret, String> {
    let raw = match file {
        Some(p) => std::fs::read_to_string(p).map_err(|e| {
            format!(
                "keygate filter_config: subscriber_token_file {}: {e}",
                p.display()
            )
        })?,
        None => std::env::var("KEYGATE_SUBSCRIBER_TOKEN").map_err(|_| {
            "keygate filter_config: subscriber_token_file is required (or KEYGATE_SUBSCRIBER_TOKEN in Envoy's environment)".to_string()
        })?,
    };
    let t = Secret::new(raw.trim().to_string());
    if t.expose().is_empty() {
        return Err("keygate filter_config: the subscriber token is empty".into());
    }
    Ok(t)
}

/// The data dir, created private (0700) when missing.
fn ensure_data_dir(dir: &PathBuf) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |e: std::io::Error| format!("keygate filter_config: data_dir {}: {e}", dir.display());
    keygate::crypto::create_private_dir(dir).map_err(bad)?;
    let meta = std::fs::metadata(dir).map_err(bad)?;
    if !meta.is_dir() {
        return Err(format!(
            "keygate filter_config: data_dir {} is not a directory",
            dir.display()
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(bad)?;
    }
    Ok(())
}

fn start(key: FeedKey) -> Result<Feed, String> {
    let token = read_token(&key.subscriber_token_file)?;
    ensure_data_dir(&key.data_dir)?;
    let master = MasterKey::load(&key.master_key_file)
        .map_err(|e| format!("keygate filter_config: master_key_file: {e}"))?;
    let keys = master.keys();
    let fingerprint = master.fingerprint();
    drop(master);
    let endpoint = control_plane_endpoint(
        &key.control_plane,
        &key.tls,
        &EndpointFields {
            url: "keygate filter_config: control_plane",
            ca: "control_plane_ca",
            cert: "client_cert",
            key: "client_key",
        },
    )?;

    let cell = SnapshotCell::new();
    let status = Arc::new(SubscriberStatus::default());
    let metrics_listener = match key.metrics_addr {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .map_err(|e| format!("keygate filter_config: metrics_addr {a}: {e}"))?,
        ),
        None => None,
    };
    let health = HealthSources::new(cell.clone(), Some(status.clone()), None);
    let make_subscriber = {
        let cfg = SubscriberConfig {
            endpoint: endpoint.clone(),
            token: Arc::new(token.clone()),
            data_dir: key.data_dir.clone(),
            name: format!(
                "envoy-module@{}",
                keygate::distribution::subscriber::hostname().unwrap_or_else(|| "envoy".into())
            ),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        };
        let (cell, keys, status) = (cell.clone(), keys.clone(), status.clone());
        move || {
            Subscriber::new(cfg.clone(), cell.clone(), keys.clone(), fingerprint.clone())
                .with_status(status.clone())
        }
    };
    // The cache is read before Envoy takes traffic on this config: after a restart with the
    // control plane down, the first request is already decided from the last good snapshot.
    if let Some(v) = make_subscriber().load_cache() {
        crate::ffi::log(
            crate::ffi::LogLevel::Info,
            &format!(
                "keygate: serving cached snapshot version {v} until the control plane answers"
            ),
        );
    }

    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<UsageRecorder>(1);
    std::thread::Builder::new()
        .name("keygate-feed".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    crate::ffi::log(
                        crate::ffi::LogLevel::Critical,
                        &format!("keygate: no runtime for the snapshot feed: {e}"),
                    );
                    return;
                }
            };
            rt.block_on(async move {
                let stopped = move || {
                    let mut rx = stop_rx.clone();
                    async move {
                        let _ = rx.wait_for(|s| *s).await;
                    }
                };
                let (recorder, flusher) = keygate::usage::start(
                    usage_sink(&endpoint, &token),
                    Duration::from_secs(1),
                    stopped(),
                );
                let _ = ready_tx.send(recorder);
                let flusher = tokio::spawn(flusher);
                if let Some(l) = metrics_listener {
                    match l
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::TcpListener::from_std(l))
                    {
                        Ok(l) => {
                            tokio::spawn(crate::http::serve(l, health, stopped()));
                        }
                        Err(e) => crate::ffi::log(
                            crate::ffi::LogLevel::Error,
                            &format!("keygate: metrics listener unusable: {e}"),
                        ),
                    }
                }
                loop {
                    // On its own task, so a panic in it is caught here (the served snapshot
                    // stays) and the subscription starts over instead of freezing for good.
                    match tokio::spawn(make_subscriber().run(stopped())).await {
                        Ok(Ok(())) => break, // stopped
                        Ok(Err(e)) => {
                            // A different master key: keep serving what we have, never
                            // anything else.
                            crate::ffi::log(
                                crate::ffi::LogLevel::Critical,
                                &format!("keygate: snapshot feed stopped: {e}"),
                            );
                            stopped().await;
                            break;
                        }
                        Err(e) => {
                            crate::ffi::log(
                                crate::ffi::LogLevel::Critical,
                                &format!(
                                    "keygate: snapshot feed failed ({e}); restarting it in 1 s"
                                ),
                            );
                            tokio::select! {
                                _ = stopped() => break,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                }
                let _ = flusher.await;
            });
        })
        .map_err(|e| format!("keygate: cannot start the snapshot feed thread: {e}"))?;
    let usage = ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "keygate: the snapshot feed thread did not start".to_string())?;
    Ok(Feed {
        key,
        cell,
        hasher: keys.hasher.clone(),
        usage,
        stop,
    })
}
