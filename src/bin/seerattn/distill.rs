//! `seerattn distill`: train a gate by self-distillation from Q/K tensors in
//! files, on the CPU reference trainer ([`seerattn::distill::GateTrainer`]);
//! and `--make-planted`, a small calibration set with known important blocks,
//! so that the command can be run end to end without a model.
//!
//! Data: a directory of `.safetensors` files, one per calibration sequence
//! (taken in name order), each holding for every layer `i` of the model
//! `layers.{i}.q_nope` `[tokens, q_heads, head_dim]` and `layers.{i}.k_nope`
//! `[tokens, kv_heads, head_dim]` (pre-RoPE, bf16 or f16: what the gate
//! sees) and `layers.{i}.q`, `layers.{i}.k` of the same shapes (post-RoPE,
//! any of bf16/f16/f32: what attention sees). A step feeds `--batch`
//! sequences, cycling through the files in order, to every layer.

use seerattn::checkpoint::{self, RawTensor};
use seerattn::distill::{init_gate, GateTrainer, TrainConfig};
use seerattn::reference::scores::apply_rope;
use seerattn::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const HELP: &str = "\
  seerattn distill --data DIR --out GATE_DIR (--gate DIR | --model-config FILE | --heads HQ:HKV)
                   [--steps N] [--lr LR] [--warmup N] [--batch N] [--softmax-scale S]
                   [--gate-hidden G] [--rope-theta T] [--seed S] [--dtype f32|bf16]
                   [--state FILE] [--save-every N] [--stop-at N] [--resume]
      train a gate by self-distillation (CPU reference) from a directory of
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
      --state.
  seerattn distill --make-planted DIR [--layers N] [--seqs N] [--tokens N] [--seed S]
      write a small planted-structure calibration set (default 2 layers, 4
      sequences of 1024 tokens, 4 query heads, 2 KV heads, head_dim 16, bf16)
      and DIR/model_config.json describing its model, to run distill on
";

/// Run `seerattn distill`; `args` are the words after `distill`.
pub fn run(args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    match &opts.make_planted {
        Some(dir) => make_planted(dir, &opts.planted),
        None => train(&opts),
    }
}

/// Where the gate to train comes from.
enum Source {
    GateDir(PathBuf),
    ModelConfig(PathBuf),
    Heads(usize, usize),
}

struct PlantedOptions {
    layers: usize,
    seqs: usize,
    tokens: usize,
    seed: u64,
}

struct Options {
    make_planted: Option<PathBuf>,
    planted: PlantedOptions,
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
            planted: PlantedOptions { layers: 2, seqs: 4, tokens: 1024, seed: 0 },
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
            if p.layers == 0 || p.seqs == 0 || p.tokens < 128 {
                return Err(bad("--make-planted needs --layers >= 1, --seqs >= 1, --tokens >= 128"));
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

/// One calibration sequence: per layer, the four tensors.
struct Sequence {
    file: PathBuf,
    tokens: usize,
    layers: Vec<[RawTensor; 4]>,
}

/// The geometry a data set implies: (layers, q heads, kv heads, head_dim).
type Geometry = (usize, usize, usize, usize);

fn read_sequence(file: &Path) -> Result<(Sequence, Geometry)> {
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

fn data_files(dir: &Path) -> Result<Vec<PathBuf>> {
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

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// The gate to start from and the config text to save it over.
fn starting_gate(o: &Options, (layers, hq, hkv, d): Geometry) -> Result<(Gate, Option<String>)> {
    let out = o.out.as_deref().expect("checked by parse");
    let seed = o.seed.unwrap_or(0);
    let (gate, base) = match &o.source {
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
    };
    let c = gate.config();
    if (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim) != (layers, hq, hkv, d) {
        return Err(bad(format!(
            "the gate has (layers, q heads, kv heads, head_dim) = {:?} but the data has {:?}",
            (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim),
            (layers, hq, hkv, d)
        )));
    }
    Ok((gate, base))
}

fn view<'a>(t: &'a RawTensor) -> Result<Tensor3<'a>> {
    Tensor3::new(&t.name, &t.data, t.dtype, Layout3::contiguous(t.shape[0], t.shape[1], t.shape[2]))
}

fn train(o: &Options) -> Result<()> {
    let files = data_files(o.data.as_deref().expect("checked by parse"))?;
    let (_, geometry) = read_sequence(&files[0])?;
    let (gate, base) = starting_gate(o, geometry)?;
    let out = o.out.as_deref().expect("checked by parse");
    let mut config = TrainConfig::upstream(o.steps);
    config.adamw.lr = o.lr;
    config.schedule.warmup_steps = o.warmup;
    let mut trainer = GateTrainer::new(gate, config)?;
    if o.resume {
        trainer.load_optimizer_state(o.state.as_deref().expect("checked by parse"))?;
    }
    let first = trainer.steps_taken();
    let last = o.stop_at.unwrap_or(o.steps);
    if first >= last {
        return Err(bad(format!("the optimizer state is at step {first}: nothing to do up to step {last}")));
    }
    let c = trainer.gate().config().clone();
    let scale = o.softmax_scale.unwrap_or(1.0 / (c.head_dim as f64).sqrt());
    println!(
        "distill: {} sequences in {}, {} layers, {} q heads, {} kv heads, head_dim {}, gate {}; steps {}..{last} of \
         {}, batch {}, lr {:e}, warmup {}, softmax scale {scale:.6}; CPU reference",
        files.len(),
        o.data.as_deref().expect("checked by parse").display(),
        c.num_layers,
        c.num_q_heads,
        c.num_kv_heads,
        c.head_dim,
        c.gate_type.name(),
        first + 1,
        o.steps,
        o.batch,
        o.lr,
        o.warmup
    );
    let save = |trainer: &GateTrainer| -> Result<()> {
        trainer.save_gate_dir(out, o.dtype, base.as_deref())?;
        if let Some(state) = &o.state {
            trainer.save_optimizer_state(state)?;
        }
        Ok(())
    };
    for step in first..last {
        let t0 = Instant::now();
        let mut tokens = 0;
        for b in 0..o.batch {
            let file = &files[((step as usize) * o.batch + b) % files.len()];
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
                    .accumulate(layer, &view(q_nope)?, &view(k_nope)?, &view(q)?, &view(k)?, &batch, scale)
                    .map_err(|e| bad(format!("{}, layer {layer}: {e}", seq.file.display())))?;
            }
            tokens += seq.tokens;
        }
        let report = trainer.step()?;
        let losses: Vec<String> =
            report.layer_losses.iter().map(|l| l.map_or("-".to_string(), |l| format!("{l:.6}"))).collect();
        println!(
            "step {:>5}/{}  lr {:.3e}  grad_norm {:.3e}  loss {}  {:.0} tok/s",
            report.step,
            o.steps,
            report.lr,
            report.grad_norm,
            losses.join(" "),
            tokens as f64 / t0.elapsed().as_secs_f64()
        );
        if o.save_every > 0 && report.step % o.save_every == 0 && report.step < last {
            save(&trainer)?;
        }
    }
    save(&trainer)?;
    println!(
        "saved gate to {} ({}){}",
        out.display(),
        o.dtype.name(),
        o.state.as_ref().map_or(String::new(), |s| format!(", optimizer state to {}", s.display()))
    );
    Ok(())
}

// ---- the planted-structure data set ----

/// The planted model: 4 query heads over 2 KV heads, head_dim 16, RoPE
/// theta 5e5 (the lowest-frequency pair turns by under 0.1 rad across the
/// sequences, so a direction in it survives RoPE).
const PLANTED_HEADS: (usize, usize, usize) = (4, 2, 16);
const PLANTED_THETA: f64 = 500000.0;

/// The key block of layer `layer` that query head `h` attends to besides
/// block 0 (a sink shared by every head), among `blocks` blocks.
fn planted_block(layer: usize, h: usize, blocks: usize) -> usize {
    1 + (3 * h + 2 * layer + blocks / 3) % (blocks - 1)
}

/// Query head `h` looks along one of the two lowest-frequency RoPE
/// dimensions; heads sharing a KV head look along different ones.
fn planted_direction(h: usize, d: usize) -> usize {
    if h % 2 == 0 {
        d / 2 - 1
    } else {
        d - 1
    }
}

fn make_planted(dir: &Path, p: &PlantedOptions) -> Result<()> {
    let (hq, hkv, d) = PLANTED_HEADS;
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
    println!(
        "wrote {} sequences of {} tokens ({} layers, {hq} q heads, {hkv} kv heads, head_dim {d}) and {} to {}",
        p.seqs,
        p.tokens,
        p.layers,
        config_path.display(),
        dir.display()
    );
    for layer in 0..p.layers {
        let planted: Vec<usize> = (0..hq).map(|h| planted_block(layer, h, blocks)).collect();
        println!("layer {layer}: query heads attend to key block 0 and to blocks {planted:?} (by head)");
    }
    Ok(())
}
