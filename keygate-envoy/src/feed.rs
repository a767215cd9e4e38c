//! The snapshot feed: one subscription to the control plane per Envoy process (not per
//! worker, not per filter config), on a thread the module owns. It is `keygate authz`'s own
//! subscriber, started by the same bootstrap (token, private data dir, master key): the
//! encrypted last-good cache in `data_dir` is served from the first request, updates are
//! applied in order and published with an atomic swap that workers read without a lock, and
//! the last good snapshot stays when the control plane is away.
//!
//! Configs with the same feed settings share one feed (Envoy creates a new filter config on
//! every listener update); the feed stops when the last config using it is destroyed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use keygate::authz::ratelimit::RateLimiter;
use keygate::authz::ratelimit_redis::RedisSync;
use keygate::crypto::KeyHasher;
use keygate::distribution::bootstrap::{
    DataPlaneFeed, DataPlaneSettings, SettingNames, TokenPrecedence, bootstrap,
};
use keygate::distribution::subscriber::{ClientTls, EndpointFields, hostname};
use keygate::health::HealthSources;
use keygate::snapshot::SnapshotCell;
use keygate::usage::{Tally, UsageRecorder};

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
    report_interval: Duration,
    rate_limit_redis: Option<keygate::crypto::SecretUrl>,
    rate_limit_sync_interval: Duration,
}

/// A running subscription and what the filter reads from it.
pub struct Feed {
    key: FeedKey,
    pub cell: SnapshotCell,
    pub hasher: KeyHasher,
    pub usage: UsageRecorder,
    /// Metered usage of allowed requests, reported by the feed thread.
    pub tally: Arc<Tally>,
    /// Rate-limit counts (SPEC §8.3), shared through Redis when `rate_limit_redis` is set.
    pub limiter: Arc<RateLimiter>,
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
        report_interval: settings.report_interval()?,
        rate_limit_redis: settings.rate_limit_redis.clone(),
        rate_limit_sync_interval: settings.rate_limit_sync_interval()?,
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

/// How the module's errors name its settings (its `filter_config` keys).
const NAMES: SettingNames = SettingNames {
    endpoint: EndpointFields {
        url: "control_plane",
        ca: "control_plane_ca",
        cert: "client_cert",
        key: "client_key",
    },
    token_file: "subscriber_token_file",
    data_dir: "data_dir",
    master_key_file: "master_key_file",
};

fn start(key: FeedKey) -> Result<Feed, String> {
    let boot = bootstrap(&DataPlaneSettings {
        control_plane: &key.control_plane,
        tls: &key.tls,
        master_key_file: &key.master_key_file,
        data_dir: &key.data_dir,
        token_file: key.subscriber_token_file.as_deref(),
        token_precedence: TokenPrecedence::FileFirst,
        name: format!(
            "envoy-module@{}",
            hostname().unwrap_or_else(|| "envoy".into())
        ),
        names: &NAMES,
    })
    .map_err(|e| format!("keygate filter_config: {e}"))?;
    let metrics_listener = match key.metrics_addr {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .map_err(|e| format!("keygate filter_config: metrics_addr {a}: {e}"))?,
        ),
        None => None,
    };
    let health = HealthSources::new(boot.cell.clone(), Some(boot.status.clone()), None);
    // The cache is read before Envoy takes traffic on this config: after a restart with the
    // control plane down, the first request is already decided from the last good snapshot.
    if let Some(v) = boot.load_cache() {
        crate::ffi::log(
            crate::ffi::LogLevel::Info,
            &format!(
                "keygate: serving cached snapshot version {v} until the control plane answers"
            ),
        );
    }
    let (cell, hasher) = (boot.cell.clone(), boot.keys.hasher.clone());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<UsageRecorder>(1);
    let tally = Arc::new(Tally::default());
    let reporting = (tally.clone(), key.report_interval);
    let limiter = Arc::new(RateLimiter::default());
    let sync = key
        .rate_limit_redis
        .as_ref()
        .map(|url| RedisSync::new(url.expose(), "keygate:"))
        .transpose()
        .map_err(|e| format!("keygate filter_config: {e}"))?;
    if sync.is_some() {
        keygate::metrics::METRICS.rate_limit_shared.set(0);
    }
    let limiting = (limiter.clone(), sync, key.rate_limit_sync_interval);
    std::thread::Builder::new()
        .name("keygate-feed".into())
        .spawn(move || {
            run_thread(
                boot,
                metrics_listener,
                health,
                (reporting, limiting),
                stop_rx,
                ready_tx,
            )
        })
        .map_err(|e| format!("keygate: cannot start the snapshot feed thread: {e}"))?;
    let usage = ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "keygate: the snapshot feed thread did not start".to_string())?;
    Ok(Feed {
        key,
        cell,
        hasher,
        usage,
        tally,
        limiter,
        stop,
    })
}

/// The feed thread: its own runtime, the usage flusher (its recorder goes back on `ready`),
/// the metered-usage reporter, the metrics listener, and the subscription, until `stop`
/// turns true (then the last usage is reported).
/// The metered-usage tally and its report interval.
type Reporting = (Arc<Tally>, Duration);
/// The rate limiter, its Redis synchronisation if any, and its interval.
type Limiting = (Arc<RateLimiter>, Option<RedisSync>, Duration);

fn run_thread(
    boot: DataPlaneFeed,
    metrics_listener: Option<std::net::TcpListener>,
    health: HealthSources,
    ((tally, report_interval), (limiter, sync, sync_interval)): (Reporting, Limiting),
    stop: tokio::sync::watch::Receiver<bool>,
    ready: std::sync::mpsc::SyncSender<UsageRecorder>,
) {
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
            let mut rx = stop.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let (recorder, flusher) =
            keygate::usage::start(boot.usage_sink(), Duration::from_secs(1), stopped());
        let _ = ready.send(recorder);
        let flusher = tokio::spawn(flusher);
        let limits = tokio::spawn(keygate::authz::ratelimit_redis::run(
            limiter,
            sync,
            sync_interval,
            stopped(),
        ));
        let reporter = tokio::spawn(keygate::usage::metered::start_reporter(
            tally,
            boot.report_sink(),
            report_interval,
            stopped(),
        ));
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
        supervise(&boot, stopped).await;
        let _ = flusher.await;
        let _ = reporter.await;
        let _ = limits.await;
    });
}

/// Runs the subscription until `stopped` resolves. It runs on its own task, so a panic in
/// it is caught here (the served snapshot stays) and it starts over instead of freezing.
async fn supervise<F>(boot: &DataPlaneFeed, stopped: impl Fn() -> F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(boot.subscriber().run(stopped())).await {
            Ok(Ok(())) => return, // stopped
            Ok(Err(e)) => {
                // A different master key: keep serving what we have, never anything else.
                crate::ffi::log(
                    crate::ffi::LogLevel::Critical,
                    &format!("keygate: snapshot feed stopped: {e}"),
                );
                stopped().await;
                return;
            }
            Err(e) => {
                crate::ffi::log(
                    crate::ffi::LogLevel::Critical,
                    &format!("keygate: snapshot feed failed ({e}); restarting it in 1 s"),
                );
                tokio::select! {
                    _ = stopped() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
