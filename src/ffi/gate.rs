//! The gate handle: create, load, set weights, upload to the GPU, query,
//! compute a block mask (host or device buffers), destroy.

use super::args::{self, invalid, SeerBatch, SeerBlockMask, SeerDevice, SeerTensor};
use super::status::{FfiError, FfiResult, SeerStatus};
use crate::batch::Batch;
use crate::config::{
    EmptyRowPolicy, GateConfig, GateType, MaskParams, Pool, RopeConfig, RopeScaling, SparsityMethod, ThresholdCompare,
};
use crate::gate::{Gate, WeightRef};
use crate::gpu::gate::{self as gpu_gate, DeviceGate, GatePlan};
use crate::mask::MaskLayout;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Arc, Mutex, RwLock};

/// A gate for every layer of one model (opaque). Created by
/// `seer_gate_create` or `seer_gate_load`, released by `seer_gate_destroy`.
///
/// Thread safety: any number of threads may compute masks with one handle at
/// once; `seer_gate_set_layer_weights` and `seer_gate_upload` may run
/// concurrently with them (they wait for running calls of the handle);
/// `seer_gate_destroy` may race with other calls on the handle: those
/// running finish, later ones fail with `SEER_INVALID_ARGUMENT`. On CUDA,
/// calls running at once need their own workspaces, masks and outputs (on
/// any streams), and `seer_gate_upload` / `seer_gate_destroy` (which
/// allocate and free device memory) must not overlap a graph capture in
/// CUDA's global mode on another thread (README, "Thread safety").
pub struct SeerGate {
    gate: RwLock<Gate>,
    /// The weights on the GPU (`seer_gate_upload`). Lock order: `gate`
    /// first, then `device`; the state changes only under `gate`'s lock
    /// (read for an upload, write for new weights), so a call holding the
    /// read lock sees device weights that match the host weights.
    device: Mutex<DeviceCopy>,
}

/// Where the gate's device copy stands.
enum DeviceCopy {
    /// `seer_gate_upload` was never called (or failed every time).
    None,
    /// Uploaded; the host weights have not changed since.
    Current(Arc<DeviceGate>),
    /// Uploaded, then `seer_gate_set_layer_weights` changed the host
    /// weights. CUDA calls are refused until the next upload; the old device
    /// memory is kept (not freed) until then or `seer_gate_destroy`, so that
    /// work already enqueued with it stays valid.
    Stale(#[allow(dead_code)] Arc<DeviceGate>), // held, never read: it keeps the old device memory alive
}

impl SeerGate {
    /// The device copy for a CUDA call, or the reason there is none.
    fn device_copy(&self) -> FfiResult<Arc<DeviceGate>> {
        match &*self.device.lock().unwrap_or_else(|poison| poison.into_inner()) {
            DeviceCopy::Current(d) => Ok(Arc::clone(d)),
            DeviceCopy::None => Err(invalid(
                "the gate's weights are not on the GPU: call seer_gate_upload(gate) once after loading or setting \
                 the weights, before any call with CUDA buffers",
            )),
            DeviceCopy::Stale(_) => Err(invalid(
                "seer_gate_set_layer_weights changed the gate's weights after seer_gate_upload: call seer_gate_upload \
                 again before any call with CUDA buffers",
            )),
        }
    }
}

/// The live handles, by address. The registry owns each gate (an `Arc`);
/// a call takes its own reference under the registry's lock, so
/// `seer_gate_destroy` on another thread, while the call runs, only
/// unregisters the handle: the gate is freed when the last running call
/// returns, and calls that start after the destroy fail with
/// `SEER_INVALID_ARGUMENT` instead of reading freed memory. A pointer that
/// was never a handle, or was destroyed, is refused the same way (unless a
/// new gate was given the same address). A B-tree rather than a hash map:
/// its allocations are reachable from the static through pointers to their
/// starts, so leak checkers (valgrind) see them as still reachable.
static LIVE_GATES: Mutex<BTreeMap<usize, Arc<SeerGate>>> = Mutex::new(BTreeMap::new());

fn live_gates<R>(f: impl FnOnce(&mut BTreeMap<usize, Arc<SeerGate>>) -> R) -> R {
    f(&mut LIVE_GATES.lock().unwrap_or_else(|poison| poison.into_inner()))
}

/// The gate of a live handle, kept alive for the caller's call.
pub(crate) fn gate_handle(ptr: *const SeerGate) -> FfiResult<Arc<SeerGate>> {
    if ptr.is_null() {
        return Err(args::null("gate"));
    }
    live_gates(|live| live.get(&(ptr as usize)).cloned())
        .ok_or_else(|| invalid("gate is not a live handle (never created, or already destroyed)"))
}

pub(crate) fn read_gate(h: &SeerGate) -> std::sync::RwLockReadGuard<'_, Gate> {
    h.gate.read().unwrap_or_else(|poison| poison.into_inner())
}

fn publish(gate: Gate) -> *mut SeerGate {
    let handle = Arc::new(SeerGate { gate: RwLock::new(gate), device: Mutex::new(DeviceCopy::None) });
    let ptr = Arc::as_ptr(&handle).cast_mut();
    live_gates(|live| live.insert(ptr as usize, handle));
    ptr
}

/// Pooling functions, as bits of `SeerGateConfig::q_pools` / `k_pools`.
/// The gate type `Q<pools>_K<pools>` lists its pools in this order.
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum SeerPool {
    SEER_POOL_MAX = 1,
    SEER_POOL_MIN = 2,
    SEER_POOL_AVG = 4,
}

/// RoPE scaling kinds (`SeerGateConfig::rope_scaling`).
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum SeerRopeScaling {
    SEER_ROPE_NONE = 0,
    SEER_ROPE_LINEAR = 1,
    SEER_ROPE_LLAMA3 = 2,
}

/// How scores become a mask (`sparsity_method` fields).
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum SeerSparsityMethod {
    /// Keep blocks whose gate probability exceeds `threshold`.
    SEER_SPARSITY_THRESHOLD = 0,
    /// Keep the top `max(1, floor((1 - sqrt(1 - nz_ratio)) * k_blocks))` blocks per row.
    SEER_SPARSITY_NZ_RATIO = 1,
}

/// Policy for query-block rows the rule leaves empty (`SeerMaskParams::empty_rows`).
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum SeerEmptyRows {
    /// Select the row's diagonal block (default).
    SEER_EMPTY_ROWS_KEEP_DIAGONAL = 0,
    /// Leave it empty as upstream does; attention writes zeros there.
    SEER_EMPTY_ROWS_EMPTY = 1,
}

/// Threshold comparison precision (`SeerMaskParams::threshold_compare`).
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum SeerThresholdCompare {
    /// `prob > threshold` in f32 (default).
    SEER_THRESHOLD_F32 = 0,
    /// Upstream's: both sides rounded to bf16 first.
    SEER_THRESHOLD_BF16 = 1,
}

/// Everything that defines a gate apart from its weights. Initialise with
/// `seer_gate_config_default`, then set the model's fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeerGateConfig {
    /// `sizeof(SeerGateConfig)`, set by the caller.
    pub struct_size: usize,
    pub num_layers: u32,
    pub num_q_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    /// Width of the gate's projected Q and K.
    pub gate_hidden: u32,
    /// Tokens per block; 64 is supported.
    pub block_size: u32,
    /// `SeerPool` bits of the gate type's Q pooling (released: AVG).
    pub q_pools: u32,
    /// `SeerPool` bits of the gate type's K pooling (released: MAX|MIN|AVG).
    pub k_pools: u32,
    /// 1: a Q projection even where the gate type needs none (upstream `force_double`).
    pub force_double: u32,
    /// A `SeerRopeScaling` value.
    pub rope_scaling: u32,
    pub rope_theta: f64,
    /// Linear and llama3 scaling factor.
    pub rope_factor: f64,
    pub rope_low_freq_factor: f64,
    pub rope_high_freq_factor: f64,
    pub rope_original_max_position_embeddings: f64,
    /// A `SeerSparsityMethod` value: the default rule of `seer_mask_params_default`.
    pub sparsity_method: u32,
    pub threshold: f32,
    pub nz_ratio: f32,
    /// 1: the last two query-block rows of each sequence are dense.
    pub last_block_dense: u32,
}

/// Parameters of `seer_gate_compute_mask`. Initialise with `seer_mask_params_default`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeerMaskParams {
    /// `sizeof(SeerMaskParams)`, set by the caller.
    pub struct_size: usize,
    /// Which layer's gate.
    pub layer: u32,
    /// A `SeerSparsityMethod` value.
    pub sparsity_method: u32,
    pub threshold: f32,
    pub nz_ratio: f32,
    /// 1: the last two query-block rows of each sequence are dense.
    pub last_block_dense: u32,
    /// A `SeerEmptyRows` value.
    pub empty_rows: u32,
    /// A `SeerThresholdCompare` value.
    pub threshold_compare: u32,
    /// CUDA stream (`cudaStream_t`, NULL for the legacy default stream) the
    /// mask is computed on when the buffers are CUDA memory; unused on the CPU.
    /// It must belong to the context the gate was uploaded to.
    pub cuda_stream: *mut c_void,
    /// Caller-owned scratch memory of at least `seer_gate_workspace_size`
    /// bytes, in the memory of the call's buffers: device memory, 256-byte
    /// aligned, for CUDA buffers; unused (NULL, 0) on the CPU. It must not
    /// overlap any other buffer of the call, and not be used by anything else
    /// until the mask is ready.
    pub workspace: *mut c_void,
    pub workspace_bytes: usize,
    /// K-block caches for chunked prefill (CUDA only; README, "Chunked
    /// prefill with the K-block cache"): NULL for none, or a **host** array
    /// of `num_kblock_caches` device addresses, one per sequence of the
    /// batch in batch order (`num_kblock_caches == batch->num_seqs`), each
    /// the cache of layer `layer` of that sequence, already brought up to
    /// the batch's `k_len` by `seer_kblock_cache_update`. With caches,
    /// `seer_gate_compute_mask` reads the K side from them and `k_nope` is
    /// not read (it may be NULL). With host (`SEER_DEVICE_CPU`) buffers,
    /// caches are `SEER_INVALID_ARGUMENT`. `seer_kblock_cache_update` ignores
    /// these two fields (it takes its caches as arguments).
    ///
    /// These two fields were appended after the first release of the
    /// struct: a caller whose `struct_size` ends before them (compiled
    /// against an older header) is served as if they were NULL and 0.
    pub maybe_kblock_caches: *const u64,
    pub num_kblock_caches: usize,
}

impl SeerMaskParams {
    /// Size of the struct's first release (before `maybe_kblock_caches`):
    /// the smallest `struct_size` accepted.
    fn v1_size() -> usize {
        std::mem::offset_of!(SeerMaskParams, maybe_kblock_caches)
    }

    /// What every field appended after the first release defaults to.
    fn appended_defaults() -> Self {
        SeerMaskParams {
            struct_size: 0,
            layer: 0,
            sparsity_method: 0,
            threshold: 0.0,
            nz_ratio: 0.0,
            last_block_dense: 0,
            empty_rows: 0,
            threshold_compare: 0,
            cuda_stream: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
            maybe_kblock_caches: std::ptr::null(),
            num_kblock_caches: 0,
        }
    }

    /// Read the caller's params, of this release or the first one.
    pub(crate) unsafe fn read(ptr: *const SeerMaskParams) -> FfiResult<Self> {
        args::read_versioned("params", ptr, &[Self::v1_size()], Self::appended_defaults())
    }

    /// The K-block caches of the params, if any: NULL is none (whatever the
    /// count); else exactly one per sequence of the batch.
    unsafe fn kblock_caches<'a>(&self, batch: &Batch) -> FfiResult<Option<&'a [u64]>> {
        if self.maybe_kblock_caches.is_null() {
            return Ok(None);
        }
        let caches = args::raw_slice(
            "params->maybe_kblock_caches",
            self.maybe_kblock_caches.cast_mut(),
            self.num_kblock_caches,
        )?;
        check_cache_count("params->num_kblock_caches", caches.len, batch)?;
        Ok(Some(caches.get()))
    }
}

/// One K-block cache per sequence of the batch.
fn check_cache_count(name: &str, n: usize, batch: &Batch) -> FfiResult {
    if n != batch.len() {
        return Err(invalid(format!(
            "{name} = {n} but the batch has {} sequences: give one K-block cache per sequence, in batch order",
            batch.len()
        )));
    }
    Ok(())
}

fn pools_to_bits(pools: &[Pool]) -> u32 {
    pools
        .iter()
        .map(|p| match p {
            Pool::Max => SeerPool::SEER_POOL_MAX as u32,
            Pool::Min => SeerPool::SEER_POOL_MIN as u32,
            Pool::Avg => SeerPool::SEER_POOL_AVG as u32,
        })
        .sum()
}

fn pools_from_bits(name: &str, bits: u32) -> FfiResult<Vec<Pool>> {
    if bits == 0 || bits & !7 != 0 {
        return Err(invalid(format!("{name} = {bits:#x} must be a non-empty combination of SEER_POOL_MAX|MIN|AVG")));
    }
    Ok([(1, Pool::Max), (2, Pool::Min), (4, Pool::Avg)]
        .into_iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, p)| p)
        .collect())
}

fn method_from(name: &str, v: u32) -> FfiResult<SparsityMethod> {
    match v {
        0 => Ok(SparsityMethod::Threshold),
        1 => Ok(SparsityMethod::NzRatio),
        _ => Err(invalid(format!("{name} = {v} is not a SeerSparsityMethod"))),
    }
}

fn method_to(m: SparsityMethod) -> u32 {
    match m {
        SparsityMethod::Threshold => SeerSparsityMethod::SEER_SPARSITY_THRESHOLD as u32,
        SparsityMethod::NzRatio => SeerSparsityMethod::SEER_SPARSITY_NZ_RATIO as u32,
    }
}

impl SeerGateConfig {
    pub(crate) fn to_config(self) -> FfiResult<GateConfig> {
        let scaling = match self.rope_scaling {
            0 => RopeScaling::None,
            1 => RopeScaling::Linear { factor: self.rope_factor },
            2 => RopeScaling::Llama3 {
                factor: self.rope_factor,
                low_freq_factor: self.rope_low_freq_factor,
                high_freq_factor: self.rope_high_freq_factor,
                original_max_position_embeddings: self.rope_original_max_position_embeddings,
            },
            v => return Err(invalid(format!("config->rope_scaling = {v} is not a SeerRopeScaling"))),
        };
        let config = GateConfig {
            num_layers: self.num_layers as usize,
            num_q_heads: self.num_q_heads as usize,
            num_kv_heads: self.num_kv_heads as usize,
            head_dim: self.head_dim as usize,
            gate_hidden: self.gate_hidden as usize,
            block_size: self.block_size as usize,
            gate_type: GateType {
                q_pools: pools_from_bits("config->q_pools", self.q_pools)?,
                k_pools: pools_from_bits("config->k_pools", self.k_pools)?,
            },
            force_double: args::flag("config->force_double", self.force_double)?,
            rope: RopeConfig { theta: self.rope_theta, scaling },
            sparsity_method: method_from("config->sparsity_method", self.sparsity_method)?,
            threshold: self.threshold,
            nz_ratio: self.nz_ratio,
            last_block_dense: args::flag("config->last_block_dense", self.last_block_dense)?,
        };
        config.validate()?;
        Ok(config)
    }

    fn from_config(c: &GateConfig) -> Self {
        let (rope_scaling, factor, low, high, orig) = match c.rope.scaling {
            RopeScaling::None => (0, 1.0, 0.0, 0.0, 0.0),
            RopeScaling::Linear { factor } => (1, factor, 0.0, 0.0, 0.0),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                (2, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
            }
        };
        SeerGateConfig {
            struct_size: std::mem::size_of::<SeerGateConfig>(),
            num_layers: c.num_layers as u32,
            num_q_heads: c.num_q_heads as u32,
            num_kv_heads: c.num_kv_heads as u32,
            head_dim: c.head_dim as u32,
            gate_hidden: c.gate_hidden as u32,
            block_size: c.block_size as u32,
            q_pools: pools_to_bits(&c.gate_type.q_pools),
            k_pools: pools_to_bits(&c.gate_type.k_pools),
            force_double: c.force_double as u32,
            rope_scaling,
            rope_theta: c.rope.theta,
            rope_factor: factor,
            rope_low_freq_factor: low,
            rope_high_freq_factor: high,
            rope_original_max_position_embeddings: orig,
            sparsity_method: method_to(c.sparsity_method),
            threshold: c.threshold,
            nz_ratio: c.nz_ratio,
            last_block_dense: c.last_block_dense as u32,
        }
    }
}

/// Fill `*out` with the defaults of a released gate (`Qavg_Kmaxminavg`,
/// 64-token blocks, gate_hidden 128, threshold method with threshold 0 and
/// nz_ratio 1 as upstream's config defaults, last_block_dense 1, plain RoPE
/// with theta 10000) and zero model geometry (num_layers, heads, head_dim),
/// which the caller must set. Writes `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn seer_gate_config_default(out: *mut SeerGateConfig) -> SeerStatus {
    ffi_call!("seer_gate_config_default", {
        let out = args::out_ptr("out", out)?;
        let released = GateType::released();
        let value = SeerGateConfig {
            struct_size: std::mem::size_of::<SeerGateConfig>(),
            num_layers: 0,
            num_q_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            gate_hidden: 128,
            block_size: 64,
            q_pools: pools_to_bits(&released.q_pools),
            k_pools: pools_to_bits(&released.k_pools),
            force_double: 0,
            rope_scaling: SeerRopeScaling::SEER_ROPE_NONE as u32,
            rope_theta: 10000.0,
            rope_factor: 1.0,
            rope_low_freq_factor: 0.0,
            rope_high_freq_factor: 0.0,
            rope_original_max_position_embeddings: 0.0,
            sparsity_method: SeerSparsityMethod::SEER_SPARSITY_THRESHOLD as u32,
            threshold: 0.0,
            nz_ratio: 1.0,
            last_block_dense: 1,
        };
        out.write(value);
        Ok(())
    })
}

/// Create a gate with no weights from `*config`; set each layer's weights
/// with `seer_gate_set_layer_weights`. On success `*out` receives the handle.
#[no_mangle]
pub unsafe extern "C" fn seer_gate_create(config: *const SeerGateConfig, out: *mut *mut SeerGate) -> SeerStatus {
    ffi_call!("seer_gate_create", {
        let config = args::read_sized("config", config)?;
        let out = args::out_ptr("out", out)?;
        let gate = Gate::new(config.to_config()?)?;
        out.write(publish(gate));
        Ok(())
    })
}

/// Load a gate directory as released upstream (`config.json` plus
/// `attn_gate_weights.pth` or a `.safetensors` file). `dir` is a
/// NUL-terminated UTF-8 path. On success `*out` receives the handle.
#[no_mangle]
pub unsafe extern "C" fn seer_gate_load(dir: *const c_char, out: *mut *mut SeerGate) -> SeerStatus {
    ffi_call!("seer_gate_load", {
        if dir.is_null() {
            return Err(args::null("dir"));
        }
        let out = args::out_ptr("out", out)?;
        let path = CStr::from_ptr(dir).to_str().map_err(|_| invalid("dir is not valid UTF-8"))?;
        let gate = Gate::load_dir(std::path::Path::new(path))?;
        out.write(publish(gate));
        Ok(())
    })
}

/// Set one layer's gate weights from host memory: `k_weight` is
/// `mask_linear_k.weight` `[heads, k_in, gate_hidden]` (heads = num_q_heads
/// for the released layout), `maybe_q_weight` is `mask_linear_q.weight` for
/// gate types that have one, else NULL. bf16, f16 or f32, any strides; the
/// data is copied.
///
/// After `seer_gate_upload`, this changes the host weights only: the device
/// copy is marked stale (not updated, not freed), and calls with CUDA
/// buffers fail with `SEER_INVALID_ARGUMENT` ("call seer_gate_upload again")
/// until the next `seer_gate_upload`. Set every layer, then upload once.
#[no_mangle]
pub unsafe extern "C" fn seer_gate_set_layer_weights(
    gate: *mut SeerGate,
    layer: u32,
    k_weight: *const SeerTensor,
    maybe_q_weight: *const SeerTensor,
) -> SeerStatus {
    ffi_call!("seer_gate_set_layer_weights", {
        let handle = gate_handle(gate)?;
        let handle: &SeerGate = &handle;
        let k = dense_weight("k_weight", k_weight)?;
        let q = if maybe_q_weight.is_null() { None } else { Some(dense_weight("maybe_q_weight", maybe_q_weight)?) };
        let mut g = handle.gate.write().unwrap_or_else(|poison| poison.into_inner());
        g.set_layer_weights(layer as usize, weight_ref(&k), q.as_ref().map(weight_ref))?;
        // Under the write lock: no call is between reading the device copy
        // and launching with it.
        let mut device = handle.device.lock().unwrap_or_else(|poison| poison.into_inner());
        if let DeviceCopy::Current(d) = &*device {
            *device = DeviceCopy::Stale(Arc::clone(d));
        }
        Ok(())
    })
}

fn weight_ref(w: &(crate::tensor::DType, [usize; 3], Vec<u8>)) -> WeightRef<'_> {
    WeightRef { dtype: w.0, shape: w.1, bytes: &w.2 }
}

/// Gather a (possibly strided) weight tensor into contiguous bytes.
unsafe fn dense_weight(
    name: &'static str,
    t: *const SeerTensor,
) -> FfiResult<(crate::tensor::DType, [usize; 3], Vec<u8>)> {
    let checked = args::tensor(name, t)?;
    let view = checked.view(name)?;
    let shape = view.shape();
    let size = checked.dtype.size();
    let mut out = vec![0u8; shape.iter().product::<usize>() * size];
    let mut i = 0;
    for a in 0..shape[0] {
        for b in 0..shape[1] {
            for c in 0..shape[2] {
                crate::tensor::store_f32(&mut out, checked.dtype, i, view.get(a, b, c));
                i += 1;
            }
        }
    }
    Ok((checked.dtype, shape, out))
}

/// Write the gate's config into `*out` (whose `struct_size` the caller sets).
#[no_mangle]
pub unsafe extern "C" fn seer_gate_get_config(gate: *const SeerGate, out: *mut SeerGateConfig) -> SeerStatus {
    ffi_call!("seer_gate_get_config", {
        let handle = gate_handle(gate)?;
        let handle: &SeerGate = &handle;
        let value = SeerGateConfig::from_config(read_gate(handle).config());
        args::write_sized("out", out, value)
    })
}

/// 1 if layer `layer` of the gate has weights, 0 if not (or on a bad handle or layer).
#[no_mangle]
pub unsafe extern "C" fn seer_gate_has_layer(gate: *const SeerGate, layer: u32) -> u32 {
    let mut has = false;
    let status = ffi_call!("seer_gate_has_layer", {
        has = read_gate(&*gate_handle(gate)?).has_layer(layer as usize);
        Ok(())
    });
    (status == SeerStatus::SEER_OK && has) as u32
}

/// Copy every layer's weights (as bf16) to the GPU, for
/// `seer_gate_compute_mask` with CUDA buffers. The weights go to the calling
/// thread's current CUDA context, or, when none is current, to device 0's
/// primary context (the one the CUDA runtime uses); the buffers of later
/// CUDA calls must live in that context. A previous upload is replaced (and
/// its device memory freed). Layers without weights at the time of the
/// upload are refused by later CUDA calls.
///
/// Call it once after loading or setting the weights, outside any CUDA graph
/// capture: it allocates device memory and copies synchronously; it is not
/// for the hot path. It may run concurrently with other calls on the handle
/// (it waits for `seer_gate_set_layer_weights`), but replacing an upload
/// frees the old device weights: no mask computation that used them may
/// still be running on the GPU, and no CUDA graph that captured one may be
/// replayed afterwards.
///
/// `SEER_UNSUPPORTED` (with the reason) for a gate the CUDA path does not
/// implement (see the README) or a build without CUDA kernels;
/// `SEER_NO_DEVICE` without a CUDA driver or GPU; `SEER_CUDA_ERROR` if the
/// allocation or copy fails. On failure the previous upload, if any, stays.
#[no_mangle]
pub unsafe extern "C" fn seer_gate_upload(gate: *mut SeerGate) -> SeerStatus {
    ffi_call!("seer_gate_upload", {
        let handle = gate_handle(gate)?;
        let handle: &SeerGate = &handle;
        // The read lock keeps the host weights fixed during the copy and
        // until the new device copy is published.
        let g = read_gate(handle);
        gpu_gate::check_supported(g.config())?;
        let ctx = crate::cuda::current_context()?;
        let uploaded = Arc::new(DeviceGate::upload(&g, &ctx)?);
        let old = std::mem::replace(
            &mut *handle.device.lock().unwrap_or_else(|poison| poison.into_inner()),
            DeviceCopy::Current(uploaded),
        );
        drop(g);
        // Freed outside the locks (cuMemFree may wait for the device).
        drop(old);
        Ok(())
    })
}

/// Scratch bytes `seer_gate_compute_mask` needs in `params->workspace` for
/// this batch with buffers on `device` (a `SeerDevice`): 0 for
/// `SEER_DEVICE_CPU`; for `SEER_DEVICE_CUDA`, the size of the CUDA gate's
/// intermediates (a multiple of 256) for bf16 or f16 inputs (f32 inputs need
/// `seer_gate_workspace_size_dtype`). Needs no GPU and no upload.
/// `SEER_UNSUPPORTED` (with the reason) where the CUDA gate does not take
/// this gate or batch (gate type, gate_hidden, head_dim, more than 256
/// sequences) or the build has no CUDA kernels.
#[no_mangle]
pub unsafe extern "C" fn seer_gate_workspace_size(
    gate: *const SeerGate,
    batch: *const SeerBatch,
    device: u32,
    out_bytes: *mut usize,
) -> SeerStatus {
    ffi_call!("seer_gate_workspace_size", { gate_workspace(gate, batch, None, device, out_bytes) })
}

/// `seer_gate_workspace_size` for inputs (`q_nope`, `k_nope`, or a cache
/// update's `k_new`) of `dtype` (a `SeerDType`). For bf16 and f16 it equals
/// `seer_gate_workspace_size`. For f32 on CUDA it adds the bf16 copies the
/// library rounds the inputs into before the gate's kernels read them
/// (kernels/convert.cu): `total_q * num_q_heads * head_dim * 2` and
/// `total_k * num_kv_heads * head_dim * 2` bytes, each rounded up to 256.
/// That is what `seer_gate_compute_mask` with `k_nope` needs; with K-block
/// caches it uses the first copy only, and `seer_kblock_cache_update` puts
/// `k_new` there, so this size serves all three. 0 on the CPU (the CPU path
/// rounds f32 inputs to bf16 on the host, the same values).
#[no_mangle]
pub unsafe extern "C" fn seer_gate_workspace_size_dtype(
    gate: *const SeerGate,
    batch: *const SeerBatch,
    dtype: u32,
    device: u32,
    out_bytes: *mut usize,
) -> SeerStatus {
    ffi_call!("seer_gate_workspace_size_dtype", {
        let dtype = args::dtype_of("dtype", dtype)?;
        gate_workspace(gate, batch, Some(dtype), device, out_bytes)
    })
}

/// The body of both gate workspace queries; `dtype` None: 16-bit inputs.
unsafe fn gate_workspace(
    gate: *const SeerGate,
    batch: *const SeerBatch,
    dtype: Option<crate::tensor::DType>,
    device: u32,
    out_bytes: *mut usize,
) -> FfiResult {
    {
        let handle = gate_handle(gate)?;
        let handle: &SeerGate = &handle;
        let out = args::out_ptr("out_bytes", out_bytes)?;
        let batch = args::batch(batch)?;
        let device = args::device_of("device", device)?;
        let g = read_gate(handle);
        let c = g.config();
        let bytes = match device {
            SeerDevice::SEER_DEVICE_CPU => {
                MaskLayout::new(&batch, c.num_q_heads, c.block_size)?;
                0
            }
            SeerDevice::SEER_DEVICE_CUDA => {
                require_cuda_build()?;
                let plan = GatePlan::new(c, &batch)?;
                match dtype {
                    Some(dtype) => plan.workspace_bytes_for(c, &batch, dtype),
                    None => plan.workspace_bytes(),
                }
            }
        };
        out.write(bytes);
        Ok(())
    }
}

/// Release a gate and its device copy, if any. NULL is accepted and
/// ignored; so is a pointer that is not a live handle (a double destroy),
/// which is reported through `seer_last_error_message` only. No mask
/// computation of the gate may still be running on the GPU.
///
/// A destroy that races with calls on the handle in other threads is safe:
/// calls already running finish with the gate (it is freed when the last
/// returns), calls that start after it fail with `SEER_INVALID_ARGUMENT`.
/// (A pointer kept after its destroy may later name a new gate that was
/// given the same address: do not use a handle after destroying it.)
#[no_mangle]
pub unsafe extern "C" fn seer_gate_destroy(gate: *mut SeerGate) {
    let _ = ffi_call!("seer_gate_destroy", {
        if gate.is_null() {
            return Ok(());
        }
        let Some(handle) = live_gates(|live| live.remove(&(gate as usize))) else {
            return Err(invalid("gate is not a live handle (already destroyed?)"));
        };
        // Freed here, outside the registry's lock, unless a call on another
        // thread still holds it (then when that call returns).
        drop(handle);
        Ok(())
    });
}

/// Fill `*out` with the mask rule of the gate's config for layer 0
/// (sparsity method, threshold, nz_ratio, last_block_dense), the default
/// policies (keep the diagonal of empty rows, f32 threshold comparison) and
/// no stream, workspace or K-block caches. Writes `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn seer_mask_params_default(gate: *const SeerGate, out: *mut SeerMaskParams) -> SeerStatus {
    ffi_call!("seer_mask_params_default", {
        let handle = gate_handle(gate)?;
        let handle: &SeerGate = &handle;
        let out = args::out_ptr("out", out)?;
        let p = MaskParams::from_config(read_gate(handle).config());
        out.write(SeerMaskParams {
            struct_size: std::mem::size_of::<SeerMaskParams>(),
            layer: 0,
            sparsity_method: method_to(p.method),
            threshold: p.threshold,
            nz_ratio: p.nz_ratio,
            last_block_dense: p.last_block_dense as u32,
            empty_rows: SeerEmptyRows::SEER_EMPTY_ROWS_KEEP_DIAGONAL as u32,
            threshold_compare: SeerThresholdCompare::SEER_THRESHOLD_F32 as u32,
            cuda_stream: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
            maybe_kblock_caches: std::ptr::null(),
            num_kblock_caches: 0,
        });
        Ok(())
    })
}

impl SeerMaskParams {
    fn to_params(self) -> FfiResult<MaskParams> {
        let p = MaskParams {
            method: method_from("params->sparsity_method", self.sparsity_method)?,
            threshold: self.threshold,
            nz_ratio: self.nz_ratio,
            last_block_dense: args::flag("params->last_block_dense", self.last_block_dense)?,
            empty_rows: match self.empty_rows {
                0 => EmptyRowPolicy::KeepDiagonal,
                1 => EmptyRowPolicy::Empty,
                v => return Err(invalid(format!("params->empty_rows = {v} is not a SeerEmptyRows"))),
            },
            threshold_compare: match self.threshold_compare {
                0 => ThresholdCompare::F32,
                1 => ThresholdCompare::Bf16,
                v => return Err(invalid(format!("params->threshold_compare = {v} is not a SeerThresholdCompare"))),
            },
        };
        p.validate()?;
        Ok(p)
    }
}

/// Compute layer `params->layer`'s block mask for a batch from pre-RoPE
/// `q_nope` `[total_q, num_q_heads, head_dim]` and `k_nope`
/// `[total_k, num_kv_heads, head_dim]` (bf16 or f16, any strides; or f32,
/// rounded to bf16 to nearest even first: on the CPU into host buffers, on
/// CUDA into the workspace, which must then hold
/// `seer_gate_workspace_size_dtype` bytes). Writes
/// `out_mask` (sizes from `seer_mask_sizes`); the mask arrays must not
/// overlap each other or the inputs.
///
/// The device of `q_nope` picks the path; `k_nope` and `out_mask` must be on
/// the same device (else `SEER_INVALID_ARGUMENT` naming the argument).
/// - `SEER_DEVICE_CPU`: the reference path, synchronous; no workspace, no
///   K-block caches (`params->maybe_kblock_caches` must be NULL).
/// - `SEER_DEVICE_CUDA`: needs a prior `seer_gate_upload` (and none of
///   `seer_gate_set_layer_weights` since), buffers in the uploaded context,
///   the workspace in `params->workspace` / `params->workspace_bytes` (at
///   least `seer_gate_workspace_size`, not overlapping any other buffer) and
///   the stream in `params->cuda_stream`. The work is enqueued on that
///   stream and nothing is synchronized: the mask is ready when the stream
///   says so (an event, a stream synchronization, the next kernel on it).
///   The call allocates no device memory, copies nothing between host and
///   device, and may be captured into a CUDA graph once an eager call on the
///   same context has loaded the kernels. The buffers must stay valid until
///   the work completes. Rows of q_nope and k_nope must be 16-byte aligned with
///   unit dim stride (see the README for what the CUDA gate supports).
/// - `SEER_DEVICE_CUDA` with `params->maybe_kblock_caches` (chunked prefill,
///   see `seer_kblock_cache_update`): the K side is read from the caches,
///   which `seer_kblock_cache_update` brought up to this batch for this
///   layer; `k_nope` is not read and may be NULL. Same workspace size.
#[no_mangle]
pub unsafe extern "C" fn seer_gate_compute_mask(
    gate: *const SeerGate,
    params: *const SeerMaskParams,
    batch: *const SeerBatch,
    q_nope: *const SeerTensor,
    k_nope: *const SeerTensor,
    out_mask: *const SeerBlockMask,
) -> SeerStatus {
    ffi_call!("seer_gate_compute_mask", { compute_mask(gate, params, batch, q_nope, k_nope, out_mask) })
}

/// The body of `seer_gate_compute_mask` (also the first half of
/// `seer_gate_attention`).
pub(crate) unsafe fn compute_mask(
    gate: *const SeerGate,
    params: *const SeerMaskParams,
    batch: *const SeerBatch,
    q_nope: *const SeerTensor,
    k_nope: *const SeerTensor,
    out_mask: *const SeerBlockMask,
) -> FfiResult {
    let handle = gate_handle(gate)?;
    let handle: &SeerGate = &handle;
    let params = SeerMaskParams::read(params)?;
    let rule = params.to_params()?;
    let batch = args::batch(batch)?;
    let caches = params.kblock_caches(&batch)?;
    let device = args::device_of("q_nope", args::deref("q_nope", q_nope)?.device)?;
    if device == SeerDevice::SEER_DEVICE_CUDA {
        return compute_mask_cuda(handle, &params, &rule, &batch, q_nope, k_nope, caches, out_mask);
    }
    if caches.is_some() {
        return Err(invalid(
            "params->maybe_kblock_caches is set but q_nope is SEER_DEVICE_CPU: K-block caches are a CUDA path \
             feature (the CPU path reads every key from k_nope; set maybe_kblock_caches = NULL)",
        ));
    }
    args::require_same_device("k_nope", args::deref("k_nope", k_nope)?.device, device, "q_nope")?;
    args::require_same_device("out_mask", args::deref("out_mask", out_mask)?.device, device, "q_nope")?;
    let q = args::tensor("q_nope", q_nope)?;
    let k = args::tensor("k_nope", k_nope)?;
    let out = args::mask("out_mask", out_mask)?;
    args::check_disjoint(&out.regions(), &[q.bytes.region, k.bytes.region])?;
    let g = read_gate(handle);
    let layout = MaskLayout::new(&batch, g.config().num_q_heads, g.config().block_size)?;
    check_mask_capacity(&layout, out.counts.len, out.indices.len, out.row_offsets.len)?;
    let mask = g.compute_block_mask(params.layer as usize, &q.view("q_nope")?, &k.view("k_nope")?, &batch, &rule)?;
    out.counts.get_mut().copy_from_slice(&mask.counts);
    out.row_offsets.get_mut().copy_from_slice(&mask.row_offsets);
    out.indices.get_mut()[..mask.indices.len()].copy_from_slice(&mask.indices);
    Ok(())
}

/// The device copy for a CUDA call with gate `g` (read under the handle's
/// lock, which keeps it current for the call): the gate must be one the
/// CUDA path takes (else `SEER_UNSUPPORTED`, not "upload first": the upload
/// would fail too), uploaded, with no weights set since.
fn cuda_device(handle: &SeerGate, g: &Gate) -> FfiResult<Arc<DeviceGate>> {
    gpu_gate::check_supported(g.config())?;
    handle.device_copy()
}

/// The byte range of each K-block cache (device addresses), sized for its
/// sequence's `k_len` (what the GPU code checks against the driver), for
/// the host-side overlap checks.
fn cache_regions(config: &GateConfig, batch: &Batch, caches: &[u64]) -> FfiResult<Vec<args::Region>> {
    // The cache layout is the CUDA kernels' (as seer_kblock_cache_size): a
    // build without them refuses every cache call as unsupported.
    require_cuda_build()?;
    caches
        .iter()
        .zip(batch.seqs(config.block_size))
        .map(|(&addr, sq)| {
            let bytes = gpu_gate::kblock_cache_bytes(config, sq.k_len)?;
            args::device_region("a K-block cache", addr as usize, bytes, 1)
        })
        .collect()
}

/// The CUDA path of `seer_gate_compute_mask`: check the descriptors on the
/// host (devices, shapes, strides, alignment, overlap, mask sizes), require
/// the upload, then hand over to the GPU code, which checks the pointers
/// against the driver and enqueues the kernels on the caller's stream.
/// With K-block caches, `k_nope` is not read.
#[allow(clippy::too_many_arguments)]
unsafe fn compute_mask_cuda(
    handle: &SeerGate,
    params: &SeerMaskParams,
    rule: &MaskParams,
    batch: &Batch,
    q_nope: *const SeerTensor,
    k_nope: *const SeerTensor,
    caches: Option<&[u64]>,
    out_mask: *const SeerBlockMask,
) -> FfiResult {
    let cuda = SeerDevice::SEER_DEVICE_CUDA;
    if caches.is_none() {
        args::require_same_device("k_nope", args::deref("k_nope", k_nope)?.device, cuda, "q_nope")?;
    }
    args::require_same_device("out_mask", args::deref("out_mask", out_mask)?.device, cuda, "q_nope")?;
    let q = args::device_tensor("q_nope", q_nope)?;
    let k = match caches {
        None => Some(args::device_tensor("k_nope", k_nope)?),
        Some(_) => None,
    };
    let out = args::device_mask("out_mask", out_mask)?;
    let workspace = args::device_region("params->workspace", params.workspace as usize, params.workspace_bytes, 1)?;
    let mut written = out.regions.to_vec();
    written.push(workspace);
    let g = read_gate(handle);
    let mut read = vec![q.region];
    match (&k, caches) {
        (Some(k), _) => read.push(k.region),
        (None, Some(caches)) => read.extend(cache_regions(g.config(), batch, caches)?),
        (None, None) => unreachable!("k_nope is checked when no caches are given"),
    }
    args::check_disjoint(&written, &read)?;

    let layout = MaskLayout::new(batch, g.config().num_q_heads, g.config().block_size)?;
    check_mask_capacity(&layout, out.mask.counts_len, out.mask.indices_len, out.mask.row_offsets_len)?;
    let device = cuda_device(handle, &g)?;
    let (layer, stream) = (params.layer as usize, crate::cuda::stream_from_raw(params.cuda_stream));
    let (ws, ws_bytes) = (params.workspace as u64, params.workspace_bytes);
    match (k, caches) {
        (Some(k), _) => gpu_gate::compute_mask(
            &g, &device, layer, rule, batch, &q.tensor, &k.tensor, &out.mask, ws, ws_bytes, stream,
        )?,
        (None, Some(caches)) => gpu_gate::compute_mask_cached(
            &g, &device, layer, rule, batch, &q.tensor, caches, &out.mask, ws, ws_bytes, stream,
        )?,
        (None, None) => unreachable!("k_nope is checked when no caches are given"),
    }
    Ok(())
}

/// Bytes of one K-block cache (one layer, one sequence) able to hold a
/// sequence of up to `max_tokens` tokens, for chunked prefill with
/// `seer_kblock_cache_update` and `seer_gate_compute_mask` (see the README,
/// "Chunked prefill with the K-block cache"). Positive, a multiple of 256,
/// growing with `max_tokens`. Needs no GPU and no upload. Allocate it as device memory of the upload's context, 256-byte
/// aligned (cudaMalloc's is); it needs no zeroing.
///
/// `SEER_UNSUPPORTED` (with the reason) for a gate the CUDA path does not
/// take or a build without CUDA kernels; `SEER_INVALID_ARGUMENT` if the size
/// overflows.
#[no_mangle]
pub unsafe extern "C" fn seer_kblock_cache_size(
    gate: *const SeerGate,
    max_tokens: u64,
    out_bytes: *mut usize,
) -> SeerStatus {
    ffi_call!("seer_kblock_cache_size", {
        let handle = gate_handle(gate)?;
        let handle: &SeerGate = &handle;
        let out = args::out_ptr("out_bytes", out_bytes)?;
        require_cuda_build()?;
        let tokens = usize::try_from(max_tokens)
            .map_err(|_| invalid(format!("max_tokens = {max_tokens} exceeds the address space")))?;
        let bytes = gpu_gate::kblock_cache_bytes(read_gate(handle).config(), tokens)?;
        out.write(bytes);
        Ok(())
    })
}

/// Bring each sequence's K-block cache of layer `params->layer` up to the
/// batch (chunked prefill, see the README): pool this chunk's new keys into
/// the caches, so that `seer_gate_compute_mask` with the same batch and
/// `params->maybe_kblock_caches` = the same caches needs no earlier keys.
///
/// - `k_new`: a `SEER_DEVICE_CUDA` descriptor `[total_q, num_kv_heads,
///   head_dim]` packed like Q: the new pre-RoPE keys of each sequence, at
///   the batch's query offsets: sequence `s`'s `q_len` rows start at row
///   `cu_seqlens_q[s]`, row `i` being the key at absolute position
///   `k_len - q_len + i` (the positions of the chunk's queries). bf16 or
///   f16, unit dim stride, 16-byte aligned rows, as for `k_nope`; or f32,
///   any strides, rounded to bf16 into the workspace
///   (`seer_gate_workspace_size_dtype` with `SEER_DTYPE_F32`).
/// - `caches`: a **host** array of `num_caches` device addresses, one per
///   sequence in batch order (`num_caches == batch->num_seqs`, else
///   `SEER_INVALID_ARGUMENT`), each a cache of `seer_kblock_cache_size`
///   bytes for at least the sequence's `k_len` tokens, distinct, not
///   overlapping `k_new` or the workspace. Each cache must hold exactly the
///   sequence's first `k_len - q_len` tokens of this layer, fed by earlier
///   updates in order (nothing when `q_len == k_len`): the library cannot
///   check that.
/// - `params`: only `layer`, `cuda_stream`, `workspace` and
///   `workspace_bytes` are read (the workspace sized by
///   `seer_gate_workspace_size` for this batch, as for the mask); the mask
///   rule and `maybe_kblock_caches` are ignored.
///
/// Needs a prior `seer_gate_upload` (as `seer_gate_compute_mask` with CUDA
/// buffers). Enqueued on `params->cuda_stream`; allocates nothing, copies
/// nothing between host and device, synchronizes nothing, capturable into
/// a CUDA graph after one eager call. Work on one cache must be ordered
/// (one stream, or events): the update before the mask that reads it, and
/// before the next chunk's update.
#[no_mangle]
pub unsafe extern "C" fn seer_kblock_cache_update(
    gate: *const SeerGate,
    params: *const SeerMaskParams,
    batch: *const SeerBatch,
    k_new: *const SeerTensor,
    caches: *const u64,
    num_caches: usize,
) -> SeerStatus {
    ffi_call!("seer_kblock_cache_update", {
        let handle = gate_handle(gate)?;
        let handle: &SeerGate = &handle;
        let params = SeerMaskParams::read(params)?;
        let batch = args::batch(batch)?;
        let caches = args::raw_slice("caches", caches.cast_mut(), num_caches)?;
        check_cache_count("num_caches", caches.len, &batch)?;
        let caches = caches.get();
        let k = args::device_tensor("k_new", k_new)?;
        let workspace = args::device_region("params->workspace", params.workspace as usize, params.workspace_bytes, 1)?;
        let g = read_gate(handle);
        let mut written = cache_regions(g.config(), &batch, caches)?;
        written.push(workspace);
        args::check_disjoint(&written, &[k.region])?;
        let device = cuda_device(handle, &g)?;
        gpu_gate::update_kblock_cache(
            &g,
            &device,
            params.layer as usize,
            &batch,
            &k.tensor,
            caches,
            params.workspace as u64,
            params.workspace_bytes,
            crate::cuda::stream_from_raw(params.cuda_stream),
        )?;
        Ok(())
    })
}

/// `SEER_UNSUPPORTED` in a build without CUDA kernels (no nvcc at build time).
fn require_cuda_build() -> FfiResult {
    if !crate::cuda::cuda_enabled() {
        return Err(FfiError::new(
            SeerStatus::SEER_UNSUPPORTED,
            "this build of seerattn has no CUDA kernels (no nvcc at build time)",
        ));
    }
    Ok(())
}

/// Refuse output mask arrays of the wrong size for a layout.
pub(crate) fn check_mask_capacity(layout: &MaskLayout, counts: usize, indices: usize, offsets: usize) -> FfiResult {
    let short = |what: &str, have: usize, need: usize| {
        FfiError::new(
            SeerStatus::SEER_BUFFER_TOO_SMALL,
            format!("mask->{what}_len = {have}, this batch needs {need} (see seer_mask_sizes)"),
        )
    };
    if counts != layout.rows() {
        return Err(if counts < layout.rows() {
            short("counts", counts, layout.rows())
        } else {
            invalid(format!("mask->counts_len = {counts} but the batch has {} rows", layout.rows()))
        });
    }
    if offsets != layout.rows() + 1 {
        return Err(if offsets < layout.rows() + 1 {
            short("row_offsets", offsets, layout.rows() + 1)
        } else {
            invalid(format!("mask->row_offsets_len = {offsets} but the batch needs rows + 1 = {}", layout.rows() + 1))
        });
    }
    if indices < layout.index_capacity() {
        return Err(short("indices", indices, layout.index_capacity()));
    }
    Ok(())
}
