//! Device memory owned by the library: weights uploaded once (gate
//! projections and the like), never per call. The hot path only uses
//! caller-provided buffers.

use super::context::{push, Ctx};
use super::{check, driver};
use crate::error::Result;
use cudarc::driver::sys::{self, CUdeviceptr};

/// A device allocation in one context, freed on drop. Zero-length buffers
/// allocate nothing (pointer 0).
#[derive(Debug)]
pub struct DeviceBuffer {
    ctx: Ctx,
    ptr: CUdeviceptr,
    len: usize,
}

// SAFETY: the allocation is plain device memory of a context that any thread
// may use; `DeviceBuffer` hands out only its address, and frees it once.
unsafe impl Send for DeviceBuffer {}
// SAFETY: as above; shared references only read the address and length.
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// Allocate `bytes.len()` bytes in `ctx` and copy `bytes` in
    /// (synchronously: the buffer is ready when this returns).
    pub fn upload(ctx: &Ctx, bytes: &[u8]) -> Result<DeviceBuffer> {
        let buffer = DeviceBuffer::alloc(ctx, bytes.len())?;
        if !bytes.is_empty() {
            let _current = ctx.make_current()?;
            // SAFETY: the allocation holds bytes.len() bytes; the source is a live slice.
            check("cuMemcpyHtoD", unsafe { sys::cuMemcpyHtoD_v2(buffer.ptr, bytes.as_ptr().cast(), bytes.len()) })?;
        }
        Ok(buffer)
    }

    /// Uninitialised device memory (crate-internal and test support).
    pub(crate) fn alloc(ctx: &Ctx, len: usize) -> Result<DeviceBuffer> {
        driver()?;
        let mut ptr: CUdeviceptr = 0;
        if len > 0 {
            let _current = ctx.make_current()?;
            // SAFETY: valid out-pointer.
            check(&format!("cuMemAlloc({len} bytes)"), unsafe { sys::cuMemAlloc_v2(&mut ptr, len) })?;
        }
        Ok(DeviceBuffer { ctx: *ctx, ptr, len })
    }

    /// The device address (0 for an empty buffer).
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The context that owns the allocation.
    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        // Free in the owning context. Errors are ignored: at process exit the
        // driver may already be shut down (CUDA_ERROR_DEINITIALIZED), and a
        // destructor has no one to report to.
        if let Ok(_current) = push(self.ctx.raw()) {
            // SAFETY: this buffer allocated `ptr` and frees it exactly once.
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}
