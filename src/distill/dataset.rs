//! Training from a calibration data set on disk: its format, the training
//! loop of `seerattn distill` on either trainer ([`train`], with
//! [`Device::Cpu`] or [`Device::Cuda`]), and the small planted-structure data
//! set that `seerattn distill --make-planted` writes ([`make_planted`]). The
//! command parses its flags and calls these; tests call them directly (the
//! GPU machine runs test binaries, not the command).
//!
//! Data: a directory of `.safetensors` files, one per calibration sequence
//! (taken in name order), each holding for every layer `i` of the model
//! `layers.{i}.q_nope` `[tokens, q_heads, head_dim]` and `layers.{i}.k_nope`
//! `[tokens, kv_heads, head_dim]` (pre-RoPE, bf16 or f16: what the gate
//! sees) and `layers.{i}.q`, `layers.{i}.k` of the same shapes (post-RoPE,
//! any of bf16/f16/f32: what attention sees; the GPU trainer rounds f32 to
//! bf16, see [`CudaGateTrainer::accumulate_host`]). A step feeds `batch`
//! sequences, cycling through the files in order, to every layer.

use super::cuda::CudaGateTrainer;
use super::{GateTrainer, StepReport, TrainConfig};
use crate::batch::Batch;
use crate::checkpoint::{self, RawTensor};
use crate::config::{GateConfig, RopeConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::reference::scores::apply_rope;
use crate::tensor::{DType, Layout3, Tensor3};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(format!("distill: {}", msg.into()))
}

/// One calibration sequence: per layer, q_nope, k_nope, q and k.
pub struct Sequence {
    pub file: PathBuf,
    pub tokens: usize,
    pub layers: Vec<[RawTensor; 4]>,
}

/// The geometry a data set implies: (layers, q heads, kv heads, head_dim).
pub type Geometry = (usize, usize, usize, usize);

/// Read one sequence file, checking its tensors' names and shapes.
pub fn read_sequence(file: &Path) -> Result<(Sequence, Geometry)> {
    let fmt = |message: String| Error::Format { path: file.display().to_string(), message };
    let mut by_name: std::collections::BTreeMap<String, RawTensor> =
        checkpoint::read_safetensors(file)?.into_iter().map(|t| (t.name.clone(), t)).collect();
    let num_layers = (0..).take_while(|i| by_name.contains_key(&format!("layers.{i}.q_nope"))).count();
    if num_layers == 0 {
        return Err(fmt("no tensor 'layers.0.q_nope' (see seerattn help for the data format)".into()));
    }
    let mut layers = Vec::with_capacity(num_layers);
    let mut geometry = None;
    for i in 0..num_layers {
        let mut take = |kind: &str| {
            let name = format!("layers.{i}.{kind}");
            by_name.remove(&name).ok_or_else(|| fmt(format!("missing tensor '{name}'")))
        };
        let [q_nope, k_nope, q, k] = [take("q_nope")?, take("k_nope")?, take("q")?, take("k")?];
        let shape = |t: &RawTensor| -> Result<[usize; 3]> {
            <[usize; 3]>::try_from(t.shape.as_slice())
                .map_err(|_| fmt(format!("'{}': shape {:?}, expected [tokens, heads, head_dim]", t.name, t.shape)))
        };
        let ([tq, hq, d], [tk, hkv, dk]) = (shape(&q_nope)?, shape(&k_nope)?);
        if shape(&q)? != [tq, hq, d] || shape(&k)? != [tk, hkv, dk] || tq != tk || d != dk {
            return Err(fmt(format!(
                "layer {i}: q_nope {:?}, k_nope {:?}, q {:?}, k {:?}: q and q_nope must be [tokens, q_heads, \
                 head_dim], k and k_nope [tokens, kv_heads, head_dim], one token count and head_dim",
                q_nope.shape, k_nope.shape, q.shape, k.shape
            )));
        }
        let g = (num_layers, hq, hkv, d);
        if geometry.is_some_and(|(g0, t0)| (g0, t0) != (g, tq)) {
            return Err(fmt(format!("layer {i} has another token count, head count or head_dim than layer 0")));
        }
        geometry = Some((g, tq));
        layers.push([q_nope, k_nope, q, k]);
    }
    if let Some(extra) = by_name.keys().next() {
        return Err(fmt(format!("unexpected tensor '{extra}' (layers are numbered 0..{num_layers})")));
    }
    let (g, tokens) = geometry.expect("at least one layer");
    Ok((Sequence { file: file.to_path_buf(), tokens, layers }, g))
}

/// The data set's `.safetensors` files, in name order (the order they are fed).
pub fn data_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    let mut files = vec![];
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(bad(format!("{}: no .safetensors files", dir.display())));
    }
    Ok(files)
}

/// The trainer a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU reference ([`GateTrainer`]).
    Cpu,
    /// The GPU trainer ([`CudaGateTrainer`]) in device 0's primary context
    /// (the context a CUDA runtime program uses), on the legacy default
    /// stream: the run is the only work of its process, with nothing to
    /// overlap, and the trainer synchronizes at every step anyway. Each
    /// sequence's tensors are copied to the device as they are fed. The
    /// released gate type only (no Q projection, head_dim 64 or 128).
    Cuda,
}

/// A training run over a data set: what `seerattn distill` runs.
#[derive(Clone, Copy, Debug)]
pub struct Run<'a> {
    /// The data set directory (see the module docs).
    pub data: &'a Path,
    /// The gate directory written at the end and every `save_every` steps.
    pub out: &'a Path,
    /// Dtype of the saved weights: F32 keeps them exactly (to resume), BF16
    /// is upstream's release format.
    pub dtype: DType,
    /// Where the optimizer state is saved with the gate, if anywhere.
    pub state: Option<&'a Path>,
    /// Continue the run saved in `state` (its step and moments); the gate
    /// must then be the one saved with it.
    pub resume: bool,
    /// Sequences per optimizer step, each fed to every layer.
    pub batch: usize,
    /// The attention's softmax scale; `None`: `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f64>,
    /// Also save every this many steps (0: at the end only).
    pub save_every: u64,
    /// Stop after this step of the schedule; `None`: at its end
    /// (`TrainConfig::schedule.total_steps`).
    pub stop_at: Option<u64>,
    pub device: Device,
}

/// The trainer of a run, on its device.
// One per run: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Trainer {
    Cpu(GateTrainer),
    Cuda(CudaGateTrainer),
}

/// The stream of a [`Device::Cuda`] run: the legacy default stream, valid
/// in every context.
fn legacy_stream() -> crate::cuda::CUstream {
    std::ptr::null_mut()
}

impl Trainer {
    fn gate_config(&self) -> &GateConfig {
        match self {
            Trainer::Cpu(t) => t.gate().config(),
            Trainer::Cuda(t) => t.gate_config(),
        }
    }

    fn steps_taken(&self) -> u64 {
        match self {
            Trainer::Cpu(t) => t.steps_taken(),
            Trainer::Cuda(t) => t.steps_taken(),
        }
    }

    fn accumulate(&mut self, layer: usize, t: [&Tensor3; 4], batch: &Batch, scale: f64) -> Result<()> {
        let [q_nope, k_nope, q, k] = t;
        match self {
            Trainer::Cpu(tr) => tr.accumulate(layer, q_nope, k_nope, q, k, batch, scale).map(drop),
            // SAFETY: the legacy default stream is valid in the trainer's context.
            Trainer::Cuda(tr) => unsafe {
                tr.accumulate_host(layer, q_nope, k_nope, q, k, batch, scale, legacy_stream()).map(drop)
            },
        }
    }

    fn step(&mut self) -> Result<StepReport> {
        match self {
            Trainer::Cpu(t) => t.step(),
            // SAFETY: as in `accumulate`.
            Trainer::Cuda(t) => unsafe { t.step(legacy_stream()) },
        }
    }

    fn load_optimizer_state(&mut self, path: &Path) -> Result<()> {
        match self {
            Trainer::Cpu(t) => t.load_optimizer_state(path),
            // SAFETY: as in `accumulate`.
            Trainer::Cuda(t) => unsafe { t.load_optimizer_state(path, legacy_stream()) },
        }
    }

    fn save(&mut self, run: &Run, base_config: Option<&str>) -> Result<()> {
        match self {
            Trainer::Cpu(t) => {
                t.save_gate_dir(run.out, run.dtype, base_config)?;
                run.state.map_or(Ok(()), |s| t.save_optimizer_state(s))
            }
            // SAFETY: as in `accumulate`.
            Trainer::Cuda(t) => unsafe {
                t.save_gate_dir(run.out, run.dtype, base_config, legacy_stream())?;
                run.state.map_or(Ok(()), |s| t.save_optimizer_state(s, legacy_stream()))
            },
        }
    }
}

fn view<'a>(t: &'a RawTensor) -> Result<Tensor3<'a>> {
    Tensor3::new(&t.name, &t.data, t.dtype, Layout3::contiguous(t.shape[0], t.shape[1], t.shape[2]))
}

/// Run `run` with the recipe `config`: read the data set, start from the
/// gate `starting_gate` returns for its geometry (with the model's
/// `config.json` text to keep in the saved config, if any), train from step
/// 0 (or the saved state's step) to `stop_at`, and save. Each line of
/// progress (the run's summary, one line per step with its learning rate,
/// gradient norm, loss per layer and tokens/s, and what was saved) goes to
/// `progress`.
pub fn train(
    run: &Run,
    config: TrainConfig,
    starting_gate: impl FnOnce(Geometry) -> Result<(Gate, Option<String>)>,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    if run.batch == 0 {
        return Err(bad("the batch must hold at least one sequence"));
    }
    if run.resume && run.state.is_none() {
        return Err(bad("resuming needs the optimizer state file"));
    }
    let files = data_files(run.data)?;
    let (_, geometry) = read_sequence(&files[0])?;
    let (gate, base) = starting_gate(geometry)?;
    let c = gate.config();
    if (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim) != geometry {
        return Err(bad(format!(
            "the gate has (layers, q heads, kv heads, head_dim) = {:?} but the data has {geometry:?}",
            (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim)
        )));
    }
    let (mut trainer, on) = match run.device {
        Device::Cpu => (Trainer::Cpu(GateTrainer::new(gate, config)?), "CPU reference".to_string()),
        Device::Cuda => {
            // The gate first: a gate the GPU cannot train is refused the same with or without a GPU.
            crate::gpu::gate::check_supported(c)?;
            crate::cuda::driver()?;
            let ctx = crate::cuda::primary_context(0)?;
            let name = crate::cuda::device_name(&ctx)?;
            (Trainer::Cuda(CudaGateTrainer::new(gate, config, &ctx)?), format!("CUDA on {name} (device 0)"))
        }
    };
    if run.resume {
        trainer.load_optimizer_state(run.state.expect("checked above"))?;
    }
    let first = trainer.steps_taken();
    let steps = config.schedule.total_steps;
    let last = run.stop_at.unwrap_or(steps);
    if first >= last {
        return Err(bad(format!("the optimizer state is at step {first}: nothing to do up to step {last}")));
    }
    let c = trainer.gate_config().clone();
    let scale = run.softmax_scale.unwrap_or(1.0 / (c.head_dim as f64).sqrt());
    progress(&format!(
        "distill: {} sequences in {}, {} layers, {} q heads, {} kv heads, head_dim {}, gate {}; steps {}..{last} of \
         {steps}, batch {}, lr {:e}, warmup {}, softmax scale {scale:.6}; {on}",
        files.len(),
        run.data.display(),
        c.num_layers,
        c.num_q_heads,
        c.num_kv_heads,
        c.head_dim,
        c.gate_type.name(),
        first + 1,
        run.batch,
        config.adamw.lr,
        config.schedule.warmup_steps,
    ));
    for step in first..last {
        let t0 = Instant::now();
        let mut tokens = 0;
        for b in 0..run.batch {
            let file = &files[((step as usize) * run.batch + b) % files.len()];
            let (seq, g) = read_sequence(file)?;
            if g != geometry {
                return Err(bad(format!(
                    "{}: geometry {g:?}, but {} has {geometry:?}",
                    file.display(),
                    files[0].display()
                )));
            }
            let batch = Batch::single(seq.tokens)?;
            for (layer, [q_nope, k_nope, q, k]) in seq.layers.iter().enumerate() {
                trainer
                    .accumulate(layer, [&view(q_nope)?, &view(k_nope)?, &view(q)?, &view(k)?], &batch, scale)
                    .map_err(|e| bad(format!("{}, layer {layer}: {e}", seq.file.display())))?;
            }
            tokens += seq.tokens;
        }
        let report = trainer.step()?;
        let losses: Vec<String> =
            report.layer_losses.iter().map(|l| l.map_or("-".to_string(), |l| format!("{l:.6}"))).collect();
        progress(&format!(
            "step {:>5}/{steps}  lr {:.3e}  grad_norm {:.3e}  loss {}  {:.0} tok/s",
            report.step,
            report.lr,
            report.grad_norm,
            losses.join(" "),
            tokens as f64 / t0.elapsed().as_secs_f64()
        ));
        if run.save_every > 0 && report.step % run.save_every == 0 && report.step < last {
            trainer.save(run, base.as_deref())?;
        }
    }
    trainer.save(run, base.as_deref())?;
    progress(&format!(
        "saved gate to {} ({}){}",
        run.out.display(),
        run.dtype.name(),
        run.state.map_or(String::new(), |s| format!(", optimizer state to {}", s.display()))
    ));
    Ok(())
}

// ---- the planted-structure data set ----

/// What [`make_planted`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planted {
    pub layers: usize,
    /// Sequences (files).
    pub seqs: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// 16 is enough for the CPU; the GPU trainer needs 64 or 128.
    pub head_dim: usize,
    pub seed: u64,
}

impl Default for Planted {
    /// `seerattn distill --make-planted`'s defaults: 2 layers, 4 sequences
    /// of 1024 tokens, head_dim 16, seed 0.
    fn default() -> Self {
        Planted { layers: 2, seqs: 4, tokens: 1024, head_dim: 16, seed: 0 }
    }
}

/// The planted model: 4 query heads over 2 KV heads, RoPE theta 5e5 (the
/// lowest-frequency pair turns by under 0.1 rad across the sequences at
/// any head_dim from 16 on, so a direction in it survives RoPE).
pub const PLANTED_HEADS: (usize, usize) = (4, 2);
const PLANTED_THETA: f64 = 500000.0;

/// The key block of layer `layer` that query head `h` attends to besides
/// block 0 (a sink shared by every head), among `blocks` blocks.
fn planted_block(layer: usize, h: usize, blocks: usize) -> usize {
    1 + (3 * h + 2 * layer + blocks / 3) % (blocks - 1)
}

/// Query head `h` looks along one of the two dimensions of the
/// lowest-frequency RoPE pair; heads sharing a KV head look along different ones.
fn planted_direction(h: usize, d: usize) -> usize {
    if h % 2 == 0 {
        d / 2 - 1
    } else {
        d - 1
    }
}

/// Write a small calibration set with known important blocks to `dir`:
/// `p.seqs` files `seq0000.safetensors`, ... in the data format above (bf16),
/// where query head `h` of layer `l` attends to key block 0 and to one
/// planted block, and `dir/model_config.json` describing the model (4 query
/// heads, 2 KV heads, `p.head_dim`). Reports what it wrote to `progress`;
/// returns the planted block of every layer and query head.
pub fn make_planted(dir: &Path, p: &Planted, progress: &mut dyn FnMut(&str)) -> Result<Vec<Vec<usize>>> {
    if p.layers == 0 || p.seqs == 0 || p.tokens < 128 || p.head_dim < 4 || p.head_dim % 2 != 0 {
        return Err(bad(format!(
            "a planted set needs at least 1 layer, 1 sequence, 128 tokens and an even head_dim >= 4, not {p:?}"
        )));
    }
    let (hq, hkv) = PLANTED_HEADS;
    let d = p.head_dim;
    let group = hq / hkv;
    let blocks = p.tokens.div_ceil(64);
    let inv_freq = RopeConfig { theta: PLANTED_THETA, scaling: RopeScaling::None }.inv_freq(d);
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let mut state = p.seed ^ 0x5EED_5EED_5EED_5EED;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let (strength, noise) = (4.0f32, 0.8f32);
    for s in 0..p.seqs {
        let mut tensors = vec![];
        for layer in 0..p.layers {
            for (kind, heads) in [("q", hq), ("k", hkv)] {
                let (mut nope, mut roped) = (vec![], vec![]);
                for pos in 0..p.tokens {
                    for h in 0..heads {
                        let mut row: Vec<f32> = (0..d).map(|_| noise * uniform()).collect();
                        if kind == "q" {
                            row[planted_direction(h, d)] += strength;
                        } else {
                            for qh in h * group..(h + 1) * group {
                                let block = pos / 64;
                                if block == 0 || block == planted_block(layer, qh, blocks) {
                                    row[planted_direction(qh, d)] += strength;
                                }
                            }
                        }
                        // The gate sees the bf16 values; attention their rotation.
                        let row: Vec<f32> = row.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
                        nope.extend(row.iter().copied());
                        let mut rotated = row;
                        apply_rope(&mut rotated, &inv_freq, pos);
                        roped.extend(rotated);
                    }
                }
                let bf16 = |name: String, v: &[f32]| RawTensor {
                    name,
                    dtype: DType::BF16,
                    shape: vec![p.tokens, heads, d],
                    data: v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
                };
                tensors.push(bf16(format!("layers.{layer}.{kind}_nope"), &nope));
                tensors.push(bf16(format!("layers.{layer}.{kind}"), &roped));
            }
        }
        checkpoint::write_safetensors(&dir.join(format!("seq{s:04}.safetensors")), &tensors)?;
    }
    let model_config = serde_json::json!({
        "model_type": "planted",
        "num_hidden_layers": p.layers,
        "num_attention_heads": hq,
        "num_key_value_heads": hkv,
        "head_dim": d,
        "rope_theta": PLANTED_THETA,
        "seerattn_gate_hidden_size": d,
        "seerattn_sparsity_method": "threshold",
        "seerattn_threshold": 0.05,
        "seerattn_last_block_dense": false,
    });
    let config_path = dir.join("model_config.json");
    let text = serde_json::to_string_pretty(&model_config).expect("a JSON value serializes");
    std::fs::write(&config_path, text + "\n").map_err(|source| Error::Io { path: config_path.clone(), source })?;
    progress(&format!(
        "wrote {} sequences of {} tokens ({} layers, {hq} q heads, {hkv} kv heads, head_dim {d}) and {} to {}",
        p.seqs,
        p.tokens,
        p.layers,
        config_path.display(),
        dir.display()
    ));
    let mut planted = Vec::with_capacity(p.layers);
    for layer in 0..p.layers {
        let blocks: Vec<usize> = (0..hq).map(|h| planted_block(layer, h, blocks)).collect();
        progress(&format!("layer {layer}: query heads attend to key block 0 and to blocks {blocks:?} (by head)"));
        planted.push(blocks);
    }
    Ok(planted)
}
