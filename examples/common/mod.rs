//! What the benchmark programs share: the benchmark's gate (the issue's
//! shape: 32 query heads, 8 KV heads, head_dim 128, llama3 RoPE, synthetic
//! weights), random structured inputs on the device, timing statistics and
//! the fields every JSON line carries.
#![allow(dead_code)]

use seerattn::cuda::{self, testing, DeviceBuffer};
use seerattn::gpu::gate::DeviceGate;
use seerattn::*;

pub const HQ: usize = 32;
pub const HKV: usize = 8;
pub const D: usize = 128;

/// SEER_BENCH_QUICK=1: one timed run per case (for profilers, which replay each kernel).
pub fn warmup_and_reps() -> (usize, usize) {
    if std::env::var_os("SEER_BENCH_QUICK").is_some() {
        (1, 1)
    } else {
        (5, 30)
    }
}

pub fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The device as the driver names it, and today's date (UTC), for the JSON lines.
pub fn device_and_date(ctx: &cuda::Ctx) -> (String, String) {
    let device = cuda::device_name(ctx).unwrap_or_else(|_| "unknown CUDA device".into());
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%F")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    (device, date)
}

/// The benchmark gate's config: released gate type, threshold 0.002.
pub fn config() -> GateConfig {
    GateConfig {
        num_layers: 1,
        num_q_heads: HQ,
        num_kv_heads: HKV,
        head_dim: D,
        gate_hidden: D,
        block_size: 64,
        gate_type: GateType::released(),
        force_double: false,
        rope: RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        },
        sparsity_method: SparsityMethod::Threshold,
        threshold: 0.002,
        nz_ratio: 0.1,
        last_block_dense: true,
    }
}

/// The benchmark gate (deterministic synthetic weights in layer 0), on the host and on the device.
pub fn gate(ctx: &cuda::Ctx) -> Result<(Gate, DeviceGate)> {
    let mut gate = Gate::new(config())?;
    let w: Vec<u8> = (0..HQ * 3 * D * D)
        .flat_map(|i| half::bf16::from_f32(((i * 2654435761usize) % 1000) as f32 / 1000.0 * 0.2 - 0.1).to_le_bytes())
        .collect();
    gate.set_layer_weights(0, WeightRef { dtype: DType::BF16, shape: [HQ, 3 * D, D], bytes: &w }, None)?;
    let device = DeviceGate::upload(&gate, ctx)?;
    Ok((gate, device))
}

/// A device buffer of `[tokens, heads, D]` random bf16 values in [-2, 2)
/// with per-64-token-block offsets (so gate scores are not flat); generated
/// on the host once.
pub fn random_bf16(ctx: &cuda::Ctx, tokens: usize, heads: usize, seed: u64) -> Result<DeviceBuffer> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let offsets: Vec<f32> = (0..tokens.div_ceil(64) * heads * D).map(|_| next() * 1.5).collect();
    let mut bytes = Vec::with_capacity(tokens * heads * D * 2);
    for t in 0..tokens {
        for h in 0..heads {
            for x in 0..D {
                let v = offsets[((t / 64) * heads + h) * D + x] + next();
                bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
        }
    }
    let buf = testing::alloc_zeroed(ctx, bytes.len())?;
    testing::copy_to_device(ctx, buf.ptr(), &bytes)?;
    Ok(buf)
}

/// Append the JSON lines of a run to `path` (the results file given on the
/// command line), if any, and say so.
pub fn append_results(path: Option<&str>, lines: &[String]) {
    use std::io::Write;
    let Some(path) = path else { return };
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open results file");
    for l in lines {
        writeln!(f, "{l}").expect("write results");
    }
    println!("appended {} lines to {path}", lines.len());
}
