//! The bodies of the hooks Envoy calls, generic over the [`FilterModule`] they dispatch to.
//! `declare_filter_module!` (in `export`) instantiates them for one module and exports them under
//! Envoy's symbol names. Every one catches unwinding and fails closed: a panic never reaches
//! Envoy. Depends on `abi`, `config`, `filter`, `log` and `request`.

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;

use super::abi::{self, EnvoyBuffer, ModuleHttpHeader, envoy_bytes, module_buffer};
use super::request::PerRouteBox;
use super::{ConfigEnvoy, FilterModule, LogLevel, Request, log};

/// The local reply sent when a stream hook panics.
pub(crate) const INTERNAL_ERROR_BODY: &str =
    r#"{"error":{"message":"internal error","type":"internal_error","code":"keygate_internal"}}"#;
const INTERNAL_ERROR_DETAILS: &str = "keygate_internal_error";

/// Runs `f`, turning a panic into `fallback` (for hooks with nothing to fail closed on).
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// Routes panic messages to Envoy's log instead of stderr.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        log(LogLevel::Critical, &format!("keygate: {info}"));
    }));
}

/// `envoy_dynamic_module_on_program_init`: the ABI version, or null to refuse the load.
pub fn on_program_init<M: FilterModule>() -> *const c_char {
    let ok = guard(false, || {
        install_panic_hook();
        M::program_init()
    });
    if ok {
        abi::ABI_VERSION.as_ptr()
    } else {
        ptr::null()
    }
}

/// `envoy_dynamic_module_on_http_filter_config_new`: a `Box<M::Config>`, or null to reject.
///
/// # Safety
/// Only for Envoy's call: `filter_config_envoy_ptr` is Envoy's live config pointer and `name`
/// and `config` are buffers Envoy keeps valid for the whole call.
pub unsafe fn on_http_filter_config_new<M: FilterModule>(
    filter_config_envoy_ptr: *mut c_void,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    let created = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: (covers the next two blocks) Envoy passes views of the filter name and config
        // strings it owns for the whole call (filter_config.cc passes string_views of the
        // config's own members).
        let name_bytes = unsafe { envoy_bytes(name) };
        // SAFETY: see above.
        let config_bytes = unsafe { envoy_bytes(config) };
        let Ok(name) = std::str::from_utf8(name_bytes) else {
            log(
                LogLevel::Error,
                "keygate: filter_name is not UTF-8; config rejected",
            );
            return ptr::null();
        };
        let mut envoy = ConfigEnvoy::new(filter_config_envoy_ptr);
        match M::new_config(name, config_bytes, &mut envoy) {
            Ok(cfg) => Box::into_raw(Box::new(cfg)).cast_const().cast::<c_void>(),
            Err(msg) => {
                log(
                    LogLevel::Error,
                    &format!("keygate: filter config rejected: {msg}"),
                );
                ptr::null()
            }
        }
    }));
    created.unwrap_or_else(|_| {
        log(
            LogLevel::Error,
            "keygate: filter config creation panicked; config rejected",
        );
        ptr::null()
    })
}

/// `envoy_dynamic_module_on_http_filter_config_destroy`.
///
/// # Safety
/// Only for Envoy's call: `filter_config_ptr` is null or a pointer returned by
/// [`on_http_filter_config_new`] for the same `M`, destroyed once.
pub unsafe fn on_http_filter_config_destroy<M: FilterModule>(filter_config_ptr: *const c_void) {
    guard((), || {
        if !filter_config_ptr.is_null() {
            // SAFETY: a non-null pointer here is one returned by on_http_filter_config_new
            // (Box<M::Config>::into_raw); Envoy destroys each config exactly once, after the
            // last filter holding its shared_ptr is gone (filter.h `config_`).
            drop(unsafe { Box::from_raw(filter_config_ptr.cast_mut().cast::<M::Config>()) });
        }
    });
}

/// `envoy_dynamic_module_on_http_filter_per_route_config_new`: a `Box<PerRouteBox<M::PerRoute>>`,
/// or null to reject.
///
/// # Safety
/// Only for Envoy's call: `name` and `config` are buffers Envoy keeps valid for the whole call.
pub unsafe fn on_http_filter_per_route_config_new<M: FilterModule>(
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    let created = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: (covers the next two blocks) Envoy passes views of strings it owns for the
        // whole call (filter_config.cc passes string_views of the per-route proto's fields).
        let name_bytes = unsafe { envoy_bytes(name) };
        // SAFETY: see above.
        let config_bytes = unsafe { envoy_bytes(config) };
        let Ok(name) = std::str::from_utf8(name_bytes) else {
            log(
                LogLevel::Error,
                "keygate: per-route filter_name is not UTF-8; rejected",
            );
            return ptr::null();
        };
        match M::new_per_route(name, config_bytes) {
            Ok(value) => Box::into_raw(Box::new(PerRouteBox::new(value)))
                .cast_const()
                .cast::<c_void>(),
            Err(msg) => {
                log(
                    LogLevel::Error,
                    &format!("keygate: per-route config rejected: {msg}"),
                );
                ptr::null()
            }
        }
    }));
    created.unwrap_or_else(|_| {
        log(
            LogLevel::Error,
            "keygate: per-route config creation panicked; rejected",
        );
        ptr::null()
    })
}

/// `envoy_dynamic_module_on_http_filter_per_route_config_destroy`.
///
/// # Safety
/// Only for Envoy's call: `filter_config_ptr` is null or a pointer returned by
/// [`on_http_filter_per_route_config_new`] for the same `M`, destroyed once.
pub unsafe fn on_http_filter_per_route_config_destroy<M: FilterModule>(
    filter_config_ptr: *const c_void,
) {
    guard((), || {
        if !filter_config_ptr.is_null() {
            // SAFETY: a non-null pointer here is one returned by
            // on_http_filter_per_route_config_new (Box<PerRouteBox<M::PerRoute>>::into_raw),
            // destroyed exactly once by ~DynamicModuleHttpPerRouteFilterConfig.
            drop(unsafe {
                Box::from_raw(
                    filter_config_ptr
                        .cast_mut()
                        .cast::<PerRouteBox<M::PerRoute>>(),
                )
            });
        }
    });
}

/// What Envoy keeps for one stream: the filter config it was made from, the module's state
/// for the stream, and whether a hook is running. Envoy can destroy a stream's filter from
/// inside one of its hooks (a local reply that completes the stream destroys its filters at
/// once): then the free is deferred until the hook returns, so no reference a hook holds ever
/// outlives the box. Fields are reached through the raw pointer, never a `&mut StreamBox`.
pub struct StreamBox<M: FilterModule> {
    config: *const M::Config,
    state: M::Stream,
    in_hook: bool,
    destroy_pending: bool,
}

/// `envoy_dynamic_module_on_http_filter_new`: a `Box<StreamBox<M>>` (one small allocation per
/// stream), or null when there is no config. The config pointer it holds stays valid for the
/// stream's life: the C++ DynamicModuleHttpFilter holds a `shared_ptr` to its
/// DynamicModuleHttpFilterConfig (filter.h `config_`), and the config calls
/// on_http_filter_config_destroy only in its destructor (filter_config.cc), i.e. after every
/// filter created from it has called on_http_filter_destroy.
pub fn on_http_filter_new<M: FilterModule>(filter_config_ptr: *const c_void) -> *const c_void {
    if filter_config_ptr.is_null() {
        return ptr::null();
    }
    guard(ptr::null(), || {
        Box::into_raw(Box::new(StreamBox::<M> {
            config: filter_config_ptr.cast::<M::Config>(),
            state: M::Stream::default(),
            in_hook: false,
            destroy_pending: false,
        }))
        .cast_const()
        .cast::<c_void>()
    })
}

/// `envoy_dynamic_module_on_http_filter_destroy`: frees the stream's [`StreamBox`], or, when
/// Envoy destroys the filter from inside one of its hooks, marks it for [`stream_hook`] to free
/// once that hook returns.
///
/// # Safety
/// Only for Envoy's call: `filter_module_ptr` is null or a pointer returned by
/// [`on_http_filter_new`] for the same `M`, destroyed once; no hook of the stream starts after.
pub unsafe fn on_http_filter_destroy<M: FilterModule>(filter_module_ptr: *const c_void) {
    guard((), || {
        if filter_module_ptr.is_null() {
            return;
        }
        let p = filter_module_ptr.cast_mut().cast::<StreamBox<M>>();
        // SAFETY: a non-null pointer here is one on_http_filter_new returned
        // (Box<StreamBox<M>>::into_raw), not yet freed: Envoy destroys each stream's filter
        // once, and stream_hook frees only a box marked here. Reading and writing the two
        // flags through the raw pointer creates no reference to the box, so a hook running
        // below this call (holding `&mut` to `state` only) is not aliased.
        unsafe {
            if (*p).in_hook {
                (*p).destroy_pending = true;
            } else {
                drop(Box::from_raw(p));
            }
        }
    });
}

/// Sends the fixed 500 reply without allocating (so it cannot panic itself).
fn send_internal_error(filter_envoy_ptr: *mut c_void) {
    const CT_KEY: &str = "content-type";
    const CT_VALUE: &str = "application/json";
    let headers = [ModuleHttpHeader {
        key_ptr: CT_KEY.as_ptr().cast(),
        key_length: CT_KEY.len(),
        value_ptr: CT_VALUE.as_ptr().cast(),
        value_length: CT_VALUE.len(),
    }];
    // SAFETY: `filter_envoy_ptr` is the live pointer of the running hook; every buffer points at
    // 'static data and the header array has exactly one initialized element.
    unsafe {
        abi::envoy_dynamic_module_callback_http_send_response(
            filter_envoy_ptr,
            500,
            headers.as_ptr(),
            headers.len(),
            module_buffer(INTERNAL_ERROR_BODY.as_bytes()),
            module_buffer(INTERNAL_ERROR_DETAILS.as_bytes()),
        );
    }
}

/// Runs one of the module's stream hooks on the stream's config and state (`hook` returns the
/// status code for Envoy) and fails closed: a hook that replied locally gets `stop` whatever it
/// returned; a panic sends the internal-error reply (unless the hook had replied already) and
/// gets `stop`.
///
/// # Safety
/// As for the stream hooks below: `filter_envoy_ptr` is the live stream pointer of the running
/// hook and `filter_module_ptr` what [`on_http_filter_new`] returned for that stream.
unsafe fn stream_hook<M: FilterModule>(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    hook_name: &str,
    stop: u32,
    hook: impl FnOnce(&M::Config, &mut M::Stream, &mut Request<'_, M::PerRoute>) -> u32,
) -> u32 {
    let mut req = Request::<M::PerRoute>::new(filter_envoy_ptr);
    // Set once the hook has returned: a panic after that (in finish_hook) must not finish the
    // hook a second time.
    let hook_returned = std::cell::Cell::new(false);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        if filter_module_ptr.is_null() {
            panic!("{hook_name} without a stream");
        }
        let p = filter_module_ptr.cast_mut().cast::<StreamBox<M>>();
        // SAFETY: p is what on_http_filter_new returned for this stream: a live
        // Box<StreamBox<M>>. Envoy runs one stream's hooks one at a time on one worker thread,
        // and while `in_hook` is set on_http_filter_destroy only marks the box (it is freed
        // below, after the hook). `state` is the only part borrowed mutably, and the flags are
        // touched through `p` alone, so the borrow is never aliased.
        let (config, state) = unsafe {
            (*p).in_hook = true;
            // `config` is the live Box<M::Config> from on_http_filter_config_new, which
            // outlives this stream (see on_http_filter_new); it is only ever read (shared `&`),
            // and M::Config is Sync.
            (&*(*p).config, &mut (*p).state)
        };
        let status = hook(config, state, &mut req);
        hook_returned.set(true);
        // SAFETY: the hook returned, so its borrows of the box have ended.
        unsafe { finish_hook::<M>(p) };
        status
    }));
    if outcome.is_err() && !hook_returned.get() {
        // The hook panicked before finish_hook: clear the mark (freeing a box Envoy destroyed
        // meanwhile), so a later destroy frees it.
        guard((), || {
            // SAFETY: the box is live (it is freed only by finish_hook or, outside a hook, by
            // on_http_filter_destroy) and the hook's borrows ended with the unwinding.
            unsafe { finish_hook::<M>(filter_module_ptr.cast_mut().cast::<StreamBox<M>>()) }
        });
    }
    match outcome {
        Ok(status) if !req.replied() => status,
        Ok(_) => stop,
        Err(_) => {
            // Fail closed. If the module had already replied, that reply stands.
            if !req.replied() {
                guard((), || send_internal_error(filter_envoy_ptr));
            }
            stop
        }
    }
}

/// Ends a hook on the stream box at `p`: clears `in_hook`, and frees the box if Envoy
/// destroyed the filter while the hook ran.
///
/// # Safety
/// `p` is a live stream box (non-null, from on_http_filter_new) whose hook has returned, with
/// no reference into it left.
unsafe fn finish_hook<M: FilterModule>(p: *mut StreamBox<M>) {
    if p.is_null() {
        return;
    }
    // SAFETY: the caller's contract: the box is live and nothing borrows it.
    unsafe {
        (*p).in_hook = false;
        if (*p).destroy_pending {
            drop(Box::from_raw(p));
        }
    }
}

/// `envoy_dynamic_module_on_http_filter_request_headers`: [`FilterModule::on_request_headers`].
///
/// # Safety
/// Only for Envoy's call: `filter_envoy_ptr` is the live stream pointer and `filter_module_ptr`
/// what [`on_http_filter_new`] returned for that stream, from a config of the same `M`.
pub unsafe fn on_http_filter_request_headers<M: FilterModule>(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: the caller's guarantees are stream_hook's.
    unsafe {
        stream_hook::<M>(
            filter_envoy_ptr,
            filter_module_ptr,
            "on_http_filter_request_headers",
            abi::HEADERS_STATUS_STOP_ITERATION,
            |config, stream, req| M::on_request_headers(config, stream, req, end_of_stream).code(),
        )
    }
}

/// `envoy_dynamic_module_on_http_filter_request_body`: [`FilterModule::on_request_body`].
///
/// # Safety
/// As for [`on_http_filter_request_headers`].
pub unsafe fn on_http_filter_request_body<M: FilterModule>(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: the caller's guarantees are stream_hook's.
    unsafe {
        stream_hook::<M>(
            filter_envoy_ptr,
            filter_module_ptr,
            "on_http_filter_request_body",
            abi::BODY_STATUS_STOP_ITERATION_NO_BUFFER,
            |config, stream, req| M::on_request_body(config, stream, req, end_of_stream).code(),
        )
    }
}

/// `envoy_dynamic_module_on_http_filter_request_trailers`: [`FilterModule::on_request_trailers`].
///
/// # Safety
/// As for [`on_http_filter_request_headers`].
pub unsafe fn on_http_filter_request_trailers<M: FilterModule>(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
) -> u32 {
    // SAFETY: the caller's guarantees are stream_hook's.
    unsafe {
        stream_hook::<M>(
            filter_envoy_ptr,
            filter_module_ptr,
            "on_http_filter_request_trailers",
            abi::HEADERS_STATUS_STOP_ITERATION,
            |config, stream, req| M::on_request_trailers(config, stream, req).code(),
        )
    }
}

/// `envoy_dynamic_module_on_http_filter_response_headers`: [`FilterModule::on_response_headers`].
///
/// # Safety
/// As for [`on_http_filter_request_headers`].
pub unsafe fn on_http_filter_response_headers<M: FilterModule>(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: the caller's guarantees are stream_hook's.
    unsafe {
        stream_hook::<M>(
            filter_envoy_ptr,
            filter_module_ptr,
            "on_http_filter_response_headers",
            abi::HEADERS_STATUS_STOP_ITERATION,
            |config, stream, req| M::on_response_headers(config, stream, req, end_of_stream).code(),
        )
    }
}

/// `envoy_dynamic_module_on_http_filter_response_body`: [`FilterModule::on_response_body`].
///
/// # Safety
/// As for [`on_http_filter_request_headers`].
pub unsafe fn on_http_filter_response_body<M: FilterModule>(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: the caller's guarantees are stream_hook's.
    unsafe {
        stream_hook::<M>(
            filter_envoy_ptr,
            filter_module_ptr,
            "on_http_filter_response_body",
            abi::BODY_STATUS_STOP_ITERATION_NO_BUFFER,
            |config, stream, req| M::on_response_body(config, stream, req, end_of_stream).code(),
        )
    }
}
