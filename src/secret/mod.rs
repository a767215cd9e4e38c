//! Secret references (SPEC §4): providers (`provider`) and the TTL cache of resolved values
//! with each reference's status (`cache`). The background refresh that turns a changed value
//! into a store change lives with the control plane's tasks (`server::secret_refresh`), above
//! the store. Only the control plane resolves; data planes receive the values encrypted inside
//! the snapshot. Depends on `domain`, `crypto` and `metrics`.

mod cache;
mod provider;

pub use cache::{Read, SecretStatus, Secrets};
pub use provider::{EnvProvider, FileProvider, MAX_SECRET_FILE, SecretError, SecretProvider};
