//! Sparse prefill: block-sparse causal attention over a block mask.

use super::args::{self, invalid, SeerBatch, SeerBlockMask, SeerDevice, SeerTensor};
use super::gate::{compute_mask, SeerGate, SeerMaskParams};
use super::status::{FfiResult, SeerStatus};
use crate::attention::{sparse_prefill, sparse_prefill_cuda, AttentionParams};
use crate::batch::Batch;
use std::ffi::c_void;

/// Parameters of `seer_sparse_prefill`. Initialise with `seer_prefill_params_default`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeerPrefillParams {
    /// `sizeof(SeerPrefillParams)`, set by the caller.
    pub struct_size: usize,
    /// Multiplier of `q·k` before the softmax; 0 selects `1/sqrt(head_dim)`.
    pub softmax_scale: f32,
    /// Tokens per block of the mask; 64 is supported.
    pub block_size: u32,
    /// CUDA stream (`cudaStream_t`) for device buffers; unused on the CPU.
    pub cuda_stream: *mut c_void,
    /// Caller-owned scratch memory of `seer_prefill_workspace_size` bytes (NULL for none); on
    /// CUDA a smaller one runs with fixed shares of rows per SM and unsplit instead of split-KV.
    pub workspace: *mut c_void,
    pub workspace_bytes: usize,
}

/// Fill `*out` with the defaults: scale `1/sqrt(head_dim)` (0), 64-token
/// blocks, no stream, no workspace. Writes `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn seer_prefill_params_default(out: *mut SeerPrefillParams) -> SeerStatus {
    ffi_call!("seer_prefill_params_default", {
        args::out_ptr("out", out)?.write(SeerPrefillParams {
            struct_size: std::mem::size_of::<SeerPrefillParams>(),
            softmax_scale: 0.0,
            block_size: crate::config::SUPPORTED_BLOCK_SIZE as u32,
            cuda_stream: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
        });
        Ok(())
    })
}

/// Block-sparse causal attention: for every query, softmax over the keys of
/// the blocks its row of `mask` selects (causal inside the diagonal block),
/// times V, written to `out`. Post-RoPE `q` `[total_q, num_q_heads, head_dim]`,
/// `k` and `v` `[total_k, num_kv_heads, head_dim]`, one dtype (bf16 or f16),
/// any strides, head_dim 64, 128 or 256; `q` in that dtype, or f32 (then
/// rounded to k's dtype, to nearest even, before the attention: on the CPU
/// into a host buffer, on CUDA by a conversion kernel into the front of
/// `params->workspace`, which must then hold
/// `seer_prefill_workspace_size_dtype` bytes, `SEER_BUFFER_TOO_SMALL`
/// below the copy); `out` like `q`, in k's dtype or f32, not overlapping
/// any input. `maybe_lse` (NULL for none) receives the
/// natural-log sum of exponentials of the scaled scores, `[num_q_heads, total_q]`
/// f32, `lse_len` entries. A query whose row selects no block gets an output
/// of zeros and an lse of -infinity, never NaN.
///
/// The device of `q` picks the path; `k`, `v`, `out` and `mask` must be on
/// the same device, and `maybe_lse` in the same memory.
/// - `SEER_DEVICE_CPU`: the CPU reference; the mask is validated first
///   (sorted, causal, within its rows).
/// - `SEER_DEVICE_CUDA`: the GPU kernel, enqueued on `params->cuda_stream`
///   with no allocation, no host-device copy and no synchronization (graph
///   capturable). It needs head_dim 64 or 128, unit dim strides and 16-byte
///   aligned rows (`SEER_UNSUPPORTED` otherwise, saying which), device
///   memory of one context. The device mask cannot be validated without a
///   synchronization: the kernel reads only inside the declared array
///   lengths, clamps each count to its row and skips indices outside the
///   causal range, so a malformed mask gives wrong output, never an
///   out-of-bounds access. `params->workspace` (device memory, 16-byte
///   aligned, apart from every other buffer) of `seer_prefill_workspace_size`
///   bytes lets the Hopper kernel hand rows out as it goes (rows of very
///   different lengths balanced) and a batch of few long rows run split-KV;
///   with less it runs fixed shares and unsplit. The call zeroes the
///   workspace's first 256 bytes on the stream (with a small kernel).
///   On sm_90 the tiles come by TMA, elsewhere by cp.async.
#[no_mangle]
pub unsafe extern "C" fn seer_sparse_prefill(
    params: *const SeerPrefillParams,
    batch: *const SeerBatch,
    q: *const SeerTensor,
    k: *const SeerTensor,
    v: *const SeerTensor,
    mask: *const SeerBlockMask,
    out: *const SeerTensor,
    maybe_lse: *mut f32,
    lse_len: usize,
) -> SeerStatus {
    ffi_call!("seer_sparse_prefill", { sparse_prefill_call(params, batch, q, k, v, mask, out, maybe_lse, lse_len) })
}

/// The body of `seer_sparse_prefill` (also the second half of `seer_gate_attention`).
#[allow(clippy::too_many_arguments)]
unsafe fn sparse_prefill_call(
    params: *const SeerPrefillParams,
    batch: *const SeerBatch,
    q: *const SeerTensor,
    k: *const SeerTensor,
    v: *const SeerTensor,
    mask: *const SeerBlockMask,
    out: *const SeerTensor,
    maybe_lse: *mut f32,
    lse_len: usize,
) -> FfiResult {
    let p = args::read_sized("params", params)?;
    let batch = args::batch(batch)?;
    let device = args::device_of("q", args::deref("q", q)?.device)?;
    for (name, t) in [("k", k), ("v", v), ("out", out)] {
        args::require_same_device(name, args::deref(name, t)?.device, device, "q")?;
    }
    args::require_same_device("mask", args::deref("mask", mask)?.device, device, "q")?;
    if device == SeerDevice::SEER_DEVICE_CUDA {
        return prefill_cuda(&p, &batch, q, k, v, mask, out, maybe_lse, lse_len);
    }
    let q = args::tensor("q", q)?;
    let k = args::tensor("k", k)?;
    let v = args::tensor("v", v)?;
    let m = args::mask("mask", mask)?;
    let o = args::tensor("out", out)?;
    let lse = if maybe_lse.is_null() { None } else { Some(args::raw_slice("maybe_lse", maybe_lse, lse_len)?) };
    let mut reads = vec![q.bytes.region, k.bytes.region, v.bytes.region];
    reads.extend(m.regions());
    let mut writes = vec![o.bytes.region];
    writes.extend(lse.as_ref().map(|l| l.region));
    args::check_disjoint(&writes, &reads)?;

    let attn = attention_params(&p, q.layout.shape[2])?;
    let mut out_view = o.view_mut("out")?;
    sparse_prefill(
        &q.view("q")?,
        &k.view("k")?,
        &v.view("v")?,
        &batch,
        m.view(),
        &attn,
        &mut out_view,
        lse.as_ref().map(|l| l.get_mut()),
    )?;
    Ok(())
}

/// Gate and sparse prefill of one layer in one call: `seer_gate_compute_mask`
/// of layer `mask_params->layer` from the pre-RoPE `q_nope` / `k_nope` into
/// `mask` (caller-owned arrays sized by `seer_mask_sizes`), then
/// `seer_sparse_prefill` of the post-RoPE `q`, `k`, `v` over that mask into
/// `out` (and `maybe_lse`). Every argument is as for those two calls; in
/// addition:
/// - all tensors and the mask are on one device (`SEER_INVALID_ARGUMENT`
///   otherwise), and on CUDA both parameter blocks name the same
///   `cuda_stream`: the two launches are ordered on it, nothing is
///   synchronized, and the pair can be captured into a CUDA graph;
/// - the gate's workspace (`mask_params->workspace`) must not overlap `q`,
///   `k`, `v`, `out` or `maybe_lse` (the prefill reads what the gate has not
///   written);
/// - `mask` is scratch the caller can read afterwards: it holds the mask the
///   prefill used.
///
/// On failure nothing has been enqueued when the error is in the arguments;
/// an error of the second half after a successful first half leaves the
/// mask computed (the message names which half failed).
#[no_mangle]
pub unsafe extern "C" fn seer_gate_attention(
    gate: *const SeerGate,
    mask_params: *const SeerMaskParams,
    prefill_params: *const SeerPrefillParams,
    batch: *const SeerBatch,
    q_nope: *const SeerTensor,
    k_nope: *const SeerTensor,
    q: *const SeerTensor,
    k: *const SeerTensor,
    v: *const SeerTensor,
    mask: *const SeerBlockMask,
    out: *const SeerTensor,
    maybe_lse: *mut f32,
    lse_len: usize,
) -> SeerStatus {
    ffi_call!("seer_gate_attention", {
        // Checks across the two halves first, so that a bad pairing is
        // refused before anything is enqueued.
        let mp = SeerMaskParams::read(mask_params)?;
        let pp = args::read_sized("prefill_params", prefill_params)?;
        let device = args::device_of("q_nope", args::deref("q_nope", q_nope)?.device)?;
        for (name, t) in [("q", q), ("k", k), ("v", v), ("out", out)] {
            args::require_same_device(name, args::deref(name, t)?.device, device, "q_nope")?;
        }
        args::require_same_device("mask", args::deref("mask", mask)?.device, device, "q_nope")?;
        if device == SeerDevice::SEER_DEVICE_CUDA {
            if mp.cuda_stream != pp.cuda_stream {
                return Err(invalid(
                    "mask_params->cuda_stream and prefill_params->cuda_stream differ: the prefill must follow the \
                     gate on one stream",
                ));
            }
            let ws = args::device_region("mask_params->workspace", mp.workspace as usize, mp.workspace_bytes, 1)?;
            let mut others = Vec::new();
            for (name, t) in [("q", q), ("k", k), ("v", v), ("out", out)] {
                others.push(args::device_tensor(name, t)?.region);
            }
            if !maybe_lse.is_null() {
                others.push(args::device_region("maybe_lse", maybe_lse as usize, lse_len, 4)?);
            }
            args::check_disjoint(&[ws], &others)?;
        }
        compute_mask(gate, mask_params, batch, q_nope, k_nope, mask).map_err(|e| e.context("the gate half (mask)"))?;
        sparse_prefill_call(prefill_params, batch, q, k, v, mask, out, maybe_lse, lse_len)
            .map_err(|e| e.context("the prefill half"))
    })
}

/// The parameters of the call, with scale 0 resolved to `1/sqrt(head_dim)`.
fn attention_params(p: &SeerPrefillParams, head_dim: usize) -> FfiResult<AttentionParams> {
    if !(p.softmax_scale.is_finite() && p.softmax_scale >= 0.0) {
        return Err(invalid(format!("params->softmax_scale = {} must be finite and >= 0", p.softmax_scale)));
    }
    let softmax_scale = if p.softmax_scale == 0.0 { 1.0 / (head_dim as f32).sqrt() } else { p.softmax_scale };
    Ok(AttentionParams { softmax_scale, block_size: p.block_size as usize })
}

/// The CUDA path of `seer_sparse_prefill`: descriptors checked on the host
/// (shapes, overlap), then the GPU code checks the pointers against the
/// driver and enqueues the kernel on the caller's stream.
#[allow(clippy::too_many_arguments)]
unsafe fn prefill_cuda(
    p: &SeerPrefillParams,
    batch: &Batch,
    q: *const SeerTensor,
    k: *const SeerTensor,
    v: *const SeerTensor,
    mask: *const SeerBlockMask,
    out: *const SeerTensor,
    maybe_lse: *mut f32,
    lse_len: usize,
) -> FfiResult {
    let q = args::device_tensor("q", q)?;
    let k = args::device_tensor("k", k)?;
    let v = args::device_tensor("v", v)?;
    let m = args::device_mask("mask", mask)?;
    let o = args::device_tensor("out", out)?;
    let lse = if maybe_lse.is_null() {
        None
    } else {
        Some(args::device_region("maybe_lse", maybe_lse as usize, lse_len, std::mem::size_of::<f32>())?)
    };
    let ws = args::device_region("params->workspace", p.workspace as usize, p.workspace_bytes, 1)?;
    let mut reads = vec![q.region, k.region, v.region];
    reads.extend(m.regions);
    let mut writes = vec![o.region];
    writes.extend(lse);
    args::check_disjoint(&writes, &reads)?;
    // The workspace is written (split-KV parts) and read: apart from all of them.
    reads.extend(writes);
    args::check_disjoint(&[ws], &reads)?;
    let attn = attention_params(p, q.tensor.layout.shape[2])?;
    sparse_prefill_cuda(
        &q.tensor,
        &k.tensor,
        &v.tensor,
        batch,
        &m.mask,
        &attn,
        &o.tensor,
        lse.map(|_| (maybe_lse as u64, lse_len)),
        (p.workspace as u64, p.workspace_bytes),
        crate::cuda::stream_from_raw(p.cuda_stream),
    )?;
    Ok(())
}
