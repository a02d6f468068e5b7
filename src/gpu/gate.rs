//! Host side of `kernels/gate.cu`: the gate on the GPU.
//!
//! [`GatePlan`] turns a batch into the per-sequence table the kernels take
//! by value, the scratch layout inside the caller's workspace, and the grids
//! of the launches; [`DeviceGate`] holds a gate's weights on the device
//! (uploaded once); [`compute_mask`] validates device buffers and enqueues
//! pool -> project -> logits -> select on the caller's stream (for the
//! threshold rule on long rows, logits -> select is kernels/gate_select.cu's
//! log-sum-exp pass -> kept-bit pass -> compaction). Nothing here allocates,
//! copies between host and device, or synchronizes once the weights are up.
//!
//! Chunked prefill without the pre-RoPE keys of earlier chunks: a K-block
//! cache per (layer, sequence slot) holds the gate's K side (projected,
//! rotated `k_gate` rows of every block, and the f32 max/min/sum of the
//! trailing partial block; layout in kernels/gate.cuh, size from
//! [`kblock_cache_bytes`]). Per chunk, [`update_kblock_cache`] pools only
//! the chunk's new keys (packed like Q) into the caches, then
//! [`compute_mask_cached`] pools Q and selects against the caches. Same
//! workspace size as [`compute_mask`] for the same batch. The masks equal the
//! one-shot path's over all keys bit for bit, also when a block is split
//! across chunks: the cache's pool continues the cached f32 partial sums in
//! the one-shot pool's token order (tests/gpu_gate.rs asserts it).
//!
//! Scope of this path: the released gate type (`Qavg_Kmaxminavg`, no Q
//! projection, `gate_hidden == head_dim`), head_dim 64 or 128, bf16/f16
//! inputs whose rows are 16-byte aligned, up to [`MAX_SEQS`] sequences.
//! Anything else is `Unsupported` with the reason; the CPU reference covers it.

use super::{check_buffer, convert};
pub use super::{DeviceMask, DeviceTensor};

/// The context every buffer of a gate call must belong to, as messages name it.
const WEIGHTS_CONTEXT: &str = "the one the gate's weights were uploaded to";
use crate::batch::Batch;
use crate::config::{EmptyRowPolicy, GateConfig, GateType, MaskParams, SparsityMethod, ThresholdCompare};
use crate::cuda::{self, kernels, CUfunction, CUstream, Ctx, DeviceBuffer};
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::mask::MaskLayout;
use crate::tensor::DType;
use std::ffi::c_void;

/// Sequences one launch can carry in its parameter table.
pub const MAX_SEQS: usize = 256;
/// Table capacity of the small kernel variants (less parameter space per launch).
const SMALL_SEQS: usize = 16;
const BLOCK: usize = 64;
const THREADS: u32 = 128;
/// Threads of the pool kernel (`kPoolThreads` in kernels/gate.cu).
const POOL_THREADS: u32 = 256;
/// Rows of a tensor-core tile (one warp's rows in the logits kernel).
const TILE: usize = 16;
/// Rows of the projection and threshold-select tiles: those kernels read up
/// to this many rows past a sequence's last block, so scratch keeps this much
/// zeroed padding after the last sequence.
const WIDE_TILE: usize = 64;

/// One sequence, as `seer::SeqEntry` in kernels/gate.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SeqEntry {
    q_off: i64,
    k_off: i64,
    kblock_base: i64,
    qblock_base: i64,
    row_base: i64,
    slot_base: i64,
    k_gate: u64,
    kv_state: u64,
    q_len: i32,
    k_len: i32,
    q_start: i32,
    k_blocks: i32,
    first_q_block: i32,
    q_blocks: i32,
}

/// `seer::SeqTable<S>`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SeqTable<const S: usize> {
    total_q_blocks: i64,
    num_seqs: i32,
    reserved: i32,
    seq: [SeqEntry; S],
}

/// `seer::GateArgs`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct GateArgs {
    q: u64,
    k: u64,
    q_row_stride: i64,
    q_head_stride: i64,
    k_row_stride: i64,
    k_head_stride: i64,
    q_gate: u64,
    pooled_k: u64,
    k_gate: u64,
    rope: u64,
    state_staging: u64,
    weights: u64,
    counts: u64,
    indices: u64,
    row_offsets: u64,
    q_gate_rows: i64,
    kblock_rows: i64,
    kblock_rows_padded: i64,
    total_rows: i64,
    total_slots: i64,
    topk_ratio: f64,
    inv_freq: [f64; 128],
    hq: i32,
    hkv: i32,
    group: i32,
    method: i32,
    threshold: f32,
    scale: f32,
    threshold_bf16: i32,
    keep_diagonal: i32,
    last_block_dense: i32,
    reserved: i32,
    k_gate_head_stride: i64,
    k_gate_row_stride: i64,
}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Check that a gate config is one the GPU path implements.
pub fn check_supported(config: &GateConfig) -> Result<()> {
    if config.gate_type != GateType::released() || config.has_q_proj() {
        return Err(Error::unsupported(format!(
            "the CUDA gate implements {} without a Q projection (gate_hidden == head_dim); this gate is {} \
             with gate_hidden {} and head_dim {} (use host buffers for the CPU reference)",
            GateType::released().name(),
            config.gate_type.name(),
            config.gate_hidden,
            config.head_dim
        )));
    }
    if !matches!(config.head_dim, 64 | 128) {
        return Err(Error::unsupported(format!("the CUDA gate supports head_dim 64 and 128, not {}", config.head_dim)));
    }
    Ok(())
}

/// Everything about one batch that the gate launches need.
#[derive(Clone, Debug)]
pub struct GatePlan {
    seqs: Vec<SeqEntry>,
    total_q_blocks: usize,
    kblock_rows: usize,
    kblock_rows_padded: usize,
    q_gate_rows: usize,
    max_q_blocks: usize,
    max_k_blocks: usize,
    total_rows: usize,
    total_slots: usize,
    q_gate_offset: usize,
    pooled_k_offset: usize,
    k_gate_offset: usize,
    rope_offset: usize,
    staging_offset: usize,
    /// The threshold rule's per-(row, key chunk) partial max and sum
    /// (kernels/gate_select.cu): float2 [hq][q_gate_rows][threshold_chunks].
    partials_offset: usize,
    threshold_chunks: usize,
    workspace_bytes: usize,
}

impl GatePlan {
    /// Plan the gate of `config` over `batch`.
    pub fn new(config: &GateConfig, batch: &Batch) -> Result<Self> {
        check_supported(config)?;
        if batch.len() > MAX_SEQS {
            return Err(Error::unsupported(format!(
                "the CUDA gate takes at most {MAX_SEQS} sequences per call, this batch has {} (split it)",
                batch.len()
            )));
        }
        let (d, hq, hkv) = (config.head_dim, config.num_q_heads, config.num_kv_heads);
        let layout = MaskLayout::new(batch, hq, BLOCK)?;
        let offsets = layout.row_offsets();
        let mut seqs = Vec::with_capacity(batch.len());
        let (mut kblocks, mut qblocks) = (0usize, 0usize);
        let (mut max_q_blocks, mut max_k_blocks) = (0usize, 0usize);
        for (s, sq) in batch.seqs(BLOCK).enumerate() {
            let first_row = layout.row(s, 0, 0);
            seqs.push(SeqEntry {
                q_off: sq.q_offset as i64,
                k_off: sq.k_offset as i64,
                kblock_base: kblocks as i64,
                qblock_base: qblocks as i64,
                row_base: first_row as i64,
                slot_base: offsets[first_row],
                // Set at launch: the workspace's k_gate or the sequence's cache.
                k_gate: 0,
                kv_state: 0,
                q_len: sq.q_len as i32,
                k_len: sq.k_len as i32,
                q_start: sq.q_start as i32,
                k_blocks: sq.k_blocks as i32,
                first_q_block: sq.first_q_block as i32,
                q_blocks: sq.q_blocks as i32,
            });
            kblocks += sq.k_blocks;
            qblocks += sq.q_blocks;
            max_q_blocks = max_q_blocks.max(sq.q_blocks);
            max_k_blocks = max_k_blocks.max(sq.k_blocks);
        }
        let kblock_rows_padded = align_up(kblocks + WIDE_TILE, WIDE_TILE);
        let q_gate_rows = qblocks + WIDE_TILE;
        let q_gate_offset = 0;
        let pooled_k_offset = align_up(q_gate_offset + hq * q_gate_rows * d * 2, 256);
        let k_gate_offset = align_up(pooled_k_offset + kblock_rows_padded * hkv * 3 * d * 2, 256);
        let rope_offset = align_up(k_gate_offset + hq * kblock_rows_padded * d * 2, 256);
        // K-block cache updates stage each sequence's new partial-block state here.
        let staging_offset = align_up(rope_offset + max_k_blocks * (d / 2) * 8, 256);
        let partials_offset = align_up(staging_offset + batch.len() * hkv * 3 * d * 4, 256);
        let threshold_chunks = max_k_blocks.div_ceil(WIDE_TILE * THRESHOLD_CHUNK_TILES).max(1);
        let workspace_bytes = align_up(partials_offset + hq * q_gate_rows * threshold_chunks * 8, 256);
        Ok(GatePlan {
            seqs,
            total_q_blocks: qblocks,
            kblock_rows: kblocks,
            kblock_rows_padded,
            q_gate_rows,
            max_q_blocks,
            max_k_blocks,
            total_rows: layout.rows(),
            total_slots: layout.index_capacity(),
            q_gate_offset,
            pooled_k_offset,
            k_gate_offset,
            rope_offset,
            staging_offset,
            partials_offset,
            threshold_chunks,
            workspace_bytes,
        })
    }

    /// Scratch bytes the caller's workspace must hold for 16-bit inputs.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace_bytes
    }
    /// Sequences of the batch.
    pub(crate) fn num_seqs(&self) -> usize {
        self.seqs.len()
    }
    /// Mask rows and index slots of the batch.
    pub(crate) fn rows_and_slots(&self) -> (usize, usize) {
        (self.total_rows, self.total_slots)
    }
    /// Key-block rows of the batch (all sequences) and the most of one sequence.
    pub(crate) fn kblock_rows(&self) -> (usize, usize) {
        (self.kblock_rows, self.max_k_blocks)
    }

    /// Scratch bytes for inputs of `dtype` (`seer_gate_workspace_size_dtype`):
    /// for f32 inputs, [`Self::workspace_bytes`] followed by their bf16 copies
    /// (kernels/convert.cu): q_nope `[total_q, hq, d]`, then k_nope
    /// `[total_k, hkv, d]`. What `compute_mask` with keys uses; with K-block
    /// caches only the q copy is used, and a cache update's `k_new`
    /// `[total_q, hkv, d]` goes where the q copy would, so this size serves
    /// all three calls.
    pub fn workspace_bytes_for(&self, config: &GateConfig, batch: &Batch, dtype: DType) -> usize {
        self.workspace_bytes + self.convert_bytes(config, batch, dtype, true)
    }

    /// The conversion part of the workspace: the q copy (or k_new's, which is
    /// smaller), plus the k copy when `with_keys`.
    fn convert_bytes(&self, config: &GateConfig, batch: &Batch, dtype: DType, with_keys: bool) -> usize {
        if dtype != DType::F32 {
            return 0;
        }
        let (d, hq, hkv) = (config.head_dim, config.num_q_heads, config.num_kv_heads);
        let q = convert::packed_bytes([batch.total_q(), hq, d]);
        let k = if with_keys { convert::packed_bytes([batch.total_k(), hkv, d]) } else { 0 };
        q + k
    }

    pub(crate) fn table<const S: usize>(&self) -> SeqTable<S> {
        let mut seq = [SeqEntry::default(); S];
        seq[..self.seqs.len()].copy_from_slice(&self.seqs);
        SeqTable { total_q_blocks: self.total_q_blocks as i64, num_seqs: self.seqs.len() as i32, reserved: 0, seq }
    }
}

/// A gate's weights on one CUDA context: per layer `mask_linear_k` in bf16
/// `[hq][3D][D]`, uploaded once (synchronously, outside any hot path).
pub struct DeviceGate {
    ctx: Ctx,
    layers: Vec<Option<DeviceBuffer>>,
}

impl DeviceGate {
    /// Upload every layer that has weights to `ctx`.
    pub fn upload(gate: &Gate, ctx: &Ctx) -> Result<Self> {
        check_supported(gate.config())?;
        let mut layers = Vec::with_capacity(gate.config().num_layers);
        for layer in 0..gate.config().num_layers {
            if !gate.has_layer(layer) {
                layers.push(None);
                continue;
            }
            let w = &gate.layer(layer)?.k_proj;
            let bytes: Vec<u8> = w.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
            layers.push(Some(DeviceBuffer::upload(ctx, &bytes)?));
        }
        Ok(DeviceGate { ctx: *ctx, layers })
    }

    /// The context the weights live in.
    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    pub(crate) fn layer(&self, layer: usize) -> Result<u64> {
        match self.layers.get(layer) {
            Some(Some(b)) => Ok(b.ptr()),
            Some(None) => Err(Error::invalid(format!(
                "layer {layer} had no weights when the gate was uploaded to the device (upload again after setting them)"
            ))),
            None => Err(Error::invalid(format!("layer {layer} out of range (the gate has {} layers)", self.layers.len()))),
        }
    }
}

/// Bytes of one K-block cache (one layer, one sequence slot) able to hold
/// `max_tokens` tokens of a sequence, for the gate of `config`. The layout
/// (documented in kernels/gate.cuh, "The K-block cache") does not depend on
/// the capacity: a cache holds any sequence of at most `max_tokens` tokens.
/// Allocate it 256-byte aligned (cudaMalloc memory is); it needs no zeroing.
pub fn kblock_cache_bytes(config: &GateConfig, max_tokens: usize) -> Result<usize> {
    check_supported(config)?;
    let (d, hq) = (config.head_dim, config.num_q_heads);
    let blocks = align_up(max_tokens.div_ceil(BLOCK), WIDE_TILE);
    blocks
        .checked_mul(hq * d * 2)
        .and_then(|rows| rows.checked_add(kblock_state_bytes(config)))
        .ok_or_else(|| Error::invalid(format!("a K-block cache of {max_tokens} tokens overflows the address space")))
}

/// Bytes of the partial-block state at the start of a K-block cache.
fn kblock_state_bytes(config: &GateConfig) -> usize {
    align_up(config.num_kv_heads * 3 * config.head_dim * 4, 256)
}

/// Where the logits kernel finds each sequence's K side.
#[derive(Clone, Copy)]
enum KSide<'a> {
    /// Pre-RoPE keys of every position: pooled and projected into the workspace.
    Keys(&'a DeviceTensor),
    /// One K-block cache per sequence, already updated with this batch.
    Caches(&'a [u64]),
}

/// A pre-RoPE Q or K tensor the pool kernels read: dtype, shape, 16-byte
/// rows, device memory of the weights' context.
/// An f32 input is checked by the conversion (4-byte alignment, any
/// strides) and rounded to bf16 before the pool kernels see it.
fn check_input(device: &DeviceGate, name: &str, t: &DeviceTensor, tokens: usize, heads: usize, d: usize) -> Result<()> {
    if t.layout.shape != [tokens, heads, d] {
        return Err(Error::invalid(format!(
            "{name}: shape {:?}, expected {:?} ([tokens, heads, head_dim] for this batch and gate)",
            t.layout.shape,
            [tokens, heads, d]
        )));
    }
    if t.dtype == DType::F32 {
        return Ok(());
    }
    t.check_rows_aligned(name, "the CUDA gate")?;
    check_buffer(device.ctx(), WEIGHTS_CONTEXT, name, t.ptr, t.span_bytes(name)?)
}

/// The bf16 copies of f32 inputs, in the workspace after the plan's
/// scratch (see [`GatePlan::workspace_bytes_for`]); 16-bit inputs are
/// returned as they are. Checks that the workspace holds the copies.
///
/// # Safety
/// As [`compute_mask`].
#[allow(clippy::too_many_arguments)]
unsafe fn rounded_inputs(
    config: &GateConfig,
    device: &DeviceGate,
    plan: &GatePlan,
    batch: &Batch,
    inputs: [Option<(&str, &DeviceTensor)>; 2],
    workspace: u64,
    workspace_len: usize,
    stream: CUstream,
) -> Result<[Option<DeviceTensor>; 2]> {
    let f32_inputs = inputs.iter().flatten().filter(|(_, t)| t.dtype == DType::F32).count();
    let mut out = [None, None];
    if f32_inputs == 0 {
        for (o, i) in out.iter_mut().zip(inputs) {
            *o = i.map(|(_, t)| *t);
        }
        return Ok(out);
    }
    let with_keys = inputs[1].is_some_and(|(name, _)| name == "k_nope");
    let need = plan.workspace_bytes + plan.convert_bytes(config, batch, DType::F32, with_keys);
    if workspace_len < need {
        return Err(Error::BufferTooSmall(format!(
            "workspace holds {workspace_len} bytes; with f32 inputs this batch needs {need} \
             (seer_gate_workspace_size_dtype with SEER_DTYPE_F32)"
        )));
    }
    check_buffer(device.ctx(), WEIGHTS_CONTEXT, "workspace", workspace, need)?;
    let mut at = workspace + plan.workspace_bytes as u64;
    for (o, i) in out.iter_mut().zip(inputs) {
        let Some((name, t)) = i else { continue };
        *o = Some(if t.dtype == DType::F32 {
            let packed = convert::to_16bit(device.ctx(), WEIGHTS_CONTEXT, name, t, at, DType::BF16, stream)?;
            at += convert::packed_bytes(t.layout.shape) as u64;
            packed
        } else {
            *t
        });
    }
    Ok(out)
}

/// One K-block cache per sequence, each 256-byte aligned device memory of
/// the weights' context, large enough for its sequence's `k_len` tokens, no
/// two the same.
fn check_caches(config: &GateConfig, device: &DeviceGate, batch: &Batch, caches: &[u64]) -> Result<()> {
    if caches.len() != batch.len() {
        return Err(Error::invalid(format!(
            "{} K-block caches for a batch of {} sequences (one per sequence, in batch order)",
            caches.len(),
            batch.len()
        )));
    }
    for (s, (&ptr, sq)) in caches.iter().zip(batch.seqs(BLOCK)).enumerate() {
        let name = format!("K-block cache of sequence {s}");
        if ptr == 0 || ptr % 256 != 0 {
            return Err(Error::invalid(format!("{name} ({ptr:#x}) is null or not 256-byte aligned")));
        }
        check_buffer(device.ctx(), WEIGHTS_CONTEXT, &name, ptr, kblock_cache_bytes(config, sq.k_len)?)?;
    }
    let mut sorted = caches.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::invalid(format!("the K-block cache {:#x} is given to two sequences of the batch", w[0])));
    }
    Ok(())
}

fn check_workspace(plan: &GatePlan, workspace: u64, workspace_len: usize) -> Result<()> {
    if workspace_len < plan.workspace_bytes {
        return Err(Error::BufferTooSmall(format!(
            "workspace holds {workspace_len} bytes, this batch needs {} (seer_gate_workspace_size)",
            plan.workspace_bytes
        )));
    }
    if workspace % 256 != 0 {
        return Err(Error::invalid("workspace must be 256-byte aligned (cudaMalloc memory is)"));
    }
    cuda::check_device_pointer("workspace", workspace, plan.workspace_bytes)
}

impl GatePlan {
    /// Point every sequence's k_gate at the workspace (one-shot gate).
    fn use_workspace_k_gate(&mut self, workspace: u64, d: usize) {
        let base = workspace + self.k_gate_offset as u64;
        for e in &mut self.seqs {
            e.k_gate = base + (e.kblock_base as u64) * (d as u64) * 2;
            e.kv_state = 0;
        }
    }

    /// Point every sequence's k_gate and partial state at its K-block cache.
    fn use_caches(&mut self, config: &GateConfig, caches: &[u64]) {
        let state = kblock_state_bytes(config) as u64;
        for (e, &cache) in self.seqs.iter_mut().zip(caches) {
            e.k_gate = cache + state;
            e.kv_state = cache;
        }
    }
}

impl GateArgs {
    /// The arguments every launch shares; the mask and selection fields are
    /// zero (the K-block cache update selects nothing).
    fn new(config: &GateConfig, plan: &GatePlan, workspace: u64, weights: u64) -> Self {
        let (d, hq, hkv) = (config.head_dim, config.num_q_heads, config.num_kv_heads);
        let mut inv_freq = [0f64; 128];
        inv_freq[..d / 2].copy_from_slice(&config.rope.inv_freq(d));
        GateArgs {
            q: 0,
            k: 0,
            q_row_stride: 0,
            q_head_stride: 0,
            k_row_stride: 0,
            k_head_stride: 0,
            q_gate: workspace + plan.q_gate_offset as u64,
            pooled_k: workspace + plan.pooled_k_offset as u64,
            k_gate: workspace + plan.k_gate_offset as u64,
            rope: workspace + plan.rope_offset as u64,
            state_staging: workspace + plan.staging_offset as u64,
            weights,
            counts: 0,
            indices: 0,
            row_offsets: 0,
            q_gate_rows: plan.q_gate_rows as i64,
            kblock_rows: plan.kblock_rows as i64,
            kblock_rows_padded: plan.kblock_rows_padded as i64,
            total_rows: plan.total_rows as i64,
            total_slots: plan.total_slots as i64,
            topk_ratio: 0.0,
            inv_freq,
            hq: hq as i32,
            hkv: hkv as i32,
            group: (hq / hkv) as i32,
            method: 0,
            threshold: 0.0,
            scale: 1.0 / (config.gate_hidden as f32).sqrt(),
            threshold_bf16: 0,
            keep_diagonal: 0,
            last_block_dense: 0,
            reserved: 0,
            k_gate_head_stride: (plan.kblock_rows_padded * d) as i64,
            k_gate_row_stride: d as i64,
        }
    }
}

/// Enqueue the gate of `layer` on `stream`: validate every device buffer
/// (shapes, dtypes, sizes, that each pointer is device memory of the weights'
/// context), then launch pool, project and select. Asynchronous.
///
/// # Safety
/// The device buffers must stay valid until the work completes, and `stream`
/// must belong to the weights' context (or be NULL).
#[allow(clippy::too_many_arguments)]
pub unsafe fn compute_mask(
    gate: &Gate,
    device: &DeviceGate,
    layer: usize,
    params: &MaskParams,
    batch: &Batch,
    q: &DeviceTensor,
    k: &DeviceTensor,
    mask: &DeviceMask,
    workspace: u64,
    workspace_len: usize,
    stream: CUstream,
) -> Result<()> {
    compute(gate, device, layer, params, batch, q, KSide::Keys(k), mask, workspace, workspace_len, stream)
}

/// [`compute_mask`] with the K side read from K-block caches instead of
/// pooled from pre-RoPE keys: `caches[s]` is sequence `s`'s cache for this
/// layer (see [`kblock_cache_bytes`]), already brought up to the batch's
/// `k_len` by [`update_kblock_cache`] (with this batch, for this layer).
/// Only Q is pooled; K is neither read nor needed. The workspace is sized
/// as for [`compute_mask`] ([`GatePlan::workspace_bytes`]).
///
/// # Safety
/// As [`compute_mask`]; in addition each cache must hold the K side of its
/// sequence's first `k_len` tokens (the GPU cannot check that).
#[allow(clippy::too_many_arguments)]
pub unsafe fn compute_mask_cached(
    gate: &Gate,
    device: &DeviceGate,
    layer: usize,
    params: &MaskParams,
    batch: &Batch,
    q: &DeviceTensor,
    caches: &[u64],
    mask: &DeviceMask,
    workspace: u64,
    workspace_len: usize,
    stream: CUstream,
) -> Result<()> {
    compute(gate, device, layer, params, batch, q, KSide::Caches(caches), mask, workspace, workspace_len, stream)
}

#[allow(clippy::too_many_arguments)]
unsafe fn compute(
    gate: &Gate,
    device: &DeviceGate,
    layer: usize,
    params: &MaskParams,
    batch: &Batch,
    q: &DeviceTensor,
    kside: KSide,
    mask: &DeviceMask,
    workspace: u64,
    workspace_len: usize,
    stream: CUstream,
) -> Result<()> {
    let config = gate.config();
    params.validate()?;
    let mut plan = GatePlan::new(config, batch)?;
    let weights = device.layer(layer)?;
    let (d, hq, hkv) = (config.head_dim, config.num_q_heads, config.num_kv_heads);

    check_input(device, "q_nope", q, batch.total_q(), hq, d)?;
    match kside {
        KSide::Keys(k) => {
            check_input(device, "k_nope", k, batch.total_k(), hkv, d)?;
            if q.dtype != k.dtype {
                return Err(Error::invalid(format!("q_nope is {} but k_nope is {}", q.dtype.name(), k.dtype.name())));
            }
        }
        KSide::Caches(caches) => check_caches(config, device, batch, caches)?,
    }
    let need = [
        ("mask->counts", mask.counts, mask.counts_len, plan.total_rows, 4),
        ("mask->indices", mask.indices, mask.indices_len, plan.total_slots, 4),
        ("mask->row_offsets", mask.row_offsets, mask.row_offsets_len, plan.total_rows + 1, 8),
    ];
    for (name, ptr, len, want, size) in need {
        if len < want {
            return Err(Error::BufferTooSmall(format!("{name} holds {len} entries, this batch needs {want}")));
        }
        if ptr % size as u64 != 0 {
            return Err(Error::invalid(format!("{name} is not aligned to {size} bytes")));
        }
        cuda::check_device_pointer(name, ptr, want * size)?;
    }
    check_workspace(&plan, workspace, workspace_len)?;
    let keys = match kside {
        KSide::Keys(k) => Some(("k_nope", k)),
        KSide::Caches(_) => None,
    };
    let [q, k] =
        rounded_inputs(config, device, &plan, batch, [Some(("q_nope", q)), keys], workspace, workspace_len, stream)?;
    let q = q.ok_or_else(|| Error::invalid("q_nope is missing"))?;
    let q = &q;
    let kside = match (kside, &k) {
        (KSide::Keys(_), Some(k)) => KSide::Keys(k),
        (other, _) => other,
    };
    let base = GateArgs::new(config, &plan, workspace, weights);
    let mut args = GateArgs {
        q: q.ptr,
        q_row_stride: q.layout.strides[0] as i64,
        q_head_stride: q.layout.strides[1] as i64,
        counts: mask.counts,
        indices: mask.indices,
        row_offsets: mask.row_offsets,
        topk_ratio: 1.0 - (1.0 - params.nz_ratio as f64).sqrt(),
        method: match params.method {
            SparsityMethod::Threshold => 0,
            SparsityMethod::NzRatio => 1,
        },
        threshold: params.threshold,
        threshold_bf16: (params.threshold_compare == ThresholdCompare::Bf16) as i32,
        keep_diagonal: (params.empty_rows == EmptyRowPolicy::KeepDiagonal) as i32,
        last_block_dense: params.last_block_dense as i32,
        ..base
    };
    let cached = match kside {
        KSide::Keys(k) => {
            args.k = k.ptr;
            args.k_row_stride = k.layout.strides[0] as i64;
            args.k_head_stride = k.layout.strides[1] as i64;
            plan.use_workspace_k_gate(workspace, d);
            false
        }
        KSide::Caches(caches) => {
            plan.use_caches(config, caches);
            args.k_gate_head_stride = d as i64;
            args.k_gate_row_stride = (hq * d) as i64;
            true
        }
    };
    if plan.seqs.len() <= SMALL_SEQS {
        launch_all::<SMALL_SEQS>(device.ctx(), &plan, &mut args, d, q.dtype, cached, true, stream)
    } else {
        launch_all::<MAX_SEQS>(device.ctx(), &plan, &mut args, d, q.dtype, cached, true, stream)
    }
}

/// For distillation (src/gpu/distill.rs): the gate's pool, projection and
/// logits kernels of `layer` without the selection, the f32 logit of every
/// causal (row, key block) pair written to `logits = (device address,
/// values)` in the mask's slot layout. Returns the plan and the launch
/// arguments, whose scratch pointers (q_gate, pooled_k, the RoPE table) the
/// gradient kernels read next on the same stream.
///
/// # Safety
/// As [`compute_mask`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn compute_logits(
    config: &GateConfig,
    device: &DeviceGate,
    layer: usize,
    batch: &Batch,
    q: &DeviceTensor,
    k: &DeviceTensor,
    logits: (u64, usize),
    workspace: u64,
    workspace_len: usize,
    stream: CUstream,
) -> Result<(GatePlan, GateArgs)> {
    let mut plan = GatePlan::new(config, batch)?;
    let weights = device.layer(layer)?;
    let (d, hq, hkv) = (config.head_dim, config.num_q_heads, config.num_kv_heads);
    check_input(device, "q_nope", q, batch.total_q(), hq, d)?;
    check_input(device, "k_nope", k, batch.total_k(), hkv, d)?;
    if q.dtype != k.dtype {
        return Err(Error::invalid(format!("q_nope is {} but k_nope is {}", q.dtype.name(), k.dtype.name())));
    }
    if logits.1 < plan.total_slots {
        return Err(Error::BufferTooSmall(format!(
            "logits hold {} values, this batch needs {}",
            logits.1, plan.total_slots
        )));
    }
    if logits.0 % 4 != 0 {
        return Err(Error::invalid("logits are not aligned to 4 bytes"));
    }
    check_buffer(device.ctx(), WEIGHTS_CONTEXT, "logits", logits.0, plan.total_slots * 4)?;
    check_workspace(&plan, workspace, workspace_len)?;
    let mut args = GateArgs {
        q: q.ptr,
        q_row_stride: q.layout.strides[0] as i64,
        q_head_stride: q.layout.strides[1] as i64,
        k: k.ptr,
        k_row_stride: k.layout.strides[0] as i64,
        k_head_stride: k.layout.strides[1] as i64,
        indices: logits.0,
        ..GateArgs::new(config, &plan, workspace, weights)
    };
    plan.use_workspace_k_gate(workspace, d);
    if plan.seqs.len() <= SMALL_SEQS {
        launch_all::<SMALL_SEQS>(device.ctx(), &plan, &mut args, d, q.dtype, false, false, stream)?;
    } else {
        launch_all::<MAX_SEQS>(device.ctx(), &plan, &mut args, d, q.dtype, false, false, stream)?;
    }
    Ok((plan, args))
}

/// How the pool kernel splits a token row: `slices` CTAs per block, each
/// reading `hq / slices` query heads and `hkv / slices` KV heads; `qp` and
/// `kp` bound the 16-byte pieces of a row slice each of its 256 threads owns
/// (the compiled variants: (1,1), (2,1), (4,1), (8,1), (4,2), (8,2)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PoolShape {
    slices: usize,
    qp: usize,
    kp: usize,
}

impl PoolShape {
    fn choose(hq: usize, hkv: usize, d: usize, plan: &GatePlan, sm_count: usize) -> Result<Self> {
        let pieces = |heads: usize| (heads * d / 8).div_ceil(POOL_THREADS as usize);
        let blocks: usize = plan.seqs.iter().map(|e| e.q_blocks.max(e.k_blocks) as usize).sum();
        let mut chosen = None;
        for slices in [1usize, 2, 4, 8, 16] {
            if hq % slices != 0 || hkv % slices != 0 {
                continue;
            }
            let (q, k) = (pieces(hq / slices), pieces(hkv / slices));
            let kp = if k <= 1 {
                1
            } else if k <= 2 {
                2
            } else {
                continue;
            };
            let qp = [1usize, 2, 4, 8].into_iter().find(|&v| v >= q && (kp == 1 || v >= 4));
            let Some(qp) = qp else { continue };
            let shape = PoolShape { slices, qp, kp };
            // Prefer whole rows (one contiguous read per token); split only
            // while the grid would leave SMs without a CTA.
            let fills = blocks * slices >= sm_count;
            chosen = Some(shape);
            if fills {
                break;
            }
        }
        chosen.ok_or_else(|| {
            Error::unsupported(format!("the CUDA gate's pool kernel has no variant for {hq} q heads / {hkv} kv heads"))
        })
    }
}

/// Bring each sequence's K-block cache of `layer` up to the batch: pool the
/// new keys block by block (merging with the cached partial block where the
/// chunk starts mid-block, saving the partial state where it ends mid-block),
/// project and rotate the touched blocks, and write their `k_gate` rows into
/// the caches. Then [`compute_mask_cached`] with the same batch computes the
/// mask. Asynchronous, graph-capturable (no allocation, copy or sync).
///
/// `k_new` holds only the new (pre-RoPE) keys: `[total_q, hkv, head_dim]`,
/// packed like Q (sequence `s`'s `q_len` rows at the batch's query offset,
/// row `i` at absolute position `k_len - q_len + i`). `caches[s]` is
/// sequence `s`'s cache (see [`kblock_cache_bytes`]); the workspace is sized
/// as for [`compute_mask`] on the same batch.
///
/// # Safety
/// The device buffers must stay valid until the work completes; `stream`
/// must belong to the weights' context (or be NULL). Each cache must hold
/// its sequence's first `k_len - q_len` tokens, written by earlier updates
/// of the same layer (none when `k_len == q_len`): the GPU cannot check it.
/// Work on a sequence's cache must be ordered (one stream, or events).
#[allow(clippy::too_many_arguments)]
pub unsafe fn update_kblock_cache(
    gate: &Gate,
    device: &DeviceGate,
    layer: usize,
    batch: &Batch,
    k_new: &DeviceTensor,
    caches: &[u64],
    workspace: u64,
    workspace_len: usize,
    stream: CUstream,
) -> Result<()> {
    let config = gate.config();
    let mut plan = GatePlan::new(config, batch)?;
    let weights = device.layer(layer)?;
    let (d, hkv) = (config.head_dim, config.num_kv_heads);
    check_input(device, "k_new", k_new, batch.total_q(), hkv, d)?;
    check_caches(config, device, batch, caches)?;
    check_workspace(&plan, workspace, workspace_len)?;
    let [k_new, _] =
        rounded_inputs(config, device, &plan, batch, [Some(("k_new", k_new)), None], workspace, workspace_len, stream)?;
    let k_new = &k_new.ok_or_else(|| Error::invalid("k_new is missing"))?;
    plan.use_caches(config, caches);
    let mut args = GateArgs {
        k: k_new.ptr,
        k_row_stride: k_new.layout.strides[0] as i64,
        k_head_stride: k_new.layout.strides[1] as i64,
        ..GateArgs::new(config, &plan, workspace, weights)
    };
    if plan.seqs.len() <= SMALL_SEQS {
        launch_update::<SMALL_SEQS>(device.ctx(), &plan, &mut args, d, k_new.dtype, stream)
    } else {
        launch_update::<MAX_SEQS>(device.ctx(), &plan, &mut args, d, k_new.dtype, stream)
    }
}

unsafe fn launch_update<const S: usize>(
    ctx: &Ctx,
    plan: &GatePlan,
    args: &mut GateArgs,
    d: usize,
    dtype: DType,
    stream: CUstream,
) -> Result<()> {
    let mut table = plan.table::<S>();
    let ty = if dtype == DType::F16 { "f16" } else { "bf16" };
    let fatbin = kernels::fatbin("gate")?;
    let rope = cuda::function(ctx, fatbin, &format!("seer_gate_rope_d{d}"))?;
    let pool = cuda::function(ctx, fatbin, &format!("seer_gate_kcache_pool_d{d}_{ty}_s{S}"))?;
    let commit = cuda::function(ctx, fatbin, &format!("seer_gate_kcache_commit_d{d}_s{S}"))?;
    let project = cuda::function(ctx, fatbin, &format!("seer_gate_kcache_project_d{d}_s{S}"))?;
    let n = plan.seqs.len() as u32;
    let mut args_only: [*mut c_void; 1] = [(args as *mut GateArgs).cast()];
    cuda::launch(rope, [plan.max_k_blocks as u32, 1, 1], [THREADS, 1, 1], 0, stream, &mut args_only)?;
    let mut params: [*mut c_void; 2] = [(args as *mut GateArgs).cast(), (&mut table as *mut SeqTable<S>).cast()];
    // One CTA per (touched block, sequence), all KV heads: the touched
    // blocks of a sequence are its query blocks.
    cuda::launch(pool, [1, plan.max_q_blocks as u32, n], [POOL_THREADS, 1, 1], 0, stream, &mut params)?;
    // New partial-block states replace the cached ones only now: in the pool
    // launch, a chunk's first block reads the old state while its last block
    // produces the new one.
    cuda::launch(commit, [n, 1, 1], [POOL_THREADS, 1, 1], 0, stream, &mut params)?;
    // pooled_k holds kblock_rows_padded >= total_q_blocks + 64 rows: every
    // 64-row tile reads inside the workspace.
    let tiles = plan.total_q_blocks.div_ceil(WIDE_TILE);
    let (grid, smem) = project_launch(ctx, tiles, args.hq as usize, d);
    cuda::launch(project, grid, [PROJECT_THREADS, 1, 1], smem, stream, &mut params)
}

/// Threads of a projection CTA (`kProjectThreads` in kernels/gate.cu).
const PROJECT_THREADS: u32 = 256;

/// Grid and dynamic shared memory of the projection over `tiles` 64-row
/// tiles per head: each CTA stages its head's weights (3 d x d bf16) once
/// and walks a run of consecutive tiles, as many as make the CTAs fill the
/// GPU once at two CTAs per SM on Hopper, one before it (`kProjectMinBlocks`;
/// the kernel derives the run length from the grid the same way).
fn project_launch(ctx: &Ctx, tiles: usize, hq: usize, d: usize) -> ([u32; 3], u32) {
    let per_sm = if ctx.compute_capability().0 >= 9 { 2 } else { 1 };
    let slots = per_sm * ctx.sm_count().max(1) as usize;
    let per = (tiles * hq).div_ceil(slots).max(1);
    let grid = [tiles.div_ceil(per).max(1) as u32, hq as u32, 1];
    (grid, (3 * d * d * 2) as u32)
}

/// `GateArgs::method` of the threshold rule (`kMethodThreshold`).
const METHOD_THRESHOLD: i32 = 0;
/// Key tiles (of 64 key blocks) per work item of the threshold kernels
/// (`kChunkTiles` in kernels/gate_select.cu).
const THRESHOLD_CHUNK_TILES: usize = 4;
/// Longest row (key blocks) the threshold compaction holds in registers
/// (`32 * kWordsPerLane * 64` in kernels/gate_select.cu): 1M tokens.
const THRESHOLD_MAX_ROW: usize = 32 * 8 * 64;

/// Shortest longest-row (key blocks) for which the threshold kernels beat
/// logits + select (H100, ncu, 32 heads: 8k tokens 25.6 vs 15.4 us, 32k
/// 51.9 vs 65, 128k 352 vs 563; kernels/NOTES.md, gate v7 and v7b).
const THRESHOLD_MIN_ROW: usize = 257;

/// Whether the threshold rule runs on kernels/gate_select.cu (two passes
/// over recomputed logits, nothing materialized) rather than on the logits
/// and select kernels: rows of [`THRESHOLD_MIN_ROW`] to [`THRESHOLD_MAX_ROW`]
/// key blocks. `SEERATTN_GATE_SELECT=staged` or `=fused` forces one where
/// both apply (to compare them in one run, and to test both; read once).
fn threshold_kernels_apply(plan: &GatePlan) -> bool {
    static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| match std::env::var("SEERATTN_GATE_SELECT").as_deref() {
        Ok("staged") => Some(false),
        Ok("fused") => Some(true),
        _ => None,
    });
    plan.max_k_blocks <= THRESHOLD_MAX_ROW && forced.unwrap_or(plan.max_k_blocks >= THRESHOLD_MIN_ROW)
}

/// The kernels that turn projected Q and K into the mask.
enum Selection {
    /// seer_gate_logits_* (every causal logit into the mask's slots), then
    /// seer_gate_select_* (one warp per row, either rule).
    Staged { logits: CUfunction, select: CUfunction },
    /// kernels/gate_select.cu: the threshold rule without materialized logits.
    Threshold { lse: CUfunction, bits: CUfunction, compact: CUfunction },
}

#[allow(clippy::too_many_arguments)]
unsafe fn launch_all<const S: usize>(
    ctx: &Ctx,
    plan: &GatePlan,
    args: &mut GateArgs,
    d: usize,
    dtype: DType,
    cached: bool,
    with_select: bool,
    stream: CUstream,
) -> Result<()> {
    let mut table = plan.table::<S>();
    let ty = if dtype == DType::F16 { "f16" } else { "bf16" };
    let fatbin = kernels::fatbin("gate")?;
    let rope = cuda::function(ctx, fatbin, &format!("seer_gate_rope_d{d}"))?;
    let shape = PoolShape::choose(args.hq as usize, args.hkv as usize, d, plan, ctx.sm_count().max(1) as usize)?;
    let pool = cuda::function(ctx, fatbin, &format!("seer_gate_pool_d{d}_{ty}_s{S}_q{}_k{}", shape.qp, shape.kp))?;
    let project = cuda::function(ctx, fatbin, &format!("seer_gate_project_d{d}_s{S}"))?;
    // Logits CTAs take 64 rows (each key tile fetched once per 64 rows)
    // unless that leaves too few CTAs to fill the GPU; then 16.
    let wide_ctas: usize =
        plan.seqs.iter().map(|e| (e.q_blocks as usize).div_ceil(WIDE_TILE)).sum::<usize>() * args.hq as usize;
    let row_warps = if wide_ctas < 4 * ctx.sm_count().max(1) as usize { 1 } else { 4 };
    // Every function is looked up before the first launch: a missing one
    // enqueues nothing.
    let selection = if with_select && args.method == METHOD_THRESHOLD && threshold_kernels_apply(plan) {
        let select = kernels::fatbin("gate_select")?;
        Selection::Threshold {
            lse: cuda::function(ctx, select, &format!("seer_gate_threshold_lse_d{d}_s{S}"))?,
            bits: cuda::function(ctx, select, &format!("seer_gate_threshold_bits_d{d}_s{S}"))?,
            compact: cuda::function(ctx, select, &format!("seer_gate_threshold_compact_s{S}"))?,
        }
    } else {
        Selection::Staged {
            logits: cuda::function(ctx, fatbin, &format!("seer_gate_logits_d{d}_s{S}_r{row_warps}"))?,
            select: cuda::function(ctx, fatbin, &format!("seer_gate_select_s{S}"))?,
        }
    };
    let n = plan.seqs.len() as u32;
    let q_padding = plan.q_gate_rows - plan.total_q_blocks;
    let mut args_only: [*mut c_void; 1] = [(args as *mut GateArgs).cast()];
    cuda::launch(rope, [plan.max_k_blocks as u32, 1, 1], [THREADS, 1, 1], 0, stream, &mut args_only)?;
    let mut params: [*mut c_void; 2] = [(args as *mut GateArgs).cast(), (&mut table as *mut SeqTable<S>).cast()];
    // One CTA per (head slice, block, sequence); grid row `n` (one past the
    // last sequence) zeroes the scratch padding. With K-block caches (args.k
    // null) only the query side is pooled and the projection is skipped: the
    // logits kernel reads the caches.
    let pool_smem = (args.hq as usize / shape.slices * d * 4) as u32;
    let pool_blocks = if cached {
        plan.max_q_blocks.max(q_padding)
    } else {
        plan.max_q_blocks.max(plan.max_k_blocks).max(plan.kblock_rows_padded - plan.kblock_rows).max(q_padding)
    } as u32;
    let grid = [shape.slices as u32, pool_blocks, n + 1];
    cuda::launch(pool, grid, [POOL_THREADS, 1, 1], pool_smem, stream, &mut params)?;
    if !cached {
        let (grid, smem) = project_launch(ctx, plan.kblock_rows_padded / WIDE_TILE, args.hq as usize, d);
        cuda::launch(project, grid, [PROJECT_THREADS, 1, 1], smem, stream, &mut params)?;
    }
    let (logits, select) = match selection {
        Selection::Staged { logits, select } => (logits, select),
        Selection::Threshold { lse, bits, compact } => {
            // The three launches of kernels/gate_select.cu: each row's
            // partial max and sum per chunk of key tiles, then the kept
            // blocks as bit words in the rows' own slots, then one warp per
            // row turning them into the index list. The workspace starts at
            // q_gate (GatePlan: q_gate_offset is 0).
            let mut partials = args.q_gate - plan.q_gate_offset as u64 + plan.partials_offset as u64;
            let mut chunks = plan.threshold_chunks as i32;
            let mut pass_params: [*mut c_void; 4] =
                [params[0], params[1], (&mut partials as *mut u64).cast(), (&mut chunks as *mut i32).cast()];
            let grid = [(plan.max_q_blocks.div_ceil(WIDE_TILE) * plan.threshold_chunks) as u32, n, args.hq as u32];
            let smem = (3 * WIDE_TILE * d * 2) as u32;
            cuda::launch(lse, grid, [THREADS, 1, 1], smem, stream, &mut pass_params)?;
            cuda::launch(bits, grid, [THREADS, 1, 1], smem, stream, &mut pass_params)?;
            let rows_x = plan.total_rows.div_ceil(THREADS as usize / 32) as u32;
            return cuda::launch(compact, [rows_x, 1, 1], [THREADS, 1, 1], 0, stream, &mut params);
        }
    };
    // The logits go into the mask's own index slots; one warp per row then
    // selects in place.
    let logits_x = plan.max_q_blocks.div_ceil(TILE * row_warps) as u32;
    cuda::launch(logits, [logits_x, n, args.hq as u32], [THREADS, 1, 1], 0, stream, &mut params)?;
    if !with_select {
        return Ok(());
    }
    let select_x = plan.total_rows.div_ceil(THREADS as usize / 32) as u32;
    cuda::launch(select, [select_x, 1, 1], [THREADS, 1, 1], 0, stream, &mut params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RopeConfig, RopeScaling};

    #[test]
    fn structs_match_the_kernel_header() {
        // kernels/gate.cuh static_asserts the same sizes.
        assert_eq!(std::mem::size_of::<SeqEntry>(), 88);
        assert_eq!(std::mem::size_of::<GateArgs>(), 1248);
        assert_eq!(std::mem::size_of::<SeqTable<16>>(), 16 + 16 * 88);
        // Large tables ride in the extended (32 KiB) kernel parameter space.
        assert!(std::mem::size_of::<SeqTable<MAX_SEQS>>() + std::mem::size_of::<GateArgs>() < 32 * 1024);
    }

    fn config(head_dim: usize) -> GateConfig {
        GateConfig {
            num_layers: 1,
            num_q_heads: 8,
            num_kv_heads: 2,
            head_dim,
            gate_hidden: head_dim,
            block_size: 64,
            gate_type: GateType::released(),
            force_double: false,
            rope: RopeConfig { theta: 10000.0, scaling: RopeScaling::None },
            sparsity_method: SparsityMethod::Threshold,
            threshold: 0.0,
            nz_ratio: 1.0,
            last_block_dense: true,
        }
    }

    #[test]
    fn plan_tables_and_scratch() {
        let batch = Batch::from_lens(&[(1000, 1000), (100, 300)]).unwrap();
        let plan = GatePlan::new(&config(128), &batch).unwrap();
        assert_eq!(plan.seqs[0].k_blocks, 16);
        assert_eq!((plan.seqs[1].kblock_base, plan.seqs[1].qblock_base), (16, 16));
        assert_eq!((plan.seqs[1].first_q_block, plan.seqs[1].q_blocks, plan.seqs[1].q_start), (3, 2, 200));
        // Rows: 8 heads * 16 + 8 heads * 2; slots of seq 1 start after 8 * 136 of seq 0.
        assert_eq!(plan.seqs[1].row_base, 128);
        assert_eq!(plan.seqs[1].slot_base, 8 * 136);
        assert_eq!(plan.kblock_rows, 21);
        assert!(plan.kblock_rows_padded >= plan.kblock_rows + WIDE_TILE && plan.kblock_rows_padded % 64 == 0);
        assert_eq!(plan.workspace_bytes % 256, 0);
        assert!(plan.k_gate_offset + 8 * plan.kblock_rows_padded * 128 * 2 <= plan.workspace_bytes);
    }

    #[test]
    fn kblock_cache_layout() {
        // hkv 2 * 3 * 128 * 4 = 3072 bytes of state (a multiple of 256), then
        // 64-row tiles of [hq 8][128] bf16 rows.
        let c = config(128);
        assert_eq!(kblock_state_bytes(&c), 3072);
        assert_eq!(kblock_cache_bytes(&c, 0).unwrap(), 3072);
        assert_eq!(kblock_cache_bytes(&c, 1).unwrap(), 3072 + 64 * 8 * 128 * 2);
        assert_eq!(kblock_cache_bytes(&c, 64 * 64).unwrap(), 3072 + 64 * 8 * 128 * 2);
        assert_eq!(kblock_cache_bytes(&c, 64 * 64 + 1).unwrap(), 3072 + 128 * 8 * 128 * 2);
        // d64: 2 * 3 * 64 * 4 = 1536 = 6 * 256.
        assert_eq!(kblock_state_bytes(&config(64)), 1536);
        let mut odd = config(64);
        odd.num_kv_heads = 1;
        odd.num_q_heads = 1;
        assert_eq!(kblock_state_bytes(&odd), 768);
        assert!(kblock_cache_bytes(&c, usize::MAX - 64).is_err());
        let mut bad = config(128);
        bad.head_dim = 96;
        bad.gate_hidden = 96;
        assert!(matches!(kblock_cache_bytes(&bad, 100), Err(Error::Unsupported(_))));
    }

    #[test]
    fn unsupported_gates_are_named() {
        let batch = Batch::single(100).unwrap();
        let mut c = config(128);
        c.head_dim = 256;
        c.gate_hidden = 256;
        assert!(matches!(GatePlan::new(&c, &batch), Err(Error::Unsupported(_))));
        let mut c = config(128);
        c.gate_hidden = 64;
        assert!(matches!(GatePlan::new(&c, &batch), Err(Error::Unsupported(_))));
        let lens: Vec<(usize, usize)> = (0..MAX_SEQS + 1).map(|_| (3, 3)).collect();
        assert!(matches!(GatePlan::new(&config(64), &Batch::from_lens(&lens).unwrap()), Err(Error::Unsupported(_))));
    }
}
