//! `seerattn demo`: the whole prefill path on the CPU reference, end to end.
//!
//! Loads a gate directory (the bundled upstream test gate by default, with
//! its recorded Q/K/V; any other gate gets random inputs of `--seq` tokens),
//! computes a layer's block mask with the gate's own rule and with top-k,
//! runs block-sparse prefill with each mask and with the full causal mask,
//! and prints the density, the error of sparse against dense attention, and
//! the time of each stage.

use seerattn::attention::{sparse_prefill, AttentionParams};
use seerattn::*;
use std::path::PathBuf;
use std::time::Instant;

/// Inputs of one layer: pre-RoPE Q/K for the gate, post-RoPE Q/K and V for attention.
struct Inputs {
    seq: usize,
    q_nope: Vec<u8>,
    k_nope: Vec<u8>,
    q: Vec<u8>,
    k: Vec<u8>,
    v: Vec<u8>,
    source: String,
}

fn bundled_gate() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/upstream/gqa4_s1000_gates")
}

fn random_bf16(n: usize, state: &mut u64) -> Vec<u8> {
    (0..n)
        .flat_map(|_| {
            *state = state.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            let u = ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32;
            half::bf16::from_f32(2.0 * u - 1.0).to_le_bytes()
        })
        .collect()
}

fn bundled_inputs() -> Result<Inputs> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/upstream/gqa4_s1000.safetensors");
    let bytes = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Format { path: path.display().to_string(), message: e.to_string() })?;
    let get = |name: &str| -> Result<Vec<u8>> {
        st.tensor(name)
            .map(|t| t.data().to_vec())
            .map_err(|e| Error::Format { path: path.display().to_string(), message: format!("{name}: {e}") })
    };
    Ok(Inputs {
        seq: 1000,
        q_nope: get("q_nope")?,
        k_nope: get("k_nope")?,
        q: get("q")?,
        k: get("k")?,
        v: get("v")?,
        source: "recorded upstream inputs (tests/data/upstream/gqa4_s1000)".into(),
    })
}

fn random_inputs(c: &GateConfig, seq: usize) -> Inputs {
    let mut state = 42u64;
    let (nq, nk) = (seq * c.num_q_heads * c.head_dim, seq * c.num_kv_heads * c.head_dim);
    Inputs {
        seq,
        q_nope: random_bf16(nq, &mut state),
        k_nope: random_bf16(nk, &mut state),
        q: random_bf16(nq, &mut state),
        k: random_bf16(nk, &mut state),
        v: random_bf16(nk, &mut state),
        source: format!("random bf16 inputs, {seq} tokens"),
    }
}

/// Run the demo; `args` are the words after `demo`.
pub fn run(args: &[String]) -> Result<()> {
    let mut dir = None;
    let mut seq = 1024usize;
    let mut layer = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seq" => seq = parse(it.next(), "--seq")?,
            "--layer" => layer = Some(parse(it.next(), "--layer")?),
            other if !other.starts_with("--") && dir.is_none() => dir = Some(PathBuf::from(other)),
            other => return Err(Error::InvalidArgument(format!("demo: unexpected argument '{other}'"))),
        }
    }
    let bundled = dir.is_none();
    let dir = dir.unwrap_or_else(bundled_gate);
    let t0 = Instant::now();
    let gate = Gate::load_dir(&dir)?;
    let load_ms = ms(t0);
    let c = gate.config().clone();
    let layer = layer.unwrap_or(if bundled { 1 } else { c.num_layers - 1 });
    let inputs = if bundled { bundled_inputs()? } else { random_inputs(&c, seq) };
    println!(
        "gate     {} ({} layers, {} q heads, {} kv heads, head_dim {}, {}), loaded in {load_ms:.1} ms",
        dir.display(),
        c.num_layers,
        c.num_q_heads,
        c.num_kv_heads,
        c.head_dim,
        c.gate_type.name()
    );
    println!("inputs   {}; layer {layer}; CPU reference path", inputs.source);

    let n = inputs.seq;
    let view = |b, heads| bf16_view(b, n, heads, c.head_dim);
    let (q_nope, k_nope) = (view(&inputs.q_nope, c.num_q_heads)?, view(&inputs.k_nope, c.num_kv_heads)?);
    let (q, k, v) =
        (view(&inputs.q, c.num_q_heads)?, view(&inputs.k, c.num_kv_heads)?, view(&inputs.v, c.num_kv_heads)?);
    let batch = Batch::single(n)?;
    let layout = MaskLayout::new(&batch, c.num_q_heads, c.block_size)?;
    let attn = AttentionParams::for_head_dim(c.head_dim);
    let out_len = n * c.num_q_heads * c.head_dim * 4;

    let t0 = Instant::now();
    let full = BlockMask::from_dense(&layout, &vec![1u8; layout.dense_len()])?;
    let mut dense_out = vec![0u8; out_len];
    {
        let mut o =
            Tensor3Mut::new("out", &mut dense_out, DType::F32, Layout3::contiguous(n, c.num_q_heads, c.head_dim))?;
        sparse_prefill(&q, &k, &v, &batch, full.as_ref(), &attn, &mut o, None)?;
    }
    println!("dense    causal attention: {:.1} ms", ms(t0));

    let rules = [
        ("config rule", MaskParams::from_config(&c)),
        (
            "threshold 0.05",
            MaskParams { method: SparsityMethod::Threshold, threshold: 0.05, ..MaskParams::from_config(&c) },
        ),
        (
            "top-k nz 0.3",
            MaskParams {
                method: SparsityMethod::NzRatio,
                nz_ratio: 0.3,
                last_block_dense: false,
                ..MaskParams::from_config(&c)
            },
        ),
    ];
    println!(
        "{:<16} {:>8} {:>10} {:>12} {:>12} {:>12}",
        "mask", "density", "gate ms", "prefill ms", "max|err|", "rel l2 err"
    );
    for (name, rule) in rules {
        let t0 = Instant::now();
        let mask = gate.compute_block_mask(layer, &q_nope, &k_nope, &batch, &rule)?;
        let gate_ms = ms(t0);
        let mut out = vec![0u8; out_len];
        let t0 = Instant::now();
        {
            let mut o =
                Tensor3Mut::new("out", &mut out, DType::F32, Layout3::contiguous(n, c.num_q_heads, c.head_dim))?;
            sparse_prefill(&q, &k, &v, &batch, mask.as_ref(), &attn, &mut o, None)?;
        }
        let prefill_ms = ms(t0);
        let (max_err, rel) = compare(&out, &dense_out);
        println!(
            "{name:<16} {:>8.4} {gate_ms:>10.1} {prefill_ms:>12.1} {max_err:>12.5} {rel:>12.5}",
            mask.as_ref().density(&layout)
        );
    }
    Ok(())
}

fn bf16_view(bytes: &[u8], tokens: usize, heads: usize, dim: usize) -> Result<Tensor3<'_>> {
    Tensor3::new("input", bytes, DType::BF16, Layout3::contiguous(tokens, heads, dim))
}

fn parse(v: Option<&String>, flag: &str) -> Result<usize> {
    v.and_then(|s| s.parse().ok()).ok_or_else(|| Error::InvalidArgument(format!("{flag} needs a positive integer")))
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// Max absolute difference and relative L2 error of two f32 buffers.
fn compare(a: &[u8], b: &[u8]) -> (f32, f32) {
    let f = |x: &[u8]| f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    let (mut max, mut num, mut den) = (0f32, 0f64, 0f64);
    for (x, y) in a.chunks(4).zip(b.chunks(4)) {
        let (x, y) = (f(x), f(y));
        max = max.max((x - y).abs());
        num += ((x - y) as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (max, (num / den.max(1e-30)).sqrt() as f32)
}
