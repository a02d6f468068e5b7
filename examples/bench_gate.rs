//! Benchmark of the gate on the GPU: pooling + projection + scores +
//! selection (`seerattn::gpu::gate`) at 8k, 32k and 128k tokens, 32 query
//! heads, 8 KV heads, head_dim 128, bf16, against its memory floor: reading
//! Q and K once at the device-to-device bandwidth measured in the same run.
//!
//! `bench_gate [out.jsonl]` prints a table and appends JSON lines
//! (`impl, seq_len, density, ms, tflops, device, date`, plus the method and
//! the floor) to the file. Built by `scripts/gpu-test.sh build`, run on the
//! GPU machine by `scripts/gpu-test.sh bench`.

use seerattn::cuda::{self, testing, testing::Stream};
use seerattn::gpu::gate::{compute_mask, DeviceMask, DeviceTensor, GatePlan};
use seerattn::*;

#[path = "common/mod.rs"]
mod common;
use common::*;

fn main() -> Result<()> {
    let (warmup, reps) = warmup_and_reps();
    let out_path = std::env::args().nth(1);
    let ctx = cuda::current_context()?;
    let stream = Stream::new(&ctx)?;
    let (device_name, date) = device_and_date(&ctx);

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
    let config = common::config();
    let (gate, device) = common::gate(&ctx)?;
    for seq in [8192usize, 32768, 131072] {
        let batch = Batch::single(seq)?;
        let qbuf = random_bf16(&ctx, seq, HQ, 1)?;
        let kbuf = random_bf16(&ctx, seq, HKV, 2)?;
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
    append_results(out_path.as_deref(), &lines);
    Ok(())
}
