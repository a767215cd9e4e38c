//! A data plane's last good snapshot on disk: the full update as protobuf, encrypted with a
//! key derived from the master key (model keys inside stay encrypted too; consumer keys are
//! HMACs). Written atomically (temp file + rename), mode 0600.

use std::path::{Path, PathBuf};

use prost::Message;

use super::wire;
use crate::crypto::{Keys, write_private_file};
use crate::snapshot::{ApplyError, Snapshot, Update};

const AAD: &[u8] = b"keygate snapshot cache v1";
pub const FILE_NAME: &str = "snapshot.cache";

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
    Ok(())
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
    match a.push(msg).map_err(malformed)? {
        Some((_, u)) if u.full => Ok(Some(u)),
        _ => Err(malformed(ApplyError::Malformed(
            "not a full snapshot".into(),
        ))),
    }
}
