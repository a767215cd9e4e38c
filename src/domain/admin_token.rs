//! Operator identities (SPEC §9): a named admin credential, its role, and what each role may
//! call. Pure data and rules: no gRPC, no SQL, no I/O.

use std::fmt;

use super::{FieldViolation, RuleError, Timestamp, validate};

/// The prefix of every generated admin token value, so a leaked one is recognisable.
pub const ADMIN_TOKEN_PREFIX: &str = "kga-";

/// The name the bootstrap token (`admin.token` / `KEYGATE_ADMIN_TOKEN`) acts under.
pub const BOOTSTRAP_NAME: &str = "bootstrap";

/// What an admin credential may do; each role includes the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Get*, List*, GetKeyReferences, ListAuditEvents, GetSnapshotStatus.
    Viewer,
    /// Also every consumer, key and model service mutation.
    Operator,
    /// Also the admin-token RPCs.
    Admin,
}

impl Role {
    /// The name operators write (`VIEWER`, `OPERATOR`, `ADMIN`).
    pub fn label(self) -> &'static str {
        match self {
            Role::Viewer => "VIEWER",
            Role::Operator => "OPERATOR",
            Role::Admin => "ADMIN",
        }
    }

    /// Parses a role name as operators write it (case-insensitive).
    pub fn parse(text: &str) -> Option<Role> {
        [Role::Viewer, Role::Operator, Role::Admin]
            .into_iter()
            .find(|r| r.label().eq_ignore_ascii_case(text.trim()))
    }

    /// Whether this role may call an RPC that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A stored admin credential, as Get/List show it (never its value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminToken {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub masked_value: String,
    pub expire_time: Option<Timestamp>,
    pub create_time: Timestamp,
    pub last_used_time: Option<Timestamp>,
}

impl AdminToken {
    /// Whether the credential no longer opens the API at `now`.
    pub fn expired_at(&self, now: Timestamp) -> bool {
        self.expire_time.is_some_and(|t| t <= now)
    }
}

/// A `CreateAdminToken` request, validated before anything is stored.
#[derive(Clone, Debug)]
pub struct NewAdminToken {
    pub name: String,
    pub role: Role,
    pub expire_time: Option<Timestamp>,
}

impl NewAdminToken {
    /// Name rules as for every resource; `bootstrap` is reserved for the bootstrap token;
    /// an expiry must lie after `now`.
    pub fn validate(&self, now: Timestamp) -> Result<(), RuleError> {
        let mut violations = Vec::new();
        if let Err(v) = validate::name("name", &self.name) {
            violations.push(v);
        } else if self.name == BOOTSTRAP_NAME {
            violations.push(FieldViolation::new(
                "name",
                "\"bootstrap\" is reserved for the bootstrap admin token",
            ));
        }
        if self.expire_time.is_some_and(|t| t <= now) {
            violations.push(FieldViolation::new("expire_time", "must be in the future"));
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(RuleError::Invalid(violations))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_include_the_ones_below() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn new_token_rules() {
        let now = Timestamp(1_000);
        let ok = NewAdminToken {
            name: "alice".into(),
            role: Role::Viewer,
            expire_time: Some(Timestamp(2_000)),
        };
        assert!(ok.validate(now).is_ok());
        let past = NewAdminToken {
            expire_time: Some(Timestamp(1_000)),
            ..ok.clone()
        };
        assert!(past.validate(now).is_err());
        let reserved = NewAdminToken {
            name: BOOTSTRAP_NAME.into(),
            ..ok
        };
        assert!(reserved.validate(now).is_err());
    }
}
