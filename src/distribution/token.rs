//! Bearer tokens read from the environment or a file, one rule everywhere: trimmed, and refused
//! when shorter than 16 characters. The subscriber token (both data planes, the control plane)
//! and the control plane's admin token are read here. Depends on `crypto` (`Secret`).

use std::path::Path;

use crate::crypto::Secret;

/// The shortest token accepted anywhere.
pub const MIN_TOKEN_LEN: usize = 16;

/// Supplies the subscriber token directly (control plane and data planes alike).
pub const SUBSCRIBER_TOKEN_ENV: &str = "KEYGATE_SUBSCRIBER_TOKEN";

/// Where a token may come from; [`load_token`] takes the first one present.
#[derive(Clone, Copy, Debug)]
pub enum TokenSource<'a> {
    /// An environment variable: present when set (even to nothing).
    Env(&'a str),
    /// A file: present when `path` is given. `setting` names it in errors (a flag, a key).
    File {
        path: Option<&'a Path>,
        setting: &'a str,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{setting} {path}: {source}")]
    Read {
        setting: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{env} must be at least {MIN_TOKEN_LEN} characters")]
    EnvTooShort { env: String },
    #[error("{setting} {path}: the token must be at least {MIN_TOKEN_LEN} characters")]
    FileTooShort { setting: String, path: String },
}

/// The token from the first source present (`None`: no source is), trimmed and at least
/// [`MIN_TOKEN_LEN`] characters long.
pub fn load_token(sources: &[TokenSource<'_>]) -> Result<Option<Secret>, TokenError> {
    for source in sources {
        match *source {
            TokenSource::Env(env) => {
                if let Ok(raw) = std::env::var(env) {
                    return checked(raw, || TokenError::EnvTooShort { env: env.into() });
                }
            }
            TokenSource::File {
                path: Some(path),
                setting,
            } => {
                let raw = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                    setting: setting.into(),
                    path: path.display().to_string(),
                    source,
                })?;
                return checked(raw, || TokenError::FileTooShort {
                    setting: setting.into(),
                    path: path.display().to_string(),
                });
            }
            TokenSource::File { path: None, .. } => {}
        }
    }
    Ok(None)
}

fn checked(raw: String, short: impl FnOnce() -> TokenError) -> Result<Option<Secret>, TokenError> {
    let token = raw.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(short());
    }
    Ok(Some(Secret::new(token.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_present_source_wins_and_short_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let long = dir.path().join("long");
        std::fs::write(&long, "  file-token-0123456789\n").unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "short\n").unwrap();
        fn file(path: Option<&Path>) -> TokenSource<'_> {
            TokenSource::File {
                path,
                setting: "--token-file",
            }
        }
        // An unset variable is absent: the file answers, trimmed.
        let unset = TokenSource::Env("KEYGATE_TEST_TOKEN_NEVER_SET");
        let t = load_token(&[unset, file(Some(&long))]).unwrap().unwrap();
        assert_eq!(t.expose(), "file-token-0123456789");
        // No path given: absent too.
        assert!(load_token(&[file(None), unset]).unwrap().is_none());
        let e = load_token(&[file(None), file(Some(&short))]).unwrap_err();
        assert!(matches!(e, TokenError::FileTooShort { .. }), "{e}");
        assert!(e.to_string().contains("--token-file"), "{e}");
        let e = load_token(&[file(Some(&dir.path().join("missing")))]).unwrap_err();
        assert!(matches!(e, TokenError::Read { .. }), "{e}");
    }
}
