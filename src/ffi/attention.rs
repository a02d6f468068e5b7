//! Sparse prefill: block-sparse causal attention over a block mask.

use super::args::{self, invalid, SeerBatch, SeerBlockMask, SeerTensor};
use super::status::SeerStatus;
use crate::attention::{sparse_prefill, AttentionParams};
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
    /// Caller-owned scratch memory of at least `seer_prefill_workspace_size` bytes (NULL when that is 0).
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
/// any strides, head_dim 64, 128 or 256; `out` like `q`, in q's dtype or f32,
/// not overlapping any input. `maybe_lse` (NULL for none) receives the
/// natural-log sum of exponentials of the scaled scores, `[num_q_heads, total_q]`
/// f32, `lse_len` entries. A query whose row selects no block gets an output
/// of zeros and an lse of -infinity, never NaN.
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
    ffi_call!("seer_sparse_prefill", {
        let p = args::read_sized("params", params)?;
        let batch = args::batch(batch)?;
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

        let head_dim = q.layout.shape[2];
        if !(p.softmax_scale.is_finite() && p.softmax_scale >= 0.0) {
            return Err(invalid(format!("params->softmax_scale = {} must be finite and >= 0", p.softmax_scale)));
        }
        let softmax_scale = if p.softmax_scale == 0.0 { 1.0 / (head_dim as f32).sqrt() } else { p.softmax_scale };
        let attn = AttentionParams { softmax_scale, block_size: p.block_size as usize };
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
    })
}
