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

    /// `len` zeroed bytes in `ctx` (synchronously: ready when this returns).
    /// For state the library owns outside any hot path (a trainer's
    /// moments and gradients).
    pub fn zeroed(ctx: &Ctx, len: usize) -> Result<DeviceBuffer> {
        let buffer = DeviceBuffer::alloc(ctx, len)?;
        if len > 0 {
            let _current = ctx.make_current()?;
            // SAFETY: the allocation holds `len` bytes.
            check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(buffer.ptr, 0, len) })?;
            sync_legacy_stream()?;
        }
        Ok(buffer)
    }

    /// Overwrite the buffer's first `bytes.len()` bytes (synchronously).
    /// The caller orders this against its own streams (synchronize first).
    pub fn write(&self, bytes: &[u8]) -> Result<()> {
        if bytes.len() > self.len {
            return Err(crate::error::Error::invalid(format!(
                "writing {} bytes into a device buffer of {}",
                bytes.len(),
                self.len
            )));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let _current = self.ctx.make_current()?;
        // SAFETY: the allocation holds at least bytes.len() bytes; the source is a live slice.
        check("cuMemcpyHtoD", unsafe { sys::cuMemcpyHtoD_v2(self.ptr, bytes.as_ptr().cast(), bytes.len()) })?;
        sync_legacy_stream()
    }

    /// The buffer's bytes, after the work enqueued on `stream` so far (the
    /// stream is synchronized first: outside any hot path only).
    ///
    /// # Safety
    /// `stream` must be a live stream of the buffer's context, or NULL.
    pub unsafe fn read(&self, stream: sys::CUstream) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.len];
        if self.len == 0 {
            return Ok(out);
        }
        // SAFETY: the caller's stream belongs to this context (or is NULL).
        unsafe { sync_stream(&self.ctx, stream)? };
        let _current = self.ctx.make_current()?;
        // SAFETY: `out` holds self.len writable bytes; the allocation as many.
        check("cuMemcpyDtoH", unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), self.ptr, self.len) })?;
        Ok(out)
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

/// Wait for the work enqueued on `stream` so far (a stream of `ctx`, or
/// NULL: the legacy default stream). For the trainer, which leaves no work
/// of its own pending between calls (src/distill/cuda.rs); never on the hot
/// path.
///
/// # Safety
/// `stream` must be a live stream of `ctx`, or NULL.
pub(crate) unsafe fn sync_stream(ctx: &Ctx, stream: sys::CUstream) -> Result<()> {
    driver()?;
    let _current = ctx.make_current()?;
    // SAFETY: the caller's stream belongs to `ctx` (or is NULL).
    check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(stream) })
}

/// Wait for the legacy default stream, where the synchronous copies and
/// memsets (here and in test support) are ordered. Not `cuCtxSynchronize`:
/// that would also wait on (and invalidate) a graph capture running on
/// another thread.
pub(crate) fn sync_legacy_stream() -> Result<()> {
    // SAFETY: the NULL stream is always valid in the current context.
    check("cuStreamSynchronize(NULL)", unsafe { sys::cuStreamSynchronize(std::ptr::null_mut()) })
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
