//! Benchmark of the distillation target kernel (kernels/distill.cu,
//! `seerattn::gpu::distill::distill_target`) against a dense causal
//! attention forward of the same shape in the same run: this library's own
//! prefill (`sparse_prefill_cuda`) with every causal block selected. 32
//! query heads, 8 KV heads, head_dim 128, bf16, one sequence of 8k and 32k
//! tokens. Issue 8's bound: the target at most 1.3x the dense forward.
//!
//! `bench_distill [out.jsonl]` prints a table and appends JSON lines
//! (`impl, seq_len, density, ms, tflops, device, date`; the target's
//! TFLOP/s count its Q K^T only, 2 * N^2 / 2 * D per head, the forward's
//! Q K^T and P V) to the file. Built by `scripts/gpu-test.sh build`, run on
//! the GPU machine by `scripts/gpu-test.sh bench`.

use seerattn::attention::{sparse_prefill_cuda, AttentionParams};
use seerattn::cuda::{self, testing, testing::Stream};
use seerattn::distill::cuda::CudaGateTrainer;
use seerattn::distill::TrainConfig;
use seerattn::gpu::distill::{distill_target, target_len, workspace_bytes};
use seerattn::gpu::{DeviceMask, DeviceTensor};
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
    let mut lines = Vec::new();
    println!(
        "{:>7} {:>14} {:>10} {:>14} {:>10} {:>8}",
        "seq", "target ms", "TFLOP/s", "dense fwd ms", "TFLOP/s", "ratio"
    );
    for seq in [8192usize, 32768] {
        let batch = Batch::single(seq)?;
        let qbuf = random_bf16(&ctx, seq, HQ, 1)?;
        let kbuf = random_bf16(&ctx, seq, HKV, 2)?;
        let vbuf = random_bf16(&ctx, seq, HKV, 3)?;
        let t = |b: &cuda::DeviceBuffer, heads| DeviceTensor {
            ptr: b.ptr(),
            dtype: DType::BF16,
            layout: Layout3::contiguous(seq, heads, D),
        };
        let (q, k, v) = (t(&qbuf, HQ), t(&kbuf, HKV), t(&vbuf, HKV));

        let len = target_len(&batch, HQ)?;
        let target = testing::alloc_zeroed(&ctx, len * 4)?;
        let ws_bytes = workspace_bytes(&batch, HQ, ctx.sm_count() as usize)?;
        let ws = testing::alloc_zeroed(&ctx, ws_bytes)?;
        let scale = 1.0 / (D as f32).sqrt();
        let target_ms = median(testing::time_ms(&stream, warmup, reps, || unsafe {
            distill_target(&q, &k, &batch, scale, (target.ptr(), len), (ws.ptr(), ws_bytes), stream.raw())
        })?);

        // The dense forward: every causal block of every row selected.
        let layout = MaskLayout::new(&batch, HQ, 64)?;
        let mut mask = BlockMask::empty(&layout);
        for r in 0..layout.rows() {
            let id = layout.row_id(r);
            mask.set_row(r, &(0..=id.q_block as i32).collect::<Vec<_>>());
        }
        let bytes_i32 = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let upload = |b: &[u8]| -> Result<cuda::DeviceBuffer> {
            let d = testing::alloc_zeroed(&ctx, b.len())?;
            testing::copy_to_device(&ctx, d.ptr(), b)?;
            Ok(d)
        };
        let counts = upload(&bytes_i32(&mask.counts))?;
        let indices = upload(&bytes_i32(&mask.indices))?;
        let offsets = upload(&mask.row_offsets.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
        let dmask = DeviceMask {
            counts: counts.ptr(),
            counts_len: mask.counts.len(),
            indices: indices.ptr(),
            indices_len: mask.indices.len(),
            row_offsets: offsets.ptr(),
            row_offsets_len: mask.row_offsets.len(),
        };
        let obuf = testing::alloc_zeroed(&ctx, seq * HQ * D * 2)?;
        let out = t(&obuf, HQ);
        let params = AttentionParams::for_head_dim(D);
        let dense_ms = median(testing::time_ms(&stream, warmup, reps, || unsafe {
            sparse_prefill_cuda(&q, &k, &v, &batch, &dmask, &params, &out, None, (0, 0), stream.raw())
        })?);
        stream.synchronize()?;

        // Causal pairs, counted by block as the kernels compute them.
        let blocks = (seq / 64) * (seq / 64 + 1) / 2;
        let qk_flops = 2.0 * (blocks * 64 * 64 * D * HQ) as f64;
        let target_tf = qk_flops / (target_ms as f64 * 1e-3) / 1e12;
        let dense_tf = 2.0 * qk_flops / (dense_ms as f64 * 1e-3) / 1e12;
        println!(
            "{seq:>7} {target_ms:>14.3} {target_tf:>10.1} {dense_ms:>14.3} {dense_tf:>10.1} {:>8.2}",
            target_ms / dense_ms
        );
        // Training throughput of one layer: a feed (target, gate logits,
        // loss and gradient; synchronized to return the losses) and an
        // optimizer step, wall clock.
        let config = common::config();
        let gate = seerattn::distill::init_gate(config, 5)?;
        let mut trainer = CudaGateTrainer::new(gate, TrainConfig::upstream(1000), &ctx)?;
        let train_once = |trainer: &mut CudaGateTrainer| -> Result<()> {
            unsafe {
                trainer.accumulate(0, &q, &k, &q, &k, &batch, scale as f64, stream.raw())?;
                trainer.step(stream.raw())?;
            }
            stream.synchronize()
        };
        for _ in 0..warmup.min(2) {
            train_once(&mut trainer)?;
        }
        let mut times = vec![];
        for _ in 0..reps.min(10) {
            let t0 = std::time::Instant::now();
            train_once(&mut trainer)?;
            times.push(t0.elapsed().as_secs_f32() * 1e3);
        }
        let train_ms = median(times);
        let tokens_per_s = seq as f64 / (train_ms as f64 * 1e-3);
        println!("{seq:>7} train step (feed + AdamW, one layer): {train_ms:.3} ms, {tokens_per_s:.0} tokens/s");
        lines.push(format!(
            "{{\"impl\":\"seerattn_distill_train_step\",\"seq_len\":{seq},\"density\":1.0,\"ms\":{train_ms:.4},\"tflops\":0.0,\"tokens_per_s\":{tokens_per_s:.0},\"device\":\"{device_name}\",\"date\":\"{date}\",\"q_heads\":{HQ},\"kv_heads\":{HKV},\"head_dim\":{D},\"dtype\":\"bf16\",\"bench\":\"bench_distill\",\"what\":\"one layer: target + gate logits + loss and gradient + AdamW step, wall clock\"}}"
        ));
        for (name, ms, tf) in
            [("seerattn_distill_target", target_ms, target_tf), ("seerattn_prefill", dense_ms, dense_tf)]
        {
            lines.push(format!(
                "{{\"impl\":\"{name}\",\"seq_len\":{seq},\"density\":1.0,\"ms\":{ms:.4},\"tflops\":{tf:.2},\"device\":\"{device_name}\",\"date\":\"{date}\",\"q_heads\":{HQ},\"kv_heads\":{HKV},\"head_dim\":{D},\"dtype\":\"bf16\",\"bench\":\"bench_distill\"}}"
            ));
        }
    }
    append_results(out_path.as_deref(), &lines);
    Ok(())
}
