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
        if let Some((_, u)) = assembler.push(m).unwrap() {
            break u;
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
