//! The trainer's C API (src/ffi/distill.rs), called as a C caller would: it
//! trains exactly as the Rust trainer does, saves gates `seer_gate_load`
//! reads, resumes bit for bit, and answers every bad argument of
//! docs/bad-inputs.md ("Training") with a status and a message. The GPU
//! trainer's side that needs no GPU is here too (feed params of the first
//! release, the device fixed by the first successful feed and only by it,
//! CUDA feeds refused cleanly without a GPU); its GPU tests are
//! tests/ffi_distill_cuda.rs.

mod common;
use common::capi::*;
use seerattn::distill::{init_gate, GateTrainer, TrainConfig};
use seerattn::ffi::args::SeerTensor;
use seerattn::ffi::distill::*;
use seerattn::ffi::gate::*;
use seerattn::ffi::status::SeerStatus;
use seerattn::{Batch, DType, GateConfig, GateType, Layout3, RopeConfig, RopeScaling, SparsityMethod, Tensor3};
use std::ffi::CString;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

/// Tests run one at a time, so that a destroyed handle's address is not
/// given to another test's new trainer while a test checks that using it fails.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A trainer handle, destroyed on drop.
struct Trainer(*mut SeerTrainer);

impl Drop for Trainer {
    fn drop(&mut self) {
        unsafe { seer_trainer_destroy(self.0) };
    }
}

fn train_params(total_steps: u64) -> SeerTrainParams {
    let mut p = MaybeUninit::<SeerTrainParams>::uninit();
    expect(unsafe { seer_train_params_default(total_steps, p.as_mut_ptr()) }, SEER_OK, "seer_train_params_default");
    unsafe { p.assume_init() }
}

fn feed_params(layer: u32, softmax_scale: f64) -> SeerTrainFeedParams {
    let mut p = MaybeUninit::<SeerTrainFeedParams>::uninit();
    expect(unsafe { seer_train_feed_params_default(p.as_mut_ptr()) }, SEER_OK, "seer_train_feed_params_default");
    let mut p = unsafe { p.assume_init() };
    (p.layer, p.softmax_scale) = (layer, softmax_scale);
    p
}

fn random_trainer(config: &SeerGateConfig, seed: u64, params: &SeerTrainParams) -> Trainer {
    let mut t = std::ptr::null_mut();
    expect(unsafe { seer_trainer_create_random(config, seed, params, &mut t) }, SEER_OK, "create_random");
    Trainer(t)
}

/// One batch of a layer: pre-RoPE inputs for the gate and post-RoPE ones
/// for the target (independent random values: the C boundary is under
/// test, not the model).
struct Batch2 {
    nope: Inputs,
    roped: Inputs,
}

impl Batch2 {
    fn new(lens: &[(usize, usize)], seed: u64) -> Batch2 {
        Batch2::with_dim(lens, 8, seed)
    }
    /// 4 query heads, 2 KV heads, head_dim `d`.
    fn with_dim(lens: &[(usize, usize)], d: usize, seed: u64) -> Batch2 {
        Batch2 {
            nope: Inputs::random(lens, 4, 2, d, 2.0, seed),
            roped: Inputs::random(lens, 4, 2, d, 2.0, seed + 1000),
        }
    }
    fn descs(&self) -> [SeerTensor; 4] {
        [self.nope.q_desc(), self.nope.k_desc(), self.roped.q_desc(), self.roped.k_desc()]
    }
    fn feed(&self, t: &Trainer, p: &SeerTrainFeedParams) -> SeerStatus {
        let [qn, kn, q, k] = self.descs();
        unsafe { seer_trainer_accumulate(t.0, p, &self.nope.lens.batch(), &qn, &kn, &q, &k) }
    }
    fn view<'a>(bits: &'a [u16], tokens: usize, heads: usize) -> Tensor3<'a> {
        let bytes = unsafe { std::slice::from_raw_parts(bits.as_ptr().cast::<u8>(), bits.len() * 2) };
        Tensor3::new("x", bytes, DType::BF16, Layout3::contiguous(tokens, heads, 8)).unwrap()
    }
    /// The same batch through the Rust trainer.
    fn feed_rust(&self, t: &mut GateTrainer, layer: usize, scale: f64) {
        let (tq, tk) = (self.nope.lens.total_q(), self.nope.lens.total_k());
        let batch = Batch::from_cu_seqlens(&self.nope.lens.q, &self.nope.lens.k).unwrap();
        t.accumulate(
            layer,
            &Self::view(&self.nope.q, tq, 4),
            &Self::view(&self.nope.k, tk, 2),
            &Self::view(&self.roped.q, tq, 4),
            &Self::view(&self.roped.k, tk, 2),
            &batch,
            scale,
        )
        .unwrap();
    }
}

/// The Rust config of `gate_config(layers, 4, 2, 8, hidden)` (the C defaults).
fn rust_config(layers: usize, hidden: usize) -> GateConfig {
    GateConfig {
        num_layers: layers,
        num_q_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        gate_hidden: hidden,
        block_size: 64,
        gate_type: GateType::released(),
        force_double: false,
        rope: RopeConfig { theta: 10000.0, scaling: RopeScaling::None },
        sparsity_method: SparsityMethod::Threshold,
        threshold: 0.0,
        nz_ratio: 1.0,
        last_block_dense: true,
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seerattn-ffi-distill-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn c_path(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

fn step(t: &Trainer) -> (SeerStatus, SeerStepReport) {
    let mut r = SeerStepReport {
        struct_size: std::mem::size_of::<SeerStepReport>(),
        step: u64::MAX,
        lr: -1.0,
        grad_norm: -1.0,
        layers_stepped: u32::MAX,
    };
    let status = unsafe { seer_trainer_step(t.0, &mut r) };
    (status, r)
}

fn losses(t: &Trainer, len: usize) -> (SeerStatus, Vec<f64>, usize) {
    let mut v = vec![-7.0; len];
    let mut n = usize::MAX;
    let status = unsafe { seer_trainer_layer_losses(t.0, v.as_mut_ptr(), v.len(), &mut n) };
    (status, v, n)
}

fn get_step(t: &Trainer) -> u64 {
    let mut s = u64::MAX;
    expect(unsafe { seer_trainer_get_step(t.0, &mut s) }, SEER_OK, "get_step");
    s
}

/// Through the C API, a run is the Rust trainer's run, bit for bit: the
/// params struct maps onto `TrainConfig`, scale 0 is `1/sqrt(head_dim)`,
/// the report and the losses (NaN for a layer not fed) are the trainer's,
/// and the saved gate loads through `seer_gate_load` with its weights.
#[test]
fn c_training_matches_the_rust_trainer_and_saves_a_loadable_gate() {
    let _s = serial();
    let data = [Batch2::new(&[(200, 200), (70, 150)], 1), Batch2::new(&[(130, 130)], 2)];
    let mut params = train_params(6);
    (params.warmup_steps, params.lr, params.weight_decay, params.max_grad_norm) = (2, 3e-3, 0.01, 0.0);
    let config = gate_config(2, 4, 2, 8, 6); // gate_hidden 6: a Q projection too
    let c = random_trainer(&config, 5, &params);
    let mut rust_train = TrainConfig::upstream(6);
    rust_train.schedule.warmup_steps = 2;
    rust_train.adamw.lr = 3e-3;
    rust_train.adamw.weight_decay = 0.01;
    rust_train.max_grad_norm = None;
    let mut rust = GateTrainer::new(init_gate(rust_config(2, 6), 5).unwrap(), rust_train).unwrap();

    assert_eq!(losses(&c, 2), (SEER_OK, vec![-7.0; 2], 0), "before the first step no loss is written");
    for s in 0..5 {
        let x = &data[s % 2];
        // Step 3 feeds layer 1 only: layer 0's loss is NaN then.
        for layer in (if s == 3 { 1 } else { 0 })..2 {
            expect(x.feed(&c, &feed_params(layer, 0.0)), SEER_OK, "accumulate");
            x.feed_rust(&mut rust, layer as usize, 1.0 / 8f64.sqrt());
        }
        let (status, report) = step(&c);
        expect(status, SEER_OK, "step");
        let want = rust.step().unwrap();
        assert_eq!((report.step, report.lr, report.grad_norm), (want.step, want.lr, want.grad_norm));
        assert_eq!(report.layers_stepped, if s == 3 { 1 } else { 2 });
        let (status, got, n) = losses(&c, 3);
        expect(status, SEER_OK, "layer_losses");
        assert_eq!(n, 2);
        assert_eq!(got[2], -7.0, "only num_layers entries are written");
        for (layer, (want, got)) in want.layer_losses.iter().zip(&got).enumerate() {
            match want {
                Some(l) => assert_eq!(got, l, "step {s} layer {layer}"),
                None => assert!(got.is_nan(), "step {s}: a layer not fed reads NaN"),
            }
        }
    }
    assert_eq!(get_step(&c), 5);

    let dir = temp_dir("save");
    let path = c_path(&dir);
    let base = CString::new(r#"{"model_type": "llama", "vocab_size": 100}"#).unwrap();
    expect(unsafe { seer_trainer_save_gate_dir(c.0, path.as_ptr(), 2, base.as_ptr()) }, SEER_OK, "save F32");
    let loaded = Gate::load(&dir); // through seer_gate_load
    assert_eq!(loaded.config().gate_hidden, 6);
    assert!(std::fs::read_to_string(dir.join("config.json")).unwrap().contains("\"model_type\": \"llama\""));
    let rust_loaded = seerattn::Gate::load_dir(&dir).unwrap();
    assert_eq!(rust_loaded.config(), &rust_config(2, 6));
    for layer in 0..2 {
        assert_eq!(rust_loaded.layer(layer).unwrap(), rust.gate().layer(layer).unwrap(), "layer {layer}");
    }
    // The loaded gate computes masks with the trained weights.
    let eval = Inputs::random(&[(300, 300)], 4, 2, 8, 2.0, 9);
    let (status, mask) = eval.mask(loaded.0, &loaded.params(1));
    expect(status, SEER_OK, "mask of the saved gate");
    assert_eq!(mask.rows().len(), 4 * 5);
    // BF16, the release format: weights rounded.
    expect(unsafe { seer_trainer_save_gate_dir(c.0, path.as_ptr(), 0, std::ptr::null()) }, SEER_OK, "save BF16");
    let bf16 = seerattn::Gate::load_dir(&dir).unwrap();
    let round = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect::<Vec<_>>();
    assert_eq!(bf16.layer(0).unwrap().k_proj, round(&rust.gate().layer(0).unwrap().k_proj));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A trainer created from a gate handle starts from that gate's weights
/// (a copy: the gate may be destroyed), and a gate missing a layer's
/// weights is refused.
#[test]
fn trainer_from_a_gate_handle_starts_from_its_weights() {
    let _s = serial();
    let config = gate_config(1, 4, 2, 8, 8);
    let mut g = std::ptr::null_mut();
    expect(unsafe { seer_gate_create(&config, &mut g) }, SEER_OK, "seer_gate_create");
    let gate = Gate(g);
    let params = train_params(4);
    let mut out = 0x1 as *mut SeerTrainer;
    let msg = expect(unsafe { seer_trainer_create(gate.0, &params, &mut out) }, SEER_INVALID_ARGUMENT, "no weights");
    assert!(msg.contains("layer 0 has no weights"), "{msg}");
    assert_eq!(out, 0x1 as *mut SeerTrainer, "out untouched on failure");

    let w = init_gate(rust_config(1, 8), 77).unwrap();
    let k = &w.layer(0).unwrap().k_proj;
    let desc = host_tensor(k.as_ptr(), F32, [4, 24, 8]);
    expect(unsafe { seer_gate_set_layer_weights(gate.0, 0, &desc, std::ptr::null()) }, SEER_OK, "set weights");
    let mut t = std::ptr::null_mut();
    expect(unsafe { seer_trainer_create(gate.0, &params, &mut t) }, SEER_OK, "seer_trainer_create");
    let t = Trainer(t);
    drop(gate);
    let from_seed = random_trainer(&config, 77, &params);
    let x = Batch2::new(&[(256, 256)], 3);
    for tr in [&t, &from_seed] {
        expect(x.feed(tr, &feed_params(0, 0.3)), SEER_OK, "feed");
        expect(step(tr).0, SEER_OK, "step");
    }
    // Same start (the seed's weights, set by hand), same data: same losses.
    assert_eq!(losses(&t, 1), losses(&from_seed, 1));
    assert!(losses(&t, 1).1[0] > 0.0);
}

/// Saved gate + optimizer state, loaded into a new trainer: the rest of
/// the run is the uninterrupted run's, bit for bit.
#[test]
fn resume_through_the_c_api_matches_an_uninterrupted_run() {
    let _s = serial();
    let data = [Batch2::new(&[(200, 200)], 11), Batch2::new(&[(100, 180), (64, 64)], 12)];
    let params = {
        let mut p = train_params(8);
        p.warmup_steps = 2;
        p
    };
    let config = gate_config(1, 4, 2, 8, 8);
    let run = |t: &Trainer, steps: std::ops::Range<usize>| {
        for s in steps {
            expect(data[s % 2].feed(t, &feed_params(0, 0.0)), SEER_OK, "feed");
            expect(step(t).0, SEER_OK, "step");
        }
    };
    let straight = random_trainer(&config, 3, &params);
    run(&straight, 0..6);
    let first = random_trainer(&config, 3, &params);
    run(&first, 0..3);
    let (dir, state_dir) = (temp_dir("resume-gate"), temp_dir("resume-state"));
    let state = c_path(&state_dir.join("optimizer.safetensors"));
    expect(unsafe { seer_trainer_save_gate_dir(first.0, c_path(&dir).as_ptr(), 2, std::ptr::null()) }, SEER_OK, "");
    expect(unsafe { seer_trainer_save_optimizer_state(first.0, state.as_ptr()) }, SEER_OK, "save state");

    let gate = Gate::load(&dir);
    let mut t = std::ptr::null_mut();
    expect(unsafe { seer_trainer_create(gate.0, &params, &mut t) }, SEER_OK, "create from the saved gate");
    let second = Trainer(t);
    assert_eq!(get_step(&second), 0);
    expect(unsafe { seer_trainer_load_optimizer_state(second.0, state.as_ptr()) }, SEER_OK, "load state");
    assert_eq!(get_step(&second), 3);
    run(&second, 3..6);
    assert_eq!(losses(&second, 1), losses(&straight, 1));
    let (a, b) = (temp_dir("resume-a"), temp_dir("resume-b"));
    for (t, d) in [(&second, &a), (&straight, &b)] {
        expect(unsafe { seer_trainer_save_gate_dir(t.0, c_path(d).as_ptr(), 2, std::ptr::null()) }, SEER_OK, "");
    }
    let file = |d: &Path| std::fs::read(d.join("attn_gate_weights.safetensors")).unwrap();
    assert_eq!(file(&a), file(&b), "resumed weights differ from the uninterrupted run's");
    for d in [dir, state_dir, a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Every row of docs/bad-inputs.md's "Training" table that is not above.
#[test]
fn bad_arguments_get_a_status_and_a_message() {
    let _s = serial();
    let config = gate_config(2, 4, 2, 8, 8);
    let params = train_params(10);
    let null_t: *mut SeerTrainer = std::ptr::null_mut();
    let mut out = 0x8 as *mut SeerTrainer;
    let sentinel = out;
    let check = |got: SeerStatus, want: SeerStatus, what: &str, words: &str| {
        let msg = expect(got, want, what);
        assert!(msg.contains(words), "{what}: message '{msg}' lacks '{words}'");
    };

    // Defaults and params.
    check(unsafe { seer_train_params_default(5, std::ptr::null_mut()) }, SEER_NULL_POINTER, "params default", "out");
    check(unsafe { seer_train_feed_params_default(std::ptr::null_mut()) }, SEER_NULL_POINTER, "feed default", "out");
    let create = |c: &SeerGateConfig, p: &SeerTrainParams, out: &mut *mut SeerTrainer| unsafe {
        seer_trainer_create_random(c, 1, p, out)
    };
    type Edit = fn(&mut SeerTrainParams);
    let bad_params: [(&str, Edit, &str); 9] = [
        ("struct_size 8", |p| p.struct_size = 8, "struct_size"),
        ("lr NaN", |p| p.lr = f64::NAN, "lr"),
        ("lr negative", |p| p.lr = -1e-3, "lr"),
        ("beta1 1", |p| p.beta1 = 1.0, "beta1"),
        ("eps 0", |p| p.eps = 0.0, "eps"),
        ("weight_decay inf", |p| p.weight_decay = f64::INFINITY, "weight_decay"),
        ("total_steps 0", |p| p.total_steps = 0, "total_steps"),
        ("skip_fraction 1", |p| p.skip_fraction = 1.0, "skip_fraction"),
        ("max_grad_norm -1", |p| p.max_grad_norm = -1.0, "max_grad_norm"),
    ];
    for (what, edit, words) in bad_params {
        let mut p = params;
        edit(&mut p);
        check(create(&config, &p, &mut out), SEER_INVALID_ARGUMENT, what, words);
        assert_eq!(out, sentinel, "{what}: out written");
    }
    let mut p = params;
    p.loss_scale = 0.0;
    check(create(&config, &p, &mut out), SEER_INVALID_ARGUMENT, "loss_scale 0", "loss_scale");
    check(
        unsafe { seer_trainer_create_random(std::ptr::null(), 1, &params, &mut out) },
        SEER_NULL_POINTER,
        "",
        "config",
    );
    check(
        unsafe { seer_trainer_create_random(&config, 1, std::ptr::null(), &mut out) },
        SEER_NULL_POINTER,
        "",
        "params",
    );
    check(
        unsafe { seer_trainer_create_random(&config, 1, &params, std::ptr::null_mut()) },
        SEER_NULL_POINTER,
        "",
        "out",
    );
    let mut zero = config;
    zero.num_layers = 0;
    check(create(&zero, &params, &mut out), SEER_INVALID_ARGUMENT, "0 layers", "");
    let mut odd = config;
    odd.num_kv_heads = 3;
    check(create(&odd, &params, &mut out), SEER_INVALID_ARGUMENT, "3 kv heads", "");
    let mut block = config;
    block.block_size = 32;
    check(create(&block, &params, &mut out), SEER_UNSUPPORTED, "block 32", "");
    check(unsafe { seer_trainer_create(std::ptr::null(), &params, &mut out) }, SEER_NULL_POINTER, "", "gate");
    check(
        unsafe { seer_trainer_create(0x40 as *const SeerGate, &params, &mut out) },
        SEER_INVALID_ARGUMENT,
        "",
        "live",
    );
    assert_eq!(out, sentinel);

    // Handles.
    let t = random_trainer(&config, 1, &params);
    check(step(&Trainer(null_t)).0, SEER_NULL_POINTER, "step NULL", "trainer");
    let fake = Trainer(0x40 as *mut SeerTrainer);
    check(step(&fake).0, SEER_INVALID_ARGUMENT, "step on a non-handle", "not a live handle");
    std::mem::forget(fake);
    unsafe { seer_trainer_destroy(std::ptr::null_mut()) };
    {
        let gone = random_trainer(&config, 1, &params);
        let raw = gone.0;
        drop(gone);
        let gone = Trainer(raw);
        check(step(&gone).0, SEER_INVALID_ARGUMENT, "step after destroy", "not a live handle");
        let mut s = 0u64;
        check(unsafe { seer_trainer_get_step(raw, &mut s) }, SEER_INVALID_ARGUMENT, "get_step after destroy", "");
        drop(gone); // a second destroy: ignored, with a message
        assert!(message().contains("not a live handle"), "{}", message());
    }

    // Feeding.
    let x = Batch2::new(&[(150, 150)], 21);
    let [qn, kn, q, k] = x.descs();
    let batch = x.nope.lens.batch();
    let feed = |p: &SeerTrainFeedParams, b: &seerattn::ffi::args::SeerBatch, d: [&SeerTensor; 4]| unsafe {
        seer_trainer_accumulate(t.0, p, b, d[0], d[1], d[2], d[3])
    };
    let ok = feed_params(0, 0.0);
    let all = [&qn, &kn, &q, &k];
    check(feed(&feed_params(2, 0.0), &batch, all), SEER_INVALID_ARGUMENT, "layer 2", "params->layer = 2");
    check(feed(&feed_params(0, -0.5), &batch, all), SEER_INVALID_ARGUMENT, "scale -0.5", "softmax_scale");
    check(feed(&feed_params(0, f64::NAN), &batch, all), SEER_INVALID_ARGUMENT, "scale NaN", "softmax_scale");
    let mut small = ok;
    small.struct_size = 4;
    check(feed(&small, &batch, all), SEER_INVALID_ARGUMENT, "feed struct_size 4", "struct_size");
    check(
        unsafe { seer_trainer_accumulate(t.0, std::ptr::null(), &batch, &qn, &kn, &q, &k) },
        SEER_NULL_POINTER,
        "NULL params",
        "params",
    );
    check(
        unsafe { seer_trainer_accumulate(t.0, &ok, std::ptr::null(), &qn, &kn, &q, &k) },
        SEER_NULL_POINTER,
        "NULL batch",
        "batch",
    );
    let owned = [qn, kn, q, k];
    for (i, name) in ["q_nope", "k_nope", "q", "k"].into_iter().enumerate() {
        let mut d: [*const SeerTensor; 4] = [&owned[0], &owned[1], &owned[2], &owned[3]];
        d[i] = std::ptr::null();
        let status = unsafe { seer_trainer_accumulate(t.0, &ok, &batch, d[0], d[1], d[2], d[3]) };
        check(status, SEER_NULL_POINTER, &format!("NULL {name}"), name);
        let mut nodata = owned;
        nodata[i].data = std::ptr::null_mut();
        let status = feed(&ok, &batch, [&nodata[0], &nodata[1], &nodata[2], &nodata[3]]);
        check(status, SEER_NULL_POINTER, &format!("NULL {name}->data"), "data");
    }
    // Devices: all CUDA is the GPU trainer's, which takes head_dim 64 and
    // 128 only (refused before any device is looked for); mixed is invalid.
    let cuda = [qn, kn, q, k].map(|mut t| {
        t.device = 1;
        t
    });
    check(
        feed(&ok, &batch, [&cuda[0], &cuda[1], &cuda[2], &cuda[3]]),
        SEER_UNSUPPORTED,
        "CUDA tensors for a head_dim 8 gate",
        "head_dim 64 and 128, not 8",
    );
    check(feed(&ok, &batch, [&qn, &kn, &cuda[2], &k]), SEER_INVALID_ARGUMENT, "CUDA q, host q_nope", "q is");
    check(feed(&ok, &batch, [&cuda[0], &kn, &cuda[2], &cuda[3]]), SEER_INVALID_ARGUMENT, "host k_nope", "k_nope is");
    let mut dev5 = k;
    dev5.device = 5;
    check(feed(&ok, &batch, [&qn, &kn, &q, &dev5]), SEER_INVALID_ARGUMENT, "device 5", "device 5");
    // Shapes, dtypes, strides against the batch and the gate.
    let other = Lens::new(&[(150, 151)]);
    check(feed(&ok, &other.batch(), all), SEER_INVALID_ARGUMENT, "k rows != batch", "key tokens");
    let mut heads = k;
    (heads.shape[1], heads.shape[2], heads.strides[0], heads.strides[1]) = (4, 4, 16, 4);
    check(feed(&ok, &batch, [&qn, &kn, &q, &heads]), SEER_INVALID_ARGUMENT, "k with 4 heads of 4", "");
    let mut kn_heads = kn;
    (kn_heads.shape[1], kn_heads.strides[0]) = (1, 8);
    check(feed(&ok, &batch, [&qn, &kn_heads, &q, &k]), SEER_INVALID_ARGUMENT, "k_nope 1 head", "k_nope: shape");
    // (f32 q_nope is no bad input: the gate rounds f32 inputs to bf16, on
    // the CPU and on the GPU, since the llama.cpp shim needed it.)
    let mut neg = q;
    neg.strides[0] = -32;
    check(feed(&ok, &batch, [&qn, &kn, &neg, &k]), SEER_INVALID_ARGUMENT, "negative stride", "strides");
    let mut dt = q;
    dt.dtype = 9;
    check(feed(&ok, &batch, [&qn, &kn, &dt, &k]), SEER_INVALID_ARGUMENT, "dtype 9", "dtype 9");
    let mut mis = q;
    mis.data = unsafe { mis.data.cast::<u8>().add(1) }.cast();
    check(feed(&ok, &batch, [&qn, &kn, &mis, &k]), SEER_INVALID_ARGUMENT, "misaligned q", "aligned");
    // Nothing fed so far: every refused call left the trainer as it was.
    check(step(&t).0, SEER_INVALID_ARGUMENT, "step with nothing fed", "no layer was fed");
    assert_eq!(get_step(&t), 0);

    // Step report and losses.
    expect(feed(&ok, &batch, all), SEER_OK, "feed");
    let mut r = MaybeUninit::<SeerStepReport>::zeroed();
    check(unsafe { seer_trainer_step(t.0, r.as_mut_ptr()) }, SEER_INVALID_ARGUMENT, "report size 0", "struct_size");
    assert_eq!(get_step(&t), 0, "a refused report leaves the step untaken");
    let mut saved = 0u64;
    let state_dir = temp_dir("bad-state");
    let state = c_path(&state_dir.join("state.safetensors"));
    check(
        unsafe { seer_trainer_save_optimizer_state(t.0, state.as_ptr()) },
        SEER_INVALID_ARGUMENT,
        "save state mid-accumulation",
        "step() first",
    );
    check(
        unsafe { seer_trainer_load_optimizer_state(t.0, state.as_ptr()) },
        SEER_INVALID_ARGUMENT,
        "load state mid-accumulation",
        "step() first",
    );
    expect(unsafe { seer_trainer_step(t.0, std::ptr::null_mut()) }, SEER_OK, "step without a report");
    expect(unsafe { seer_trainer_get_step(t.0, &mut saved) }, SEER_OK, "");
    assert_eq!(saved, 1);
    check(unsafe { seer_trainer_get_step(t.0, std::ptr::null_mut()) }, SEER_NULL_POINTER, "", "out_step");
    let (status, v, n) = losses(&t, 1);
    check(status, SEER_BUFFER_TOO_SMALL, "one slot for two layers", "2 layers");
    assert_eq!((v[0], n), (-7.0, usize::MAX), "outputs untouched");
    let mut n = 0usize;
    check(
        unsafe { seer_trainer_layer_losses(t.0, std::ptr::null_mut(), 2, &mut n) },
        SEER_NULL_POINTER,
        "NULL losses with a length",
        "out_losses",
    );
    let mut two = [0f64; 2];
    check(
        unsafe { seer_trainer_layer_losses(t.0, two.as_mut_ptr(), 2, std::ptr::null_mut()) },
        SEER_NULL_POINTER,
        "NULL out_written",
        "out_written",
    );
    let (status, v, n) = losses(&t, 2);
    expect(status, SEER_OK, "losses");
    assert_eq!(n, 2);
    assert!(v[0] > 0.0 && v[1].is_nan(), "{v:?}");

    // A batch with an infinite activation: the step is refused and nothing changes.
    let mut inf = Batch2::new(&[(150, 150)], 22);
    inf.nope.q[77] = 0x7F80; // bf16 +inf
    expect(inf.feed(&t, &ok), SEER_OK, "feeding is fine");
    check(step(&t).0, SEER_INVALID_ARGUMENT, "non-finite gradient", "not finite");
    assert_eq!(get_step(&t), 1);
    assert_eq!(losses(&t, 2).1[0], v[0], "the last losses stay the last successful step's");
    expect(feed(&ok, &batch, all), SEER_OK, "feed after the refused step");
    expect(step(&t).0, SEER_OK, "training goes on");

    // Saving the gate.
    let dir = temp_dir("bad-save");
    let dir_c = c_path(&dir);
    let save = |path: *const std::ffi::c_char, dtype: u32| unsafe {
        seer_trainer_save_gate_dir(t.0, path, dtype, std::ptr::null())
    };
    check(save(std::ptr::null(), 2), SEER_NULL_POINTER, "save NULL dir", "dir");
    check(save(c"".as_ptr(), 2), SEER_INVALID_ARGUMENT, "save empty dir", "empty");
    check(save(c"\xff\xfe".as_ptr(), 2), SEER_INVALID_ARGUMENT, "save non-UTF-8 dir", "UTF-8");
    check(save(dir_c.as_ptr(), 1), SEER_UNSUPPORTED, "save f16", "SEER_DTYPE_F32");
    check(save(dir_c.as_ptr(), 7), SEER_INVALID_ARGUMENT, "save dtype 7", "dtype 7");
    check(
        unsafe { seer_trainer_save_gate_dir(t.0, dir_c.as_ptr(), 2, c"[1, 2]".as_ptr()) },
        SEER_INVALID_ARGUMENT,
        "base config not an object",
        "base config",
    );
    std::fs::write(dir.join("attn_gate_weights.pth"), b"x").unwrap();
    check(save(dir_c.as_ptr(), 2), SEER_INVALID_ARGUMENT, "save over a .pth", "attn_gate_weights.pth");
    std::fs::remove_file(dir.join("attn_gate_weights.pth")).unwrap();
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    check(save(c_path(&file).as_ptr(), 2), SEER_IO_ERROR, "save into a file", "");
    expect(save(dir_c.as_ptr(), 2), SEER_OK, "save");

    // Optimizer state files.
    let load = |path: &CString| unsafe { seer_trainer_load_optimizer_state(t.0, path.as_ptr()) };
    check(unsafe { seer_trainer_save_optimizer_state(t.0, std::ptr::null()) }, SEER_NULL_POINTER, "", "path");
    check(unsafe { seer_trainer_load_optimizer_state(t.0, std::ptr::null()) }, SEER_NULL_POINTER, "", "path");
    check(load(&c_path(&state_dir.join("missing"))), SEER_IO_ERROR, "load a missing state", "");
    check(load(&c_path(&dir.join("attn_gate_weights.safetensors"))), SEER_FORMAT_ERROR, "load a gate file", "");
    let other = random_trainer(&gate_config(2, 4, 2, 8, 6), 1, &params);
    expect(unsafe { seer_trainer_save_optimizer_state(other.0, state.as_ptr()) }, SEER_OK, "other shape's state");
    check(load(&state), SEER_FORMAT_ERROR, "load another shape's state", "");
    assert_eq!(get_step(&t), 2, "a refused load leaves the trainer as it was");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&state_dir).unwrap();
}

/// Four threads feeding one trainer at once lose nothing: the step sees
/// every sequence (the losses and gradient norm of a serial run, up to the
/// order of the f64 sums); and a destroy racing with calls is a clean
/// status: running calls finish, later ones are refused.
#[test]
fn threads_share_a_trainer_and_destroy_races_cleanly() {
    let _s = serial();
    let config = gate_config(1, 4, 2, 8, 8);
    let params = train_params(10);
    let data: Vec<Batch2> = (0..4).map(|i| Batch2::new(&[(130 + 20 * i, 130 + 20 * i)], 60 + i as u64)).collect();
    let shared = random_trainer(&config, 9, &params);
    let serial_run = random_trainer(&config, 9, &params);
    let raw = shared.0 as usize;
    std::thread::scope(|scope| {
        for x in &data {
            scope.spawn(move || {
                let t = std::mem::ManuallyDrop::new(Trainer(raw as *mut SeerTrainer));
                for _ in 0..3 {
                    expect(x.feed(&t, &feed_params(0, 0.0)), SEER_OK, "threaded feed");
                }
            });
        }
    });
    for x in &data {
        for _ in 0..3 {
            expect(x.feed(&serial_run, &feed_params(0, 0.0)), SEER_OK, "serial feed");
        }
    }
    let ((s1, a), (s2, b)) = (step(&shared), step(&serial_run));
    expect(s1, SEER_OK, "step");
    expect(s2, SEER_OK, "step");
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * y.abs();
    assert!(close(a.grad_norm, b.grad_norm), "{} vs {}", a.grad_norm, b.grad_norm);
    let (la, lb) = (losses(&shared, 1).1[0], losses(&serial_run, 1).1[0]);
    assert!(close(la, lb), "{la} vs {lb}");

    for round in 0..10 {
        let t = random_trainer(&config, 1, &params);
        let raw = t.0 as usize;
        std::mem::forget(t); // destroyed by hand below
        let destroyed = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for x in &data[..3] {
                let destroyed = &destroyed;
                scope.spawn(move || loop {
                    let after = destroyed.load(std::sync::atomic::Ordering::SeqCst);
                    let t = std::mem::ManuallyDrop::new(Trainer(raw as *mut SeerTrainer));
                    let status = x.feed(&t, &feed_params(0, 0.0));
                    assert!(matches!(status, SEER_OK | SEER_INVALID_ARGUMENT), "{status:?}: {}", message());
                    assert!(!(after && status == SEER_OK), "round {round}: a call after the destroy succeeded");
                    if status == SEER_INVALID_ARGUMENT {
                        assert!(message().contains("not a live handle"), "{}", message());
                        if after {
                            break;
                        }
                    }
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(2 * (round % 4)));
            unsafe { seer_trainer_destroy(raw as *mut SeerTrainer) };
            destroyed.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
}

// ------------------------------------------------- the GPU trainer, no GPU --

/// `SeerTrainFeedParams` of the first release ended before `cuda_stream`.
const FEED_PARAMS_V1: usize = std::mem::offset_of!(SeerTrainFeedParams, cuda_stream);

/// The feed params grew a `cuda_stream` (NULL by default): a caller of the
/// first release (a smaller `struct_size`) is still served, reading only
/// its bytes, a newer caller's larger struct too; sizes below the first
/// release are refused, naming both sizes, with the trainer unchanged.
#[test]
fn feed_params_of_the_first_release_are_still_read() {
    let _s = serial();
    assert_eq!(FEED_PARAMS_V1, 24, "the first release's SeerTrainFeedParams (64-bit platforms)");
    let p = feed_params(1, 0.3);
    assert_eq!(p.struct_size, std::mem::size_of::<SeerTrainFeedParams>());
    assert!(p.cuda_stream.is_null(), "the default stream is the legacy one");
    let config = gate_config(2, 4, 2, 8, 8);
    let params = train_params(10);
    let x = Batch2::new(&[(200, 200), (64, 130)], 31);
    let run = |p: *const SeerTrainFeedParams| {
        let t = random_trainer(&config, 4, &params);
        let [qn, kn, q, k] = x.descs();
        let status = unsafe { seer_trainer_accumulate(t.0, p, &x.nope.lens.batch(), &qn, &kn, &q, &k) };
        let msg = if status == SEER_OK { String::new() } else { message() };
        if status == SEER_OK {
            expect(step(&t).0, SEER_OK, "step");
        }
        // Bits: NaN (the layer not fed) equals itself.
        (status, msg, losses(&t, 2).1.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), get_step(&t))
    };
    let (status, _, current, _) = run(&p);
    expect(status, SEER_OK, "current struct_size");
    let fed = current.iter().map(|&b| f64::from_bits(b)).collect::<Vec<_>>();
    assert!(fed[1] > 0.0 && fed[0].is_nan(), "layer 1 was fed: {fed:?}");
    // A first-release struct in a buffer that ends there: nothing past it is read.
    let mut v1 = [0u64; FEED_PARAMS_V1 / 8];
    let old = SeerTrainFeedParams { struct_size: FEED_PARAMS_V1, ..p };
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&old as *const SeerTrainFeedParams).cast::<u8>(),
            v1.as_mut_ptr().cast(),
            FEED_PARAMS_V1,
        )
    };
    let (status, _, got, _) = run(v1.as_ptr().cast());
    expect(status, SEER_OK, "first-release struct_size");
    assert_eq!(got, current, "the first release's params train otherwise");
    // Between the releases (no header had it): read as the first release; a
    // bogus stream past the caller's size is not read (a host feed would
    // not use it either: the CUDA feed with it is in ffi_distill_cuda).
    let between = SeerTrainFeedParams { struct_size: FEED_PARAMS_V1 + 4, cuda_stream: 0x1 as *mut _, ..p };
    expect(run(&between).0, SEER_OK, "struct_size between the releases");
    // A newer caller's larger struct: this release's fields are read.
    #[repr(C)]
    struct Newer {
        p: SeerTrainFeedParams,
        appended: [u64; 4],
    }
    let newer = Newer { p: SeerTrainFeedParams { struct_size: std::mem::size_of::<Newer>(), ..p }, appended: [7; 4] };
    let (status, _, got, _) = run(&newer.p);
    expect(status, SEER_OK, "newer struct_size");
    assert_eq!(got, current);
    for size in [0, 4, 8, FEED_PARAMS_V1 - 8, FEED_PARAMS_V1 - 1] {
        let (status, msg, got, steps) = run(&SeerTrainFeedParams { struct_size: size, ..p });
        assert_eq!(status, SEER_INVALID_ARGUMENT, "struct_size {size}: {msg}");
        assert!(msg.contains("struct_size") && msg.contains(&FEED_PARAMS_V1.to_string()), "{msg}");
        assert!(got.iter().all(|&l| l == (-7.0f64).to_bits()) && steps == 0, "struct_size {size}: the trainer changed");
    }
}

/// Fake device addresses, 64 MiB apart: the CUDA descriptors of `x`'s four
/// tensors. Every check before the driver passes them; none is dereferenced.
fn fake_cuda(x: &Batch2) -> [SeerTensor; 4] {
    let mut d = x.descs();
    for (i, t) in d.iter_mut().enumerate() {
        t.device = 1;
        t.data = (0x7f00_0000_0000u64 + (i as u64) * (64 << 20)) as *mut std::ffi::c_void;
    }
    d
}

fn feed4(t: &Trainer, p: &SeerTrainFeedParams, x: &Batch2, d: &[SeerTensor; 4]) -> SeerStatus {
    unsafe { seer_trainer_accumulate(t.0, p, &x.nope.lens.batch(), &d[0], &d[1], &d[2], &d[3]) }
}

/// The first successful feed fixes a trainer's device, and only a
/// successful one: a CUDA feed refused for want of a GPU (`SEER_NO_DEVICE`,
/// or `SEER_UNSUPPORTED` in a build without kernels, as every CUDA call of
/// the C API without a GPU) or a refused host feed leaves it undecided; once
/// host tensors were fed, CUDA tensors are refused for it.
#[test]
fn the_first_successful_feed_fixes_the_device() {
    if seerattn::cuda::driver().is_ok() {
        return; // a GPU machine: ffi_distill_cuda covers CUDA feeds there
    }
    let _s = serial();
    let no_gpu = if seerattn::cuda::cuda_enabled() { SEER_NO_DEVICE } else { SEER_UNSUPPORTED };
    let config = gate_config(1, 4, 2, 64, 64); // the released type at head_dim 64: the GPU trainer's
    let params = train_params(10);
    let x = Batch2::with_dim(&[(130, 130)], 64, 41);
    let (host, cuda) = (x.descs(), fake_cuda(&x));
    let ok = feed_params(0, 0.0);

    // A CUDA feed without a GPU: a clean status, twice (the driver's absence is remembered).
    let t = random_trainer(&config, 2, &params);
    for _ in 0..2 {
        let msg = expect(feed4(&t, &ok, &x, &cuda), no_gpu, "CUDA feed without a GPU");
        assert!(msg.starts_with("seer_trainer_accumulate: "), "{msg}");
    }
    // Host-side checks of CUDA descriptors come first, with their own statuses.
    let mut bad = cuda;
    bad[2].strides[0] = -1;
    expect(feed4(&t, &ok, &x, &bad), SEER_INVALID_ARGUMENT, "CUDA q with a negative stride");
    let mut bad = cuda;
    bad[1].data = std::ptr::null_mut();
    let msg = expect(feed4(&t, &ok, &x, &bad), SEER_NULL_POINTER, "CUDA k_nope with NULL data");
    assert!(msg.contains("k_nope->data"), "{msg}");
    // Still undecided: host tensors train, and then fix the device.
    expect(feed4(&t, &ok, &x, &host), SEER_OK, "host feed after the refused CUDA feeds");
    let msg = expect(feed4(&t, &ok, &x, &cuda), SEER_INVALID_ARGUMENT, "CUDA feed of a CPU trainer");
    assert!(msg.contains("trains on the CPU (SEER_DEVICE_CPU) since its first feed"), "{msg}");
    expect(step(&t).0, SEER_OK, "step");
    assert_eq!(losses(&t, 1).2, 1);
    let msg = expect(feed4(&t, &ok, &x, &cuda), SEER_INVALID_ARGUMENT, "CUDA feed after a step");
    assert!(msg.contains("since its first feed"), "{msg}");

    // Refused host feeds fix nothing: a CUDA feed afterwards looks for the GPU.
    let u = random_trainer(&config, 2, &params);
    expect(feed4(&u, &feed_params(3, 0.0), &x, &host), SEER_INVALID_ARGUMENT, "host feed of layer 3");
    let other = Lens::new(&[(130, 131)]);
    let [qn, kn, q, k] = host;
    let status = unsafe { seer_trainer_accumulate(u.0, &ok, &other.batch(), &qn, &kn, &q, &k) };
    expect(status, SEER_INVALID_ARGUMENT, "host feed of a batch its tensors do not match");
    expect(feed4(&u, &ok, &x, &cuda), no_gpu, "CUDA feed after refused host feeds");
    // A state loaded before the first feed stays with the undecided trainer.
    let dir = temp_dir("undecided-state");
    let state = c_path(&dir.join("state.safetensors"));
    expect(unsafe { seer_trainer_save_optimizer_state(t.0, state.as_ptr()) }, SEER_OK, "save a stepped state");
    expect(unsafe { seer_trainer_load_optimizer_state(u.0, state.as_ptr()) }, SEER_OK, "load before any feed");
    assert_eq!(get_step(&u), 1);
    expect(feed4(&u, &ok, &x, &cuda), no_gpu, "CUDA feed after loading a state");
    assert_eq!(get_step(&u), 1, "the refused CUDA feed kept the loaded state");
    expect(feed4(&u, &ok, &x, &host), SEER_OK, "host feed with the loaded state");
    let (status, report) = step(&u);
    expect(status, SEER_OK, "step");
    assert_eq!(report.step, 2, "the step count continues the loaded state's");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A gate the GPU trainer does not take, fed CUDA tensors: `SEER_UNSUPPORTED`
/// with the reason, before any device is looked for; the trainer stays
/// undecided and trains on host tensors.
#[test]
fn a_gate_the_gpu_cannot_train_is_refused_on_cuda_and_trains_on_the_host() {
    let _s = serial();
    let params = train_params(10);
    let x = Batch2::with_dim(&[(150, 150)], 64, 43);
    let ok = feed_params(0, 0.0);
    // gate_hidden 32 < head_dim 64: a Q projection.
    let t = random_trainer(&gate_config(1, 4, 2, 64, 32), 3, &params);
    for _ in 0..2 {
        let msg = expect(feed4(&t, &ok, &x, &fake_cuda(&x)), SEER_UNSUPPORTED, "CUDA feed of a Q-projection gate");
        assert!(msg.contains("without a Q projection") && msg.contains("gate_hidden 32"), "{msg}");
    }
    expect(feed4(&t, &ok, &x, &x.descs()), SEER_OK, "host feed after it");
    expect(step(&t).0, SEER_OK, "step");
    assert!(losses(&t, 1).1[0] > 0.0);
}
