//! Mask buffer sizes, the prefill workspace size, and conversion between the index-list
//! mask and a caller's dense `u8` block map.

use super::args::{self, invalid, SeerBatch, SeerBlockMask};
use super::gate::check_mask_capacity;
use super::status::{FfiError, FfiResult, SeerStatus};
use crate::mask::{BlockMask, MaskLayout};
use crate::tensor::DType;

/// Buffer sizes of a block mask for one batch shape (`seer_mask_sizes`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeerMaskSizes {
    /// `sizeof(SeerMaskSizes)`, set by the caller.
    pub struct_size: usize,
    /// Rows: (sequence, query head, query block) triples; entries of `counts`.
    pub rows: usize,
    /// Entries of `row_offsets`: `rows + 1`.
    pub row_offsets_len: usize,
    /// Entries of `indices` (each row's causal length, summed).
    pub indices_len: usize,
    /// Bytes of the dense map: per sequence `[num_q_heads, q_blocks, k_blocks]`, concatenated.
    pub dense_bytes: usize,
}

unsafe fn layout(batch: *const SeerBatch, num_q_heads: u32, block_size: u32) -> Result<MaskLayout, FfiError> {
    let batch = args::batch(batch)?;
    if num_q_heads == 0 {
        return Err(invalid("num_q_heads is 0"));
    }
    if block_size as usize != crate::config::SUPPORTED_BLOCK_SIZE {
        return Err(FfiError::new(
            SeerStatus::SEER_UNSUPPORTED,
            format!("block_size = {block_size} (this build supports {})", crate::config::SUPPORTED_BLOCK_SIZE),
        ));
    }
    Ok(MaskLayout::new(&batch, num_q_heads as usize, block_size as usize)?)
}

/// Sizes of the mask arrays (and of the dense map) for a batch with
/// `num_q_heads` query heads and `block_size`-token blocks. The caller sets
/// `out->struct_size`.
#[no_mangle]
pub unsafe extern "C" fn seer_mask_sizes(
    batch: *const SeerBatch,
    num_q_heads: u32,
    block_size: u32,
    out: *mut SeerMaskSizes,
) -> SeerStatus {
    ffi_call!("seer_mask_sizes", {
        let l = layout(batch, num_q_heads, block_size)?;
        let value = SeerMaskSizes {
            struct_size: std::mem::size_of::<SeerMaskSizes>(),
            rows: l.rows(),
            row_offsets_len: l.rows() + 1,
            indices_len: l.index_capacity(),
            dense_bytes: l.dense_len(),
        };
        args::write_sized("out", out, value)
    })
}

/// Scratch bytes that `seer_sparse_prefill` needs in `params->workspace`
/// for this batch on `device` (a `SeerDevice`). The CPU path needs none
/// (0). On CUDA: 256 bytes for the Hopper kernel's work-item counters (with
/// them its rows are handed out as consumers free up, which balances rows
/// of very different lengths, e.g. a gate's dense last rows; without them
/// each takes a fixed share), and for batches with few query blocks and
/// long rows (a chunk over a long KV cache), run split-KV, room after them
/// for each part's f32 output and lse. A smaller workspace is accepted:
/// below 256 bytes the rows run in fixed shares (bit for bit the same
/// output), below the split-KV size unsplit (the same results, less
/// parallelism). A pure function of the arguments (no GPU
/// needed). `SEER_UNSUPPORTED` on CUDA in a build without kernels or for a
/// head_dim the kernel is not built for. For an f32 q, use
/// `seer_prefill_workspace_size_dtype`. The gate's workspace is
/// `seer_gate_workspace_size`.
#[no_mangle]
pub unsafe extern "C" fn seer_prefill_workspace_size(
    batch: *const SeerBatch,
    num_q_heads: u32,
    head_dim: u32,
    device: u32,
    out_bytes: *mut usize,
) -> SeerStatus {
    ffi_call!("seer_prefill_workspace_size", {
        prefill_workspace(batch, num_q_heads, head_dim, None, device, out_bytes)
    })
}

/// `seer_prefill_workspace_size` for a call whose `q` has dtype `q_dtype`
/// and whose `k` and `v` have `kv_dtype` (`SeerDType` values). With 16-bit
/// q (`q_dtype == kv_dtype`) it equals `seer_prefill_workspace_size`. With
/// an f32 q on CUDA it adds, in front, the packed copy of q rounded to
/// `kv_dtype` (`total_q * num_q_heads * head_dim * 2` bytes rounded up to
/// 256), which the call needs (`SEER_BUFFER_TOO_SMALL` below it); the
/// split-KV part after it stays optional as above. 0 on the CPU (the CPU
/// path rounds an f32 q on the host). `SEER_INVALID_ARGUMENT` for a dtype
/// pair the prefill refuses (`kv_dtype` f32, q neither `kv_dtype` nor f32).
#[no_mangle]
pub unsafe extern "C" fn seer_prefill_workspace_size_dtype(
    batch: *const SeerBatch,
    num_q_heads: u32,
    head_dim: u32,
    q_dtype: u32,
    kv_dtype: u32,
    device: u32,
    out_bytes: *mut usize,
) -> SeerStatus {
    ffi_call!("seer_prefill_workspace_size_dtype", {
        let q = args::dtype_of("q_dtype", q_dtype)?;
        let kv = args::dtype_of("kv_dtype", kv_dtype)?;
        if kv == DType::F32 || (q != kv && q != DType::F32) {
            return Err(invalid(format!(
                "q_dtype {} with kv_dtype {}: the prefill takes bf16 or f16 keys and q of their dtype or f32",
                q.name(),
                kv.name()
            )));
        }
        prefill_workspace(batch, num_q_heads, head_dim, Some(q), device, out_bytes)
    })
}

/// The body of both prefill workspace queries; `q_dtype` None: 16-bit q.
unsafe fn prefill_workspace(
    batch: *const SeerBatch,
    num_q_heads: u32,
    head_dim: u32,
    q_dtype: Option<DType>,
    device: u32,
    out_bytes: *mut usize,
) -> FfiResult {
    let _ = layout(batch, num_q_heads, crate::config::SUPPORTED_BLOCK_SIZE as u32)?;
    let rust_batch = args::batch(batch)?;
    if head_dim == 0 {
        return Err(invalid("head_dim is 0"));
    }
    if args::device_of("device", device)? == args::SeerDevice::SEER_DEVICE_CUDA {
        if !crate::cuda::cuda_enabled() {
            return Err(FfiError::new(
                SeerStatus::SEER_UNSUPPORTED,
                "this build of seerattn has no CUDA kernels (no nvcc at build time)",
            ));
        }
        if !crate::gpu::attention::CUDA_HEAD_DIMS.contains(&(head_dim as usize)) {
            return Err(FfiError::new(
                SeerStatus::SEER_UNSUPPORTED,
                format!(
                    "head_dim {head_dim}: the CUDA prefill is built for {:?}",
                    crate::gpu::attention::CUDA_HEAD_DIMS
                ),
            ));
        }
        let (hq, d) = (num_q_heads as usize, head_dim as usize);
        let bytes = match q_dtype {
            Some(q) => crate::gpu::attention::workspace_bytes_for(&rust_batch, hq, d, q),
            None => crate::gpu::attention::workspace_bytes(&rust_batch, hq, d),
        };
        args::out_ptr("out_bytes", out_bytes)?.write(bytes);
        return Ok(());
    }
    args::out_ptr("out_bytes", out_bytes)?.write(0);
    Ok(())
}

/// Build an index-list mask from a dense `u8` block map (non-zero selects;
/// blocks above the causal diagonal are dropped). `dense_len` must equal
/// `SeerMaskSizes::dense_bytes`.
#[no_mangle]
pub unsafe extern "C" fn seer_mask_from_dense(
    batch: *const SeerBatch,
    num_q_heads: u32,
    block_size: u32,
    dense: *const u8,
    dense_len: usize,
    out_mask: *const SeerBlockMask,
) -> SeerStatus {
    ffi_call!("seer_mask_from_dense", {
        let l = layout(batch, num_q_heads, block_size)?;
        let dense = args::raw_slice("dense", dense.cast_mut(), dense_len)?;
        let out = args::mask("out_mask", out_mask)?;
        args::check_disjoint(&out.regions(), &[dense.region])?;
        check_mask_capacity(&l, out.counts.len, out.indices.len, out.row_offsets.len)?;
        let mask = BlockMask::from_dense(&l, dense.get())?;
        out.counts.get_mut().copy_from_slice(&mask.counts);
        out.row_offsets.get_mut().copy_from_slice(&mask.row_offsets);
        out.indices.get_mut()[..mask.indices.len()].copy_from_slice(&mask.indices);
        Ok(())
    })
}

/// Write the dense `u8` map (1 = selected) of a mask, after validating it.
/// `dense_len` must equal `SeerMaskSizes::dense_bytes`.
#[no_mangle]
pub unsafe extern "C" fn seer_mask_to_dense(
    batch: *const SeerBatch,
    num_q_heads: u32,
    block_size: u32,
    mask: *const SeerBlockMask,
    out_dense: *mut u8,
    dense_len: usize,
) -> SeerStatus {
    ffi_call!("seer_mask_to_dense", {
        let l = layout(batch, num_q_heads, block_size)?;
        let m = args::mask("mask", mask)?;
        let out = args::raw_slice("out_dense", out_dense, dense_len)?;
        args::check_disjoint(&[out.region], &m.regions())?;
        m.view().to_dense(&l, out.get_mut())?;
        Ok(())
    })
}
