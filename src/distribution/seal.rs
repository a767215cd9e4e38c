//! The snapshot stream's own integrity (SPEC §9): every message a control plane sends —
//! chunks of a full snapshot, incremental updates, heartbeats — carries an HMAC-SHA256 under
//! a key derived from the master key (`Keys::stream`, its own HKDF label), so a data plane
//! holding the same master key accepts only what its control plane sent, whatever is between
//! them (plain HTTP included).
//!
//! The MACs form a chain: the first is over the subscription's nonce (fresh random bytes the
//! data plane sends in `SubscribeRequest`), each next one over the previous MAC. A changed,
//! dropped, reordered, inserted or replayed message (from this stream or another) breaks the
//! chain; an assembled update is authenticated as a whole because each of its chunks is.
//! The first message must also carry the master key's fingerprint.
//!
//! Two formats, chosen by the subscriber's `SubscribeRequest.protocol`:
//! - protocol 1 (a subscriber that names none: data planes built before protocol 2): each MAC
//!   is over the message's canonical encoding (prost's, with `mac` empty). A data plane
//!   re-encodes what it decoded, so a field it does not know breaks verification. Kept byte
//!   for byte, so older data planes keep working beside newer ones.
//! - protocol 2 (`PROTOCOL`): each message is an envelope. The message is encoded once by
//!   the control plane and travels as bytes (`sealed`); the MAC (its own label and chain
//!   start) is over those exact bytes and the envelope's fingerprint, verified before the
//!   bytes are decoded, so fields added later are merely unknown to an older data plane.
//!
//! A data plane asks for protocol 2 and accepts either: an older control plane ignores the
//! field and answers protocol 1. That is no downgrade of integrity — protocol 1 is MACed under
//! the same key and no MAC of one format verifies as the other (different labels) — only of
//! the forward compatibility and of the content digests carried inside (see DATA-PLANE.md).
//! The first message fixes the stream's format; a later message in the other one is refused.
//! Depends on `crypto` and the generated protos.

use prost::Message;

use crate::crypto::{KeyHash, KeyHasher, credentials_equal};
use crate::proto::snapshot::v1 as pb;

const LABEL: &[u8] = b"keygate snapshot stream v1";
const ENVELOPE_LABEL: &[u8] = b"keygate snapshot stream v2 envelope";

/// How many random bytes a data plane sends as its subscription's nonce.
pub const NONCE_LEN: usize = 16;

/// The stream protocol this keygate speaks (and data planes ask for).
pub const PROTOCOL: u32 = 2;

/// How a stream's messages are sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Protocol 1: the MAC over the message's own encoding.
    Legacy,
    /// Protocol 2: the message as bytes in an envelope, the MAC over those bytes.
    Envelope,
}

impl Format {
    /// The format a subscriber asking for `protocol` is answered in.
    pub fn for_protocol(protocol: u32) -> Format {
        if protocol >= PROTOCOL {
            Format::Envelope
        } else {
            Format::Legacy
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            Format::Legacy => LABEL,
            Format::Envelope => ENVELOPE_LABEL,
        }
    }

    fn start(self, key: &KeyHasher, nonce: &[u8]) -> KeyHash {
        key.hash_parts(&[self.label(), b"nonce", nonce])
    }
}

/// The protocol-1 MAC of `m` (its `mac` field must be empty) after `prev`.
fn mac(key: &KeyHasher, prev: &KeyHash, m: &pb::SnapshotMessage) -> KeyHash {
    key.hash_parts(&[LABEL, prev, &m.encode_to_vec()])
}

/// The protocol-2 MAC of an envelope's `sealed` bytes and `fingerprint` after `prev`.
fn envelope_mac(key: &KeyHasher, prev: &KeyHash, fingerprint: &str, sealed: &[u8]) -> KeyHash {
    key.hash_parts(&[ENVELOPE_LABEL, prev, fingerprint.as_bytes(), sealed])
}

/// The control plane's side of one stream: stamps the fingerprint on the first message and
/// MACs every message in the order they are sent.
pub struct Sealer {
    key: KeyHasher,
    format: Format,
    chain: KeyHash,
    fingerprint: Option<String>,
}

impl Sealer {
    /// The sealer of a stream to a subscriber that asked for `protocol`.
    pub fn new(key: &KeyHasher, nonce: &[u8], fingerprint: String, protocol: u32) -> Self {
        let format = Format::for_protocol(protocol);
        Sealer {
            key: key.clone(),
            format,
            chain: format.start(key, nonce),
            fingerprint: Some(fingerprint),
        }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Seals `m`, the next message of this stream: the message to send.
    pub fn seal(&mut self, mut m: pb::SnapshotMessage) -> pb::SnapshotMessage {
        match self.format {
            Format::Legacy => {
                if let Some(f) = self.fingerprint.take() {
                    m.master_key_fingerprint = f;
                }
                // What protocol-1 data planes know, and nothing else: their MAC covers their
                // re-encoding, where a field they do not know is lost.
                m.digest.clear();
                m.sealed.clear();
                m.mac.clear();
                self.chain = mac(&self.key, &self.chain, &m);
                m.mac = self.chain.to_vec();
                m
            }
            Format::Envelope => {
                m.mac.clear();
                m.sealed.clear();
                m.master_key_fingerprint.clear();
                let mut bytes = m.encode_to_vec();
                if bytes.is_empty() {
                    // An envelope is told from a protocol-1 message by its non-empty `sealed`:
                    // a message with every field at its default is sealed as an explicit
                    // `version = 0` (field 2, varint 0), which decodes to the same message.
                    bytes = vec![0x10, 0x00];
                }
                self.seal_bytes(bytes)
            }
        }
    }

    /// Seals an already encoded message as the next envelope of a protocol-2 stream (what
    /// `seal` does after encoding; tests use it to send fields this keygate does not know).
    pub fn seal_bytes(&mut self, sealed: Vec<u8>) -> pb::SnapshotMessage {
        debug_assert_eq!(self.format, Format::Envelope);
        let fingerprint = self.fingerprint.take().unwrap_or_default();
        self.chain = envelope_mac(&self.key, &self.chain, &fingerprint, &sealed);
        pb::SnapshotMessage {
            sealed,
            mac: self.chain.to_vec(),
            master_key_fingerprint: fingerprint,
            ..Default::default()
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the stream's first message carries no master key fingerprint")]
    NoFingerprint,
    #[error("the control plane's master key fingerprint {remote} is not this data plane's")]
    OtherKey { remote: String },
    #[error("a snapshot message's MAC does not verify (changed, dropped or replayed on the way)")]
    BadMac,
    #[error("a snapshot message's envelope is malformed: {0}")]
    Malformed(&'static str),
}

/// The data plane's side of one stream: verifies every message in order.
pub struct Opener {
    key: KeyHasher,
    nonce: Vec<u8>,
    chain: KeyHash,
    fingerprint: String,
    /// Fixed by the first message.
    format: Option<Format>,
}

impl Opener {
    pub fn new(key: &KeyHasher, nonce: &[u8], fingerprint: String) -> Self {
        Opener {
            key: key.clone(),
            nonce: nonce.to_vec(),
            chain: [0; 32],
            fingerprint,
            format: None,
        }
    }

    /// The stream's format, once its first message was opened.
    pub fn format(&self) -> Option<Format> {
        self.format
    }

    /// Verifies `m`, the next message of this stream, and answers the message it carries
    /// (an envelope's decoded content; a protocol-1 message without its `mac`). After an
    /// error the stream is unusable: every later message fails too.
    pub fn open(&mut self, mut m: pb::SnapshotMessage) -> Result<pb::SnapshotMessage, SealError> {
        let format = if m.sealed.is_empty() {
            Format::Legacy
        } else {
            Format::Envelope
        };
        let chain = match self.format {
            None => {
                if m.master_key_fingerprint.is_empty() {
                    return Err(SealError::NoFingerprint);
                }
                if m.master_key_fingerprint != self.fingerprint {
                    return Err(SealError::OtherKey {
                        remote: m.master_key_fingerprint.clone(),
                    });
                }
                format.start(&self.key, &self.nonce)
            }
            Some(f) if f == format => self.chain,
            Some(_) => return Err(self.broken(SealError::Malformed("the stream mixes formats"))),
        };
        let presented = std::mem::take(&mut m.mac);
        let opened = match format {
            Format::Legacy => {
                let expected = mac(&self.key, &chain, &m);
                credentials_equal(&presented, &expected).then_some((expected, m))
            }
            Format::Envelope => {
                let sealed = std::mem::take(&mut m.sealed);
                let fingerprint = std::mem::take(&mut m.master_key_fingerprint);
                let expected = envelope_mac(&self.key, &chain, &fingerprint, &sealed);
                if !credentials_equal(&presented, &expected) {
                    None
                } else if m != pb::SnapshotMessage::default() {
                    // Whatever the envelope carries outside `sealed` is not authenticated.
                    return Err(
                        self.broken(SealError::Malformed("fields outside the sealed bytes"))
                    );
                } else {
                    let inner = pb::SnapshotMessage::decode(sealed.as_slice()).map_err(|_| {
                        self.broken(SealError::Malformed("sealed bytes do not decode"))
                    })?;
                    if !inner.sealed.is_empty() || !inner.mac.is_empty() {
                        return Err(
                            self.broken(SealError::Malformed("an envelope inside an envelope"))
                        );
                    }
                    Some((expected, inner))
                }
            }
        };
        let Some((next, inner)) = opened else {
            return Err(self.broken(SealError::BadMac));
        };
        self.chain = next;
        self.format = Some(format);
        Ok(inner)
    }

    /// Makes the stream unusable (after `e`) and answers `e`.
    fn broken(&mut self, e: SealError) -> SealError {
        self.chain = [0; 32];
        self.format.get_or_insert(Format::Legacy);
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn stream() -> Vec<pb::SnapshotMessage> {
        let u = crate::snapshot::fixtures::synthetic_update(30);
        let mut msgs = super::super::wire::encode(&u, 0, 10);
        msgs.push(pb::SnapshotMessage {
            store_id: u.store_id.clone(),
            version: u.version,
            heartbeat: true,
            ..Default::default()
        });
        msgs
    }

    fn sealed_as(key: &MasterKey, nonce: &[u8], protocol: u32) -> Vec<pb::SnapshotMessage> {
        let mut s = Sealer::new(&key.keys().stream, nonce, key.fingerprint(), protocol);
        stream().into_iter().map(|m| s.seal(m)).collect()
    }

    /// A protocol-1 stream (what a subscriber that names no protocol gets).
    fn sealed(key: &MasterKey, nonce: &[u8]) -> Vec<pb::SnapshotMessage> {
        sealed_as(key, nonce, 0)
    }

    fn open_all(
        key: &MasterKey,
        nonce: &[u8],
        msgs: Vec<pb::SnapshotMessage>,
    ) -> Result<Vec<pb::SnapshotMessage>, SealError> {
        let mut o = Opener::new(&key.keys().stream, nonce, key.fingerprint());
        msgs.into_iter().map(|m| o.open(m)).collect()
    }

    /// The protocol-1 format, frozen: the exact bytes a control plane sent before protocol 2
    /// (a full snapshot in chunks and a heartbeat, under a fixed key and nonce). Data planes
    /// that do not ask for protocol 2 verify these bytes; they must never change.
    #[test]
    fn the_protocol_1_stream_is_byte_for_byte_as_before() {
        use sha2::Digest;
        let key = MasterKey::from_bytes([5; 32]);
        let mut bytes = Vec::new();
        for m in sealed(&key, &[9u8; NONCE_LEN]) {
            bytes.extend_from_slice(&m.encode_to_vec());
        }
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            "dc3992d5ad0d00db4b77f42f9de976d864f147568991f7b9f5ec2db89da39165"
        );
        // A digest set on the way out does not reach a protocol-1 subscriber.
        let mut s = Sealer::new(&key.keys().stream, &[9u8; NONCE_LEN], key.fingerprint(), 1);
        let mut m = stream().remove(0);
        let plain = s.seal(m.clone());
        let mut s = Sealer::new(&key.keys().stream, &[9u8; NONCE_LEN], key.fingerprint(), 1);
        m.digest = vec![7; 32];
        assert_eq!(s.seal(m).encode_to_vec(), plain.encode_to_vec());
    }

    #[test]
    fn a_sealed_stream_opens_and_any_change_is_refused() {
        for protocol in [0, PROTOCOL] {
            let key = MasterKey::generate();
            let nonce = [7u8; NONCE_LEN];
            let sealed = |key: &MasterKey, nonce: &[u8]| sealed_as(key, nonce, protocol);
            let mut opened = open_all(&key, &nonce, sealed(&key, &nonce)).unwrap();
            opened[0].master_key_fingerprint.clear();
            assert_eq!(
                opened,
                stream(),
                "protocol {protocol}: the messages as sent"
            );
            // A dropped chunk, and a reordered pair.
            let mut m = sealed(&key, &nonce);
            m.remove(1);
            assert_eq!(open_all(&key, &nonce, m), Err(SealError::BadMac));
            let mut m = sealed(&key, &nonce);
            m.swap(1, 2);
            assert_eq!(open_all(&key, &nonce, m), Err(SealError::BadMac));
            // Another subscription's stream (another nonce), and another master key.
            assert_eq!(
                open_all(&key, &[8u8; NONCE_LEN], sealed(&key, &nonce)),
                Err(SealError::BadMac)
            );
            let other = MasterKey::generate();
            assert!(matches!(
                open_all(&key, &nonce, sealed(&other, &nonce)),
                Err(SealError::OtherKey { .. })
            ));
            // No fingerprint on the first message.
            let mut m = sealed(&key, &nonce);
            m[0].master_key_fingerprint.clear();
            assert_eq!(open_all(&key, &nonce, m), Err(SealError::NoFingerprint));
        }
    }

    #[test]
    fn a_changed_protocol_1_message_is_refused() {
        let key = MasterKey::generate();
        let nonce = [7u8; NONCE_LEN];
        // One flipped bit in a record.
        let mut m = sealed(&key, &nonce);
        m[1].keys[0].hash[0] ^= 1;
        assert_eq!(open_all(&key, &nonce, m), Err(SealError::BadMac));
        // A rewritten field.
        let mut m = sealed(&key, &nonce);
        m[0].keys[0].enabled = !m[0].keys[0].enabled;
        assert_eq!(open_all(&key, &nonce, m), Err(SealError::BadMac));
    }

    /// Protocol 2: one bit flipped anywhere in the sealed bytes, a changed fingerprint, or
    /// anything added outside them is refused.
    /// Found by the snapshot_wire fuzz target: a message with every field at its default
    /// encodes to no bytes, and an envelope with an empty `sealed` looked like protocol 1 and
    /// was refused. Every message a control plane seals opens, first or later, empty or not.
    #[test]
    fn an_envelope_of_an_empty_message_opens() {
        let key = MasterKey::generate();
        let nonce = [3u8; NONCE_LEN];
        let mut s = Sealer::new(&key.keys().stream, &nonce, key.fingerprint(), PROTOCOL);
        let msgs = vec![
            s.seal(pb::SnapshotMessage::default()),
            s.seal(pb::SnapshotMessage::default()),
        ];
        assert!(msgs.iter().all(|m| !m.sealed.is_empty()));
        let opened = open_all(&key, &nonce, msgs).expect("a genuine stream opens");
        assert!(opened.iter().all(|m| *m == pb::SnapshotMessage::default()));
    }

    #[test]
    fn a_changed_envelope_is_refused() {
        let key = MasterKey::generate();
        let nonce = [7u8; NONCE_LEN];
        let sealed = || sealed_as(&key, &nonce, PROTOCOL);
        let len = sealed()[1].sealed.len();
        for at in [0, len / 2, len - 1] {
            for bit in [0, 7] {
                let mut m = sealed();
                m[1].sealed[at] ^= 1 << bit;
                assert_eq!(
                    open_all(&key, &nonce, m),
                    Err(SealError::BadMac),
                    "bit {bit} of byte {at}"
                );
            }
        }
        let mut m = sealed();
        m[0].master_key_fingerprint.push('0');
        assert!(matches!(
            open_all(&key, &nonce, m),
            Err(SealError::OtherKey { .. })
        ));
        // Records outside the envelope: not authenticated, so refused.
        let mut m = sealed();
        m[1].keys = stream()[0].keys.clone();
        assert!(matches!(
            open_all(&key, &nonce, m),
            Err(SealError::Malformed(_))
        ));
        let mut m = sealed();
        m[1].version = 99;
        assert!(matches!(
            open_all(&key, &nonce, m),
            Err(SealError::Malformed(_))
        ));
    }

    /// The first message fixes the format: a protocol-1 message (even a genuine one) in an
    /// envelope stream is refused, and the other way round.
    #[test]
    fn a_stream_that_mixes_formats_is_refused() {
        let key = MasterKey::generate();
        let nonce = [7u8; NONCE_LEN];
        let mut m = sealed_as(&key, &nonce, PROTOCOL);
        m[2] = sealed_as(&key, &nonce, 0).remove(2);
        assert!(matches!(
            open_all(&key, &nonce, m),
            Err(SealError::Malformed(_))
        ));
        let mut m = sealed_as(&key, &nonce, 0);
        m[2] = sealed_as(&key, &nonce, PROTOCOL).remove(2);
        assert!(matches!(
            open_all(&key, &nonce, m),
            Err(SealError::Malformed(_))
        ));
    }

    /// What a newer control plane adds to a message is merely unknown here: the envelope
    /// verifies over the bytes as received, the message decodes without the field, and the
    /// update applies.
    #[test]
    fn an_envelope_with_a_field_this_keygate_does_not_know_verifies_and_applies() {
        let key = MasterKey::generate();
        let nonce = [7u8; NONCE_LEN];
        let mut s = Sealer::new(&key.keys().stream, &nonce, key.fingerprint(), PROTOCOL);
        let sent: Vec<pb::SnapshotMessage> = stream()
            .into_iter()
            .map(|m| {
                let mut bytes = m.encode_to_vec();
                // Field 99 (varint, wire type 0) = 1, and field 100 (length-delimited) = "x".
                bytes.extend_from_slice(&[0x98, 0x06, 0x01, 0xa2, 0x06, 0x01, b'x']);
                s.seal_bytes(bytes)
            })
            .collect();
        let opened = open_all(&key, &nonce, sent).expect("the envelopes verify");
        assert_eq!(
            opened,
            stream(),
            "the unknown fields are dropped, nothing else"
        );
        let mut a = super::super::wire::Assembler::default();
        let update = opened
            .into_iter()
            .find_map(|m| a.push(m).unwrap())
            .expect("an update")
            .update;
        let snap = crate::snapshot::Snapshot::from_full(update, &key.keys()).unwrap();
        assert_eq!(snap.counts().consumer_keys, 30);
    }
}
