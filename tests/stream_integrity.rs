//! The snapshot stream is authenticated end to end (SPEC §9): a man in the middle between a
//! real `keygate authz` data plane and a real `keygate control-plane` — a relaying gRPC proxy
//! on plain HTTP, holding the subscriber token it relays, as an attacker on the path would —
//! changes what the control plane sends. Whatever it changes (one flipped bit, a rewritten
//! field, a dropped fingerprint, the request's protocol so the control plane answers in the
//! older format), the data plane refuses the message, counts and logs it, keeps
//! serving its last good snapshot (a disabled key stays refused, an enabled key stays allowed
//! through `Check`), and takes genuine changes again once the path is clean.
//!
//! Every test has its own processes, ports and data dirs. Nothing sleeps to wait for a state.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate::proto::snapshot::v1 as snap;
use keygate::proto::snapshot::v1::snapshot_distribution_client::SnapshotDistributionClient;
use keygate::proto::snapshot::v1::snapshot_distribution_server::{
    SnapshotDistribution, SnapshotDistributionServer,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use common::admin::{
    create_bound_key, create_consumer, create_model_key, create_service, disable_consumer_key,
};
use common::split::{
    ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, subscriber_token,
};
use common::{BearerToken, poll_until, tail};

const SETTLE: Duration = Duration::from_secs(15);
const MODEL_KEY: &str = "sk-proj-streamIntegrity0000000000000000001";

/// What the man in the middle does to the next subscription's full snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tamper {
    /// Flips one bit of the named key's HMAC (the key would stop matching).
    FlipBit(&'static str),
    /// Re-enables the named (disabled) key.
    Enable(&'static str),
    /// Strips the master key fingerprint from the first message, and re-enables the key.
    DropFingerprint(&'static str),
    /// Strips the protocol from the data plane's request (so the control plane answers in
    /// the protocol-1 format), and re-enables the key in that format.
    Downgrade(&'static str),
}

impl Tamper {
    /// Changes `m`; true when it did. A protocol-2 envelope is opened (decoded without
    /// checking anything), changed inside and sealed back with the MAC it had, as an attacker
    /// without the master key would.
    fn apply(self, m: &mut snap::SnapshotMessage, first: bool) -> bool {
        use prost::Message;
        if !m.sealed.is_empty() {
            let mut inner = snap::SnapshotMessage::decode(m.sealed.as_slice()).unwrap();
            let changed = self.apply(&mut inner, false);
            m.sealed = inner.encode_to_vec();
            if first && matches!(self, Tamper::DropFingerprint(_)) {
                m.master_key_fingerprint.clear();
            }
            return changed;
        }
        let (name, enable) = match self {
            Tamper::FlipBit(n) => (n, false),
            Tamper::Enable(n) | Tamper::DropFingerprint(n) | Tamper::Downgrade(n) => (n, true),
        };
        let mut changed = false;
        if first && matches!(self, Tamper::DropFingerprint(_)) {
            m.master_key_fingerprint.clear();
        }
        for k in m.keys.iter_mut().filter(|k| k.name == name) {
            if enable {
                k.enabled = true;
            } else {
                k.hash[0] ^= 1;
            }
            changed = true;
        }
        changed
    }
}

/// The relaying proxy. Armed with a `Tamper`, it ends the stream it relays (the data plane
/// resubscribes), asks the control plane for a full snapshot on the next subscription
/// (version 0, as a data plane holding nothing would), changes it and relays the rest
/// untouched. It tampers once, then only relays.
#[derive(Clone)]
struct Mitm {
    upstream: Channel,
    armed: Arc<Mutex<Option<Tamper>>>,
    kick: watch::Sender<u64>,
    /// Set once a tampered message went out.
    delivered: watch::Sender<bool>,
}

type Stream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<snap::SnapshotMessage, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotDistribution for Mitm {
    type SubscribeStream = Stream;

    async fn subscribe(
        &self,
        req: Request<snap::SubscribeRequest>,
    ) -> Result<Response<Stream>, Status> {
        // The subscriber token, captured on the way.
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let mut r = req.into_inner();
        let tamper = self.armed.lock().unwrap().take();
        if tamper.is_some() {
            r.version = 0;
            r.store_id.clear();
            r.digest.clear();
        }
        if matches!(tamper, Some(Tamper::Downgrade(_))) {
            r.protocol = 0;
        }
        let mut client =
            SnapshotDistributionClient::with_interceptor(self.upstream.clone(), BearerToken(token))
                .max_decoding_message_size(64 * 1024 * 1024);
        let mut upstream = client.subscribe(r).await?.into_inner();
        let (tx, out) = mpsc::channel(8);
        let mut kick = self.kick.subscribe();
        kick.borrow_and_update();
        let delivered = self.delivered.clone();
        tokio::spawn(async move {
            let mut first = true;
            let mut pending = tamper;
            loop {
                let m = tokio::select! {
                    _ = kick.changed() => {
                        let _ = tx.send(Err(Status::unavailable("relay restarted"))).await;
                        return;
                    }
                    m = upstream.message() => m,
                };
                let mut m = match m {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let tampered = pending.is_some_and(|t| t.apply(&mut m, first));
                first = false;
                if tampered {
                    pending = None;
                }
                if tx.send(Ok(m)).await.is_err() {
                    return;
                }
                if tampered {
                    delivered.send_replace(true);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn report_usage(
        &self,
        _: Request<snap::UsageReport>,
    ) -> Result<Response<snap::UsageReportResponse>, Status> {
        Ok(Response::new(snap::UsageReportResponse::default()))
    }
}

impl Mitm {
    async fn start(control_plane: &str) -> (Mitm, SocketAddr) {
        let upstream = Channel::from_shared(control_plane.to_string())
            .unwrap()
            .connect_lazy();
        let mitm = Mitm {
            upstream,
            armed: Arc::default(),
            kick: watch::channel(0).0,
            delivered: watch::channel(false).0,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = SnapshotDistributionServer::new(mitm.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (mitm, addr)
    }

    /// Tampers with the next subscription, and makes the data plane subscribe again.
    fn arm(&self, t: Tamper) {
        *self.armed.lock().unwrap() = Some(t);
        self.delivered.send_replace(false);
        self.kick.send_modify(|n| *n += 1);
    }

    async fn wait_delivered(&self) {
        let mut rx = self.delivered.subscribe();
        tokio::time::timeout(SETTLE, rx.wait_for(|d| *d))
            .await
            .expect("the tampered message reached the data plane within the bound")
            .unwrap();
    }
}

struct Setup {
    dp: DataPlane,
    mitm: Mitm,
    cp: ControlPlane,
    kept: String,
    revoked: String,
    _dir: tempfile::TempDir,
}

/// A control plane with one enabled key (`kept`) and one disabled (`revoked`), a data plane
/// subscribed through the proxy, serving both verdicts.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let token = subscriber_token();
    let cp = ControlPlane::start(&ControlPlaneOptions::new(&dir.path().join("cp"), &token)).await;
    let mut admin = cp.admin().await;
    create_service(&mut admin, "openai", "", "").await;
    create_model_key(&mut admin, "openai-primary", MODEL_KEY, "openai").await;
    create_consumer(&mut admin, "app").await;
    let kept = create_bound_key(&mut admin, "kept", "app").await;
    let revoked = create_bound_key(&mut admin, "revoked", "app").await;
    disable_consumer_key(&mut admin, "revoked").await;
    let (mitm, addr) = Mitm::start(&cp.url()).await;
    let dp = DataPlane::start(&DataPlaneOptions::new(
        "data plane",
        &format!("http://{addr}"),
        &dir.path().join("dp"),
        &cp.master_key_file(),
        &token,
    ))
    .await;
    dp.wait_serving(SETTLE).await;
    poll_until(
        SETTLE,
        "the data plane to refuse the revoked key",
        || async {
            let (k, r) = (
                dp.verdict(&kept, "openai").await,
                dp.verdict(&revoked, "openai").await,
            );
            (k.allowed() && !r.allowed()).then_some(())
        },
    )
    .await;
    Setup {
        dp,
        mitm,
        cp,
        kept,
        revoked,
        _dir: dir,
    }
}

/// How many messages the data plane has refused (its log lines).
fn refusals(dp: &DataPlane) -> usize {
    dp.proc
        .log_messages("refused an unauthenticated snapshot message; keeping the served snapshot and resubscribing")
        .len()
}

async fn tampered_stream_is_refused(t: Tamper, reason: &str) {
    let s = setup().await;
    let before = refusals(&s.dp);
    s.mitm.arm(t);
    s.mitm.wait_delivered().await;
    // Until the data plane has dealt with the message: refused it (fixed), or taken it.
    poll_until(
        SETTLE,
        "the data plane to deal with the tampered message",
        || async {
            let taken = s.dp.verdict(&s.revoked, "openai").await.allowed()
                || !s.dp.verdict(&s.kept, "openai").await.allowed();
            (taken || refusals(&s.dp) > before).then_some(())
        },
    )
    .await;
    let diag = || {
        format!(
            "--- data plane:\n{}\n--- control plane:\n{}",
            tail(&s.dp.logs(), 30),
            tail(&s.cp.logs(), 10)
        )
    };
    assert!(
        !s.dp.verdict(&s.revoked, "openai").await.allowed(),
        "{t:?}: the revoked key is allowed after the man in the middle changed the stream\n{}",
        diag()
    );
    assert!(
        s.dp.verdict(&s.kept, "openai").await.allowed(),
        "{t:?}: the enabled key is refused after the man in the middle changed the stream\n{}",
        diag()
    );
    let refused = s.dp.proc.log_messages(
        "refused an unauthenticated snapshot message; keeping the served snapshot and resubscribing",
    );
    let last = refused
        .last()
        .unwrap_or_else(|| panic!("{t:?}: no refusal logged\n{}", diag()));
    assert!(
        last["fields"]["error"]
            .as_str()
            .unwrap_or("")
            .contains(reason),
        "{t:?}: refused for another reason than {reason:?}: {last}"
    );

    // Once the path is clean again, genuine changes arrive: the data plane resubscribed.
    let mut admin = s.cp.admin().await;
    disable_consumer_key(&mut admin, "kept").await;
    poll_until(
        SETTLE,
        "the data plane to take the genuine change",
        || async { (!s.dp.verdict(&s.kept, "openai").await.allowed()).then_some(()) },
    )
    .await;
    assert!(!s.dp.verdict(&s.revoked, "openai").await.allowed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_is_refused_and_the_last_good_snapshot_served() {
    tampered_stream_is_refused(Tamper::FlipBit("kept"), "MAC does not verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reenabled_key_is_refused_and_the_last_good_snapshot_served() {
    tampered_stream_is_refused(Tamper::Enable("revoked"), "MAC does not verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_the_fingerprint_is_refused() {
    tampered_stream_is_refused(
        Tamper::DropFingerprint("revoked"),
        "carries no master key fingerprint",
    )
    .await;
}

/// The protocol-1 format a stripped request gets is MACed under the same key: a change in it
/// is refused like a change inside an envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgraded_stream_is_still_authenticated() {
    tampered_stream_is_refused(Tamper::Downgrade("revoked"), "MAC does not verify").await;
}
