//! Gate self-distillation on the GPU: [`CudaGateTrainer`], the device
//! counterpart of [`super::GateTrainer`] with the same recipe
//! ([`super::TrainConfig`]), the same step semantics and the same files.
//!
//! Per layer the trainer keeps on the device: f32 master weights, Adam's
//! moments, the accumulated f32 gradient, and the bf16 copy of the weights
//! that the gate's kernels read (a [`DeviceGate`]). A feed
//! ([`CudaGateTrainer::accumulate`]) enqueues the target
//! (kernels/distill.cu), the gate's logits and the loss with its gradient
//! (kernels/distill_grad.cu) on the caller's stream, then waits for it to
//! return the batch's losses. A step reads the gradient's squared norm
//! back (for clipping and the report) and runs AdamW on the device.
//!
//! Training is not a hot path: the trainer owns its scratch (grown when a
//! larger batch arrives), synchronizes the caller's stream where it must
//! read results, and copies weights to the host only when asked
//! ([`CudaGateTrainer::gate`], saving). Every call returns with the
//! trainer's own work on its stream complete (a feed reads its losses
//! back, a step waits for its AdamW kernels), so consecutive calls may use
//! different streams of the trainer's context: nothing of the trainer is
//! left in flight on one stream when the next call starts on another. The
//! released gate type only (a K projection per query head, head_dim 64 or
//! 128), as the GPU gate.
//!
//! An engine feeds the device tensors of its own forward pass
//! ([`CudaGateTrainer::accumulate`]); a program training from files feeds
//! host tensors, which the trainer copies into device memory it owns
//! ([`CudaGateTrainer::accumulate_host`]). A run resumed from a saved
//! optimizer state starts with [`CudaGateTrainer::with_adam_states`] (or
//! [`CudaGateTrainer::load_optimizer_state`]).

use super::{AdamState, StepReport, TrainConfig};
use crate::batch::Batch;
use crate::checkpoint;
use crate::config::GateConfig;
use crate::cuda::{self, kernels, CUstream, Ctx, DeviceBuffer};
use crate::error::{Error, Result};
use crate::gate::{Gate, WeightRef};
use crate::gpu::distill as gpu;
use crate::gpu::gate::{check_supported, DeviceGate};
use crate::gpu::{check_buffer, convert, DeviceTensor};
use crate::reference::distill::SeqLosses;
use crate::tensor::{DType, Layout3, Tensor3};
use std::ffi::c_void;
use std::path::Path;

/// `seer::distill_grad::AdamArgs` (kernels/distill_grad.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AdamArgs {
    param: u64,
    m: u64,
    v: u64,
    grad: u64,
    weights: u64,
    n: i64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    bias1: f64,
    bias2_sqrt: f64,
    factor: f64,
}

/// CTAs of the sum-of-squares kernel (its partial sums).
const NORM_CTAS: usize = 256;

/// One layer's device state.
struct LayerState {
    master: DeviceBuffer,
    m: DeviceBuffer,
    v: DeviceBuffer,
    grads: DeviceBuffer,
    /// Adam updates applied (bias correction).
    adam_step: u64,
    sequences: usize,
    loss_sum: f64,
}

/// Scratch the trainer owns, grown to the largest batch fed.
#[derive(Default)]
struct Scratch {
    target: Option<DeviceBuffer>,
    target_ws: Option<DeviceBuffer>,
    loss_ws: Option<DeviceBuffer>,
    losses: Option<DeviceBuffer>,
    /// Device copies of host inputs (q_nope, k_nope, q, k) for
    /// [`CudaGateTrainer::accumulate_host`].
    inputs: [Option<DeviceBuffer>; 4],
    /// 16-bit copies of f32 device inputs (q_nope, k_nope, q, k).
    rounded: [Option<DeviceBuffer>; 4],
}

fn ensure(buf: &mut Option<DeviceBuffer>, ctx: &Ctx, len: usize) -> Result<(u64, usize)> {
    if buf.as_ref().map_or(true, |b| b.len() < len) {
        *buf = None; // free first: the old one may be large
        *buf = Some(DeviceBuffer::zeroed(ctx, len.max(256))?);
    }
    let b = buf.as_ref().expect("just ensured");
    Ok((b.ptr(), b.len()))
}

/// Trains a gate's K projections by self-distillation on one GPU.
pub struct CudaGateTrainer {
    gate: Gate,
    config: TrainConfig,
    ctx: Ctx,
    device: DeviceGate,
    layers: Vec<Option<LayerState>>,
    norms: DeviceBuffer,
    scratch: Scratch,
    step: u64,
    /// The host copy of the weights is older than the device's.
    host_stale: bool,
}

impl CudaGateTrainer {
    /// A trainer on `ctx` starting from `gate`'s weights (layers without
    /// weights are not trained). Uploads them (synchronously).
    pub fn new(gate: Gate, config: TrainConfig, ctx: &Ctx) -> Result<Self> {
        config.validate()?;
        check_supported(gate.config())?;
        let device = DeviceGate::upload(&gate, ctx)?;
        let mut layers = Vec::with_capacity(gate.config().num_layers);
        for layer in 0..gate.config().num_layers {
            if !gate.has_layer(layer) {
                layers.push(None);
                continue;
            }
            let w = &gate.layer(layer)?.k_proj;
            let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            layers.push(Some(LayerState {
                master: DeviceBuffer::upload(ctx, &bytes)?,
                m: DeviceBuffer::zeroed(ctx, bytes.len())?,
                v: DeviceBuffer::zeroed(ctx, bytes.len())?,
                grads: DeviceBuffer::zeroed(ctx, bytes.len())?,
                adam_step: 0,
                sequences: 0,
                loss_sum: 0.0,
            }));
        }
        let norms = DeviceBuffer::zeroed(ctx, NORM_CTAS * 8)?;
        Ok(CudaGateTrainer {
            gate,
            config,
            ctx: *ctx,
            device,
            layers,
            norms,
            scratch: Scratch::default(),
            step: 0,
            host_stale: false,
        })
    }

    /// A trainer on `ctx` that resumes a run: `gate`'s weights, and for
    /// every layer with weights the AdamW state of its K projection
    /// (`adam[layer]`, as [`super::GateTrainer::adam_state`] holds it: the
    /// moments in the weights' layout and the layer's update count) after
    /// `step` optimizer steps (the schedule's position). Entries of layers
    /// without weights are not read. Errors (before anything is uploaded)
    /// when `adam` does not hold one state per layer, a state's moments have
    /// the wrong length, or a moment is not finite.
    pub fn with_adam_states(gate: Gate, config: TrainConfig, ctx: &Ctx, adam: &[AdamState], step: u64) -> Result<Self> {
        check_adam_states(&gate, adam)?;
        let mut trainer = Self::new(gate, config, ctx)?;
        trainer.set_adam_states(adam, step)?;
        Ok(trainer)
    }

    /// Replace the moments and step counts of every layer with weights
    /// (synchronously; between steps, with no work of the trainer pending).
    fn set_adam_states(&mut self, adam: &[AdamState], step: u64) -> Result<()> {
        check_adam_states(&self.gate, adam)?;
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (state, adam) in self.layers.iter_mut().zip(adam) {
            let Some(state) = state else { continue };
            state.m.write(&bytes(&adam.m))?;
            state.v.write(&bytes(&adam.v))?;
            state.adam_step = adam.step;
        }
        self.step = step;
        Ok(())
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The config of the gate being trained (its weights: [`CudaGateTrainer::gate`]).
    pub fn gate_config(&self) -> &GateConfig {
        self.gate.config()
    }

    /// Optimizer steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The gate with its current weights, copied from the device when they
    /// changed since the last call (after the work on `stream`).
    ///
    /// # Safety
    /// `stream` must be a live stream of the trainer's context, or NULL.
    pub unsafe fn gate(&mut self, stream: CUstream) -> Result<&Gate> {
        if self.host_stale {
            for layer in 0..self.layers.len() {
                let Some(state) = &self.layers[layer] else { continue };
                let bytes = state.master.read(stream)?;
                let shape = self.gate.config().k_weight_shape();
                self.gate.set_layer_weights(layer, WeightRef { dtype: DType::F32, shape, bytes: &bytes }, None)?;
            }
            self.host_stale = false;
        }
        Ok(&self.gate)
    }

    /// Layer `layer`'s gradient accumulated since the last step (f32, the
    /// weights' layout; the sum over the sequences fed of each one's loss
    /// gradient, before the mean, the loss scale and clipping), after the
    /// work on `stream`.
    ///
    /// # Safety
    /// `stream` must be a live stream of the trainer's context, or NULL.
    pub unsafe fn gradient(&self, layer: usize, stream: CUstream) -> Result<Vec<f32>> {
        let bytes = self.layer_state(layer)?.grads.read(stream)?;
        Ok(bytes.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn layer_state(&self, layer: usize) -> Result<&LayerState> {
        match self.layers.get(layer) {
            Some(Some(s)) => Ok(s),
            Some(None) => Err(Error::invalid(format!("layer {layer} has no weights: it is not trained"))),
            None => {
                Err(Error::invalid(format!("layer {layer} out of range (the gate has {} layers)", self.layers.len())))
            }
        }
    }

    /// Feed one layer a batch, as [`super::GateTrainer::accumulate`]: the
    /// target from post-RoPE `q`, `k` at the attention's `softmax_scale`,
    /// the loss of the gate on pre-RoPE `q_nope`, `k_nope` and its gradient,
    /// added to the layer's accumulator. Device tensors of the trainer's
    /// context: bf16 or f16 with rows 16-byte aligned and unit dim stride,
    /// or f32 with any strides, rounded on the device first (pre-RoPE to
    /// bf16 as the gate rounds them, post-RoPE `q` and `k` to the other
    /// one's 16-bit dtype, bf16 when both are f32, as the prefill rounds q);
    /// enqueued on `stream`, which is then synchronized to return the
    /// batch's per-sequence losses. The inputs must be ready on `stream`
    /// (written by work ordered before this call on it).
    ///
    /// Errors before anything is enqueued for: a layer without weights,
    /// shapes not the gate's or the batch's, a tensor that is not device
    /// memory of its size in the trainer's context.
    ///
    /// # Safety
    /// The tensors must be valid device memory until this returns; `stream`
    /// must belong to the trainer's context (or be NULL).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn accumulate(
        &mut self,
        layer: usize,
        q_nope: &DeviceTensor,
        k_nope: &DeviceTensor,
        q: &DeviceTensor,
        k: &DeviceTensor,
        batch: &Batch,
        softmax_scale: f64,
        stream: CUstream,
    ) -> Result<SeqLosses> {
        self.layer_state(layer)?;
        let c = self.gate.config().clone();
        let want = (c.num_q_heads, c.num_kv_heads, c.head_dim);
        if (q.layout.shape[1], k.layout.shape[1], q.layout.shape[2]) != want {
            return Err(Error::invalid(format!(
                "distillation: q {:?} and k {:?} do not have the gate's (q heads, kv heads, head_dim) {want:?}",
                q.layout.shape, k.layout.shape
            )));
        }
        // Every input in the trainer's context, before anything is enqueued
        // (the kernels check them too, but against the context of `q` or of
        // the weights, one at a time, after earlier launches).
        for (name, t) in [("q_nope", q_nope), ("k_nope", k_nope), ("q", q), ("k", k)] {
            check_buffer(&self.ctx, "the trainer", name, t.ptr, t.span_bytes(name)?)?;
        }
        let ctx = self.ctx;
        let losses = self.enqueue_feed(layer, &c, q_nope, k_nope, q, k, batch, softmax_scale, stream);
        let per_seq = match losses {
            Ok(l) => l,
            Err(e) => {
                // A launch failed after others were enqueued: let them finish
                // before the scratch they use is reused, maybe on another stream.
                let _ = cuda::sync_stream(&ctx, stream);
                return Err(e);
            }
        };
        let state = self.layers[layer].as_mut().expect("checked");
        state.sequences += batch.len();
        state.loss_sum += per_seq.iter().sum::<f64>();
        Ok(SeqLosses { per_seq })
    }

    /// The launches of a feed, then its losses read back (synchronizing `stream`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn enqueue_feed(
        &mut self,
        layer: usize,
        c: &GateConfig,
        q_nope: &DeviceTensor,
        k_nope: &DeviceTensor,
        q: &DeviceTensor,
        k: &DeviceTensor,
        batch: &Batch,
        softmax_scale: f64,
        stream: CUstream,
    ) -> Result<Vec<f64>> {
        let ctx = self.ctx;
        // The kernels read 16-bit rows. f32 inputs are rounded on the device
        // into trainer scratch as the inference path rounds them: pre-RoPE
        // q_nope and k_nope to bf16 (as the gate does), post-RoPE q and k to
        // the other one's 16-bit dtype, bf16 when both are f32 (as the
        // prefill rounds an f32 q to the keys' dtype).
        let post16 = |other: &DeviceTensor| if other.dtype == DType::F32 { DType::BF16 } else { other.dtype };
        let wanted = [DType::BF16, DType::BF16, post16(k), post16(q)];
        let mut inputs = [*q_nope, *k_nope, *q, *k];
        for (i, name) in ["q_nope", "k_nope", "q", "k"].into_iter().enumerate() {
            if inputs[i].dtype == DType::F32 {
                let dst = ensure(&mut self.scratch.rounded[i], &ctx, convert::packed_bytes(inputs[i].layout.shape))?;
                inputs[i] = convert::to_16bit(&ctx, "the trainer", name, &inputs[i], dst.0, wanted[i], stream)?;
            }
        }
        let [q_nope, k_nope, q, k] = &inputs;
        let target_len = gpu::target_len(batch, c.num_q_heads)?;
        let target = ensure(&mut self.scratch.target, &ctx, target_len * 4)?;
        let ws_len = gpu::workspace_bytes(batch, c.num_q_heads, ctx.sm_count() as usize)?;
        let target_ws = ensure(&mut self.scratch.target_ws, &ctx, ws_len)?;
        let loss_ws = ensure(&mut self.scratch.loss_ws, &ctx, gpu::loss_workspace_bytes(c, batch)?)?;
        let losses = ensure(&mut self.scratch.losses, &ctx, batch.len() * 4)?;
        super::distill_target_cuda(q, k, batch, softmax_scale, (target.0, target.1 / 4), target_ws, stream)?;
        let state = self.layer_state(layer)?;
        let grads = (state.grads.ptr(), state.grads.len() / 4);
        gpu::loss_and_grad(
            c,
            &self.device,
            layer,
            batch,
            q_nope,
            k_nope,
            (target.0, target.1 / 4),
            self.config.loss.skip_fraction,
            grads,
            (losses.0, losses.1 / 4),
            loss_ws,
            stream,
        )?;
        let bytes = self.scratch.losses.as_ref().expect("ensured").read(stream)?;
        Ok(bytes.chunks(4).take(batch.len()).map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect())
    }

    /// As [`CudaGateTrainer::accumulate`] with host tensors (any strides):
    /// each is copied into device memory the trainer owns (grown to the
    /// largest batch, kept for the next feed), packed, bf16 and f16 as they
    /// are, f32 rounded to bf16 (to nearest even: the gate rounds f32
    /// inputs so, and a bf16 model's attention sees bf16 q and k), then fed
    /// on `stream`. For programs that train from files (`seerattn distill
    /// --device cuda`); an engine feeds its device tensors to `accumulate`.
    ///
    /// # Safety
    /// `stream` must be a live stream of the trainer's context, or NULL.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn accumulate_host(
        &mut self,
        layer: usize,
        q_nope: &Tensor3,
        k_nope: &Tensor3,
        q: &Tensor3,
        k: &Tensor3,
        batch: &Batch,
        softmax_scale: f64,
        stream: CUstream,
    ) -> Result<SeqLosses> {
        // Nothing may still read the input copies when they are overwritten
        // (a failed feed can leave launches behind on its stream).
        cuda::sync_stream(&self.ctx, stream)?;
        let mut tensors = Vec::with_capacity(4);
        for (slot, t) in self.scratch.inputs.iter_mut().zip([q_nope, k_nope, q, k]) {
            let (dtype, bytes) = t.packed_16bit();
            let (ptr, _) = ensure(slot, &self.ctx, bytes.len())?;
            slot.as_ref().expect("ensured").write(&bytes)?;
            let [tokens, heads, dim] = t.shape();
            tensors.push(DeviceTensor { ptr, dtype, layout: Layout3::contiguous(tokens, heads, dim) });
        }
        self.accumulate(layer, &tensors[0], &tensors[1], &tensors[2], &tensors[3], batch, softmax_scale, stream)
    }

    /// One optimizer step over every layer fed since the last one, as
    /// [`super::GateTrainer::step`] (mean over sequences, loss scale, global
    /// norm clipping, AdamW at the schedule's rate; layers fed nothing keep
    /// their weights and moments; a non-finite gradient is discarded with an
    /// error). Enqueued on `stream`, synchronized once to read the norm.
    ///
    /// # Safety
    /// `stream` must be a live stream of the trainer's context, or NULL.
    pub unsafe fn step(&mut self, stream: CUstream) -> Result<StepReport> {
        if self.layers.iter().flatten().all(|l| l.sequences == 0) {
            return Err(Error::invalid("optimizer step: no layer was fed a batch since the last step"));
        }
        let fatbin = kernels::fatbin("distill_grad")?;
        let sum_squares = cuda::function(&self.ctx, fatbin, "seer_distill_sum_squares")?;
        let mut squared = 0.0f64;
        let mut scales = Vec::with_capacity(self.layers.len());
        for state in &self.layers {
            let scale = match state {
                Some(s) if s.sequences > 0 => self.config.loss_scale / s.sequences as f64,
                _ => {
                    scales.push(0.0);
                    continue;
                }
            };
            let s = state.as_ref().expect("matched");
            let (mut x, mut n, mut out) = (s.grads.ptr(), (s.grads.len() / 4) as i64, self.norms.ptr());
            let mut params: [*mut c_void; 3] =
                [(&mut x as *mut u64).cast(), (&mut n as *mut i64).cast(), (&mut out as *mut u64).cast()];
            // SAFETY: the trainer's own buffers, in its context.
            unsafe { cuda::launch(sum_squares, [NORM_CTAS as u32, 1, 1], [256, 1, 1], 0, stream, &mut params)? };
            let parts = self.norms.read(stream)?;
            let layer_sq: f64 = parts.chunks(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).sum();
            squared += scale * scale * layer_sq;
            scales.push(scale);
        }
        let grad_norm = squared.sqrt();
        if !grad_norm.is_finite() {
            self.discard_accumulated()?;
            return Err(Error::invalid(format!(
                "optimizer step: the accumulated gradient is not finite (norm {grad_norm}; non-finite inputs?); \
                 it was discarded and nothing was updated"
            )));
        }
        let clip = self.config.max_grad_norm.map_or(1.0, |max| (max / (grad_norm + 1e-6)).min(1.0));
        let lr = self.config.adamw.lr * self.config.schedule.factor(self.step);
        let a = self.config.adamw;
        let adamw = cuda::function(&self.ctx, fatbin, "seer_distill_adamw")?;
        let mut layer_losses = Vec::with_capacity(self.layers.len());
        let mut layer_sequences = Vec::with_capacity(self.layers.len());
        for (layer, scale) in scales.iter().enumerate() {
            let weights = if self.layers[layer].is_some() { self.device.layer(layer)? } else { 0 };
            let Some(state) = self.layers[layer].as_mut().filter(|s| s.sequences > 0) else {
                layer_sequences.push(0);
                layer_losses.push(None);
                continue;
            };
            layer_sequences.push(state.sequences);
            layer_losses.push(Some(state.loss_sum / state.sequences as f64));
            state.adam_step += 1;
            let t = state.adam_step as f64;
            let mut args = AdamArgs {
                param: state.master.ptr(),
                m: state.m.ptr(),
                v: state.v.ptr(),
                grad: state.grads.ptr(),
                weights,
                n: (state.master.len() / 4) as i64,
                lr,
                beta1: a.beta1,
                beta2: a.beta2,
                eps: a.eps,
                weight_decay: a.weight_decay,
                bias1: 1.0 - a.beta1.powf(t),
                bias2_sqrt: (1.0 - a.beta2.powf(t)).sqrt(),
                factor: scale * clip,
            };
            let blocks = (args.n as usize).div_ceil(256).min(4096) as u32;
            let mut params: [*mut c_void; 1] = [(&mut args as *mut AdamArgs).cast()];
            // SAFETY: the trainer's own buffers (the bf16 copy is the device gate's).
            unsafe { cuda::launch(adamw, [blocks, 1, 1], [256, 1, 1], 0, stream, &mut params)? };
            state.sequences = 0;
            state.loss_sum = 0.0;
        }
        self.step += 1;
        self.host_stale = true;
        // The step returns with its updates done: the next call may run on
        // another stream (a later feed's), unordered with this one.
        cuda::sync_stream(&self.ctx, stream)?;
        Ok(StepReport { step: self.step, lr, grad_norm, layer_losses, layer_sequences })
    }

    /// Drop every gradient and loss accumulated since the last step.
    pub fn discard_accumulated(&mut self) -> Result<()> {
        for state in self.layers.iter_mut().flatten() {
            if state.sequences > 0 {
                state.grads = DeviceBuffer::zeroed(&self.ctx, state.grads.len())?;
            }
            state.sequences = 0;
            state.loss_sum = 0.0;
        }
        Ok(())
    }

    fn ensure_between_steps(&self, what: &str) -> Result<()> {
        if self.layers.iter().flatten().any(|l| l.sequences > 0) {
            return Err(Error::invalid(format!(
                "{what}: gradients are accumulated but not applied; call step() first (optimizer state is saved between steps)"
            )));
        }
        Ok(())
    }

    /// Save the gate being trained as a gate directory (see
    /// [`super::GateTrainer::save_gate_dir`]), after the work on `stream`.
    ///
    /// # Safety
    /// `stream` must be a live stream of the trainer's context, or NULL.
    pub unsafe fn save_gate_dir(
        &mut self,
        dir: &Path,
        dtype: DType,
        base_config: Option<&str>,
        stream: CUstream,
    ) -> Result<()> {
        let gate = self.gate(stream)?;
        checkpoint::save_gate_dir(gate, dir, dtype, base_config)
    }

    /// The AdamW state of every layer as the CPU trainer holds it (layers
    /// without weights: fresh state), after the work on `stream`.
    unsafe fn host_adam_states(&self, stream: CUstream) -> Result<Vec<AdamState>> {
        let f32s = |b: Vec<u8>| b.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>();
        let len: usize = self.gate.config().k_weight_shape().iter().product();
        self.layers
            .iter()
            .map(|s| match s {
                Some(s) => Ok(AdamState { m: f32s(s.m.read(stream)?), v: f32s(s.v.read(stream)?), step: s.adam_step }),
                None => Ok(AdamState::new(len)),
            })
            .collect()
    }

    /// Write the optimizer state to `path`, in the CPU trainer's format
    /// ([`super::GateTrainer::save_optimizer_state`]): either trainer resumes
    /// from the other's file. Between steps only.
    ///
    /// # Safety
    /// `stream` must be a live stream of the trainer's context, or NULL.
    pub unsafe fn save_optimizer_state(&mut self, path: &Path, stream: CUstream) -> Result<()> {
        self.ensure_between_steps("save optimizer state")?;
        let states = self.host_adam_states(stream)?;
        let gate = self.gate(stream)?.clone();
        let mut host = super::GateTrainer::new(gate, self.config)?;
        host.set_adam_states(states, self.step)?;
        host.save_optimizer_state(path)
    }

    /// Replace the optimizer state with the one saved at `path` (by either
    /// trainer) for a gate of the same shape. Between steps only; the
    /// weights are not in the file (start from the gate directory saved at
    /// the same step).
    ///
    /// # Safety
    /// `stream` must be a live stream of the trainer's context, or NULL.
    pub unsafe fn load_optimizer_state(&mut self, path: &Path, stream: CUstream) -> Result<()> {
        self.ensure_between_steps("load optimizer state")?;
        let gate = self.gate(stream)?.clone();
        let mut host = super::GateTrainer::new(gate, self.config)?;
        host.load_optimizer_state(path)?;
        let adam = host.k_adam_states();
        self.set_adam_states(&adam, host.steps_taken())
    }
}

/// One K-projection AdamW state per layer of `gate`, of the weights' length
/// and finite, for every layer with weights.
fn check_adam_states(gate: &Gate, adam: &[AdamState]) -> Result<()> {
    let c = gate.config();
    if adam.len() != c.num_layers {
        return Err(Error::invalid(format!(
            "optimizer state: {} AdamW states for a gate of {} layers",
            adam.len(),
            c.num_layers
        )));
    }
    let len: usize = c.k_weight_shape().iter().product();
    for (layer, a) in adam.iter().enumerate().filter(|&(layer, _)| gate.has_layer(layer)) {
        if a.m.len() != len || a.v.len() != len {
            return Err(Error::invalid(format!(
                "optimizer state of layer {layer}: moments of {} and {} values, the K projection has {len}",
                a.m.len(),
                a.v.len()
            )));
        }
        if a.m.iter().chain(&a.v).any(|x| !x.is_finite()) {
            return Err(Error::invalid(format!("optimizer state of layer {layer}: a moment is not finite")));
        }
    }
    Ok(())
}
