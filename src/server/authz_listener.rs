//! The ext_authz listener's address and who may reach it (SPEC §9 "Who may call Check"): an OK
//! answer carries the vendor key, so only Envoy may call. Loopback TCP by default; a Unix
//! domain socket (`--authz-addr unix:/path`, mode 0660, for Envoy's `pipe` address); any other
//! TCP address only with client certificates (`--tls-client-ca`) or an explicit
//! `--allow-unauthenticated-authz`. Depends on `config` and the rest of `server`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener};

use super::StartError;
use super::listeners::bind;
use crate::config::{AuthzAddr, AuthzListenArgs};

/// The socket's mode: owner and group (run Envoy in keygate's group, or as its user).
pub const SOCKET_MODE: u32 = 0o660;

/// A bound ext_authz listener.
pub(super) enum AuthzListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Refuses a non-loopback TCP address that any caller could reach without a client
/// certificate, unless the operator said the network admits only Envoy.
pub(super) fn check_exposure(args: &AuthzListenArgs, client_ca: bool) -> Result<(), StartError> {
    let AuthzAddr::Tcp(addr) = &args.authz_addr else {
        return Ok(());
    };
    if addr.ip().to_canonical().is_loopback() || client_ca || args.allow_unauthenticated_authz {
        return Ok(());
    }
    Err(StartError::Config(format!(
        "--authz-addr {addr} is not a loopback address: whatever reaches it can call Check and \
         receive vendor keys. Require Envoy's client certificate (--tls-cert, --tls-key, \
         --tls-client-ca), or serve on a Unix socket (--authz-addr unix:/run/keygate/authz.sock), \
         or, only if the network admits nothing but Envoy, pass --allow-unauthenticated-authz"
    )))
}

/// Binds `addr`; returns the listener and the address it got (a TCP port may have been 0).
pub(super) async fn bind_authz(addr: &AuthzAddr) -> Result<(AuthzListener, AuthzAddr), StartError> {
    match addr {
        AuthzAddr::Tcp(a) => {
            let (l, local) = bind(*a, "ext_authz").await?;
            Ok((AuthzListener::Tcp(l), AuthzAddr::Tcp(local)))
        }
        AuthzAddr::Unix(path) => Ok((AuthzListener::Unix(bind_unix(path)?), addr.clone())),
    }
}

/// Binds a Unix socket at `path` with [`SOCKET_MODE`]. It is bound under a random name beside
/// `path`, given its mode, then renamed into place, so it is never reachable with a wider
/// mode. A stale socket (nothing listening) is replaced; a live one or another file is not.
fn bind_unix(path: &Path) -> Result<UnixListener, StartError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |what: &str| {
        let context = format!("{what} the ext_authz socket {}", path.display());
        move |source| StartError::Io { context, source }
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(StartError::Config(format!(
                "--authz-addr unix:{}: the path exists and is not a socket",
                path.display()
            )));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            _ => {
                return Err(StartError::Config(format!(
                    "--authz-addr unix:{}: another process is listening on it",
                    path.display()
                )));
            }
        }
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let staging: PathBuf =
        path.with_file_name(format!(".{name}.{}", uuid::Uuid::new_v4().simple()));
    let listener = UnixListener::bind(&staging).map_err(io("binding"))?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| std::fs::rename(&staging, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(io("placing")(e));
    }
    Ok(listener)
}

/// The data plane's rate limiter (SPEC §8.3) and its task: counts shared through
/// `--rate-limit-redis` when set (every `--rate-limit-sync-interval`), idle subjects forgotten
/// either way. A malformed Redis URL stops the start; an unreachable Redis does not (the data
/// plane enforces its own counts until it can be reached, and says so in
/// `keygate_rate_limit_shared`).
pub(super) fn start_rate_limits(
    args: &crate::config::DataPlaneArgs,
    shutdown: &mut super::shutdown::Shutdown,
) -> Result<std::sync::Arc<crate::authz::ratelimit::RateLimiter>, StartError> {
    use crate::authz::ratelimit_redis::{RedisSync, run};
    let limiter = std::sync::Arc::new(crate::authz::ratelimit::RateLimiter::default());
    let sync = args
        .rate_limit_redis
        .as_ref()
        .map(|url| RedisSync::new(url.expose(), "keygate:"))
        .transpose()
        .map_err(|e| StartError::Config(format!("--{}", e.replace('_', "-"))))?;
    if sync.is_some() {
        crate::metrics::METRICS.rate_limit_shared.set(0);
    }
    shutdown.spawn(run(
        limiter.clone(),
        sync,
        args.rate_limit_sync_interval,
        shutdown.recv(),
    ));
    Ok(limiter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(addr: &str, allow: bool) -> AuthzListenArgs {
        AuthzListenArgs {
            authz_addr: addr.parse().unwrap(),
            allow_unauthenticated_authz: allow,
        }
    }

    #[test]
    fn only_loopback_unix_mtls_or_an_explicit_flag_may_serve_check() {
        for ok in [
            "127.0.0.1:9001",
            "[::1]:9001",
            "[::ffff:127.0.0.1]:0",
            "unix:/run/k.sock",
        ] {
            check_exposure(&args(ok, false), false).unwrap();
        }
        for exposed in ["0.0.0.0:9001", "[::]:9001", "10.0.0.5:9001"] {
            let e = check_exposure(&args(exposed, false), false).unwrap_err();
            assert_eq!(e.exit_code(), 64);
            let msg = e.to_string();
            assert!(
                msg.contains("--authz-addr") && msg.contains("--tls-client-ca"),
                "{msg}"
            );
            assert!(msg.contains("--allow-unauthenticated-authz"), "{msg}");
            check_exposure(&args(exposed, false), true).unwrap();
            check_exposure(&args(exposed, true), false).unwrap();
        }
        assert!("unix:relative.sock".parse::<AuthzAddr>().is_err());
    }

    #[tokio::test]
    async fn the_socket_is_placed_with_its_mode_and_a_stale_one_is_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authz.sock");
        let l = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        // Live: refused.
        assert!(matches!(bind_unix(&path), Err(StartError::Config(_))));
        drop(l);
        // Stale (nothing listening): replaced.
        let _l = bind_unix(&path).unwrap();
        // Another kind of file: refused, left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(bind_unix(&file), Err(StartError::Config(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no staging file left"
        );
    }
}
