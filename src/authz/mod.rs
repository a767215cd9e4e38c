//! The data plane: the decision of SPEC §2 (`decision`, pure, shared by every data plane),
//! what to do about it in HTTP terms (`outcome`), the one recorder of outcomes (`record`:
//! metrics, last use, log) and the Envoy ext_authz gRPC adapter (`ext_authz`). Every data
//! plane adapter only translates an `Outcome` into its API. Depends on `snapshot`, `crypto`,
//! `usage` and `metrics`.

pub mod decision;
#[cfg(feature = "server")]
pub mod ext_authz;
#[cfg(feature = "server")]
pub mod ext_proc;
pub mod metering;
pub mod model;
pub mod outcome;
pub mod ratelimit;
pub mod ratelimit_redis;
pub mod record;

pub use decision::{ClientIpSource, Decision, DecisionConfig, DenyReason, RequestView, decide};
#[cfg(feature = "server")]
pub use ext_authz::ExtAuthzService;
pub use outcome::{Admit, MetaValue, Outcome, Refusal};
pub use record::OutcomeRecorder;
