//! The GPU implementations, one module per `kernels/*.cu` file: host-side
//! planning (grids, scratch layout, parameter structs), validation of device
//! buffers, and launches through [`crate::cuda`]. Each is tested on a GPU
//! against the CPU reference ([`crate::reference`]).

pub mod attention;
pub mod gate;

use crate::error::Result;
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
