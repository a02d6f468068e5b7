//! `seerattn distill`: train a gate by self-distillation from Q/K tensors in
//! files, on the CPU reference trainer ([`seerattn::distill::GateTrainer`])
//! or the GPU trainer ([`seerattn::distill::cuda::CudaGateTrainer`],
//! `--device cuda`); and `--make-planted`, a small calibration set with known
//! important blocks, so that the command can be run end to end without a
//! model. This module parses the flags and picks the starting gate; the data
//! format, the training loop and the planted set are the library's
//! ([`seerattn::distill::dataset`]), where tests run them on a GPU too.

use seerattn::checkpoint;
use seerattn::distill::dataset::{self, Device, Geometry, Planted};
use seerattn::distill::{init_gate, TrainConfig};
use seerattn::*;
use std::path::{Path, PathBuf};

pub const HELP: &str = "\
  seerattn distill --data DIR --out GATE_DIR (--gate DIR | --model-config FILE | --heads HQ:HKV)
                   [--steps N] [--lr LR] [--warmup N] [--batch N] [--softmax-scale S]
                   [--gate-hidden G] [--rope-theta T] [--seed S] [--dtype f32|bf16]
                   [--state FILE] [--save-every N] [--stop-at N] [--resume] [--device cpu|cuda]
      train a gate by self-distillation from a directory of
      .safetensors files, one per calibration sequence, each holding per layer i
      layers.{i}.q_nope, layers.{i}.k_nope (pre-RoPE) and layers.{i}.q,
      layers.{i}.k (post-RoPE), [tokens, heads, head_dim]. The gate starts from
      --gate (a gate directory), or random weights (--seed, default 0) for the
      model of --model-config (its config.json) or of --heads (head_dim and
      layers from the data; --gate-hidden default head_dim, --rope-theta
      default 10000). Upstream's recipe: lr 1e-3, 20 warmup steps then cosine
      to 0 at --steps (default 500), AdamW, clipping to 1. Prints step, lr,
      gradient norm, loss per layer and tokens/s; saves the gate directory to
      --out (f32 by default, to resume; bf16 to release) and the optimizer
      state to --state, at the end and every --save-every steps. --stop-at N
      stops after step N of the schedule; --resume continues from --out and
      --state. --device cpu (default) trains on the CPU reference, --device
      cuda on GPU 0 (the released gate type: no Q projection, head_dim 64 or
      128; the same files, so a run may resume on the other device).
  seerattn distill --make-planted DIR [--layers N] [--seqs N] [--tokens N] [--head-dim D] [--seed S]
      write a small planted-structure calibration set (default 2 layers, 4
      sequences of 1024 tokens, 4 query heads, 2 KV heads, head_dim 16, bf16;
      --device cuda needs --head-dim 64 or 128) and DIR/model_config.json
      describing its model, to run distill on
";

/// Run `seerattn distill`; `args` are the words after `distill`.
pub fn run(args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    match &opts.make_planted {
        Some(dir) => dataset::make_planted(dir, &opts.planted, &mut |line| println!("{line}")).map(drop),
        None => train(&opts),
    }
}

/// Where the gate to train comes from.
enum Source {
    GateDir(PathBuf),
    ModelConfig(PathBuf),
    Heads(usize, usize),
}

struct Options {
    make_planted: Option<PathBuf>,
    planted: Planted,
    data: Option<PathBuf>,
    out: Option<PathBuf>,
    source: Option<Source>,
    steps: u64,
    lr: f64,
    warmup: u64,
    batch: usize,
    softmax_scale: Option<f64>,
    gate_hidden: Option<usize>,
    rope_theta: f64,
    seed: Option<u64>,
    dtype: DType,
    state: Option<PathBuf>,
    save_every: u64,
    stop_at: Option<u64>,
    resume: bool,
    device: Device,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(format!("distill: {}", msg.into()))
}

fn value<'a>(it: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a str> {
    it.next().map(String::as_str).ok_or_else(|| bad(format!("{flag} needs a value")))
}

fn number<T: std::str::FromStr>(it: &mut std::slice::Iter<'_, String>, flag: &str) -> Result<T> {
    let v = value(it, flag)?;
    v.parse().map_err(|_| bad(format!("{flag} {v}: not a valid number")))
}

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            make_planted: None,
            planted: Planted::default(),
            data: None,
            out: None,
            source: None,
            steps: 500,
            lr: 1e-3,
            warmup: 20,
            batch: 1,
            softmax_scale: None,
            gate_hidden: None,
            rope_theta: 10000.0,
            seed: None,
            dtype: DType::F32,
            state: None,
            save_every: 0,
            stop_at: None,
            resume: false,
            device: Device::Cpu,
        };
        let set_source = |o: &mut Options, s: Source| {
            if o.source.is_some() {
                return Err(bad("give one of --gate, --model-config, --heads"));
            }
            o.source = Some(s);
            Ok(())
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            match flag.as_str() {
                "--make-planted" => o.make_planted = Some(value(&mut it, flag)?.into()),
                "--layers" => o.planted.layers = number(&mut it, flag)?,
                "--seqs" => o.planted.seqs = number(&mut it, flag)?,
                "--tokens" => o.planted.tokens = number(&mut it, flag)?,
                "--head-dim" => o.planted.head_dim = number(&mut it, flag)?,
                "--data" => o.data = Some(value(&mut it, flag)?.into()),
                "--out" => o.out = Some(value(&mut it, flag)?.into()),
                "--gate" => set_source(&mut o, Source::GateDir(value(&mut it, flag)?.into()))?,
                "--model-config" => set_source(&mut o, Source::ModelConfig(value(&mut it, flag)?.into()))?,
                "--heads" => {
                    let v = value(&mut it, flag)?;
                    let heads = v.split_once(':').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                    let Some((hq, hkv)) = heads else {
                        return Err(bad(format!("--heads {v}: expected Q_HEADS:KV_HEADS, e.g. 32:8")));
                    };
                    set_source(&mut o, Source::Heads(hq, hkv))?;
                }
                "--steps" => o.steps = number(&mut it, flag)?,
                "--lr" => o.lr = number(&mut it, flag)?,
                "--warmup" => o.warmup = number(&mut it, flag)?,
                "--batch" => o.batch = number(&mut it, flag)?,
                "--softmax-scale" => o.softmax_scale = Some(number(&mut it, flag)?),
                "--gate-hidden" => o.gate_hidden = Some(number(&mut it, flag)?),
                "--rope-theta" => o.rope_theta = number(&mut it, flag)?,
                "--seed" => o.seed = Some(number(&mut it, flag)?),
                "--dtype" => {
                    o.dtype = match value(&mut it, flag)? {
                        "f32" => DType::F32,
                        "bf16" => DType::BF16,
                        other => return Err(bad(format!("--dtype {other}: expected f32 or bf16"))),
                    }
                }
                "--state" => o.state = Some(value(&mut it, flag)?.into()),
                "--save-every" => o.save_every = number(&mut it, flag)?,
                "--stop-at" => o.stop_at = Some(number(&mut it, flag)?),
                "--resume" => o.resume = true,
                "--device" => {
                    o.device = match value(&mut it, flag)? {
                        "cpu" => Device::Cpu,
                        "cuda" => Device::Cuda,
                        other => return Err(bad(format!("--device {other}: expected cpu or cuda"))),
                    }
                }
                other => return Err(bad(format!("unexpected argument '{other}' (seerattn help)"))),
            }
        }
        if let Some(seed) = o.seed {
            o.planted.seed = seed;
        }
        if o.make_planted.is_some() {
            if o.data.is_some() || o.out.is_some() || o.source.is_some() || o.resume {
                return Err(bad("--make-planted writes a data set; train on it in a second run (--data DIR)"));
            }
            let p = &o.planted;
            if p.layers == 0 || p.seqs == 0 || p.tokens < 128 || p.head_dim < 4 || p.head_dim % 2 != 0 {
                return Err(bad(
                    "--make-planted needs --layers >= 1, --seqs >= 1, --tokens >= 128, an even --head-dim >= 4",
                ));
            }
            return Ok(o);
        }
        if o.data.is_none() || o.out.is_none() {
            return Err(bad("needs --data DIR and --out GATE_DIR (or --make-planted DIR)"));
        }
        if o.resume && (o.source.is_some() || o.state.is_none()) {
            return Err(bad(
                "--resume continues from the gate in --out and the optimizer state in --state: give --state, and \
                 none of --gate, --model-config, --heads",
            ));
        }
        if !o.resume && o.source.is_none() {
            return Err(bad("needs the gate to start from: --gate DIR, --model-config FILE or --heads HQ:HKV"));
        }
        if o.resume && o.dtype != DType::F32 {
            return Err(bad("--resume needs f32 gate files (--dtype f32)"));
        }
        if o.steps == 0 || o.batch == 0 {
            return Err(bad("--steps and --batch must be at least 1"));
        }
        if o.stop_at.is_some_and(|s| s == 0 || s > o.steps) {
            return Err(bad(format!("--stop-at must be in 1..={}", o.steps)));
        }
        Ok(o)
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// The gate to start from and the config text to save it over (the library
/// checks it against the data's geometry).
fn starting_gate(o: &Options, (layers, _, _, d): Geometry) -> Result<(Gate, Option<String>)> {
    let out = o.out.as_deref().expect("checked by parse");
    let seed = o.seed.unwrap_or(0);
    Ok(match &o.source {
        None => (Gate::load_dir(out)?, Some(read_text(&out.join(checkpoint::CONFIG_FILE))?)),
        Some(Source::GateDir(dir)) => (Gate::load_dir(dir)?, Some(read_text(&dir.join(checkpoint::CONFIG_FILE))?)),
        Some(Source::ModelConfig(file)) => {
            let text = read_text(file)?;
            let config = checkpoint::config_json::parse_config(&file.display().to_string(), &text)?;
            (init_gate(config, seed)?, Some(text))
        }
        Some(Source::Heads(q_heads, kv_heads)) => {
            let (q_heads, kv_heads) = (*q_heads, *kv_heads);
            let config = GateConfig {
                num_layers: layers,
                num_q_heads: q_heads,
                num_kv_heads: kv_heads,
                head_dim: d,
                gate_hidden: o.gate_hidden.unwrap_or(d),
                block_size: 64,
                gate_type: GateType::released(),
                force_double: false,
                rope: RopeConfig { theta: o.rope_theta, scaling: RopeScaling::None },
                sparsity_method: SparsityMethod::Threshold,
                threshold: 0.0,
                nz_ratio: 1.0,
                last_block_dense: true,
            };
            config.validate()?;
            (init_gate(config, seed)?, None)
        }
    })
}

fn train(o: &Options) -> Result<()> {
    let mut config = TrainConfig::upstream(o.steps);
    config.adamw.lr = o.lr;
    config.schedule.warmup_steps = o.warmup;
    let run = dataset::Run {
        data: o.data.as_deref().expect("checked by parse"),
        out: o.out.as_deref().expect("checked by parse"),
        dtype: o.dtype,
        state: o.state.as_deref(),
        resume: o.resume,
        batch: o.batch,
        softmax_scale: o.softmax_scale,
        save_every: o.save_every,
        stop_at: o.stop_at,
        device: o.device,
    };
    dataset::train(&run, config, |geometry| starting_gate(o, geometry), &mut |line| println!("{line}"))
}
