//! The CUDA driver layer: the one module of seerattn that talks to the CUDA
//! driver. Kernels (compiled by `build.rs` into fatbins, see [`kernels`]) are
//! loaded, looked up and launched through it; everything else in the crate
//! stays free of raw driver calls.
//!
//! Why the driver API, loaded at run time (cudarc's `dynamic-loading`):
//! - the library has no link-time dependency on `libcuda`, so the same
//!   binary runs on CPU-only machines (CUDA calls return `SEER_NO_DEVICE`);
//! - an engine hands seerattn device pointers and a stream from *its* CUDA
//!   context (often the runtime's primary context). The driver API lets the
//!   library find the context that owns a pointer ([`context_of`]), make it
//!   current for the duration of a call without disturbing the caller's own
//!   current context ([`Ctx::make_current`]), and launch on the caller's
//!   stream as is ([`stream_from_raw`]).
//!
//! Nothing here synchronizes a caller's stream or allocates on the hot path:
//! pointer attribute queries are neither synchronizing nor forbidden during
//! CUDA graph capture, and module loading happens once per (context, kernel).
//! Device memory owned by the library ([`DeviceBuffer`]) is for weights
//! uploaded once.
//!
//! A build without nvcc has no kernels ([`cuda_enabled`] is false); every
//! entry point then returns [`Error::Unsupported`].

mod context;
pub mod kernels;
mod memory;
mod module;
pub mod testing;
pub mod tma;

pub(crate) use context::primary_context;
pub use context::{check_device_pointer, context_of, current_context, device_name, Ctx, CurrentGuard};
pub use cudarc::driver::sys::{CUcontext, CUdevice, CUdeviceptr, CUfunction, CUstream};
pub(crate) use memory::sync_stream;
pub use memory::DeviceBuffer;
pub use module::{function, launch};

use crate::error::{Error, Result};
use cudarc::driver::sys;
use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

/// Whether this build has CUDA kernels (nvcc was found at build time).
pub fn cuda_enabled() -> bool {
    cfg!(seerattn_cuda)
}

/// `Err(Unsupported)` in a build without kernels; the first check of every entry point.
fn require_kernels() -> Result<()> {
    if cuda_enabled() {
        Ok(())
    } else {
        Err(Error::unsupported("this build of seerattn has no CUDA kernels (no nvcc at build time)"))
    }
}

/// Every driver symbol this module calls. cudarc resolves a symbol on its
/// first call and panics if it is missing; resolving them all up front turns
/// an old driver into one clear [`Error::NoDevice`] instead.
const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuCtxGetCurrent",
    "cuCtxPushCurrent_v2",
    "cuCtxPopCurrent_v2",
    "cuCtxGetDevice_v2",
    "cuCtxGetId",
    "cuPointerGetAttributes",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuFuncSetAttribute",
    "cuLaunchKernel",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuMemsetD8_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuDeviceGetName",
    "cuMemcpyDtoDAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventElapsedTime_v2",
    "cuEventDestroy_v2",
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuGraphInstantiateWithFlags",
    "cuGraphLaunch",
    "cuGraphExecDestroy",
    "cuGraphDestroy",
    "cuGraphGetNodes",
    "cuGraphNodeGetType",
    "cuTensorMapEncodeTiled",
];

/// Load and initialise the CUDA driver, once per process. Errors:
/// [`Error::Unsupported`] without kernels; [`Error::NoDevice`] (with the
/// reason) when `libcuda` is missing or too old, `cuInit` fails, or there is
/// no device. The outcome is remembered: a machine without a driver pays for
/// the lookup once.
pub fn driver() -> Result<()> {
    require_kernels()?;
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    match STATE.get_or_init(load_driver) {
        Ok(()) => Ok(()),
        Err(why) => Err(Error::NoDevice(why.clone())),
    }
}

fn load_driver() -> std::result::Result<(), String> {
    // `sys::culib()` panics when the library is absent and every wrapper
    // panics on a missing symbol: check both first, and still contain any
    // panic so that it becomes an error rather than unwinding into callers.
    let attempt = std::panic::catch_unwind(|| unsafe {
        if !sys::is_culib_present() {
            return Err("the CUDA driver library (libcuda.so.1) is not installed or not on the loader path".to_string());
        }
        let lib = sys::culib();
        for name in SYMBOLS {
            if lib.get::<unsafe extern "C" fn()>(name.as_bytes()).is_err() {
                return Err(format!(
                    "the CUDA driver lacks {name}: it is older than CUDA 13.0 needs (driver 580 or newer)"
                ));
            }
        }
        let r = sys::cuInit(0);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuInit failed: {}", describe(r)));
        }
        let mut count = 0;
        let r = sys::cuDeviceGetCount(&mut count);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuDeviceGetCount failed: {}", describe(r)));
        }
        if count == 0 {
            return Err("the CUDA driver reports no device".to_string());
        }
        Ok(())
    });
    attempt.unwrap_or_else(|_| Err("loading the CUDA driver library failed (panic in the loader)".to_string()))
}

/// The one place a driver result becomes an error:
/// `Error::Cuda("<what>: <NAME> (<code>): <description>")`.
pub(crate) fn check(what: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{what}: {}", describe(r))))
    }
}

/// `NAME (code): description` of a driver result. Only called once the
/// driver is loaded (cuGetErrorName needs it).
fn describe(r: sys::CUresult) -> String {
    let code = r as u32;
    let text = |f: unsafe fn(sys::CUresult, *mut *const std::ffi::c_char) -> sys::CUresult| {
        let mut p = std::ptr::null();
        // SAFETY: the driver returns a pointer to a static NUL-terminated string or an error.
        unsafe {
            if f(r, &mut p) == sys::CUresult::CUDA_SUCCESS && !p.is_null() {
                Some(CStr::from_ptr(p).to_string_lossy().into_owned())
            } else {
                None
            }
        }
    };
    let name = text(sys::cuGetErrorName).unwrap_or_else(|| "CUDA_ERROR_UNKNOWN_CODE".to_string());
    match text(sys::cuGetErrorString) {
        Some(s) => format!("{name} ({code}): {s}"),
        None => format!("{name} ({code})"),
    }
}

/// The caller's stream, from the `void *` of the C API. NULL is the legacy
/// default stream. The stream is used as is: seerattn enqueues work on it and
/// never synchronizes it, so results are ready when the caller's own
/// synchronization (event, stream sync, graph) says so.
pub fn stream_from_raw(p: *mut c_void) -> CUstream {
    p.cast()
}

/// A raw driver handle made `Send + Sync`. Sound because CUDA driver handles
/// (contexts, modules, functions) are plain identifiers that the driver lets
/// any thread use; what is per-thread is only the *current* context, which
/// this module sets explicitly around every call ([`Ctx::make_current`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Handle<T>(T);

// SAFETY: see the type's documentation.
unsafe impl<T> Send for Handle<T> {}
// SAFETY: see the type's documentation.
unsafe impl<T> Sync for Handle<T> {}

/// Lock a cache, recovering it if another thread panicked while holding it:
/// every cache entry is inserted complete, so a poisoned map is still valid.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
