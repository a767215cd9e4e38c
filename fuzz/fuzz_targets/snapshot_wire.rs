//! Fuzzes the data plane's side of the snapshot stream: arbitrary bytes decoded as
//! `SnapshotMessage`s (prost), opened with the seal `Opener`, assembled by
//! `distribution::wire::Assembler` and applied by `Subscriber::apply_checked` (→
//! `Snapshot::apply` / `from_full`, then the content digest), exactly as a subscription
//! session does.
//! Input: frames `[flags u8][len u16 le][len bytes of a SnapshotMessage]`. Flags: bit 0 = the
//! control plane sealed this message (the harness seals it, as a genuine stream would);
//! bit 1 = a man in the middle then flips bit `flags >> 2` of byte `len / 2` of its encoding;
//! a first frame with bit 7 also set is preceded by a genuine sealed full snapshot (store
//! `fuzz`, version 10, with decryptable model keys), so later frames exercise incremental
//! updates on a real snapshot; a first frame with bit 6 set makes the stream protocol 2
//! (envelopes: the message's own encoding sealed as bytes), protocol 1 otherwise.
//! Invariants: never panics; a message opens exactly when it is what the control plane sealed,
//! in order (anything forged, changed or after a dropped message is refused); a message that
//! fails to open is never applied (the session ends, the served snapshot is unchanged).
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use keygate::crypto::Keys;
use keygate::distribution::Subscriber;
use keygate::distribution::seal::{Opener, Sealer};
use keygate::distribution::subscriber::SubscriberConfig;
use keygate::distribution::wire::{self, Assembler};
use keygate::proto::snapshot::v1 as pb;
use keygate::snapshot::SnapshotCell;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const NONCE: [u8; 16] = [9; 16];

struct World {
    keys: Keys,
    fingerprint: String,
    /// The genuine full snapshot of the prelude, as messages.
    prelude: Vec<pb::SnapshotMessage>,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let keys = keygate_fuzz::keys();
    let prelude = wire::encode(&keygate_fuzz::full_update(&keys), 0, 3);
    World {
        keys,
        fingerprint: keygate_fuzz::master_key().fingerprint(),
        prelude,
    }
});

fn subscriber(w: &World, cell: SnapshotCell) -> Subscriber {
    Subscriber::new(
        SubscriberConfig {
            endpoint: tonic::transport::Endpoint::from_static("http://127.0.0.1:9"),
            token: Arc::new(keygate::crypto::Secret::new(
                "fuzz-subscriber-token-0123".into(),
            )),
            data_dir: std::env::temp_dir(),
            name: "fuzz".into(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        },
        cell,
        w.keys.clone(),
        w.fingerprint.clone(),
    )
}

/// One frame: what the control plane meant to send (sealed or not) and what arrives.
struct Frame {
    sent: Option<pb::SnapshotMessage>,
    arrives: Option<pb::SnapshotMessage>,
}

fn frames(mut data: &[u8], sealer: &mut Sealer, w: &World) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut first = true;
    while data.len() >= 3 {
        let flags = data[0];
        let len = usize::from(u16::from_le_bytes([data[1], data[2]])).min(data.len() - 3);
        let body = &data[3..3 + len];
        data = &data[3 + len..];
        if first && flags & 0x80 != 0 {
            for m in &w.prelude {
                let m = sealer.seal(m.clone());
                out.push(Frame {
                    sent: Some(m.clone()),
                    arrives: Some(m),
                });
            }
        }
        first = false;
        let Ok(m) = pb::SnapshotMessage::decode(body) else {
            continue;
        };
        if flags & 1 == 0 {
            out.push(Frame {
                sent: None,
                arrives: Some(m),
            });
            continue;
        }
        let m = sealer.seal(m);
        let arrives = if flags & 2 != 0 {
            let mut bytes = m.encode_to_vec();
            if !bytes.is_empty() {
                let i = len.min(bytes.len() - 1) / 2;
                bytes[i] ^= 1 << ((flags >> 2) & 7);
            }
            pb::SnapshotMessage::decode(bytes.as_slice()).ok()
        } else {
            Some(m.clone())
        };
        out.push(Frame {
            sent: Some(m),
            arrives,
        });
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let w = &*WORLD;
    let protocol = match data.first() {
        Some(f) if f & 0x40 != 0 => keygate::distribution::seal::PROTOCOL,
        _ => 0,
    };
    let mut sealer = Sealer::new(&w.keys.stream, &NONCE, w.fingerprint.clone(), protocol);
    let mut opener = Opener::new(&w.keys.stream, &NONCE, w.fingerprint.clone());
    let cell = SnapshotCell::new();
    let sub = subscriber(w, cell.clone());
    let mut assembler = Assembler::default();
    // Whether every sealed message so far arrived: after a drop nothing opens.
    let mut in_sync = true;
    for f in frames(data, &mut sealer, w) {
        let Some(m) = f.arrives else {
            in_sync = false;
            continue;
        };
        let genuine = in_sync && f.sent.as_ref() == Some(&m);
        let before = cell.load().map(|s| (s.store_id.clone(), s.version));
        let m = match opener.open(m) {
            Ok(m) => {
                assert!(genuine, "a forged or changed message opened");
                m
            }
            Err(_) => {
                assert!(!genuine, "a genuine message was refused");
                // The session ends here; nothing of this message was applied.
                assert_eq!(cell.load().map(|s| (s.store_id.clone(), s.version)), before);
                return;
            }
        };
        match assembler.push(m) {
            Ok(Some(a)) => {
                let _ = sub.apply_checked(a.base_version, a.update, a.digest);
            }
            Ok(None) => {}
            // A session ends on a malformed message.
            Err(_) => return,
        }
    }
});
