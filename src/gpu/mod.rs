//! The GPU implementations, one module per `kernels/*.cu` file: host-side
//! planning (grids, scratch layout, parameter structs), validation of device
//! buffers, and launches through [`crate::cuda`]. Each is tested on a GPU
//! against the CPU reference ([`crate::reference`]).

pub mod attention;
pub mod convert;
pub mod distill;
pub mod gate;

use crate::error::{Error, Result};
use crate::tensor::{DType, Layout3};

/// A tensor in device memory: address, element type and layout.
#[derive(Clone, Copy, Debug)]
pub struct DeviceTensor {
    pub ptr: u64,
    pub dtype: DType,
    pub layout: Layout3,
}

impl DeviceTensor {
    /// Bytes from `ptr` to one past the last addressed element.
    pub fn span_bytes(&self, name: &str) -> Result<usize> {
        Ok(self.layout.span(name)? * self.dtype.size())
    }

    /// The kernels read rows as 16-byte vectors: unit dim stride, a 16-byte
    /// aligned pointer, token and head strides that are multiples of 16
    /// bytes. `Unsupported` naming `name` and `reader` (the kernel) otherwise.
    pub(crate) fn check_rows_aligned(&self, name: &str, reader: &str) -> Result<()> {
        let [row, head, dim] = self.layout.strides;
        let size = self.dtype.size();
        if dim == 1 && self.ptr % 16 == 0 && (row * size) % 16 == 0 && (head * size) % 16 == 0 {
            return Ok(());
        }
        Err(Error::unsupported(format!(
            "{name}: {reader} reads 16-byte vectors: it needs dim stride 1, a 16-byte aligned pointer and \
             token/head strides that are multiples of 16 bytes (strides {:?} elements, pointer {:#x})",
            self.layout.strides, self.ptr
        )))
    }
}

/// The mask arrays in device memory.
#[derive(Clone, Copy, Debug)]
pub struct DeviceMask {
    pub counts: u64,
    pub counts_len: usize,
    pub indices: u64,
    pub indices_len: usize,
    pub row_offsets: u64,
    pub row_offsets_len: usize,
}

/// `bytes` of device memory at `ptr` (inside one allocation, checked
/// through the driver) that belong to context `ctx`; `ctx_name` says what
/// `ctx` is in the message. Zero bytes pass (nothing is read).
pub(crate) fn check_buffer(ctx: &crate::cuda::Ctx, ctx_name: &str, name: &str, ptr: u64, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    crate::cuda::check_device_pointer(name, ptr, bytes)?;
    if crate::cuda::context_of(ptr)?.id() != ctx.id() {
        return Err(Error::invalid(format!("{name} lives in another CUDA context than {ctx_name}")));
    }
    Ok(())
}
