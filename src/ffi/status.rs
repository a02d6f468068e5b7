//! Status codes, the panic boundary, the thread-local last-error message and
//! the version functions.

use crate::error::Error;
use std::cell::RefCell;
use std::ffi::{c_char, CString};

/// Result of every fallible C entry point. Numbers are stable: a code, once
/// released, keeps its meaning; a retired code stays reserved.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeerStatus {
    /// Success; out-parameters were written.
    SEER_OK = 0,
    /// An argument is out of range or inconsistent with the others.
    SEER_INVALID_ARGUMENT = 1,
    /// A required pointer was NULL.
    SEER_NULL_POINTER = 2,
    /// A valid request this build does not implement (dtype, head_dim, device, gate type...).
    SEER_UNSUPPORTED = 3,
    /// A weight or config file is malformed, truncated, hostile or inconsistent.
    SEER_FORMAT_ERROR = 4,
    /// The operating system refused a file operation.
    SEER_IO_ERROR = 5,
    /// A caller buffer is smaller than needed (query the sizes first).
    SEER_BUFFER_TOO_SMALL = 6,
    /// No usable CUDA driver or device.
    SEER_NO_DEVICE = 7,
    /// A CUDA call failed.
    SEER_CUDA_ERROR = 8,
    /// A bug inside the library was caught at the boundary; the call had no effect
    /// on the caller's handles beyond what the message says. Please report it.
    SEER_PANIC = 9,
}

/// An error as the C boundary sees it: a status and its message.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub status: SeerStatus,
    pub message: String,
}

impl FfiError {
    pub fn new(status: SeerStatus, message: impl Into<String>) -> Self {
        FfiError { status, message: message.into() }
    }

    /// The same error, its message prefixed with where it happened.
    pub fn context(self, what: &str) -> Self {
        FfiError { status: self.status, message: format!("{what}: {}", self.message) }
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidArgument(_) => SeerStatus::SEER_INVALID_ARGUMENT,
            Error::Unsupported(_) => SeerStatus::SEER_UNSUPPORTED,
            Error::Format { .. } => SeerStatus::SEER_FORMAT_ERROR,
            Error::Io { .. } => SeerStatus::SEER_IO_ERROR,
            Error::BufferTooSmall(_) => SeerStatus::SEER_BUFFER_TOO_SMALL,
            Error::NoDevice(_) => SeerStatus::SEER_NO_DEVICE,
            Error::Cuda(_) => SeerStatus::SEER_CUDA_ERROR,
        };
        FfiError { status, message: e.to_string() }
    }
}

pub(crate) type FfiResult<T = ()> = Result<T, FfiError>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(function: &str, message: &str) {
    // Interior NULs cannot cross into C; replace them rather than lose the message.
    let text = format!("{function}: {message}").replace('\0', " ");
    let c = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = c);
}

/// Run an entry point's body: catch panics, map errors to statuses, record
/// the message. Used by every `extern "C"` function that returns a status.
pub(crate) fn run(function: &str, body: impl FnOnce() -> FfiResult) -> SeerStatus {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => SeerStatus::SEER_OK,
        Ok(Err(e)) => {
            set_last_error(function, &e.message);
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            set_last_error(function, &format!("internal error (panic caught at the C boundary): {what}"));
            SeerStatus::SEER_PANIC
        }
    }
}

/// `ffi_call!(name, { body })`: the one wrapper around every status-returning
/// entry point. `body` evaluates to `FfiResult<()>` and may use `?`.
macro_rules! ffi_call {
    ($name:literal, $body:block) => {
        $crate::ffi::status::run($name, || -> $crate::ffi::status::FfiResult { $body })
    };
}

/// The message of the last failed call on this thread, NUL-terminated; an
/// empty string if no call has failed on this thread. The pointer stays valid
/// until the next failing seerattn call on the same thread. Never NULL.
#[no_mangle]
pub extern "C" fn seer_last_error_message() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

/// The name of a status code (`"SEER_OK"`, ...), or `"SEER_UNKNOWN_STATUS"`.
/// Static storage; never NULL.
#[no_mangle]
pub extern "C" fn seer_status_name(status: u32) -> *const c_char {
    let name: &'static [u8] = match status {
        0 => b"SEER_OK\0",
        1 => b"SEER_INVALID_ARGUMENT\0",
        2 => b"SEER_NULL_POINTER\0",
        3 => b"SEER_UNSUPPORTED\0",
        4 => b"SEER_FORMAT_ERROR\0",
        5 => b"SEER_IO_ERROR\0",
        6 => b"SEER_BUFFER_TOO_SMALL\0",
        7 => b"SEER_NO_DEVICE\0",
        8 => b"SEER_CUDA_ERROR\0",
        9 => b"SEER_PANIC\0",
        _ => b"SEER_UNKNOWN_STATUS\0",
    };
    name.as_ptr().cast()
}

/// ABI version of this library. It changes only when an existing entry point,
/// struct layout or enum value changes incompatibly; compare it with
/// `SEER_ABI_VERSION` from the header you compiled against.
pub const SEER_ABI_VERSION: u32 = 1;

/// The ABI version (see `SEER_ABI_VERSION`).
#[no_mangle]
pub extern "C" fn seer_abi_version() -> u32 {
    SEER_ABI_VERSION
}

/// The library version (`"MAJOR.MINOR.PATCH"`), static storage, never NULL.
#[no_mangle]
pub extern "C" fn seer_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
