//! Sparse prefill on the GPU (kernels/attention.cu) against the CPU
//! reference, the upstream vectors and itself (graph replay, two streams),
//! and through the C ABI. Every test here needs a CUDA GPU: they are ignored
//! by plain `cargo test` and run by `scripts/gpu-test.sh run`.
//!
//! The kernel multiplies 16-bit inputs on tensor cores with f32
//! accumulation and rounds P to 16 bits for P·V (as FlashAttention does);
//! the reference accumulates everything in f32. Outputs must agree to a
//! relative error (‖gpu − cpu‖ / ‖cpu‖ per row set) of at most 1e-2 (the
//! issue's bound for 16-bit outputs), rows the mask leaves empty must be
//! exact zeros with lse = −inf, and nothing may be NaN. Every output buffer
//! is poisoned with NaN bytes first, so an unwritten element fails.

mod common;
use common::*;
use seerattn::attention::{sparse_prefill, sparse_prefill_cuda, AttentionParams};
use seerattn::cuda::{self, testing, testing::Stream, Ctx, DeviceBuffer};
use seerattn::gpu::{DeviceMask, DeviceTensor};
use seerattn::*;

fn ctx() -> Ctx {
    cuda::current_context().expect("a CUDA device")
}

/// One test problem: inputs in host memory (possibly strided), a mask.
struct Problem {
    batch: Batch,
    hq: usize,
    d: usize,
    dtype: DType,
    /// Host bytes and layout of q, k, v (same bytes go to the device).
    q: (Vec<u8>, Layout3),
    k: (Vec<u8>, Layout3),
    v: (Vec<u8>, Layout3),
    mask: BlockMask,
    layout: MaskLayout,
}

/// `[tokens, heads, d]` random values; with `padded`, rows and heads carry
/// 8 extra elements of garbage (strided views, 16-byte aligned).
fn random_tensor(
    tokens: usize,
    heads: usize,
    d: usize,
    dtype: DType,
    padded: bool,
    rng: &mut Rng,
) -> (Vec<u8>, Layout3) {
    let pad = if padded { 8 } else { 0 };
    let head_stride = d + pad;
    let row_stride = heads * head_stride + pad;
    let vals: Vec<f32> = (0..tokens.max(1) * row_stride).map(|_| rng.uniform(-2.0, 2.0)).collect();
    (encode(&vals, dtype), Layout3 { shape: [tokens, heads, d], strides: [row_stride, head_stride, 1] })
}

/// A random mask: each causal block kept with probability `density`; about
/// one row in `empty_every` left empty.
fn random_mask(layout: &MaskLayout, density: f32, empty_every: usize, rng: &mut Rng) -> BlockMask {
    let mut mask = BlockMask::empty(layout);
    for r in 0..layout.rows() {
        let id = layout.row_id(r);
        if empty_every > 0 && rng.range(0, empty_every - 1) == 0 {
            continue;
        }
        let blocks: Vec<i32> = (0..=id.q_block)
            .filter(|&b| b == id.q_block || rng.uniform(0.0, 1.0) < density)
            .map(|b| b as i32)
            .collect();
        mask.set_row(r, &blocks);
    }
    mask
}

impl Problem {
    #[allow(clippy::too_many_arguments)]
    fn new(
        lens: &[(usize, usize)],
        hq: usize,
        hkv: usize,
        d: usize,
        dtype: DType,
        padded: bool,
        density: f32,
        empty_every: usize,
        seed: u64,
    ) -> Problem {
        let mut rng = Rng(seed);
        let batch = Batch::from_lens(lens).unwrap();
        let q = random_tensor(batch.total_q(), hq, d, dtype, padded, &mut rng);
        let k = random_tensor(batch.total_k(), hkv, d, dtype, padded, &mut rng);
        let v = random_tensor(batch.total_k(), hkv, d, dtype, padded, &mut rng);
        let layout = MaskLayout::new(&batch, hq, 64).unwrap();
        let mask = random_mask(&layout, density, empty_every, &mut rng);
        Problem { batch, hq, d, dtype, q, k, v, mask, layout }
    }

    fn view<'a>(&self, t: &'a (Vec<u8>, Layout3), name: &str) -> Tensor3<'a> {
        Tensor3::new(name, &t.0, self.dtype, t.1).unwrap()
    }

    /// The CPU reference: output (as f32) and lse.
    fn reference(&self, out_dtype: DType) -> (Vec<f32>, Vec<f32>) {
        let tq = self.batch.total_q();
        let mut out = vec![0u8; tq * self.hq * self.d * out_dtype.size()];
        let mut lse = vec![0f32; tq * self.hq];
        let layout = Layout3::contiguous(tq, self.hq, self.d);
        let mut o = Tensor3Mut::new("out", &mut out, out_dtype, layout).unwrap();
        let params = AttentionParams::for_head_dim(self.d);
        let (q, k, v) = (self.view(&self.q, "q"), self.view(&self.k, "k"), self.view(&self.v, "v"));
        sparse_prefill(&q, &k, &v, &self.batch, self.mask.as_ref(), &params, &mut o, Some(&mut lse)).unwrap();
        (decode(&out, out_dtype), lse)
    }
}

/// A problem's buffers on the device.
struct OnDevice {
    _buffers: Vec<DeviceBuffer>,
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    mask: DeviceMask,
    out: DeviceTensor,
    out_buf: DeviceBuffer,
    lse_buf: DeviceBuffer,
    /// Split-KV scratch (`workspace_bytes`); `use_workspace` false passes
    /// none, which runs unsplit.
    workspace: Option<DeviceBuffer>,
    use_workspace: bool,
}

fn upload(ctx: &Ctx, bytes: &[u8]) -> DeviceBuffer {
    let b = testing::alloc_zeroed(ctx, bytes.len().max(16)).unwrap();
    testing::copy_to_device(ctx, b.ptr(), bytes).unwrap();
    b
}

/// NaN bytes everywhere (0xFF is NaN in bf16, f16 and f32).
fn poison(ctx: &Ctx, b: &DeviceBuffer) {
    testing::copy_to_device(ctx, b.ptr(), &vec![0xFFu8; b.len()]).unwrap();
}

impl OnDevice {
    fn new(ctx: &Ctx, p: &Problem, out_dtype: DType) -> OnDevice {
        let bq = upload(ctx, &p.q.0);
        let bk = upload(ctx, &p.k.0);
        let bv = upload(ctx, &p.v.0);
        let i32s = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let bc = upload(ctx, &i32s(&p.mask.counts));
        let bi = upload(ctx, &i32s(&p.mask.indices));
        let bo = upload(ctx, &p.mask.row_offsets.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        let tq = p.batch.total_q();
        let out_buf = testing::alloc_zeroed(ctx, tq * p.hq * p.d * out_dtype.size()).unwrap();
        let lse_buf = testing::alloc_zeroed(ctx, tq * p.hq * 4).unwrap();
        let mask = DeviceMask {
            counts: bc.ptr(),
            counts_len: p.mask.counts.len(),
            indices: bi.ptr(),
            indices_len: p.mask.indices.len(),
            row_offsets: bo.ptr(),
            row_offsets_len: p.mask.row_offsets.len(),
        };
        let t = |b: &DeviceBuffer, l: Layout3| DeviceTensor { ptr: b.ptr(), dtype: p.dtype, layout: l };
        let (q, k, v) = (t(&bq, p.q.1), t(&bk, p.k.1), t(&bv, p.v.1));
        let out = DeviceTensor { ptr: out_buf.ptr(), dtype: out_dtype, layout: Layout3::contiguous(tq, p.hq, p.d) };
        let ws = seerattn::gpu::attention::workspace_bytes(&p.batch, p.hq, p.d);
        let workspace = (ws > 0).then(|| testing::alloc_zeroed(ctx, ws).unwrap());
        OnDevice {
            _buffers: vec![bq, bk, bv, bc, bi, bo],
            q,
            k,
            v,
            mask,
            out,
            out_buf,
            lse_buf,
            workspace,
            use_workspace: true,
        }
    }

    /// # Safety
    /// Enqueues on `stream`; buffers live as long as `self`.
    unsafe fn enqueue(&self, p: &Problem, stream: &Stream) -> Result<()> {
        let params = AttentionParams::for_head_dim(p.d);
        let lse = Some((self.lse_buf.ptr(), p.batch.total_q() * p.hq));
        let ws = match (&self.workspace, self.use_workspace) {
            (Some(b), true) => (b.ptr(), b.len()),
            _ => (0, 0),
        };
        sparse_prefill_cuda(&self.q, &self.k, &self.v, &p.batch, &self.mask, &params, &self.out, lse, ws, stream.raw())
    }

    fn poison_outputs(&self, ctx: &Ctx) {
        poison(ctx, &self.out_buf);
        poison(ctx, &self.lse_buf);
    }

    fn read(&self, ctx: &Ctx) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0u8; self.out_buf.len()];
        testing::copy_to_host(ctx, &mut out, self.out_buf.ptr()).unwrap();
        let mut lse = vec![0u8; self.lse_buf.len()];
        testing::copy_to_host(ctx, &mut lse, self.lse_buf.ptr()).unwrap();
        (decode(&out, self.out.dtype), decode(&lse, DType::F32))
    }
}

/// The kernel these tests must exercise: wgmma on compute capability 9.0,
/// TMA on later GPUs, cp.async before; `SEERATTN_PREFILL_KERNEL=tma` or
/// `=cpasync` forces the others on Hopper (`scripts/gpu-test.sh run` runs
/// this file all three ways there).
fn expected_kernel(ctx: &Ctx) -> &'static str {
    let forced = std::env::var("SEERATTN_PREFILL_KERNEL").ok();
    let cc = ctx.compute_capability();
    match forced.as_deref() {
        _ if cc.0 < 9 => "cpasync",
        Some("cpasync") => "cpasync",
        Some("tma") => "tma",
        _ if cc == (9, 0) => "wgmma",
        _ => "tma",
    }
}

/// Run `p` on the GPU (poisoned outputs), return output and lse; split-KV
/// where the batch calls for it.
fn run_gpu(ctx: &Ctx, p: &Problem, out_dtype: DType) -> (Vec<f32>, Vec<f32>) {
    run_gpu_with(ctx, p, out_dtype, true)
}

/// As [`run_gpu`]; `use_workspace` false runs unsplit whatever the batch.
fn run_gpu_with(ctx: &Ctx, p: &Problem, out_dtype: DType, use_workspace: bool) -> (Vec<f32>, Vec<f32>) {
    let mut dev = OnDevice::new(ctx, p, out_dtype);
    dev.use_workspace = use_workspace;
    let kernel = seerattn::gpu::attention::selected_kernel(ctx, &dev.q, &dev.k, &dev.v).unwrap();
    assert_eq!(kernel, expected_kernel(ctx), "the kernel path under test");
    dev.poison_outputs(ctx);
    let stream = Stream::new(ctx).unwrap();
    unsafe { dev.enqueue(p, &stream) }.unwrap();
    stream.synchronize().unwrap();
    dev.read(ctx)
}

/// Compare GPU results with the reference: per (sequence, head) relative
/// error of the output at most `tol`, empty rows exact, lse close, no NaN.
fn check(what: &str, p: &Problem, gpu: &(Vec<f32>, Vec<f32>), cpu: &(Vec<f32>, Vec<f32>), tol: f64) {
    let (d, hq, tq) = (p.d, p.hq, p.batch.total_q());
    let mut worst = 0f64;
    for (s, sq) in p.batch.seqs(64).enumerate() {
        for h in 0..hq {
            let (mut num, mut den) = (0f64, 0f64);
            for i in 0..sq.q_len {
                let t = sq.q_offset + i;
                let pos = sq.q_start + i;
                let row = p.layout.row(s, h, pos / 64 - sq.first_q_block);
                let empty = p.mask.counts[row] == 0;
                let (gl, cl) = (gpu.1[h * tq + t], cpu.1[h * tq + t]);
                for x in 0..d {
                    let idx = (t * hq + h) * d + x;
                    let (g, c) = (gpu.0[idx] as f64, cpu.0[idx] as f64);
                    assert!(g.is_finite(), "{what}: seq {s} head {h} token {i} dim {x}: GPU wrote {g}");
                    if empty {
                        assert_eq!(g, 0.0, "{what}: seq {s} head {h} token {i}: empty row must be exact zeros");
                    }
                    num += (g - c) * (g - c);
                    den += c * c;
                }
                if empty {
                    assert_eq!(gl, f32::NEG_INFINITY, "{what}: seq {s} head {h} token {i}: empty row lse");
                } else {
                    assert!(
                        gl.is_finite() && (gl - cl).abs() <= 1e-2 * (1.0 + cl.abs()),
                        "{what}: seq {s} head {h} token {i}: lse {gl} vs {cl}"
                    );
                }
            }
            if den > 0.0 {
                let rel = (num / den).sqrt();
                worst = worst.max(rel);
                assert!(rel <= tol, "{what}: seq {s} head {h}: relative error {rel:.2e} > {tol:.0e}");
            }
        }
    }
    eprintln!("{what}: worst relative error {worst:.2e}");
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_matches_reference_on_random_shapes() {
    let ctx = ctx();
    let mut seed = 1u64;
    // (lens, hq, hkv, d, dtype, padded, density, empty_every, out f32?)
    type Shape = (&'static [(usize, usize)], usize, usize, usize, DType, bool, f32, usize, bool);
    let shapes: &[Shape] = &[
        (&[(1000, 1000)], 4, 1, 128, DType::BF16, false, 0.4, 7, false),
        (&[(1000, 1000)], 8, 8, 64, DType::F16, false, 0.4, 7, false),
        (&[(63, 63)], 8, 1, 128, DType::BF16, false, 1.0, 0, true),
        (&[(5, 5), (1, 1), (64, 64), (65, 65)], 4, 4, 64, DType::BF16, true, 0.7, 0, false),
        (&[(300, 1000), (64, 1300), (1, 777)], 8, 2, 128, DType::F16, true, 0.5, 5, true),
        (&[(500, 500), (200, 900), (130, 130)], 16, 2, 128, DType::BF16, false, 0.3, 9, false),
        (&[(2048, 2048)], 2, 1, 64, DType::BF16, false, 0.1, 0, true),
        (&[(777, 777)], 32, 8, 128, DType::BF16, true, 1.0, 0, false),
    ];
    for &(lens, hq, hkv, d, dtype, padded, density, empty_every, f32_out) in shapes {
        seed += 1;
        let p = Problem::new(lens, hq, hkv, d, dtype, padded, density, empty_every, seed);
        let out_dtype = if f32_out { DType::F32 } else { dtype };
        let what =
            format!("{lens:?} hq {hq} hkv {hkv} d {d} {} padded {padded} out {}", dtype.name(), out_dtype.name());
        let cpu = p.reference(out_dtype);
        // Every shape unsplit, and split-KV where the batch calls for it
        // (these small batches mostly do).
        let gpu = run_gpu_with(&ctx, &p, out_dtype, false);
        check(&format!("{what} unsplit"), &p, &gpu, &cpu, 1e-2);
        if seerattn::gpu::attention::split_count(&p.batch, hq) > 1 {
            let gpu = run_gpu(&ctx, &p, out_dtype);
            check(&format!("{what} split-KV"), &p, &gpu, &cpu, 1e-2);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_split_kv_chunk_over_a_long_cache() {
    // A chunk of queries over many keys (chunked prefill): few rows, long
    // key lists, so the rows are split; with empty rows and a partial first
    // query block. Split and unsplit both match the reference.
    let ctx = ctx();
    for (lens, density, empty) in
        [(&[(100usize, 6000usize)][..], 0.5f32, 0usize), (&[(70, 3000), (1, 5000)][..], 0.3, 3)]
    {
        let p = Problem::new(lens, 4, 1, 128, DType::BF16, false, density, empty, 11);
        let splits = seerattn::gpu::attention::split_count(&p.batch, 4);
        assert!(splits > 1, "{lens:?}: expected a split batch");
        let cpu = p.reference(DType::BF16);
        let split = run_gpu(&ctx, &p, DType::BF16);
        check(&format!("{lens:?} split into {splits}"), &p, &split, &cpu, 1e-2);
        let unsplit = run_gpu_with(&ctx, &p, DType::BF16, false);
        check(&format!("{lens:?} unsplit"), &p, &unsplit, &cpu, 1e-2);
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_full_causal_matches_dense_reference() {
    // Every causal block selected: plain causal attention.
    let ctx = ctx();
    for (d, dtype) in [(64, DType::F16), (128, DType::BF16)] {
        let p = Problem::new(&[(1500, 1500)], 4, 2, d, dtype, false, 1.0, 0, 40 + d as u64);
        let cpu = p.reference(DType::F32);
        let gpu = run_gpu(&ctx, &p, DType::F32);
        check(&format!("full causal d {d}"), &p, &gpu, &cpu, 1e-2);
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_matches_upstream_vectors() {
    // The recorded upstream cases: q, k, v (post-RoPE, bf16) and the
    // threshold mask; upstream's Triton output must match where rows are
    // not empty (upstream writes NaN there; we write zeros, as the CPU path).
    let ctx = ctx();
    for name in ["gqa4_s1000", "mqa_s3072"] {
        let path = upstream_dir().join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = |n: &str| file.tensor(n).unwrap();
        let [seq, hq, d] = <[usize; 3]>::try_from(t("q").shape()).unwrap();
        let hkv = t("k").shape()[1];
        let batch = Batch::single(seq).unwrap();
        let layout = MaskLayout::new(&batch, hq, 64).unwrap();
        let recorded = t("mask_threshold_0_05");
        let mask = BlockMask::from_dense(&layout, recorded.data()).unwrap();
        let p = Problem {
            batch,
            hq,
            d,
            dtype: DType::BF16,
            q: (t("q").data().to_vec(), Layout3::contiguous(seq, hq, d)),
            k: (t("k").data().to_vec(), Layout3::contiguous(seq, hkv, d)),
            v: (t("v").data().to_vec(), Layout3::contiguous(seq, hkv, d)),
            mask,
            layout,
        };
        let cpu = p.reference(DType::F32);
        let gpu = run_gpu(&ctx, &p, DType::BF16);
        check(&format!("upstream {name} vs CPU"), &p, &gpu, &cpu, 1e-2);
        let upstream = decode(t("out_sparse_threshold_0_05").data(), DType::BF16);
        let (mut num, mut den) = (0f64, 0f64);
        for (g, u) in gpu.0.iter().zip(&upstream) {
            if u.is_finite() {
                num += ((g - u) as f64).powi(2);
                den += (*u as f64).powi(2);
            } else {
                assert_eq!(*g, 0.0, "{name}: upstream NaN row must be zeros here");
            }
        }
        let rel = (num / den).sqrt();
        eprintln!("{name}: relative error vs upstream Triton {rel:.2e}");
        assert!(rel <= 1e-2, "{name}: relative error vs upstream {rel:.2e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_graph_capture_replays_with_new_inputs() {
    let ctx = ctx();
    let p = Problem::new(&[(700, 700), (100, 400)], 8, 2, 128, DType::BF16, false, 0.5, 6, 77);
    let dev = OnDevice::new(&ctx, &p, DType::BF16);
    let stream = Stream::new(&ctx).unwrap();
    unsafe { dev.enqueue(&p, &stream) }.unwrap();
    stream.synchronize().unwrap();
    let graph = unsafe { testing::capture(&stream, || dev.enqueue(&p, &stream)) }.unwrap();
    for round in 0..3u64 {
        // New q, k, v in the same buffers; eager result first, then the replay.
        let fresh = Problem::new(&[(700, 700), (100, 400)], 8, 2, 128, DType::BF16, false, 0.5, 6, 77);
        let mut rng = Rng(1000 + round);
        let q = random_tensor(p.batch.total_q(), 8, 128, DType::BF16, false, &mut rng);
        testing::copy_to_device(&ctx, dev.q.ptr, &q.0).unwrap();
        let p2 = Problem { q, ..fresh };
        dev.poison_outputs(&ctx);
        unsafe { dev.enqueue(&p2, &stream) }.unwrap();
        stream.synchronize().unwrap();
        let eager = dev.read(&ctx);
        dev.poison_outputs(&ctx);
        graph.launch(&stream).unwrap();
        stream.synchronize().unwrap();
        let replayed = dev.read(&ctx);
        assert!(
            eager.0.iter().zip(&replayed.0).all(|(a, b)| a.to_bits() == b.to_bits()),
            "round {round}: replay differs"
        );
        assert!(eager.1.iter().zip(&replayed.1).all(|(a, b)| a.to_bits() == b.to_bits()), "round {round}: replay lse");
        check(&format!("graph round {round}"), &p2, &replayed, &p2.reference(DType::BF16), 1e-2);
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_two_threads_two_streams_match_one() {
    let ctx = ctx();
    let p = Problem::new(&[(900, 900), (300, 600)], 8, 4, 64, DType::F16, false, 0.4, 0, 91);
    let serial = run_gpu(&ctx, &p, DType::F16);
    let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let dev = OnDevice::new(&ctx, &p, DType::F16);
                    dev.poison_outputs(&ctx);
                    let stream = Stream::new(&ctx).unwrap();
                    for _ in 0..5 {
                        unsafe { dev.enqueue(&p, &stream) }.unwrap();
                    }
                    stream.synchronize().unwrap();
                    dev.read(&ctx)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        assert!(r.0.iter().zip(&serial.0).all(|(a, b)| a.to_bits() == b.to_bits()), "threaded run differs");
        assert!(r.1.iter().zip(&serial.1).all(|(a, b)| a.to_bits() == b.to_bits()), "threaded lse differs");
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_survives_a_malformed_device_mask() {
    // Garbage counts, offsets and indices: the kernel must stay inside the
    // declared arrays (compute-sanitizer memcheck runs this test too) and
    // write finite values everywhere.
    let ctx = ctx();
    let mut p = Problem::new(&[(640, 640)], 4, 1, 64, DType::BF16, false, 0.5, 0, 5);
    let mut rng = Rng(123);
    for c in p.mask.counts.iter_mut() {
        *c = [-5, 0, 3, 1 << 30, rng.range(0, 20) as i32][rng.range(0, 4)];
    }
    for x in p.mask.indices.iter_mut() {
        *x = [-1, i32::MAX, i32::MIN, rng.range(0, 12) as i32, 3][rng.range(0, 4)];
    }
    let n = p.mask.row_offsets.len();
    for (i, o) in p.mask.row_offsets.iter_mut().enumerate() {
        *o = match i % 5 {
            0 => -7,
            1 => i64::MAX,
            2 => (n as i64) * 1000,
            _ => rng.range(0, 200) as i64,
        };
    }
    let (out, lse) = run_gpu(&ctx, &p, DType::BF16);
    assert!(out.iter().all(|x| x.is_finite()), "malformed mask: non-finite output");
    assert!(lse.iter().all(|x| !x.is_nan()), "malformed mask: NaN lse");
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_refuses_layouts_it_cannot_read() {
    let ctx = ctx();
    let p = Problem::new(&[(100, 100)], 2, 1, 64, DType::BF16, false, 1.0, 0, 3);
    let dev = OnDevice::new(&ctx, &p, DType::BF16);
    let stream = Stream::new(&ctx).unwrap();
    let params = AttentionParams::for_head_dim(64);
    let run = |q: &DeviceTensor, out: &DeviceTensor, mask: &DeviceMask, lse: Option<(u64, usize)>| unsafe {
        sparse_prefill_cuda(q, &dev.k, &dev.v, &p.batch, mask, &params, out, lse, (0, 0), stream.raw())
    };
    // Misaligned base pointer.
    let mut q = dev.q;
    q.ptr += 2;
    q.layout.shape[0] -= 1;
    let batch_ok = run(&q, &dev.out, &dev.mask, None);
    assert!(batch_ok.is_err());
    // Dim stride 2.
    let mut q = dev.q;
    q.layout.strides = [128, 64, 2];
    q.layout.shape = [100, 2, 64];
    assert!(matches!(run(&q, &dev.out, &dev.mask, None), Err(Error::Unsupported(_)) | Err(Error::InvalidArgument(_))));
    // Host memory as a device pointer.
    let host = vec![0u8; 100 * 2 * 64 * 2];
    let mut q = dev.q;
    q.ptr = host.as_ptr() as u64;
    assert!(matches!(run(&q, &dev.out, &dev.mask, None), Err(Error::InvalidArgument(_))));
    // Counts too short.
    let mut m = dev.mask;
    m.counts_len -= 1;
    assert!(matches!(run(&dev.q, &dev.out, &m, None), Err(Error::BufferTooSmall(_))));
    // lse of the wrong length.
    assert!(matches!(run(&dev.q, &dev.out, &dev.mask, Some((dev.lse_buf.ptr(), 3))), Err(Error::InvalidArgument(_))));
    // Nothing above may have launched: the stream is idle and clean.
    stream.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_ignores_non_finite_keys_past_a_sequence() {
    // The first sequence ends mid-block (100 = 64 + 36 tokens): its last key
    // tile also holds the next sequence's 28 keys, whose V rows are NaN
    // here. P is 0 there, and the kernels must not compute 0 * NaN: the first
    // sequence's output is finite and matches the reference (the second's is
    // NaN, as its own keys are, and is not checked).
    let ctx = ctx();
    let mut p = Problem::new(&[(100, 100), (28, 28)], 4, 2, 128, DType::BF16, false, 1.0, 0, 31);
    let row_bytes = p.v.1.strides[0] * 2;
    p.v.0[100 * row_bytes..128 * row_bytes].fill(0xFF);
    let cpu = p.reference(DType::BF16);
    let gpu = run_gpu_with(&ctx, &p, DType::BF16, false);
    let (hq, d) = (p.hq, p.d);
    let (mut num, mut den) = (0f64, 0f64);
    for t in 0..100 {
        for h in 0..hq {
            for x in 0..d {
                let idx = (t * hq + h) * d + x;
                let (g, c) = (gpu.0[idx] as f64, cpu.0[idx] as f64);
                assert!(g.is_finite(), "token {t} head {h} dim {x}: {g} (a NaN key past the sequence leaked in)");
                num += (g - c) * (g - c);
                den += c * c;
            }
        }
    }
    let rel = (num / den).sqrt();
    eprintln!("NaN keys past the sequence: relative error of the first sequence {rel:.2e}");
    assert!(rel <= 1e-2, "relative error {rel}");
}

/// The Hopper kernel hands rows out from a counter in the workspace when it
/// has one, else in fixed shares; which consumer computes a row must not
/// change a bit of it. A mask with each sequence's last row dense, as a
/// gate's are (rows far longer than the others), on a batch that does not
/// split, with and without the workspace.
#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_dynamic_and_fixed_schedules_agree_bit_for_bit() {
    let ctx = ctx();
    for d in [64, 128] {
        let mut p = Problem::new(&[(4096, 4096), (700, 700)], 8, 2, d, DType::BF16, false, 0.1, 0, 43);
        assert_eq!(seerattn::gpu::attention::split_count(&p.batch, p.hq), 1, "the batch must not split");
        for r in 0..p.layout.rows() {
            let id = p.layout.row_id(r);
            if id.q_block + 1 == id.k_blocks {
                p.mask.set_row(r, &(0..=id.q_block as i32).collect::<Vec<_>>());
            }
        }
        let cpu = p.reference(DType::BF16);
        let dynamic = run_gpu_with(&ctx, &p, DType::BF16, true);
        let fixed = run_gpu_with(&ctx, &p, DType::BF16, false);
        check(&format!("d{d} dynamic schedule"), &p, &dynamic, &cpu, 1e-2);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&dynamic.0) == bits(&fixed.0), "d{d}: outputs differ between the schedules");
        assert!(bits(&dynamic.1) == bits(&fixed.1), "d{d}: lse differ between the schedules");
    }
}

/// The device mask is not validated (that would need a synchronization), so
/// a row's blocks may come in any order. Softmax does not depend on it:
/// every row list reversed, putting the partial block of a sequence (whose
/// V rows past the end are NaN here) first instead of last, gives the
/// reference output of the sorted mask. The wgmma kernel takes that block's
/// P V on its mma.sync path in the middle of the row's pipeline then.
#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_takes_row_lists_in_any_order() {
    let ctx = ctx();
    for d in [64, 128] {
        let mut p = Problem::new(&[(300, 300), (28, 28)], 4, 2, d, DType::BF16, false, 0.6, 0, 41);
        let row_bytes = p.v.1.strides[0] * 2;
        p.v.0[300 * row_bytes..320 * row_bytes].fill(0xFF);
        let cpu = p.reference(DType::BF16);
        for r in 0..p.mask.counts.len() {
            let start = p.mask.row_offsets[r] as usize;
            p.mask.indices[start..start + p.mask.counts[r] as usize].reverse();
        }
        let gpu = run_gpu_with(&ctx, &p, DType::BF16, false);
        // The first sequence's outputs (the second's keys are NaN).
        let n = 300 * p.hq * d;
        assert!(gpu.0[..n].iter().all(|x| x.is_finite()), "d{d}: a NaN key past the sequence leaked in");
        let (mut num, mut den) = (0f64, 0f64);
        for (g, c) in gpu.0[..n].iter().zip(&cpu.0[..n]) {
            num += (*g as f64 - *c as f64).powi(2);
            den += (*c as f64).powi(2);
        }
        let rel = (num / den).sqrt();
        eprintln!("d{d}, reversed row lists: relative error of the first sequence {rel:.2e}");
        assert!(rel <= 1e-2, "d{d}: relative error {rel}");
    }
}

/// An f32 q (llama.cpp's Q is f32): rounded on the device to K's dtype
/// (kernels/convert.cu) into the front of the workspace, then the kernels
/// run on that copy, split-KV in the rest of the workspace where the batch
/// calls for it. Values within half a 16-bit step of the inputs, read
/// through a permuted view ([heads, tokens, d] in memory, as ggml permutes
/// Q), give the 16-bit q's output bit for bit; a workspace without room for
/// the copy is `BufferTooSmall`.
#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_prefill_f32_q_is_rounded_to_the_keys_dtype() {
    let ctx = ctx();
    for (dtype, lens) in [(DType::BF16, &[(300usize, 1000usize), (64, 64)][..]), (DType::F16, &[(130, 130)][..])] {
        let p = Problem::new(lens, 8, 2, 128, dtype, false, 0.5, 0, 77);
        let (tq, hq, d) = (p.batch.total_q(), p.hq, p.d);
        let want = run_gpu(&ctx, &p, DType::F32);
        check(&format!("{} 16-bit q", dtype.name()), &p, &want, &p.reference(DType::F32), 1e-2);
        // q as f32, a hair off each 16-bit value (below half a step), stored head-major.
        let q16 = decode(&p.q.0, dtype);
        let mut q32 = vec![0f32; q16.len()];
        for t in 0..tq {
            for h in 0..hq {
                for x in 0..d {
                    q32[(h * tq + t) * d + x] = q16[(t * hq + h) * d + x] * (1.0 + 1.0 / 8192.0);
                }
            }
        }
        let bq32 = upload(&ctx, &encode(&q32, DType::F32));
        let mut dev = OnDevice::new(&ctx, &p, DType::F32);
        dev.q = DeviceTensor {
            ptr: bq32.ptr(),
            dtype: DType::F32,
            layout: Layout3 { shape: [tq, hq, d], strides: [d, tq * d, 1] },
        };
        let convert = (tq * hq * d * 2).div_ceil(256) * 256;
        let need = seerattn::gpu::attention::workspace_bytes_for(&p.batch, hq, d, DType::F32);
        assert_eq!(need, convert + seerattn::gpu::attention::workspace_bytes(&p.batch, hq, d));
        dev.workspace = Some(testing::alloc_zeroed(&ctx, need).unwrap());
        dev.poison_outputs(&ctx);
        let stream = Stream::new(&ctx).unwrap();
        unsafe { dev.enqueue(&p, &stream) }.unwrap();
        stream.synchronize().unwrap();
        let got = dev.read(&ctx);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.0), bits(&want.0), "{}: f32 q gives the 16-bit q's output", dtype.name());
        assert_eq!(bits(&got.1), bits(&want.1), "{}: and its lse", dtype.name());
        // Room for less than the copy.
        dev.workspace = Some(testing::alloc_zeroed(&ctx, convert - 256).unwrap());
        let r = unsafe { dev.enqueue(&p, &stream) };
        assert!(matches!(r, Err(Error::BufferTooSmall(_))), "{r:?}");
    }
}
