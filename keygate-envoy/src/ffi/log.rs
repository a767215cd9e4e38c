//! Logging through Envoy's logger (`[dynamic_modules]`), callable from any thread. Depends on
//! `abi` only.

use super::abi::{self, module_buffer};

/// Envoy log levels (`envoy_dynamic_module_type_log_level`); messages appear under Envoy's
/// `dynamic_modules` logger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl LogLevel {
    fn to_abi(self) -> u32 {
        match self {
            LogLevel::Trace => 0,
            LogLevel::Debug => 1,
            LogLevel::Info => 2,
            LogLevel::Warn => 3,
            LogLevel::Error => 4,
            LogLevel::Critical => 5,
        }
    }
}

/// Logs `msg` through Envoy's logger (`[dynamic_modules]`). Callable from any thread.
pub fn log(level: LogLevel, msg: &str) {
    // SAFETY: the buffer borrows `msg` for the duration of the call; Envoy copies it (abi.h:
    // module buffers are owned by the module) and the callback is thread-safe.
    unsafe { abi::envoy_dynamic_module_callback_log(level.to_abi(), module_buffer(msg.as_bytes())) }
}

/// Whether Envoy would print a message at `level` (cheap; use it to skip formatting).
pub fn log_enabled(level: LogLevel) -> bool {
    // SAFETY: takes a plain integer and reads Envoy's logger level; no pointers involved.
    unsafe { abi::envoy_dynamic_module_callback_log_enabled(level.to_abi()) }
}
