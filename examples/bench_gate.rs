//! Benchmark of the gate on the GPU: pooling + projection + scores +
//! selection (`seerattn::gpu::gate`) at 8k, 32k and 128k tokens, 32 query
//! heads, 8 KV heads, head_dim 128, bf16, against its memory floor: reading
//! Q and K once at the device-to-device bandwidth measured in the same run.
//!
//! `bench_gate [out.jsonl]` prints a table and appends JSON lines
//! (`impl, seq_len, density, ms, tflops, device, date`, plus the method and
//! the floor) to the file. Built by `scripts/gpu-test.sh build`, run on the
//! GPU machine by `scripts/gpu-test.sh bench`.

use seerattn::cuda::{self, testing, testing::Stream, DeviceBuffer};
use seerattn::gpu::gate::{compute_mask, DeviceGate, DeviceMask, DeviceTensor, GatePlan};
use seerattn::*;
use std::io::Write;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Device buffer of `n` random bf16 values in [-2, 2) with per-64-token-block
/// offsets (so gate scores are not flat); generated on the host once.
fn random_bf16(ctx: &cuda::Ctx, tokens: usize, heads: usize, seed: u64) -> DeviceBuffer {
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
    let buf = testing::alloc_zeroed(ctx, bytes.len()).expect("alloc");
    testing::copy_to_device(ctx, buf.ptr(), &bytes).expect("upload");
    buf
}

fn main() -> Result<()> {
    // SEER_BENCH_QUICK=1: one timed run per case (for profilers, which replay each kernel).
    let quick = std::env::var_os("SEER_BENCH_QUICK").is_some();
    let out_path = std::env::args().nth(1);
    let ctx = cuda::current_context()?;
    let stream = Stream::new(&ctx)?;
    let device_name = device_name(&ctx);
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%F")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    // Bandwidth: a 2 GiB device-to-device copy, counting bytes read + written.
    let len = 2usize << 30;
    let (a, b) = (testing::alloc_zeroed(&ctx, len)?, testing::alloc_zeroed(&ctx, len)?);
    let copy_ms = median(testing::time_ms(&stream, 3, 10, || testing::copy_async(&stream, b.ptr(), a.ptr(), len))?);
    let bandwidth = 2.0 * len as f64 / (copy_ms as f64 * 1e-3);
    drop((a, b));
    println!("device {device_name}: copy bandwidth {:.0} GB/s (read + write)", bandwidth / 1e9);

    let mut lines = Vec::new();
    println!(
        "{:>7} {:>10} {:>8} {:>10} {:>10} {:>8} {:>8}",
        "seq", "method", "density", "gate ms", "floor ms", "x floor", "TFLOPs"
    );
    for seq in [8192usize, 32768, 131072] {
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
            .flat_map(|i| {
                half::bf16::from_f32(((i * 2654435761usize) % 1000) as f32 / 1000.0 * 0.2 - 0.1).to_le_bytes()
            })
            .collect();
        gate.set_layer_weights(0, WeightRef { dtype: DType::BF16, shape: [HQ, 3 * D, D], bytes: &w }, None)?;
        let device = DeviceGate::upload(&gate, &ctx)?;
        let batch = Batch::single(seq)?;
        let qbuf = random_bf16(&ctx, seq, HQ, 1);
        let kbuf = random_bf16(&ctx, seq, HKV, 2);
        let q = DeviceTensor { ptr: qbuf.ptr(), dtype: DType::BF16, layout: Layout3::contiguous(seq, HQ, D) };
        let k = DeviceTensor { ptr: kbuf.ptr(), dtype: DType::BF16, layout: Layout3::contiguous(seq, HKV, D) };
        let layout = MaskLayout::new(&batch, HQ, 64)?;
        let plan = GatePlan::new(&config, &batch)?;
        let counts = testing::alloc_zeroed(&ctx, layout.rows() * 4)?;
        let indices = testing::alloc_zeroed(&ctx, layout.index_capacity() * 4)?;
        let offsets = testing::alloc_zeroed(&ctx, (layout.rows() + 1) * 8)?;
        let workspace = testing::alloc_zeroed(&ctx, plan.workspace_bytes())?;
        let mask = DeviceMask {
            counts: counts.ptr(),
            counts_len: layout.rows(),
            indices: indices.ptr(),
            indices_len: layout.index_capacity(),
            row_offsets: offsets.ptr(),
            row_offsets_len: layout.rows() + 1,
        };
        let floor_ms = ((seq * (HQ + HKV) * D * 2) as f64 / bandwidth * 1e3) as f32;
        let kb = seq.div_ceil(64);
        let flops = (2 * kb * HQ * 3 * D * D + 2 * HQ * kb * (kb + 1) / 2 * D) as f64;
        for (name, params) in [
            ("threshold", MaskParams { threshold: 0.002, ..MaskParams::from_config(&config) }),
            ("topk", MaskParams { method: SparsityMethod::NzRatio, nz_ratio: 0.1, ..MaskParams::from_config(&config) }),
        ] {
            let (warmup, reps) = if quick { (1, 1) } else { (5, 30) };
            let times = testing::time_ms(&stream, warmup, reps, || unsafe {
                compute_mask(
                    &gate,
                    &device,
                    0,
                    &params,
                    &batch,
                    &q,
                    &k,
                    &mask,
                    workspace.ptr(),
                    workspace.len(),
                    stream.raw(),
                )
            })?;
            let ms = median(times);
            stream.synchronize()?;
            let mut c = vec![0u8; layout.rows() * 4];
            testing::copy_to_host(&ctx, &mut c, counts.ptr())?;
            let selected: u64 = c.chunks(4).map(|x| i32::from_le_bytes(x.try_into().unwrap()) as u64).sum();
            let density = selected as f64 / (HQ * kb * (kb + 1) / 2) as f64;
            let tflops = flops / (ms as f64 * 1e-3) / 1e12;
            println!(
                "{seq:>7} {name:>10} {density:>8.3} {ms:>10.4} {floor_ms:>10.4} {:>8.2} {tflops:>8.2}",
                ms / floor_ms
            );
            lines.push(format!(
                "{{\"impl\":\"seerattn_gate\",\"seq_len\":{seq},\"density\":{density:.4},\"ms\":{ms:.4},\"tflops\":{tflops:.3},\"device\":\"{device_name}\",\"date\":\"{date}\",\"method\":\"{name}\",\"floor_ms\":{floor_ms:.4},\"x_floor\":{:.3},\"q_heads\":{HQ},\"kv_heads\":{HKV},\"head_dim\":{D},\"dtype\":\"bf16\"}}",
                ms / floor_ms
            ));
        }
        lines.push(format!(
            "{{\"impl\":\"memory_floor\",\"seq_len\":{seq},\"density\":1.0,\"ms\":{floor_ms:.4},\"tflops\":0.0,\"device\":\"{device_name}\",\"date\":\"{date}\",\"bandwidth_gbs\":{:.1},\"what\":\"read Q and K once at the measured copy bandwidth\"}}",
            bandwidth / 1e9
        ));
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

fn device_name(ctx: &cuda::Ctx) -> String {
    cuda::device_name(ctx).unwrap_or_else(|_| "unknown CUDA device".into())
}
