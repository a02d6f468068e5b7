//! Device buffers for GPU tests that call the C API with CUDA descriptors,
//! as an engine does: buffers from `seerattn::cuda::testing` (synchronous
//! set-up and read-back, which the library itself never does), descriptors
//! of the C API, the mask arrays sized by `seer_mask_sizes`.

use super::capi::{expect, host_tensor, SEER_OK};
use seerattn::cuda::{self, testing, testing::Stream, Ctx, DeviceBuffer};
use seerattn::ffi::args::{SeerBlockMask, SeerTensor};
use seerattn::ffi::attention::{seer_prefill_params_default, SeerPrefillParams};
use seerattn::ffi::gate::SeerMaskParams;
use seerattn::ffi::mask::SeerMaskSizes;
use seerattn::BlockMask;
use std::mem::MaybeUninit;

/// `SeerDevice::SEER_DEVICE_CUDA`.
pub const CUDA: u32 = 1;

/// The calling thread's CUDA context (device 0's primary one): the GPU tests
/// need a GPU and fail here, loudly, without one.
pub fn ctx() -> Ctx {
    cuda::current_context().expect("a CUDA device (the GPU tests run on a GPU machine: scripts/gpu-test.sh run)")
}

/// New device memory holding `bytes` (at least 16 bytes are allocated).
pub fn to_device(ctx: &Ctx, bytes: &[u8]) -> DeviceBuffer {
    let b = testing::alloc_zeroed(ctx, bytes.len().max(16)).unwrap();
    testing::copy_to_device(ctx, b.ptr(), bytes).unwrap();
    b
}

/// New device memory of `len` bytes, every byte 0xff (NaN in bf16, f16 and
/// f32, -1 in the mask's integers): what a kernel fails to write shows.
pub fn poisoned(ctx: &Ctx, len: usize) -> DeviceBuffer {
    let b = testing::alloc_zeroed(ctx, len).unwrap();
    testing::fill(ctx, b.ptr(), 0xff, len).unwrap();
    b
}

/// `len` bytes at device address `ptr` (synchronize the streams that write
/// them first).
pub fn read_back(ctx: &Ctx, ptr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    testing::copy_to_host(ctx, &mut v, ptr).unwrap();
    v
}

/// A `[tokens, heads, dim]` CUDA descriptor of contiguous bf16 at `ptr`.
pub fn cuda_tensor(ptr: u64, shape: [usize; 3]) -> SeerTensor {
    SeerTensor { device: CUDA, ..host_tensor(ptr as *const u16, super::capi::BF16, shape) }
}

/// `rule` on `stream`, with a workspace.
pub fn mask_params(rule: &SeerMaskParams, stream: &Stream, workspace: &DeviceBuffer) -> SeerMaskParams {
    SeerMaskParams {
        cuda_stream: stream.raw().cast(),
        workspace: workspace.ptr() as *mut std::ffi::c_void,
        workspace_bytes: workspace.len(),
        ..*rule
    }
}

/// Prefill parameters (default scale) on `stream`, with a workspace.
pub fn prefill_params(stream: &Stream, workspace: &DeviceBuffer) -> SeerPrefillParams {
    let mut p = MaybeUninit::<SeerPrefillParams>::uninit();
    expect(unsafe { seer_prefill_params_default(p.as_mut_ptr()) }, SEER_OK, "seer_prefill_params_default");
    SeerPrefillParams {
        cuda_stream: stream.raw().cast(),
        workspace: workspace.ptr() as *mut std::ffi::c_void,
        workspace_bytes: workspace.len(),
        ..unsafe { p.assume_init() }
    }
}

/// The three mask arrays of one batch in device memory, poisoned.
pub struct MaskBuffers {
    pub sizes: SeerMaskSizes,
    pub counts: DeviceBuffer,
    pub indices: DeviceBuffer,
    pub offsets: DeviceBuffer,
}

impl MaskBuffers {
    pub fn new(ctx: &Ctx, sizes: SeerMaskSizes) -> MaskBuffers {
        MaskBuffers {
            sizes,
            counts: poisoned(ctx, sizes.rows * 4),
            indices: poisoned(ctx, sizes.indices_len * 4),
            offsets: poisoned(ctx, sizes.row_offsets_len * 8),
        }
    }

    pub fn desc(&self) -> SeerBlockMask {
        SeerBlockMask {
            counts: self.counts.ptr() as *mut i32,
            counts_len: self.sizes.rows,
            indices: self.indices.ptr() as *mut i32,
            indices_len: self.sizes.indices_len,
            row_offsets: self.offsets.ptr() as *mut i64,
            row_offsets_len: self.sizes.row_offsets_len,
            device: CUDA,
        }
    }

    /// Every byte 0xff again.
    pub fn poison(&self, ctx: &Ctx) {
        for b in [&self.counts, &self.indices, &self.offsets] {
            testing::fill(ctx, b.ptr(), 0xff, b.len()).unwrap();
        }
    }

    /// The whole arrays, read back.
    pub fn read(&self, ctx: &Ctx) -> BlockMask {
        let ints = |b: &DeviceBuffer| {
            read_back(ctx, b.ptr(), b.len()).chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
        };
        BlockMask {
            counts: ints(&self.counts),
            indices: ints(&self.indices),
            row_offsets: read_back(ctx, self.offsets.ptr(), self.offsets.len())
                .chunks(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        }
    }
}
