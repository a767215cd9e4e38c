//! Unit-test stand-ins for Envoy's callbacks (compiled only with `cfg(test)`). A `cargo test`
//! binary is an executable with no Envoy to resolve the callbacks, so code under test that
//! reaches e.g. `log()` would not link. These definitions never reach the cdylib Envoy loads:
//! `log` prints to stderr, the rest report "not available" without touching their pointers.
//! Depends on `abi`.

use super::abi::{
    EnvoyBuffer, EnvoyHttpHeader, ModuleBuffer, ModuleHttpHeader, ModuleKeyValuePair,
};
use std::ffi::c_void;

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_log(_level: u32, message: ModuleBuffer) {
    // SAFETY: `message` comes from `module_buffer`, i.e. a live Rust slice for this call.
    let bytes = unsafe {
        super::abi::envoy_bytes(EnvoyBuffer {
            ptr: message.ptr,
            length: message.length,
        })
    };
    eprintln!("[envoy log stub] {}", String::from_utf8_lossy(bytes));
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_log_enabled(_level: u32) -> bool {
    true
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_counter(
    _config: *mut c_void,
    _name: ModuleBuffer,
    _label_names: *const ModuleBuffer,
    _label_names_length: usize,
    _counter_id_ptr: *mut usize,
) -> u32 {
    1 // MetricNotFound
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_filter_increment_counter(
    _filter: *mut c_void,
    _id: usize,
    _label_values: *const ModuleBuffer,
    _label_values_length: usize,
    _value: u64,
) -> u32 {
    1 // MetricNotFound
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
    _config: *mut c_void,
    _name: ModuleBuffer,
    _label_names: *const ModuleBuffer,
    _label_names_length: usize,
    _id: *mut usize,
) -> u32 {
    1 // MetricNotFound
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_filter_set_gauge(
    _filter: *mut c_void,
    _id: usize,
    _label_values: *const ModuleBuffer,
    _label_values_length: usize,
    _value: u64,
) -> u32 {
    1 // MetricNotFound
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_get_header(
    _filter: *mut c_void,
    _header_type: u32,
    _key: ModuleBuffer,
    _result: *mut EnvoyBuffer,
    _index: usize,
    _optional_size: *mut usize,
) -> bool {
    false
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_get_headers_size(
    _filter: *mut c_void,
    _header_type: u32,
) -> usize {
    0
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_get_headers(
    _filter: *mut c_void,
    _header_type: u32,
    _result: *mut EnvoyHttpHeader,
) -> bool {
    false
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_set_header(
    _filter: *mut c_void,
    _header_type: u32,
    _key: ModuleBuffer,
    _value: ModuleBuffer,
) -> bool {
    false
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_send_response(
    _filter: *mut c_void,
    _status_code: u32,
    _headers: *const ModuleHttpHeader,
    _headers_size: usize,
    _body: ModuleBuffer,
    _details: ModuleBuffer,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
    _filter: *mut c_void,
    _ns: ModuleBuffer,
    _pairs: *const ModuleKeyValuePair,
    _pairs_size: usize,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
    _filter: *mut c_void,
    _ns: ModuleBuffer,
    _key: ModuleBuffer,
    _value: ModuleBuffer,
) {
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_get_most_specific_route_config(
    _filter: *mut c_void,
) -> *const c_void {
    std::ptr::null()
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
    _filter: *mut c_void,
    _attribute_id: u32,
    _result: *mut EnvoyBuffer,
) -> bool {
    false
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_get_body_chunks_size(
    _filter: *mut c_void,
    _body_type: u32,
) -> usize {
    0
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_get_body_chunks(
    _filter: *mut c_void,
    _body_type: u32,
    _result: *mut EnvoyBuffer,
) -> bool {
    false
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_callback_http_received_buffered_request_body(
    _filter: *mut c_void,
) -> bool {
    false
}

#[test]
fn log_links_and_runs_in_unit_tests() {
    super::log(super::LogLevel::Info, "hello from a unit test");
    assert!(super::log_enabled(super::LogLevel::Info));
}
