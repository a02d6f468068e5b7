//! Gate self-distillation: training a gate from the frozen model's own
//! attention, without Python.
//!
//! The stage after sparse attention in the library's data flow:
//!
//! ```text
//!  post-RoPE Q, K ──► target (max-pooled attention map) ─┐
//!  pre-RoPE Q, K ──► gate logits ─────────────────────────┴─► KL loss ─► dW ─► AdamW step
//! ```
//!
//! - [`DistillBackend`] is what an implementation provides: the target of a
//!   layer and the loss with its gradient. [`CpuReference`] implements it
//!   with [`crate::reference::distill`]; GPU kernels implement the same trait
//!   (their target may stay on the device: it is an associated type).
//! - [`GateTrainer`] accumulates gradients over sequences and calls
//!   ([`GateTrainer::accumulate`]) and takes AdamW steps with upstream's
//!   schedule ([`GateTrainer::step`]); it saves the trained gate
//!   ([`GateTrainer::save_gate_dir`]) and its optimizer state
//!   ([`GateTrainer::save_optimizer_state`], [`GateTrainer::load_optimizer_state`]).
//! - [`cuda::CudaGateTrainer`] is the same trainer on the GPU (same recipe,
//!   step semantics and files; the released gate type), fed device tensors
//!   by an engine or host tensors by a program.
//! - [`dataset`] trains either one from a calibration data set on disk: the
//!   loop of `seerattn distill` (`--device cpu|cuda`).
//!
//! The C API's trainer handle (`seer_trainer_*`, `src/ffi/distill.rs`) runs
//! [`GateTrainer`] or [`cuda::CudaGateTrainer`], whichever device its first
//! feed's tensors are on.
//!
//! # Upstream's recipe (microsoft/SeerAttention, `distillation_prefill.py` and
//! `scripts/run_distillation_prefill.sh`), which [`TrainConfig::upstream`] follows
//! - Loss per layer: `KLDivLoss` (mean reduction) over the query-block rows
//!   after the first quarter, see [`crate::reference::distill`]; summed over
//!   layers and multiplied by `gate_loss_scale = 10`.
//! - One sequence per device, gradients averaged over devices and
//!   accumulation steps: the gradient of the **mean over sequences**.
//! - Hugging Face `Trainer` with `adamw_torch`: lr 1e-3, betas (0.9, 0.999),
//!   eps 1e-8, weight decay 0; `max_grad_norm` 1.0 (DeepSpeed's
//!   `gradient_clipping: auto`), clipping the global norm over all layers.
//! - `get_cosine_schedule_with_warmup`: 20 warmup steps, then cosine decay to 0
//!   at the last step ([`LrSchedule`]).
//!
//! # Optimizer state file
//!
//! [`GateTrainer::save_optimizer_state`] writes a `.safetensors` file:
//! - per layer `i` and projection `p` in `k`, `q` (`q` only for gates with a
//!   Q projection), F32 tensors shaped like the weight:
//!   `model.layers.{i}.self_attn.attn_gate.mask_linear_{p}.weight.exp_avg`
//!   (Adam's first moment `m`) and `....exp_avg_sq` (second moment `v`);
//! - header metadata (strings): `"seerattn_optimizer": "adamw"`,
//!   `"seerattn_optimizer_version": "1"`, `"step"`: optimizer steps taken
//!   (the schedule's position), `"layer_steps"`: a JSON array with each
//!   layer's own Adam step count (bias correction; a layer that received no
//!   data in a step is not stepped, as PyTorch skips parameters without
//!   gradient), and `"format": "pt"`.
//!
//! Keep the file out of the gate directory (or give it another extension):
//! the gate loader takes a directory's only `*.safetensors` file and refuses
//! a directory with two.
//!
//! To resume: load the gate directory saved at the same step
//! ([`crate::Gate::load_dir`], F32 weights), build a trainer with the same
//! [`TrainConfig`], then [`GateTrainer::load_optimizer_state`].

pub mod cuda;
pub mod dataset;

use crate::batch::Batch;
use crate::checkpoint::{self, RawTensor};
use crate::config::GateConfig;
use crate::error::{Error, Result};
use crate::gate::{Gate, LayerWeights, WeightRef};
use crate::reference::distill::{self as reference, DistillTarget, LayerGrads, LossParams, SeqLosses};
use crate::tensor::{DType, Tensor3};
use std::collections::HashMap;
use std::path::Path;

/// One implementation of the distillation math. Inputs reach it validated by
/// [`GateTrainer`] (or [`distill_target`]): shapes match the batch and the
/// gate config, the softmax scale is finite and positive.
pub trait DistillBackend {
    /// A layer's target, wherever the implementation keeps it.
    type Target;

    /// The target of one layer from post-RoPE `q: [total_q, hq, d]` and
    /// `k: [total_k, hkv, d]` (see [`crate::reference::distill::distill_target`]).
    fn target(
        &self,
        q: &Tensor3,
        k: &Tensor3,
        batch: &Batch,
        block_size: usize,
        softmax_scale: f64,
    ) -> Result<Self::Target>;

    /// Per-sequence losses of a layer's gate against `target`, and the
    /// gradient of their sum **added** into `grads` (see
    /// [`crate::reference::distill::distill_loss_and_grad`]).
    #[allow(clippy::too_many_arguments)]
    fn loss_and_grad(
        &self,
        config: &GateConfig,
        weights: &LayerWeights,
        q_nope: &Tensor3,
        k_nope: &Tensor3,
        batch: &Batch,
        target: &Self::Target,
        params: &LossParams,
        grads: &mut LayerGrads,
    ) -> Result<SeqLosses>;
}

/// The plain CPU reference ([`crate::reference::distill`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuReference;

impl DistillBackend for CpuReference {
    type Target = DistillTarget;

    fn target(
        &self,
        q: &Tensor3,
        k: &Tensor3,
        batch: &Batch,
        block_size: usize,
        softmax_scale: f64,
    ) -> Result<DistillTarget> {
        Ok(reference::distill_target(q, k, batch, block_size, softmax_scale))
    }

    fn loss_and_grad(
        &self,
        config: &GateConfig,
        weights: &LayerWeights,
        q_nope: &Tensor3,
        k_nope: &Tensor3,
        batch: &Batch,
        target: &DistillTarget,
        params: &LossParams,
        grads: &mut LayerGrads,
    ) -> Result<SeqLosses> {
        if target.layout != crate::mask::MaskLayout::new(batch, config.num_q_heads, config.block_size)? {
            return Err(Error::invalid("distillation target: computed for another batch or head count"));
        }
        Ok(reference::distill_loss_and_grad(config, weights, q_nope, k_nope, batch, target, params, grads))
    }
}

/// The distillation target of one layer on the CPU, validated: post-RoPE
/// `q: [batch.total_q(), hq, d]`, `k: [batch.total_k(), hkv, d]` (any dtype),
/// `hkv` dividing `hq`, `softmax_scale` finite and positive.
pub fn distill_target(
    q: &Tensor3,
    k: &Tensor3,
    batch: &Batch,
    block_size: usize,
    softmax_scale: f64,
) -> Result<DistillTarget> {
    check_target_inputs(q, k, batch, block_size, softmax_scale)?;
    CpuReference.target(q, k, batch, block_size, softmax_scale)
}

/// The distillation target of one layer on the GPU (kernels/distill.cu):
/// post-RoPE `q: [batch.total_q(), hq, d]` and `k: [batch.total_k(), hkv, d]`
/// device tensors (bf16 or f16, head_dim 64 or 128, rows 16-byte aligned),
/// written as f32 in the block mask's slot layout (the layout of
/// [`DistillTarget::values`]) to `target = (device address, values)`, at
/// least [`crate::gpu::distill::target_len`] values. `workspace = (device
/// address, bytes)` of at least [`crate::gpu::distill::workspace_bytes`] for
/// the GPU. Enqueued on `stream`: no allocation, copy or synchronization.
/// The block size is 64 (the kernel's tile).
///
/// # Safety
/// The device buffers must stay valid until the work completes; `stream`
/// must belong to their context (or be NULL).
pub unsafe fn distill_target_cuda(
    q: &crate::gpu::DeviceTensor,
    k: &crate::gpu::DeviceTensor,
    batch: &Batch,
    softmax_scale: f64,
    target: (u64, usize),
    workspace: (u64, usize),
    stream: crate::cuda::CUstream,
) -> Result<()> {
    if !(softmax_scale.is_finite() && softmax_scale > 0.0 && (softmax_scale as f32).is_normal()) {
        return Err(Error::invalid(format!(
            "distillation target: softmax_scale = {softmax_scale} must be finite and > 0"
        )));
    }
    crate::gpu::distill::distill_target(q, k, batch, softmax_scale as f32, target, workspace, stream)
}

fn check_target_inputs(q: &Tensor3, k: &Tensor3, batch: &Batch, block_size: usize, softmax_scale: f64) -> Result<()> {
    let [tq, hq, d] = q.shape();
    let [tk, hkv, dk] = k.shape();
    if tq != batch.total_q() || tk != batch.total_k() {
        return Err(Error::invalid(format!(
            "distillation target: q has {tq} rows and k {tk}; the batch has {} query and {} key tokens",
            batch.total_q(),
            batch.total_k()
        )));
    }
    if hq == 0 || hkv == 0 || hq % hkv != 0 || d == 0 || dk != d {
        return Err(Error::invalid(format!(
            "distillation target: q {:?} and k {:?} need kv heads dividing q heads and one head_dim",
            q.shape(),
            k.shape()
        )));
    }
    if block_size == 0 {
        return Err(Error::invalid("distillation target: block_size must be positive"));
    }
    if !(softmax_scale.is_finite() && softmax_scale > 0.0) {
        return Err(Error::invalid(format!(
            "distillation target: softmax_scale = {softmax_scale} must be finite and > 0"
        )));
    }
    Ok(())
}

/// AdamW's constants (PyTorch's `torch.optim.AdamW`, decoupled weight decay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate (the schedule multiplies it).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// Upstream's: lr 1e-3, betas (0.9, 0.999), eps 1e-8 (Hugging Face's
    /// defaults, which upstream's script keeps), weight decay 0.
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Linear warmup then cosine decay, as Hugging Face's
/// `get_cosine_schedule_with_warmup` (one half cosine).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    /// Steps of linear warmup from 0 (upstream: 20).
    pub warmup_steps: u64,
    /// Steps of the whole run; the factor reaches 0 here and stays 0 after.
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning-rate factor of optimizer step `step` (0-based: the number
    /// of steps taken before it). During warmup `step / warmup_steps`, so the
    /// first step has factor 0 (Hugging Face steps the scheduler after the
    /// optimizer: the first update moves nothing, but Adam's moments record
    /// its gradient); then `0.5 * (1 + cos(pi * progress))`.
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let progress =
            (step - self.warmup_steps) as f64 / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
    }
}

/// Everything a training run is configured by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    pub adamw: AdamWConfig,
    pub schedule: LrSchedule,
    pub loss: LossParams,
    /// Factor on the summed per-layer losses before the gradient is taken
    /// (upstream's `gate_loss_scale`, 10). It matters through clipping and
    /// Adam's eps only.
    pub loss_scale: f64,
    /// Clip the gradient's global L2 norm (all fed layers together) to this,
    /// as `torch.nn.utils.clip_grad_norm_` (upstream: 1.0). `None`: no clipping.
    pub max_grad_norm: Option<f64>,
}

impl TrainConfig {
    /// Upstream's recipe for a run of `total_steps` optimizer steps.
    pub fn upstream(total_steps: u64) -> Self {
        TrainConfig {
            adamw: AdamWConfig::default(),
            schedule: LrSchedule { warmup_steps: 20, total_steps },
            loss: LossParams::default(),
            loss_scale: 10.0,
            max_grad_norm: Some(1.0),
        }
    }

    /// Check every number; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let a = &self.adamw;
        let bad = |what: String| Err(Error::invalid(format!("train config: {what}")));
        if !(a.lr.is_finite() && a.lr >= 0.0) {
            return bad(format!("lr = {} must be finite and >= 0", a.lr));
        }
        for (name, b) in [("beta1", a.beta1), ("beta2", a.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} = {b} must be in [0, 1)"));
            }
        }
        if !(a.eps.is_finite() && a.eps > 0.0) {
            return bad(format!("eps = {} must be finite and > 0", a.eps));
        }
        if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
            return bad(format!("weight_decay = {} must be finite and >= 0", a.weight_decay));
        }
        if !(0.0..1.0).contains(&self.loss.skip_fraction) {
            return bad(format!("skip_fraction = {} must be in [0, 1)", self.loss.skip_fraction));
        }
        if !(self.loss_scale.is_finite() && self.loss_scale > 0.0) {
            return bad(format!("loss_scale = {} must be finite and > 0", self.loss_scale));
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad(format!("max_grad_norm = {n} must be finite and > 0"));
            }
        }
        Ok(())
    }
}

/// AdamW moments of one parameter tensor, f32 like PyTorch's state of f32
/// parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamState {
    /// First moment (`exp_avg`).
    pub m: Vec<f32>,
    /// Second moment (`exp_avg_sq`).
    pub v: Vec<f32>,
    /// Updates applied to this tensor (its bias correction).
    pub step: u64,
}

impl AdamState {
    /// Zero moments for a tensor of `len` elements.
    pub fn new(len: usize) -> Self {
        AdamState { m: vec![0.0; len], v: vec![0.0; len], step: 0 }
    }

    /// One AdamW update of `param` with gradient `grad` at learning rate `lr`
    /// (the schedule already applied), in the order of PyTorch's single-tensor
    /// AdamW: decay the parameter, update the moments, step by the
    /// bias-corrected ratio. Arithmetic in f64, stored as f32.
    pub fn update(&mut self, param: &mut [f32], grad: &[f64], lr: f64, c: &AdamWConfig) {
        debug_assert!(param.len() == grad.len() && grad.len() == self.m.len());
        self.step += 1;
        let bias1 = 1.0 - c.beta1.powf(self.step as f64);
        let bias2_sqrt = (1.0 - c.beta2.powf(self.step as f64)).sqrt();
        for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(&mut self.m).zip(&mut self.v) {
            let decayed = f64::from(*p) * (1.0 - lr * c.weight_decay);
            let m_new = c.beta1 * f64::from(*m) + (1.0 - c.beta1) * g;
            let v_new = c.beta2 * f64::from(*v) + (1.0 - c.beta2) * g * g;
            *m = m_new as f32;
            *v = v_new as f32;
            let denom = f64::from(*v).sqrt() / bias2_sqrt + c.eps;
            *p = (decayed - lr / bias1 * f64::from(*m) / denom) as f32;
        }
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Optimizer steps taken, this one included.
    pub step: u64,
    /// Learning rate of this step (peak times the schedule's factor).
    pub lr: f64,
    /// Global L2 norm of the scaled gradient before clipping.
    pub grad_norm: f64,
    /// Per layer: the mean per-sequence loss accumulated since the last step
    /// (upstream's per-layer `mask_loss`, before the loss scale), or `None`
    /// for a layer that was fed nothing (and was not stepped).
    pub layer_losses: Vec<Option<f64>>,
    /// Per layer: sequences accumulated into this step.
    pub layer_sequences: Vec<usize>,
}

/// One layer's accumulated gradient and optimizer state.
#[derive(Clone, Debug)]
struct LayerState {
    grads: LayerGrads,
    sequences: usize,
    loss_sum: f64,
    adam_k: AdamState,
    adam_q: Option<AdamState>,
}

/// Trains a gate's projections by self-distillation (see the module docs):
/// feed each layer's inputs with [`GateTrainer::accumulate`] (any number of
/// sequences and calls), then [`GateTrainer::step`].
#[derive(Debug)]
pub struct GateTrainer<B: DistillBackend = CpuReference> {
    backend: B,
    gate: Gate,
    config: TrainConfig,
    layers: Vec<LayerState>,
    step: u64,
}

impl GateTrainer<CpuReference> {
    /// A trainer on the CPU reference, starting from `gate`'s weights.
    pub fn new(gate: Gate, config: TrainConfig) -> Result<Self> {
        Self::with_backend(CpuReference, gate, config)
    }
}

impl<B: DistillBackend> GateTrainer<B> {
    /// A trainer on `backend`, starting from `gate`'s weights (every layer to
    /// be trained must have weights; see [`init_gate`] for random ones).
    pub fn with_backend(backend: B, gate: Gate, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        let c = gate.config();
        let layers = (0..c.num_layers)
            .map(|_| LayerState {
                grads: LayerGrads::zeros(c),
                sequences: 0,
                loss_sum: 0.0,
                adam_k: AdamState::new(c.k_weight_shape().iter().product()),
                adam_q: c.q_weight_shape().map(|s| AdamState::new(s.iter().product())),
            })
            .collect();
        Ok(GateTrainer { backend, gate, config, layers, step: 0 })
    }

    /// The gate being trained, with its current weights.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Optimizer steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The AdamW state of layer `layer`'s K and (when the gate has one) Q
    /// projection.
    pub fn adam_state(&self, layer: usize) -> Result<(&AdamState, Option<&AdamState>)> {
        self.gate.layer(layer)?;
        let l = &self.layers[layer];
        Ok((&l.adam_k, l.adam_q.as_ref()))
    }

    /// Every layer's K-projection AdamW state (copies, in layer order),
    /// what the GPU trainer resumes from
    /// ([`cuda::CudaGateTrainer::with_adam_states`], with
    /// [`GateTrainer::steps_taken`]).
    pub fn k_adam_states(&self) -> Vec<AdamState> {
        self.layers.iter().map(|l| l.adam_k.clone()).collect()
    }

    /// The target of one layer through this trainer's backend, validated as
    /// [`distill_target`] validates (plus the gate's head counts and head_dim).
    pub fn target(&self, q: &Tensor3, k: &Tensor3, batch: &Batch, softmax_scale: f64) -> Result<B::Target> {
        let c = self.gate.config();
        check_target_inputs(q, k, batch, c.block_size, softmax_scale)?;
        let want = (c.num_q_heads, c.num_kv_heads, c.head_dim);
        if (q.shape()[1], k.shape()[1], q.shape()[2]) != want {
            return Err(Error::invalid(format!(
                "distillation target: q {:?} and k {:?} do not have the gate's (q heads, kv heads, head_dim) {want:?}",
                q.shape(),
                k.shape()
            )));
        }
        self.backend.target(q, k, batch, c.block_size, softmax_scale)
    }

    /// Feed one layer a batch: its target from post-RoPE `q`, `k` (at the
    /// attention's `softmax_scale`), then the loss of the gate on pre-RoPE
    /// `q_nope`, `k_nope` and its gradient, added to the layer's accumulator.
    /// Returns the batch's per-sequence losses.
    #[allow(clippy::too_many_arguments)]
    pub fn accumulate(
        &mut self,
        layer: usize,
        q_nope: &Tensor3,
        k_nope: &Tensor3,
        q: &Tensor3,
        k: &Tensor3,
        batch: &Batch,
        softmax_scale: f64,
    ) -> Result<SeqLosses> {
        let target = self.target(q, k, batch, softmax_scale)?;
        self.accumulate_target(layer, q_nope, k_nope, batch, &target)
    }

    /// As [`GateTrainer::accumulate`], with the layer's target already
    /// computed for `batch` (the same sequences seen again, as in a test that
    /// trains several epochs on fixed data).
    pub fn accumulate_target(
        &mut self,
        layer: usize,
        q_nope: &Tensor3,
        k_nope: &Tensor3,
        batch: &Batch,
        target: &B::Target,
    ) -> Result<SeqLosses> {
        let weights = self.gate.layer(layer)?;
        self.gate.check_inputs(q_nope, k_nope, batch)?;
        let state = &mut self.layers[layer];
        let losses = self.backend.loss_and_grad(
            self.gate.config(),
            weights,
            q_nope,
            k_nope,
            batch,
            target,
            &self.config.loss,
            &mut state.grads,
        )?;
        state.sequences += losses.per_seq.len();
        state.loss_sum += losses.sum();
        Ok(losses)
    }

    /// One optimizer step over every layer fed since the last step: the
    /// gradient of `loss_scale * Σ_layers mean_sequences(loss)`, clipped to
    /// `max_grad_norm` (global norm), AdamW at the schedule's learning rate.
    /// Layers fed nothing are left alone. Errors when nothing was fed, and
    /// when the gradient is not finite (then the accumulated gradients are
    /// discarded, and weights, moments and the step count stay as they were).
    pub fn step(&mut self) -> Result<StepReport> {
        if self.layers.iter().all(|l| l.sequences == 0) {
            return Err(Error::invalid("optimizer step: no layer was fed a batch since the last step"));
        }
        // Mean over sequences, times the loss scale, per layer.
        let scales: Vec<f64> = self
            .layers
            .iter()
            .map(|l| if l.sequences == 0 { 0.0 } else { self.config.loss_scale / l.sequences as f64 })
            .collect();
        let grad_norm =
            self.layers.iter().zip(&scales).map(|(l, s)| s * s * l.grads.squared_norm()).sum::<f64>().sqrt();
        if !grad_norm.is_finite() {
            // One batch with NaN or infinite activations must not poison the
            // gate: drop what was accumulated, keep weights and moments.
            self.discard_accumulated();
            return Err(Error::invalid(format!(
                "optimizer step: the accumulated gradient is not finite (norm {grad_norm}; non-finite inputs?); \
                 it was discarded and nothing was updated"
            )));
        }
        // torch.nn.utils.clip_grad_norm_: scale by max / (norm + 1e-6) when below 1.
        let clip = self.config.max_grad_norm.map_or(1.0, |max| (max / (grad_norm + 1e-6)).min(1.0));
        let lr = self.config.adamw.lr * self.config.schedule.factor(self.step);
        let adamw = self.config.adamw;
        let mut layer_losses = Vec::with_capacity(self.layers.len());
        let mut layer_sequences = Vec::with_capacity(self.layers.len());
        for (layer, (state, scale)) in self.layers.iter_mut().zip(&scales).enumerate() {
            layer_sequences.push(state.sequences);
            if state.sequences == 0 {
                layer_losses.push(None);
                continue;
            }
            layer_losses.push(Some(state.loss_sum / state.sequences as f64));
            let factor = scale * clip;
            let weights = self.gate.layer_mut(layer)?;
            let grad_k: Vec<f64> = state.grads.k_proj.iter().map(|g| g * factor).collect();
            state.adam_k.update(&mut weights.k_proj, &grad_k, lr, &adamw);
            if let (Some(wq), Some(gq), Some(adam_q)) = (&mut weights.q_proj, &state.grads.q_proj, &mut state.adam_q) {
                let grad_q: Vec<f64> = gq.iter().map(|g| g * factor).collect();
                adam_q.update(wq, &grad_q, lr, &adamw);
            }
            state.grads.clear();
            state.sequences = 0;
            state.loss_sum = 0.0;
        }
        self.step += 1;
        Ok(StepReport { step: self.step, lr, grad_norm, layer_losses, layer_sequences })
    }

    /// Replace every layer's K-projection AdamW state and the step count
    /// (the GPU trainer saves through this; Q states stay as they are).
    pub(crate) fn set_adam_states(&mut self, k_states: Vec<AdamState>, step: u64) -> Result<()> {
        if k_states.len() != self.layers.len() {
            return Err(Error::invalid("optimizer state: one AdamW state per layer"));
        }
        for (state, adam) in self.layers.iter_mut().zip(k_states) {
            if adam.m.len() != state.adam_k.m.len() {
                return Err(Error::invalid("optimizer state: a layer's moments have the wrong length"));
            }
            state.adam_k = adam;
        }
        self.step = step;
        Ok(())
    }

    /// Save the gate being trained as a gate directory
    /// ([`checkpoint::save_gate_dir`]): F32 weights to resume from, BF16 to
    /// release as upstream does.
    pub fn save_gate_dir(&self, dir: &Path, dtype: DType, base_config: Option<&str>) -> Result<()> {
        checkpoint::save_gate_dir(&self.gate, dir, dtype, base_config)
    }

    /// Drop every gradient and loss accumulated since the last step.
    pub fn discard_accumulated(&mut self) {
        for state in &mut self.layers {
            state.grads.clear();
            state.sequences = 0;
            state.loss_sum = 0.0;
        }
    }

    fn ensure_between_steps(&self, what: &str) -> Result<()> {
        if self.layers.iter().any(|l| l.sequences > 0) {
            return Err(Error::invalid(format!(
                "{what}: gradients are accumulated but not applied; call step() first (optimizer state is saved between steps)"
            )));
        }
        Ok(())
    }

    /// Write the optimizer state to `path` (format in the module docs).
    /// Between steps only: with gradients accumulated and not yet applied it
    /// is an error.
    pub fn save_optimizer_state(&self, path: &Path) -> Result<()> {
        self.ensure_between_steps("save optimizer state")?;
        let c = self.gate.config();
        let mut tensors = Vec::new();
        for (layer, state) in self.layers.iter().enumerate() {
            let mut push = |proj: &str, shape: [usize; 3], adam: &AdamState| {
                let name = format!("model.layers.{layer}.self_attn.attn_gate.mask_linear_{proj}.weight");
                tensors.push(f32_tensor(format!("{name}.exp_avg"), shape, &adam.m));
                tensors.push(f32_tensor(format!("{name}.exp_avg_sq"), shape, &adam.v));
            };
            push("k", c.k_weight_shape(), &state.adam_k);
            if let (Some(shape), Some(adam)) = (c.q_weight_shape(), &state.adam_q) {
                push("q", shape, adam);
            }
        }
        let layer_steps: Vec<u64> = self.layers.iter().map(|l| l.adam_k.step).collect();
        let metadata = HashMap::from([
            ("seerattn_optimizer".to_string(), "adamw".to_string()),
            ("seerattn_optimizer_version".to_string(), "1".to_string()),
            ("step".to_string(), self.step.to_string()),
            ("layer_steps".to_string(), serde_json::to_string(&layer_steps).expect("integers serialize")),
        ]);
        checkpoint::write_safetensors_with_metadata(path, &tensors, &metadata)
    }

    /// Replace the optimizer state with the one saved at `path` by
    /// [`GateTrainer::save_optimizer_state`] for a gate of the same shape.
    /// Between steps only. The weights are not in the file: load them from
    /// the gate directory saved at the same step.
    pub fn load_optimizer_state(&mut self, path: &Path) -> Result<()> {
        self.ensure_between_steps("load optimizer state")?;
        let (tensors, metadata) = checkpoint::read_safetensors_with_metadata(path)?;
        let file = path.display().to_string();
        let fmt = |m: String| Error::format(file.clone(), m);
        let meta = |key: &str| metadata.get(key).ok_or_else(|| fmt(format!("metadata has no '{key}'")));
        if meta("seerattn_optimizer")? != "adamw" || meta("seerattn_optimizer_version")? != "1" {
            return Err(fmt("not a seerattn AdamW state (version 1)".into()));
        }
        let step: u64 = meta("step")?.parse().map_err(|_| fmt("metadata 'step' is not an integer".into()))?;
        let layer_steps: Vec<u64> = serde_json::from_str(meta("layer_steps")?)
            .map_err(|_| fmt("metadata 'layer_steps' is not a JSON array of integers".into()))?;
        let c = self.gate.config().clone();
        if layer_steps.len() != c.num_layers {
            return Err(fmt(format!("{} layer steps for a gate of {} layers", layer_steps.len(), c.num_layers)));
        }
        let mut by_name: HashMap<&str, &RawTensor> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut take = |name: String, shape: [usize; 3]| -> Result<Vec<f32>> {
            let t = by_name.remove(name.as_str()).ok_or_else(|| fmt(format!("missing tensor '{name}'")))?;
            if t.dtype != DType::F32 || t.shape != shape {
                return Err(fmt(format!("tensor '{name}': {} {:?}, expected f32 {shape:?}", t.dtype.name(), t.shape)));
            }
            let v = t.to_f32();
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(fmt(format!("tensor '{name}': element {i} is not finite")));
            }
            Ok(v)
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for (layer, &steps) in layer_steps.iter().enumerate() {
            let mut read = |proj: &str, shape: [usize; 3]| -> Result<AdamState> {
                let name = format!("model.layers.{layer}.self_attn.attn_gate.mask_linear_{proj}.weight");
                let m = take(format!("{name}.exp_avg"), shape)?;
                let v = take(format!("{name}.exp_avg_sq"), shape)?;
                Ok(AdamState { m, v, step: steps })
            };
            let adam_k = read("k", c.k_weight_shape())?;
            let adam_q = c.q_weight_shape().map(|s| read("q", s)).transpose()?;
            layers.push((adam_k, adam_q));
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(fmt(format!("unexpected tensor '{extra}'")));
        }
        for (state, (adam_k, adam_q)) in self.layers.iter_mut().zip(layers) {
            state.adam_k = adam_k;
            state.adam_q = adam_q;
        }
        self.step = step;
        Ok(())
    }
}

fn f32_tensor(name: String, shape: [usize; 3], values: &[f32]) -> RawTensor {
    RawTensor {
        name,
        dtype: DType::F32,
        shape: shape.to_vec(),
        data: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// A gate of `config` with random weights in every layer, to train from:
/// each projection uniform in `±1/sqrt(fan_in)` (PyTorch's `nn.Linear`
/// default bound; `fan_in` the projection's input width), from a fixed
/// splitmix64 stream of `seed`, so runs reproduce.
pub fn init_gate(config: GateConfig, seed: u64) -> Result<Gate> {
    let mut gate = Gate::new(config)?;
    let c = gate.config().clone();
    let mut state = seed;
    let mut uniform = |bound: f32| {
        // splitmix64, top 24 bits as a fraction in [0, 1).
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
        bound * (2.0 * unit - 1.0)
    };
    let mut random = |shape: [usize; 3]| -> Vec<u8> {
        let bound = 1.0 / (shape[1] as f32).sqrt();
        (0..shape.iter().product::<usize>()).flat_map(|_| uniform(bound).to_le_bytes()).collect()
    };
    for layer in 0..c.num_layers {
        let k_shape = c.k_weight_shape();
        let k = random(k_shape);
        let q = c.q_weight_shape().map(|s| (s, random(s)));
        gate.set_layer_weights(
            layer,
            WeightRef { dtype: DType::F32, shape: k_shape, bytes: &k },
            q.as_ref().map(|(s, b)| WeightRef { dtype: DType::F32, shape: *s, bytes: b }),
        )?;
    }
    Ok(gate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_hugging_face() {
        let s = LrSchedule { warmup_steps: 20, total_steps: 120 };
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(10), 0.5);
        assert_eq!(s.factor(20), 1.0);
        // Halfway through the decay: cos(pi/2) = 0, factor 0.5.
        assert!((s.factor(70) - 0.5).abs() < 1e-12);
        assert!(s.factor(119) > 0.0 && s.factor(119) < 1e-3);
        assert_eq!(s.factor(120), 0.0);
        assert_eq!(s.factor(500), 0.0);
        for step in 21..120 {
            assert!(s.factor(step) < s.factor(step - 1), "decays monotonically");
        }
    }

    #[test]
    fn adamw_matches_pytorch_by_hand() {
        // PyTorch AdamW, one tensor [1.0, -2.0], grads [0.5, 0.1] then [-0.2, 0.3],
        // lr 0.1, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01, written out.
        let c = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let mut p = [1.0f32, -2.0];
        let mut s = AdamState::new(2);
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, g) in [[0.5, 0.1], [-0.2, 0.3]].iter().enumerate() {
            s.update(&mut p, g, c.lr, &c);
            let t = (t + 1) as i32;
            for i in 0..2 {
                want[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let m_hat = m[i] / (1.0 - 0.9f64.powi(t));
                let v_hat = v[i] / (1.0 - 0.999f64.powi(t));
                want[i] -= 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
            }
        }
        for i in 0..2 {
            assert!((f64::from(p[i]) - want[i]).abs() < 1e-6, "{i}: {} vs {}", p[i], want[i]);
        }
        assert_eq!(s.step, 2);
        // The first step of Adam moves every parameter by about lr, whatever the gradient's size.
        let mut p = [0.0f32];
        AdamState::new(1).update(&mut p, &[1e-5], 0.01, &AdamWConfig::default());
        assert!((p[0] + 0.01).abs() < 1e-5, "{}", p[0]);
    }
}
