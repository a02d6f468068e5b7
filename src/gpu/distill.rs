//! Host side of `kernels/distill.cu`: the gate's distillation target on the
//! GPU (issue 8), the 2-D max-pooled, row-normalised causal attention map
//! per query head that a gate is trained to predict.
//!
//! [`distill_target`] checks every device buffer, plans the launches (the
//! prefill's plan: head-major, longest rows first, tables of at most
//! [`MAX_SEQS`] sequences) and enqueues them on the caller's stream. No
//! allocation, no host-device copy, no synchronization.
//!
//! The kernel is persistent: [`CTAS_PER_SM`] CTAs per SM, each with an f32
//! scratch slab of `k_blocks_max * 64` floats in the caller's workspace
//! (row maxima per key block, read back once the row's logsumexp is known;
//! kernels/distill.cu). [`workspace_bytes`] sizes it for a device.

use super::attention::{Plan, SeqTable, MAX_SEQS};
use super::gate::{self, DeviceGate, GatePlan};
use super::{check_buffer, DeviceTensor};
use crate::batch::Batch;
use crate::config::GateConfig;
use crate::cuda::{self, kernels, CUstream};
use crate::error::{Error, Result};
use crate::mask::MaskLayout;
use crate::tensor::DType;
use std::ffi::c_void;

const BLOCK: usize = 64;
/// Table capacity of the small kernel variants.
const SMALL_SEQS: usize = 16;
/// Head dimensions the kernel is built for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];
/// CTAs of 128 threads per SM (`__launch_bounds__(128, 4)`; 48 KB of
/// shared memory each at head_dim 128: four fit in Hopper's 228 KB, three
/// in A100's 164 KB, where the fourth waits; nothing waits on it).
pub const CTAS_PER_SM: usize = 4;
const THREADS: u32 = 128;

/// `seer::distill::DistillArgs` (kernels/distill.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DistillArgs {
    q: u64,
    k: u64,
    target: u64,
    scratch: u64,
    q_row_stride: i64,
    q_head_stride: i64,
    k_row_stride: i64,
    k_head_stride: i64,
    target_len: i64,
    scratch_slab: i64,
    scale_log2: f32,
    hq: i32,
    group: i32,
    units: i32,
}

/// f32 values of the target for `batch` with `hq` query heads: one per
/// causal (row, key block) pair, the block mask's slot layout.
pub fn target_len(batch: &Batch, hq: usize) -> Result<usize> {
    Ok(MaskLayout::new(batch, hq, BLOCK)?.index_capacity())
}

/// The CTAs a launch of `items` work items runs on a GPU of `sm_count` SMs.
fn grid_ctas(items: usize, sm_count: usize) -> usize {
    items.min(sm_count.max(1) * CTAS_PER_SM).max(1)
}

/// Workspace bytes [`distill_target`] needs for `batch` with `hq` query
/// heads on a GPU with `sm_count` SMs: a slab of `k_blocks_max * 64` f32
/// per CTA of the largest launch (at 32k tokens on 132 SMs: 69 MB).
pub fn workspace_bytes(batch: &Batch, hq: usize, sm_count: usize) -> Result<usize> {
    let plan = Plan::new(batch, hq)?;
    let mut need = 0usize;
    for table in &plan.launches {
        let units: usize = table.iter().map(|e| e.q_blocks as usize).sum();
        let k_blocks = table.iter().map(|e| (e.k_len as usize).div_ceil(BLOCK)).max().unwrap_or(0);
        let ctas = grid_ctas(units * hq, sm_count);
        let bytes = ctas
            .checked_mul(k_blocks * BLOCK * 4)
            .ok_or_else(|| Error::invalid("distillation target workspace: size overflows"))?;
        need = need.max(bytes);
    }
    Ok(need)
}

/// The distillation target of one layer: `q` `[total_q, hq, D]` and `k`
/// `[total_k, hkv, D]` post-RoPE (bf16 or f16, rows 16-byte aligned, dim
/// stride 1), `softmax_scale` as the model's attention uses it; writes
/// [`target_len`] f32 values at `target.0` (`target.1` values available)
/// on `stream`. `workspace` is `(device address, bytes)`, at least
/// [`workspace_bytes`] for this GPU.
///
/// # Safety
/// The buffers must stay valid until the work completes; `stream` must
/// belong to their context (or be NULL, the legacy stream).
pub unsafe fn distill_target(
    q: &DeviceTensor,
    k: &DeviceTensor,
    batch: &Batch,
    softmax_scale: f32,
    target: (u64, usize),
    workspace: (u64, usize),
    stream: CUstream,
) -> Result<()> {
    if !cuda::cuda_enabled() {
        return Err(Error::unsupported("this build of seerattn has no CUDA kernels (no nvcc at build time)"));
    }
    if !(softmax_scale.is_finite() && softmax_scale > 0.0) {
        return Err(Error::invalid(format!("softmax_scale = {softmax_scale}: must be finite and positive")));
    }
    let [_, hq, d] =
        crate::attention::check_shapes([q.layout.shape, k.layout.shape, k.layout.shape, q.layout.shape], batch)?;
    let hkv = k.layout.shape[1];
    let input = match (q.dtype, k.dtype) {
        (DType::BF16, DType::BF16) => "bf16",
        (DType::F16, DType::F16) => "f16",
        (a, b) => {
            return Err(Error::unsupported(format!(
                "q {} and k {}: the distillation target takes bf16 or f16, both the same",
                a.name(),
                b.name()
            )))
        }
    };
    if !HEAD_DIMS.contains(&d) {
        return Err(Error::unsupported(format!("head_dim {d}: the distillation target is built for {HEAD_DIMS:?}")));
    }
    for (name, t) in [("q", q), ("k", k)] {
        t.check_rows_aligned(name, "the distillation target")?;
    }
    let ctx = cuda::context_of(q.ptr)?;
    for (name, t) in [("q", q), ("k", k)] {
        check_buffer(&ctx, "q", name, t.ptr, t.span_bytes(name)?)?;
    }
    let want = target_len(batch, hq)?;
    if target.1 < want {
        return Err(Error::BufferTooSmall(format!("target holds {} values, this batch needs {want}", target.1)));
    }
    if target.0 % 4 != 0 {
        return Err(Error::invalid("target is not aligned to 4 bytes"));
    }
    check_buffer(&ctx, "q", "target", target.0, want * 4)?;
    let sm_count = ctx.sm_count() as usize;
    let need = workspace_bytes(batch, hq, sm_count)?;
    if workspace.1 < need {
        return Err(Error::BufferTooSmall(format!(
            "workspace holds {} bytes, the distillation target needs {need} on this GPU",
            workspace.1
        )));
    }
    if workspace.0 % 16 != 0 {
        return Err(Error::invalid("the distillation workspace must be 16-byte aligned (cudaMalloc memory is)"));
    }
    check_buffer(&ctx, "q", "workspace", workspace.0, need)?;

    // The plan's row_base is a mask row; the kernel wants the sequence's
    // first target slot: the same layout's row offsets.
    let layout = MaskLayout::new(batch, hq, BLOCK)?;
    let offsets = layout.row_offsets();
    let plan = Plan::new(batch, hq)?;
    let fatbin = kernels::fatbin("distill")?;
    let tile = (BLOCK * d * 2) as u32;
    let smem = 3 * tile;
    for table in &plan.launches {
        let units: usize = table.iter().map(|e| e.q_blocks as usize).sum();
        let k_blocks = table.iter().map(|e| (e.k_len as usize).div_ceil(BLOCK)).max().unwrap_or(0);
        let seqs: Vec<_> =
            table.iter().map(|e| super::attention::SeqEntry { row_base: offsets[e.row_base as usize], ..*e }).collect();
        let mut args = DistillArgs {
            q: q.ptr,
            k: k.ptr,
            target: target.0,
            scratch: workspace.0,
            q_row_stride: q.layout.strides[0] as i64,
            q_head_stride: q.layout.strides[1] as i64,
            k_row_stride: k.layout.strides[0] as i64,
            k_head_stride: k.layout.strides[1] as i64,
            target_len: want as i64,
            scratch_slab: (k_blocks * BLOCK) as i64,
            scale_log2: softmax_scale * std::f32::consts::LOG2_E,
            hq: hq as i32,
            group: (hq / hkv) as i32,
            units: units as i32,
        };
        let grid = [grid_ctas(units * hq, sm_count) as u32, 1, 1];
        let name = |s: usize| format!("seer_distill_target_d{d}_{input}_s{s}");
        if seqs.len() <= SMALL_SEQS {
            let f = cuda::function(&ctx, fatbin, &name(SMALL_SEQS))?;
            launch::<SMALL_SEQS>(f, &seqs, &mut args, grid, smem, stream)?;
        } else {
            let f = cuda::function(&ctx, fatbin, &name(MAX_SEQS))?;
            launch::<MAX_SEQS>(f, &seqs, &mut args, grid, smem, stream)?;
        }
    }
    Ok(())
}

/// `seer::distill_grad::GradArgs` (kernels/distill_grad.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GradArgs {
    target: u64,
    logits: u64,
    row_loss: u64,
    seq_loss: u64,
    dk: u64,
    dw: u64,
    skip_fraction: f64,
}

/// Scratch of [`loss_and_grad`] after the gate's own: logits, per-row loss
/// terms, and dk_proj, each 256-byte aligned. Returns (offsets, total).
fn grad_scratch(config: &GateConfig, plan: &GatePlan) -> ([usize; 3], usize) {
    let align = |x: usize| x.div_ceil(256) * 256;
    let (rows, slots) = plan.rows_and_slots();
    let (kblock_rows, _) = plan.kblock_rows();
    let logits = align(plan.workspace_bytes());
    let row_loss = align(logits + slots * 4);
    let dk = align(row_loss + rows * 4);
    let end = align(dk + config.num_q_heads * kblock_rows * config.head_dim * 4);
    ([logits, row_loss, dk], end)
}

/// Workspace bytes [`loss_and_grad`] needs for `batch` with the gate of `config`.
pub fn loss_workspace_bytes(config: &GateConfig, batch: &Batch) -> Result<usize> {
    let plan = GatePlan::new(config, batch)?;
    Ok(grad_scratch(config, &plan).1)
}

/// Values of the gradient buffer of one layer: `[hq][3 * head_dim][head_dim]` f32.
pub fn grad_len(config: &GateConfig) -> usize {
    config.num_q_heads * 3 * config.head_dim * config.head_dim
}

/// The distillation loss of one layer's gate and its gradient, on the GPU
/// (the released gate type: a K projection per query head, no Q weight).
/// `q_nope`, `k_nope`: the pre-RoPE inputs as [`crate::gpu::gate::compute_mask`]
/// takes them; the gate's weights are `device`'s (the layer's bf16 copy).
/// `target`: the layer's target, f32 in the slot layout (as
/// [`distill_target`] writes it). Writes each sequence's loss (f32, the
/// reference's [`crate::reference::distill::SeqLosses`]) to `seq_losses`
/// and **adds** the gradient of their sum to `grads` (f32, [`grad_len`]
/// values, the weights' layout). Rows before `floor(k_blocks * skip_fraction)`
/// are left out, as [`crate::reference::distill::LossParams`].
///
/// # Safety
/// As [`crate::gpu::gate::compute_mask`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn loss_and_grad(
    config: &GateConfig,
    device: &DeviceGate,
    layer: usize,
    batch: &Batch,
    q_nope: &DeviceTensor,
    k_nope: &DeviceTensor,
    target: (u64, usize),
    skip_fraction: f64,
    grads: (u64, usize),
    seq_losses: (u64, usize),
    workspace: (u64, usize),
    stream: CUstream,
) -> Result<()> {
    if !(0.0..1.0).contains(&skip_fraction) {
        return Err(Error::invalid(format!("skip_fraction = {skip_fraction}: must be in [0, 1)")));
    }
    let plan = GatePlan::new(config, batch)?;
    let (offsets, need) = grad_scratch(config, &plan);
    if workspace.1 < need {
        return Err(Error::BufferTooSmall(format!(
            "workspace holds {} bytes, the distillation loss needs {need} (loss_workspace_bytes)",
            workspace.1
        )));
    }
    let (rows, slots) = plan.rows_and_slots();
    let ctx = device.ctx();
    for (name, (ptr, len), want) in
        [("target", target, slots), ("grads", grads, grad_len(config)), ("seq_losses", seq_losses, batch.len())]
    {
        if len < want {
            return Err(Error::BufferTooSmall(format!("{name} holds {len} values, this batch needs {want}")));
        }
        if ptr % 4 != 0 {
            return Err(Error::invalid(format!("{name} is not aligned to 4 bytes")));
        }
        check_buffer(ctx, "the gate's weights", name, ptr, want * 4)?;
    }
    let logits = workspace.0 + offsets[0] as u64;
    let (plan, mut args) = gate::compute_logits(
        config,
        device,
        layer,
        batch,
        q_nope,
        k_nope,
        (logits, slots),
        workspace.0,
        workspace.1,
        stream,
    )?;
    let mut g = GradArgs {
        target: target.0,
        logits,
        row_loss: workspace.0 + offsets[1] as u64,
        seq_loss: seq_losses.0,
        dk: workspace.0 + offsets[2] as u64,
        dw: grads.0,
        skip_fraction,
    };
    let d = config.head_dim;
    let fatbin = kernels::fatbin("distill_grad")?;
    let (_, max_k_blocks) = plan.kblock_rows();
    let n = plan.num_seqs() as u32;
    let small = plan.num_seqs() <= SMALL_SEQS;
    let s = if small { SMALL_SEQS } else { MAX_SEQS };
    let mut small_table = plan.table::<SMALL_SEQS>();
    let mut big_table;
    let table: *mut c_void = if small {
        (&mut small_table as *mut gate::SeqTable<SMALL_SEQS>).cast()
    } else {
        big_table = plan.table::<MAX_SEQS>();
        (&mut big_table as *mut gate::SeqTable<MAX_SEQS>).cast()
    };
    let mut params: [*mut c_void; 3] =
        [(&mut args as *mut gate::GateArgs).cast(), (&mut g as *mut GradArgs).cast(), table];
    let f = cuda::function(ctx, fatbin, &format!("seer_distill_loss_s{s}"))?;
    cuda::launch(f, [rows.div_ceil(4) as u32, 1, 1], [128, 1, 1], 0, stream, &mut params)?;
    let f = cuda::function(ctx, fatbin, &format!("seer_distill_seq_loss_s{s}"))?;
    cuda::launch(f, [n, 1, 1], [128, 1, 1], 0, stream, &mut params)?;
    let f = cuda::function(ctx, fatbin, &format!("seer_distill_dk_d{d}_s{s}"))?;
    let grid = [max_k_blocks.div_ceil(16) as u32, n, config.num_q_heads as u32];
    cuda::launch(f, grid, [d as u32, 1, 1], 0, stream, &mut params)?;
    let f = cuda::function(ctx, fatbin, &format!("seer_distill_dw_d{d}"))?;
    cuda::launch(f, [(3 * d / 64) as u32, config.num_q_heads as u32, 1], [256, 1, 1], 0, stream, &mut params[..2])
}

unsafe fn launch<const S: usize>(
    f: cuda::CUfunction,
    seqs: &[super::attention::SeqEntry],
    args: &mut DistillArgs,
    grid: [u32; 3],
    smem: u32,
    stream: CUstream,
) -> Result<()> {
    let mut table = SeqTable::<S>::of(seqs);
    let mut params: [*mut c_void; 2] = [(args as *mut DistillArgs).cast(), (&mut table as *mut SeqTable<S>).cast()];
    cuda::launch(f, grid, [THREADS, 1, 1], smem, stream, &mut params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_match_the_kernel() {
        // kernels/distill.cu static_asserts the same size.
        assert_eq!(std::mem::size_of::<DistillArgs>(), 96);
        assert_eq!(std::mem::size_of::<GradArgs>(), 56);
    }

    #[test]
    fn workspace_is_a_slab_per_cta_of_the_longest_row() {
        // 32k tokens, 32 heads, 132 SMs: 528 CTAs x 512 key blocks x 64 rows x 4 bytes.
        let long = Batch::single(32768).unwrap();
        assert_eq!(workspace_bytes(&long, 32, 132).unwrap(), 528 * 512 * 64 * 4);
        // Few items: one CTA each. 100 tokens: 2 blocks, 2 heads.
        let short = Batch::single(100).unwrap();
        assert_eq!(workspace_bytes(&short, 2, 132).unwrap(), 4 * 2 * 64 * 4);
        // A chunk: its q blocks, the keys' blocks.
        let chunk = Batch::from_lens(&[(64, 1000)]).unwrap();
        assert_eq!(workspace_bytes(&chunk, 1, 132).unwrap(), 2 * 16 * 64 * 4);
        assert_eq!(target_len(&chunk, 1).unwrap(), 15 + 16);
    }
}
