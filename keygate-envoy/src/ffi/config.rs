//! Envoy's side of a filter configuration while it is created: defining the Envoy stats the
//! filter's requests update. Depends on `abi` only.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr;

use super::abi::{self, module_buffer};

/// Envoy's side of a filter configuration while `new_config` runs (the only time Envoy accepts new
/// metrics: it freezes stat creation once `on_http_filter_config_new` returns).
pub struct ConfigEnvoy<'a> {
    /// `envoy_dynamic_module_type_http_filter_config_envoy_ptr`.
    raw: *mut c_void,
    _lifetime: PhantomData<&'a mut ()>,
}

/// A counter without labels defined by [`ConfigEnvoy::define_counter`]. Only valid with requests
/// of the filter configuration that defined it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterId(pub(super) usize);

/// A gauge without labels defined by [`ConfigEnvoy::define_gauge`]. Only valid with requests of
/// the filter configuration that defined it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaugeId(pub(super) usize);

impl ConfigEnvoy<'_> {
    /// Wraps the filter_config_envoy_ptr of the running on_http_filter_config_new hook; the
    /// value must not outlive that call.
    pub(super) fn new(raw: *mut c_void) -> Self {
        ConfigEnvoy {
            raw,
            _lifetime: PhantomData,
        }
    }

    /// Defines an Envoy counter without labels (`dynamicmodulescustom.<name>` in `/stats`).
    /// Returns `None` if Envoy refuses it. Increment it with [`Request::increment_counter`].
    ///
    /// [`Request::increment_counter`]: super::Request::increment_counter
    pub fn define_counter(&mut self, name: &str) -> Option<CounterId> {
        let mut id: usize = 0;
        // SAFETY: `self.raw` is the filter_config_envoy_ptr Envoy passed to the running
        // on_http_filter_config_new (ConfigEnvoy cannot outlive that call). The name buffer
        // borrows `name` for the duration of the call (Envoy copies it into its stat name pool);
        // no label names (null pointer with length 0, which abi.h allows); `id` is a valid
        // out-pointer.
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.raw,
                module_buffer(name.as_bytes()),
                ptr::null(),
                0,
                &mut id,
            )
        };
        (result == abi::METRICS_SUCCESS).then_some(CounterId(id))
    }

    /// Defines an Envoy gauge without labels (`dynamicmodulescustom.<name>` in `/stats`).
    /// Set it with [`Request::set_gauge`].
    ///
    /// [`Request::set_gauge`]: super::Request::set_gauge
    pub fn define_gauge(&mut self, name: &str) -> Option<GaugeId> {
        let mut id: usize = 0;
        // SAFETY: as in `define_counter`: `self.raw` is the live filter_config_envoy_ptr of the
        // running on_http_filter_config_new; the name buffer borrows `name` for the call (Envoy
        // copies it); no label names (null pointer with length 0, which abi.h allows); `id` is a
        // valid out-pointer.
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_define_gauge(
                self.raw,
                module_buffer(name.as_bytes()),
                ptr::null(),
                0,
                &mut id,
            )
        };
        (result == abi::METRICS_SUCCESS).then_some(GaugeId(id))
    }
}
