//! The trainer's C API with CUDA tensors (src/ffi/distill.rs over
//! `distill::cuda::CudaGateTrainer`), called as an engine would: device
//! tensors of its forward pass, on its own stream. Every test here needs a
//! CUDA GPU: ignored by plain `cargo test`, run by `scripts/gpu-test.sh run`.
//! (What needs no GPU, the first-release feed params, the device fixed by the
//! first successful feed, the refusals without a GPU, is in ffi_distill.)
//!
//! - Through the C API a CUDA run is the Rust GPU trainer's run bit for bit
//!   (losses, reports, the saved gate), and the CPU run's within the GPU
//!   trainer's tolerances (tests/gpu_distill.rs: losses within 1%,
//!   gradients within 3% in norm) while the weights are the starting ones.
//! - A CUDA run saved (gate and optimizer state) resumes on a new trainer,
//!   loaded before its first feed, bit for bit.
//! - Refusals: a gate the GPU cannot train (then host feeding works), host
//!   feeds of a CUDA trainer, and bad device buffers, none of which changes
//!   the trainer.

mod common;
use common::capi::*;
use common::device::{ctx, cuda_tensor, poisoned, to_device};
use seerattn::cuda::{testing, testing::Stream, DeviceBuffer};
use seerattn::distill::cuda::CudaGateTrainer;
use seerattn::distill::{init_gate, TrainConfig};
use seerattn::ffi::args::SeerTensor;
use seerattn::ffi::distill::*;
use seerattn::ffi::status::SeerStatus;
use seerattn::gpu::DeviceTensor;
use seerattn::{Batch, DType, GateConfig, Layout3};
use std::ffi::{c_void, CString};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

/// A trainer handle, destroyed on drop.
struct Trainer(*mut SeerTrainer);

impl Drop for Trainer {
    fn drop(&mut self) {
        unsafe { seer_trainer_destroy(self.0) };
    }
}

const D: usize = 64;

/// Upstream's recipe for `steps` steps with 2 warmup steps: the first step
/// has learning rate 0, the second half the peak.
fn train_params(steps: u64) -> SeerTrainParams {
    let mut p = MaybeUninit::<SeerTrainParams>::uninit();
    expect(unsafe { seer_train_params_default(steps, p.as_mut_ptr()) }, SEER_OK, "seer_train_params_default");
    let mut p = unsafe { p.assume_init() };
    p.warmup_steps = 2;
    p
}

fn rust_train(steps: u64) -> TrainConfig {
    let mut c = TrainConfig::upstream(steps);
    c.schedule.warmup_steps = 2;
    c
}

fn feed_params(layer: u32, stream: *mut c_void) -> SeerTrainFeedParams {
    let mut p = MaybeUninit::<SeerTrainFeedParams>::uninit();
    expect(unsafe { seer_train_feed_params_default(p.as_mut_ptr()) }, SEER_OK, "seer_train_feed_params_default");
    SeerTrainFeedParams { layer, cuda_stream: stream, ..unsafe { p.assume_init() } }
}

/// The released gate at head_dim 64 (4 query heads, 2 KV heads), `layers` layers.
fn rust_config(layers: usize) -> GateConfig {
    GateConfig { num_layers: layers, ..common::released_config(4, 2, D, 10000.0) }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seerattn-ffi-distill-cuda-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn c_path(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

/// A gate directory (F32) of a random gate with `gate_hidden`, its weights
/// rounded to bf16: the values the GPU trainer's bf16 copy holds, so that
/// CPU and GPU trainers start from the same gate.
fn start_gate(dir: &Path, layers: usize, seed: u64) -> seerattn::Gate {
    let gate = common::gate_rounded_to_bf16(&init_gate(rust_config(layers), seed).unwrap());
    seerattn::checkpoint::save_gate_dir(&gate, dir, DType::F32, None).unwrap();
    gate
}

fn create(gate: &Gate, params: &SeerTrainParams) -> Trainer {
    let mut t = std::ptr::null_mut();
    expect(unsafe { seer_trainer_create(gate.0, params, &mut t) }, SEER_OK, "seer_trainer_create");
    Trainer(t)
}

/// One batch: pre-RoPE inputs for the gate and post-RoPE ones for the
/// target, on the host, and device buffers to copy them into.
struct Batch4 {
    nope: Inputs,
    roped: Inputs,
    dev: Vec<DeviceBuffer>,
}

/// Pre-RoPE inputs with an offset per (block, head, dim), so that the
/// gate's scores are not flat (as tests/gpu_distill.rs's loss comparison
/// makes them: the GPU's bf16 intermediates are within 1% of the CPU's
/// loss there).
fn structured(lens: &[(usize, usize)], seed: u64) -> Inputs {
    let mut x = Inputs::random(lens, 4, 2, D, 1.0, seed);
    let mut rng = common::Rng(seed ^ 0x5eed);
    for (v, heads) in [(&mut x.q, 4), (&mut x.k, 2)] {
        let tokens = v.len() / (heads * D);
        let offsets: Vec<f32> = (0..tokens.div_ceil(64) * heads * D).map(|_| rng.uniform(-1.5, 1.5)).collect();
        for (i, e) in v.iter_mut().enumerate() {
            let (t, h, d) = (i / (heads * D), (i / D) % heads, i % D);
            let noise = half::bf16::from_bits(*e).to_f32();
            *e = half::bf16::from_f32(offsets[((t / 64) * heads + h) * D + d] + noise).to_bits();
        }
    }
    x
}

impl Batch4 {
    fn new(ctx: &seerattn::cuda::Ctx, lens: &[(usize, usize)], seed: u64) -> Batch4 {
        let nope = structured(lens, seed);
        let roped = Inputs::random(lens, 4, 2, D, 2.0, seed + 1000);
        let dev = Self::host_bytes(&nope, &roped).iter().map(|b| poisoned(ctx, b.len())).collect();
        Batch4 { nope, roped, dev }
    }
    fn host_bytes(nope: &Inputs, roped: &Inputs) -> [Vec<u8>; 4] {
        let bytes = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        [bytes(&nope.q), bytes(&nope.k), bytes(&roped.q), bytes(&roped.k)]
    }
    fn shapes(&self) -> [[usize; 3]; 4] {
        let (tq, tk) = (self.nope.lens.total_q(), self.nope.lens.total_k());
        [[tq, 4, D], [tk, 2, D], [tq, 4, D], [tk, 2, D]]
    }
    fn host_descs(&self) -> [SeerTensor; 4] {
        [self.nope.q_desc(), self.nope.k_desc(), self.roped.q_desc(), self.roped.k_desc()]
    }
    fn cuda_descs(&self) -> [SeerTensor; 4] {
        let s = self.shapes();
        std::array::from_fn(|i| cuda_tensor(self.dev[i].ptr(), s[i]))
    }
    fn device_tensors(&self) -> [DeviceTensor; 4] {
        let s = self.shapes();
        std::array::from_fn(|i| DeviceTensor {
            ptr: self.dev[i].ptr(),
            dtype: DType::BF16,
            layout: Layout3::contiguous(s[i][0], s[i][1], s[i][2]),
        })
    }
    /// Write the inputs into the device buffers (poisoned with NaN before)
    /// on `stream`, asynchronously, as the engine's forward pass writes them
    /// there before it feeds them: the feed must be ordered after it.
    fn write_on(&self, ctx: &seerattn::cuda::Ctx, stream: &Stream) {
        for (b, bytes) in self.dev.iter().zip(Self::host_bytes(&self.nope, &self.roped)) {
            testing::fill(ctx, b.ptr(), 0xff, b.len()).unwrap();
            testing::copy_to_device_async(stream, b.ptr(), &bytes).unwrap();
        }
    }
    fn batch(&self) -> Batch {
        Batch::from_cu_seqlens(&self.nope.lens.q, &self.nope.lens.k).unwrap()
    }
    fn feed(&self, t: &Trainer, p: &SeerTrainFeedParams, d: &[SeerTensor; 4]) -> SeerStatus {
        unsafe { seer_trainer_accumulate(t.0, p, &self.nope.lens.batch(), &d[0], &d[1], &d[2], &d[3]) }
    }
}
/// The start of the one-layer tests: a context and a stream of the
/// engine's, a one-layer gate saved under a fresh directory and loaded
/// through the C API, and a batch of `lens` written to the device on that
/// stream (not waited for). The directory goes on drop.
struct OneLayer {
    ctx: seerattn::cuda::Ctx,
    stream: Stream,
    root: PathBuf,
    gate: Gate,
    x: Batch4,
}

impl OneLayer {
    fn new(name: &str, gate_seed: u64, lens: &[(usize, usize)], batch_seed: u64) -> OneLayer {
        let ctx = ctx();
        let stream = Stream::new(&ctx).unwrap();
        let root = temp_dir(name);
        start_gate(&root, 1, gate_seed);
        let gate = Gate::load(&root);
        let x = Batch4::new(&ctx, lens, batch_seed);
        x.write_on(&ctx, &stream);
        OneLayer { ctx, stream, root, gate, x }
    }

    /// Feed params of layer 0 on the fixture's stream.
    fn params(&self) -> SeerTrainFeedParams {
        feed_params(0, self.stream.raw().cast())
    }
}

impl Drop for OneLayer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn step(t: &Trainer) -> (SeerStatus, SeerStepReport) {
    let mut r = SeerStepReport {
        struct_size: std::mem::size_of::<SeerStepReport>(),
        step: 0,
        lr: -1.0,
        grad_norm: -1.0,
        layers_stepped: 0,
    };
    let status = unsafe { seer_trainer_step(t.0, &mut r) };
    (status, r)
}

fn losses(t: &Trainer, n: usize) -> Vec<f64> {
    let mut v = vec![-7.0; n];
    let mut written = 0usize;
    expect(unsafe { seer_trainer_layer_losses(t.0, v.as_mut_ptr(), n, &mut written) }, SEER_OK, "layer_losses");
    v.truncate(written);
    v
}

fn get_step(t: &Trainer) -> u64 {
    let mut s = u64::MAX;
    expect(unsafe { seer_trainer_get_step(t.0, &mut s) }, SEER_OK, "get_step");
    s
}

fn save_gate(t: &Trainer, dir: &Path) -> Vec<u8> {
    expect(unsafe { seer_trainer_save_gate_dir(t.0, c_path(dir).as_ptr(), 2, std::ptr::null()) }, SEER_OK, "save");
    std::fs::read(dir.join("attn_gate_weights.safetensors")).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_cuda_feeds_equal_the_rust_gpu_trainer_and_the_cpu_within_tolerance() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let root = temp_dir("equal");
    let gate_dir = root.join("start");
    let start = start_gate(&gate_dir, 2, 5);
    let gate = Gate::load(&gate_dir);
    let params = train_params(6);
    let (cuda, cpu) = (create(&gate, &params), create(&gate, &params));
    let mut rust = CudaGateTrainer::new(start, rust_train(6), &ctx).unwrap();
    let data = [Batch4::new(&ctx, &[(300, 300), (100, 230)], 1), Batch4::new(&ctx, &[(200, 200)], 2)];
    for s in 0..4 {
        let x = &data[s % 2];
        // The engine writes its tensors on its stream and feeds them there
        // (a non-default, non-blocking stream); the Rust trainer reads the
        // same buffers afterwards on the legacy stream.
        x.write_on(&ctx, &stream);
        let layers: Vec<u32> = if s == 2 { vec![1] } else { vec![0, 1] };
        for &layer in &layers {
            expect(x.feed(&cuda, &feed_params(layer, stream.raw().cast()), &x.cuda_descs()), SEER_OK, "CUDA feed");
            expect(x.feed(&cpu, &feed_params(layer, std::ptr::null_mut()), &x.host_descs()), SEER_OK, "host feed");
            let [qn, kn, q, k] = x.device_tensors();
            let scale = 1.0 / (D as f64).sqrt();
            unsafe { rust.accumulate(layer as usize, &qn, &kn, &q, &k, &x.batch(), scale, std::ptr::null_mut()) }
                .unwrap();
        }
        let ((sc, rc), (sp, rp)) = (step(&cuda), step(&cpu));
        expect(sc, SEER_OK, "CUDA step");
        expect(sp, SEER_OK, "CPU step");
        let want = unsafe { rust.step(std::ptr::null_mut()) }.unwrap();
        assert_eq!(
            (rc.step, rc.lr.to_bits(), rc.grad_norm.to_bits(), rc.layers_stepped as usize),
            (want.step, want.lr.to_bits(), want.grad_norm.to_bits(), layers.len()),
            "step {s}: the C API's report is not the Rust GPU trainer's"
        );
        let (lc, lp) = (losses(&cuda, 2), losses(&cpu, 2));
        for (layer, w) in want.layer_losses.iter().enumerate() {
            match w {
                Some(w) => assert_eq!(lc[layer].to_bits(), w.to_bits(), "step {s} layer {layer}"),
                None => assert!(lc[layer].is_nan() && lp[layer].is_nan(), "step {s}: layer {layer} was not fed"),
            }
        }
        assert_eq!((rc.step, rc.lr.to_bits()), (rp.step, rp.lr.to_bits()), "step {s}: the schedule");
        // While the weights are the starting ones (the first step's lr is 0):
        // the GPU trainer's tolerances against the CPU reference.
        if s < 2 {
            for layer in 0..2 {
                let (g, c) = (lc[layer], lp[layer]);
                assert!((g - c).abs() <= 1e-2 * c, "step {s} layer {layer}: loss {g} on the GPU, {c} on the CPU");
            }
            let (g, c) = (rc.grad_norm, rp.grad_norm);
            assert!((g - c).abs() <= 3e-2 * c, "step {s}: gradient norm {g} on the GPU, {c} on the CPU");
        }
        eprintln!("step {s}: losses GPU {lc:?} CPU {lp:?}, gradient norm GPU {} CPU {}", rc.grad_norm, rp.grad_norm);
    }
    assert_eq!(get_step(&cuda), 4);
    let from_c = save_gate(&cuda, &root.join("c"));
    unsafe { rust.save_gate_dir(&root.join("rust"), DType::F32, None, std::ptr::null_mut()) }.unwrap();
    let from_rust = std::fs::read(root.join("rust").join("attn_gate_weights.safetensors")).unwrap();
    assert!(from_c == from_rust, "the C API's saved gate differs from the Rust GPU trainer's");
    // The saved gate loads through the C API.
    let loaded = Gate::load(&root.join("c"));
    assert_eq!(loaded.config().head_dim, D as u32);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_resumes_a_cuda_run_from_its_files_bit_for_bit() {
    let ctx = ctx();
    let (a, b) = (Stream::new(&ctx).unwrap(), Stream::new(&ctx).unwrap());
    let root = temp_dir("resume");
    let gate_dir = root.join("start");
    start_gate(&gate_dir, 1, 9);
    let gate = Gate::load(&gate_dir);
    let params = train_params(8);
    let data = [Batch4::new(&ctx, &[(256, 256)], 11), Batch4::new(&ctx, &[(100, 180), (64, 64)], 12)];
    // Feeds alternate between two streams and the legacy one: the step and
    // the saves run on whichever fed last.
    let streams: [*mut c_void; 3] = [a.raw().cast(), std::ptr::null_mut(), b.raw().cast()];
    let run = |t: &Trainer, steps: std::ops::Range<usize>| {
        for s in steps {
            let x = &data[s % 2];
            x.write_on(&ctx, &a);
            a.synchronize().unwrap();
            expect(x.feed(t, &feed_params(0, streams[s % 3]), &x.cuda_descs()), SEER_OK, "feed");
            expect(step(t).0, SEER_OK, "step");
        }
    };
    let straight = create(&gate, &params);
    run(&straight, 0..6);
    let first = create(&gate, &params);
    run(&first, 0..3);
    let (saved, state) = (root.join("saved"), c_path(&root.join("state.safetensors")));
    save_gate(&first, &saved);
    expect(unsafe { seer_trainer_save_optimizer_state(first.0, state.as_ptr()) }, SEER_OK, "save state");

    // A new trainer from the saved gate, its state loaded before the first
    // feed (on the host), handed to the GPU trainer the first CUDA feed makes.
    let second = create(&Gate::load(&saved), &params);
    expect(unsafe { seer_trainer_load_optimizer_state(second.0, state.as_ptr()) }, SEER_OK, "load state");
    assert_eq!(get_step(&second), 3);
    run(&second, 3..6);
    assert_eq!(get_step(&second), 6);
    assert_eq!(losses(&second, 1)[0].to_bits(), losses(&straight, 1)[0].to_bits());
    assert!(
        save_gate(&second, &root.join("b")) == save_gate(&straight, &root.join("a")),
        "resumed weights differ from the uninterrupted run's"
    );
    // The CUDA run's state also resumes on the CPU (one file format).
    let host = create(&Gate::load(&saved), &params);
    expect(unsafe { seer_trainer_load_optimizer_state(host.0, state.as_ptr()) }, SEER_OK, "load on the host");
    let x = &data[1];
    expect(x.feed(&host, &feed_params(0, std::ptr::null_mut()), &x.host_descs()), SEER_OK, "host feed");
    let (status, report) = step(&host);
    expect(status, SEER_OK, "host step");
    assert_eq!(report.step, 4);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_gate_the_gpu_cannot_train_is_refused_then_trains_on_the_host() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let x = Batch4::new(&ctx, &[(200, 200)], 21);
    x.write_on(&ctx, &stream);
    stream.synchronize().unwrap();
    let params = train_params(4);
    // gate_hidden 32 < head_dim 64: a Q projection.
    let mut t = std::ptr::null_mut();
    let config = gate_config(1, 4, 2, D as u32, 32);
    expect(unsafe { seer_trainer_create_random(&config, 1, &params, &mut t) }, SEER_OK, "create_random");
    let t = Trainer(t);
    let null = std::ptr::null_mut();
    let msg = expect(x.feed(&t, &feed_params(0, null), &x.cuda_descs()), SEER_UNSUPPORTED, "CUDA feed, Q projection");
    assert!(msg.contains("without a Q projection"), "{msg}");
    expect(x.feed(&t, &feed_params(0, null), &x.host_descs()), SEER_OK, "host feed");
    let msg = expect(x.feed(&t, &feed_params(0, null), &x.cuda_descs()), SEER_INVALID_ARGUMENT, "then CUDA");
    assert!(msg.contains("trains on the CPU (SEER_DEVICE_CPU) since its first feed"), "{msg}");
    expect(step(&t).0, SEER_OK, "step");
    assert!(losses(&t, 1)[0] > 0.0);
}

/// f32 device tensors are rounded on the device (pre-RoPE to bf16, post-RoPE
/// to the other one's dtype): feeding the f32 widening of bf16 data, all
/// four or some of them, trains bit for bit as feeding the bf16 data.
#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_f32_cuda_feeds_are_rounded_as_16_bit_ones() {
    let f = OneLayer::new("f32", 5, &[(300, 300), (70, 70)], 41);
    let (ctx, gate, x) = (&f.ctx, &f.gate, &f.x);
    f.stream.synchronize().unwrap();
    let p = f.params();
    let run = |descs: &[SeerTensor; 4]| {
        let t = create(gate, &train_params(6));
        expect(x.feed(&t, &p, descs), SEER_OK, "feed");
        let (status, report) = step(&t);
        expect(status, SEER_OK, "step");
        (report.grad_norm.to_bits(), losses(&t, 1)[0].to_bits())
    };
    let bf16 = run(&x.cuda_descs());
    // f32 widenings of the same values (exact), packed.
    let wide: Vec<DeviceBuffer> = Batch4::host_bytes(&x.nope, &x.roped)
        .iter()
        .map(|b| {
            let f: Vec<u8> = b
                .chunks(2)
                .flat_map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32().to_le_bytes())
                .collect();
            to_device(ctx, &f)
        })
        .collect();
    let good = x.cuda_descs();
    let f32_desc = |i: usize| SeerTensor { data: wide[i].ptr() as *mut c_void, dtype: F32, ..good[i] };
    let all: [SeerTensor; 4] = std::array::from_fn(f32_desc);
    assert_eq!(run(&all), bf16, "all four f32");
    let pre_only = [f32_desc(0), f32_desc(1), good[2], good[3]];
    assert_eq!(run(&pre_only), bf16, "f32 q_nope and k_nope");
    let q_only = [good[0], good[1], f32_desc(2), good[3]];
    assert_eq!(run(&q_only), bf16, "f32 post-RoPE q, bf16 k");
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_cuda_trainer_refuses_host_feeds_and_bad_device_buffers() {
    let f = OneLayer::new("refusals", 3, &[(300, 300)], 31);
    let (ctx, stream, x) = (&f.ctx, &f.stream, &f.x);
    let t = create(&f.gate, &train_params(6));
    let p = f.params();
    expect(x.feed(&t, &p, &x.cuda_descs()), SEER_OK, "first CUDA feed");
    let (status, first) = step(&t);
    expect(status, SEER_OK, "step");
    let loss = losses(&t, 1)[0];

    let msg = expect(x.feed(&t, &p, &x.host_descs()), SEER_INVALID_ARGUMENT, "host feed of a CUDA trainer");
    assert!(msg.contains("trains on CUDA (SEER_DEVICE_CUDA) since its first feed"), "{msg}");
    let good = x.cuda_descs();
    // Host memory described as CUDA memory.
    let mut host_k = good;
    host_k[3].data = x.roped.k.as_ptr().cast_mut().cast();
    let msg = expect(x.feed(&t, &p, &host_k), SEER_INVALID_ARGUMENT, "host memory as k");
    assert!(msg.contains("not device memory"), "{msg}");
    // Rows not 16-byte aligned: q 2 bytes into a larger allocation.
    let q_bytes = Batch4::host_bytes(&x.nope, &x.roped)[2].clone();
    let shifted = poisoned(ctx, q_bytes.len() + 64);
    testing::copy_to_device(ctx, shifted.ptr() + 2, &q_bytes).unwrap();
    let mut misaligned = good;
    misaligned[2].data = (shifted.ptr() + 2) as *mut c_void;
    let msg = expect(x.feed(&t, &p, &misaligned), SEER_UNSUPPORTED, "misaligned q rows");
    assert!(msg.contains("16-byte"), "{msg}");
    // k_nope running past the end of its allocation (2 MiB: a whole
    // allocation granule, whatever the driver rounds to).
    let short = poisoned(ctx, 2 << 20);
    let mut short_k = good;
    short_k[1].data = (short.ptr() + (2 << 20) - 1024) as *mut c_void;
    let msg = expect(x.feed(&t, &p, &short_k), SEER_INVALID_ARGUMENT, "k_nope past its allocation");
    assert!(msg.contains("past its allocation"), "{msg}");
    // None of them accumulated anything or stepped.
    assert_eq!(get_step(&t), 1);
    assert_eq!(losses(&t, 1)[0].to_bits(), loss.to_bits());
    let msg = expect(step(&t).0, SEER_INVALID_ARGUMENT, "step after refused feeds");
    assert!(msg.contains("no layer was fed"), "{msg}");

    // Feed params of the first release (no cuda_stream) in a buffer that
    // ends there: the legacy default stream, whatever lies past it.
    const V1: usize = std::mem::offset_of!(SeerTrainFeedParams, cuda_stream);
    let mut v1 = [0u64; V1 / 8];
    let old = SeerTrainFeedParams { struct_size: V1, ..p };
    unsafe {
        std::ptr::copy_nonoverlapping((&old as *const SeerTrainFeedParams).cast::<u8>(), v1.as_mut_ptr().cast(), V1)
    };
    stream.synchronize().unwrap(); // the inputs, for a feed on another stream
    let [qn, kn, q, k] = good;
    let status = unsafe { seer_trainer_accumulate(t.0, v1.as_ptr().cast(), &x.nope.lens.batch(), &qn, &kn, &q, &k) };
    expect(status, SEER_OK, "first-release params");
    let (status, second) = step(&t);
    expect(status, SEER_OK, "step");
    assert_eq!((first.step, second.step), (1, 2));
    assert!(losses(&t, 1)[0].is_finite());
}

/// A refused first CUDA feed leaves the trainer undecided, whether it was
/// refused before the GPU trainer was made (host memory as `q_nope`) or by
/// that trainer (rows not 16-byte aligned, after the weights were uploaded):
/// the next feed, CUDA or host, decides.
#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_a_refused_first_cuda_feed_leaves_the_trainer_undecided() {
    let f = OneLayer::new("undecided", 4, &[(200, 200)], 41);
    let (ctx, gate, x) = (&f.ctx, &f.gate, &f.x);
    let params = train_params(4);
    let p = f.params();
    let good = x.cuda_descs();

    let a = create(gate, &params);
    let mut host_q_nope = good;
    host_q_nope[0].data = x.nope.q.as_ptr().cast_mut().cast();
    let msg = expect(x.feed(&a, &p, &host_q_nope), SEER_INVALID_ARGUMENT, "host memory as the first q_nope");
    assert!(msg.contains("q_nope is not device memory"), "{msg}");
    expect(x.feed(&a, &p, &good), SEER_OK, "then a CUDA feed");
    let msg = expect(x.feed(&a, &p, &x.host_descs()), SEER_INVALID_ARGUMENT, "then host tensors");
    assert!(msg.contains("trains on CUDA"), "{msg}");

    let b = create(gate, &params);
    let q_bytes = Batch4::host_bytes(&x.nope, &x.roped)[2].clone();
    let shifted = poisoned(ctx, q_bytes.len() + 64);
    testing::copy_to_device(ctx, shifted.ptr() + 2, &q_bytes).unwrap();
    let mut misaligned = good;
    misaligned[2].data = (shifted.ptr() + 2) as *mut c_void;
    let msg = expect(x.feed(&b, &p, &misaligned), SEER_UNSUPPORTED, "misaligned q in the first feed");
    assert!(msg.contains("16-byte"), "{msg}");
    expect(x.feed(&b, &p, &x.host_descs()), SEER_OK, "then host tensors");
    let msg = expect(x.feed(&b, &p, &good), SEER_INVALID_ARGUMENT, "then CUDA tensors");
    assert!(msg.contains("trains on the CPU"), "{msg}");
    for t in [&a, &b] {
        let (status, report) = step(t);
        expect(status, SEER_OK, "step");
        assert_eq!(report.step, 1);
    }
}
