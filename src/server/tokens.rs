//! The control plane's two credentials: the bootstrap admin token (SPEC §9: an ADMIN named
//! `bootstrap`, off under `--no-bootstrap-token`) (`KEYGATE_ADMIN_TOKEN`, else
//! `--admin-token-file`, else `<data-dir>/admin.token`, generated on first start) and the
//! subscriber token data planes present (`KEYGATE_SUBSCRIBER_TOKEN`, else
//! `--subscriber-token-file`; optional here). Both are read by the one loader in
//! `distribution::token` (trimmed, at least 16 characters), and they must differ. A token
//! file others can read is refused (`fsperm`). Depends on `config`, `crypto`, `distribution`
//! and `fsperm`.

use std::path::Path;

use super::StartError;
use super::data_dir::perm;
use crate::admin::CertIdentities;
use crate::config::ControlPlaneArgs;
use crate::crypto::{self, Secret, credentials_equal};
use crate::distribution::token::{SUBSCRIBER_TOKEN_ENV, TokenSource, load_token};
use crate::domain::Timestamp;
use crate::fsperm;
use crate::store::Store;

/// Supplies the admin token directly; wins over every file.
pub const ADMIN_TOKEN_ENV: &str = "KEYGATE_ADMIN_TOKEN";

/// The subscriber token data planes must present, if the control plane has one.
pub(super) fn subscriber_token(file: Option<&Path>) -> Result<Option<Secret>, StartError> {
    if std::env::var_os(SUBSCRIBER_TOKEN_ENV).is_none()
        && let Some(f) = file
    {
        fsperm::check_secret_file(f, "--subscriber-token-file").map_err(perm)?;
    }
    Ok(load_token(&[
        TokenSource::Env(SUBSCRIBER_TOKEN_ENV),
        TokenSource::File {
            path: file,
            setting: "--subscriber-token-file",
        },
    ])?)
}

/// The bootstrap admin token (an ADMIN named `bootstrap`), or `None` under
/// `--no-bootstrap-token`, which is refused unless a named ADMIN token exists in the store
/// (otherwise nobody could manage admin tokens any more).
pub(super) async fn bootstrap_token(
    args: &ControlPlaneArgs,
    store: &Store,
) -> Result<Option<Secret>, StartError> {
    if !args.no_bootstrap_token {
        return admin_token(args).map(Some);
    }
    if !store
        .has_named_admin(Timestamp::now())
        .await
        .map_err(StartError::Store)?
    {
        return Err(StartError::Config(
            "--no-bootstrap-token: the store holds no named ADMIN token that has not expired; \
             create one first (CreateAdminToken with role ADMIN), then restart with the flag"
                .into(),
        ));
    }
    tracing::info!("bootstrap admin token turned off: only named admin tokens open the admin API");
    Ok(None)
}

/// `--admin-identities`: client certificates mapped to admin identities. Needs
/// `--tls-client-ca` (without verified client certificates the mapping would mean nothing).
pub(super) fn admin_identities(
    args: &ControlPlaneArgs,
) -> Result<Option<CertIdentities>, StartError> {
    let Some(path) = &args.admin_identities else {
        return Ok(None);
    };
    if args.tls.tls_client_ca.is_none() {
        return Err(StartError::Config(
            "--admin-identities needs --tls-client-ca: only verified client certificates can stand for an identity".into(),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|source| StartError::Io {
        context: format!("reading --admin-identities {}", path.display()),
        source,
    })?;
    let ids = CertIdentities::parse(&text)
        .map_err(|e| StartError::Config(format!("--admin-identities {}: {e}", path.display())))?;
    Ok(Some(ids))
}

/// The admin token, generated into `<data-dir>/admin.token` when none is given (the data dir
/// exists by now: the store opened there).
fn admin_token(args: &ControlPlaneArgs) -> Result<Secret, StartError> {
    let generated = args.store.data_dir.join("admin.token");
    if std::env::var_os(ADMIN_TOKEN_ENV).is_none() {
        // The file that will be read, if any: the flag's, else the generated one.
        match &args.admin_token_file {
            Some(f) => fsperm::check_secret_file(f, "--admin-token-file"),
            None => fsperm::check_secret_file(&generated, "admin token file"),
        }
        .map_err(perm)?;
    }
    let given = load_token(&[
        TokenSource::Env(ADMIN_TOKEN_ENV),
        TokenSource::File {
            path: args.admin_token_file.as_deref(),
            setting: "--admin-token-file",
        },
        TokenSource::File {
            path: generated.exists().then_some(generated.as_path()),
            setting: "admin token file",
        },
    ])?;
    if let Some(token) = given {
        return Ok(token);
    }
    let token = Secret::new(format!("kgadm-{}", crypto::random_token()));
    crypto::write_private_file(&generated, format!("{}\n", token.expose()).as_bytes()).map_err(
        |source| StartError::Io {
            context: format!("writing admin token file {}", generated.display()),
            source,
        },
    )?;
    tracing::info!(path = %generated.display(), "generated an admin token; grpcurl needs it as \"authorization: Bearer $(cat <path>)\"");
    Ok(token)
}

/// Refuses a subscriber token equal to the admin token: each must open only its own API.
pub(super) fn check_distinct(
    admin: &Secret,
    subscriber: Option<&Secret>,
) -> Result<(), StartError> {
    match subscriber {
        Some(s) if credentials_equal(s.expose().as_bytes(), admin.expose().as_bytes()) => Err(
            StartError::Config("the subscriber token must differ from the admin token".into()),
        ),
        _ => Ok(()),
    }
}
