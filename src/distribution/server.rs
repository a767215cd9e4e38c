//! The `SnapshotDistribution/Subscribe` stream: a full snapshot (or the missed changes) on
//! connect, then every change as the snapshot builder applies it, and heartbeats. A full
//! snapshot is encoded one chunk at a time, as the subscriber reads, from the shared immutable
//! snapshot: a subscriber costs a chunk or two, not a copy of every key. Concurrent
//! subscriptions are capped (`RESOURCE_EXHAUSTED` beyond), and a subscriber that reads nothing
//! for `SEND_DEADLINE` is dropped (it reconnects and catches up).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::usage_wire::{MeteredError, MeteredSink};
use super::{seal, wire};
use crate::crypto::{KeyHasher, Secret, credentials_equal};
use crate::proto::snapshot::v1 as pb;
use crate::proto::snapshot::v1::snapshot_distribution_server::{
    SnapshotDistribution, SnapshotDistributionServer,
};
use crate::snapshot::{ContentDigest, Published, SeenAhead, Snapshot, SnapshotCell, Update};

const HISTORY: usize = 1024;
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Keys per message of a streamed full snapshot (~100 bytes each): small, since each
/// subscriber holds at most a couple of encoded chunks.
const STREAM_CHUNK: usize = 2_000;
/// Encoded messages queued per subscriber before its stream waits for the client to read.
const QUEUE: usize = 1;
/// Concurrent subscriptions a control plane accepts by default (`--max-subscribers`).
pub const DEFAULT_MAX_SUBSCRIBERS: usize = 256;
/// A subscriber whose stream does not take a message within this long is dropped.
pub const SEND_DEADLINE: Duration = Duration::from_secs(30);

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
    /// One permit per open subscription.
    slots: Arc<Semaphore>,
    max_subscribers: usize,
    send_deadline: Duration,
    /// The head (everything but the keys) of the full update of the newest snapshot a
    /// subscriber was sent in full, shared by every subscriber of that version.
    head: Arc<Mutex<Option<Arc<Update>>>>,
    /// Where data planes' last-used reports are written.
    usage: Option<crate::usage::UsageSink>,
    /// Where data planes' metered-usage reports are applied (exactly once, by the store).
    metered: Option<MeteredSink>,
    /// Told of every subscriber ahead of the served snapshot in its (store, epoch): the
    /// store may have gone back (the snapshot builder checks and starts a new epoch).
    seen_ahead: Option<tokio::sync::mpsc::Sender<SeenAhead>>,
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
            slots: Arc::new(Semaphore::new(DEFAULT_MAX_SUBSCRIBERS)),
            max_subscribers: DEFAULT_MAX_SUBSCRIBERS,
            send_deadline: SEND_DEADLINE,
            head: Arc::default(),
            usage: None,
            metered: None,
            seen_ahead: None,
        }
    }

    /// Tell the snapshot builder of subscribers ahead of the served snapshot (`SeenAhead`).
    pub fn with_seen_ahead(mut self, tx: tokio::sync::mpsc::Sender<SeenAhead>) -> Self {
        self.seen_ahead = Some(tx);
        self
    }

    /// At most `max` concurrent subscriptions (`--max-subscribers`).
    pub fn with_max_subscribers(mut self, max: usize) -> Self {
        self.slots = Arc::new(Semaphore::new(max));
        self.max_subscribers = max;
        self
    }

    /// Drop a subscriber that does not take a message within `deadline` (`SEND_DEADLINE`).
    pub fn with_send_deadline(mut self, deadline: Duration) -> Self {
        self.send_deadline = deadline;
        self
    }

    /// Accept data planes' last-used reports into `sink`.
    pub fn with_usage(mut self, sink: crate::usage::UsageSink) -> Self {
        self.usage = Some(sink);
        self
    }

    /// Accept data planes' metered-usage reports into `sink`.
    pub fn with_metered(mut self, sink: MeteredSink) -> Self {
        self.metered = Some(sink);
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

    /// The incremental updates that lead from `(store, epoch, version)` to the newest
    /// recorded one. With `held` (the content digest the subscriber presented), only from a
    /// state of that content: increments applied to other content would not lead here.
    fn chain_from(
        &self,
        store_id: &str,
        epoch: &str,
        version: i64,
        held: Option<ContentDigest>,
    ) -> Vec<Published> {
        let h = self.history.lock().expect("history lock");
        let Some(start) = h.iter().position(|p| {
            !p.update.full
                && p.update.store_id == store_id
                && p.update.epoch == epoch
                && p.base_version == Some(version)
                && held.is_none_or(|d| p.base_digest == Some(d))
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
    /// Everything in this snapshot, encoded as it is read.
    Full(Arc<Snapshot>),
    /// The builder is gone.
    End,
}

/// One subscriber's sending end: the first message is stamped with the fingerprint; a send
/// that the client does not take within the deadline ends the stream.
struct Outbox {
    tx: mpsc::Sender<Result<pb::SnapshotMessage, Status>>,
    /// MACs every message and stamps the fingerprint on the first (`seal`).
    sealer: seal::Sealer,
    deadline: Duration,
    subscriber: String,
}

/// The response stream: it holds the subscription's slot and gauge until tonic drops it (the
/// client went away), so the cap bounds what stalled clients can hold, even after the send
/// deadline ended their feed (what is left then is one queued message and HTTP/2's buffers).
struct Held {
    inner: ReceiverStream<Result<pb::SnapshotMessage, Status>>,
    _slot: OwnedSemaphorePermit,
    _gauge: Gauge,
}

impl tokio_stream::Stream for Held {
    type Item = Result<pb::SnapshotMessage, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Outbox {
    /// False when the subscriber is gone or did not read in time (then it is dropped).
    async fn send(&mut self, m: pb::SnapshotMessage) -> bool {
        let m = self.sealer.seal(m);
        match tokio::time::timeout(self.deadline, self.tx.send(Ok(m))).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::warn!(
                    subscriber = %LoggedName(&self.subscriber),
                    deadline_s = self.deadline.as_secs_f64(),
                    "data plane dropped: it read nothing within the send deadline (it reconnects and catches up)"
                );
                false
            }
        }
    }
}

impl DistributionService {
    /// One subscriber's stream: its initial state, then every change and heartbeats, until it
    /// goes away. The first message carries the master key's fingerprint.
    async fn feed(
        self,
        r: pb::SubscribeRequest,
        snap: Arc<Snapshot>,
        mut rx: broadcast::Receiver<Published>,
        mut out: Outbox,
    ) {
        let (initial, mut sent) = self.initial(&r, snap.clone());
        let mut store = (snap.store_id.clone(), snap.epoch.clone());
        drop(snap);
        if !self.deliver(&mut out, initial).await {
            return;
        }
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.tick().await;
        loop {
            let next = tokio::select! {
                _ = out.tx.closed() => return,
                _ = beat.tick() => Next::Send(vec![pb::SnapshotMessage {
                    store_id: store.0.clone(),
                    epoch: store.1.clone(),
                    version: sent,
                    heartbeat: true,
                    ..Default::default()
                }]),
                p = rx.recv() => self.on_published(p, &mut store, &mut sent),
            };
            if !self.deliver(&mut out, next).await {
                return;
            }
        }
    }

    /// Sends what `next` says; false when the stream is over.
    async fn deliver(&self, out: &mut Outbox, next: Next) -> bool {
        match next {
            Next::Skip => true,
            Next::End => false,
            Next::Send(msgs) => {
                for m in msgs {
                    if !out.send(m).await {
                        return false;
                    }
                }
                true
            }
            Next::Full(snap) => self.send_full(out, &snap).await,
        }
    }

    /// The initial state for a subscriber at `r`'s version: nothing (a heartbeat), the missed
    /// changes, or everything; and the version it then has. A subscriber that presents the
    /// digest of what it holds (protocol 2) is up to date, or sent increments, only when that
    /// content is the one this control plane had at its version; otherwise (a store restored
    /// and changed back up to or past that version) it gets everything.
    fn initial(&self, r: &pb::SubscribeRequest, snap: Arc<Snapshot>) -> (Next, i64) {
        let same = snap.same_history(&r.store_id, &r.epoch);
        let held = if r.protocol >= seal::PROTOCOL {
            ContentDigest::from_bytes(&r.digest)
        } else {
            None
        };
        if same && r.version > snap.version {
            self.report_ahead(r, &snap);
        }
        if same && r.version == snap.version {
            if let Some(d) = held
                && d != snap.digest()
            {
                tracing::warn!(
                    subscriber = %LoggedName(&r.subscriber),
                    version = r.version,
                    digest = %d,
                    served_digest = %snap.digest(),
                    "a data plane holds the served version with other content (the store was restored and changed back up to it): sending it the full snapshot"
                );
                return (Next::Full(snap.clone()), snap.version);
            }
            let beat = pb::SnapshotMessage {
                store_id: snap.store_id.clone(),
                epoch: snap.epoch.clone(),
                version: snap.version,
                heartbeat: true,
                ..Default::default()
            };
            return (Next::Send(vec![beat]), snap.version);
        }
        let chain = if same && r.version < snap.version {
            self.chain_from(&r.store_id, &r.epoch, r.version, held)
        } else {
            vec![]
        };
        if chain.is_empty() {
            let version = snap.version;
            return (Next::Full(snap), version);
        }
        let sent = chain.last().map(|p| p.update.version).unwrap_or(r.version);
        let msgs = chain.iter().flat_map(increment).collect();
        (Next::Send(msgs), sent)
    }

    /// A subscriber presented a version of the served (store, epoch) beyond the served
    /// snapshot: tell the builder, which checks it against the store (the subscriber is sent
    /// the served snapshot meanwhile, and refuses it as older until the new epoch comes).
    fn report_ahead(&self, r: &pb::SubscribeRequest, snap: &Snapshot) {
        tracing::info!(
            subscriber = %LoggedName(&r.subscriber),
            version = r.version,
            served_version = snap.version,
            "a data plane holds a version beyond the served snapshot; checking the store's history"
        );
        if let Some(tx) = &self.seen_ahead {
            let _ = tx.try_send(SeenAhead {
                store_id: r.store_id.clone(),
                epoch: r.epoch.clone(),
                version: r.version,
            });
        }
    }

    /// What an update from the builder means for a subscriber at `(store, epoch, sent)`.
    fn on_published(
        &self,
        p: Result<Published, broadcast::error::RecvError>,
        store: &mut (String, String),
        sent: &mut i64,
    ) -> Next {
        let same = |u: &Update| u.store_id == store.0 && u.epoch == store.1;
        match p {
            Ok(p) if same(&p.update) && p.update.version <= *sent => Next::Skip,
            Ok(p) if !p.update.full && p.base_version == Some(*sent) && same(&p.update) => {
                *sent = p.update.version;
                Next::Send(increment(&p))
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                // A full rebuild, or a gap: send the published snapshot.
                let Some(s) = self.cell.load() else {
                    return Next::Skip;
                };
                *sent = s.version;
                *store = (s.store_id.clone(), s.epoch.clone());
                Next::Full(s)
            }
            Err(broadcast::error::RecvError::Closed) => Next::End,
        }
    }

    /// Everything but the keys of `snap`'s full update: computed once per snapshot version
    /// and shared by every subscriber sent that version in full.
    fn head(&self, snap: &Snapshot) -> Arc<Update> {
        let same =
            |h: &Update| snap.same_history(&h.store_id, &h.epoch) && h.version == snap.version;
        if let Some(h) = self.head.lock().expect("head lock").as_ref()
            && same(h)
        {
            return h.clone();
        }
        // Built outside the lock.
        let head = Arc::new(snap.to_update_without_keys());
        *self.head.lock().expect("head lock") = Some(head.clone());
        head
    }

    /// Sends `snap` as a full update, `STREAM_CHUNK` keys a message, each chunk encoded only
    /// when the one before has been taken; false when the stream is over.
    async fn send_full(&self, out: &mut Outbox, snap: &Snapshot) -> bool {
        let head = self.head(snap);
        let mut keys = snap.key_index().iter().peekable();
        let mut first = true;
        loop {
            let part: Vec<_> = keys
                .by_ref()
                .take(STREAM_CHUNK)
                .map(|(h, e)| (*h, e.clone()))
                .collect();
            let last = keys.peek().is_none();
            let mut m = encode_chunk(&head, part, first, last);
            if last {
                m.digest = snap.digest().to_bytes().to_vec();
            }
            if !out.send(m).await {
                return false;
            }
            if last {
                return true;
            }
            first = false;
        }
    }
}

/// The messages of a published increment, the last with the digest it leads to.
fn increment(p: &Published) -> Vec<pb::SnapshotMessage> {
    wire::with_digest(
        wire::encode(&p.update, p.base_version.unwrap_or(0), wire::KEYS_PER_CHUNK),
        p.digest,
    )
}

/// One message of a full update: the first carries `head` (consumers, services, counts),
/// later ones only their keys, the last is marked `last_chunk` — the messages
/// `wire::encode` makes of the whole update, made one at a time.
fn encode_chunk(
    head: &Update,
    keys: Vec<(crate::crypto::KeyHash, crate::snapshot::KeyEntry)>,
    first: bool,
    last: bool,
) -> pb::SnapshotMessage {
    let part = if first {
        Update {
            keys,
            ..head.clone()
        }
    } else {
        Update {
            store_id: head.store_id.clone(),
            epoch: head.epoch.clone(),
            version: head.version,
            full: true,
            keys,
            ..Default::default()
        }
    };
    let mut m = wire::encode(&part, 0, usize::MAX)
        .pop()
        .expect("an update is at least one message");
    m.last_chunk = last;
    if !first {
        m.model_key_count = 0;
    }
    m
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
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this control plane already serves {} subscriptions (--max-subscribers); retry later",
                self.max_subscribers
            ))
        })?;
        let (tx, stream) = mpsc::channel::<Result<pb::SnapshotMessage, Status>>(QUEUE);
        self.subscribers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = Outbox {
            tx,
            sealer: seal::Sealer::new(
                &self.stream_key,
                &r.nonce,
                self.fingerprint.clone(),
                r.protocol,
            ),
            deadline: self.send_deadline,
            subscriber: r.subscriber.clone(),
        };
        let stream = Held {
            inner: ReceiverStream::new(stream),
            _slot: slot,
            _gauge: Gauge(self.subscribers.clone()),
        };
        tracing::info!(subscriber = %LoggedName(&r.subscriber), store_id = %LoggedName(&r.store_id), version = r.version, protocol = r.protocol, "data plane subscribed");
        tokio::spawn(self.clone().feed(r, snap, rx, out));
        Ok(Response::new(Box::pin(stream)))
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
        if !batch.is_empty() {
            sink(batch).await.map_err(|e| {
                tracing::warn!(error = %e, "usage report not stored");
                Status::unavailable("usage not stored; retry")
            })?;
        }
        let r = req.into_inner();
        if r.sequence == 0 {
            return Ok(Response::new(pb::UsageReportResponse::default()));
        }
        let Some(metered) = &self.metered else {
            return Err(Status::unimplemented(
                "this control plane does not apply metered usage",
            ));
        };
        let input = super::usage_wire::metered_from_wire(r)?;
        match metered(input).await {
            Ok(()) => Ok(Response::new(pb::UsageReportResponse {
                metered_applied: true,
            })),
            Err(MeteredError::Refused(why)) => Err(Status::invalid_argument(why)),
            Err(MeteredError::Unavailable(why)) => {
                tracing::warn!(error = %why, "metered usage report not applied");
                Err(Status::unavailable("usage not applied; retry"))
            }
        }
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
#[path = "server_tests.rs"]
mod tests;
