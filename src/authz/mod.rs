//! The data plane: the decision of SPEC §2 (`decision`, pure, shared by every data plane)
//! and its Envoy ext_authz gRPC adapter (`ext_authz`). Depends on `snapshot` and `crypto`.

pub mod decision;
#[cfg(feature = "server")]
pub mod ext_authz;

pub use decision::{ClientIpSource, Decision, DecisionConfig, DenyReason, RequestView, decide};
#[cfg(feature = "server")]
pub use ext_authz::ExtAuthzService;
