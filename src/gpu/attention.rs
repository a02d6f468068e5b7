//! Host side of `kernels/attention.cu` (mma.sync, sm_80 and later) and
//! `kernels/attention_sm90.cu` (wgmma, compute capability 9.0): block-sparse
//! prefill on the GPU.
//!
//! [`sparse_prefill`] checks every device buffer (dtype, layout the kernel
//! can read, device memory of one context, sizes), plans the launches and
//! enqueues them on the caller's stream. No allocation, no host-device
//! copy, no synchronization: the call is capturable in a CUDA graph.
//!
//! Launch plan: one CTA per mask row (sequence, query head, query block),
//! or for the persistent wgmma kernel one CTA per SM whose three consumer
//! warpgroups take the rows round robin in the same order; head-major: the
//! CTAs in flight work on one KV head, whose K and V (16 MB at 32k tokens,
//! head_dim 128, bf16) stay in L2 while the query heads of its
//! GQA group pass over them (heads fastest, measured: 51% L2 hit rate and
//! DRAM traffic). Within a head, sequences go longest first and each
//! sequence's query blocks last to first, so long rows start early and short
//! ones fill the tail. Batches of more than [`MAX_SEQS`] sequences take
//! several launches (their outputs are disjoint).
//!
//! The mask lives on the device (the gate writes it on the same stream), so
//! it cannot be validated here without a synchronization: the kernel reads
//! counts, offsets and indices only inside the lengths the caller declared,
//! clamps counts to the row and skips indices outside the causal range.
//! A malformed mask gives wrong attention, never an out-of-bounds access.

use crate::attention::AttentionParams;
use crate::batch::Batch;
use crate::cuda::tma::{self, TensorMap};
use crate::cuda::{self, kernels, CUstream, Ctx};
use crate::error::{Error, Result};
use crate::gpu::{check_buffer, convert, DeviceMask, DeviceTensor};
use crate::mask::MaskLayout;
use crate::tensor::DType;
use std::ffi::c_void;

/// Sequences one launch carries in its parameter table.
pub const MAX_SEQS: usize = 256;
/// Table capacity of the small kernel variants.
const SMALL_SEQS: usize = 16;
const BLOCK: usize = 64;
/// Head dimensions the CUDA kernel is built for.
pub const CUDA_HEAD_DIMS: [usize; 2] = [64, 128];

/// `seer::attn::AttnArgs` (kernels/attention.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnArgs {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    q_row_stride: i64,
    q_head_stride: i64,
    k_row_stride: i64,
    k_head_stride: i64,
    v_row_stride: i64,
    v_head_stride: i64,
    o_row_stride: i64,
    o_head_stride: i64,
    lse_head_stride: i64,
    counts: u64,
    indices: u64,
    row_offsets: u64,
    counts_len: i64,
    indices_len: i64,
    row_offsets_len: i64,
    scale_log2: f32,
    hq: i32,
    group: i32,
    /// Query blocks of the launch's table: CTAs per head.
    units: i32,
    /// TMA kernels: bit 0 q, bit 1 k, bit 2 v: map coordinates (dim, token, head).
    tma_token_major: i32,
    /// Split-KV parts per row (1: none).
    splits: i32,
    split_out_stride: i64,
    split_lse_stride: i64,
    /// wgmma kernel: a zeroed u32 in the workspace from which its producer
    /// lanes take work items in order (0: the static round robin).
    ticket: u64,
}

/// `seer::attn::CombineArgs`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CombineArgs {
    parts: u64,
    part_lse: u64,
    out: u64,
    lse: u64,
    o_row_stride: i64,
    o_head_stride: i64,
    total_q: i64,
    hq: i32,
    splits: i32,
}

/// Split-KV: below this many CTAs (rows x heads) a launch would leave the
/// GPU under-filled (about one wave of 4 CTAs on 132 SMs), so each row's
/// key list is cut into parts, up to [`MAX_SPLITS`], each part at least
/// [`MIN_SPLIT_BLOCKS`] key blocks of the longest causal row. A pure
/// function of the batch, so that the workspace size needs no GPU. The
/// mask's density is unknown on the host: measured on H100 (512-query
/// chunks, kernels/NOTES.md), 1024 CTAs and 8 blocks per part won 1.3x on
/// dense rows but lost up to 1.5x on 10% rows (parts of about one block,
/// plus the combine); a one-wave target and 16-block parts split less.
const TARGET_CTAS: usize = 512;
const MAX_SPLITS: usize = 16;
const MIN_SPLIT_BLOCKS: usize = 16;

/// Parts each row's key list is split into for `batch` with `hq` heads.
pub fn split_count(batch: &Batch, hq: usize) -> usize {
    let units: usize = batch.seqs(BLOCK).map(|s| s.q_blocks).sum();
    let ctas = units.saturating_mul(hq).max(1);
    if ctas >= TARGET_CTAS {
        return 1;
    }
    let longest = batch.seqs(BLOCK).map(|s| s.k_blocks).max().unwrap_or(1);
    TARGET_CTAS.div_ceil(ctas).min(MAX_SPLITS).min(longest / MIN_SPLIT_BLOCKS).max(1)
}

/// Scratch bytes of the CUDA prefill for `batch` with 16-bit q
/// (`seer_prefill_workspace_size`): the work-item counters
/// ([`SCHEDULE_BYTES`]), then with split-KV each part's f32 output and lse.
/// A smaller workspace is not an error: the call then runs fixed shares of
/// rows (bit for bit the same) and unsplit (same results, less parallelism
/// for few long rows).
pub fn workspace_bytes(batch: &Batch, hq: usize, head_dim: usize) -> usize {
    let splits = split_count(batch, hq);
    if splits == 1 {
        return SCHEDULE_BYTES;
    }
    let rows = batch.total_q() * hq;
    SCHEDULE_BYTES + (splits * rows * head_dim * 4 + splits * rows * 4).div_ceil(256) * 256
}

/// The front of the prefill workspace: one u32 work-item counter per launch
/// of a call (the wgmma kernel's dynamic schedule), zeroed on the stream
/// before the launches. Calls with more launches than counters (batches of
/// more than 64 tables of sequences) take the static schedule for the rest.
const SCHEDULE_BYTES: usize = 256;

/// Scratch bytes of the CUDA prefill for `batch` with q of `q_dtype`
/// (`seer_prefill_workspace_size_dtype`): for f32 q, first its packed copy
/// in K's dtype ([`convert::packed_bytes`], required), then the split-KV
/// parts of [`workspace_bytes`] (optional, as there); for 16-bit q,
/// [`workspace_bytes`].
pub fn workspace_bytes_for(batch: &Batch, hq: usize, head_dim: usize, q_dtype: DType) -> usize {
    q_convert_bytes(batch, hq, head_dim, q_dtype) + workspace_bytes(batch, hq, head_dim)
}

/// The front of the workspace that holds the rounded copy of an f32 q (0 for 16-bit q).
fn q_convert_bytes(batch: &Batch, hq: usize, head_dim: usize, q_dtype: DType) -> usize {
    if q_dtype == DType::F32 {
        convert::packed_bytes([batch.total_q(), hq, head_dim])
    } else {
        0
    }
}

/// `seer::attn::SeqEntry` (also the distillation target's table,
/// src/gpu/distill.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SeqEntry {
    pub q_off: i64,
    pub k_off: i64,
    pub row_base: i64,
    pub unit_base: i64,
    pub q_len: i32,
    pub k_len: i32,
    pub q_start: i32,
    pub first_q_block: i32,
    pub q_blocks: i32,
    pub reserved: i32,
}

/// `seer::attn::SeqTable<S>`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SeqTable<const S: usize> {
    pub num_seqs: i32,
    pub reserved: i32,
    pub seq: [SeqEntry; S],
}

impl<const S: usize> SeqTable<S> {
    /// The table of `seqs` (at most S of them), zero-padded.
    pub fn of(seqs: &[SeqEntry]) -> Self {
        let mut table = SeqTable::<S> { num_seqs: seqs.len() as i32, reserved: 0, seq: [SeqEntry::default(); S] };
        table.seq[..seqs.len()].copy_from_slice(seqs);
        table
    }
}

/// The launches of one batch: sequences in launch order (longest first),
/// cut into tables of at most [`MAX_SEQS`].
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub launches: Vec<Vec<SeqEntry>>,
}

impl Plan {
    pub fn new(batch: &Batch, hq: usize) -> Result<Self> {
        let layout = MaskLayout::new(batch, hq, BLOCK)?;
        let mut seqs: Vec<(usize, SeqEntry)> = batch
            .seqs(BLOCK)
            .enumerate()
            .map(|(s, sq)| {
                let entry = SeqEntry {
                    q_off: sq.q_offset as i64,
                    k_off: sq.k_offset as i64,
                    row_base: layout.row(s, 0, 0) as i64,
                    unit_base: 0,
                    q_len: sq.q_len as i32,
                    k_len: sq.k_len as i32,
                    q_start: sq.q_start as i32,
                    first_q_block: sq.first_q_block as i32,
                    q_blocks: sq.q_blocks as i32,
                    reserved: 0,
                };
                (sq.k_blocks, entry)
            })
            .collect();
        // Longest rows first (stable: equal sequences keep batch order).
        seqs.sort_by_key(|&(k_blocks, _)| std::cmp::Reverse(k_blocks));
        let mut launches = Vec::new();
        for chunk in seqs.chunks(MAX_SEQS) {
            let mut units = 0i64;
            let mut table = Vec::with_capacity(chunk.len());
            for (_, e) in chunk {
                table.push(SeqEntry { unit_base: units, ..*e });
                units += e.q_blocks as i64;
            }
            // The grid's x dimension holds units * hq CTAs.
            if units.checked_mul(hq as i64).map_or(true, |ctas| ctas > i32::MAX as i64) {
                return Err(Error::unsupported(format!(
                    "{units} query blocks x {hq} heads exceed one launch's grid (split the batch)"
                )));
            }
            launches.push(table);
        }
        Ok(Plan { launches })
    }
}

/// Block-sparse causal attention of `batch` on the GPU, enqueued on
/// `stream`. Shapes, dtypes and `params` must already have passed
/// [`crate::attention::sparse_prefill_cuda`]'s checks (the public entry);
/// this checks what the kernel needs of device memory and enqueues it.
///
/// `lse`, when given, is a device address of `hq * total_q` f32 values.
///
/// # Safety
/// The buffers must stay valid until the work completes; `stream` must
/// belong to the context of the buffers (or be NULL, the legacy stream).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sparse_prefill(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    batch: &Batch,
    mask: &DeviceMask,
    params: &AttentionParams,
    out: &DeviceTensor,
    lse: Option<u64>,
    workspace: (u64, usize),
    stream: CUstream,
) -> Result<()> {
    if !cuda::cuda_enabled() {
        return Err(Error::unsupported("this build of seerattn has no CUDA kernels (no nvcc at build time)"));
    }
    let [total_q, hq, d] = q.layout.shape;
    let hkv = k.layout.shape[1];
    if !CUDA_HEAD_DIMS.contains(&d) {
        return Err(Error::unsupported(format!(
            "head_dim {d}: the CUDA prefill is built for {CUDA_HEAD_DIMS:?} (the CPU path takes 256)"
        )));
    }
    let q_f32 = q.dtype == DType::F32;
    for (name, t) in [("q", q), ("k", k), ("v", v), ("out", out)] {
        if !(q_f32 && name == "q") {
            t.check_rows_aligned(name, "the CUDA prefill")?;
        }
    }
    let ctx = cuda::context_of(q.ptr)?;
    for (name, t) in [("q", q), ("k", k), ("v", v), ("out", out)] {
        check_buffer(&ctx, "q", name, t.ptr, t.span_bytes(name)?)?;
    }
    // An f32 q is first rounded to K's dtype into the front of the workspace
    // (kernels/convert.cu); the kernels then read that packed copy, and the
    // split-KV parts take the rest of the workspace.
    let convert_len = q_convert_bytes(batch, hq, d, q.dtype);
    if workspace.1 < convert_len {
        return Err(Error::BufferTooSmall(format!(
            "the workspace holds {} bytes; an f32 q of this batch needs {convert_len} to be rounded to {} \
             (seer_prefill_workspace_size_dtype)",
            workspace.1,
            k.dtype.name()
        )));
    }
    if convert_len > 0 && workspace.0 % 256 != 0 {
        return Err(Error::invalid(
            "with an f32 q the prefill workspace must be 256-byte aligned (cudaMalloc memory is)",
        ));
    }
    check_buffer(&ctx, "q", "workspace", workspace.0, convert_len)?;
    let layout = MaskLayout::new(batch, hq, BLOCK)?;
    let need = [
        ("mask->counts", mask.counts, mask.counts_len, layout.rows(), 4),
        ("mask->row_offsets", mask.row_offsets, mask.row_offsets_len, layout.rows() + 1, 8),
    ];
    for (name, ptr, len, want, size) in need {
        if len < want {
            return Err(Error::BufferTooSmall(format!("{name} holds {len} entries, this batch needs {want}")));
        }
        check_buffer(&ctx, "q", name, ptr, want * size)?;
    }
    check_buffer(&ctx, "q", "mask->indices", mask.indices, mask.indices_len * 4)?;
    if let Some(lse) = lse {
        if lse % 4 != 0 {
            return Err(Error::invalid("lse is not aligned to 4 bytes"));
        }
        check_buffer(&ctx, "q", "lse", lse, hq * total_q * 4)?;
    }

    let plan = Plan::new(batch, hq)?;
    let converted;
    let (q, workspace) = if q_f32 {
        converted = convert::to_16bit(&ctx, "q", "q", q, workspace.0, k.dtype, stream)?;
        (&converted, (workspace.0 + convert_len as u64, workspace.1 - convert_len))
    } else {
        (q, workspace)
    };
    let input = match q.dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => {
            return Err(Error::unsupported(format!("q dtype {}: the CUDA prefill takes bf16 or f16", other.name())))
        }
    };
    let output = if out.dtype == DType::F32 { "f32" } else { input };
    let mut args = AttnArgs {
        q: q.ptr,
        k: k.ptr,
        v: v.ptr,
        out: out.ptr,
        lse: lse.unwrap_or(0),
        q_row_stride: q.layout.strides[0] as i64,
        q_head_stride: q.layout.strides[1] as i64,
        k_row_stride: k.layout.strides[0] as i64,
        k_head_stride: k.layout.strides[1] as i64,
        v_row_stride: v.layout.strides[0] as i64,
        v_head_stride: v.layout.strides[1] as i64,
        o_row_stride: out.layout.strides[0] as i64,
        o_head_stride: out.layout.strides[1] as i64,
        lse_head_stride: total_q as i64,
        counts: mask.counts,
        indices: mask.indices,
        row_offsets: mask.row_offsets,
        counts_len: mask.counts_len as i64,
        indices_len: mask.indices_len as i64,
        row_offsets_len: mask.row_offsets_len as i64,
        scale_log2: params.softmax_scale * std::f32::consts::LOG2_E,
        hq: hq as i32,
        group: (hq / hkv) as i32,
        units: 0,
        tma_token_major: 0,
        splits: 1,
        split_out_stride: 0,
        split_lse_stride: 0,
        ticket: 0,
    };
    // Split-KV into the workspace when the batch has few rows and the
    // workspace holds the parts; then the kernels write f32 parts and a
    // combine launch writes `out` and `lse`.
    // The work-item counters (SCHEDULE_BYTES) when the workspace holds
    // them, then the split-KV parts.
    let splits = split_count(batch, hq);
    let need = workspace_bytes(batch, hq, d);
    let schedule = workspace.1 >= SCHEDULE_BYTES;
    let split = splits > 1 && workspace.1 >= need;
    if schedule {
        check_buffer(&ctx, "q", "workspace", workspace.0, if split { need } else { SCHEDULE_BYTES })?;
        if workspace.0 % 16 != 0 {
            return Err(Error::invalid("the prefill workspace must be 16-byte aligned (cudaMalloc memory is)"));
        }
    }
    if split {
        let parts = workspace.0 + SCHEDULE_BYTES as u64;
        let rows = (total_q * hq) as i64;
        args.out = parts;
        args.o_row_stride = (hq * d) as i64;
        args.o_head_stride = d as i64;
        args.lse = parts + (splits * total_q * hq * d * 4) as u64;
        args.splits = splits as i32;
        args.split_out_stride = rows * d as i64;
        args.split_lse_stride = rows;
    }
    // The attention kernel writes f32 parts when split; the combine writes `out`.
    let kernel_output = if split { "f32" } else { output };
    let kernel = Kernel::choose(&ctx, q, k, v)?;
    let maps = kernel.maps();
    if let Kernel::Tma(m) | Kernel::Wgmma(m) = &kernel {
        args.tma_token_major = m.token_major.iter().enumerate().map(|(i, &t)| (t as i32) << i).sum();
    }
    // The mma.sync kernels keep one Q, one K and one V tile of 64 rows in
    // shared memory (TMA: aligned to 1024 bytes, three mbarriers after it);
    // the wgmma kernel a Q tile and a ring of wgmma_slots(d) K and V tiles
    // per consumer warpgroup (WGMMA_CONSUMERS), and 8-byte mbarriers and an
    // item word per consumer (kernels/attention_sm90.cu).
    let tile = (BLOCK * d * 2) as u32;
    let fatbin = kernels::fatbin(kernel.file())?;
    let (threads, smem) = match &kernel {
        Kernel::CpAsync => (128, 3 * tile),
        Kernel::Tma(_) => (64, 3 * tile + 1024 + 64),
        Kernel::Wgmma(_) => {
            let slots = wgmma_slots(d) as u32;
            let c = WGMMA_CONSUMERS as u32;
            (128 * (1 + c), c * (1 + slots) * tile + 1024 + c * 8 * (3 + 2 * slots))
        }
    };
    let counters = SCHEDULE_BYTES / 4;
    let scheduled = schedule && matches!(kernel, Kernel::Wgmma(_));
    if scheduled {
        // The counters the launches use start at 0: zeroed by a kernel on the
        // caller's stream (kernels/attention.cu), before the launches.
        let f = cuda::function(&ctx, kernels::fatbin("attention")?, "seer_attn_zero_counters")?;
        let (mut ptr, mut n) = (workspace.0, counters.min(plan.launches.len()) as i32);
        let mut params: [*mut c_void; 2] = [(&mut ptr as *mut u64).cast(), (&mut n as *mut i32).cast()];
        // SAFETY: the workspace was checked to be device memory of this
        // context holding SCHEDULE_BYTES; the parameters match the kernel's.
        unsafe { cuda::launch(f, [1, 1, 1], [64, 1, 1], 0, stream, &mut params)? };
    }
    for (i, table) in plan.launches.iter().enumerate() {
        args.ticket = if scheduled && i < counters { workspace.0 + 4 * i as u64 } else { 0 };
        let units: i64 = table.iter().map(|e| e.q_blocks as i64).sum();
        let items = units * hq as i64 * args.splits as i64;
        // One CTA per item, or for the persistent wgmma kernel one per SM
        // (three items at a time: one per consumer warpgroup), fewer when
        // the launch has fewer items.
        let ctas = match &kernel {
            Kernel::Wgmma(_) => {
                let c = WGMMA_CONSUMERS as i64;
                ((items + c - 1) / c).min(ctx.sm_count().max(1) as i64)
            }
            _ => items,
        };
        let grid = [ctas as u32, 1, 1];
        args.units = units as i32;
        let name = |s: usize| match &kernel {
            Kernel::CpAsync => format!("seer_attn_fwd_d{d}_m1n1_{input}_{kernel_output}_s{s}"),
            Kernel::Tma(_) => format!("seer_attn_fwd_tma_k1_d{d}_m2n1_{input}_{kernel_output}_s{s}"),
            Kernel::Wgmma(_) => format!("seer_attn_fwd_wgmma_d{d}_{input}_{kernel_output}_s{s}"),
        };
        if table.len() <= SMALL_SEQS {
            let f = cuda::function(&ctx, fatbin, &name(SMALL_SEQS))?;
            launch::<SMALL_SEQS>(f, table, &mut args, maps.as_ref(), grid, threads, smem, stream)?;
        } else {
            let f = cuda::function(&ctx, fatbin, &name(MAX_SEQS))?;
            launch::<MAX_SEQS>(f, table, &mut args, maps.as_ref(), grid, threads, smem, stream)?;
        }
    }
    if split {
        let mut c = CombineArgs {
            parts: args.out,
            part_lse: args.lse,
            out: out.ptr,
            lse: lse.unwrap_or(0),
            o_row_stride: out.layout.strides[0] as i64,
            o_head_stride: out.layout.strides[1] as i64,
            total_q: total_q as i64,
            hq: hq as i32,
            splits: splits as i32,
        };
        // The combine kernel lives beside the mma.sync kernels.
        let f = cuda::function(&ctx, kernels::fatbin("attention")?, &format!("seer_attn_combine_d{d}_{output}"))?;
        // One warp per (token, head), 8 warps per CTA.
        let grid = [(total_q * hq).div_ceil(8) as u32, 1, 1];
        let mut params: [*mut c_void; 1] = [(&mut c as *mut CombineArgs).cast()];
        cuda::launch(f, grid, [256, 1, 1], 0, stream, &mut params)?;
    }
    Ok(())
}

/// Consumer warpgroups per CTA of the wgmma kernel (`kConsumers` in
/// kernels/attention_sm90.cu).
const WGMMA_CONSUMERS: usize = 3;

/// Tiles in a consumer's K/V ring of the wgmma kernel (`Shape<D>::kSlots`
/// in kernels/attention_sm90.cu): four at head_dim 64, three at 128 (what
/// three consumers' Q and rings can have of 227 KB).
fn wgmma_slots(d: usize) -> usize {
    if d == 64 {
        4
    } else {
        3
    }
}

/// Q, K and V tensor maps of the TMA-fed kernels.
#[derive(Clone, Copy)]
struct Maps {
    maps: [TensorMap; 3],
    /// Per tensor: coordinates (dim, token, head) rather than (dim, head, token).
    token_major: [bool; 3],
}

/// Which kernel runs: on compute capability 9.0 the wgmma kernel
/// (kernels/attention_sm90.cu, built for sm_90a only); on later GPUs the
/// mma.sync kernel with TMA copies; both when the driver accepts tensor maps
/// of q, k and v (it may refuse unusual strides); else the cp.async kernel.
#[allow(clippy::large_enum_variant)] // one value per call, on the stack
enum Kernel {
    /// 4 warps of 16 rows, cp.async copies (sm_80 and later).
    CpAsync,
    /// 2 warps of 32 rows, one K buffer (kernels/NOTES.md: two spilled).
    Tma(Maps),
    /// Persistent, a producer and three consumer warpgroups.
    Wgmma(Maps),
}

impl Kernel {
    fn choose(ctx: &Ctx, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor) -> Result<Kernel> {
        let cc = ctx.compute_capability();
        let forced = kernel_override();
        if cc.0 < 9 || forced == Some("cpasync") {
            return Ok(Kernel::CpAsync);
        }
        let map = |t: &DeviceTensor| {
            let [row, head, _] = t.layout.strides;
            tma::map_3d(ctx, t.ptr, t.dtype, t.layout.shape, row, head, BLOCK as u32, 64)
        };
        // A layout the driver will not map (None) takes the cp.async kernel;
        // any other driver error is an error.
        let (Some(mq), Some(mk), Some(mv)) = (map(q)?, map(k)?, map(v)?) else {
            return Ok(Kernel::CpAsync);
        };
        let maps = Maps { maps: [mq.0, mk.0, mv.0], token_major: [mq.1, mk.1, mv.1] };
        // sm_90a machine code runs on 9.0 only; the wgmma kernel has no PTX.
        Ok(if cc == (9, 0) && forced != Some("tma") { Kernel::Wgmma(maps) } else { Kernel::Tma(maps) })
    }

    fn name(&self) -> &'static str {
        match self {
            Kernel::CpAsync => "cpasync",
            Kernel::Tma(_) => "tma",
            Kernel::Wgmma(_) => "wgmma",
        }
    }

    /// The kernels/ file (fatbin) it lives in.
    fn file(&self) -> &'static str {
        match self {
            Kernel::Wgmma(_) => "attention_sm90",
            _ => "attention",
        }
    }

    fn maps(&self) -> Option<[TensorMap; 3]> {
        match self {
            Kernel::CpAsync => None,
            Kernel::Tma(m) | Kernel::Wgmma(m) => Some(m.maps),
        }
    }
}

/// The kernel [`sparse_prefill`] would launch for these tensors on `ctx`:
/// `"wgmma"` (compute capability 9.0), `"tma"` (later GPUs) or `"cpasync"`
/// (sm_80, or tensors the driver will not map). For tests, which must know
/// which path they exercised.
pub fn selected_kernel(ctx: &Ctx, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor) -> Result<&'static str> {
    Ok(Kernel::choose(ctx, q, k, v)?.name())
}

/// `SEERATTN_PREFILL_KERNEL=tma` or `=cpasync` forces that kernel on Hopper
/// (to compare them in one run, and to test each there); read once.
fn kernel_override() -> Option<&'static str> {
    static KERNEL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    KERNEL.get_or_init(|| std::env::var("SEERATTN_PREFILL_KERNEL").ok()).as_deref()
}

#[allow(clippy::too_many_arguments)]
unsafe fn launch<const S: usize>(
    f: cuda::CUfunction,
    seqs: &[SeqEntry],
    args: &mut AttnArgs,
    maps: Option<&[TensorMap; 3]>,
    grid: [u32; 3],
    threads: u32,
    smem: u32,
    stream: CUstream,
) -> Result<()> {
    let with_maps = maps.is_some();
    let mut table = SeqTable::<S>::of(seqs);
    let mut maps = maps.copied().unwrap_or([TensorMap([0; 16]); 3]);
    let [mq, mk, mv] = &mut maps;
    let mut params: [*mut c_void; 5] = [
        (args as *mut AttnArgs).cast(),
        (&mut table as *mut SeqTable<S>).cast(),
        (mq as *mut TensorMap).cast(),
        (mk as *mut TensorMap).cast(),
        (mv as *mut TensorMap).cast(),
    ];
    // The cp.async kernels take the first two.
    let count = if with_maps { 5 } else { 2 };
    cuda::launch(f, grid, [threads, 1, 1], smem, stream, &mut params[..count])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernel_header() {
        // kernels/attention.cuh static_asserts the same sizes.
        assert_eq!(std::mem::size_of::<AttnArgs>(), 208);
        assert_eq!(std::mem::size_of::<CombineArgs>(), 64);
        assert_eq!(std::mem::size_of::<SeqEntry>(), 56);
        assert_eq!(std::mem::size_of::<SeqTable<16>>(), 8 + 16 * 56);
        assert!(std::mem::size_of::<SeqTable<MAX_SEQS>>() + std::mem::size_of::<AttnArgs>() < 32 * 1024);
    }

    #[test]
    fn plan_orders_longest_first_and_numbers_units() {
        let batch = Batch::from_lens(&[(100, 100), (1000, 1000), (64, 700)]).unwrap();
        let plan = Plan::new(&batch, 4).unwrap();
        assert_eq!(plan.launches.len(), 1);
        let t = &plan.launches[0];
        // k_blocks: 2, 16, 11 -> order 1, 2, 0.
        assert_eq!(t.iter().map(|e| e.k_len).collect::<Vec<_>>(), [1000, 700, 100]);
        // Units: 16 blocks, then seq 2's q blocks (700 - 64 = 636 -> blocks 9..=10: 2), then 2.
        assert_eq!(t.iter().map(|e| e.unit_base).collect::<Vec<_>>(), [0, 16, 18]);
        assert_eq!((t[1].first_q_block, t[1].q_blocks, t[1].q_start), (9, 2, 636));
        // Mask rows keep batch order: seq 0 has 4 heads * 2 blocks.
        assert_eq!(t[2].row_base, 0);
        assert_eq!(t[0].row_base, 8);
        assert_eq!(t[1].row_base, 8 + 4 * 16);
    }

    #[test]
    fn split_kv_only_for_few_long_rows() {
        // 32k tokens x 32 heads: 16384 CTAs, no split; the workspace holds
        // only the work-item counters.
        let long = Batch::single(32768).unwrap();
        assert_eq!((split_count(&long, 32), workspace_bytes(&long, 32, 128)), (1, SCHEDULE_BYTES));
        // A 512-token chunk over 32k keys: 8 query blocks x 32 heads = 256
        // CTAs -> 2 parts; workspace: the counters, then 2 parts of 512 x 32
        // rows of 128 + 1 floats.
        let chunk = Batch::from_lens(&[(512, 32768)]).unwrap();
        assert_eq!(split_count(&chunk, 32), 2);
        assert_eq!(workspace_bytes(&chunk, 32, 128), SCHEDULE_BYTES + 2 * 512 * 32 * 129 * 4);
        // Short rows are not split (each part would get under 16 key blocks).
        let short = Batch::from_lens(&[(64, 1000)]).unwrap();
        assert_eq!(split_count(&short, 2), 1);
        // At most 16 parts.
        let tiny = Batch::from_lens(&[(1, 1 << 20)]).unwrap();
        assert_eq!(split_count(&tiny, 1), 16);
    }

    #[test]
    fn plan_splits_large_batches() {
        let lens: Vec<(usize, usize)> = (0..MAX_SEQS * 2 + 3).map(|i| (1 + i % 70, 1 + i % 70)).collect();
        let plan = Plan::new(&Batch::from_lens(&lens).unwrap(), 2).unwrap();
        assert_eq!(plan.launches.iter().map(Vec::len).collect::<Vec<_>>(), [MAX_SEQS, MAX_SEQS, 3]);
        for t in &plan.launches {
            assert_eq!(t[0].unit_base, 0);
        }
    }
}
