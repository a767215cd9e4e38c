//! Secret references (SPEC §4): providers (`provider`), the TTL cache of resolved values with
//! each reference's status (`cache`), and the control plane's background refresh that turns a
//! changed value into a store change, so it reaches every data plane as a new snapshot
//! version (`refresh`). Only the control plane resolves; data planes receive the values
//! encrypted inside the snapshot.

mod cache;
mod provider;
mod refresh;

pub use cache::{Read, SecretStatus, Secrets, describe};
pub use provider::{EnvProvider, FileProvider, MAX_SECRET_FILE, SecretError, SecretProvider};
pub use refresh::run_refresh;
