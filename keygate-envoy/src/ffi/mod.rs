//! The C ABI between Envoy 1.40.0 and this module (dynamic-module HTTP filter, ABI "v0.2.0"), and
//! a small safe API over it for the rest of the crate. Depends on `std` only: it never names the
//! module that uses it; the module registers itself with [`declare_filter_module!`].
//!
//! The only code of the crate that contains `unsafe`, in four layers an auditor can read apart:
//! - `abi`: the `#[repr(C)]` types and `extern "C"` declarations of the Envoy callbacks used,
//!   copied from `source/extensions/dynamic_modules/abi/abi.h` (see each declaration);
//! - `log`, `config`, `request`: the safe API ([`log`], [`ConfigEnvoy`], [`Request`]) wrapping
//!   those callbacks; `filter` (no `unsafe`): the [`FilterModule`] trait a module implements;
//! - `hooks`: the bodies of the `envoy_dynamic_module_on_*` hooks, generic over the module, each
//!   of which catches unwinding and fails closed (a panic never crosses into Envoy); `export`:
//!   [`declare_filter_module!`], the table of every symbol Envoy 1.40 resolves for an HTTP filter,
//!   instantiated for one `FilterModule` type;
//! - `stubs` (unit tests only): stand-ins for Envoy's callbacks, so test binaries link.
//!
//! The ABI is pre-1.0 and changes between Envoy minor versions; Envoy does not check argument
//! types, so these declarations are pinned to Envoy 1.40.0
//! (commit 9e5580933739775e8bce696a57a2e1bc99368f23) and must be re-checked on any upgrade.
//! The crate must be built with `panic = "unwind"` (the default): with `panic = "abort"` the
//! `catch_unwind` guards cannot catch anything and a panic kills Envoy.

// `abi` and `hooks` are reachable from the crate for `declare_filter_module!`'s expansion.
#[allow(unsafe_code)]
pub(crate) mod abi;
#[allow(unsafe_code)]
mod config;
mod export;
mod filter;
#[allow(unsafe_code)]
pub(crate) mod hooks;
#[allow(unsafe_code)]
mod log;
#[allow(unsafe_code)]
mod request;
#[cfg(test)]
#[allow(unsafe_code)]
mod stubs;

pub use config::{ConfigEnvoy, CounterId, GaugeId};
pub(crate) use export::declare_filter_module;
pub use filter::{BodyStatus, FilterModule, HeadersStatus};
pub(crate) use hooks::INTERNAL_ERROR_BODY;
pub use log::{LogLevel, log, log_enabled};
pub use request::Request;
