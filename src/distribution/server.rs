//! The `SnapshotDistribution/Subscribe` stream: a full snapshot (or the missed changes) on
//! connect, then every change as the snapshot builder applies it, and heartbeats.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{seal, wire};
use crate::crypto::{KeyHasher, Secret, credentials_equal};
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
    /// MACs every message of every stream (`seal`).
    stream_key: KeyHasher,
    subscribers: Arc<std::sync::atomic::AtomicI64>,
    /// Where data planes' last-used reports are written.
    usage: Option<crate::usage::UsageSink>,
}

impl DistributionService {
    /// `updates` is the builder's channel; `fingerprint` the master key's, `stream_key` its
    /// derived stream MAC key (`Keys::stream`).
    pub fn new(
        cell: SnapshotCell,
        updates: broadcast::Sender<Published>,
        fingerprint: String,
        stream_key: KeyHasher,
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
            stream_key,
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
        let mut sealer = seal::Sealer::new(&self.stream_key, &r.nonce, self.fingerprint.clone());
        let (initial, mut sent) = self.initial(&r, &snap);
        let mut store = snap.store_id.clone();
        drop(snap);
        if !self.send_all(&tx, initial, &mut sealer).await {
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
            if !self.send_all(&tx, msgs, &mut sealer).await {
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

    /// Sends `msgs`, each sealed (the very first one also stamped with the fingerprint);
    /// false when the subscriber is gone.
    async fn send_all(
        &self,
        tx: &mpsc::Sender<Result<pb::SnapshotMessage, Status>>,
        msgs: Vec<pb::SnapshotMessage>,
        sealer: &mut seal::Sealer,
    ) -> bool {
        for mut m in msgs {
            sealer.seal(&mut m);
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
        tracing::info!(subscriber = %r.subscriber, store_id = %r.store_id, version = r.version, "data plane subscribed");
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
        let mut batch = Vec::with_capacity(req.get_ref().items.len());
        for i in &req.get_ref().items {
            let id = uuid::Uuid::from_slice(&i.consumer_key_id)
                .map_err(|_| Status::invalid_argument("consumer_key_id: must be a 16-byte id"))?;
            batch.push((id, crate::domain::Timestamp(i.last_used_time_us)));
        }
        sink(batch).await.map_err(|e| {
            tracing::warn!(error = %e, "usage report not stored");
            Status::unavailable("usage not stored; retry")
        })?;
        Ok(Response::new(pb::UsageReportResponse {}))
    }
}
