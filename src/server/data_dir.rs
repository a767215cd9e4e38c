//! The control plane's data directory and what it opens from it: the directory itself
//! (created mode 0700 when missing), the master key (generated on first start unless
//! `--master-key-file` names one) and the store (the SQLite file there unless `--store` names
//! another). An existing data dir others can write to, or a master key others can read, is
//! refused (`fsperm`). Depends on `config`, `crypto`, `domain`, `fsperm` and `store`.

use std::path::{Path, PathBuf};

use super::StartError;
use crate::config::StoreArgs;
use crate::crypto::{self, MasterKey};
use crate::domain::Limits;
use crate::fsperm;
use crate::store::Store;

/// Opens the store named by `args` (creating the data dir and master key on first start).
pub async fn open_store(
    args: &StoreArgs,
    limits: Limits,
) -> Result<(Store, MasterKey), StartError> {
    ensure_data_dir(&args.data_dir)?;
    let master = load_master_key(args)?;
    let url = match &args.store {
        Some(u) => u.expose().to_string(),
        None => {
            // Created owner-only before SQLite opens it (its -wal/-shm files follow its mode).
            let db = sqlite_path(&args.data_dir);
            if !db.exists() {
                crypto::write_private_file(&db, b"").map_err(|source| StartError::Io {
                    context: format!("creating {}", db.display()),
                    source,
                })?;
            }
            format!("sqlite://{}", db.display())
        }
    };
    let store = Store::open(&url, &master.fingerprint(), master.keys(), limits)
        .await
        .map_err(StartError::Store)?;
    Ok((store, master))
}

/// Creates the data directory (mode 0700) if it is missing.
fn ensure_data_dir(dir: &Path) -> Result<(), StartError> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(StartError::Config(format!(
                "--data-dir {} exists and is not a directory",
                dir.display()
            )));
        }
        // It holds the master key and the admin token: nobody else may write to it.
        return fsperm::check_private_dir(dir, "--data-dir").map_err(perm);
    }
    crypto::create_private_dir(dir).map_err(|source| StartError::Io {
        context: format!("creating data dir {}", dir.display()),
        source,
    })?;
    tracing::info!(path = %dir.display(), "created data directory");
    Ok(())
}

fn load_master_key(args: &StoreArgs) -> Result<MasterKey, StartError> {
    match &args.master_key_file {
        Some(p) => {
            fsperm::check_secret_file(p, "--master-key-file").map_err(perm)?;
            MasterKey::load(p).map_err(|e| StartError::Config(e.to_string()))
        }
        None => {
            let p = args.data_dir.join("master.key");
            fsperm::check_secret_file(&p, "master key file").map_err(perm)?;
            let (key, created) =
                MasterKey::load_or_create(&p).map_err(|e| StartError::Config(e.to_string()))?;
            if created {
                tracing::warn!(path = %p.display(), "generated a new master key; back it up: without it, model keys cannot be decrypted and consumer keys cannot be verified");
            }
            Ok(key)
        }
    }
}

fn sqlite_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keygate.db")
}

/// A file or directory others could read or change: the operator must fix it (exit 64).
pub(super) fn perm(e: fsperm::PermError) -> StartError {
    StartError::Config(e.to_string())
}
