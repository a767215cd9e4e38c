//! The admin token check: `authorization: Bearer <admin token>`, compared in constant time;
//! the token's fingerprint names the actor in audit rows. Depends on `crypto` and `store`.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::crypto::{Keys, Secret, credentials_equal};
use crate::store::Actor;

/// The admin token, checked in constant time; its fingerprint names the actor in audit rows.
#[derive(Clone)]
pub struct AdminAuth {
    token: Arc<Secret>,
    actor: Actor,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("actor", &self.actor)
            .finish_non_exhaustive()
    }
}

impl AdminAuth {
    pub fn new(token: Secret, keys: &Keys) -> Self {
        let actor = Actor(keys.actor_fingerprint(token.expose()));
        AdminAuth {
            token: Arc::new(token),
            actor,
        }
    }

    /// The interceptor: `authorization: Bearer <admin token>` or `UNAUTHENTICATED`.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match presented {
            Some(t) if credentials_equal(t.as_bytes(), self.token.expose().as_bytes()) => {
                req.extensions_mut().insert(self.actor.clone());
                Ok(req)
            }
            Some(_) => Err(Status::unauthenticated("invalid admin token")),
            None => Err(Status::unauthenticated(
                "missing admin token: send \"authorization: Bearer <admin token>\"",
            )),
        }
    }
}

/// The actor the interceptor put on an authenticated request.
#[allow(clippy::result_large_err)]
pub(super) fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    req.extensions()
        .get::<Actor>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing admin token"))
}
