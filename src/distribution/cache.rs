//! A data plane's last good snapshot on disk: the full update as protobuf, encrypted with a
//! key derived from the master key (model keys inside stay encrypted too; consumer keys are
//! HMACs). Written atomically (temp file + rename), mode 0600, by the subscriber's writer task
//! (`persist_loop`).
//!
//! Beside it, a high-water mark (`snapshot.highwater`, sealed under the same key): the store
//! id and version of the newest snapshot this data plane has cached, written after each
//! cache. A cache below its mark (another store, or an older version: an older copy put in
//! its place) or without one is refused at start, so a data plane never starts serving a
//! state it has already moved past. (Both files replaced together by older copies of both
//! are not detected: that needs state outside the data dir.)
//!
//! The cache holds no content digest: loading builds the snapshot, which computes it again
//! (`snapshot::digest`), so what a restarted data plane presents is what it serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use super::wire;
use crate::crypto::{Keys, write_private_file};
use crate::snapshot::{ApplyError, Snapshot, Update};

const AAD: &[u8] = b"keygate snapshot cache v1";
pub const FILE_NAME: &str = "snapshot.cache";
const MARK_AAD: &[u8] = b"keygate snapshot cache high-water v1";
pub const MARK_FILE_NAME: &str = "snapshot.highwater";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("snapshot cache {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot cache {0} does not decrypt under this master key")]
    Decrypt(String),
    #[error(
        "snapshot cache {path} (store {cache_store} version {cache_version}) is below this data plane's high-water mark (store {mark_store} version {mark_version}): an older copy; refusing it"
    )]
    RolledBack {
        path: String,
        cache_store: String,
        cache_version: i64,
        mark_store: String,
        mark_version: i64,
    },
    #[error(
        "snapshot cache {0} has no valid high-water mark beside it ({MARK_FILE_NAME}: missing, or written by another key or an older keygate); refusing it"
    )]
    NoMark(String),
    #[error("snapshot cache {path} is malformed: {source}")]
    Malformed {
        path: String,
        #[source]
        source: ApplyError,
    },
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Writes `snap` as the cache in `data_dir`.
pub fn store(data_dir: &Path, snap: &Snapshot, keys: &Keys) -> Result<(), CacheError> {
    let update = snap.to_full_update();
    let mut msgs = wire::encode(&update, 0, usize::MAX);
    let msg = msgs.pop().expect("one message");
    let sealed = keys.cache.seal(AAD, &msg.encode_to_vec());
    let target = path(data_dir);
    let tmp = data_dir.join(format!("{FILE_NAME}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let io = |source| CacheError::Io {
        path: target.display().to_string(),
        source,
    };
    write_private_file(&tmp, &sealed).map_err(io)?;
    std::fs::rename(&tmp, &target).map_err(io)?;
    store_mark(data_dir, &snap.store_id, &snap.epoch, snap.version, keys)
}

/// Writes the high-water mark: `store_id` at `version` of `epoch` (after the cache it
/// describes).
fn store_mark(
    data_dir: &Path,
    store_id: &str,
    epoch: &str,
    version: i64,
    keys: &Keys,
) -> Result<(), CacheError> {
    let mut plain = version.to_be_bytes().to_vec();
    plain.extend_from_slice(store_id.as_bytes());
    if !epoch.is_empty() {
        plain.push(b'\n');
        plain.extend_from_slice(epoch.as_bytes());
    }
    let sealed = keys.cache.seal(MARK_AAD, &plain);
    let target = data_dir.join(MARK_FILE_NAME);
    let tmp = data_dir.join(format!("{MARK_FILE_NAME}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let io = |source| CacheError::Io {
        path: target.display().to_string(),
        source,
    };
    write_private_file(&tmp, &sealed).map_err(io)?;
    std::fs::rename(&tmp, &target).map_err(io)
}

/// The high-water mark's store id, epoch and version (`None`: missing or not sealed under
/// `keys`). A mark written before epochs existed reads as the first epoch ("").
fn load_mark(data_dir: &Path, keys: &Keys) -> Result<Option<(String, String, i64)>, CacheError> {
    let p = data_dir.join(MARK_FILE_NAME);
    let sealed = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Io {
                path: p.display().to_string(),
                source,
            });
        }
    };
    let Ok(plain) = keys.cache.open(MARK_AAD, &sealed) else {
        return Ok(None);
    };
    let Some((v, id)) = plain.split_first_chunk::<8>() else {
        return Ok(None);
    };
    Ok(std::str::from_utf8(id).ok().map(|id| {
        let (id, epoch) = id.split_once('\n').unwrap_or((id, ""));
        (id.to_string(), epoch.to_string(), i64::from_be_bytes(*v))
    }))
}

/// Reads the cache in `data_dir`, if there is one.
pub fn load(data_dir: &Path, keys: &Keys) -> Result<Option<Update>, CacheError> {
    let p = path(data_dir);
    let sealed = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Io {
                path: p.display().to_string(),
                source,
            });
        }
    };
    let plain = keys
        .cache
        .open(AAD, &sealed)
        .map_err(|_| CacheError::Decrypt(p.display().to_string()))?;
    let malformed = |source| CacheError::Malformed {
        path: p.display().to_string(),
        source,
    };
    let msg = crate::proto::snapshot::v1::SnapshotMessage::decode(plain.as_slice())
        .map_err(|e| malformed(ApplyError::Malformed(e.to_string())))?;
    let mut a = wire::Assembler::default();
    let u = match a.push(msg).map_err(malformed)? {
        Some(wire::Assembled { update: u, .. }) if u.full => u,
        _ => {
            return Err(malformed(ApplyError::Malformed(
                "not a full snapshot".into(),
            )));
        }
    };
    match load_mark(data_dir, keys)? {
        Some((store, epoch, version))
            if store == u.store_id && epoch == u.epoch && u.version >= version =>
        {
            Ok(Some(u))
        }
        Some((mark_store, _, mark_version)) => Err(CacheError::RolledBack {
            path: p.display().to_string(),
            cache_store: u.store_id,
            cache_version: u.version,
            mark_store,
            mark_version,
        }),
        None => Err(CacheError::NoMark(p.display().to_string())),
    }
}

const CACHE_EVERY: Duration = Duration::from_secs(5);

/// Writes the latest snapshot to the cache: at once for the first, then at most every
/// `CACHE_EVERY` (a full write of a 1M-key snapshot costs ~0.5 s of CPU; a data plane killed in
/// between restarts from a slightly older cache and catches up on reconnect).
pub(super) async fn persist_loop(
    data_dir: PathBuf,
    keys: Keys,
    mut rx: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
) {
    while rx.changed().await.is_ok() {
        let snap = rx.borrow_and_update().clone();
        if let Some(s) = snap {
            let dir = data_dir.clone();
            let keys = keys.clone();
            let v = s.version;
            match tokio::task::spawn_blocking(move || store(&dir, &s, &keys)).await {
                Ok(Ok(())) => tracing::debug!(version = v, "snapshot cache written"),
                Ok(Err(e)) => tracing::error!(error = %e, "snapshot cache not written"),
                Err(e) => tracing::error!(error = %e, "snapshot cache writer failed"),
            }
        }
        // Coalesce bursts: whatever arrived meanwhile is written by the next round.
        tokio::time::sleep(CACHE_EVERY).await;
    }
    // Final state on shutdown.
    if let Some(s) = rx.borrow().clone() {
        let _ = store(&data_dir, &s, &keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn snapshot(version: i64, keys: &Keys) -> Snapshot {
        let mut u = crate::snapshot::fixtures::synthetic_update(3);
        u.version = version;
        Snapshot::from_full(u, keys).unwrap()
    }

    /// Rate limits survive the cache: a restarted data plane enforces what it enforced.
    #[test]
    fn limits_survive_the_cache() {
        use crate::snapshot::EntryLimits;
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterKey::generate().keys();
        let mut u = crate::snapshot::fixtures::synthetic_update(3);
        u.keys[1].1.limits = EntryLimits {
            requests_per_minute: Some(120),
            tokens_per_minute: Some(50_000),
            exhausted_until: Some(crate::domain::Timestamp(1_900_000_000_000_000)),
        };
        u.consumers[0].limits.tokens_per_minute = Some(7);
        let snap = Snapshot::from_full(u, &keys).unwrap();
        store(dir.path(), &snap, &keys).unwrap();
        let back = Snapshot::from_full(load(dir.path(), &keys).unwrap().unwrap(), &keys).unwrap();
        assert_eq!(back.digest(), snap.digest());
        let (_, e) = back
            .key_index()
            .iter()
            .find(|(_, e)| e.limits.requests_per_minute.is_some())
            .expect("the limited key");
        assert_eq!(
            e.limits.per_minute(),
            crate::authz::ratelimit::PerMinute {
                requests: Some(120),
                tokens: Some(50_000)
            }
        );
        let c = back.consumers().next().unwrap();
        assert_eq!(c.limits.per_minute().tokens, Some(7));
    }

    /// SPEC §8.4: a rotated key's previous value survives the cache, so a data plane
    /// restarted from it still takes the old value until its expiry and not after.
    #[test]
    fn the_cache_keeps_previous_values_and_their_expiry() {
        use crate::domain::Timestamp;
        use crate::snapshot::PreviousHash;
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterKey::generate().keys();
        let mut u = crate::snapshot::fixtures::synthetic_update(3);
        let (new_hash, old_hash) = (u.keys[1].0, [9u8; 32]);
        let previous = PreviousHash {
            hash: old_hash,
            until: Timestamp(1_800_000_000_000_000),
        };
        u.keys[1].1.previous = Some(previous);
        let snap = Snapshot::from_full(u, &keys).unwrap();
        store(dir.path(), &snap, &keys).unwrap();
        let back = Snapshot::from_full(load(dir.path(), &keys).unwrap().unwrap(), &keys).unwrap();
        assert_eq!(back.counts().consumer_keys, 3);
        let by_new = back.key(&new_hash).expect("the key by its value");
        let by_old = back.key(&old_hash).expect("the key by its previous value");
        assert_eq!(by_new.id, by_old.id);
        assert_eq!(by_new.previous, Some(previous));
        assert!(!by_old.previous_expired(&old_hash, Timestamp(previous.until.0 - 1)));
        assert!(by_old.previous_expired(&old_hash, previous.until));
        assert!(!by_new.previous_expired(&new_hash, previous.until));
    }

    #[test]
    fn an_older_copy_of_the_cache_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterKey::generate().keys();
        store(dir.path(), &snapshot(5, &keys), &keys).unwrap();
        let old = std::fs::read(path(dir.path())).unwrap();
        store(dir.path(), &snapshot(6, &keys), &keys).unwrap();
        assert_eq!(load(dir.path(), &keys).unwrap().unwrap().version, 6);
        // The version-5 copy put back in its place.
        std::fs::write(path(dir.path()), &old).unwrap();
        let e = load(dir.path(), &keys).unwrap_err();
        assert!(
            matches!(
                e,
                CacheError::RolledBack {
                    cache_version: 5,
                    mark_version: 6,
                    ..
                }
            ),
            "{e}"
        );
        // Without a mark, or with one sealed under another key: refused too.
        std::fs::write(dir.path().join(MARK_FILE_NAME), b"forged").unwrap();
        assert!(matches!(
            load(dir.path(), &keys),
            Err(CacheError::NoMark(_))
        ));
        std::fs::remove_file(dir.path().join(MARK_FILE_NAME)).unwrap();
        assert!(matches!(
            load(dir.path(), &keys),
            Err(CacheError::NoMark(_))
        ));
        // A cache of another epoch than its mark: refused too (which one is older is unknown).
        let mut other = snapshot(9, &keys);
        other.epoch = "after-restore".into();
        store(dir.path(), &other, &keys).unwrap();
        assert_eq!(
            load(dir.path(), &keys).unwrap().unwrap().epoch,
            "after-restore"
        );
        store_mark(dir.path(), "bench", "", 9, &keys).unwrap();
        assert!(matches!(
            load(dir.path(), &keys),
            Err(CacheError::RolledBack { .. })
        ));
        // A newer cache than the mark (killed between the two writes) is served.
        store(dir.path(), &snapshot(7, &keys), &keys).unwrap();
        store_mark(dir.path(), "bench", "", 6, &keys).unwrap();
        assert_eq!(load(dir.path(), &keys).unwrap().unwrap().version, 7);
    }
}
