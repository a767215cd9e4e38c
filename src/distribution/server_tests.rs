//! Tests of the snapshot stream server: lazy chunking, the subscription cap and send
//! deadline, reported-time clamping and escaped subscriber names.

use super::*;
use crate::crypto::MasterKey;
use crate::distribution::wire::Assembler;
use crate::domain::Timestamp;
use crate::snapshot::fixtures::synthetic_update;
use tokio_stream::StreamExt;

fn service(keys: u64) -> DistributionService {
    let master = MasterKey::generate().keys();
    let cell = SnapshotCell::new();
    let snap = Snapshot::from_full(synthetic_update(keys), &master).unwrap();
    cell.publish(Arc::new(snap));
    let (tx, _) = broadcast::channel(16);
    DistributionService::new(
        cell,
        tx,
        "fingerprint".into(),
        crate::crypto::MasterKey::generate().keys().stream,
    )
}

fn from_scratch() -> Request<pb::SubscribeRequest> {
    Request::new(pb::SubscribeRequest {
        subscriber: "test".into(),
        ..Default::default()
    })
}

#[tokio::test(start_paused = true)]
async fn a_full_snapshot_is_streamed_in_chunks_that_reassemble() {
    let svc = service(4_500);
    let mut stream = svc.subscribe(from_scratch()).await.unwrap().into_inner();
    let mut assembler = Assembler::default();
    let mut messages = 0;
    let update = loop {
        let m = stream.next().await.unwrap().unwrap();
        assert_eq!(
            m.master_key_fingerprint.is_empty(),
            messages > 0,
            "the first message alone carries the fingerprint"
        );
        messages += 1;
        if let Some(a) = assembler.push(m).unwrap() {
            break a.update;
        }
    };
    assert_eq!(messages, 3, "4,500 keys in chunks of {STREAM_CHUNK}");
    assert!(update.full);
    assert_eq!(update.keys.len(), 4_500);
    assert_eq!(update.consumers.len(), 1);
    assert_eq!(update.services.map(|s| s.len()), Some(1));
}

#[tokio::test(start_paused = true)]
async fn the_cap_refuses_more_and_a_subscriber_that_does_not_read_is_dropped() {
    let svc = service(10_000)
        .with_max_subscribers(1)
        .with_send_deadline(Duration::from_secs(1));
    let stalled = svc.subscribe(from_scratch()).await.unwrap();
    let e = svc.subscribe(from_scratch()).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("--max-subscribers"), "{e:?}");
    // It takes nothing: its feed ends after the deadline (paused clock), so reading now
    // yields what was queued and then the end of the stream.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut stalled = stalled.into_inner();
    let mut queued = 0;
    while let Some(m) = stalled.next().await {
        m.unwrap();
        queued += 1;
    }
    assert!(queued <= QUEUE + 1, "{queued} messages were queued");
    // Its slot is held until the stream is dropped (the client went away), then free.
    assert_eq!(svc.subscriber_count(), 1);
    assert!(svc.subscribe(from_scratch()).await.is_err());
    drop(stalled);
    assert_eq!(svc.subscriber_count(), 0);
    let again = svc.subscribe(from_scratch()).await.unwrap();
    drop(again);
}

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

/// A control plane serving `snap`, its stream key known (to open what it sends).
fn service_of(
    snap: Snapshot,
    master: &MasterKey,
) -> (DistributionService, broadcast::Sender<Published>) {
    let cell = SnapshotCell::new();
    cell.publish(Arc::new(snap));
    let (tx, _) = broadcast::channel(16);
    let svc =
        DistributionService::new(cell, tx.clone(), master.fingerprint(), master.keys().stream);
    (svc, tx)
}

fn request(
    snap: Option<&Snapshot>,
    protocol: u32,
    digest: Option<ContentDigest>,
) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        store_id: snap.map(|s| s.store_id.clone()).unwrap_or_default(),
        epoch: snap.map(|s| s.epoch.clone()).unwrap_or_default(),
        version: snap.map(|s| s.version).unwrap_or(0),
        subscriber: "test".into(),
        nonce: vec![4; seal::NONCE_LEN],
        protocol,
        digest: digest.map(|d| d.to_bytes().to_vec()).unwrap_or_default(),
    }
}

/// The first `n` messages of a subscription, as sent.
async fn first_messages(
    svc: &DistributionService,
    r: pb::SubscribeRequest,
    n: usize,
) -> Vec<pb::SnapshotMessage> {
    let mut stream = svc.subscribe(Request::new(r)).await.unwrap().into_inner();
    let mut out = vec![];
    while out.len() < n {
        out.push(stream.next().await.unwrap().unwrap());
    }
    out
}

/// Opens `msgs` as the data plane does.
fn opened(master: &MasterKey, msgs: Vec<pb::SnapshotMessage>) -> Vec<pb::SnapshotMessage> {
    let mut o = seal::Opener::new(
        &master.keys().stream,
        &[4; seal::NONCE_LEN],
        master.fingerprint(),
    );
    msgs.into_iter().map(|m| o.open(m).unwrap()).collect()
}

/// A subscriber that names no protocol (a data plane built before protocol 2) gets the
/// stream as before, byte for byte: the same messages, no field it does not know, each MACed
/// as protocol 1 did (recomputed here the old way, over the message's own encoding); a
/// protocol-2 subscriber gets the same messages inside envelopes, with the digest added.
#[tokio::test(start_paused = true)]
async fn a_subscriber_without_a_protocol_gets_the_protocol_1_stream_byte_for_byte() {
    use prost::Message;
    let master = MasterKey::generate();
    let snap = Snapshot::from_full(synthetic_update(4_500), &master.keys()).unwrap();
    let (svc, _tx) = service_of(snap.clone(), &master);
    let old = first_messages(&svc, request(None, 0, None), 3).await;
    let mut prev = master.keys().stream.hash_parts(&[
        b"keygate snapshot stream v1",
        b"nonce",
        &[4; seal::NONCE_LEN],
    ]);
    for (i, m) in old.iter().enumerate() {
        assert!(m.sealed.is_empty() && m.digest.is_empty(), "message {i}");
        assert_eq!(m.master_key_fingerprint.is_empty(), i > 0);
        let mut unsealed = m.clone();
        unsealed.mac.clear();
        prev = master.keys().stream.hash_parts(&[
            b"keygate snapshot stream v1",
            &prev,
            &unsealed.encode_to_vec(),
        ]);
        assert_eq!(m.mac, prev.to_vec(), "message {i}: the protocol-1 MAC");
        let mut again = unsealed.clone();
        again.mac = prev.to_vec();
        assert_eq!(again.encode_to_vec(), m.encode_to_vec());
    }
    let new = first_messages(&svc, request(None, seal::PROTOCOL, None), 3).await;
    assert!(
        new.iter()
            .all(|m| !m.sealed.is_empty() && m.keys.is_empty())
    );
    let mut inner = opened(&master, new);
    assert_eq!(
        ContentDigest::from_bytes(&inner[2].digest),
        Some(snap.digest()),
        "the last chunk carries the digest"
    );
    inner[2].digest.clear();
    let mut old = opened(&master, old);
    old[0].master_key_fingerprint.clear();
    assert_eq!(inner, old);
}

/// Protocol 2: a subscriber at the served version is up to date only with the served
/// content; with other content (a restored store changed back up to that version) it gets the
/// full snapshot. A subscriber that presents no digest (protocol 1, or one whose digests
/// differ from its control plane's) cannot say, and is answered as before.
#[tokio::test(start_paused = true)]
async fn a_subscriber_at_the_served_version_with_other_content_gets_the_full_snapshot() {
    let master = MasterKey::generate();
    let keys = master.keys();
    let snap = Snapshot::from_full(synthetic_update(10), &keys).unwrap();
    let mut other = synthetic_update(10);
    other.keys[3].1.enabled = false;
    let other = Snapshot::from_full(other, &keys).unwrap();
    assert_eq!(
        (other.store_id.as_str(), other.epoch.as_str(), other.version),
        (snap.store_id.as_str(), snap.epoch.as_str(), snap.version)
    );
    assert_ne!(other.digest(), snap.digest());
    let (svc, _tx) = service_of(snap.clone(), &master);
    let first = async |r| opened(&master, first_messages(&svc, r, 1).await).remove(0);
    let m = first(request(Some(&snap), seal::PROTOCOL, Some(snap.digest()))).await;
    assert!(m.heartbeat, "same content: up to date");
    let m = first(request(Some(&other), seal::PROTOCOL, Some(other.digest()))).await;
    assert!(m.full && !m.heartbeat, "other content: everything");
    let m = first(request(Some(&other), seal::PROTOCOL, None)).await;
    assert!(
        m.heartbeat,
        "no digest (one that cannot digest alike): as protocol 1"
    );
    let m = first(request(Some(&other), 0, None)).await;
    assert!(m.heartbeat, "protocol 1: as before");
}

/// Protocol 2: increments are sent only to a subscriber whose content at their base is the
/// one they were applied to; each carries the digest of the state it leads to.
#[tokio::test(start_paused = true)]
async fn increments_go_only_to_a_subscriber_holding_their_base_content() {
    let master = MasterKey::generate();
    let keys = master.keys();
    let base = Snapshot::from_full(synthetic_update(10), &keys).unwrap();
    let change = Update {
        store_id: base.store_id.clone(),
        version: base.version + 1,
        removed_keys: vec![*base.key_index().iter().next().unwrap().0],
        ..Default::default()
    };
    let next = base.apply(change.clone(), &keys).unwrap();
    let (svc, tx) = service_of(next.clone(), &master);
    tx.send(Published {
        base_version: Some(base.version),
        update: Arc::new(change),
        digest: next.digest(),
        base_digest: Some(base.digest()),
    })
    .unwrap();
    // The history task records it.
    while svc
        .chain_from(&base.store_id, "", base.version, None)
        .is_empty()
    {
        tokio::task::yield_now().await;
    }
    let m = opened(
        &master,
        first_messages(
            &svc,
            request(Some(&base), seal::PROTOCOL, Some(base.digest())),
            1,
        )
        .await,
    )
    .remove(0);
    assert!(!m.full && m.base_version == base.version);
    assert_eq!(ContentDigest::from_bytes(&m.digest), Some(next.digest()));
    let mut other = synthetic_update(10);
    other.keys[3].1.enabled = false;
    let other = Snapshot::from_full(other, &keys).unwrap();
    let m = opened(
        &master,
        first_messages(
            &svc,
            request(Some(&other), seal::PROTOCOL, Some(other.digest())),
            1,
        )
        .await,
    )
    .remove(0);
    assert!(m.full, "another base content: everything");
}
