//! The snapshot stream's own integrity (SPEC §9): every message a control plane sends —
//! chunks of a full snapshot, incremental updates, heartbeats — carries an HMAC-SHA256 under
//! a key derived from the master key (`Keys::stream`, its own HKDF label), so a data plane
//! holding the same master key accepts only what its control plane sent, whatever is between
//! them (plain HTTP included).
//!
//! The MACs form a chain: the first is over the subscription's nonce (fresh random bytes the
//! data plane sends in `SubscribeRequest`), each next one over the previous MAC, and each
//! over the message's canonical encoding (prost's, with `mac` empty), which holds its store
//! id, epoch, version, base version, full / last-chunk flags and every record. A changed,
//! dropped, reordered, inserted or replayed message (from this stream or another) breaks the
//! chain; an assembled update is authenticated as a whole because each of its chunks is.
//! The first message must also carry the master key's fingerprint.
//! Depends on `crypto` and the generated protos.

use prost::Message;

use crate::crypto::{KeyHash, KeyHasher, credentials_equal};
use crate::proto::snapshot::v1 as pb;

const LABEL: &[u8] = b"keygate snapshot stream v1";

/// How many random bytes a data plane sends as its subscription's nonce.
pub const NONCE_LEN: usize = 16;

fn start(key: &KeyHasher, nonce: &[u8]) -> KeyHash {
    key.hash_parts(&[LABEL, b"nonce", nonce])
}

/// The MAC of `m` (its `mac` field must be empty) after `prev`.
fn mac(key: &KeyHasher, prev: &KeyHash, m: &pb::SnapshotMessage) -> KeyHash {
    key.hash_parts(&[LABEL, prev, &m.encode_to_vec()])
}

/// The control plane's side of one stream: stamps the fingerprint on the first message and
/// MACs every message in the order they are sent.
pub struct Sealer {
    key: KeyHasher,
    chain: KeyHash,
    fingerprint: Option<String>,
}

impl Sealer {
    pub fn new(key: &KeyHasher, nonce: &[u8], fingerprint: String) -> Self {
        Sealer {
            key: key.clone(),
            chain: start(key, nonce),
            fingerprint: Some(fingerprint),
        }
    }

    /// Seals `m`, the next message of this stream.
    pub fn seal(&mut self, m: &mut pb::SnapshotMessage) {
        if let Some(f) = self.fingerprint.take() {
            m.master_key_fingerprint = f;
        }
        m.mac.clear();
        self.chain = mac(&self.key, &self.chain, m);
        m.mac = self.chain.to_vec();
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
}

/// The data plane's side of one stream: verifies every message in order.
pub struct Opener {
    key: KeyHasher,
    chain: KeyHash,
    fingerprint: String,
    first: bool,
}

impl Opener {
    pub fn new(key: &KeyHasher, nonce: &[u8], fingerprint: String) -> Self {
        Opener {
            key: key.clone(),
            chain: start(key, nonce),
            fingerprint,
            first: true,
        }
    }

    /// Verifies `m`, the next message of this stream (its `mac` is taken out). After an
    /// error the stream is unusable: every later message fails too.
    pub fn open(&mut self, m: &mut pb::SnapshotMessage) -> Result<(), SealError> {
        if self.first {
            if m.master_key_fingerprint.is_empty() {
                return Err(SealError::NoFingerprint);
            }
            if m.master_key_fingerprint != self.fingerprint {
                return Err(SealError::OtherKey {
                    remote: m.master_key_fingerprint.clone(),
                });
            }
        }
        let presented = std::mem::take(&mut m.mac);
        let expected = mac(&self.key, &self.chain, m);
        if !credentials_equal(&presented, &expected) {
            self.chain = [0; 32];
            return Err(SealError::BadMac);
        }
        self.chain = expected;
        self.first = false;
        Ok(())
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

    fn sealed(key: &MasterKey, nonce: &[u8]) -> Vec<pb::SnapshotMessage> {
        let mut s = Sealer::new(&key.keys().stream, nonce, key.fingerprint());
        let mut msgs = stream();
        msgs.iter_mut().for_each(|m| s.seal(m));
        msgs
    }

    fn open_all(
        key: &MasterKey,
        nonce: &[u8],
        msgs: Vec<pb::SnapshotMessage>,
    ) -> Result<(), SealError> {
        let mut o = Opener::new(&key.keys().stream, nonce, key.fingerprint());
        msgs.into_iter().try_for_each(|mut m| o.open(&mut m))
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
    }

    #[test]
    fn a_sealed_stream_opens_and_any_change_is_refused() {
        let key = MasterKey::generate();
        let nonce = [7u8; NONCE_LEN];
        assert_eq!(open_all(&key, &nonce, sealed(&key, &nonce)), Ok(()));
        // One flipped bit in a record.
        let mut m = sealed(&key, &nonce);
        m[1].keys[0].hash[0] ^= 1;
        assert_eq!(open_all(&key, &nonce, m), Err(SealError::BadMac));
        // A rewritten field.
        let mut m = sealed(&key, &nonce);
        m[0].keys[0].enabled = !m[0].keys[0].enabled;
        assert_eq!(open_all(&key, &nonce, m), Err(SealError::BadMac));
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
