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

use seerattn::cuda::{self, testing, testing::Stream};
use seerattn::gpu::gate::{
    compute_mask, compute_mask_cached, kblock_cache_bytes, update_kblock_cache, DeviceMask, DeviceTensor, GatePlan,
};
use seerattn::*;

#[path = "common/mod.rs"]
mod common;
use common::*;

const CHUNK: usize = 512;

fn main() -> Result<()> {
    let (warmup, reps) = warmup_and_reps();
    let out_path = std::env::args().nth(1);
    let ctx = cuda::current_context()?;
    let stream = Stream::new(&ctx)?;
    let (device_name, date) = device_and_date(&ctx);
    let config = common::config();
    let (gate, device) = common::gate(&ctx)?;
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
    append_results(out_path.as_deref(), &lines);
    Ok(())
}
