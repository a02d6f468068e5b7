//! The C API on the CPU path, called as a C caller would: threads sharing
//! handles (README "Thread safety"), destroy racing with use, numerical
//! edge cases, and rows of the bad-input table (docs/bad-inputs.md) that
//! examples-c/api_errors.c does not check.

mod common;
use common::capi::*;
use seerattn::ffi::args::{SeerBatch, SeerBlockMask, SeerTensor};
use seerattn::ffi::attention::{seer_prefill_params_default, seer_sparse_prefill, SeerPrefillParams};
use seerattn::ffi::cuda::seer_cuda_device_info;
use seerattn::ffi::gate::*;
use seerattn::ffi::mask::{
    seer_mask_from_dense, seer_mask_sizes, seer_mask_to_dense, seer_prefill_workspace_size,
    seer_prefill_workspace_size_dtype, SeerMaskSizes,
};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};

/// Tests that create gates run one at a time, so that a destroyed handle's
/// address is not given to another test's new gate while a test checks
/// that using it fails.
static GATES: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    GATES.lock().unwrap_or_else(|p| p.into_inner())
}

// ---- threads ----

/// Eight threads sharing one gate handle compute the masks and prefill
/// outputs of a serial run, bit for bit, several times each.
#[test]
fn eight_threads_on_one_handle_match_a_serial_run() {
    let _s = serial();
    let gate = Gate::bundled();
    let params = Shared(gate.params(1));
    let inputs = Inputs::random(&[(130, 130), (40, 200)], 8, 2, 128, 1.0, 7);
    let (status, mut mask) = inputs.mask(gate.0, params.get());
    expect(status, SEER_OK, "serial mask");
    let (status, out, lse) = inputs.prefill(&mut mask, 0.0);
    expect(status, SEER_OK, "serial prefill");
    let barrier = Barrier::new(8);
    std::thread::scope(|scope| {
        for t in 0..8 {
            let (gate, inputs, barrier) = (&gate, &inputs, &barrier);
            let (mask, out, lse) = (&mask, &out, &lse);
            scope.spawn(move || {
                barrier.wait();
                for i in 0..2 {
                    let (status, mut m) = inputs.mask(gate.0, params.get());
                    expect(status, SEER_OK, "threaded mask");
                    assert_eq!(m, *mask, "thread {t}, round {i}: mask differs from the serial run");
                    let (status, o, l) = inputs.prefill(&mut m, 0.0);
                    expect(status, SEER_OK, "threaded prefill");
                    assert!(o.iter().zip(out).all(|(a, b)| a.to_bits() == b.to_bits()), "thread {t}: output differs");
                    assert!(l.iter().zip(lse).all(|(a, b)| a.to_bits() == b.to_bits()), "thread {t}: lse differs");
                }
            });
        }
    });
}

/// A weightless-then-filled small gate, through the C API.
fn small_gate(seed: u64) -> Gate {
    let c = gate_config(1, 2, 1, 64, 64);
    let mut g = std::ptr::null_mut();
    expect(unsafe { seer_gate_create(&c, &mut g) }, SEER_OK, "seer_gate_create");
    let gate = Gate(g);
    let mut rng = common::Rng(seed);
    let w = bf16_bits(&(0..2 * 192 * 64).map(|_| rng.uniform(-0.1, 0.1)).collect::<Vec<_>>());
    let desc = host_tensor(w.as_ptr(), BF16, [2, 192, 64]);
    expect(unsafe { seer_gate_set_layer_weights(gate.0, 0, &desc, std::ptr::null()) }, SEER_OK, "set weights");
    gate
}

/// Sixteen threads each create, use and destroy their own handles, 40
/// times over: every call succeeds and computes the mask a gate of the same
/// weights computes alone.
#[test]
fn handles_created_and_destroyed_from_many_threads() {
    let _s = serial();
    let inputs = Inputs::random(&[(130, 130)], 2, 1, 64, 1.0, 3);
    let reference = {
        let gate = small_gate(11);
        let (status, mask) = inputs.mask(gate.0, &gate.params(0));
        expect(status, SEER_OK, "reference mask");
        mask
    };
    std::thread::scope(|scope| {
        for _ in 0..16 {
            scope.spawn(|| {
                for _ in 0..40 {
                    let gate = small_gate(11);
                    assert_eq!(gate.config().num_q_heads, 2);
                    let (status, mask) = inputs.mask(gate.0, &gate.params(0));
                    expect(status, SEER_OK, "mask");
                    assert_eq!(mask.rows(), reference.rows());
                    drop(gate);
                }
            });
        }
    });
}

/// `seer_gate_destroy` on one thread while eight others keep calling with
/// the same handle: each call either runs to completion on the live gate
/// (with the serial result) or fails with `SEER_INVALID_ARGUMENT`, and
/// every call that starts after the destroy returned fails.
#[test]
fn destroy_racing_with_use_is_a_clean_status() {
    let _s = serial();
    let inputs = Inputs::random(&[(130, 130)], 2, 1, 64, 1.0, 5);
    for round in 0..20 {
        let gate = small_gate(13);
        let params = Shared(gate.params(0));
        let (status, serial_mask) = inputs.mask(gate.0, params.get());
        expect(status, SEER_OK, "serial");
        let raw = gate.0 as usize;
        std::mem::forget(gate); // destroyed by hand below
        let destroyed = AtomicBool::new(false);
        let (ok, refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let barrier = Barrier::new(9);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    barrier.wait();
                    loop {
                        let after = destroyed.load(Ordering::SeqCst);
                        let p = raw as *mut SeerGate;
                        let (status, mask) = inputs.mask(p, params.get());
                        let mut cfg = MaybeUninit::<SeerGateConfig>::zeroed();
                        unsafe { (*cfg.as_mut_ptr()).struct_size = std::mem::size_of::<SeerGateConfig>() };
                        let cfg_status = unsafe { seer_gate_get_config(p, cfg.as_mut_ptr()) };
                        for s in [status, cfg_status] {
                            assert!(matches!(s, SEER_OK | SEER_INVALID_ARGUMENT), "{s:?}: {}", message());
                            assert!(!(after && s == SEER_OK), "a call after the destroy succeeded");
                        }
                        if status == SEER_OK {
                            assert_eq!(mask, serial_mask, "a call racing the destroy computed another mask");
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            assert!(message().contains("not a live handle"), "{}", message());
                            refused.fetch_add(1, Ordering::Relaxed);
                            if after {
                                break;
                            }
                        }
                    }
                });
            }
            barrier.wait();
            std::thread::sleep(std::time::Duration::from_micros(200 * (round % 5)));
            unsafe { seer_gate_destroy(raw as *mut SeerGate) };
            destroyed.store(true, Ordering::SeqCst);
        });
        assert!(refused.load(Ordering::Relaxed) >= 8, "round {round}: every thread ends refused");
        // Destroying again is ignored, with a message.
        unsafe { seer_gate_destroy(raw as *mut SeerGate) };
        assert!(message().contains("not a live handle"));
    }
}

/// Weights set on one thread while others compute masks: every mask is the
/// one of the old weights or of the new ones, never a mixture or an error.
#[test]
fn set_layer_weights_beside_running_masks() {
    let _s = serial();
    let inputs = Inputs::random(&[(190, 190)], 2, 1, 64, 1.0, 9);
    // Top-k of part of each row, no dense rows: the weights decide the mask.
    let rule = |g: &Gate| {
        let mut p = g.params(0);
        (p.sparsity_method, p.nz_ratio, p.last_block_dense) = (1, 0.6, 0);
        p
    };
    let (old, new) = {
        let (a, b) = (small_gate(21), small_gate(22));
        (inputs.mask(a.0, &rule(&a)).1, inputs.mask(b.0, &rule(&b)).1)
    };
    assert_ne!(old.rows(), new.rows(), "the two weight sets must give different masks");
    let gate = &small_gate(21);
    let params = Shared(rule(gate));
    let mut rng = common::Rng(22);
    let w = bf16_bits(&(0..2 * 192 * 64).map(|_| rng.uniform(-0.1, 0.1)).collect::<Vec<_>>());
    let desc = host_tensor(w.as_ptr(), BF16, [2, 192, 64]);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    let (status, m) = inputs.mask(gate.0, params.get());
                    expect(status, SEER_OK, "mask beside set_layer_weights");
                    assert!(m.rows() == old.rows() || m.rows() == new.rows(), "a mask of mixed weights");
                }
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        expect(unsafe { seer_gate_set_layer_weights(gate.0, 0, &desc, std::ptr::null()) }, SEER_OK, "set weights");
        std::thread::sleep(std::time::Duration::from_millis(5));
        done.store(true, Ordering::SeqCst);
    });
    assert_eq!(inputs.mask(gate.0, params.get()).1.rows(), new.rows());
}

// ---- numerical edge cases ----

/// Every value finite, LSE finite or -inf (an empty row).
fn assert_defined(what: &str, out: &[f32], lse: &[f32]) {
    assert!(out.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    assert!(lse.iter().all(|x| x.is_finite() || *x == f32::NEG_INFINITY), "{what}: NaN or +inf LSE");
}

/// Every output element lies between the smallest and largest value of its
/// sequence's V for its KV head and dimension (attention averages V).
fn assert_convex(what: &str, inputs: &Inputs, seqs: &[(usize, usize)], out: &[f32]) {
    let (hq, hkv, d) = (inputs.hq, inputs.hkv, inputs.d);
    let v = |t: usize, h: usize, x: usize| half::bf16::from_bits(inputs.v[(t * hkv + h) * d + x]).to_f32();
    let (mut q0, mut k0) = (0, 0);
    for &(lq, lk) in seqs {
        for h in 0..hq {
            let kv = h / (hq / hkv);
            for x in 0..d {
                let vals = (k0..k0 + lk).map(|t| v(t, kv, x));
                let (lo, hi) = vals.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
                let slack = 1e-5 * lo.abs().max(hi.abs());
                for t in q0..q0 + lq {
                    let o = out[(t * hq + h) * d + x];
                    assert!(o >= lo - slack && o <= hi + slack, "{what}: out {o} outside [{lo}, {hi}]");
                }
            }
        }
        (q0, k0) = (q0 + lq, k0 + lk);
    }
}

/// Inputs scaled by 1e-4, 1e4 and 1e15 (where q·k of 128 dimensions nears
/// the top of the f32 range) give valid masks and finite attention that
/// averages V. Past that (1e19, bf16's largest 3e38) the scores overflow
/// f32: the mask is still valid (the default keeps the diagonal of rows
/// whose probabilities are NaN), attention is outside the supported range
/// (README "Numerics").
#[test]
fn huge_and_tiny_inputs_give_defined_masks_and_outputs() {
    let _s = serial();
    let gate = Gate::bundled();
    let seqs = [(100, 100), (1, 90)];
    for scale in [1e-4f32, 1.0, 1e4, 1e15, 1e19, 3e38] {
        let inputs = Inputs::random(&seqs, 8, 2, 128, scale, 17);
        for method in [0u32, 1] {
            let mut params = gate.params(1);
            params.sparsity_method = method;
            let (status, mut mask) = inputs.mask(gate.0, &params);
            expect(status, SEER_OK, &format!("mask at scale {scale}"));
            assert!(
                mask.rows().iter().all(|r| !r.is_empty()),
                "scale {scale}: an empty row (diagonal kept by default)"
            );
            if scale > 1e15 {
                continue;
            }
            let (status, out, lse) = inputs.prefill(&mut mask, 0.0);
            expect(status, SEER_OK, &format!("prefill at scale {scale}"));
            let what = format!("scale {scale}, method {method}");
            assert_defined(&what, &out, &lse);
            assert_convex(&what, &inputs, &seqs, &out);
        }
    }
}

/// Threshold 0 keeps every block with a non-zero probability, threshold 1
/// keeps none (the diagonal by default, nothing with SEER_EMPTY_ROWS_EMPTY,
/// and then attention writes zeros and LSE -inf); top-k larger than a row
/// keeps the whole row.
#[test]
fn threshold_zero_and_one_and_top_k_past_the_row() {
    let _s = serial();
    let gate = Gate::bundled();
    let inputs = Inputs::random(&[(300, 300), (64, 200)], 8, 2, 128, 1.0, 19);
    let mut p = gate.params(0);
    p.last_block_dense = 0;
    let causal = |mask: &HostMask, r: usize| mask.offsets[r + 1] - mask.offsets[r];

    p.threshold = 0.0;
    let (status, all) = inputs.mask(gate.0, &p);
    expect(status, SEER_OK, "threshold 0");
    for r in 0..all.counts.len() {
        assert_eq!(all.counts[r] as i64, causal(&all, r), "threshold 0 keeps all of row {r} (probabilities > 0)");
    }

    p.threshold = 1.0;
    let (status, mut diag) = inputs.mask(gate.0, &p);
    expect(status, SEER_OK, "threshold 1");
    for r in 0..diag.counts.len() {
        assert_eq!(diag.row(r), [causal(&diag, r) as i32 - 1], "threshold 1 keeps only the diagonal of row {r}");
    }
    let (status, out, lse) = inputs.prefill(&mut diag, 0.0);
    expect(status, SEER_OK, "prefill, diagonal only");
    assert_defined("diagonal only", &out, &lse);

    p.empty_rows = SeerEmptyRows::SEER_EMPTY_ROWS_EMPTY as u32;
    let (status, mut empty) = inputs.mask(gate.0, &p);
    expect(status, SEER_OK, "threshold 1, empty rows");
    assert!(empty.counts.iter().all(|&c| c == 0), "threshold 1 selects nothing");
    let (status, out, lse) = inputs.prefill(&mut empty, 0.0);
    expect(status, SEER_OK, "prefill of all-empty rows");
    assert!(out.iter().all(|&x| x == 0.0), "an empty row writes zeros");
    assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY), "an empty row has LSE -inf");

    p.sparsity_method = SeerSparsityMethod::SEER_SPARSITY_NZ_RATIO as u32;
    p.nz_ratio = 1.0; // top-k = k_blocks: past every row but the last
    let (status, topk) = inputs.mask(gate.0, &p);
    expect(status, SEER_OK, "top-k past the row");
    assert_eq!(topk, all, "top-k with k >= the row keeps every causal block");
}

/// Sequences of one token: the gate's one-block mask, and attention over a
/// single key returns that key's value exactly (LSE = its scaled score).
#[test]
fn one_token_sequences() {
    let _s = serial();
    let gate = Gate::bundled();
    let inputs = Inputs::random(&[(1, 1), (1, 1), (1, 65)], 8, 2, 128, 1.0, 23);
    let (status, mut mask) = inputs.mask(gate.0, &gate.params(0));
    expect(status, SEER_OK, "mask");
    assert_eq!(mask.counts.len(), 8 * 3, "one query-block row per head and sequence");
    for h in 0..8 {
        assert_eq!(mask.row(h), [0], "a one-token sequence selects its only block");
    }
    let (status, out, lse) = inputs.prefill(&mut mask, 0.0);
    expect(status, SEER_OK, "prefill");
    assert_defined("one token", &out, &lse);
    let bf = |b: u16| half::bf16::from_bits(b).to_f32();
    for s in 0..2 {
        for h in 0..8 {
            let kv = h / 4;
            for x in 0..128 {
                let want = bf(inputs.v[(s * 2 + kv) * 128 + x]);
                assert_eq!(out[(s * 8 + h) * 128 + x], want, "sequence {s}, head {h}: output = v of its one key");
            }
            let score: f32 =
                (0..128).map(|x| bf(inputs.q[(s * 8 + h) * 128 + x]) * bf(inputs.k[(s * 2 + kv) * 128 + x])).sum();
            let want = score / 128f32.sqrt();
            assert!((lse[h * 3 + s] - want).abs() <= 1e-4 * want.abs().max(1.0), "lse {} vs {want}", lse[h * 3 + s]);
        }
    }
}

// ---- bad inputs (docs/bad-inputs.md rows that api_errors.c does not check) ----

fn prefill_params() -> SeerPrefillParams {
    let mut p = MaybeUninit::<SeerPrefillParams>::uninit();
    expect(unsafe { seer_prefill_params_default(p.as_mut_ptr()) }, SEER_OK, "prefill_params_default");
    unsafe { p.assume_init() }
}

#[test]
fn null_pointers_of_every_entry_point() {
    let _s = serial();
    let gate = Gate::bundled();
    let inputs = Inputs::random(&[(70, 70)], 8, 2, 128, 1.0, 29);
    let batch = inputs.lens.batch();
    let s = sizes(&batch, 8);
    let mut mask = HostMask::new(&s);
    let m = mask.desc();
    let (q, k) = (inputs.q_desc(), inputs.k_desc());
    let p = gate.params(0);
    let null = std::ptr::null_mut();
    unsafe {
        let mut ms = MaybeUninit::<SeerMaskSizes>::zeroed();
        expect(seer_mask_sizes(std::ptr::null(), 8, 64, ms.as_mut_ptr()), SEER_NULL_POINTER, "mask_sizes batch");
        expect(seer_mask_sizes(&batch, 8, 64, null), SEER_NULL_POINTER, "mask_sizes out");
        let nq = SeerBatch { cu_seqlens_q: std::ptr::null(), ..batch };
        expect(seer_mask_sizes(&nq, 8, 64, ms.as_mut_ptr()), SEER_NULL_POINTER, "mask_sizes cu_seqlens_q");
        let nk = SeerBatch { cu_seqlens_k: std::ptr::null(), ..batch };
        expect(seer_mask_sizes(&nk, 8, 64, ms.as_mut_ptr()), SEER_NULL_POINTER, "mask_sizes cu_seqlens_k");
        expect(seer_gate_compute_mask(gate.0, std::ptr::null(), &batch, &q, &k, &m), SEER_NULL_POINTER, "params");
        expect(seer_gate_compute_mask(gate.0, &p, std::ptr::null(), &q, &k, &m), SEER_NULL_POINTER, "batch");
        expect(seer_gate_compute_mask(gate.0, &p, &batch, &q, std::ptr::null(), &m), SEER_NULL_POINTER, "k_nope");
        expect(seer_gate_compute_mask(gate.0, &p, &batch, &q, &k, std::ptr::null()), SEER_NULL_POINTER, "out_mask");
        let nd = SeerTensor { data: null.cast(), ..q };
        expect(seer_gate_compute_mask(gate.0, &p, &batch, &nd, &k, &m), SEER_NULL_POINTER, "q_nope->data");
        let mut nm = m;
        nm.indices = null.cast();
        expect(seer_gate_compute_mask(gate.0, &p, &batch, &q, &k, &nm), SEER_NULL_POINTER, "mask->indices");
        let pp = prefill_params();
        let (v, o) = (inputs.v_desc(), inputs.q_desc());
        let none = std::ptr::null_mut();
        let pf = |p: *const SeerPrefillParams, b: *const SeerBatch, q: *const SeerTensor, k: *const SeerTensor| {
            seer_sparse_prefill(p, b, q, k, &v, &m, &o, none, 0)
        };
        expect(pf(std::ptr::null(), &batch, &q, &k), SEER_NULL_POINTER, "prefill: NULL params");
        expect(pf(&pp, std::ptr::null(), &q, &k), SEER_NULL_POINTER, "prefill: NULL batch");
        expect(pf(&pp, &batch, std::ptr::null(), &k), SEER_NULL_POINTER, "prefill: NULL q");
        expect(pf(&pp, &batch, &q, std::ptr::null()), SEER_NULL_POINTER, "prefill: NULL k");
        expect(seer_sparse_prefill(&pp, &batch, &q, &k, &v, std::ptr::null(), &o, none, 0), SEER_NULL_POINTER, "mask");
        expect(
            seer_sparse_prefill(&pp, &batch, &q, &k, &v, &m, std::ptr::null(), null.cast(), 0),
            SEER_NULL_POINTER,
            "prefill out",
        );
        let mut bytes = 7usize;
        expect(seer_prefill_workspace_size(&batch, 8, 128, 0, null.cast()), SEER_NULL_POINTER, "workspace out");
        expect(seer_gate_workspace_size(gate.0, &batch, 0, null.cast()), SEER_NULL_POINTER, "gate workspace out");
        expect(seer_gate_workspace_size(gate.0, std::ptr::null(), 0, &mut bytes), SEER_NULL_POINTER, "gate ws batch");
        let dense = vec![0u8; s.dense_bytes];
        expect(seer_mask_from_dense(&batch, 8, 64, std::ptr::null(), s.dense_bytes, &m), SEER_NULL_POINTER, "dense");
        expect(
            seer_mask_from_dense(&batch, 8, 64, dense.as_ptr(), s.dense_bytes, std::ptr::null()),
            SEER_NULL_POINTER,
            "from_dense mask",
        );
        expect(seer_mask_to_dense(&batch, 8, 64, &m, null.cast(), s.dense_bytes), SEER_NULL_POINTER, "to_dense out");
        expect(seer_gate_config_default(null.cast()), SEER_NULL_POINTER, "config_default");
        expect(seer_mask_params_default(gate.0, null.cast()), SEER_NULL_POINTER, "mask_params_default");
        expect(seer_prefill_params_default(null.cast()), SEER_NULL_POINTER, "prefill_params_default");
        expect(seer_gate_create(std::ptr::null(), null.cast()), SEER_NULL_POINTER, "create config");
        let c = gate.config();
        expect(seer_gate_create(&c, null.cast()), SEER_NULL_POINTER, "create out");
        expect(seer_gate_get_config(gate.0, null.cast()), SEER_NULL_POINTER, "get_config out");
        let mut mp = MaybeUninit::<SeerMaskParams>::uninit();
        expect(seer_mask_params_default(std::ptr::null(), mp.as_mut_ptr()), SEER_NULL_POINTER, "params_default gate");
        // The out-pointers are checked before the driver is looked for.
        let mut cc = 0i32;
        expect(seer_cuda_device_info(null.cast(), &mut cc), SEER_NULL_POINTER, "device_info capability");
        expect(seer_cuda_device_info(&mut cc, null.cast()), SEER_NULL_POINTER, "device_info SMs");
        assert_eq!(seer_gate_has_layer(std::ptr::null(), 0), 0);
        expect(seer_kblock_cache_update(gate.0, &p, &batch, &k, std::ptr::null(), 1), SEER_NULL_POINTER, "caches");
        let _ = mask.counts.len();
    }
}

#[test]
fn sizes_lengths_and_struct_sizes() {
    let _s = serial();
    let gate = Gate::bundled();
    let inputs = Inputs::random(&[(100, 100), (50, 130)], 8, 2, 128, 1.0, 31);
    let batch = inputs.lens.batch();
    let s = sizes(&batch, 8);
    let (q, k) = (inputs.q_desc(), inputs.k_desc());
    unsafe {
        // Output sizes: too small is BUFFER_TOO_SMALL; larger counts/offsets are refused as wrong.
        let params = gate.params(0);
        let compute = |m: &SeerBlockMask| seer_gate_compute_mask(gate.0, &params, &batch, &q, &k, m);
        let mut mask = HostMask::new(&s);
        let mut m = mask.desc();
        m.counts_len -= 1;
        expect(compute(&m), SEER_BUFFER_TOO_SMALL, "counts short");
        m.counts_len += 2;
        mask.counts.push(0);
        m.counts = mask.counts.as_mut_ptr();
        expect(compute(&m), SEER_INVALID_ARGUMENT, "counts long");
        mask.counts.pop();
        let mut m = mask.desc();
        m.row_offsets_len -= 1;
        expect(compute(&m), SEER_BUFFER_TOO_SMALL, "offsets short");
        // Lengths that overflow the address space.
        let mut m = mask.desc();
        m.indices_len = usize::MAX / 2;
        expect(
            seer_gate_compute_mask(gate.0, &gate.params(0), &batch, &q, &k, &m),
            SEER_INVALID_ARGUMENT,
            "indices_len overflows",
        );
        let pp = prefill_params();
        let (v, o) = (inputs.v_desc(), inputs.q_desc());
        let mut lse = vec![0f32; 4];
        let mut out = vec![0f32; inputs.q.len()];
        let of = host_tensor(out.as_mut_ptr(), F32, [150, 8, 128]);
        let m = mask.desc();
        expect(
            seer_sparse_prefill(&pp, &batch, &q, &k, &v, &m, &of, lse.as_mut_ptr(), usize::MAX),
            SEER_INVALID_ARGUMENT,
            "lse_len overflows",
        );
        let _ = o;
        // Struct sizes: below the first release refused, larger accepted (fields past ours unread).
        let mut small = gate.params(0);
        small.struct_size = std::mem::size_of::<usize>();
        let m = mask.desc();
        expect(
            seer_gate_compute_mask(gate.0, &small, &batch, &q, &k, &m),
            SEER_INVALID_ARGUMENT,
            "mask params struct_size 8",
        );
        let mut pp2 = pp;
        pp2.struct_size = 4;
        expect(
            seer_sparse_prefill(&pp2, &batch, &q, &k, &v, &m, &of, std::ptr::null_mut(), 0),
            SEER_INVALID_ARGUMENT,
            "prefill struct_size 4",
        );
        let mut ms = MaybeUninit::<SeerMaskSizes>::zeroed();
        (*ms.as_mut_ptr()).struct_size = 8;
        expect(seer_mask_sizes(&batch, 8, 64, ms.as_mut_ptr()), SEER_INVALID_ARGUMENT, "mask sizes struct_size 8");
        assert_eq!((*ms.as_ptr()).rows, 0, "out untouched on failure");
        // Zero heads / head_dim, an unknown device.
        expect(seer_mask_sizes(&batch, 0, 64, ms.as_mut_ptr()), SEER_INVALID_ARGUMENT, "0 heads");
        let mut bytes = 5usize;
        expect(seer_prefill_workspace_size(&batch, 8, 0, 0, &mut bytes), SEER_INVALID_ARGUMENT, "head_dim 0");
        expect(seer_prefill_workspace_size(&batch, 8, 128, 9, &mut bytes), SEER_INVALID_ARGUMENT, "device 9");
        assert_eq!(bytes, 5);
    }
}

#[test]
fn batches_past_32_bit_offsets_and_bad_lengths() {
    let _s = serial();
    let mut ms = MaybeUninit::<SeerMaskSizes>::zeroed();
    unsafe { (*ms.as_mut_ptr()).struct_size = std::mem::size_of::<SeerMaskSizes>() };
    let call = |q: &[i32], k: &[i32], ms: &mut MaybeUninit<SeerMaskSizes>| unsafe {
        let b = SeerBatch { num_seqs: q.len() as u32 - 1, cu_seqlens_q: q.as_ptr(), cu_seqlens_k: k.as_ptr() };
        seer_mask_sizes(&b, 8, 64, ms.as_mut_ptr())
    };
    // One sequence of 2^31 - 1 keys: sizes only (no buffers), in 64-bit.
    expect(call(&[0, 1], &[0, i32::MAX], &mut ms), SEER_OK, "k_len 2^31 - 1");
    let s = unsafe { ms.assume_init() };
    let blocks = (i32::MAX as usize).div_ceil(64);
    assert_eq!(s.rows, 8, "one query block row per head");
    assert_eq!(s.indices_len, 8 * blocks, "the last row's causal length per head");
    // Totals past i32: cu_seqlens are int32, so a decreasing (wrapped) entry is refused.
    expect(call(&[0, 1, 2], &[0, i32::MAX, i32::MIN], &mut ms), SEER_INVALID_ARGUMENT, "total past 2^31");
    expect(call(&[0, -1], &[0, 5], &mut ms), SEER_INVALID_ARGUMENT, "negative length");
    expect(call(&[1, 2], &[0, 5], &mut ms), SEER_INVALID_ARGUMENT, "cu_seqlens[0] != 0");
    expect(call(&[0, 5, 3], &[0, 5, 9], &mut ms), SEER_INVALID_ARGUMENT, "decreasing");
    // A mask of such a batch would need 2^31-token tensors: the descriptor's
    // span is checked against the address space, not trusted.
    let gate = Gate::bundled();
    let (q, k) = ([0i32, 1], [0i32, i32::MAX]);
    let b = SeerBatch { num_seqs: 1, cu_seqlens_q: q.as_ptr(), cu_seqlens_k: k.as_ptr() };
    let small = [0u16; 16];
    let mut t = host_tensor(small.as_ptr(), BF16, [1, 8, 128]);
    t.strides = [i64::MAX / 4, 128, 1];
    let mut mask = HostMask::new(&s);
    let m = mask.desc();
    let st = unsafe { seer_gate_compute_mask(gate.0, &gate.params(0), &b, &t, &t, &m) };
    expect(st, SEER_INVALID_ARGUMENT, "strides past the address space");
}

#[test]
fn strides_overlapping_outputs_and_unsupported_geometry() {
    let _s = serial();
    let inputs = Inputs::random(&[(64, 64)], 8, 2, 128, 1.0, 37);
    let gate = Gate::bundled();
    let batch = inputs.lens.batch();
    let (status, mut mask) = inputs.mask(gate.0, &gate.params(0));
    expect(status, SEER_OK, "mask");
    let (q, k, v) = (inputs.q_desc(), inputs.k_desc(), inputs.v_desc());
    let pp = prefill_params();
    let m = mask.desc();
    let mut out = vec![0f32; inputs.q.len()];
    unsafe {
        // An output whose strides make elements overlap (heads on top of each other).
        let mut o = host_tensor(out.as_mut_ptr(), F32, [64, 8, 128]);
        o.strides = [128, 0, 1];
        expect(
            seer_sparse_prefill(&pp, &batch, &q, &k, &v, &m, &o, std::ptr::null_mut(), 0),
            SEER_INVALID_ARGUMENT,
            "overlapping out strides",
        );
        // Inputs may overlap each other (read-only): k and v the same buffer.
        let o = host_tensor(out.as_mut_ptr(), F32, [64, 8, 128]);
        expect(seer_sparse_prefill(&pp, &batch, &q, &k, &k, &m, &o, std::ptr::null_mut(), 0), SEER_OK, "k and v alias");
        // The LSE overlapping the output, the mask overlapping the output.
        let o = host_tensor(out.as_mut_ptr(), F32, [64, 8, 128]);
        expect(
            seer_sparse_prefill(&pp, &batch, &q, &k, &v, &m, &o, out.as_mut_ptr().add(8), 64 * 8),
            SEER_INVALID_ARGUMENT,
            "lse inside out",
        );
        let mut m2 = m;
        m2.counts = out.as_mut_ptr().cast();
        expect(
            seer_sparse_prefill(&pp, &batch, &q, &k, &v, &m2, &o, std::ptr::null_mut(), 0),
            SEER_INVALID_ARGUMENT,
            "mask inside out",
        );
        // Unsupported: f32 keys and values (an f32 q is taken, rounded to
        // the keys' dtype: f32_q_and_gate_inputs_are_rounded_to_16_bits),
        // block size 32 and 128 in the params. A q of the other 16-bit type
        // than k is invalid.
        let f32q = vec![0f32; inputs.q.len()];
        let f32kv = vec![0f32; inputs.k.len()];
        let fq = host_tensor(f32q.as_ptr(), F32, [64, 8, 128]);
        let fkv = host_tensor(f32kv.as_ptr(), F32, [64, 2, 128]);
        expect(
            seer_sparse_prefill(&pp, &batch, &fq, &fkv, &fkv, &m, &o, std::ptr::null_mut(), 0),
            SEER_UNSUPPORTED,
            "f32 q, k and v",
        );
        let hq16 = host_tensor(inputs.q.as_ptr(), F16, [64, 8, 128]);
        expect(
            seer_sparse_prefill(&pp, &batch, &hq16, &k, &v, &m, &o, std::ptr::null_mut(), 0),
            SEER_INVALID_ARGUMENT,
            "f16 q with bf16 k",
        );
        for block in [32u32, 128] {
            let p = SeerPrefillParams { block_size: block, ..pp };
            expect(
                seer_sparse_prefill(&p, &batch, &q, &k, &v, &m, &o, std::ptr::null_mut(), 0),
                SEER_UNSUPPORTED,
                "block size",
            );
        }
        let p = SeerPrefillParams { block_size: 0, ..pp };
        expect(
            seer_sparse_prefill(&p, &batch, &q, &k, &v, &m, &o, std::ptr::null_mut(), 0),
            SEER_INVALID_ARGUMENT,
            "block size 0",
        );
        let p = SeerPrefillParams { softmax_scale: f32::NAN, ..pp };
        expect(
            seer_sparse_prefill(&p, &batch, &q, &k, &v, &m, &o, std::ptr::null_mut(), 0),
            SEER_INVALID_ARGUMENT,
            "NaN scale",
        );
        // A misaligned f32 output and a misaligned mask array.
        let mut mis = host_tensor(out.as_mut_ptr(), F32, [64, 8, 127]);
        mis.data = mis.data.cast::<u8>().add(2).cast();
        expect(
            seer_sparse_prefill(&pp, &batch, &q, &k, &v, &m, &mis, std::ptr::null_mut(), 0),
            SEER_INVALID_ARGUMENT,
            "misaligned out",
        );
        let mut mm = mask.desc();
        mm.row_offsets = mm.row_offsets.cast::<u8>().add(4).cast();
        expect(
            seer_sparse_prefill(&pp, &batch, &q, &k, &v, &mm, &o, std::ptr::null_mut(), 0),
            SEER_INVALID_ARGUMENT,
            "misaligned offsets",
        );
        // Handles: a pointer that never was one.
        let mut not_a_gate = [0u64; 8];
        let mut cfg = gate.config();
        expect(seer_gate_get_config(not_a_gate.as_mut_ptr().cast(), &mut cfg), SEER_INVALID_ARGUMENT, "not a handle");
        // The gate: head_dim 0 / odd, more KV heads than query heads.
        let mut c = gate_config(1, 4, 8, 128, 128);
        let mut g = std::ptr::null_mut();
        expect(seer_gate_create(&c, &mut g), SEER_INVALID_ARGUMENT, "kv heads > q heads");
        c = gate_config(1, 4, 4, 127, 128);
        expect(seer_gate_create(&c, &mut g), SEER_INVALID_ARGUMENT, "odd head_dim");
        c = gate_config(0, 4, 4, 128, 128);
        expect(seer_gate_create(&c, &mut g), SEER_INVALID_ARGUMENT, "0 layers");
        assert!(g.is_null(), "out untouched on failure");
    }
}

/// Regression: a mask whose middle row offset runs past the last offset,
/// with a count that fits that row's claimed slots but not the indices,
/// was sliced before the later offsets were checked (a panic in the mask
/// validation, `SEER_PANIC` at the boundary). Found by review of the
/// validation while writing the fuzz targets; now `SEER_INVALID_ARGUMENT`.
#[test]
fn mask_offsets_past_the_last_offset_are_refused() {
    let _s = serial();
    let lens = Lens::new(&[(128, 128)]);
    let batch = lens.batch();
    let s = sizes(&batch, 1);
    assert_eq!((s.rows, s.indices_len), (2, 3));
    let mut mask = HostMask { counts: vec![1, 2], indices: vec![0, 0, 1], offsets: vec![0, 1, 3] };
    let mut dense = vec![0u8; s.dense_bytes];
    let m = mask.desc();
    expect(unsafe { seer_mask_to_dense(&batch, 1, 64, &m, dense.as_mut_ptr(), dense.len()) }, SEER_OK, "valid");
    mask.offsets[1] = i64::MAX / 2;
    mask.counts[0] = i32::MAX;
    let m = mask.desc();
    let status = unsafe { seer_mask_to_dense(&batch, 1, 64, &m, dense.as_mut_ptr(), dense.len()) };
    let msg = expect(status, SEER_INVALID_ARGUMENT, "to_dense");
    assert!(msg.contains("row_offsets[1]"), "{msg}");
    let inputs = Inputs::random(&[(128, 128)], 1, 1, 64, 1.0, 41);
    let (status, _, _) = inputs.prefill(&mut mask, 0.0);
    expect(status, SEER_INVALID_ARGUMENT, "prefill");
}

/// Rule values outside their ranges, and weights that are not finite.
#[test]
fn mask_rules_and_weights_out_of_range() {
    let _s = serial();
    let gate = small_gate(43);
    let inputs = Inputs::random(&[(70, 70)], 2, 1, 64, 1.0, 43);
    let base = gate.params(0);
    for (what, p) in [
        ("NaN threshold", SeerMaskParams { threshold: f32::NAN, ..base }),
        ("threshold 1.5", SeerMaskParams { threshold: 1.5, ..base }),
        ("threshold -0.1", SeerMaskParams { threshold: -0.1, ..base }),
        ("nz_ratio 0", SeerMaskParams { sparsity_method: 1, nz_ratio: 0.0, ..base }),
        ("NaN nz_ratio", SeerMaskParams { sparsity_method: 1, nz_ratio: f32::NAN, ..base }),
        ("method 2", SeerMaskParams { sparsity_method: 2, ..base }),
        ("empty_rows 2", SeerMaskParams { empty_rows: 2, ..base }),
        ("threshold_compare 2", SeerMaskParams { threshold_compare: 2, ..base }),
        ("last_block_dense 2", SeerMaskParams { last_block_dense: 2, ..base }),
    ] {
        let (status, mask) = inputs.mask(gate.0, &p);
        expect(status, SEER_INVALID_ARGUMENT, what);
        assert!(mask.counts.iter().all(|&c| c == -1), "{what}: the mask was written");
    }
    for bad in [f32::NAN, f32::INFINITY] {
        let mut w = vec![0u16; 2 * 192 * 64];
        w[100] = half::bf16::from_f32(bad).to_bits();
        let desc = host_tensor(w.as_ptr(), BF16, [2, 192, 64]);
        let status = unsafe { seer_gate_set_layer_weights(gate.0, 0, &desc, std::ptr::null()) };
        let msg = expect(status, SEER_INVALID_ARGUMENT, "non-finite weight");
        assert!(msg.contains("not finite"), "{msg}");
    }
}

/// f32 inputs on the CPU path: an f32 q is rounded to the keys' dtype and a
/// gate's f32 pre-RoPE q/k to bf16 (to nearest even, what the CUDA path's
/// conversion kernel does): the outputs and masks equal, bit for bit, those
/// of the same values rounded by the caller, also through a strided f32
/// view (llama.cpp's permuted Q). The workspace queries with dtypes: 0 on
/// the CPU, the packed copies in front of the 16-bit size on CUDA.
#[test]
fn f32_q_and_gate_inputs_are_rounded_to_16_bits() {
    const CPU: u32 = 0;
    const CUDA: u32 = 1;
    let _s = serial();
    let (hq, hkv, d) = (8, 2, 128);
    let gate = Gate::bundled();
    for (lens, dtype) in [(vec![(100, 100)], F16), (vec![(70, 70), (30, 200)], BF16)] {
        let inputs = Inputs::random(&lens, hq, hkv, d, 1.0, 71);
        let (tq, tk) = (inputs.lens.total_q(), inputs.lens.total_k());
        let mut rng = common::Rng(5);
        // f32 values with bits below 16-bit precision, q stored token-major
        // inside a [heads, tokens, d] buffer (a permuted view).
        let qf: Vec<f32> = (0..tq * hq * d).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let kf: Vec<f32> = (0..tk * hkv * d).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let mut q_perm = vec![0f32; qf.len()];
        for t in 0..tq {
            for h in 0..hq {
                for x in 0..d {
                    q_perm[(h * tq + t) * d + x] = qf[(t * hq + h) * d + x];
                }
            }
        }
        let mut fq = host_tensor(q_perm.as_ptr(), F32, [tq, hq, d]);
        fq.strides = [d as i64, (tq * d) as i64, 1];
        let fk = host_tensor(kf.as_ptr(), F32, [tk, hkv, d]);
        let round = |v: &[f32], to: u32| -> Vec<u16> {
            v.iter()
                .map(|&x| if to == F16 { half::f16::from_f32(x).to_bits() } else { half::bf16::from_f32(x).to_bits() })
                .collect()
        };
        // K and V in `dtype`, q rounded by hand to the same dtype.
        let kv: Vec<u16> =
            round(&inputs.k.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect::<Vec<_>>(), dtype);
        let vv: Vec<u16> =
            round(&inputs.v.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect::<Vec<_>>(), dtype);
        let (k, v) = (host_tensor(kv.as_ptr(), dtype, [tk, hkv, d]), host_tensor(vv.as_ptr(), dtype, [tk, hkv, d]));
        let q16 = round(&qf, dtype);
        let q = host_tensor(q16.as_ptr(), dtype, [tq, hq, d]);
        let batch = inputs.lens.batch();
        let mut mask = HostMask::new(&sizes(&batch, hq as u32));
        // Gate: f32 q_nope / k_nope against the bf16-rounded values.
        let (qb, kb) = (round(&qf, BF16), round(&kf, BF16));
        let (qbd, kbd) = (host_tensor(qb.as_ptr(), BF16, [tq, hq, d]), host_tensor(kb.as_ptr(), BF16, [tk, hkv, d]));
        let params = gate.params(1);
        let mut want_mask = HostMask::new(&sizes(&batch, hq as u32));
        unsafe {
            let desc = want_mask.desc();
            expect(seer_gate_compute_mask(gate.0, &params, &batch, &qbd, &kbd, &desc), SEER_OK, "bf16 mask");
            let desc = mask.desc();
            expect(seer_gate_compute_mask(gate.0, &params, &batch, &fq, &fk, &desc), SEER_OK, "f32 mask");
        }
        assert_eq!(mask.rows(), want_mask.rows(), "f32 gate inputs: the mask of their bf16 rounding");
        // Prefill over that mask: f32 q against q rounded to k's dtype.
        let pp = prefill_params();
        let m = mask.desc();
        let run = |q: &SeerTensor| {
            let mut out = vec![f32::NAN; tq * hq * d];
            let mut lse = vec![f32::NAN; tq * hq];
            let o = host_tensor(out.as_mut_ptr(), F32, [tq, hq, d]);
            let st = unsafe { seer_sparse_prefill(&pp, &batch, q, &k, &v, &m, &o, lse.as_mut_ptr(), lse.len()) };
            expect(st, SEER_OK, "prefill");
            (out, lse)
        };
        let (want, want_lse) = run(&q);
        let (got, got_lse) = run(&fq);
        assert!(want.iter().all(|x| x.is_finite()));
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "f32 q: the output of q rounded to the keys' dtype"
        );
        assert_eq!(
            got_lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want_lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        // Workspace queries with dtypes.
        let mut bytes = usize::MAX;
        unsafe {
            expect(
                seer_prefill_workspace_size_dtype(&batch, hq as u32, d as u32, F32, dtype, CPU, &mut bytes),
                SEER_OK,
                "cpu",
            );
            assert_eq!(bytes, 0);
            expect(seer_gate_workspace_size_dtype(gate.0, &batch, F32, CPU, &mut bytes), SEER_OK, "gate cpu");
            assert_eq!(bytes, 0);
            bytes = 12345;
            expect(
                seer_prefill_workspace_size_dtype(&batch, hq as u32, d as u32, F32, F32, CPU, &mut bytes),
                SEER_INVALID_ARGUMENT,
                "f32 keys",
            );
            expect(
                seer_prefill_workspace_size_dtype(&batch, hq as u32, d as u32, F16, BF16, CPU, &mut bytes),
                SEER_INVALID_ARGUMENT,
                "f16 q with bf16 keys",
            );
            expect(
                seer_prefill_workspace_size_dtype(&batch, hq as u32, d as u32, 7, BF16, CPU, &mut bytes),
                SEER_INVALID_ARGUMENT,
                "unknown q dtype",
            );
            expect(
                seer_prefill_workspace_size_dtype(&batch, hq as u32, d as u32, F32, BF16, CPU, std::ptr::null_mut()),
                SEER_NULL_POINTER,
                "prefill NULL out_bytes",
            );
            expect(
                seer_gate_workspace_size_dtype(gate.0, &batch, 7, CPU, &mut bytes),
                SEER_INVALID_ARGUMENT,
                "dtype 7",
            );
            expect(
                seer_gate_workspace_size_dtype(gate.0, &batch, F32, 9, &mut bytes),
                SEER_INVALID_ARGUMENT,
                "gate device 9",
            );
            expect(
                seer_gate_workspace_size_dtype(gate.0, &batch, F32, CPU, std::ptr::null_mut()),
                SEER_NULL_POINTER,
                "gate NULL out_bytes",
            );
            assert_eq!(bytes, 12345, "failed calls leave out_bytes alone");
            if seerattn::cuda::cuda_enabled() {
                let mut plain = 0usize;
                expect(seer_prefill_workspace_size(&batch, hq as u32, d as u32, CUDA, &mut plain), SEER_OK, "16-bit");
                for (qd, extra) in [(dtype, 0), (F32, (tq * hq * d * 2).div_ceil(256) * 256)] {
                    expect(
                        seer_prefill_workspace_size_dtype(&batch, hq as u32, d as u32, qd, dtype, CUDA, &mut bytes),
                        SEER_OK,
                        "cuda",
                    );
                    assert_eq!(bytes, plain + extra, "prefill workspace, q dtype {qd}");
                }
                expect(seer_gate_workspace_size(gate.0, &batch, CUDA, &mut plain), SEER_OK, "gate 16-bit");
                for (gd, extra) in [
                    (BF16, 0),
                    (F16, 0),
                    (F32, (tq * hq * d * 2).div_ceil(256) * 256 + (tk * hkv * d * 2).div_ceil(256) * 256),
                ] {
                    expect(seer_gate_workspace_size_dtype(gate.0, &batch, gd, CUDA, &mut bytes), SEER_OK, "gate cuda");
                    assert_eq!(bytes, plain + extra, "gate workspace, dtype {gd}");
                }
            }
        }
    }
}
