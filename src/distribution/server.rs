//! The `SnapshotDistribution/Subscribe` stream: a full snapshot (or the missed changes) on
//! connect, then every change as the snapshot builder applies it, and heartbeats.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::wire;
use crate::crypto::{Secret, credentials_equal};
use crate::proto::snapshot::v1 as pb;
use crate::proto::snapshot::v1::snapshot_distribution_server::{
    SnapshotDistribution, SnapshotDistributionServer,
};
use crate::snapshot::{Published, Snapshot, SnapshotCell};

const HISTORY: usize = 1024;
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The subscriber token check (a credential separate from the admin token).
#[derive(Clone)]
pub struct SubscriberAuth {
    token: Arc<Secret>,
}

impl std::fmt::Debug for SubscriberAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubscriberAuth([redacted])")
    }
}

impl SubscriberAuth {
    pub fn new(token: Secret) -> Self {
        SubscriberAuth {
            token: Arc::new(token),
        }
    }

    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(t) if credentials_equal(t.as_bytes(), self.token.expose().as_bytes()) => Ok(req),
            _ => Err(Status::unauthenticated(
                "missing or invalid subscriber token",
            )),
        }
    }
}

#[derive(Clone)]
pub struct DistributionService {
    cell: SnapshotCell,
    updates: broadcast::Sender<Published>,
    history: Arc<Mutex<VecDeque<Published>>>,
    fingerprint: String,
    subscribers: Arc<std::sync::atomic::AtomicI64>,
    /// Where data planes' last-used reports are written.
    usage: Option<crate::usage::UsageSink>,
}

impl DistributionService {
    /// `updates` is the builder's channel; `fingerprint` the master key's.
    pub fn new(
        cell: SnapshotCell,
        updates: broadcast::Sender<Published>,
        fingerprint: String,
    ) -> Self {
        let history: Arc<Mutex<VecDeque<Published>>> = Arc::default();
        let mut rx = updates.subscribe();
        let h = history.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(p) => {
                        let mut h = h.lock().expect("history lock");
                        if p.update.full {
                            h.clear();
                        }
                        h.push_back(p);
                        while h.len() > HISTORY {
                            h.pop_front();
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        h.lock().expect("history lock").clear()
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        DistributionService {
            cell,
            updates,
            history,
            fingerprint,
            subscribers: Arc::default(),
            usage: None,
        }
    }

    /// Accept data planes' last-used reports into `sink`.
    pub fn with_usage(mut self, sink: crate::usage::UsageSink) -> Self {
        self.usage = Some(sink);
        self
    }

    /// Connected subscribers right now.
    pub fn subscriber_count(&self) -> i64 {
        self.subscribers.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn into_server(
        self,
        auth: SubscriberAuth,
    ) -> tonic::service::interceptor::InterceptedService<
        SnapshotDistributionServer<Self>,
        impl tonic::service::Interceptor + Clone,
    > {
        SnapshotDistributionServer::with_interceptor(self, move |req| auth.check(req))
    }

    /// The incremental updates that lead from `(store, version)` to the newest recorded one.
    fn chain_from(&self, store_id: &str, version: i64) -> Vec<Published> {
        let h = self.history.lock().expect("history lock");
        let Some(start) = h.iter().position(|p| {
            !p.update.full && p.update.store_id == store_id && p.base_version == Some(version)
        }) else {
            return vec![];
        };
        let mut out = Vec::new();
        let mut at = version;
        for p in h.iter().skip(start) {
            if p.update.full || p.base_version != Some(at) {
                break;
            }
            at = p.update.version;
            out.push(p.clone());
        }
        out
    }
}

struct Gauge(Arc<std::sync::atomic::AtomicI64>);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

type Stream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SnapshotMessage, Status>> + Send>>;

/// What a change means for one subscriber.
enum Next {
    /// Nothing to send (it has this version already).
    Skip,
    Send(Vec<pb::SnapshotMessage>),
    /// The builder is gone.
    End,
}

impl DistributionService {
    /// One subscriber's stream: its initial state, then every change and heartbeats, until it
    /// goes away. The first message carries the master key's fingerprint.
    async fn feed(
        self,
        r: pb::SubscribeRequest,
        snap: Arc<Snapshot>,
        mut rx: broadcast::Receiver<Published>,
        tx: mpsc::Sender<Result<pb::SnapshotMessage, Status>>,
        _gauge: Gauge,
    ) {
        let mut first = true;
        let (initial, mut sent) = self.initial(&r, &snap);
        let mut store = snap.store_id.clone();
        drop(snap);
        if !self.send_all(&tx, initial, &mut first).await {
            return;
        }
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.tick().await;
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                _ = beat.tick() => Next::Send(vec![pb::SnapshotMessage {
                    store_id: store.clone(),
                    version: sent,
                    heartbeat: true,
                    ..Default::default()
                }]),
                p = rx.recv() => self.on_published(p, &mut store, &mut sent),
            };
            let msgs = match next {
                Next::Skip => continue,
                Next::Send(msgs) => msgs,
                Next::End => return,
            };
            if !self.send_all(&tx, msgs, &mut first).await {
                return;
            }
        }
    }

    /// The initial state for a subscriber at `r`'s version: nothing (a heartbeat), the missed
    /// changes, or everything; and the version it then has.
    fn initial(
        &self,
        r: &pb::SubscribeRequest,
        snap: &Snapshot,
    ) -> (Vec<pb::SnapshotMessage>, i64) {
        if r.store_id == snap.store_id && r.version == snap.version {
            let beat = pb::SnapshotMessage {
                store_id: snap.store_id.clone(),
                version: snap.version,
                heartbeat: true,
                ..Default::default()
            };
            return (vec![beat], snap.version);
        }
        let chain = if r.store_id == snap.store_id && r.version < snap.version {
            self.chain_from(&r.store_id, r.version)
        } else {
            vec![]
        };
        if chain.is_empty() {
            let full = wire::encode(&snap.to_full_update(), 0, wire::KEYS_PER_CHUNK);
            return (full, snap.version);
        }
        let sent = chain.last().map(|p| p.update.version).unwrap_or(r.version);
        let msgs = chain
            .iter()
            .flat_map(|p| {
                wire::encode(&p.update, p.base_version.unwrap_or(0), wire::KEYS_PER_CHUNK)
            })
            .collect();
        (msgs, sent)
    }

    /// What an update from the builder means for a subscriber at `(store, sent)`.
    fn on_published(
        &self,
        p: Result<Published, broadcast::error::RecvError>,
        store: &mut String,
        sent: &mut i64,
    ) -> Next {
        match p {
            Ok(p) if p.update.store_id == *store && p.update.version <= *sent => Next::Skip,
            Ok(p)
                if !p.update.full
                    && p.base_version == Some(*sent)
                    && p.update.store_id == *store =>
            {
                *sent = p.update.version;
                Next::Send(wire::encode(
                    &p.update,
                    p.base_version.unwrap_or(0),
                    wire::KEYS_PER_CHUNK,
                ))
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                // A full rebuild, or a gap: send the published snapshot.
                let Some(s) = self.cell.load() else {
                    return Next::Skip;
                };
                *sent = s.version;
                *store = s.store_id.clone();
                Next::Send(wire::encode(&s.to_full_update(), 0, wire::KEYS_PER_CHUNK))
            }
            Err(broadcast::error::RecvError::Closed) => Next::End,
        }
    }

    /// Sends `msgs` (the very first one stamped with the fingerprint); false when the
    /// subscriber is gone.
    async fn send_all(
        &self,
        tx: &mpsc::Sender<Result<pb::SnapshotMessage, Status>>,
        mut msgs: Vec<pb::SnapshotMessage>,
        first: &mut bool,
    ) -> bool {
        if *first && let Some(m) = msgs.first_mut() {
            m.master_key_fingerprint = self.fingerprint.clone();
            *first = false;
        }
        for m in msgs {
            if tx.send(Ok(m)).await.is_err() {
                return false;
            }
        }
        true
    }
}

#[tonic::async_trait]
impl SnapshotDistribution for DistributionService {
    type SubscribeStream = Stream;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Stream>, Status> {
        let r = req.into_inner();
        let rx = self.updates.subscribe();
        let Some(snap) = self.cell.load() else {
            return Err(Status::unavailable("the control plane has no snapshot yet"));
        };
        let (tx, out) = mpsc::channel::<Result<pb::SnapshotMessage, Status>>(8);
        self.subscribers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let gauge = Gauge(self.subscribers.clone());
        tracing::info!(subscriber = %LoggedName(&r.subscriber), store_id = %LoggedName(&r.store_id), version = r.version, "data plane subscribed");
        tokio::spawn(self.clone().feed(r, snap, rx, tx, gauge));
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn report_usage(
        &self,
        req: Request<pb::UsageReport>,
    ) -> Result<Response<pb::UsageReportResponse>, Status> {
        let Some(sink) = &self.usage else {
            return Err(Status::unimplemented(
                "this control plane does not record usage",
            ));
        };
        // The reporter's clock is not trusted past ours: a time from the future is "now".
        let now = crate::domain::Timestamp::now();
        let mut batch = Vec::with_capacity(req.get_ref().items.len());
        for i in &req.get_ref().items {
            let id = uuid::Uuid::from_slice(&i.consumer_key_id)
                .map_err(|_| Status::invalid_argument("consumer_key_id: must be a 16-byte id"))?;
            batch.push((id, clamp_reported(i.last_used_time_us, now)));
        }
        sink(batch).await.map_err(|e| {
            tracing::warn!(error = %e, "usage report not stored");
            Status::unavailable("usage not stored; retry")
        })?;
        Ok(Response::new(pb::UsageReportResponse {}))
    }
}

/// A reported last-used time, never later than the control plane's `now` (SPEC §9: a
/// subscriber-token holder cannot date a key's use into the future).
fn clamp_reported(reported_us: i64, now: crate::domain::Timestamp) -> crate::domain::Timestamp {
    crate::domain::Timestamp(reported_us.min(now.0))
}

/// A client-chosen name as logged: control characters escaped (no forged lines) and at most
/// [`LoggedName::MAX_CHARS`] characters, so a subscriber cannot write into the log stream.
struct LoggedName<'a>(&'a str);

impl LoggedName<'_> {
    const MAX_CHARS: usize = 128;
}

impl std::fmt::Display for LoggedName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(Self::MAX_CHARS) {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        if chars.next().is_some() {
            f.write_str("…")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod edge_tests {
    use super::*;
    use crate::domain::Timestamp;

    #[test]
    fn reported_times_never_pass_the_control_planes_clock() {
        let now = Timestamp(1_700_000_000_000_000);
        assert_eq!(clamp_reported(253_402_214_400_000_000, now), now);
        assert_eq!(clamp_reported(i64::MAX, now), now);
        assert_eq!(clamp_reported(now.0 - 5, now), Timestamp(now.0 - 5));
    }

    #[test]
    fn logged_names_are_escaped_and_bounded() {
        assert_eq!(LoggedName("dp-1").to_string(), "dp-1");
        assert_eq!(
            LoggedName("a\nb\r\u{1b}[2J").to_string(),
            "a\\nb\\r\\u{1b}[2J"
        );
        let long = "é".repeat(1000);
        let shown = LoggedName(&long).to_string();
        assert_eq!(shown.chars().count(), LoggedName::MAX_CHARS + 1);
        assert!(!shown.contains('\n'));
    }
}
