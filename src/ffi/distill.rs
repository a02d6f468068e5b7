//! The trainer handle: gate self-distillation through the C API (create from
//! a gate or a config, feed layers, step, read the losses, save the gate and
//! the optimizer state, destroy), over [`crate::distill::GateTrainer`] (the
//! CPU reference) and [`crate::distill::cuda::CudaGateTrainer`] (the GPU).
//!
//! A trainer's device is fixed by its first successful feed
//! ([`accumulate`], the one dispatch on the tensors' device): until then it
//! holds the gate, the recipe and any loaded optimizer state on the host
//! ([`Trainer::Host`] not yet `fixed`); host tensors then fix it there,
//! CUDA tensors move that state into a GPU trainer in the context that owns
//! them ([`crate::cuda::context_of`], as the GPU kernels find the context of
//! a caller's pointers). Later feeds on the other device are refused. A CUDA
//! trainer runs `seer_trainer_step`, the saves and the optimizer-state load
//! on the stream of its last successful feed: those calls take no params
//! struct to name one in (their signatures predate the GPU trainer), and
//! every trainer call returns with its GPU work complete, so the stream only
//! decides where that work queues, never what it is ordered after.

use super::args::{self, invalid, SeerBatch, SeerDevice, SeerTensor};
use super::gate::{gate_handle, read_gate, SeerGate, SeerGateConfig};
use super::status::{FfiError, FfiResult, SeerStatus};
use crate::batch::Batch;
use crate::config::GateConfig;
use crate::cuda::CUstream;
use crate::distill::cuda::CudaGateTrainer;
use crate::distill::{init_gate, AdamWConfig, GateTrainer, LrSchedule, StepReport, TrainConfig};
use crate::gpu::gate as gpu_gate;
use crate::reference::distill::LossParams;
use crate::tensor::DType;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// A gate being trained by self-distillation (opaque): its weights, the
/// gradients accumulated since the last step and the AdamW state, on the
/// host or on a GPU (the device of its first successful
/// `seer_trainer_accumulate`). Created by `seer_trainer_create` (from a
/// gate's weights) or `seer_trainer_create_random`, released by
/// `seer_trainer_destroy`.
///
/// Thread safety: every call may come from any thread; calls on one trainer
/// run one at a time (each waits for the one running). `seer_trainer_destroy`
/// may race with other calls: those running finish, later ones fail with
/// `SEER_INVALID_ARGUMENT`.
pub struct SeerTrainer {
    state: Mutex<TrainerState>,
}

struct TrainerState {
    trainer: Trainer,
    /// The report of the last successful step.
    last: Option<StepReport>,
}

/// The trainer of a handle, on the device its first successful feed chose.
// One per handle, behind its mutex, never moved in bulk: the variants' sizes
// do not matter.
#[allow(clippy::large_enum_variant)]
enum Trainer {
    /// The CPU reference trainer. Until `fixed` (by a successful feed of
    /// host tensors) it only holds the gate, the recipe and the optimizer
    /// state (fresh, or loaded), with nothing accumulated: a first feed of
    /// CUDA tensors moves them to a GPU trainer instead.
    Host { trainer: GateTrainer, fixed: bool },
    /// The GPU trainer, and the stream of its last successful feed, where
    /// the calls without a stream of their own (step, saves, load) run.
    Cuda { trainer: CudaGateTrainer, stream: FeedStream },
}

/// A caller's `CUstream`, kept between calls.
#[derive(Clone, Copy)]
struct FeedStream(CUstream);

// SAFETY: a stream handle is a driver identifier that any thread may use
// (only the current context is per-thread, and the CUDA layer sets it
// around every call); the caller keeps the stream alive, as documented on
// `seer_trainer_step`.
unsafe impl Send for FeedStream {}

impl Trainer {
    fn gate_config(&self) -> &GateConfig {
        match self {
            Trainer::Host { trainer, .. } => trainer.gate().config(),
            Trainer::Cuda { trainer, .. } => trainer.gate_config(),
        }
    }

    fn steps_taken(&self) -> u64 {
        match self {
            Trainer::Host { trainer, .. } => trainer.steps_taken(),
            Trainer::Cuda { trainer, .. } => trainer.steps_taken(),
        }
    }

    /// The device feeds must be on, once one succeeded.
    fn fixed_device(&self) -> Option<SeerDevice> {
        match self {
            Trainer::Host { fixed: false, .. } => None,
            Trainer::Host { fixed: true, .. } => Some(SeerDevice::SEER_DEVICE_CPU),
            Trainer::Cuda { .. } => Some(SeerDevice::SEER_DEVICE_CUDA),
        }
    }
}

/// The live trainers, by address (see `LIVE_GATES` in the gate module: the
/// same scheme, so a destroyed or never-created handle is refused, and a
/// destroy racing with a call frees the trainer after that call).
static LIVE_TRAINERS: Mutex<BTreeMap<usize, Arc<SeerTrainer>>> = Mutex::new(BTreeMap::new());

fn live_trainers<R>(f: impl FnOnce(&mut BTreeMap<usize, Arc<SeerTrainer>>) -> R) -> R {
    f(&mut LIVE_TRAINERS.lock().unwrap_or_else(|poison| poison.into_inner()))
}

fn trainer_handle(ptr: *const SeerTrainer) -> FfiResult<Arc<SeerTrainer>> {
    if ptr.is_null() {
        return Err(args::null("trainer"));
    }
    live_trainers(|live| live.get(&(ptr as usize)).cloned())
        .ok_or_else(|| invalid("trainer is not a live handle (never created, or already destroyed)"))
}

fn lock(h: &SeerTrainer) -> MutexGuard<'_, TrainerState> {
    h.state.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// A new handle for `trainer`, whose device the first feed decides.
fn publish(trainer: GateTrainer) -> *mut SeerTrainer {
    let trainer = Trainer::Host { trainer, fixed: false };
    let handle = Arc::new(SeerTrainer { state: Mutex::new(TrainerState { trainer, last: None }) });
    let ptr = Arc::as_ptr(&handle).cast_mut();
    live_trainers(|live| live.insert(ptr as usize, handle));
    ptr
}

/// How a training run is configured: AdamW, the learning-rate schedule and
/// the loss. Initialise with `seer_train_params_default` (upstream's
/// recipe), then change what you need.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeerTrainParams {
    /// `sizeof(SeerTrainParams)`, set by the caller.
    pub struct_size: usize,
    /// Peak learning rate (upstream: 1e-3); finite, >= 0.
    pub lr: f64,
    /// AdamW betas (upstream: 0.9, 0.999), each in [0, 1).
    pub beta1: f64,
    pub beta2: f64,
    /// AdamW eps (1e-8); finite, > 0.
    pub eps: f64,
    /// Decoupled weight decay (upstream: 0); finite, >= 0.
    pub weight_decay: f64,
    /// Steps of linear warmup from 0 (upstream: 20).
    pub warmup_steps: u64,
    /// Steps of the run: the cosine decay reaches 0 here (and stays 0 after); >= 1.
    pub total_steps: u64,
    /// Query-block rows of each sequence left out of the loss, as a fraction
    /// of its key blocks (upstream: 0.25, the first quarter); in [0, 1).
    pub skip_fraction: f64,
    /// Factor on the summed per-layer losses before the gradient (upstream: 10); finite, > 0.
    pub loss_scale: f64,
    /// Clip the global gradient norm to this (upstream: 1.0); 0 = no clipping.
    pub max_grad_norm: f64,
}

impl SeerTrainParams {
    fn from_config(c: &TrainConfig) -> Self {
        SeerTrainParams {
            struct_size: std::mem::size_of::<SeerTrainParams>(),
            lr: c.adamw.lr,
            beta1: c.adamw.beta1,
            beta2: c.adamw.beta2,
            eps: c.adamw.eps,
            weight_decay: c.adamw.weight_decay,
            warmup_steps: c.schedule.warmup_steps,
            total_steps: c.schedule.total_steps,
            skip_fraction: c.loss.skip_fraction,
            loss_scale: c.loss_scale,
            max_grad_norm: c.max_grad_norm.unwrap_or(0.0),
        }
    }

    fn to_config(self) -> FfiResult<TrainConfig> {
        if self.total_steps == 0 {
            return Err(invalid("params->total_steps is 0: a run has at least one step"));
        }
        let config = TrainConfig {
            adamw: AdamWConfig {
                lr: self.lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
            },
            schedule: LrSchedule { warmup_steps: self.warmup_steps, total_steps: self.total_steps },
            loss: LossParams { skip_fraction: self.skip_fraction },
            loss_scale: self.loss_scale,
            max_grad_norm: if self.max_grad_norm == 0.0 { None } else { Some(self.max_grad_norm) },
        };
        config.validate().map_err(|e| FfiError::from(e).context("params"))?;
        Ok(config)
    }
}

/// Fill `*out` with upstream's recipe for a run of `total_steps` optimizer
/// steps: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0, 20 warmup
/// steps then cosine decay, skip fraction 0.25, loss scale 10, gradient
/// clipping to 1.0. Writes `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn seer_train_params_default(total_steps: u64, out: *mut SeerTrainParams) -> SeerStatus {
    ffi_call!("seer_train_params_default", {
        args::out_ptr("out", out)?.write(SeerTrainParams::from_config(&TrainConfig::upstream(total_steps)));
        Ok(())
    })
}

/// Create a trainer starting from a copy of `gate`'s config and weights
/// (every layer must have weights; the gate handle stays independent of the
/// trainer and may be destroyed). On success `*out` receives the handle.
#[no_mangle]
pub unsafe extern "C" fn seer_trainer_create(
    gate: *const SeerGate,
    params: *const SeerTrainParams,
    out: *mut *mut SeerTrainer,
) -> SeerStatus {
    ffi_call!("seer_trainer_create", {
        let handle = gate_handle(gate)?;
        let config = args::read_sized("params", params)?.to_config()?;
        let out = args::out_ptr("out", out)?;
        let gate = read_gate(&handle).clone();
        if let Some(layer) = (0..gate.config().num_layers).find(|&l| !gate.has_layer(l)) {
            return Err(invalid(format!(
                "gate: layer {layer} has no weights (set every layer with seer_gate_set_layer_weights, or start \
                 from random weights with seer_trainer_create_random)"
            )));
        }
        out.write(publish(GateTrainer::new(gate, config)?));
        Ok(())
    })
}

/// Create a trainer for a new gate of `*config` with random weights in every
/// layer: each projection uniform in `±1/sqrt(fan_in)` (PyTorch's
/// `nn.Linear` bound) from a fixed stream of `seed`, so runs reproduce. On
/// success `*out` receives the handle.
#[no_mangle]
pub unsafe extern "C" fn seer_trainer_create_random(
    config: *const SeerGateConfig,
    seed: u64,
    params: *const SeerTrainParams,
    out: *mut *mut SeerTrainer,
) -> SeerStatus {
    ffi_call!("seer_trainer_create_random", {
        let gate_config = args::read_sized("config", config)?.to_config()?;
        let config = args::read_sized("params", params)?.to_config()?;
        let out = args::out_ptr("out", out)?;
        out.write(publish(GateTrainer::new(init_gate(gate_config, seed)?, config)?));
        Ok(())
    })
}

/// Release a trainer. NULL is accepted and ignored; so is a pointer that is
/// not a live handle (a double destroy), reported through
/// `seer_last_error_message` only. A destroy racing with calls on the
/// handle in other threads is safe: calls already running finish, calls
/// that start after it fail with `SEER_INVALID_ARGUMENT`. A CUDA trainer
/// frees its device memory in its context (none of its work is in flight:
/// every call returns with it done); destroy it before that context.
#[no_mangle]
pub unsafe extern "C" fn seer_trainer_destroy(trainer: *mut SeerTrainer) {
    let _ = ffi_call!("seer_trainer_destroy", {
        if trainer.is_null() {
            return Ok(());
        }
        let Some(handle) = live_trainers(|live| live.remove(&(trainer as usize))) else {
            return Err(invalid("trainer is not a live handle (already destroyed?)"));
        };
        drop(handle);
        Ok(())
    });
}

/// Parameters of `seer_trainer_accumulate`. Initialise with
/// `seer_train_feed_params_default`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeerTrainFeedParams {
    /// `sizeof(SeerTrainFeedParams)`, set by the caller.
    pub struct_size: usize,
    /// Which layer's gate the inputs train.
    pub layer: u32,
    /// The attention's multiplier of `q·k` before the softmax (for the
    /// target); 0 selects `1/sqrt(head_dim)`. Finite and >= 0.
    pub softmax_scale: f64,
    /// CUDA stream (`cudaStream_t`, NULL for the legacy default stream) the
    /// feed runs on when the tensors are CUDA memory; unused on the CPU. It
    /// must belong to the context of the tensors (the trainer's, after its
    /// first CUDA feed), and the tensors must be ready on it.
    ///
    /// Appended after the first release of the struct: a caller whose
    /// `struct_size` ends before it (compiled against an older header) is
    /// served as if it were NULL.
    pub cuda_stream: *mut c_void,
}

impl SeerTrainFeedParams {
    /// Size of the struct's first release (before `cuda_stream`): the
    /// smallest `struct_size` accepted.
    fn v1_size() -> usize {
        std::mem::offset_of!(SeerTrainFeedParams, cuda_stream)
    }

    /// The defaults of `seer_train_feed_params_default`; every field
    /// appended after the first release is read as its value here.
    fn defaults() -> Self {
        SeerTrainFeedParams {
            struct_size: std::mem::size_of::<SeerTrainFeedParams>(),
            layer: 0,
            softmax_scale: 0.0,
            cuda_stream: std::ptr::null_mut(),
        }
    }

    /// Read the caller's params, of this release or the first one.
    unsafe fn read(ptr: *const SeerTrainFeedParams) -> FfiResult<Self> {
        args::read_versioned("params", ptr, &[Self::v1_size()], Self::defaults())
    }
}

/// Fill `*out` with layer 0, the softmax scale `1/sqrt(head_dim)` (0) and
/// the legacy default stream (NULL). Writes `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn seer_train_feed_params_default(out: *mut SeerTrainFeedParams) -> SeerStatus {
    ffi_call!("seer_train_feed_params_default", {
        args::out_ptr("out", out)?.write(SeerTrainFeedParams::defaults());
        Ok(())
    })
}

/// Feed layer `params->layer` one batch, as the model's forward pass over
/// calibration text produces it: pre-RoPE `q_nope` `[total_q, num_q_heads,
/// head_dim]` and `k_nope` `[total_k, num_kv_heads, head_dim]` (bf16 or
/// f16, what the gate sees), post-RoPE `q` and `k` of the same shapes (any
/// dtype, what attention sees; their causal attention map, max-pooled over
/// blocks, is the target). Any strides. The gradient of the batch's
/// per-sequence losses is added to the layer's accumulator; nothing is
/// updated until `seer_trainer_step`. Feed any number of batches and layers
/// between steps (gradient accumulation: each layer's step uses the mean
/// over the sequences it was fed).
///
/// The device of `q_nope` picks the path; `k_nope`, `q` and `k` must be on
/// the same device (else `SEER_INVALID_ARGUMENT` naming the argument). The
/// first successful feed fixes the trainer's device: feeding the other one
/// later is `SEER_INVALID_ARGUMENT` ("trains on ... since its first feed").
/// A failed feed fixes nothing.
/// - `SEER_DEVICE_CPU`: the CPU reference trainer, synchronous. Any dtype
///   for `q` and `k`; f32 `q_nope` and `k_nope` are rounded to bf16 (as the
///   gate rounds them).
/// - `SEER_DEVICE_CUDA`: the GPU trainer, in the CUDA context that owns
///   `q_nope` (its first CUDA feed uploads the trainer's weights and
///   optimizer state there; later feeds must be in that context). Work is
///   enqueued on `params->cuda_stream`, after whatever the caller ordered
///   before on it (the tensors must be ready there), and the call returns
///   once it is done (the batch's loss is read back): the tensors may be
///   reused when it returns. The released gate type only (no Q projection,
///   head_dim 64 or 128): another gate is `SEER_UNSUPPORTED` with the reason,
///   and the trainer stays undecided (feed host tensors instead). bf16 or
///   f16 tensors (q and k of one dtype, q_nope and k_nope of one dtype) with
///   rows 16-byte aligned and unit dim stride (`SEER_UNSUPPORTED`
///   otherwise), or f32 with any strides, rounded on the device into the
///   trainer's scratch first: q_nope and k_nope to bf16 (as the gate rounds
///   them), q and k to the other one's dtype (bf16 when both are f32, as
///   the prefill rounds an f32 q); all device memory of their
///   described size (`SEER_INVALID_ARGUMENT` otherwise, checked through the
///   driver). The trainer allocates its scratch on the device as batches
///   grow (not a hot path: no CUDA graph capture). Without a CUDA driver or
///   GPU: `SEER_NO_DEVICE`; in a build without CUDA kernels:
///   `SEER_UNSUPPORTED`.
#[no_mangle]
pub unsafe extern "C" fn seer_trainer_accumulate(
    trainer: *mut SeerTrainer,
    params: *const SeerTrainFeedParams,
    batch: *const SeerBatch,
    q_nope: *const SeerTensor,
    k_nope: *const SeerTensor,
    q: *const SeerTensor,
    k: *const SeerTensor,
) -> SeerStatus {
    ffi_call!("seer_trainer_accumulate", { accumulate(trainer, params, batch, q_nope, k_nope, q, k) })
}

/// The body of `seer_trainer_accumulate`: the checks every path shares,
/// then the one dispatch on the tensors' device.
unsafe fn accumulate(
    trainer: *mut SeerTrainer,
    params: *const SeerTrainFeedParams,
    batch: *const SeerBatch,
    q_nope: *const SeerTensor,
    k_nope: *const SeerTensor,
    q: *const SeerTensor,
    k: *const SeerTensor,
) -> FfiResult {
    let handle = trainer_handle(trainer)?;
    let p = SeerTrainFeedParams::read(params)?;
    let batch = args::batch(batch)?;
    let device = args::device_of("q_nope", args::deref("q_nope", q_nope)?.device)?;
    for (name, t) in [("k_nope", k_nope), ("q", q), ("k", k)] {
        args::require_same_device(name, args::deref(name, t)?.device, device, "q_nope")?;
    }
    let mut state = lock(&handle);
    if let Some(fixed) = state.trainer.fixed_device().filter(|&d| d != device) {
        let (on, other) = match fixed {
            SeerDevice::SEER_DEVICE_CPU => ("the CPU (SEER_DEVICE_CPU)", "host tensors"),
            SeerDevice::SEER_DEVICE_CUDA => ("CUDA (SEER_DEVICE_CUDA)", "CUDA tensors of its context"),
        };
        return Err(invalid(format!(
            "q_nope is {}, but this trainer trains on {on} since its first feed: feed it {other} (a trainer's \
             device is fixed by its first successful feed; create another trainer for the other device)",
            args::device_name(device)
        )));
    }
    let c = state.trainer.gate_config();
    if p.layer as usize >= c.num_layers {
        return Err(invalid(format!("params->layer = {} but the gate has {} layers", p.layer, c.num_layers)));
    }
    let s = p.softmax_scale;
    let scale = if s == 0.0 {
        1.0 / (c.head_dim as f64).sqrt()
    } else if s.is_finite() && s > 0.0 {
        s
    } else {
        return Err(invalid(format!("params->softmax_scale = {s} must be finite and > 0 (0: 1/sqrt(head_dim))")));
    };
    let state = &mut *state;
    match (device, &mut state.trainer) {
        (SeerDevice::SEER_DEVICE_CPU, Trainer::Host { trainer, fixed }) => {
            accumulate_host(trainer, p.layer, scale, &batch, q_nope, k_nope, q, k)?;
            *fixed = true;
            Ok(())
        }
        (SeerDevice::SEER_DEVICE_CUDA, _) => {
            accumulate_cuda(&mut state.trainer, &p, scale, &batch, q_nope, k_nope, q, k)
        }
        (SeerDevice::SEER_DEVICE_CPU, Trainer::Cuda { .. }) => unreachable!("refused above: fixed on CUDA"),
    }
}

/// The CUDA path: device descriptors checked on the host, then the GPU
/// trainer (made from the host state on the first CUDA feed, kept only if
/// that feed succeeds).
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_cuda(
    slot: &mut Trainer,
    p: &SeerTrainFeedParams,
    scale: f64,
    batch: &Batch,
    q_nope: *const SeerTensor,
    k_nope: *const SeerTensor,
    q: *const SeerTensor,
    k: *const SeerTensor,
) -> FfiResult {
    let q_nope = args::device_tensor("q_nope", q_nope)?.tensor;
    let k_nope = args::device_tensor("k_nope", k_nope)?.tensor;
    let q = args::device_tensor("q", q)?.tensor;
    let k = args::device_tensor("k", k)?.tensor;
    let (layer, stream) = (p.layer as usize, crate::cuda::stream_from_raw(p.cuda_stream));
    match slot {
        Trainer::Cuda { trainer, stream: last } => {
            trainer.accumulate(layer, &q_nope, &k_nope, &q, &k, batch, scale, stream)?;
            *last = FeedStream(stream);
        }
        Trainer::Host { trainer: host, fixed: false } => {
            // The gate first (no device needed to refuse it), then the driver:
            // q_nope must be device memory (named in the message), and its
            // context becomes the trainer's.
            gpu_gate::check_supported(host.gate().config())?;
            crate::cuda::check_device_pointer("q_nope", q_nope.ptr, q_nope.span_bytes("q_nope")?)?;
            let ctx = crate::cuda::context_of(q_nope.ptr)?;
            let mut trainer = CudaGateTrainer::with_adam_states(
                host.gate().clone(),
                *host.config(),
                &ctx,
                &host.k_adam_states(),
                host.steps_taken(),
            )?;
            trainer.accumulate(layer, &q_nope, &k_nope, &q, &k, batch, scale, stream)?;
            *slot = Trainer::Cuda { trainer, stream: FeedStream(stream) };
        }
        Trainer::Host { fixed: true, .. } => unreachable!("refused by accumulate: fixed on the CPU"),
    }
    Ok(())
}

/// The CPU path: host views of the four tensors, then the trainer.
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_host(
    trainer: &mut GateTrainer,
    layer: u32,
    scale: f64,
    batch: &Batch,
    q_nope: *const SeerTensor,
    k_nope: *const SeerTensor,
    q: *const SeerTensor,
    k: *const SeerTensor,
) -> FfiResult {
    let q_nope = args::tensor("q_nope", q_nope)?;
    let k_nope = args::tensor("k_nope", k_nope)?;
    let q = args::tensor("q", q)?;
    let k = args::tensor("k", k)?;
    trainer.accumulate(
        layer as usize,
        &q_nope.view("q_nope")?,
        &k_nope.view("k_nope")?,
        &q.view("q")?,
        &k.view("k")?,
        batch,
        scale,
    )?;
    Ok(())
}

/// What `seer_trainer_step` did.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeerStepReport {
    /// `sizeof(SeerStepReport)`, set by the caller.
    pub struct_size: usize,
    /// Optimizer steps taken, this one included.
    pub step: u64,
    /// Learning rate of this step (the peak times the schedule's factor).
    pub lr: f64,
    /// Global L2 norm of the (loss-scaled, sequence-averaged) gradient before clipping.
    pub grad_norm: f64,
    /// Layers that were fed since the previous step (the others were not updated).
    pub layers_stepped: u32,
}

/// One AdamW step over every layer fed since the last step: the gradient of
/// `loss_scale * Σ_layers mean_sequences(loss)`, clipped to
/// `max_grad_norm`, at the schedule's learning rate. Layers fed nothing are
/// left alone. `maybe_out_report` (NULL for none; its `struct_size` set by
/// the caller) receives what the step did; the per-layer losses are read
/// with `seer_trainer_layer_losses`.
///
/// `SEER_INVALID_ARGUMENT` when nothing was fed since the last step, and
/// when the accumulated gradient is not finite (non-finite inputs): then the
/// accumulated gradients are dropped and weights, optimizer state, step
/// count and the last step's losses stay as they were.
///
/// A CUDA trainer steps on the stream of its last successful feed (which
/// must still exist), and returns with the update done (synchronous, as
/// on the CPU). So do `seer_trainer_save_gate_dir`,
/// `seer_trainer_save_optimizer_state` and
/// `seer_trainer_load_optimizer_state` (which copy between host and device).
#[no_mangle]
pub unsafe extern "C" fn seer_trainer_step(
    trainer: *mut SeerTrainer,
    maybe_out_report: *mut SeerStepReport,
) -> SeerStatus {
    ffi_call!("seer_trainer_step", {
        let handle = trainer_handle(trainer)?;
        // Check the report's struct before stepping: a call with nowhere
        // valid to put its report has no effect.
        if !maybe_out_report.is_null() {
            check_report(maybe_out_report)?;
        }
        let mut state = lock(&handle);
        let report = match &mut state.trainer {
            Trainer::Host { trainer, .. } => trainer.step()?,
            Trainer::Cuda { trainer, stream } => trainer.step(stream.0)?,
        };
        let value = SeerStepReport {
            struct_size: std::mem::size_of::<SeerStepReport>(),
            step: report.step,
            lr: report.lr,
            grad_norm: report.grad_norm,
            layers_stepped: report.layer_sequences.iter().filter(|&&n| n > 0).count() as u32,
        };
        state.last = Some(report);
        if !maybe_out_report.is_null() {
            args::write_sized("maybe_out_report", maybe_out_report, value)?;
        }
        Ok(())
    })
}

/// Refuse a report struct `write_sized` would refuse (alignment, `struct_size`).
unsafe fn check_report(ptr: *mut SeerStepReport) -> FfiResult {
    let head: &usize = args::deref("maybe_out_report", ptr.cast::<usize>().cast_const())?;
    if (ptr as usize) % std::mem::align_of::<SeerStepReport>() != 0 {
        return Err(invalid(format!(
            "maybe_out_report is not aligned to {} bytes",
            std::mem::align_of::<SeerStepReport>()
        )));
    }
    if *head < std::mem::size_of::<SeerStepReport>() {
        return Err(invalid(format!(
            "maybe_out_report->struct_size = {head} but this library's struct is {} bytes: set struct_size = \
             sizeof(SeerStepReport)",
            std::mem::size_of::<SeerStepReport>()
        )));
    }
    Ok(())
}

/// The last successful step's loss per layer: for each layer, the mean over
/// the sequences fed to it before that step of its distillation loss (KL of
/// the target from the gate's block distribution, before the loss scale),
/// or NaN for a layer that was not fed. Writes `num_layers` values to
/// `out_losses` (`losses_len` entries; `SEER_BUFFER_TOO_SMALL` when fewer
/// than `num_layers`) and their count to `*out_written`; before the first
/// step it writes none and a count of 0.
#[no_mangle]
pub unsafe extern "C" fn seer_trainer_layer_losses(
    trainer: *const SeerTrainer,
    out_losses: *mut f64,
    losses_len: usize,
    out_written: *mut usize,
) -> SeerStatus {
    ffi_call!("seer_trainer_layer_losses", {
        let handle = trainer_handle(trainer)?;
        let losses = args::raw_slice("out_losses", out_losses, losses_len)?;
        let written = args::out_ptr("out_written", out_written)?;
        let state = lock(&handle);
        let Some(report) = &state.last else {
            written.write(0);
            return Ok(());
        };
        let n = report.layer_losses.len();
        if losses.len < n {
            return Err(FfiError::new(
                SeerStatus::SEER_BUFFER_TOO_SMALL,
                format!("losses_len = {} but the gate has {n} layers", losses.len),
            ));
        }
        for (slot, loss) in losses.get_mut().iter_mut().zip(&report.layer_losses) {
            *slot = loss.unwrap_or(f64::NAN);
        }
        written.write(n);
        Ok(())
    })
}

/// Optimizer steps taken so far (after `seer_trainer_load_optimizer_state`:
/// the saved run's).
#[no_mangle]
pub unsafe extern "C" fn seer_trainer_get_step(trainer: *const SeerTrainer, out_step: *mut u64) -> SeerStatus {
    ffi_call!("seer_trainer_get_step", {
        let handle = trainer_handle(trainer)?;
        let out = args::out_ptr("out_step", out_step)?;
        out.write(lock(&handle).trainer.steps_taken());
        Ok(())
    })
}

/// A NUL-terminated UTF-8 path argument.
unsafe fn path_arg<'a>(name: &str, ptr: *const c_char) -> FfiResult<&'a Path> {
    if ptr.is_null() {
        return Err(args::null(name));
    }
    let s = CStr::from_ptr(ptr).to_str().map_err(|_| invalid(format!("{name} is not valid UTF-8")))?;
    if s.is_empty() {
        return Err(invalid(format!("{name} is empty")));
    }
    Ok(Path::new(s))
}

/// Save the gate being trained as a gate directory `dir` (created when
/// missing): `config.json` and `attn_gate_weights.safetensors` with
/// upstream's tensor names, which `seer_gate_load` loads back. `dtype`:
/// `SEER_DTYPE_F32` keeps the weights exactly (to resume training),
/// `SEER_DTYPE_BF16` is upstream's release format. `maybe_base_config`
/// (NULL for none): the model's own `config.json` text, whose fields are
/// kept in the saved config (as upstream saves its gates). Refuses a `dir`
/// holding `attn_gate_weights.pth` or another `*.safetensors` file (the
/// loader would read that one, or refuse the ambiguity). A CUDA trainer
/// copies its weights back first, on the stream of its last successful feed.
#[no_mangle]
pub unsafe extern "C" fn seer_trainer_save_gate_dir(
    trainer: *const SeerTrainer,
    dir: *const c_char,
    dtype: u32,
    maybe_base_config: *const c_char,
) -> SeerStatus {
    ffi_call!("seer_trainer_save_gate_dir", {
        let handle = trainer_handle(trainer)?;
        let dir = path_arg("dir", dir)?;
        let dtype = match args::dtype_of("dtype", dtype)? {
            DType::F16 => return Err(FfiError::new(
                SeerStatus::SEER_UNSUPPORTED,
                "dtype SEER_DTYPE_F16: gates are saved as SEER_DTYPE_F32 (to resume) or SEER_DTYPE_BF16 (to release)",
            )),
            d => d,
        };
        let base = if maybe_base_config.is_null() {
            None
        } else {
            Some(
                CStr::from_ptr(maybe_base_config)
                    .to_str()
                    .map_err(|_| invalid("maybe_base_config is not valid UTF-8"))?,
            )
        };
        match &mut lock(&handle).trainer {
            Trainer::Host { trainer, .. } => trainer.save_gate_dir(dir, dtype, base)?,
            Trainer::Cuda { trainer, stream } => trainer.save_gate_dir(dir, dtype, base, stream.0)?,
        }
        Ok(())
    })
}

/// Write the optimizer state (AdamW moments, step counts) to the file
/// `path`, a `.safetensors` file (format in docs/distillation.md). Keep it
/// out of the gate directory. Between steps only: with gradients fed and not
/// yet stepped, `SEER_INVALID_ARGUMENT`. The file is the same for both
/// devices: a run saved on one resumes on the other.
#[no_mangle]
pub unsafe extern "C" fn seer_trainer_save_optimizer_state(
    trainer: *const SeerTrainer,
    path: *const c_char,
) -> SeerStatus {
    ffi_call!("seer_trainer_save_optimizer_state", {
        let handle = trainer_handle(trainer)?;
        let path = path_arg("path", path)?;
        match &mut lock(&handle).trainer {
            Trainer::Host { trainer, .. } => trainer.save_optimizer_state(path)?,
            Trainer::Cuda { trainer, stream } => trainer.save_optimizer_state(path, stream.0)?,
        }
        Ok(())
    })
}

/// Replace the trainer's optimizer state (and step count) with the one saved
/// at `path` by `seer_trainer_save_optimizer_state` for a gate of the same
/// shape. Between steps only. To resume a run: load the gate directory saved
/// (as F32) at the same step with `seer_gate_load`, `seer_trainer_create`
/// from it with the same params, then this (before the first feed: the
/// state goes to whichever device that feed fixes). `SEER_FORMAT_ERROR` for
/// a file that is not such a state or is of another gate shape;
/// `SEER_IO_ERROR` when it cannot be read. On failure the trainer is
/// unchanged.
#[no_mangle]
pub unsafe extern "C" fn seer_trainer_load_optimizer_state(
    trainer: *mut SeerTrainer,
    path: *const c_char,
) -> SeerStatus {
    ffi_call!("seer_trainer_load_optimizer_state", {
        let handle = trainer_handle(trainer)?;
        let path = path_arg("path", path)?;
        match &mut lock(&handle).trainer {
            Trainer::Host { trainer, .. } => trainer.load_optimizer_state(path)?,
            Trainer::Cuda { trainer, stream } => trainer.load_optimizer_state(path, stream.0)?,
        }
        Ok(())
    })
}
