//! The data plane's side of the stream: starts from its encrypted cache, subscribes to the
//! control plane, applies updates in order (never an older or malformed one), persists the
//! last good snapshot, and reconnects with jittered exponential backoff. While the control
//! plane is away it keeps serving what it has (fail static).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::{cache, seal, wire};
use crate::crypto::{Keys, Secret};
use crate::proto::snapshot::v1 as pb;
use crate::proto::snapshot::v1::snapshot_distribution_client::SnapshotDistributionClient;
use crate::snapshot::{ApplyError, ContentDigest, Snapshot, SnapshotCell, Update};

#[derive(Clone)]
pub struct SubscriberConfig {
    pub endpoint: Endpoint,
    pub token: Arc<Secret>,
    pub data_dir: PathBuf,
    /// How this data plane names itself to the control plane.
    pub name: String,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl std::fmt::Debug for SubscriberConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriberConfig")
            .field("endpoint", &self.endpoint.uri())
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// What the data plane knows about its feed (for health, metrics and logs).
#[derive(Debug, Default)]
pub struct SubscriberStatus {
    /// Unix milliseconds of the last message from the control plane (0: never).
    pub last_heard_ms: AtomicI64,
    pub connected: AtomicBool,
    pub rejected_messages: AtomicU64,
    pub reconnects: AtomicU64,
}

impl SubscriberStatus {
    /// Seconds since the control plane was last heard from (`None`: never).
    pub fn staleness(&self) -> Option<f64> {
        let t = self.last_heard_ms.load(Ordering::Relaxed);
        (t > 0).then(|| (now_ms() - t).max(0) as f64 / 1000.0)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    #[error(
        "the control plane's master key (fingerprint {remote}) differs from this data plane's ({local}): use the control plane's --master-key-file"
    )]
    MasterKeyMismatch { remote: String, local: String },
}

/// TLS toward the control plane (an https:// URL): its CA, and a client identity for mTLS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How errors name the settings (command-line flags, or the Envoy module's JSON keys).
pub struct EndpointFields {
    pub url: &'static str,
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
}

/// The control plane's gRPC endpoint: http:// or https:// (with TLS settings), keep-alives on
/// so a dead control plane is noticed within seconds.
pub fn control_plane_endpoint(
    url: &str,
    tls: &ClientTls,
    f: &EndpointFields,
) -> Result<Endpoint, String> {
    let bad = |why: String| format!("{} {url:?}: {why}", f.url);
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad("must start with http:// or https://".into()));
    }
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()))
    };
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let ca = tls
            .ca
            .as_ref()
            .ok_or_else(|| bad(format!("https:// needs {}", f.ca)))?;
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, f.ca)?));
        match (&tls.cert, &tls.key) {
            (Some(c), Some(k)) => {
                cfg = cfg.identity(Identity::from_pem(read(c, f.cert)?, read(k, f.key)?));
            }
            (None, None) => {}
            _ => return Err(format!("{} and {} go together", f.cert, f.key)),
        }
        ep = ep.tls_config(cfg).map_err(|e| bad(e.to_string()))?;
    } else if tls.cert.is_some() || tls.key.is_some() || tls.ca.is_some() {
        return Err(bad("TLS options need an https:// control plane".into()));
    }
    Ok(ep)
}

/// This machine's host name (how a data plane names itself to its control plane).
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
}

/// Sends a data plane's last-used batches to its control plane (authenticated like the
/// subscription).
pub fn usage_sink(endpoint: &Endpoint, token: &Secret) -> crate::usage::UsageSink {
    let channel = endpoint.connect_lazy();
    let bearer: Option<tonic::metadata::MetadataValue<_>> =
        format!("Bearer {}", token.expose()).parse().ok();
    Arc::new(move |batch| {
        let mut client = SnapshotDistributionClient::new(channel.clone());
        let bearer = bearer.clone();
        Box::pin(async move {
            let mut req = tonic::Request::new(pb::UsageReport {
                items: batch
                    .iter()
                    .map(|(id, t)| pb::KeyUsage {
                        consumer_key_id: id.as_bytes().to_vec(),
                        last_used_time_us: t.0,
                    })
                    .collect(),
                ..Default::default()
            });
            if let Some(b) = bearer {
                req.metadata_mut().insert("authorization", b);
            }
            client
                .report_usage(req)
                .await
                .map(drop)
                .map_err(|e| e.message().to_string())
        })
    })
}

/// Sends a data plane's metered-usage reports to its control plane (authenticated like the
/// subscription). A report counts as delivered only when the control plane says it applied
/// it: one that does not know metering answers without `metered_applied`, and the report is
/// sent again.
pub fn report_sink(endpoint: &Endpoint, token: &Secret) -> crate::usage::ReportSink {
    let channel = endpoint.connect_lazy();
    let bearer: Option<tonic::metadata::MetadataValue<_>> =
        format!("Bearer {}", token.expose()).parse().ok();
    Arc::new(move |report| {
        let mut client = SnapshotDistributionClient::new(channel.clone());
        let bearer = bearer.clone();
        Box::pin(async move {
            let mut req = tonic::Request::new(super::usage_wire::report_to_wire(&report));
            if let Some(b) = bearer {
                req.metadata_mut().insert("authorization", b);
            }
            let answer = match client.report_usage(req).await {
                Ok(a) => a,
                // It breaks the store's rules: sending it again cannot help, and holding it
                // would stop every later report.
                Err(e) if e.code() == tonic::Code::InvalidArgument => {
                    tracing::error!(
                        sequence = report.sequence,
                        rows = report.rows.len(),
                        error = %e.message(),
                        "usage report refused by the control plane; dropped"
                    );
                    return Ok(());
                }
                Err(e) => return Err(e.message().to_string()),
            };
            if answer.get_ref().metered_applied {
                Ok(())
            } else {
                Err("the control plane does not apply metered usage (an older version?)".into())
            }
        })
    })
}

/// How far ahead of the served version (same store) an update may jump: 2^40 revisions,
/// decades of a busy store's writes, yet far below the 2^63 a forged version would pin a
/// data plane at (refusing every real update after it). Further is refused as malformed.
pub const MAX_VERSION_JUMP: i64 = 1 << 40;

pub struct Subscriber {
    cfg: SubscriberConfig,
    cell: SnapshotCell,
    keys: Keys,
    fingerprint: String,
    pub status: Arc<SubscriberStatus>,
    /// The next subscription asks for a full snapshot (an update did not lead to the control
    /// plane's content digest: what is served diverged from the store).
    want_full: AtomicBool,
    /// This data plane's digests differ from its control plane's for the same content (a
    /// full snapshot's did): digests are then neither checked nor presented.
    digest_skew: AtomicBool,
}

/// What one message did to the served snapshot.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// A chunk of a larger message, or a heartbeat.
    Nothing,
    Swapped {
        version: i64,
    },
}

impl Subscriber {
    pub fn new(cfg: SubscriberConfig, cell: SnapshotCell, keys: Keys, fingerprint: String) -> Self {
        Subscriber {
            cfg,
            cell,
            keys,
            fingerprint,
            status: Arc::default(),
            want_full: AtomicBool::new(false),
            digest_skew: AtomicBool::new(false),
        }
    }

    /// Report into `status` (shared with health and metrics) instead of a fresh one.
    pub fn with_status(mut self, status: Arc<SubscriberStatus>) -> Self {
        self.status = status;
        self
    }

    /// Serves the cached snapshot, if there is one and nothing newer is live.
    pub fn load_cache(&self) -> Option<i64> {
        match cache::load(&self.cfg.data_dir, &self.keys) {
            Ok(Some(update)) => match Snapshot::from_full(update, &self.keys) {
                Ok(s) => {
                    let v = s.version;
                    if self.cell.load().is_none() && self.cell.publish(Arc::new(s)) {
                        tracing::info!(
                            version = v,
                            "serving the cached snapshot until the control plane answers"
                        );
                    }
                    Some(v)
                }
                Err(e) => {
                    tracing::error!(error = %e, "snapshot cache does not apply; ignoring it");
                    None
                }
            },
            Ok(None) => None,
            Err(e @ (cache::CacheError::RolledBack { .. } | cache::CacheError::NoMark(_))) => {
                tracing::error!(error = %e, "snapshot cache refused: below its high-water mark; ignoring it");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "snapshot cache unreadable; ignoring it");
                None
            }
        }
    }

    /// Applies one assembled update to the served snapshot. Refuses (and keeps serving the
    /// old snapshot) an update that is older, from a gap, or malformed.
    pub fn apply(&self, base: i64, update: Update) -> Result<Applied, ApplyError> {
        self.apply_checked(base, update, None)
    }

    /// [`Subscriber::apply`], and the state it leads to must have the content digest
    /// `expected` (when the control plane sent one). An increment that leads elsewhere is
    /// refused (`Diverged`): it applied on top of a state the store no longer has. A full
    /// snapshot replaces everything, so it cannot diverge: one whose digest differs means
    /// this data plane digests content unlike its control plane (a version skew); it is
    /// served, logged and counted, and digests are no longer used.
    pub fn apply_checked(
        &self,
        base: i64,
        update: Update,
        expected: Option<ContentDigest>,
    ) -> Result<Applied, ApplyError> {
        let full = update.full;
        let next = self.next_snapshot(base, update)?;
        if let Some(expected) = expected
            && !self.digest_skew.load(Ordering::Relaxed)
            && next.digest() != expected
        {
            if !full {
                return Err(ApplyError::Diverged {
                    version: next.version,
                    expected,
                    actual: next.digest(),
                });
            }
            self.digest_skew.store(true, Ordering::Relaxed);
            self.rejected(Rejected::Digest);
            tracing::error!(
                version = next.version,
                digest = %next.digest(),
                control_plane_digest = %expected,
                "this data plane's content digest of a full snapshot differs from the control plane's (a version skew): serving it; digests are no longer checked"
            );
        }
        let v = next.version;
        if self.cell.publish(Arc::new(next)) {
            if full {
                self.want_full.store(false, Ordering::Relaxed);
            }
            Ok(Applied::Swapped { version: v })
        } else {
            Err(ApplyError::Stale {
                current: self.cell.load().map(|s| s.version).unwrap_or(0),
                update: v,
            })
        }
    }

    /// The snapshot `update` makes of the served one, unless it is older, from a gap, or
    /// malformed.
    fn next_snapshot(&self, base: i64, update: Update) -> Result<Snapshot, ApplyError> {
        let current = self.cell.load();
        if let Some(c) = &current
            && c.same_history(&update.store_id, &update.epoch)
            && update.version.saturating_sub(c.version) > MAX_VERSION_JUMP
        {
            return Err(ApplyError::Malformed(format!(
                "version {} jumps implausibly far ahead of the served {}",
                update.version, c.version
            )));
        }
        let next = match (&current, update.full) {
            (_, true) => match &current {
                Some(c)
                    if c.same_history(&update.store_id, &update.epoch)
                        && update.version < c.version =>
                {
                    return Err(ApplyError::Stale {
                        current: c.version,
                        update: update.version,
                    });
                }
                _ => Snapshot::from_full(update, &self.keys)?,
            },
            (Some(c), false) => {
                if c.same_history(&update.store_id, &update.epoch) && base != c.version {
                    if update.version <= c.version {
                        return Err(ApplyError::Stale {
                            current: c.version,
                            update: update.version,
                        });
                    }
                    return Err(ApplyError::Malformed(format!(
                        "incremental update from version {base} does not apply to version {}",
                        c.version
                    )));
                }
                c.apply(update, &self.keys)?
            }
            (None, false) => {
                return Err(ApplyError::Malformed(
                    "an incremental update before any full snapshot".into(),
                ));
            }
        };
        Ok(next)
    }

    /// Runs until `shutdown` resolves, or fails on a master key mismatch.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), SubscriberError> {
        tokio::pin!(shutdown);
        let (persist_tx, persist_rx) = tokio::sync::watch::channel::<Option<Arc<Snapshot>>>(None);
        let persister = tokio::spawn(cache::persist_loop(
            self.cfg.data_dir.clone(),
            self.keys.clone(),
            persist_rx,
        ));
        let mut backoff = self.cfg.min_backoff;
        let result = loop {
            let attempt = self.session(&persist_tx, &mut backoff);
            let outcome = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                r = attempt => r,
            };
            self.status.connected.store(false, Ordering::Relaxed);
            if let Err(e) = outcome {
                break Err(e);
            }
            let jitter = rand::thread_rng().gen_range(0.5..1.0);
            let wait = backoff.mul_f64(jitter);
            backoff = (backoff * 2).min(self.cfg.max_backoff);
            self.status.reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        };
        drop(persist_tx);
        let _ = persister.await;
        result
    }

    /// One connection: subscribe and apply until the stream ends or fails.
    async fn session(
        &self,
        persist: &tokio::sync::watch::Sender<Option<Arc<Snapshot>>>,
        backoff: &mut Duration,
    ) -> Result<(), SubscriberError> {
        let nonce: [u8; seal::NONCE_LEN] = rand::random();
        let Some(mut stream) = self.subscribe(&nonce).await else {
            return Ok(());
        };
        self.status.connected.store(true, Ordering::Relaxed);
        let mut assembler = wire::Assembler::default();
        let mut opener = seal::Opener::new(&self.keys.stream, &nonce, self.fingerprint.clone());
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    tracing::warn!("control plane closed the snapshot stream");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(code = ?e.code(), message = e.message(), "snapshot stream broke; serving the last snapshot");
                    return Ok(());
                }
            };
            let first = opener.format().is_none();
            let msg = match opener.open(msg) {
                Ok(m) => m,
                Err(seal::SealError::OtherKey { remote }) => {
                    return Err(SubscriberError::MasterKeyMismatch {
                        remote,
                        local: self.fingerprint.clone(),
                    });
                }
                Err(e) => {
                    // Not heard from (staleness keeps growing) and the backoff keeps growing.
                    self.rejected(match e {
                        seal::SealError::Malformed(_) => Rejected::Malformed,
                        _ => Rejected::Mac,
                    });
                    let served = self.cell.load().map(|s| s.version);
                    tracing::error!(error = %e, served_version = ?served, "refused an unauthenticated snapshot message; keeping the served snapshot and resubscribing");
                    return Ok(());
                }
            };
            if first && opener.format() == Some(seal::Format::Legacy) {
                tracing::info!(
                    "the control plane answers in stream protocol 1 (an older keygate): no content digests; upgrade it"
                );
            }
            self.status.last_heard_ms.store(now_ms(), Ordering::Relaxed);
            *backoff = self.cfg.min_backoff;
            if !self.take(&mut assembler, msg, persist) {
                return Ok(());
            }
        }
    }

    /// Counts a refused stream message (status and `keygate_snapshot_messages_rejected_total`).
    fn rejected(&self, why: Rejected) {
        self.status
            .rejected_messages
            .fetch_add(1, Ordering::Relaxed);
        crate::metrics::METRICS
            .snapshot_rejected(why.reason())
            .inc();
    }

    /// Connects and subscribes from the served version; `None` (logged) when the control
    /// plane cannot be reached or refuses.
    async fn subscribe(&self, nonce: &[u8]) -> Option<tonic::Streaming<pb::SnapshotMessage>> {
        let channel = match self.cfg.endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(control_plane = %self.cfg.endpoint.uri(), error = %e, "control plane unreachable; serving the last snapshot");
                return None;
            }
        };
        let token: tonic::metadata::MetadataValue<_> =
            match format!("Bearer {}", self.cfg.token.expose()).parse() {
                Ok(t) => t,
                Err(_) => {
                    tracing::error!("subscriber token is not a valid header value");
                    return None;
                }
            };
        let mut client = SnapshotDistributionClient::with_interceptor(
            channel,
            move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", token.clone());
                Ok(r)
            },
        )
        .max_decoding_message_size(64 * 1024 * 1024);
        let req = self.request(nonce);
        match client.subscribe(req).await {
            Ok(s) => {
                self.want_full.store(false, Ordering::Relaxed);
                Some(s.into_inner())
            }
            Err(e) => {
                tracing::warn!(code = ?e.code(), message = e.message(), "subscription refused; serving the last snapshot");
                None
            }
        }
    }

    /// What this data plane subscribes with: what it serves and the digest of that content
    /// (unless its digests differ from its control plane's), the stream protocol it verifies,
    /// and its nonce. Asking for a full snapshot, it presents nothing, as a data plane that
    /// holds nothing does: every control plane answers that with everything.
    fn request(&self, nonce: &[u8]) -> pb::SubscribeRequest {
        let current = if self.want_full.load(Ordering::Relaxed) {
            None
        } else {
            self.cell.load()
        };
        let digests = !self.digest_skew.load(Ordering::Relaxed);
        pb::SubscribeRequest {
            store_id: current
                .as_ref()
                .map(|s| s.store_id.clone())
                .unwrap_or_default(),
            epoch: current
                .as_ref()
                .map(|s| s.epoch.clone())
                .unwrap_or_default(),
            version: current.as_ref().map(|s| s.version).unwrap_or(0),
            subscriber: self.cfg.name.clone(),
            nonce: nonce.to_vec(),
            protocol: seal::PROTOCOL,
            digest: match &current {
                Some(s) if digests => s.digest().to_bytes().to_vec(),
                _ => vec![],
            },
        }
    }

    /// Takes one message: applies it once its update is complete and hands a swapped-in
    /// snapshot to the cache writer. False when the stream must start over (a message
    /// that does not apply).
    fn take(
        &self,
        assembler: &mut wire::Assembler,
        msg: pb::SnapshotMessage,
        persist: &tokio::sync::watch::Sender<Option<Arc<Snapshot>>>,
    ) -> bool {
        let applied = assembler.push(msg).and_then(|u| match u {
            Some(a) => {
                let started = Instant::now();
                self.apply_checked(a.base_version, a.update, a.digest)
                    .map(|a| (a, started.elapsed()))
            }
            None => Ok((Applied::Nothing, Duration::ZERO)),
        });
        match applied {
            Ok((Applied::Swapped { version }, took)) => {
                tracing::debug!(
                    version,
                    apply_ms = took.as_secs_f64() * 1000.0,
                    "snapshot updated from the control plane"
                );
                let _ = persist.send(self.cell.load());
            }
            Ok((Applied::Nothing, _)) => {}
            Err(ApplyError::Stale { current, update }) => {
                self.rejected(Rejected::Stale);
                tracing::warn!(
                    current,
                    update,
                    "ignored a snapshot update older than the one served"
                );
            }
            Err(e @ ApplyError::Diverged { .. }) => {
                self.rejected(Rejected::Digest);
                self.want_full.store(true, Ordering::Relaxed);
                let served = self.cell.load().map(|s| s.version);
                tracing::error!(error = %e, served_version = ?served, "refused a snapshot update that does not lead to the control plane's content; keeping the served snapshot and asking for a full snapshot");
                return false;
            }
            Err(e) => {
                self.rejected(Rejected::Malformed);
                let served = self.cell.load().map(|s| s.version);
                tracing::error!(error = %e, served_version = ?served, "rejected a snapshot message; keeping the served snapshot and resubscribing");
                return false;
            }
        }
        true
    }
}

/// Why a stream message was refused: the `reason` of
/// `keygate_snapshot_messages_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Its MAC does not verify, or the stream lacks the fingerprint.
    Mac,
    /// Authenticated but unusable: out of order, a gap, another epoch's increment, an
    /// envelope that does not decode, a model key that does not decrypt.
    Malformed,
    /// Older than what is served.
    Stale,
    /// It does not lead to the control plane's content digest (`ApplyError::Diverged`), or a
    /// full snapshot's digest differs (a version skew).
    Digest,
}

impl Rejected {
    pub const ALL: [Rejected; 4] = [
        Rejected::Mac,
        Rejected::Malformed,
        Rejected::Stale,
        Rejected::Digest,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Rejected::Mac => "mac",
            Rejected::Malformed => "malformed",
            Rejected::Stale => "stale",
            Rejected::Digest => "digest",
        }
    }
}

#[cfg(test)]
#[path = "subscriber_tests.rs"]
mod tests;
