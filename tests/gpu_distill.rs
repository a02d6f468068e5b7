//! The distillation target on the GPU (kernels/distill.cu) against the CPU
//! reference (src/reference/distill.rs) and against upstream's `attn_with_pooling`
//! (`distill_target` in the mqa_s3072 vectors). Every GPU test here needs a
//! CUDA GPU: ignored by plain `cargo test`, run by `scripts/gpu-test.sh run`.
//!
//! The kernel multiplies 16-bit inputs with f32 accumulation and takes
//! exp2 with MUFU; the reference accumulates in f64. Targets are
//! probabilities in [0, 1]: they must agree within 2e-3 absolute plus 1e-2
//! relative, every slot must be written (the buffer is poisoned with NaN
//! first) and each row must sum to 1.

mod common;
use common::*;
use seerattn::config::{RopeConfig, RopeScaling};
use seerattn::cuda::{self, testing, testing::Stream, Ctx, DeviceBuffer};
use seerattn::distill::cuda::CudaGateTrainer;
use seerattn::distill::{AdamState, TrainConfig};
use seerattn::gpu::distill::{distill_target, target_len, workspace_bytes};
use seerattn::gpu::DeviceTensor;
use seerattn::reference::distill;
use seerattn::*;

fn ctx() -> Ctx {
    cuda::current_context().expect("a CUDA device")
}

fn upload(ctx: &Ctx, bytes: &[u8]) -> DeviceBuffer {
    let b = testing::alloc_zeroed(ctx, bytes.len().max(16)).unwrap();
    testing::copy_to_device(ctx, b.ptr(), bytes).unwrap();
    b
}

/// Runs the kernel on host tensors (16-bit bytes with their layouts) and
/// returns the target.
#[allow(clippy::too_many_arguments)]
fn gpu_target(
    ctx: &Ctx,
    q: (&[u8], Layout3),
    k: (&[u8], Layout3),
    dtype: DType,
    batch: &Batch,
    scale: f32,
) -> Result<Vec<f32>> {
    let hq = q.1.shape[1];
    let bq = upload(ctx, q.0);
    let bk = upload(ctx, k.0);
    let len = target_len(batch, hq)?;
    let target = testing::alloc_zeroed(ctx, len.max(1) * 4).unwrap();
    // NaN everywhere: an unwritten slot fails.
    testing::copy_to_device(ctx, target.ptr(), &vec![0xFFu8; target.len()]).unwrap();
    let ws_bytes = workspace_bytes(batch, hq, ctx.sm_count() as usize)?;
    let ws = testing::alloc_zeroed(ctx, ws_bytes.max(16)).unwrap();
    let stream = Stream::new(ctx).unwrap();
    let qt = DeviceTensor { ptr: bq.ptr(), dtype, layout: q.1 };
    let kt = DeviceTensor { ptr: bk.ptr(), dtype, layout: k.1 };
    unsafe {
        seerattn::distill::distill_target_cuda(
            &qt,
            &kt,
            batch,
            scale as f64,
            (target.ptr(), len),
            (ws.ptr(), ws_bytes),
            stream.raw(),
        )?
    };
    stream.synchronize().unwrap();
    let mut bytes = vec![0u8; len * 4];
    testing::copy_to_host(ctx, &mut bytes, target.ptr()).unwrap();
    Ok(decode(&bytes, DType::F32))
}

/// Largest |gpu - cpu| - 1e-2 * |cpu| (must be <= 2e-3), and every row's sum.
fn check(what: &str, gpu: &[f32], cpu: &[f64], layout: &MaskLayout) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: target lengths");
    if let Some(i) = gpu.iter().position(|v| !v.is_finite()) {
        panic!("{what}: slot {i} of {} is {} (unwritten or not finite)", gpu.len(), gpu[i]);
    }
    let mut worst = (0f64, 0usize);
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let excess = (g as f64 - c).abs() - 1e-2 * c.abs();
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    assert!(worst.0 <= 2e-3, "{what}: slot {} is {} on the GPU, {} on the CPU", worst.1, gpu[worst.1], cpu[worst.1]);
    let offsets = layout.row_offsets();
    for r in 0..layout.rows() {
        let row = &gpu[offsets[r] as usize..offsets[r + 1] as usize];
        let sum: f64 = row.iter().map(|&v| v as f64).sum();
        assert!((sum - 1.0).abs() < 1e-4, "{what}: row {r} sums to {sum}");
    }
}

/// `[tokens, heads, d]` random values, optionally strided (8 elements of
/// padding per head and per row).
fn random_tensor(tokens: usize, heads: usize, d: usize, padded: bool, rng: &mut Rng) -> (Vec<f32>, Layout3) {
    let pad = if padded { 8 } else { 0 };
    let head_stride = d + pad;
    let row_stride = heads * head_stride + pad;
    let vals: Vec<f32> = (0..tokens.max(1) * row_stride).map(|_| rng.uniform(-2.0, 2.0)).collect();
    (vals, Layout3 { shape: [tokens, heads, d], strides: [row_stride, head_stride, 1] })
}

#[allow(clippy::too_many_arguments)]
fn random_case(
    ctx: &Ctx,
    lens: &[(usize, usize)],
    hq: usize,
    hkv: usize,
    d: usize,
    dtype: DType,
    padded: bool,
    seed: u64,
) {
    let mut rng = Rng(seed);
    let batch = Batch::from_lens(lens).unwrap();
    let (qv, ql) = random_tensor(batch.total_q(), hq, d, padded, &mut rng);
    let (kv, kl) = random_tensor(batch.total_k(), hkv, d, padded, &mut rng);
    let (qb, kb) = (encode(&qv, dtype), encode(&kv, dtype));
    let scale = 1.0 / (d as f32).sqrt();
    let gpu = gpu_target(ctx, (&qb, ql), (&kb, kl), dtype, &batch, scale).unwrap();
    let q_view = Tensor3::new("q", &qb, dtype, ql).unwrap();
    let k_view = Tensor3::new("k", &kb, dtype, kl).unwrap();
    let cpu: Vec<f64> =
        distill::distill_target(&q_view, &k_view, &batch, 64, scale as f64).values.iter().map(|&v| v as f64).collect();
    let what = format!("{lens:?} hq {hq} hkv {hkv} d {d} {dtype:?} padded {padded}");
    check(&what, &gpu, &cpu, &MaskLayout::new(&batch, hq, 64).unwrap());
    eprintln!("{what}: ok ({} slots)", gpu.len());
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_target_matches_the_definition_on_random_shapes() {
    let ctx = ctx();
    // One sequence, a multiple of 64; partial last blocks; shorter than a
    // block; GQA 1, 4 and 8; both head dims and dtypes; strided views.
    random_case(&ctx, &[(256, 256)], 2, 2, 128, DType::BF16, false, 1);
    random_case(&ctx, &[(1000, 1000)], 8, 2, 128, DType::BF16, false, 2);
    random_case(&ctx, &[(37, 37)], 4, 1, 64, DType::F16, false, 3);
    random_case(&ctx, &[(200, 200), (1, 1), (130, 130)], 8, 1, 64, DType::BF16, true, 4);
    random_case(&ctx, &[(300, 300)], 4, 4, 128, DType::F16, true, 5);
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_target_of_chunks_takes_only_the_chunks_queries() {
    let ctx = ctx();
    // q_len < k_len: the first query block is partial at its start, the
    // last at its end; a chunk inside one block; a batch mixing both.
    random_case(&ctx, &[(100, 900)], 4, 2, 128, DType::BF16, false, 6);
    random_case(&ctx, &[(10, 75)], 2, 1, 64, DType::F16, false, 7);
    random_case(&ctx, &[(512, 1536), (64, 64), (70, 640)], 4, 1, 128, DType::BF16, true, 8);
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_target_matches_upstream_attn_with_pooling() {
    let ctx = ctx();
    let case = Case::load("mqa_s3072");
    let (q, k) = (case.get("q"), case.get("k"));
    let (n, hq, d) = (q.shape[0], q.shape[1], q.shape[2]);
    let hkv = k.shape[1];
    let batch = Batch::single(n).unwrap();
    let scale = case.meta["softmax_scale"].as_f64().unwrap() as f32;
    let gpu = gpu_target(
        &ctx,
        (&q.bytes, Layout3::contiguous(n, hq, d)),
        (&k.bytes, Layout3::contiguous(n, hkv, d)),
        DType::BF16,
        &batch,
        scale,
    )
    .unwrap();
    // Upstream's map is dense [hq, q_blocks, k_blocks] in bf16 (zeros above
    // the diagonal); ours holds the causal slots.
    let want = case.get("distill_target");
    let nb = want.shape[1];
    let dense = want.to_f32();
    let layout = MaskLayout::new(&batch, hq, 64).unwrap();
    let offsets = layout.row_offsets();
    let mut worst = (0f32, 0usize, 0usize, 0usize);
    for h in 0..hq {
        for i in 0..nb {
            let row = &gpu[offsets[layout.row(0, h, i)] as usize..];
            for kb in 0..nb {
                let up = dense[(h * nb + i) * nb + kb];
                if kb > i {
                    assert_eq!(up, 0.0, "upstream's map is not causal at head {h} ({i}, {kb})");
                    continue;
                }
                // bf16 keeps 8 significant bits: 2^-8 relative, plus the
                // rounding of upstream's bf16 softmax inputs.
                let excess = (row[kb] - up).abs() - 1e-2 * up.abs();
                if excess > worst.0 {
                    worst = (excess, h, i, kb);
                }
            }
        }
    }
    let (e, h, i, kb) = worst;
    let ours = gpu[offsets[layout.row(0, h, i)] as usize + kb];
    assert!(e <= 2e-3, "head {h}, block ({i}, {kb}): ours {ours}, upstream {}", dense[(h * nb + i) * nb + kb]);
    eprintln!("mqa_s3072: {} slots within 2e-3 + 1e-2 relative of upstream (worst excess {e:.2e})", gpu.len());
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_target_refuses_short_buffers() {
    let ctx = ctx();
    let batch = Batch::single(300).unwrap();
    let (hq, d) = (4, 64);
    let q = upload(&ctx, &vec![0u8; 300 * hq * d * 2]);
    let k = upload(&ctx, &vec![0u8; 300 * d * 2]);
    let qt = DeviceTensor { ptr: q.ptr(), dtype: DType::BF16, layout: Layout3::contiguous(300, hq, d) };
    let kt = DeviceTensor { ptr: k.ptr(), dtype: DType::BF16, layout: Layout3::contiguous(300, 1, d) };
    let len = target_len(&batch, hq).unwrap();
    let ws_bytes = workspace_bytes(&batch, hq, ctx.sm_count() as usize).unwrap();
    let target = testing::alloc_zeroed(&ctx, len * 4).unwrap();
    let ws = testing::alloc_zeroed(&ctx, ws_bytes).unwrap();
    let stream = Stream::new(&ctx).unwrap();
    let run = |t: (u64, usize), w: (u64, usize)| unsafe { distill_target(&qt, &kt, &batch, 0.125, t, w, stream.raw()) };
    assert!(matches!(run((target.ptr(), len - 1), (ws.ptr(), ws_bytes)), Err(Error::BufferTooSmall(_))));
    assert!(matches!(run((target.ptr(), len), (ws.ptr(), ws_bytes - 4)), Err(Error::BufferTooSmall(_))));
    let e = run((target.ptr(), len), (ws.ptr(), ws_bytes)).map(|_| ());
    assert!(e.is_ok(), "{e:?}");
    let bad_scale =
        unsafe { distill_target(&qt, &kt, &batch, f32::NAN, (target.ptr(), len), (ws.ptr(), ws_bytes), stream.raw()) };
    assert!(matches!(bad_scale, Err(Error::InvalidArgument(_))), "{bad_scale:?}");
    stream.synchronize().unwrap();
}

// ------------------------------------------------------- loss and gradient --

fn released_config(hq: usize, hkv: usize, d: usize) -> GateConfig {
    common::released_config(hq, hkv, d, 10000.0)
}

/// ‖a - b‖ / ‖b‖.
fn rel_norm(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

/// The GPU loss and gradient of one layer against the CPU reference's,
/// computed from the same bf16 inputs, the same bf16-rounded weights and
/// the same target. The GPU keeps the gate's intermediates (pooled Q and K,
/// the rotated gate K) in bf16 as the gate's kernels do, where the
/// reference works in f64: losses within 1%, gradients within 3% in norm.
fn loss_case(ctx: &Ctx, lens: &[(usize, usize)], hq: usize, hkv: usize, d: usize, seed: u64) {
    let config = released_config(hq, hkv, d);
    let mut gate = seerattn::distill::init_gate(config.clone(), seed).unwrap();
    // The device holds bf16 weights: the reference gets the same values.
    let rounded: Vec<u8> =
        gate.layer(0).unwrap().k_proj.iter().flat_map(|w| half::bf16::from_f32(*w).to_le_bytes()).collect();
    let k_ref = WeightRef { dtype: DType::BF16, shape: [hq, 3 * d, d], bytes: &rounded };
    gate.set_layer_weights(0, k_ref, None).unwrap();
    let device = seerattn::gpu::gate::DeviceGate::upload(&gate, ctx).unwrap();

    let mut rng = Rng(seed);
    let batch = Batch::from_lens(lens).unwrap();
    // Pre-RoPE inputs with a per-block offset, so that gate scores are not flat.
    let structured = |tokens: usize, heads: usize, rng: &mut Rng| {
        let offsets: Vec<f32> = (0..tokens.div_ceil(64) * heads * d).map(|_| rng.uniform(-1.5, 1.5)).collect();
        let v: Vec<f32> = (0..tokens * heads * d)
            .map(|x| offsets[((x / (heads * d)) / 64 * heads + (x / d) % heads) * d + x % d] + rng.uniform(-1.0, 1.0))
            .collect();
        encode(&v, DType::BF16)
    };
    let qn = structured(batch.total_q(), hq, &mut rng);
    let kn = structured(batch.total_k(), hkv, &mut rng);
    let (q, ql) = random_tensor(batch.total_q(), hq, d, false, &mut rng);
    let (k, kl) = random_tensor(batch.total_k(), hkv, d, false, &mut rng);
    let (qb, kb) = (encode(&q, DType::BF16), encode(&k, DType::BF16));
    let target = distill::distill_target(
        &Tensor3::new("q", &qb, DType::BF16, ql).unwrap(),
        &Tensor3::new("k", &kb, DType::BF16, kl).unwrap(),
        &batch,
        64,
        1.0 / (d as f64).sqrt(),
    );
    let qn_view = Tensor3::new("q_nope", &qn, DType::BF16, Layout3::contiguous(batch.total_q(), hq, d)).unwrap();
    let kn_view = Tensor3::new("k_nope", &kn, DType::BF16, Layout3::contiguous(batch.total_k(), hkv, d)).unwrap();
    let params = distill::LossParams::default();
    let mut want = distill::LayerGrads::zeros(&config);
    let want_losses = distill::distill_loss_and_grad(
        &config,
        gate.layer(0).unwrap(),
        &qn_view,
        &kn_view,
        &batch,
        &target,
        &params,
        &mut want,
    );

    let bqn = upload(ctx, &qn);
    let bkn = upload(ctx, &kn);
    let btarget = upload(ctx, &target.values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    let glen = seerattn::gpu::distill::grad_len(&config);
    let grads = testing::alloc_zeroed(ctx, glen * 4).unwrap();
    let losses = testing::alloc_zeroed(ctx, batch.len() * 4).unwrap();
    let ws_len = seerattn::gpu::distill::loss_workspace_bytes(&config, &batch).unwrap();
    let ws = testing::alloc_zeroed(ctx, ws_len).unwrap();
    let qt = DeviceTensor { ptr: bqn.ptr(), dtype: DType::BF16, layout: *qn_view.layout() };
    let kt = DeviceTensor { ptr: bkn.ptr(), dtype: DType::BF16, layout: *kn_view.layout() };
    let stream = Stream::new(ctx).unwrap();
    let run = || unsafe {
        seerattn::gpu::distill::loss_and_grad(
            &config,
            &device,
            0,
            &batch,
            &qt,
            &kt,
            (btarget.ptr(), target.values.len()),
            params.skip_fraction,
            (grads.ptr(), glen),
            (losses.ptr(), batch.len()),
            (ws.ptr(), ws_len),
            stream.raw(),
        )
        .unwrap();
        stream.synchronize().unwrap();
    };
    let read = |b: &DeviceBuffer| {
        let mut bytes = vec![0u8; b.len()];
        testing::copy_to_host(ctx, &mut bytes, b.ptr()).unwrap();
        decode(&bytes, DType::F32)
    };
    run();
    let got_losses = read(&losses);
    let got = read(&grads);
    let what = format!("{lens:?} hq {hq} hkv {hkv} d {d}");
    for (s, (&g, &w)) in got_losses.iter().zip(&want_losses.per_seq).enumerate() {
        assert!(
            g.is_finite() && ((g as f64) - w).abs() <= 1e-2 * w.abs() + 1e-7,
            "{what}: sequence {s} loss {g} on the GPU, {w} on the CPU"
        );
    }
    let got64: Vec<f64> = got.iter().map(|&v| v as f64).collect();
    assert!(got64.iter().all(|v| v.is_finite()), "{what}: gradient not finite");
    let err = rel_norm(&got64, &want.k_proj);
    assert!(
        err <= 3e-2,
        "{what}: gradient off by {err:.3e} in norm (|grad| {:.3e})",
        want.k_proj.iter().map(|x| x * x).sum::<f64>().sqrt()
    );
    // The gradient accumulates: a second call adds the same values (each
    // element owned by one thread, no atomics: exactly twice).
    run();
    let twice = read(&grads);
    let bad = twice.iter().zip(&got).position(|(t, g)| *t != 2.0 * g);
    assert!(bad.is_none(), "{what}: the second call did not add exactly the same gradient (element {bad:?})");
    eprintln!("{what}: losses {got_losses:?} vs {:?}, gradient within {err:.2e} in norm", want_losses.per_seq);
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_loss_and_gradient_match_the_reference() {
    let ctx = ctx();
    loss_case(&ctx, &[(300, 300)], 4, 2, 128, 11);
    loss_case(&ctx, &[(1000, 1000), (130, 130)], 8, 2, 64, 12);
    // A chunk over cached keys, a sequence of one block, a partial block.
    loss_case(&ctx, &[(100, 900), (64, 64), (200, 777)], 4, 1, 128, 13);
}

// ------------------------------------------------------------ the trainer --

/// Planted structure (as tests/distill.rs, at a head_dim the GPU gate
/// takes): query head `h` looks along its own direction; the keys of its
/// planted blocks (block 0, shared, and `PLANTED[h]`) carry it, every other
/// key is noise. Host bytes of q_nope, k_nope, q, k (bf16) for `lens`.
const PLANTED: [usize; 4] = [5, 11, 8, 16];

struct Planted {
    batch: Batch,
    hq: usize,
    hkv: usize,
    d: usize,
    q_nope: Vec<u8>,
    k_nope: Vec<u8>,
    q: Vec<u8>,
    k: Vec<u8>,
}

impl Planted {
    fn new(lens: &[(usize, usize)], config: &GateConfig, seed: u64) -> Planted {
        let batch = Batch::from_lens(lens).unwrap();
        let (hq, hkv, d) = (config.num_q_heads, config.num_kv_heads, config.head_dim);
        let group = hq / hkv;
        let inv_freq = config.rope.inv_freq(d);
        // The lowest RoPE frequency pair: the alignment survives RoPE.
        let direction = |h: usize| if h % 2 == 0 { d / 2 - 1 } else { d - 1 };
        let mut rng = Rng(seed);
        let (mut qn, mut kn, mut q, mut k) = (vec![], vec![], vec![], vec![]);
        for seq in batch.seqs(64) {
            for (is_q, heads, positions, nope, roped) in
                [(true, hq, seq.q_start..seq.k_len, &mut qn, &mut q), (false, hkv, 0..seq.k_len, &mut kn, &mut k)]
            {
                for pos in positions {
                    for h in 0..heads {
                        let mut row: Vec<f32> = (0..d).map(|_| 0.5 * rng.uniform(-1.732, 1.732)).collect();
                        if is_q {
                            row[direction(h)] += 4.0;
                        } else {
                            for qh in h * group..(h + 1) * group {
                                if pos / 64 == 0 || pos / 64 == PLANTED[qh] {
                                    row[direction(qh)] += 4.0;
                                }
                            }
                        }
                        let row: Vec<f32> = row.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
                        nope.extend(row.iter().copied());
                        let mut rotated = row;
                        seerattn::reference::scores::apply_rope(&mut rotated, &inv_freq, pos);
                        roped.extend(rotated);
                    }
                }
            }
        }
        let bf = |v: &[f32]| encode(v, DType::BF16);
        Planted { batch, hq, hkv, d, q_nope: bf(&qn), k_nope: bf(&kn), q: bf(&q), k: bf(&k) }
    }

    fn view<'a>(&self, bytes: &'a [u8], is_q: bool) -> Tensor3<'a> {
        let (tokens, heads) = if is_q { (self.batch.total_q(), self.hq) } else { (self.batch.total_k(), self.hkv) };
        Tensor3::new("x", bytes, DType::BF16, Layout3::contiguous(tokens, heads, self.d)).unwrap()
    }

    /// Recall of the planted (row, block) pairs in `mask` and its density.
    fn recall(&self, gate: &Gate, params: &MaskParams) -> (f64, f64) {
        let mask = gate
            .compute_block_mask(0, &self.view(&self.q_nope, true), &self.view(&self.k_nope, false), &self.batch, params)
            .unwrap();
        let layout = MaskLayout::new(&self.batch, self.hq, 64).unwrap();
        let (mut found, mut planted) = (0usize, 0usize);
        for r in 0..layout.rows() {
            let id = layout.row_id(r);
            for b in [0, PLANTED[id.head]] {
                if b <= id.q_block {
                    planted += 1;
                    found += mask.as_ref().row(r).contains(&(b as i32)) as usize;
                }
            }
        }
        (found as f64 / planted as f64, mask.as_ref().density(&layout))
    }
}

/// A planted batch's four tensors on the device.
struct PlantedOnDevice {
    _bufs: Vec<DeviceBuffer>,
    t: [DeviceTensor; 4],
}

fn planted_on_device(ctx: &Ctx, p: &Planted) -> PlantedOnDevice {
    let bufs: Vec<DeviceBuffer> = [&p.q_nope, &p.k_nope, &p.q, &p.k].iter().map(|b| upload(ctx, b)).collect();
    let (tq, tk) = (p.batch.total_q(), p.batch.total_k());
    let lay = [(tq, p.hq), (tk, p.hkv), (tq, p.hq), (tk, p.hkv)];
    let t = std::array::from_fn(|i| DeviceTensor {
        ptr: bufs[i].ptr(),
        dtype: DType::BF16,
        layout: Layout3::contiguous(lay[i].0, lay[i].1, p.d),
    });
    PlantedOnDevice { _bufs: bufs, t }
}

fn feed(trainer: &mut CudaGateTrainer, x: &PlantedOnDevice, p: &Planted, stream: &Stream) -> f64 {
    let [qn, kn, q, k] = &x.t;
    let scale = 1.0 / (p.d as f64).sqrt();
    unsafe { trainer.accumulate(0, qn, kn, q, k, &p.batch, scale, stream.raw()) }.unwrap().mean()
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_adamw_step_is_the_cpu_update_bit_for_bit() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let config = released_config(4, 2, 64);
    let gate = seerattn::distill::init_gate(config.clone(), 3).unwrap();
    // No clipping: the factor is then loss_scale / sequences exactly on both sides.
    let train = TrainConfig { max_grad_norm: None, ..TrainConfig::upstream(10) };
    let mut trainer = CudaGateTrainer::new(gate.clone(), train, &ctx).unwrap();
    let p = Planted::new(&[(700, 700), (300, 300)], &config, 4);
    let x = planted_on_device(&ctx, &p);
    let mut host_w = gate.layer(0).unwrap().k_proj.clone();
    let mut adam = AdamState::new(host_w.len());
    for step in 0..3u64 {
        feed(&mut trainer, &x, &p, &stream);
        let g = unsafe { trainer.gradient(0, stream.raw()) }.unwrap();
        let report = unsafe { trainer.step(stream.raw()) }.unwrap();
        let factor = train.loss_scale / 2.0;
        let g64: Vec<f64> = g.iter().map(|&v| f64::from(v) * factor).collect();
        adam.update(&mut host_w, &g64, report.lr, &train.adamw);
        let got = unsafe { trainer.gate(stream.raw()) }.unwrap().layer(0).unwrap().k_proj.clone();
        let bad = got.iter().zip(&host_w).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            bad.is_none(),
            "step {step}: weight {bad:?} differs: GPU {:?}, CPU {:?}",
            bad.map(|i| got[i]),
            bad.map(|i| host_w[i])
        );
        if step == 0 {
            assert_eq!(report.lr, 0.0, "the first step has lr 0 (Hugging Face's schedule)");
        }
    }
    eprintln!("3 AdamW steps on the device equal AdamState::update bit for bit");
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_trainer_learns_planted_structure() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let config =
        GateConfig { rope: RopeConfig { theta: 500000.0, scaling: RopeScaling::None }, ..released_config(4, 2, 64) };
    let train = planted_train(&config);
    let eval = Planted::new(&[(1536, 1536)], &config, 2);
    // Upstream's recipe; at head_dim 64 with noise in every dimension 300
    // steps reach recall 0.90 (measured on H100), 600 reach 0.99.
    let steps = 600;
    let mut trainer = CudaGateTrainer::new(
        seerattn::distill::init_gate(config.clone(), 7).unwrap(),
        TrainConfig::upstream(steps),
        &ctx,
    )
    .unwrap();
    let x = planted_on_device(&ctx, &train);
    let params = MaskParams::from_config(&config);
    let (recall0, density0) = eval.recall(unsafe { trainer.gate(stream.raw()) }.unwrap(), &params);
    println!("step  lr        loss      grad norm  recall  density");
    println!("   0                                  {recall0:.3}   {density0:.3}");
    let mut curve = vec![];
    let start = std::time::Instant::now();
    for _ in 0..steps {
        let loss = feed(&mut trainer, &x, &train, &stream);
        let report = unsafe { trainer.step(stream.raw()) }.unwrap();
        assert_eq!(report.layer_losses[0], Some(loss));
        curve.push(loss);
        if report.step % 50 == 0 || report.step <= 2 {
            let (recall, density) = eval.recall(unsafe { trainer.gate(stream.raw()) }.unwrap(), &params);
            println!(
                "{:4}  {:.2e}  {loss:.6}  {:.3e}  {recall:.3}   {density:.3}",
                report.step, report.lr, report.grad_norm
            );
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let (recall, density) = eval.recall(unsafe { trainer.gate(stream.raw()) }.unwrap(), &params);
    let threshold = MaskParams { method: SparsityMethod::Threshold, threshold: 0.05, ..params };
    let (recall_t, density_t) = eval.recall(unsafe { trainer.gate(stream.raw()) }.unwrap(), &threshold);
    println!(
        "{steps} steps in {seconds:.2} s ({:.0} tokens/s incl. the CPU recall checks); top-k: recall {recall0:.3} -> {recall:.3} at density {density:.3}; threshold 0.05: recall {recall_t:.3} at density {density_t:.3}",
        (steps as usize * train.batch.total_q()) as f64 / seconds
    );
    assert!(recall0 < 0.9, "the random gate already finds the planted blocks: the test proves nothing");
    assert!(curve[steps as usize - 1] < 0.5 * curve[0], "training loss {:?}", curve);
    assert!(recall >= 0.95 && density <= 0.20, "top-k: recall {recall} at density {density}");
    // Under the threshold rule the density is the gate's own doing; it
    // falls as the gate learns (0.52 at 300 steps, 0.40 at 600, measured)
    // but the noise blocks keep some mass here: recall is asserted, the
    // density printed.
    assert!(recall_t >= 0.95, "threshold 0.05: recall {recall_t} at density {density_t}");
}

fn planted_train(config: &GateConfig) -> Planted {
    // Three sequences: one with a partial last block, one a chunk over a longer cache.
    Planted::new(&[(1536, 1536), (1490, 1490), (1000, 1536)], config, 1)
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_trainer_resumes_from_its_files_bit_for_bit() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let config = released_config(4, 2, 64);
    let train = TrainConfig::upstream(40);
    let p = planted_train(&config);
    let x = planted_on_device(&ctx, &p);
    let dir = std::env::temp_dir().join(format!("seerattn-gpu-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (gate_dir, state) = (dir.join("gate"), dir.join("adam.safetensors"));

    let mut a = CudaGateTrainer::new(seerattn::distill::init_gate(config.clone(), 9).unwrap(), train, &ctx).unwrap();
    for _ in 0..25 {
        feed(&mut a, &x, &p, &stream);
        unsafe { a.step(stream.raw()) }.unwrap();
    }
    unsafe { a.save_gate_dir(&gate_dir, DType::F32, None, stream.raw()) }.unwrap();
    unsafe { a.save_optimizer_state(&state, stream.raw()) }.unwrap();
    let params = MaskParams::from_config(&config);
    let (qn, kn) = (p.view(&p.q_nope, true), p.view(&p.k_nope, false));
    let mask_at_save =
        unsafe { a.gate(stream.raw()) }.unwrap().compute_block_mask(0, &qn, &kn, &p.batch, &params).unwrap();
    for _ in 0..5 {
        feed(&mut a, &x, &p, &stream);
        unsafe { a.step(stream.raw()) }.unwrap();
    }
    let mut b = CudaGateTrainer::new(Gate::load_dir(&gate_dir).unwrap(), train, &ctx).unwrap();
    unsafe { b.load_optimizer_state(&state, stream.raw()) }.unwrap();
    assert_eq!(b.steps_taken(), 25);
    for _ in 0..5 {
        feed(&mut b, &x, &p, &stream);
        unsafe { b.step(stream.raw()) }.unwrap();
    }
    let wa = unsafe { a.gate(stream.raw()) }.unwrap().layer(0).unwrap().k_proj.clone();
    let wb = unsafe { b.gate(stream.raw()) }.unwrap().layer(0).unwrap().k_proj.clone();
    assert!(wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()), "resumed training differs from uninterrupted");
    // The saved gate loads and gives the trainer's masks at the step it was saved.
    let saved = Gate::load_dir(&gate_dir).unwrap();
    let mask = saved.compute_block_mask(0, &qn, &kn, &p.batch, &params).unwrap();
    assert!(
        mask.counts == mask_at_save.counts && mask.indices == mask_at_save.indices,
        "the saved gate's masks differ from the trainer's"
    );
    // With a feed pending (gradients not applied), saving the state is refused.
    feed(&mut b, &x, &p, &stream);
    assert!(unsafe { b.save_optimizer_state(&dir.join("x.safetensors"), stream.raw()) }.is_err());
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!("resumed after 25 of 30 steps: weights equal bit for bit to uninterrupted training");
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_trainer_with_adam_states_resumes_as_load_optimizer_state() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let config = released_config(4, 2, 64);
    let train = TrainConfig::upstream(20);
    let p = Planted::new(&[(700, 700), (300, 300)], &config, 5);
    let x = planted_on_device(&ctx, &p);
    let dir = std::env::temp_dir().join(format!("seerattn-gpu-adam-states-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (gate_dir, state) = (dir.join("gate"), dir.join("adam.safetensors"));

    let mut a = CudaGateTrainer::new(seerattn::distill::init_gate(config.clone(), 3).unwrap(), train, &ctx).unwrap();
    for _ in 0..4 {
        feed(&mut a, &x, &p, &stream);
        unsafe { a.step(stream.raw()) }.unwrap();
    }
    unsafe { a.save_gate_dir(&gate_dir, DType::F32, None, stream.raw()) }.unwrap();
    unsafe { a.save_optimizer_state(&state, stream.raw()) }.unwrap();
    // The state held on the host (as the C API holds it before a trainer's
    // first feed), handed to a new GPU trainer; and the same file loaded
    // into a GPU trainer directly.
    let mut host = seerattn::distill::GateTrainer::new(Gate::load_dir(&gate_dir).unwrap(), train).unwrap();
    host.load_optimizer_state(&state).unwrap();
    let adam = host.k_adam_states();
    assert_eq!(adam[0].step, 4);
    let mut b = CudaGateTrainer::with_adam_states(host.gate().clone(), train, &ctx, &adam, host.steps_taken()).unwrap();
    let mut c = CudaGateTrainer::new(Gate::load_dir(&gate_dir).unwrap(), train, &ctx).unwrap();
    unsafe { c.load_optimizer_state(&state, stream.raw()) }.unwrap();
    assert_eq!((b.steps_taken(), c.steps_taken()), (4, 4));
    for _ in 0..3 {
        let losses: Vec<f64> = [&mut a, &mut b, &mut c].into_iter().map(|t| feed(t, &x, &p, &stream)).collect();
        let reports: Vec<_> =
            [&mut a, &mut b, &mut c].into_iter().map(|t| unsafe { t.step(stream.raw()) }.unwrap()).collect();
        assert!(losses.iter().all(|l| l.to_bits() == losses[0].to_bits()), "{losses:?}");
        assert!(reports[1] == reports[0] && reports[2] == reports[0], "{reports:?}");
    }
    let w = |t: &mut CudaGateTrainer| unsafe { t.gate(stream.raw()) }.unwrap().layer(0).unwrap().k_proj.clone();
    let (wa, wb, wc) = (w(&mut a), w(&mut b), w(&mut c));
    assert!(wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()), "with_adam_states differs from the run");
    assert!(wa.iter().zip(&wc).all(|(x, y)| x.to_bits() == y.to_bits()), "load_optimizer_state differs from the run");
    // States that do not fit the gate are refused before anything is uploaded.
    let gate = host.gate().clone();
    let len = adam[0].m.len();
    let bad = |states: &[AdamState]| CudaGateTrainer::with_adam_states(gate.clone(), train, &ctx, states, 1).map(drop);
    assert!(matches!(bad(&[]), Err(Error::InvalidArgument(m)) if m.contains("0 AdamW states")));
    assert!(matches!(bad(&[AdamState::new(len - 1)]), Err(Error::InvalidArgument(m)) if m.contains("moments")));
    let mut nan = AdamState::new(len);
    nan.v[7] = f32::NAN;
    assert!(matches!(bad(&[nan]), Err(Error::InvalidArgument(m)) if m.contains("not finite")));
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!("with_adam_states and load_optimizer_state resume the run bit for bit");
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_trainer_feeds_host_tensors_as_device_ones_and_refuses_bad_inputs_first() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let config = released_config(4, 2, 64);
    let train = TrainConfig::upstream(20);
    let gate = seerattn::distill::init_gate(config.clone(), 8).unwrap();
    // A chunk over a longer cache and a partial block.
    let p = Planted::new(&[(500, 500), (200, 330)], &config, 6);
    let x = planted_on_device(&ctx, &p);
    let scale = 1.0 / 8.0;
    // The same values in f32 (exact: they are bf16 values): rounded back to the same bf16.
    let f32_bytes = |b: &[u8]| encode(&decode(b, DType::BF16), DType::F32);
    let f32s: Vec<Vec<u8>> = [&p.q_nope, &p.k_nope, &p.q, &p.k].iter().map(|b| f32_bytes(b)).collect();
    let f32_view = |i: usize, is_q: bool| {
        let (tokens, heads) = if is_q { (p.batch.total_q(), p.hq) } else { (p.batch.total_k(), p.hkv) };
        Tensor3::new("x", &f32s[i], DType::F32, Layout3::contiguous(tokens, heads, p.d)).unwrap()
    };
    let mut trainers: Vec<CudaGateTrainer> =
        (0..3).map(|_| CudaGateTrainer::new(gate.clone(), train, &ctx).unwrap()).collect();
    for step in 0..3 {
        let device = feed(&mut trainers[0], &x, &p, &stream);
        let (qn, kn, q, k) =
            (p.view(&p.q_nope, true), p.view(&p.k_nope, false), p.view(&p.q, true), p.view(&p.k, false));
        let host = unsafe { trainers[1].accumulate_host(0, &qn, &kn, &q, &k, &p.batch, scale, stream.raw()) }.unwrap();
        let (qn, kn, q, k) = (f32_view(0, true), f32_view(1, false), f32_view(2, true), f32_view(3, false));
        let f32_host =
            unsafe { trainers[2].accumulate_host(0, &qn, &kn, &q, &k, &p.batch, scale, std::ptr::null_mut()) }.unwrap();
        assert_eq!(host.per_seq.len(), 2);
        for l in [&host.per_seq, &f32_host.per_seq] {
            assert_eq!(l.iter().sum::<f64>() / 2.0, device, "step {step}: host feed's losses differ");
        }
        let reports: Vec<_> = trainers.iter_mut().map(|t| unsafe { t.step(stream.raw()) }.unwrap()).collect();
        assert!(reports[1] == reports[0] && reports[2] == reports[0], "step {step}: {reports:?}");
    }

    // Refused before anything is enqueued: the trainer has nothing to step after.
    let mut t = CudaGateTrainer::new(gate, train, &ctx).unwrap();
    let [qn, kn, q, k] = x.t;
    let f32_qn = upload(&ctx, &[f32s[0].as_slice(), &[0u8; 16]].concat());
    // f32 device inputs are rounded on the device (ffi_distill_cuda checks
    // them bit for bit against bf16 feeds); one 2 bytes off f32 alignment is not.
    let f32_dev = DeviceTensor { ptr: f32_qn.ptr() + 2, dtype: DType::F32, layout: qn.layout };
    let host_mem = DeviceTensor { ptr: p.k.as_ptr() as u64, ..k };
    // The end of a 2 MiB allocation (a whole granule, whatever the driver rounds to).
    let short = testing::alloc_zeroed(&ctx, 2 << 20).unwrap();
    let short_kn = DeviceTensor { ptr: short.ptr() + (2 << 20) - 1024, ..kn };
    let cases: [(&str, [DeviceTensor; 4], &str); 3] = [
        ("misaligned f32 q_nope", [f32_dev, kn, q, k], "not aligned to 4 bytes"),
        ("host memory as k", [qn, kn, q, host_mem], "not device memory"),
        ("k_nope past its allocation", [qn, short_kn, q, k], "past its allocation"),
    ];
    for (what, [a, b, c, d], words) in cases {
        let e = unsafe { t.accumulate(0, &a, &b, &c, &d, &p.batch, scale, stream.raw()) }.map(drop).unwrap_err();
        assert!(e.to_string().contains(words), "{what}: {e}");
    }
    let e = unsafe { t.step(stream.raw()) }.unwrap_err();
    assert!(e.to_string().contains("no layer was fed"), "{e}");
    eprintln!("host feeds (bf16 and f32) equal device feeds bit for bit; bad inputs refused before any launch");
}

/// The training loop of `seerattn distill --device cuda`
/// (`distill::dataset::train`) on the planted set at head_dim 64: a few
/// steps, from a gate both devices hold exactly (bf16 values); its losses
/// are the CPU run's within 1% while the weights are the starting ones
/// (the first two steps: the first has learning rate 0), both fall; the
/// saved state loads into a CPU trainer at the last step; stopped and
/// resumed on the GPU it is the uninterrupted run bit for bit.
#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_dataset_run_on_the_planted_set_matches_the_cpu_run_and_resumes() {
    use seerattn::distill::dataset::{self, Device, Run};
    let root = std::env::temp_dir().join(format!("seerattn-gpu-dataset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    let planted = dataset::Planted { layers: 2, seqs: 2, tokens: 384, head_dim: 64, seed: 3 };
    let blocks = dataset::make_planted(&data, &planted, &mut |_| {}).unwrap();
    assert_eq!(blocks.len(), 2);
    let model = seerattn::checkpoint::read_config(&data.join("model_config.json")).unwrap();
    let start = gate_rounded_to_bf16(&seerattn::distill::init_gate(model.clone(), 0).unwrap());
    let mut config = TrainConfig::upstream(12);
    (config.adamw.lr, config.schedule.warmup_steps) = (2e-2, 2);
    let run = |device: Device, name: &str, stop_at: Option<u64>, resume: bool| -> Vec<Vec<f64>> {
        let (out, state) = (root.join(name), root.join(format!("{name}.safetensors")));
        let run = Run {
            data: &data,
            out: &out,
            dtype: DType::F32,
            state: Some(&state),
            resume,
            batch: 1,
            softmax_scale: None,
            save_every: 0,
            stop_at,
            device,
        };
        let mut lines = vec![];
        let starting = |_| Ok((if resume { Gate::load_dir(&out)? } else { start.clone() }, None));
        dataset::train(&run, config, starting, &mut |l| lines.push(l.to_string())).unwrap();
        let on = if device == Device::Cuda { "; CUDA on " } else { "; CPU reference" };
        assert!(lines[0].contains(on), "{}", lines[0]);
        lines
            .iter()
            .filter(|l| l.starts_with("step "))
            .map(|l| {
                let fields: Vec<&str> = l.split("  loss ").nth(1).unwrap().split_whitespace().collect();
                fields[..fields.len() - 2].iter().map(|x| x.parse().unwrap()).collect()
            })
            .collect()
    };
    let cpu = run(Device::Cpu, "cpu", None, false);
    let gpu = run(Device::Cuda, "gpu", None, false);
    assert_eq!((cpu.len(), gpu.len()), (12, 12));
    for (step, (c, g)) in cpu.iter().zip(&gpu).take(2).enumerate() {
        for (layer, (c, g)) in c.iter().zip(g).enumerate() {
            assert!((g - c).abs() <= 1e-2 * c, "step {}, layer {layer}: GPU loss {g}, CPU {c}", step + 1);
        }
    }
    for (name, losses) in [("CPU", &cpu), ("GPU", &gpu)] {
        for (layer, (first, last)) in losses[0].iter().zip(&losses[11]).enumerate() {
            assert!(*last < 0.5 * first, "{name} layer {layer}: loss {first} -> {last}");
        }
    }
    eprintln!("CPU losses {:?} -> {:?}; GPU {:?} -> {:?}", cpu[0], cpu[11], gpu[0], gpu[11]);
    // The GPU run's files: its gate loads, its state resumes a CPU trainer at step 12.
    let gate = Gate::load_dir(&root.join("gpu")).unwrap();
    assert_eq!(gate.config(), &model);
    let mut host = seerattn::distill::GateTrainer::new(gate, config).unwrap();
    host.load_optimizer_state(&root.join("gpu.safetensors")).unwrap();
    assert_eq!(host.steps_taken(), 12);
    // Stopped after step 5 and resumed: the uninterrupted GPU run, bit for bit.
    let first = run(Device::Cuda, "resumed", Some(5), false);
    let rest = run(Device::Cuda, "resumed", None, true);
    assert_eq!((first.len(), rest.len()), (5, 7));
    assert_eq!([first, rest].concat(), gpu, "the resumed run's losses");
    let weights = |name: &str| std::fs::read(root.join(name).join("attn_gate_weights.safetensors")).unwrap();
    assert!(weights("resumed") == weights("gpu"), "the resumed run's weights differ from the uninterrupted run's");
    std::fs::remove_dir_all(&root).unwrap();
}
