//! A data plane's start-up, written once for `keygate authz` and the Envoy module: the
//! subscriber token (at least 16 characters), the private data dir (created, or tightened, to
//! mode 0700), the control plane's master key (its sub-keys and fingerprint), the control
//! plane's endpoint, and the subscriber built from them with one backoff policy.
//! Depends on `crypto`, `snapshot`, `usage` and the rest of `distribution`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::subscriber::{
    ClientTls, EndpointFields, Subscriber, SubscriberConfig, SubscriberStatus,
    control_plane_endpoint, usage_sink,
};
use super::token::{SUBSCRIBER_TOKEN_ENV, TokenError, TokenSource, load_token};
use crate::crypto::{CryptoError, Keys, MasterKey, create_private_dir};
use crate::fsperm::{PermError, check_private_dir, check_secret_file};
use crate::snapshot::SnapshotCell;

/// The first reconnect waits about this long; each failure doubles it…
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// …up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How a data plane's settings are named in its errors: `keygate authz`'s flags or the
/// module's `filter_config` keys.
pub struct SettingNames {
    pub endpoint: EndpointFields,
    pub token_file: &'static str,
    pub data_dir: &'static str,
    pub master_key_file: &'static str,
}

/// Which of a token file and `KEYGATE_SUBSCRIBER_TOKEN` wins when both are set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenPrecedence {
    /// The variable wins (`keygate authz`: it supplies the token directly, beside the
    /// file flag's own `KEYGATE_SUBSCRIBER_TOKEN_FILE` twin).
    EnvFirst,
    /// The file wins (the module: Envoy's environment is shared by every filter config,
    /// so it only stands in for a config that names no file).
    FileFirst,
}

/// What a data plane starts from.
pub struct DataPlaneSettings<'a> {
    /// The control plane's URL (http:// or https://).
    pub control_plane: &'a str,
    pub tls: &'a ClientTls,
    pub master_key_file: &'a Path,
    /// Where the encrypted last-good snapshot is kept.
    pub data_dir: &'a Path,
    pub token_file: Option<&'a Path>,
    pub token_precedence: TokenPrecedence,
    /// How this data plane names itself to the control plane.
    pub name: String,
    pub names: &'a SettingNames,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("a subscriber token is required: {SUBSCRIBER_TOKEN_ENV} or {0}")]
    NoToken(&'static str),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{setting} {path}: {source}")]
    DataDir {
        setting: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{setting} {path} exists and is not a directory")]
    NotADirectory { setting: &'static str, path: String },
    #[error("the control plane's master key is required: {setting} {path} does not exist")]
    NoMasterKey { setting: &'static str, path: String },
    #[error("{setting}: {source}")]
    MasterKey {
        setting: &'static str,
        #[source]
        source: CryptoError,
    },
    /// A bad control plane URL or TLS file (the message names the setting).
    #[error("{0}")]
    Endpoint(String),
    /// A data dir others can write to, or a key or token file others can read (SPEC §9).
    #[error(transparent)]
    Files(#[from] PermError),
}

/// A started-up data plane: the cell its decisions read, the keys they hash with, and what
/// its snapshot subscription is made from.
pub struct DataPlaneFeed {
    pub cell: SnapshotCell,
    pub keys: Keys,
    /// The subscription's state, shared by every subscriber made here (health, metrics).
    pub status: Arc<SubscriberStatus>,
    config: SubscriberConfig,
    fingerprint: String,
}

/// Checks and loads everything a data plane needs before it takes traffic. Needs no async
/// runtime (the module runs it on Envoy's main thread).
pub fn bootstrap(s: &DataPlaneSettings<'_>) -> Result<DataPlaneFeed, BootstrapError> {
    check_files(s)?;
    let token = subscriber_token(s)?;
    ensure_private_dir(s.data_dir, s.names.data_dir)?;
    if !s.master_key_file.exists() {
        return Err(BootstrapError::NoMasterKey {
            setting: s.names.master_key_file,
            path: s.master_key_file.display().to_string(),
        });
    }
    let master =
        MasterKey::load(s.master_key_file).map_err(|source| BootstrapError::MasterKey {
            setting: s.names.master_key_file,
            source,
        })?;
    let keys = master.keys();
    let fingerprint = master.fingerprint();
    drop(master);
    let endpoint = control_plane_endpoint(s.control_plane, s.tls, &s.names.endpoint)
        .map_err(BootstrapError::Endpoint)?;
    Ok(DataPlaneFeed {
        cell: SnapshotCell::new(),
        keys,
        status: Arc::default(),
        config: SubscriberConfig {
            endpoint,
            token: Arc::new(token),
            data_dir: s.data_dir.to_path_buf(),
            name: s.name.clone(),
            min_backoff: MIN_BACKOFF,
            max_backoff: MAX_BACKOFF,
        },
        fingerprint,
    })
}

/// The files a data plane trusts, checked before any is read (`fsperm`): the data dir (others
/// must not write to it: its read bits are tightened below), the master key, and the token
/// file when it is the token's source.
fn check_files(s: &DataPlaneSettings<'_>) -> Result<(), PermError> {
    check_private_dir(s.data_dir, s.names.data_dir)?;
    check_secret_file(s.master_key_file, s.names.master_key_file)?;
    let env_set = std::env::var_os(SUBSCRIBER_TOKEN_ENV).is_some();
    let file_read = match s.token_precedence {
        TokenPrecedence::EnvFirst => !env_set,
        TokenPrecedence::FileFirst => true,
    };
    if let Some(f) = s.token_file.filter(|_| file_read) {
        check_secret_file(f, s.names.token_file)?;
    }
    Ok(())
}

fn subscriber_token(s: &DataPlaneSettings<'_>) -> Result<crate::crypto::Secret, BootstrapError> {
    let env = TokenSource::Env(SUBSCRIBER_TOKEN_ENV);
    let file = TokenSource::File {
        path: s.token_file,
        setting: s.names.token_file,
    };
    let sources = match s.token_precedence {
        TokenPrecedence::EnvFirst => [env, file],
        TokenPrecedence::FileFirst => [file, env],
    };
    load_token(&sources)?.ok_or(BootstrapError::NoToken(s.names.token_file))
}

/// `dir` as a private directory: created mode 0700 when missing, tightened to 0700 when
/// others could read it (the snapshot cache inside is encrypted, but its name and size are
/// nobody else's business either).
pub fn ensure_private_dir(dir: &Path, setting: &'static str) -> Result<(), BootstrapError> {
    let io = |source| BootstrapError::DataDir {
        setting,
        path: dir.display().to_string(),
        source,
    };
    if create_private_dir(dir).map_err(io)? {
        tracing::info!(path = %dir.display(), "created data directory");
        return Ok(());
    }
    let meta = std::fs::metadata(dir).map_err(io)?;
    if !meta.is_dir() {
        return Err(BootstrapError::NotADirectory {
            setting,
            path: dir.display().to_string(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
            tracing::info!(path = %dir.display(), "data directory mode tightened to 0700");
        }
    }
    Ok(())
}

impl DataPlaneFeed {
    /// A subscriber feeding `cell` and reporting into `status` (a fresh one each time: the
    /// module starts a new one if a previous one panicked).
    pub fn subscriber(&self) -> Subscriber {
        Subscriber::new(
            self.config.clone(),
            self.cell.clone(),
            self.keys.clone(),
            self.fingerprint.clone(),
        )
        .with_status(self.status.clone())
    }

    /// Serves the cached last-good snapshot, if there is one (its version).
    pub fn load_cache(&self) -> Option<i64> {
        self.subscriber().load_cache()
    }

    /// Where this data plane's last-used reports go: the control plane, authenticated like
    /// the subscription. Must be called inside a Tokio runtime (the channel connects lazily).
    pub fn usage_sink(&self) -> crate::usage::UsageSink {
        usage_sink(&self.config.endpoint, &self.config.token)
    }

    /// Where this data plane's metered-usage reports go (as [`Self::usage_sink`]).
    pub fn report_sink(&self) -> crate::usage::ReportSink {
        super::subscriber::report_sink(&self.config.endpoint, &self.config.token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> SettingNames {
        SettingNames {
            endpoint: EndpointFields {
                url: "control_plane",
                ca: "control_plane_ca",
                cert: "client_cert",
                key: "client_key",
            },
            token_file: "subscriber_token_file",
            data_dir: "data_dir",
            master_key_file: "master_key_file",
        }
    }

    #[test]
    fn files_others_can_change_or_read_are_refused_naming_the_setting() {
        use std::os::unix::fs::PermissionsExt;
        let chmod =
            |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        let _ = MasterKey::load_or_create(&key).unwrap();
        let token = dir.path().join("token");
        crate::crypto::write_private_file(&token, b"0123456789abcdef\n").unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).unwrap();
        let (names, tls) = (names(), ClientTls::default());
        let settings = DataPlaneSettings {
            control_plane: "http://127.0.0.1:9",
            tls: &tls,
            master_key_file: &key,
            data_dir: &data_dir,
            token_file: Some(&token),
            token_precedence: TokenPrecedence::FileFirst,
            name: "test".into(),
            names: &names,
        };
        let refused = |what: &str, fix: &str| {
            let e = bootstrap(&settings).err().unwrap();
            assert!(matches!(e, BootstrapError::Files(_)), "{e}");
            let e = e.to_string();
            assert!(e.contains(what) && e.contains(fix), "{e}");
        };
        chmod(&data_dir, 0o777);
        refused("data_dir", "chmod 700");
        chmod(&data_dir, 0o700);
        chmod(&key, 0o644);
        refused("master_key_file", "chmod 600");
        chmod(&key, 0o600);
        chmod(&token, 0o640);
        refused("subscriber_token_file", "chmod 600");
        chmod(&token, 0o600);
        bootstrap(&settings).unwrap();
    }

    #[test]
    fn the_same_rules_for_every_data_plane() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        let _ = MasterKey::load_or_create(&key).unwrap();
        let token = dir.path().join("token");
        let data_dir = dir.path().join("data");
        let names = names();
        let tls = ClientTls::default();
        let settings = |token_file| DataPlaneSettings {
            control_plane: "http://127.0.0.1:9",
            tls: &tls,
            master_key_file: &key,
            data_dir: &data_dir,
            token_file: Some(token_file),
            token_precedence: TokenPrecedence::FileFirst,
            name: "test".into(),
            names: &names,
        };
        // A token shorter than 16 characters is refused, naming the setting.
        crate::crypto::write_private_file(&token, b"0123456789abcde\n").unwrap();
        let e = bootstrap(&settings(&token)).err().unwrap();
        assert!(matches!(e, BootstrapError::Token(_)), "{e}");
        assert!(e.to_string().contains("subscriber_token_file"), "{e}");
        std::fs::write(&token, "0123456789abcdef\n").unwrap();
        let feed = bootstrap(&settings(&token)).unwrap();
        assert!(feed.cell.load().is_none() && feed.load_cache().is_none());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = || std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(), 0o700, "created private");
            std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            bootstrap(&settings(&token)).unwrap();
            assert_eq!(mode(), 0o700, "tightened");
        }
        // A file where the data dir should be, and a missing master key, are refused.
        let e = ensure_private_dir(&key, "data_dir").unwrap_err();
        assert!(matches!(e, BootstrapError::NotADirectory { .. }), "{e}");
        std::fs::remove_file(&key).unwrap();
        let e = bootstrap(&settings(&token)).err().unwrap();
        assert!(e.to_string().contains("master_key_file"), "{e}");
    }
}
