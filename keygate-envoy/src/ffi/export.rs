//! `declare_filter_module!`: the table of every `envoy_dynamic_module_on_*` symbol Envoy 1.40
//! resolves for an HTTP filter, instantiated for one [`FilterModule`](super::FilterModule) type.
//! This is how a module registers itself without the ABI layer naming it (as Envoy's own Rust SDK
//! does with `declare_init_functions!`). Depends on `abi` and `hooks` (through `$crate::ffi`).

/// Exports the dynamic-module hooks for `$module` (a type implementing `FilterModule`). Invoke it
/// exactly once in the crate; a second invocation fails to build (duplicate symbols).
///
/// The expansion is `unsafe` code (`#[unsafe(no_mangle)]` and calls of the `unsafe` hook bodies),
/// allowed on it alone: the crate around it may keep `#![deny(unsafe_code)]`. Hooks that run
/// module code catch unwinding in `hooks`; the hooks Envoy requires and this filter does not use
/// have empty bodies (nothing in them can unwind).
macro_rules! declare_filter_module {
    ($module:ty) => {
        #[allow(unsafe_code)]
        const _: () = {
            use ::std::ffi::{c_char, c_void};

            use $crate::ffi::abi::{EnvoyBuffer, EnvoyHttpHeader, STATUS_CONTINUE};
            use $crate::ffi::hooks;

            type M = $module;

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
                hooks::on_program_init::<M>()
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
                filter_config_envoy_ptr: *mut c_void,
                name: EnvoyBuffer,
                config: EnvoyBuffer,
            ) -> *const c_void {
                // SAFETY: only Envoy calls this symbol, with the arguments abi.h documents.
                unsafe {
                    hooks::on_http_filter_config_new::<M>(filter_config_envoy_ptr, name, config)
                }
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
                filter_config_ptr: *const c_void,
            ) {
                // SAFETY: only Envoy calls this symbol, once per config this module returned.
                unsafe { hooks::on_http_filter_config_destroy::<M>(filter_config_ptr) }
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
                name: EnvoyBuffer,
                config: EnvoyBuffer,
            ) -> *const c_void {
                // SAFETY: only Envoy calls this symbol, with the arguments abi.h documents.
                unsafe { hooks::on_http_filter_per_route_config_new::<M>(name, config) }
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
                filter_config_ptr: *const c_void,
            ) {
                // SAFETY: only Envoy calls this symbol, once per per-route config this module
                // returned.
                unsafe { hooks::on_http_filter_per_route_config_destroy::<M>(filter_config_ptr) }
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_new(
                filter_config_ptr: *const c_void,
                _filter_envoy_ptr: *mut c_void,
            ) -> *const c_void {
                hooks::on_http_filter_new::<M>(filter_config_ptr)
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_destroy(
                filter_module_ptr: *const c_void,
            ) {
                // SAFETY: only Envoy calls this symbol, once per stream filter this module
                // returned, after the stream's last hook.
                unsafe { hooks::on_http_filter_destroy::<M>(filter_module_ptr) }
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
                filter_envoy_ptr: *mut c_void,
                filter_module_ptr: *const c_void,
                end_of_stream: bool,
            ) -> u32 {
                // SAFETY: only Envoy calls this symbol, with the live stream pointer and the
                // pointer on_http_filter_new returned for that stream.
                unsafe {
                    hooks::on_http_filter_request_headers::<M>(
                        filter_envoy_ptr,
                        filter_module_ptr,
                        end_of_stream,
                    )
                }
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
                filter_envoy_ptr: *mut c_void,
                filter_module_ptr: *const c_void,
                end_of_stream: bool,
            ) -> u32 {
                // SAFETY: as for on_http_filter_request_headers.
                unsafe {
                    hooks::on_http_filter_request_body::<M>(
                        filter_envoy_ptr,
                        filter_module_ptr,
                        end_of_stream,
                    )
                }
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
                filter_envoy_ptr: *mut c_void,
                filter_module_ptr: *const c_void,
            ) -> u32 {
                // SAFETY: as for on_http_filter_request_headers.
                unsafe {
                    hooks::on_http_filter_request_trailers::<M>(filter_envoy_ptr, filter_module_ptr)
                }
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
                filter_envoy_ptr: *mut c_void,
                filter_module_ptr: *const c_void,
                end_of_stream: bool,
            ) -> u32 {
                // SAFETY: as for on_http_filter_request_headers.
                unsafe {
                    hooks::on_http_filter_response_headers::<M>(
                        filter_envoy_ptr,
                        filter_module_ptr,
                        end_of_stream,
                    )
                }
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
                filter_envoy_ptr: *mut c_void,
                filter_module_ptr: *const c_void,
                end_of_stream: bool,
            ) -> u32 {
                // SAFETY: as for on_http_filter_request_headers.
                unsafe {
                    hooks::on_http_filter_response_body::<M>(
                        filter_envoy_ptr,
                        filter_module_ptr,
                        end_of_stream,
                    )
                }
            }

            // ---- Hooks Envoy 1.40 requires for an HTTP filter that this module does not use. ----

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
            ) -> u32 {
                STATUS_CONTINUE
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
            ) {
            }

            #[unsafe(no_mangle)]
            #[allow(clippy::too_many_arguments)]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
                _callout_id: u64,
                _result: u32,
                _headers: *mut EnvoyHttpHeader,
                _headers_size: usize,
                _body_chunks: *mut EnvoyBuffer,
                _body_chunks_size: usize,
            ) {
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
                _stream_id: u64,
                _headers: *mut EnvoyHttpHeader,
                _headers_size: usize,
                _end_stream: bool,
            ) {
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
                _stream_id: u64,
                _data: *const EnvoyBuffer,
                _data_count: usize,
                _end_stream: bool,
            ) {
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
                _stream_id: u64,
                _trailers: *mut EnvoyHttpHeader,
                _trailers_size: usize,
            ) {
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
                _stream_id: u64,
            ) {
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
                _stream_id: u64,
                _reason: u32,
            ) {
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
                _event_id: u64,
            ) {
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
            ) {
            }

            #[unsafe(no_mangle)]
            extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
                _filter_envoy_ptr: *mut c_void,
                _filter_module_ptr: *const c_void,
            ) {
            }
        };
    };
}

pub(crate) use declare_filter_module;
