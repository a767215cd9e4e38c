//! Who is calling `KeyAdmin`, and may they (SPEC §9). A caller presents
//! `authorization: Bearer <token>`: the bootstrap token (an ADMIN named `bootstrap`, compared
//! in constant time) or a named admin token, looked up by its HMAC. The credential's name is
//! the audit actor; its role decides which RPCs it may call (`PERMISSION_DENIED` names the
//! role needed); an unknown, revoked or expired token is `UNAUTHENTICATED`. With
//! `--admin-identities` (mTLS), a request without a token may instead present a client
//! certificate the file maps to a name and role (`cert_identities`).
//!
//! Named tokens are cached in memory so an RPC does not read the store each time. The cache
//! is emptied whenever the store revision moves (this process's commits and, on PostgreSQL,
//! other replicas' through LISTEN), so a revoke takes effect with the next call on this
//! replica and within the normal propagation time on the others; entries also expire after
//! `CACHE_TTL` in case a notification is lost. Misses are not cached (a stream of wrong
//! tokens cannot grow it). Depends on `crypto`, `domain` and `store`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::{Request, Status};

use super::cert_identities::CertIdentities;
use crate::crypto::{KeyHash, Secret, credentials_equal};
use crate::domain::{AdminToken, BOOTSTRAP_NAME, Role, Timestamp};
use crate::store::{Actor, Store};

/// How long a cached token is trusted without a store revision change.
const CACHE_TTL: Duration = Duration::from_secs(30);
/// At most this many cached tokens; a full cache starts over.
const CACHE_CAPACITY: usize = 1024;
/// `last_used_time` is written at most this often per token (microseconds).
const LAST_USED_EVERY_MICROS: i64 = 60_000_000;

/// An authenticated caller: the credential's name and role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

/// What a request presented, as the interceptor found it: a bearer token, or a client
/// certificate `--admin-identities` maps to an identity.
#[derive(Clone)]
enum Presented {
    Token(Arc<Secret>),
    Certificate(Identity),
}

/// Authenticates and authorises admin calls.
#[derive(Clone)]
pub struct AdminAuth {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// The bootstrap token, unless `--no-bootstrap-token` turned it off.
    bootstrap: Option<Secret>,
    /// `--admin-identities`: client certificates that stand for an identity.
    certificates: Option<CertIdentities>,
    cache: Mutex<Cache>,
}

struct Cache {
    commits: watch::Receiver<i64>,
    /// Moves whenever the entries are dropped, so a lookup that raced a change is not kept.
    generation: u64,
    entries: HashMap<KeyHash, Cached>,
}

struct Cached {
    token: AdminToken,
    fetched: Instant,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("bootstrap", &self.inner.bootstrap.is_some())
            .finish_non_exhaustive()
    }
}

impl AdminAuth {
    /// `bootstrap`: the bootstrap token, or `None` when it is turned off; `certificates`: the
    /// `--admin-identities` mapping, if any (only meaningful behind `--tls-client-ca`).
    pub fn new(
        store: Store,
        bootstrap: Option<Secret>,
        certificates: Option<CertIdentities>,
    ) -> Self {
        let cache = Cache {
            commits: store.subscribe_commits(),
            generation: 0,
            entries: HashMap::new(),
        };
        AdminAuth {
            inner: Arc::new(Inner {
                store,
                bootstrap,
                certificates,
                cache: Mutex::new(cache),
            }),
        }
    }

    /// The interceptor: a request without `authorization: Bearer <token>` (or, under
    /// `--admin-identities`, a mapped client certificate) is refused before its body is read;
    /// what it presented rides along for `allow`. A token wins over a certificate.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim().to_string());
        match presented {
            Some(t) => {
                req.extensions_mut()
                    .insert(Presented::Token(Arc::new(Secret::new(t))));
                Ok(req)
            }
            None if self.inner.certificates.is_some() => {
                let who = self.certificate_identity(&req).ok_or_else(|| {
                    Status::unauthenticated(
                        "no admin token, and the client certificate maps to no admin identity",
                    )
                })?;
                req.extensions_mut().insert(Presented::Certificate(who));
                Ok(req)
            }
            None => Err(Status::unauthenticated(
                "missing admin token: send \"authorization: Bearer <admin token>\"",
            )),
        }
    }

    /// Authenticates the caller and requires `needed`; on success the request carries the
    /// caller's name as its audit `Actor`.
    #[allow(clippy::result_large_err)]
    pub async fn allow<T>(&self, mut req: Request<T>, needed: Role) -> Result<Request<T>, Status> {
        let presented = req
            .extensions()
            .get::<Presented>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("missing admin token"))?;
        let who = match presented {
            Presented::Token(t) => self.identify(t.expose(), Timestamp::now()).await?,
            Presented::Certificate(who) => who,
        };
        if !who.role.allows(needed) {
            return Err(Status::permission_denied(format!(
                "admin credential {:?} has role {}; this call needs role {needed}",
                who.name, who.role
            )));
        }
        req.extensions_mut().insert(Actor(who.name));
        Ok(req)
    }

    /// The identity `--admin-identities` gives the peer's (leaf) client certificate.
    fn certificate_identity(&self, req: &Request<()>) -> Option<Identity> {
        let certs = req.peer_certs()?;
        self.inner.certificates.as_ref()?.identify(certs.first()?)
    }

    /// Who `token` is at `now`: the bootstrap token, or a named token that exists and has not
    /// expired.
    pub async fn identify(&self, token: &str, now: Timestamp) -> Result<Identity, Status> {
        if let Some(b) = &self.inner.bootstrap
            && credentials_equal(token.as_bytes(), b.expose().as_bytes())
        {
            return Ok(Identity {
                name: BOOTSTRAP_NAME.to_string(),
                role: Role::Admin,
            });
        }
        let store = &self.inner.store;
        let hash = store.admin_token_hash(token);
        let found = match self.cached(&hash) {
            Ok(t) => Some(t),
            Err(generation) => {
                let found = store.find_admin_token(&hash).await?;
                if let Some(t) = &found {
                    self.remember(hash, t.clone(), generation);
                }
                found
            }
        };
        let Some(t) = found else {
            return Err(Status::unauthenticated("invalid admin token"));
        };
        if t.expired_at(now) {
            return Err(Status::unauthenticated(format!(
                "admin token {:?} has expired",
                t.name
            )));
        }
        self.note_used(&hash, &t, now).await;
        Ok(Identity {
            name: t.name,
            role: t.role,
        })
    }

    /// The cached token for `hash`, or the cache generation a store lookup should be
    /// remembered under.
    fn cached(&self, hash: &KeyHash) -> Result<AdminToken, u64> {
        let mut c = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.sync();
        match c.entries.get(hash) {
            Some(e) if e.fetched.elapsed() < CACHE_TTL => Ok(e.token.clone()),
            _ => Err(c.generation),
        }
    }

    fn remember(&self, hash: KeyHash, token: AdminToken, generation: u64) {
        let mut c = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.sync();
        if c.generation != generation {
            return; // the store changed during the lookup: the answer may be stale
        }
        if c.entries.len() >= CACHE_CAPACITY {
            c.entries.clear();
        }
        let fetched = Instant::now();
        c.entries.insert(hash, Cached { token, fetched });
    }

    /// Writes `last_used_time` when the stored one is older than a minute; a failure is
    /// logged, never refused (it is bookkeeping).
    async fn note_used(&self, hash: &KeyHash, t: &AdminToken, now: Timestamp) {
        if t.last_used_time
            .is_some_and(|u| now.0 - u.0 < LAST_USED_EVERY_MICROS)
        {
            return;
        }
        if let Err(e) = self.inner.store.note_admin_token_used(&t.id, now).await {
            tracing::warn!(error = %e, name = %t.name, "could not record an admin token's last use");
            return;
        }
        let mut c = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = c.entries.get_mut(hash) {
            e.token.last_used_time = Some(now);
        }
    }
}

impl Cache {
    /// Drops every entry when the store revision moved since the last look.
    fn sync(&mut self) {
        if self.commits.has_changed().unwrap_or(true) {
            self.commits.borrow_and_update();
            self.entries.clear();
            self.generation += 1;
        }
    }
}

/// The actor `AdminAuth::allow` put on an authorised request.
#[allow(clippy::result_large_err)]
pub(super) fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    req.extensions()
        .get::<Actor>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing admin token"))
}
