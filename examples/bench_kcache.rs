//! Benchmark of chunked prefill through the K-block cache
//! (`seerattn::gpu::gate::{update_kblock_cache, compute_mask_cached}`)
//! against the one-shot gate that re-pools every earlier key: the gate of
//! one 512-token chunk (a llama.cpp ubatch) at the end of an 8k, 32k and
//! 128k-token prefix, 32 query heads, 8 KV heads, head_dim 128, bf16,
//! threshold rule.
//!
//! `bench_kcache [out.jsonl]` prints a table and appends JSON lines
//! (`impl, seq_len, chunk, ms, device, date`) to the file. Built by
//! `scripts/gpu-test.sh build`, run on the GPU machine by
//! `scripts/gpu-test.sh bench`.

use seerattn::cuda::{self, testing, testing::Stream, DeviceBuffer};
use seerattn::gpu::gate::{
    compute_mask, compute_mask_cached, kblock_cache_bytes, update_kblock_cache, DeviceGate, DeviceMask, DeviceTensor,
    GatePlan,
};
use seerattn::*;
use std::io::Write;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const CHUNK: usize = 512;

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Device buffer of `tokens * heads * D` random bf16 values with
/// per-64-token-block offsets (so gate scores are not flat).
fn random_bf16(ctx: &cuda::Ctx, tokens: usize, heads: usize, seed: u64) -> Result<DeviceBuffer> {
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

fn main() -> Result<()> {
    let quick = std::env::var_os("SEER_BENCH_QUICK").is_some();
    let (warmup, reps) = if quick { (1, 1) } else { (5, 30) };
    let out_path = std::env::args().nth(1);
    let ctx = cuda::current_context()?;
    let stream = Stream::new(&ctx)?;
    let device_name = cuda::device_name(&ctx).unwrap_or_else(|_| "unknown CUDA device".into());
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%F")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let config = GateConfig {
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
    };
    let mut gate = Gate::new(config.clone())?;
    let w: Vec<u8> = (0..HQ * 3 * D * D)
        .flat_map(|i| half::bf16::from_f32(((i * 2654435761usize) % 1000) as f32 / 1000.0 * 0.2 - 0.1).to_le_bytes())
        .collect();
    gate.set_layer_weights(0, WeightRef { dtype: DType::BF16, shape: [HQ, 3 * D, D], bytes: &w }, None)?;
    let device = DeviceGate::upload(&gate, &ctx)?;
    let params = MaskParams { threshold: 0.002, ..MaskParams::from_config(&config) };

    let mut lines = Vec::new();
    println!(
        "{:>7} {:>6} {:>14} {:>14} {:>10} {:>8}",
        "seq", "chunk", "one-shot ms", "update ms", "cached ms", "speedup"
    );
    for seq in [8192usize, 32768, 131072] {
        let prefix = seq - CHUNK;
        let kbuf = random_bf16(&ctx, seq, HKV, 2)?;
        let qbuf = random_bf16(&ctx, CHUNK, HQ, 1)?;
        let k_all = DeviceTensor { ptr: kbuf.ptr(), dtype: DType::BF16, layout: Layout3::contiguous(seq, HKV, D) };
        let k_new = DeviceTensor {
            ptr: kbuf.ptr() + (prefix * HKV * D * 2) as u64,
            dtype: DType::BF16,
            layout: Layout3::contiguous(CHUNK, HKV, D),
        };
        let q = DeviceTensor { ptr: qbuf.ptr(), dtype: DType::BF16, layout: Layout3::contiguous(CHUNK, HQ, D) };
        let cache = testing::alloc_zeroed(&ctx, kblock_cache_bytes(&config, seq)?)?;
        let caches = [cache.ptr()];

        // Fill the cache with the prefix (one update over its keys).
        let fill = Batch::single(prefix)?;
        let fill_ws = testing::alloc_zeroed(&ctx, GatePlan::new(&config, &fill)?.workspace_bytes())?;
        let k_prefix = DeviceTensor { layout: Layout3::contiguous(prefix, HKV, D), ..k_all };
        unsafe {
            update_kblock_cache(
                &gate,
                &device,
                0,
                &fill,
                &k_prefix,
                &caches,
                fill_ws.ptr(),
                fill_ws.len(),
                stream.raw(),
            )?
        };
        stream.synchronize()?;
        drop(fill_ws);

        let batch = Batch::from_lens(&[(CHUNK, seq)])?;
        let layout = MaskLayout::new(&batch, HQ, 64)?;
        let workspace = testing::alloc_zeroed(&ctx, GatePlan::new(&config, &batch)?.workspace_bytes())?;
        let counts = testing::alloc_zeroed(&ctx, layout.rows() * 4)?;
        let indices = testing::alloc_zeroed(&ctx, layout.index_capacity() * 4)?;
        let offsets = testing::alloc_zeroed(&ctx, (layout.rows() + 1) * 8)?;
        let mask = DeviceMask {
            counts: counts.ptr(),
            counts_len: layout.rows(),
            indices: indices.ptr(),
            indices_len: layout.index_capacity(),
            row_offsets: offsets.ptr(),
            row_offsets_len: layout.rows() + 1,
        };
        let (ws, ws_len) = (workspace.ptr(), workspace.len());
        let one_shot = median(testing::time_ms(&stream, warmup, reps, || unsafe {
            compute_mask(&gate, &device, 0, &params, &batch, &q, &k_all, &mask, ws, ws_len, stream.raw())
        })?);
        // The chunk starts on a block boundary, so repeating the update is
        // idempotent (no partial state is read).
        let update = median(testing::time_ms(&stream, warmup, reps, || unsafe {
            update_kblock_cache(&gate, &device, 0, &batch, &k_new, &caches, ws, ws_len, stream.raw())
        })?);
        let cached = median(testing::time_ms(&stream, warmup, reps, || unsafe {
            update_kblock_cache(&gate, &device, 0, &batch, &k_new, &caches, ws, ws_len, stream.raw())?;
            compute_mask_cached(&gate, &device, 0, &params, &batch, &q, &caches, &mask, ws, ws_len, stream.raw())
        })?);
        stream.synchronize()?;
        println!("{seq:>7} {CHUNK:>6} {one_shot:>14.4} {update:>14.4} {cached:>10.4} {:>8.2}", one_shot / cached);
        for (name, ms) in [("gate_one_shot", one_shot), ("kcache_update", update), ("kcache_update_and_mask", cached)] {
            lines.push(format!(
                "{{\"impl\":\"seerattn_{name}\",\"seq_len\":{seq},\"chunk\":{CHUNK},\"ms\":{ms:.4},\"device\":\"{device_name}\",\"date\":\"{date}\",\"method\":\"threshold\",\"q_heads\":{HQ},\"kv_heads\":{HKV},\"head_dim\":{D},\"dtype\":\"bf16\"}}"
            ));
        }
    }
    if let Some(path) = out_path {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("open results file");
        for l in &lines {
            writeln!(f, "{l}").expect("write results");
        }
        println!("appended {} lines to {path}", lines.len());
    }
    Ok(())
}
