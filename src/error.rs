//! The library's one error type. Every fallible call returns [`Result`]; the
//! C boundary maps each variant to a stable status code (see `ffi::status`).

use std::path::PathBuf;

/// Errors reported by seerattn. The message always names the argument, file,
/// tensor or field at fault so that an engine can log it as is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument is inconsistent or out of range (shapes, strides, lengths, parameters).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A well-formed request this build does not implement (dtype, head_dim, gate type, device, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A weight or config file is malformed, truncated, hostile or disagrees with its config.
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    /// The operating system refused a file operation.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A caller-provided output buffer is smaller than the call needs.
    #[error("buffer too small: {0}")]
    BufferTooSmall(String),
    /// No usable CUDA driver or device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed: the call, the driver's error name, code and description.
    #[error("CUDA error: {0}")]
    Cuda(String),
}

impl Error {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    pub(crate) fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }
    pub(crate) fn format(path: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), message: msg.into() }
    }
}

/// `Result` with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
