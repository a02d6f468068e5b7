//! Block-sparse causal attention (prefill): the public entry.
//!
//! [`sparse_prefill`] validates every argument against the batch and the
//! mask, then runs the CPU reference ([`crate::reference::attention`], whose
//! module doc states exactly what is computed, including the contract for
//! query rows whose mask row selects nothing: zeros and `lse = -inf`).
//! [`sparse_prefill_cuda`] runs the same checks on device tensors and
//! enqueues the GPU kernel (kernels/attention.cu, host side in
//! [`crate::gpu::attention`]), which computes the same function.
//!
//! Validation happens here, once, so that the reference and the kernels can
//! index without checks: after it, every index the computation forms is in
//! range (the GPU path also guards its reads of a device mask, which cannot
//! be validated without a synchronization).

use crate::batch::Batch;
use crate::cuda::CUstream;
use crate::error::{Error, Result};
use crate::gpu::{DeviceMask, DeviceTensor};
use crate::mask::{BlockMaskRef, MaskLayout};
use crate::reference;
use crate::tensor::{DType, Layout3, Tensor3, Tensor3Mut};

/// Head dimensions sparse prefill accepts (those the kernels are built for).
pub const SUPPORTED_HEAD_DIMS: [usize; 3] = [64, 128, 256];

pub use crate::config::SUPPORTED_BLOCK_SIZE;

/// Parameters of sparse prefill.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    /// Factor applied to `q · k` before the softmax; usually `1 / sqrt(head_dim)`.
    pub softmax_scale: f32,
    /// Tokens per mask block; must be [`SUPPORTED_BLOCK_SIZE`].
    pub block_size: usize,
}

impl AttentionParams {
    /// The standard parameters for `head_dim`: scale `1 / sqrt(head_dim)`,
    /// blocks of [`SUPPORTED_BLOCK_SIZE`] tokens.
    pub fn for_head_dim(head_dim: usize) -> Self {
        AttentionParams { softmax_scale: (1.0 / (head_dim as f64).sqrt()) as f32, block_size: SUPPORTED_BLOCK_SIZE }
    }
}

/// Block-sparse causal attention of a variable-length batch.
///
/// - `q`: `[batch.total_q(), num_q_heads, head_dim]`, post-RoPE;
/// - `k`, `v`: `[batch.total_k(), num_kv_heads, head_dim]`, with
///   `num_q_heads` a multiple of `num_kv_heads` (GQA/MQA);
/// - `mask`: a block mask in the layout `MaskLayout::new(batch, num_q_heads, block_size)`;
/// - `out`: `q`'s shape, in `k`'s dtype or F32;
/// - `lse`: optional, `num_q_heads * batch.total_q()` values laid out
///   `[num_q_heads, total_q]`: the natural log-sum-exp of the scaled scores.
///
/// `k` and `v` share one dtype, BF16 or F16; `q` has that dtype too, or is
/// F32: an F32 `q` is first rounded to `k`'s dtype (to nearest even, as
/// the GPU path does in its workspace and as ggml's flash attention does with
/// Q on its one-row CPU path and on CUDA), and the attention computed from
/// those values. `head_dim` is one of [`SUPPORTED_HEAD_DIMS`]. Any tensor
/// may be strided.
///
/// Errors: [`Error::Unsupported`] for a dtype, head dimension or block size
/// this build does not implement; [`Error::InvalidArgument`] for anything
/// inconsistent (shapes, head counts, mismatched input dtypes, `lse`
/// length, a non-finite or non-positive scale, a malformed mask). Nothing is
/// written unless every check passes.
#[allow(clippy::too_many_arguments)]
pub fn sparse_prefill(
    q: &Tensor3,
    k: &Tensor3,
    v: &Tensor3,
    batch: &Batch,
    mask: BlockMaskRef<'_>,
    params: &AttentionParams,
    out: &mut Tensor3Mut<'_>,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let num_q_heads = check_common(
        params,
        [q.dtype(), k.dtype(), v.dtype(), out.dtype()],
        [q.shape(), k.shape(), v.shape(), out.shape()],
        batch,
        lse.as_deref().map(<[f32]>::len),
    )?;
    let layout = MaskLayout::new(batch, num_q_heads, params.block_size)?;
    mask.validate(&layout)?;
    let (packed, q16);
    let q = if q.dtype() == DType::F32 {
        packed = crate::gpu::convert::round_host(q, k.dtype());
        q16 = Tensor3::new("q", &packed, k.dtype(), Layout3::contiguous(q.shape()[0], q.shape()[1], q.shape()[2]))?;
        &q16
    } else {
        q
    };
    reference::attention::sparse_prefill(q, k, v, batch, &layout, mask, params.softmax_scale, out, lse);
    Ok(())
}

/// Chosen query rows of [`sparse_prefill`]: for each `(t, h)` of `rows`
/// (packed query row, query head), the row's output as `head_dim` f32 values
/// (what `sparse_prefill` writes to an F32 `out`, bit for bit) and its lse.
/// Only the keys these rows attend are read: spot checks of batches whose
/// whole reference would take too long (the GPU scale tests sample rows of
/// 256k-token sequences) cost what the sampled rows cost.
///
/// Checks as for [`sparse_prefill`] (the whole mask is validated), and every
/// `(t, h)` must lie inside the batch's `total_q` rows and `q`'s heads
/// ([`Error::InvalidArgument`] otherwise).
pub fn sparse_prefill_rows(
    q: &Tensor3,
    k: &Tensor3,
    v: &Tensor3,
    batch: &Batch,
    mask: BlockMaskRef<'_>,
    params: &AttentionParams,
    rows: &[(usize, usize)],
) -> Result<Vec<(Vec<f32>, f32)>> {
    let num_q_heads = check_common(
        params,
        [q.dtype(), k.dtype(), v.dtype(), DType::F32],
        [q.shape(), k.shape(), v.shape(), q.shape()],
        batch,
        None,
    )?;
    let layout = MaskLayout::new(batch, num_q_heads, params.block_size)?;
    mask.validate(&layout)?;
    if let Some((t, h)) = rows.iter().find(|&&(t, h)| t >= batch.total_q() || h >= num_q_heads) {
        return Err(Error::invalid(format!(
            "row ({t}, {h}) lies outside the batch's {} query rows x {num_q_heads} heads",
            batch.total_q()
        )));
    }
    let scale = params.softmax_scale;
    let (packed, q16);
    let q = if q.dtype() == DType::F32 {
        packed = crate::gpu::convert::round_host(q, k.dtype());
        q16 = Tensor3::new("q", &packed, k.dtype(), Layout3::contiguous(q.shape()[0], q.shape()[1], q.shape()[2]))?;
        &q16
    } else {
        q
    };
    Ok(rows.iter().map(|&(t, h)| reference::attention::query_row(q, k, v, batch, &layout, mask, scale, t, h)).collect())
}

/// [`sparse_prefill`] on the GPU: the same computation and the same checks
/// of shapes, dtypes and parameters, over tensors in device memory, enqueued
/// on `stream` (see [`crate::gpu::attention`] for what the kernel requires
/// of layouts: unit dim stride, 16-byte aligned rows; head_dim 64 or 128).
/// `lse` is `(device address, length)` of `num_q_heads * total_q` f32;
/// `workspace` `(device address, bytes)` of scratch, at least
/// [`crate::gpu::attention::workspace_bytes`] for split-KV (less runs unsplit).
///
/// The mask is on the device and is not validated (that would need a
/// synchronization): the kernel reads it only inside its declared lengths
/// and ignores entries outside the causal range.
///
/// # Safety
/// The device buffers must stay valid until the work completes; `stream`
/// must belong to their context (or be NULL).
#[allow(clippy::too_many_arguments)]
pub unsafe fn sparse_prefill_cuda(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    batch: &Batch,
    mask: &DeviceMask,
    params: &AttentionParams,
    out: &DeviceTensor,
    lse: Option<(u64, usize)>,
    workspace: (u64, usize),
    stream: CUstream,
) -> Result<()> {
    check_common(
        params,
        [q.dtype, k.dtype, v.dtype, out.dtype],
        [q.layout.shape, k.layout.shape, v.layout.shape, out.layout.shape],
        batch,
        lse.map(|(_, len)| len),
    )?;
    crate::gpu::attention::sparse_prefill(q, k, v, batch, mask, params, out, lse.map(|(ptr, _)| ptr), workspace, stream)
}

/// The checks both paths share; returns the number of query heads.
fn check_common(
    params: &AttentionParams,
    [q, k, v, out]: [DType; 4],
    shapes: [[usize; 3]; 4],
    batch: &Batch,
    lse_len: Option<usize>,
) -> Result<usize> {
    check_params(params)?;
    check_dtypes(q, k, v, out)?;
    let [_, num_q_heads, _] = check_shapes(shapes, batch)?;
    if let Some(len) = lse_len {
        let want = num_q_heads * batch.total_q();
        if len != want {
            return Err(Error::invalid(format!(
                "lse holds {len} values; it needs num_q_heads * total_q = {num_q_heads} * {} = {want}",
                batch.total_q()
            )));
        }
    }
    Ok(num_q_heads)
}

fn check_params(params: &AttentionParams) -> Result<()> {
    if params.block_size == 0 {
        return Err(Error::invalid("params.block_size must be positive"));
    }
    if params.block_size != SUPPORTED_BLOCK_SIZE {
        return Err(Error::unsupported(format!(
            "params.block_size = {}: only {SUPPORTED_BLOCK_SIZE} is supported",
            params.block_size
        )));
    }
    let scale = params.softmax_scale;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::invalid(format!("params.softmax_scale = {scale}: must be finite and positive")));
    }
    Ok(())
}

/// k and v: one 16-bit dtype; q: the same, or f32 (rounded to it); out: it or f32.
fn check_dtypes(q: DType, k: DType, v: DType, out: DType) -> Result<()> {
    if !matches!(k, DType::BF16 | DType::F16) {
        return Err(Error::unsupported(format!("k dtype {}: only bf16 and f16 are supported", k.name())));
    }
    if v != k {
        return Err(Error::invalid(format!(
            "v dtype {} differs from k dtype {}: k and v must share one dtype",
            v.name(),
            k.name()
        )));
    }
    if q != k && q != DType::F32 {
        return Err(Error::invalid(format!(
            "q dtype {} with {} keys: q must be {} (or f32, rounded to {})",
            q.name(),
            k.name(),
            k.name(),
            k.name()
        )));
    }
    if out != k && out != DType::F32 {
        return Err(Error::unsupported(format!(
            "out dtype {} with {} inputs: out must be {} or f32",
            out.name(),
            k.name(),
            k.name()
        )));
    }
    Ok(())
}

/// Checks shapes and returns q's `[total_q, num_q_heads, head_dim]`.
pub(crate) fn check_shapes([q, k, v, out]: [[usize; 3]; 4], batch: &Batch) -> Result<[usize; 3]> {
    let [q_tokens, num_q_heads, head_dim] = q;
    let [k_tokens, num_kv_heads, k_dim] = k;
    if q_tokens != batch.total_q() {
        return Err(Error::invalid(format!("q has {q_tokens} tokens; the batch has total_q = {}", batch.total_q())));
    }
    if num_q_heads == 0 {
        return Err(Error::invalid("q has 0 heads"));
    }
    if k_tokens != batch.total_k() {
        return Err(Error::invalid(format!("k has {k_tokens} tokens; the batch has total_k = {}", batch.total_k())));
    }
    if num_kv_heads == 0 {
        return Err(Error::invalid("k has 0 heads"));
    }
    if num_q_heads % num_kv_heads != 0 {
        return Err(Error::invalid(format!(
            "q has {num_q_heads} heads, k has {num_kv_heads}: query heads must be a multiple of KV heads"
        )));
    }
    if k_dim != head_dim {
        return Err(Error::invalid(format!("k head_dim {k_dim} differs from q head_dim {head_dim}")));
    }
    if v != k {
        return Err(Error::invalid(format!("v shape {v:?} differs from k shape {k:?}")));
    }
    if !SUPPORTED_HEAD_DIMS.contains(&head_dim) {
        return Err(Error::unsupported(format!("head_dim {head_dim}: supported are {SUPPORTED_HEAD_DIMS:?}")));
    }
    if out != q {
        return Err(Error::invalid(format!("out shape {out:?} differs from q shape {q:?}")));
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_the_full_outputs_rows_and_are_checked() {
        let batch = Batch::from_lens(&[(70, 70), (3, 130)]).unwrap();
        let (hq, hkv, d) = (2, 1, 64);
        let bytes = |n: usize, salt: usize| -> Vec<u8> {
            (0..n).flat_map(|i| half::bf16::from_f32(((i * 31 + salt) % 17) as f32 / 9.0 - 0.9).to_le_bytes()).collect()
        };
        let (qb, kb, vb) = (bytes(73 * hq * d, 1), bytes(200 * hkv * d, 2), bytes(200 * hkv * d, 3));
        let q = Tensor3::new("q", &qb, DType::BF16, crate::tensor::Layout3::contiguous(73, hq, d)).unwrap();
        let k = Tensor3::new("k", &kb, DType::BF16, crate::tensor::Layout3::contiguous(200, hkv, d)).unwrap();
        let v = Tensor3::new("v", &vb, DType::BF16, crate::tensor::Layout3::contiguous(200, hkv, d)).unwrap();
        let layout = MaskLayout::new(&batch, hq, 64).unwrap();
        let mut mask = crate::mask::BlockMask::empty(&layout);
        for r in 0..layout.rows() {
            mask.set_row(r, &[layout.row_id(r).q_block as i32]);
        }
        let params = AttentionParams::for_head_dim(d);
        let mut out_bytes = vec![0u8; 73 * hq * d * 4];
        let mut out =
            Tensor3Mut::new("out", &mut out_bytes, DType::F32, crate::tensor::Layout3::contiguous(73, hq, d)).unwrap();
        let mut lse = vec![0f32; hq * 73];
        sparse_prefill(&q, &k, &v, &batch, mask.as_ref(), &params, &mut out, Some(&mut lse)).unwrap();
        let rows = [(0, 0), (69, 1), (70, 0), (72, 1)];
        let got = sparse_prefill_rows(&q, &k, &v, &batch, mask.as_ref(), &params, &rows).unwrap();
        for (&(t, h), (o, l)) in rows.iter().zip(&got) {
            let want: Vec<f32> = (0..d).map(|x| out.get(t, h, x)).collect();
            assert_eq!(o, &want, "row {t} head {h}");
            assert_eq!(l.to_bits(), lse[h * 73 + t].to_bits(), "row {t} head {h}: lse");
        }
        for bad in [(73, 0), (0, 2)] {
            let r = sparse_prefill_rows(&q, &k, &v, &batch, mask.as_ref(), &params, &[bad]);
            assert!(matches!(r, Err(Error::InvalidArgument(_))), "{bad:?}");
        }
    }

    #[test]
    fn params_for_head_dim() {
        let p = AttentionParams::for_head_dim(128);
        assert_eq!(p.block_size, 64);
        assert!((p.softmax_scale - 0.088_388_35).abs() < 1e-8);
        assert!(check_params(&p).is_ok());
    }
}
