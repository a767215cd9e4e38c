//! The resources keygate manages and the rules they obey (SPEC §1): validation, lifecycle,
//! masking. Pure data and functions: no gRPC, no SQL, no I/O.

mod admin_token;
pub mod input;
pub mod limits;
pub mod model;
mod secret;
pub mod text;
pub mod usage;
pub mod validate;

pub use admin_token::{ADMIN_TOKEN_PREFIX, AdminToken, BOOTSTRAP_NAME, NewAdminToken, Role};
pub use model::{ModelGrant, ModelSource};
pub use secret::Secret;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use validate::{FieldViolation, mask};

/// Limits an operator can tune; defaults are the SPEC's.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_keys_per_consumer: usize,
    pub max_ip_allowlist: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_keys_per_consumer: 50,
            max_ip_allowlist: 50,
        }
    }
}

/// Wall-clock time in microseconds since the Unix epoch: how the store keeps every time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(d.as_micros().min(i64::MAX as u128) as i64),
            Err(e) => Timestamp(-(e.duration().as_micros().min(i64::MAX as u128) as i64)),
        }
    }

    pub fn to_system(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_micros(self.0.unsigned_abs())
        }
    }
}

/// The four kinds of resource; also used by audit events and dependency messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    Consumer,
    ConsumerKey,
    ModelService,
    ModelKey,
    /// A named admin credential (§9); appears only in audit events, never in snapshots.
    AdminToken,
    /// The store itself (its epoch, SPEC §5); appears only in audit events.
    Store,
}

impl ResourceKind {
    /// Human wording used in error messages ("consumer key \"k1\"").
    pub fn label(self) -> &'static str {
        match self {
            ResourceKind::Consumer => "consumer",
            ResourceKind::ConsumerKey => "consumer key",
            ResourceKind::ModelService => "model service",
            ResourceKind::ModelKey => "model key",
            ResourceKind::AdminToken => "admin token",
            ResourceKind::Store => "store",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyStatus {
    Enabled,
    Disabled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GenerationMethod {
    Auto,
    Custom,
    SecretRef,
}

/// How a resource selects another: by its immutable id or its (editable) name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Id(String),
    Name(String),
    /// Either: an id if one matches, else a name (bind requests take "a name or an id").
    IdOrName(String),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Id(v) => write!(f, "id {v:?}"),
            Selector::Name(v) | Selector::IdOrName(v) => write!(f, "{v:?}"),
        }
    }
}

/// A resource named by id and name, as other resources refer to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Named {
    pub id: String,
    pub name: String,
}

/// Which model services (and which of their models) a consumer or consumer key may reach.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Scope {
    /// Not set: every service on a consumer; the consumer's scope on a key.
    #[default]
    Unset,
    /// `{"all": true}`: explicitly every service (still narrowed by the consumer on a key).
    All,
    /// Only these: every model of `services`, and the models `models` match (SPEC §8.1).
    /// One list may be empty, never both.
    List {
        services: Vec<Named>,
        models: Vec<ModelGrant>,
    },
}

/// A scope as the operator wrote it: names still to be resolved against the store.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ScopeInput {
    #[default]
    Unset,
    All,
    /// Service names, and `"<service>/<pattern>"` model entries as written.
    List {
        services: Vec<String>,
        models: Vec<String>,
    },
}

/// How an update changes a scope: the whole of it (update mask path `scope`), or one or both
/// of its lists, keeping the other (`scope.model_services`, `scope.models`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopePatch {
    Replace(ScopeInput),
    Lists {
        services: Option<Vec<String>>,
        models: Option<Vec<String>>,
    },
}

impl From<ScopeInput> for ScopePatch {
    fn from(s: ScopeInput) -> Self {
        ScopePatch::Replace(s)
    }
}

/// A reference to a value in an external secret store (never the value).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct SecretRef {
    pub provider: String,
    pub name: String,
    pub version: String,
}

/// `provider "file", name "openai-prod", version "2"` (or `latest`): how errors and logs
/// name a reference. Never a value.
impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "provider {:?}, name {:?}, version ",
            self.provider, self.name
        )?;
        if self.version.is_empty() {
            f.write_str("latest")
        } else {
            write!(f, "{:?}", self.version)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    pub id: String,
    pub name: String,
    pub description: String,
    pub scope: Scope,
    pub consumer_keys: Vec<Named>,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
    /// Budgets and rate limits (SPEC §8.3), over every key bound to it.
    pub limits: limits::Limits,
    /// The spend of the budget's current period (none without a budget).
    pub spend: Option<limits::Spend>,
    /// Until when its budget refuses every key bound to it (kept by the control plane from
    /// the usage reports; published in the snapshot).
    pub budget_exhausted_until: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelService {
    pub id: String,
    pub name: String,
    pub description: String,
    pub provider: String,
    pub auth_header: String,
    pub auth_value_template: String,
    pub models: Vec<String>,
    pub model_source: ModelSource,
    /// Prices of its models, for the cost of usage (SPEC §8.2).
    pub pricing: Vec<usage::ModelPrice>,
    pub model_keys: Vec<Named>,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerKey {
    pub id: String,
    pub name: String,
    pub description: String,
    pub status: KeyStatus,
    pub generation_method: GenerationMethod,
    pub masked_value: String,
    pub secret_ref: Option<SecretRef>,
    pub consumer: Option<Named>,
    pub scope: Scope,
    pub ip_allowlist: Vec<String>,
    pub expire_time: Option<Timestamp>,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
    pub last_used_time: Option<Timestamp>,
    /// Budgets and rate limits (SPEC §8.3).
    pub limits: limits::Limits,
    /// The spend of the budget's current period (none without a budget).
    pub spend: Option<limits::Spend>,
    /// The value a rotation replaced, while it is recorded (SPEC §8.4): it authorizes until
    /// its `expire_time` only, and is kept after that until the next rotation.
    pub previous: Option<PreviousValue>,
}

/// A rotated consumer key's previous value: its mask (never the value) and the instant it
/// stops authorizing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreviousValue {
    pub masked_value: String,
    pub expire_time: Timestamp,
}

impl ConsumerKey {
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expire_time.is_some_and(|t| t <= now)
    }

    /// The previous value while it still authorizes at `now` (none before the first rotation
    /// and from its expiry on).
    pub fn previous_in_force(&self, now: Timestamp) -> Option<&PreviousValue> {
        self.previous.as_ref().filter(|p| p.expire_time > now)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelKey {
    pub id: String,
    pub name: String,
    pub description: String,
    pub status: KeyStatus,
    pub generation_method: GenerationMethod,
    pub masked_value: String,
    pub secret_ref: Option<SecretRef>,
    pub model_services: Vec<Named>,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
}

/// One entry of the audit trail: who did what to which resource, never a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub revision: i64,
    pub time: Timestamp,
    pub actor: String,
    pub action: String,
    pub kind: ResourceKind,
    pub resource_id: String,
    pub resource_name: String,
    pub changed_fields: Vec<String>,
    /// What happened, for changes no admin request made (e.g. a new epoch); never a value.
    pub details: String,
}

/// Why an admin request was refused: the lifecycle and validation rules of SPEC §1.
/// Each variant maps to one gRPC code at the API edge.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("invalid argument: {}", violations_text(.0))]
    Invalid(Vec<FieldViolation>),
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: ResourceKind, name: String },
    /// ALREADY_EXISTS for something other than a name (a key value another key holds); the
    /// message says what, never which resource holds it.
    #[error("{0}")]
    AlreadyInUse(String),
    #[error("{kind} {selector} not found")]
    NotFound {
        kind: ResourceKind,
        selector: String,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unimplemented(String),
}

impl RuleError {
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        RuleError::Invalid(vec![FieldViolation::new(field, description)])
    }

    pub fn not_found(kind: ResourceKind, selector: &Selector) -> Self {
        RuleError::NotFound {
            kind,
            selector: selector.to_string(),
        }
    }
}

fn violations_text(v: &[FieldViolation]) -> String {
    v.iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The dependencies that block a delete, listed by kind and name in the refusal.
pub fn dependency_error(
    kind: ResourceKind,
    name: &str,
    deps: &[(ResourceKind, String)],
) -> RuleError {
    let list = deps
        .iter()
        .map(|(k, n)| format!("{k} {n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    RuleError::FailedPrecondition(format!(
        "cannot delete {kind} {name:?}: it still has dependencies: {list}"
    ))
}
