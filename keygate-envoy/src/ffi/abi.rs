//! Raw ABI of Envoy 1.40's dynamic-module HTTP filter (`abi.h`, ABI "v0.2.0"): the `#[repr(C)]`
//! types, the enum values used and the `extern "C"` declarations of the Envoy callbacks this crate
//! calls, plus the two conversions between Rust slices and ABI buffers. Depends on `std` only.
//!
//! Layouts are x86-64/aarch64 LP64; C enums are 32-bit integers and are carried as `u32` so that a
//! value Envoy adds later can never be an invalid Rust enum.

use std::ffi::{CStr, c_char, c_void};

/// Returned from `envoy_dynamic_module_on_program_init`; Envoy 1.40 logs
/// "Dynamic module ABI version v0.2.0 matched" for an exact match.
pub const ABI_VERSION: &CStr = c"v0.2.0";

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module (Envoy copies them).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

/// `envoy_dynamic_module_type_module_key_value_pair`: `{ module_buffer key; module_buffer
/// value; }` (32 bytes on LP64; see the batch setter's declaration).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleKeyValuePair {
    pub key: ModuleBuffer,
    pub value: ModuleBuffer,
}

/// `envoy_dynamic_module_type_module_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

/// `envoy_dynamic_module_type_envoy_http_header`: one header of a map, both halves owned by
/// Envoy (filled by `get_headers`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

// envoy_dynamic_module_type_http_header_type
pub const HEADER_TYPE_REQUEST_HEADER: u32 = 0;
pub const HEADER_TYPE_RESPONSE_HEADER: u32 = 2;
// Every on_http_filter_{request,response}_{headers,body,trailers}_status: 0 = Continue.
pub const STATUS_CONTINUE: u32 = 0;
// envoy_dynamic_module_type_on_http_filter_{request,response}_headers_status
// (= FilterHeadersStatus): 1 = StopIteration.
pub const HEADERS_STATUS_STOP_ITERATION: u32 = 1;
// envoy_dynamic_module_type_on_http_filter_{request,response}_body_status (= FilterDataStatus):
// Continue, StopIterationAndBuffer, StopIterationAndWatermark, StopIterationNoBuffer.
pub const BODY_STATUS_STOP_ITERATION_AND_BUFFER: u32 = 1;
pub const BODY_STATUS_STOP_ITERATION_NO_BUFFER: u32 = 3;
// envoy_dynamic_module_type_http_body_type: the chunk of the running body hook, and what Envoy
// has buffered so far (a stream's earlier chunks after StopIterationAndBuffer).
pub const BODY_TYPE_RECEIVED_REQUEST: u32 = 0;
pub const BODY_TYPE_BUFFERED_REQUEST: u32 = 1;
// The chunk of the running response body hook (a filter that never buffers sees every chunk
// of the response exactly once here).
pub const BODY_TYPE_RECEIVED_RESPONSE: u32 = 2;
// envoy_dynamic_module_type_metrics_result
pub const METRICS_SUCCESS: u32 = 0;
// envoy_dynamic_module_type_attribute_id_SourceAddress ("source.address"), the 25th entry.
pub const ATTRIBUTE_SOURCE_ADDRESS: u32 = 24;

unsafe extern "C" {
    // void envoy_dynamic_module_callback_log(envoy_dynamic_module_type_log_level level,
    //                                        envoy_dynamic_module_type_module_buffer message);
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);

    // bool envoy_dynamic_module_callback_log_enabled(envoy_dynamic_module_type_log_level level);
    pub fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    // envoy_dynamic_module_type_metrics_result
    // envoy_dynamic_module_callback_http_filter_config_define_counter(
    //     envoy_dynamic_module_type_http_filter_config_envoy_ptr filter_config_envoy_ptr,
    //     envoy_dynamic_module_type_module_buffer name,
    //     envoy_dynamic_module_type_module_buffer* label_names, size_t label_names_length,
    //     size_t* counter_id_ptr);
    // (label_names is non-const in abi.h; Envoy only reads it.)
    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        filter_config_envoy_ptr: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        counter_id_ptr: *mut usize,
    ) -> u32;

    // envoy_dynamic_module_type_metrics_result
    // envoy_dynamic_module_callback_http_filter_config_define_gauge(
    //     envoy_dynamic_module_type_http_filter_config_envoy_ptr filter_config_envoy_ptr,
    //     envoy_dynamic_module_type_module_buffer name,
    //     envoy_dynamic_module_type_module_buffer* label_names, size_t label_names_length,
    //     size_t* gauge_id_ptr);
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        filter_config_envoy_ptr: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        gauge_id_ptr: *mut usize,
    ) -> u32;

    // envoy_dynamic_module_type_metrics_result
    // envoy_dynamic_module_callback_http_filter_set_gauge(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr, size_t id,
    //     envoy_dynamic_module_type_module_buffer* label_values, size_t label_values_length,
    //     uint64_t value);
    pub fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter_envoy_ptr: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    // envoy_dynamic_module_type_metrics_result
    // envoy_dynamic_module_callback_http_filter_increment_counter(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr, size_t id,
    //     envoy_dynamic_module_type_module_buffer* label_values, size_t label_values_length,
    //     uint64_t value);
    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter_envoy_ptr: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    // size_t envoy_dynamic_module_callback_http_get_body_chunks_size(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
    //     envoy_dynamic_module_type_http_body_type body_type);
    // 0 when the body is absent (the received chunk outside a body hook, nothing buffered).
    pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter_envoy_ptr: *mut c_void,
        body_type: u32,
    ) -> usize;

    // bool envoy_dynamic_module_callback_http_get_body_chunks(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
    //     envoy_dynamic_module_type_http_body_type body_type,
    //     envoy_dynamic_module_type_envoy_buffer* result_buffer_vector);
    // Writes one buffer per slice into a caller-allocated array of chunks_size entries; false
    // when the body is absent. The slices stay valid until the hook returns (no body setter is
    // called here).
    pub fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter_envoy_ptr: *mut c_void,
        body_type: u32,
        result_buffer_vector: *mut EnvoyBuffer,
    ) -> bool;

    // bool envoy_dynamic_module_callback_http_received_buffered_request_body(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr);
    // True when the received chunk *is* the buffered body (an earlier filter buffered and then
    // resumed): reading both would double it.
    pub fn envoy_dynamic_module_callback_http_received_buffered_request_body(
        filter_envoy_ptr: *mut c_void,
    ) -> bool;

    // bool envoy_dynamic_module_callback_http_get_header(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
    //     envoy_dynamic_module_type_http_header_type header_type,
    //     envoy_dynamic_module_type_module_buffer key,
    //     envoy_dynamic_module_type_envoy_buffer* result_buffer, size_t index,
    //     size_t* optional_size);
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        result_buffer: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;

    // size_t envoy_dynamic_module_callback_http_get_headers_size(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
    //     envoy_dynamic_module_type_http_header_type header_type);
    // How many entries the map holds (a header with two values counts twice); 0 when the
    // stream has no such map yet. (Checked against the 1.40.0 binary: the count is returned,
    // not written through a pointer as in earlier ABIs.)
    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter_envoy_ptr: *mut c_void,
        header_type: u32,
    ) -> usize;

    // bool envoy_dynamic_module_callback_http_get_headers(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
    //     envoy_dynamic_module_type_http_header_type header_type,
    //     envoy_dynamic_module_type_envoy_http_header* result_headers);
    // Writes every entry, in the map's order, into a caller-allocated array of at least
    // get_headers_size entries; false when the map is absent. The bytes stay valid until the
    // hook returns unless a header setter runs.
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter_envoy_ptr: *mut c_void,
        header_type: u32,
        result_headers: *mut EnvoyHttpHeader,
    ) -> bool;

    // bool envoy_dynamic_module_callback_http_set_header(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
    //     envoy_dynamic_module_type_http_header_type header_type,
    //     envoy_dynamic_module_type_module_buffer key,
    //     envoy_dynamic_module_type_module_buffer value);
    // A null/empty value removes every value of the header; otherwise setCopy (one value).
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy_ptr: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    // void envoy_dynamic_module_callback_http_send_response(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr, uint32_t status_code,
    //     envoy_dynamic_module_type_module_http_header* headers_vector,
    //     size_t headers_vector_size, envoy_dynamic_module_type_module_buffer body,
    //     envoy_dynamic_module_type_module_buffer details);
    // (headers_vector is non-const in abi.h; Envoy only reads it.)
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy_ptr: *mut c_void,
        status_code: u32,
        headers_vector: *const ModuleHttpHeader,
        headers_vector_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    // void envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
    //     envoy_dynamic_module_type_module_buffer ns,
    //     envoy_dynamic_module_type_module_buffer key,
    //     envoy_dynamic_module_type_module_buffer value);
    pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        filter_envoy_ptr: *mut c_void,
        ns: ModuleBuffer,
        key: ModuleBuffer,
        value: ModuleBuffer,
    );

    // void envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
    //     envoy_dynamic_module_type_module_buffer ns,
    //     const envoy_dynamic_module_type_module_key_value_pair* pairs, size_t pairs_size);
    // Not in the abi.h this crate could read (it predates the batch setter); checked
    // against the Envoy 1.40.0 binary itself (objdump of the exported symbol): rdi =
    // filter, rsi:rdx = ns, rcx = pairs, r8 = count (0: returns at once), each pair 32 bytes
    // read as key {ptr, len} at +0 and value {ptr, len} at +16, nothing returned in rax on
    // the count-0 path (void). Shown at run time by the access-log metadata tests.
    pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
        filter_envoy_ptr: *mut c_void,
        ns: ModuleBuffer,
        pairs: *const ModuleKeyValuePair,
        pairs_size: usize,
    );

    // envoy_dynamic_module_type_http_filter_per_route_config_module_ptr
    // envoy_dynamic_module_callback_get_most_specific_route_config(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr);
    pub fn envoy_dynamic_module_callback_get_most_specific_route_config(
        filter_envoy_ptr: *mut c_void,
    ) -> *const c_void;

    // bool envoy_dynamic_module_callback_http_filter_get_attribute_string(
    //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
    //     envoy_dynamic_module_type_attribute_id attribute_id,
    //     envoy_dynamic_module_type_envoy_buffer* result);
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter_envoy_ptr: *mut c_void,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
}

/// A module buffer borrowing `bytes`. Envoy copies whatever it keeps, so the borrow only has to
/// outlive the callback it is passed to.
pub(super) fn module_buffer(bytes: &[u8]) -> ModuleBuffer {
    ModuleBuffer {
        ptr: bytes.as_ptr().cast(),
        length: bytes.len(),
    }
}

/// The bytes of an Envoy buffer (empty for a null pointer).
///
/// # Safety
/// Unless `buf.ptr` is null, it must point to `buf.length` initialized bytes that stay valid and
/// unmodified for the caller-chosen lifetime `'b`.
pub(super) unsafe fn envoy_bytes<'b>(buf: EnvoyBuffer) -> &'b [u8] {
    if buf.ptr.is_null() || buf.length == 0 {
        &[]
    } else {
        // SAFETY: non-null, and the caller guarantees `length` readable bytes valid for 'b.
        unsafe { std::slice::from_raw_parts(buf.ptr.cast::<u8>(), buf.length) }
    }
}
