//! Secret providers: where a `SECRET_REF` key's value lives (SPEC §4). One trait, so a Vault
//! or cloud-KMS provider can be added without touching callers; two built in: `file` (a
//! directory laid out like Kubernetes-mounted secrets or Vault Agent output) and `env`.
//! Resolution is blocking file/environment I/O: callers run it off the async runtime, with a
//! deadline (`cache::Secrets::fetch`). The file provider reads regular files only, opened
//! non-blocking and read through a size bound, so a FIFO, a device or an endless file in the
//! secrets directory fails one reference instead of stalling or exhausting the process.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::crypto::Secret;
use crate::domain::validate;

/// Files larger than this are never read as secrets.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Why a reference did not resolve. Names the provider, secret and version; never a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret_ref.{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error(
        "secret provider {0:?} is not configured (built in: \"env\", and \"file\" when keygate runs with --secrets-dir)"
    )]
    UnknownProvider(String),
    #[error("secret {name:?} version {version:?} not found in provider {provider:?}")]
    NotFound {
        provider: String,
        name: String,
        version: String,
    },
    #[error("secret {name:?} in provider {provider:?} is larger than 64 KiB")]
    TooLarge { provider: String, name: String },
    #[error(
        "secret {name:?} in provider {provider:?} is not a regular file (a FIFO, socket or device is never read)"
    )]
    NotRegularFile { provider: String, name: String },
    #[error(
        "secret {name:?} in provider {provider:?} did not answer within {seconds} s (a read is still stuck); keeping the last good value"
    )]
    Stuck {
        provider: String,
        name: String,
        seconds: u64,
    },
    #[error("secret {name:?} in provider {provider:?} is not a valid key value: {why}")]
    BadValue {
        provider: String,
        name: String,
        why: String,
    },
    #[error("secret {name:?} in provider {provider:?} could not be read: {why}")]
    Io {
        provider: String,
        name: String,
        why: String,
    },
}

/// A store of secrets addressed by name and optional version.
pub trait SecretProvider: Send + Sync {
    /// The provider's name in `secret_ref.provider`.
    fn name(&self) -> &str;
    /// The value of `name` at `version` (`None`: the latest).
    fn resolve(&self, name: &str, version: Option<&str>) -> Result<Secret, SecretError>;
}

/// Names and versions never address anything outside the provider's root.
fn check_component(field: &'static str, v: &str) -> Result<(), SecretError> {
    let why = if v.is_empty() {
        "must not be empty"
    } else if v.contains(['/', '\\', '\0']) {
        "must not contain '/', '\\' or NUL"
    } else if v.starts_with("..") {
        "must not start with '..'"
    } else if v == "." {
        "must not be '.'"
    } else {
        return Ok(());
    };
    Err(SecretError::Invalid {
        field,
        why: why.to_string(),
    })
}

/// A resolved value must be a valid key value (SPEC §1), checked without echoing it.
fn checked(provider: &str, name: &str, value: String) -> Result<Secret, SecretError> {
    let value = Secret::new(value);
    validate::key_value("value", value.expose()).map_err(|v| SecretError::BadValue {
        provider: provider.to_string(),
        name: name.to_string(),
        why: v.description,
    })?;
    Ok(value)
}

/// `open(2)`'s `O_NONBLOCK` (no `libc` dependency for one flag). Elsewhere the type checks
/// and the caller's deadline are the guard.
#[cfg(target_os = "linux")]
const O_NONBLOCK: i32 = 0o4000;
#[cfg(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd"
))]
const O_NONBLOCK: i32 = 0x0004;

/// Opens `path` for reading without blocking on a FIFO or device.
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(any(
        target_os = "linux",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "openbsd",
        target_os = "netbsd"
    ))]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, O_NONBLOCK);
    options.open(path)
}

/// `<root>/<name>`: an unversioned secret (file content, one trailing newline trimmed);
/// `<root>/<name>/<version>`: a version of a versioned secret. Symlinks are followed, so
/// Kubernetes' `..data` swap is seen by the next read; entries starting with `..` are never
/// secrets or versions.
#[derive(Debug, Clone)]
pub struct FileProvider {
    root: PathBuf,
}

impl FileProvider {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileProvider { root: root.into() }
    }

    /// Reads `path` (symlinks followed) if it is a regular file of at most `MAX_SECRET_FILE`
    /// bytes. The type is checked before opening and again on the open descriptor (a swap in
    /// between is caught), the open never blocks (`O_NONBLOCK`: a FIFO without a writer), and
    /// the bound is enforced on the read itself, not on what the metadata claims.
    fn read(&self, name: &str, path: &Path) -> Result<String, SecretError> {
        let io = |e: std::io::Error| SecretError::Io {
            provider: "file".into(),
            name: name.into(),
            why: e.kind().to_string(),
        };
        let not_regular = || SecretError::NotRegularFile {
            provider: "file".into(),
            name: name.into(),
        };
        if !std::fs::metadata(path).map_err(io)?.file_type().is_file() {
            return Err(not_regular());
        }
        let file = open_nonblocking(path).map_err(io)?;
        if !file.metadata().map_err(io)?.file_type().is_file() {
            return Err(not_regular());
        }
        let mut bytes = Vec::new();
        file.take(MAX_SECRET_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_SECRET_FILE {
            return Err(SecretError::TooLarge {
                provider: "file".into(),
                name: name.into(),
            });
        }
        let mut s = String::from_utf8(bytes).map_err(|_| SecretError::BadValue {
            provider: "file".into(),
            name: name.into(),
            why: "not UTF-8".into(),
        })?;
        if s.ends_with('\n') {
            s.pop();
            if s.ends_with('\r') {
                s.pop();
            }
        }
        Ok(s)
    }

    /// The newest version in `dir`: numeric order when every version is a number, else lexical.
    fn latest(dir: &Path) -> Option<String> {
        let mut versions: Vec<String> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            // Hidden entries (a writer's `.tmp` file, Kubernetes' `..data`) are never versions.
            .filter(|n| !n.starts_with('.'))
            .collect();
        if versions.iter().all(|v| v.parse::<u64>().is_ok()) {
            versions.sort_by_key(|v| v.parse::<u64>().unwrap_or(0));
        } else {
            versions.sort();
        }
        versions.pop()
    }
}

impl SecretProvider for FileProvider {
    fn name(&self) -> &str {
        "file"
    }

    fn resolve(&self, name: &str, version: Option<&str>) -> Result<Secret, SecretError> {
        check_component("name", name)?;
        if let Some(v) = version {
            check_component("version", v)?;
        }
        let not_found = || SecretError::NotFound {
            provider: "file".into(),
            name: name.into(),
            version: version.unwrap_or("").into(),
        };
        let path = self.root.join(name);
        let value = match (version, path.is_dir()) {
            (None, false) if path.exists() => self.read(name, &path)?,
            (None, true) => {
                let latest = Self::latest(&path).ok_or_else(not_found)?;
                self.read(name, &path.join(latest))?
            }
            (Some(v), true) if path.join(v).exists() => self.read(name, &path.join(v))?,
            _ => return Err(not_found()),
        };
        checked("file", name, value)
    }
}

/// `KEYGATE_ENV_SECRET_<NAME>` (upper-cased, `-` → `_`) and no other variable, so no secret
/// name can reach keygate's own configuration. Versions are refused.
#[derive(Debug, Clone, Default)]
pub struct EnvProvider;

impl EnvProvider {
    pub fn variable(name: &str) -> String {
        format!(
            "KEYGATE_ENV_SECRET_{}",
            name.to_uppercase().replace('-', "_")
        )
    }
}

impl SecretProvider for EnvProvider {
    fn name(&self) -> &str {
        "env"
    }

    fn resolve(&self, name: &str, version: Option<&str>) -> Result<Secret, SecretError> {
        check_component("name", name)?;
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(SecretError::Invalid {
                field: "name",
                why: "an env secret name is ASCII letters, digits, '-' and '_'".into(),
            });
        }
        if version.is_some_and(|v| !v.is_empty()) {
            return Err(SecretError::Invalid {
                field: "version",
                why: "the env provider has no versions".into(),
            });
        }
        match std::env::var(Self::variable(name)) {
            Ok(v) => checked("env", name, v),
            Err(_) => Err(SecretError::NotFound {
                provider: "env".into(),
                name: name.into(),
                version: String::new(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "sk-version-one-0123456789";
    const V2: &str = "sk-version-two-0123456789";

    #[test]
    fn unversioned_and_versioned_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("openai"), format!("{V1}\n")).unwrap();
        std::fs::create_dir(dir.path().join("anthropic")).unwrap();
        for (v, val) in [("1", V1), ("2", V2), ("10", V2)] {
            std::fs::write(dir.path().join("anthropic").join(v), val).unwrap();
        }
        let p = FileProvider::new(dir.path());
        assert_eq!(
            p.resolve("openai", None).unwrap().expose(),
            V1,
            "one trailing newline trimmed"
        );
        assert_eq!(p.resolve("anthropic", Some("1")).unwrap().expose(), V1);
        // A writer's hidden temp file is never the latest version.
        std::fs::write(dir.path().join("anthropic").join(".99.tmp"), "x").unwrap();
        // Latest = numeric order ("10" after "2").
        std::fs::write(
            dir.path().join("anthropic").join("10"),
            "sk-version-ten-0123456789",
        )
        .unwrap();
        assert_eq!(
            p.resolve("anthropic", None).unwrap().expose(),
            "sk-version-ten-0123456789"
        );
        assert!(matches!(
            p.resolve("anthropic", Some("3")),
            Err(SecretError::NotFound { .. })
        ));
        assert!(matches!(
            p.resolve("missing", None),
            Err(SecretError::NotFound { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn kubernetes_data_symlink_swap_is_seen() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..2026_01")).unwrap();
        std::fs::write(d.join("..2026_01/openai"), V1).unwrap();
        symlink("..2026_01", d.join("..data")).unwrap();
        symlink("..data/openai", d.join("openai")).unwrap();
        let p = FileProvider::new(d);
        assert_eq!(p.resolve("openai", None).unwrap().expose(), V1);
        // Kubernetes writes a new timestamped dir and swaps ..data atomically.
        std::fs::create_dir(d.join("..2026_02")).unwrap();
        std::fs::write(d.join("..2026_02/openai"), V2).unwrap();
        symlink("..2026_02", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        assert_eq!(p.resolve("openai", None).unwrap().expose(), V2);
        // Its own entries are never secrets.
        assert!(matches!(
            p.resolve("..data", None),
            Err(SecretError::Invalid { .. })
        ));
    }

    #[test]
    fn traversal_and_bad_values_are_refused_without_echoing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("short"), "sk-short").unwrap();
        std::fs::write(dir.path().join(".dockerconfigjson"), V1).unwrap();
        std::fs::write(dir.path().join("huge"), "x".repeat(70 * 1024)).unwrap();
        let p = FileProvider::new(dir.path());
        for bad in ["", ".", "../etc/passwd", "a/b", "a\\b", "..x", "a\0b"] {
            assert!(
                matches!(
                    p.resolve(bad, None),
                    Err(SecretError::Invalid { field: "name", .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            p.resolve("short", Some("../1")),
            Err(SecretError::Invalid {
                field: "version",
                ..
            })
        ));
        assert_eq!(
            p.resolve(".dockerconfigjson", None).unwrap().expose(),
            V1,
            "a dotfile key is a secret"
        );
        assert!(matches!(
            p.resolve("huge", None),
            Err(SecretError::TooLarge { .. })
        ));
        let err = p.resolve("short", None).unwrap_err();
        assert!(matches!(err, SecretError::BadValue { .. }));
        assert!(!err.to_string().contains("sk-short"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn fifos_devices_and_endless_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("openai")).unwrap();
        std::fs::write(d.join("openai/1"), V1).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(d.join("openai/2"))
            .status()
            .unwrap();
        assert!(made.success());
        std::os::unix::fs::symlink("/dev/zero", d.join("zero")).unwrap();
        std::os::unix::fs::symlink(d.join("openai/2"), d.join("fifo-link")).unwrap();
        let p = FileProvider::new(d);
        // A FIFO without a writer as the latest version: refused at once, not waited on.
        for (name, version) in [
            ("openai", None),
            ("openai", Some("2")),
            ("fifo-link", None),
            ("zero", None),
        ] {
            let err = p.resolve(name, version).unwrap_err();
            assert!(
                matches!(err, SecretError::NotRegularFile { .. }),
                "{name} {version:?}: {err}"
            );
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
        assert_eq!(p.resolve("openai", Some("1")).unwrap().expose(), V1);
    }

    #[test]
    fn env_provider_reads_only_its_own_variables() {
        assert_eq!(
            EnvProvider::variable("openai-prod"),
            "KEYGATE_ENV_SECRET_OPENAI_PROD"
        );
        let p = EnvProvider;
        assert!(matches!(
            p.resolve("x", Some("1")),
            Err(SecretError::Invalid {
                field: "version",
                ..
            })
        ));
        assert!(matches!(
            p.resolve("no-such-secret-here", None),
            Err(SecretError::NotFound { .. })
        ));
        assert!(matches!(
            p.resolve("a.b", None),
            Err(SecretError::Invalid { .. })
        ));
    }
}
