//! Hardening of the CUDA path through the C API, as an engine calls it
//! (issue 7: concurrency, CUDA graphs, the hot path, scale).
//!
//! - Concurrency: eight threads share one gate handle, each on its own
//!   stream with its own buffers, running gate + sparse prefill over their
//!   own inputs (`seer_gate_attention` and the two separate calls, in turn)
//!   for several rounds: bit for bit the results of a serial run. Meanwhile
//!   eight more threads create (load, or create and set weights), upload,
//!   use and destroy gates of their own, and query the shared handle.
//! - Graphs: gate + prefill of four layers (different gate layers and mask
//!   rules) captured into one graph on one stream and replayed 20 times, new
//!   inputs written into the same buffers by `cuMemcpyHtoDAsync` on the
//!   stream before each replay: every replay's masks, outputs and lse are
//!   the eager run's of the same inputs, bit for bit.
//! - The hot path allocates nothing, copies nothing between host and device
//!   and synchronizes nothing: the whole of it (K-block cache update, mask
//!   from the caches, split-KV prefill, and a one-shot `seer_gate_attention`)
//!   is captured in `CU_STREAM_CAPTURE_MODE_GLOBAL` (see
//!   `gpu_hot_path_captures_in_global_mode_as_kernels_only` for why that
//!   proves it), and a source check (`only_the_upload_allocates_copies_or_synchronizes`,
//!   no GPU needed) confines the driver calls that could.
//! - Scale: one sequence of 131072 and one of 262144 tokens (32 query heads,
//!   8 KV heads, head_dim 128, bf16), and a varlen batch whose Q, K, V and
//!   output each hold more than 2^31 elements, through gate + sparse prefill
//!   (and, at the end of the long sequences, a 512-token chunk over the
//!   K-block cache, run split-KV): every mask row valid with exactly the
//!   top-k count, every output element written, every lse finite; sampled
//!   mask rows equal to the CPU gate's (up to near-ties), sampled query rows
//!   equal to the CPU reference (`sparse_prefill_rows`), the rows past 2^31
//!   elements among them; workspace, mask and cache sizes equal to their
//!   formulas exactly (also checked without a GPU:
//!   `scale_sizes_are_the_formulas`).
//!
//! GPU tests are `#[ignore]`d (run by `scripts/gpu-test.sh run`; on their
//! own: `.devbuild/bin/gpu_hardening --include-ignored`). They run one at a
//! time ([`exclusive`]): a global-mode capture fails if any other thread of
//! the process calls CUDA meanwhile, and the scale tests hold about 20 GB of
//! device memory. The scale tests are named `gpu_scale_*`; `scripts/gpu-test.sh
//! sanitize` skips them (too slow under compute-sanitizer).

mod common;
use common::capi::{self, *};
use common::device::*;
use common::{compare_mask_rows, repo_root, upstream_dir, MaskRowPair, Rng};
use seerattn::attention::{sparse_prefill_rows, AttentionParams};
use seerattn::cuda::testing::{self, CaptureMode, Stream};
use seerattn::cuda::{self, DeviceBuffer};
use seerattn::ffi::args::SeerTensor;
use seerattn::ffi::attention::{seer_gate_attention, seer_sparse_prefill};
use seerattn::ffi::gate::{
    seer_gate_compute_mask, seer_gate_create, seer_gate_set_layer_weights, seer_gate_upload, seer_gate_workspace_size,
    seer_kblock_cache_size, seer_kblock_cache_update, SeerGate, SeerMaskParams,
};
use seerattn::ffi::mask::{seer_prefill_workspace_size, SeerMaskSizes};
use seerattn::ffi::status::SeerStatus;
use seerattn::mask::RowId;
use seerattn::reference::select::select_row;
use seerattn::{Batch, BlockMask, DType, Error, Layout3, MaskLayout, SparsityMethod, Tensor3, WeightRef};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

static DEVICE: Mutex<()> = Mutex::new(());

/// The GPU tests of this file run one at a time: a global-mode capture
/// fails when another thread of the process calls CUDA meanwhile, and the
/// scale tests need most of the device memory they can get.
fn exclusive() -> MutexGuard<'static, ()> {
    DEVICE.lock().unwrap_or_else(|p| p.into_inner())
}

const GIB: f64 = (1u64 << 30) as f64;

/// How many times a repeated step runs: `full`, or fewer when
/// `SEERATTN_TEST_REPEATS` says so. `scripts/gpu-test.sh sanitize` sets it:
/// racecheck reports shared-memory hazards of each launch it watches, so two
/// rounds show what twenty would, at a tenth of a run that otherwise takes
/// longer than a device call may.
fn repeats(full: usize) -> usize {
    match std::env::var("SEERATTN_TEST_REPEATS").ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(n) if n >= 1 => n.min(full),
        _ => full,
    }
}

// ------------------------------------------------------------ test inputs --

/// Element `i` of the deterministic stream `seed`, uniform in [-1, 1).
fn unit(seed: u64, i: u64) -> f32 {
    let z = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64();
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Run `f(first, chunk)` over `out` cut into one chunk of whole `row`s per
/// core; `first` is the chunk's first row.
fn par_rows<T: Send>(out: &mut [T], row: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let per = (out.len() / row).div_ceil(threads).max(1) * row;
    let f = &f;
    std::thread::scope(|s| {
        for (c, chunk) in out.chunks_mut(per).enumerate() {
            s.spawn(move || f(c * per / row, chunk));
        }
    });
}

/// `[tokens, heads, d]` bf16 bits shaped like a model's Q or K: each 64-token
/// block of each head has its own mean (uniform in ±1.5) plus per-token noise
/// (±1), so pooled gate features differ between blocks and top-k has no
/// ties to speak of. Element (t, h, x) depends on (seed, t, h, x) only;
/// generated on every core (the scale tests need billions).
fn structured(seed: u64, tokens: usize, heads: usize, d: usize) -> Vec<u16> {
    let row = heads * d;
    let mut out = vec![0u16; tokens * row];
    par_rows(&mut out, row, |t0, chunk| {
        for (i, slot) in chunk.iter_mut().enumerate() {
            let (t, e) = (t0 + i / row, i % row);
            let mean = 1.5 * unit(seed, ((t / 64) * row + e) as u64);
            let noise = unit(!seed, (t * row + e) as u64);
            *slot = half::bf16::from_f32(mean + noise).to_bits();
        }
    });
    out
}

/// Structured q, k and v of a batch (q doubles as the gate's q_nope, k as its k_nope).
fn structured_inputs(lens: &[(usize, usize)], hq: usize, hkv: usize, d: usize, seed: u64) -> Inputs {
    let lens = Lens::new(lens);
    let (tq, tk) = (lens.total_q(), lens.total_k());
    let (q, k, v) = (structured(seed, tq, hq, d), structured(seed + 1, tk, hkv, d), structured(seed + 2, tk, hkv, d));
    Inputs { lens, hq, hkv, d, q, k, v }
}

fn bytes(v: &[u16]) -> &[u8] {
    // SAFETY: u16 has no padding; the slice covers exactly v's memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 2) }
}

fn batch_of(lens: &Lens) -> Batch {
    Batch::from_cu_seqlens(&lens.q, &lens.k).unwrap()
}

/// A gate of the released type with random weights in every layer, as the
/// C handle the GPU path uses and as a Rust gate for the reference's
/// scores: the bundled gate's type, RoPE (llama3 scaling, theta 500000) and
/// rule, with the given geometry. The two are the same gate: checked
/// through the handle's CPU path.
struct TestGate {
    handle: capi::Gate,
    rust: seerattn::Gate,
}

fn random_gate(layers: usize, hq: usize, hkv: usize, d: usize, seed: u64) -> TestGate {
    let mut config = seerattn::Gate::load_dir(&upstream_dir().join("gqa4_s1000_gates")).unwrap().config().clone();
    (config.num_layers, config.num_q_heads, config.num_kv_heads) = (layers, hq, hkv);
    (config.head_dim, config.gate_hidden) = (d, d);
    let mut rust = seerattn::Gate::new(config).unwrap();
    let mut c = capi::Gate::bundled().config();
    (c.num_layers, c.num_q_heads, c.num_kv_heads) = (layers as u32, hq as u32, hkv as u32);
    (c.head_dim, c.gate_hidden) = (d as u32, d as u32);
    let mut g = std::ptr::null_mut();
    expect(unsafe { seer_gate_create(&c, &mut g) }, SEER_OK, "seer_gate_create");
    let handle = capi::Gate(g);
    // Logits spread over a few units (a realistic softmax).
    let shape = [hq, 3 * d, d];
    let a = 2.0 / ((3 * d) as f32).sqrt();
    for layer in 0..layers {
        let w: Vec<u16> = (0..hq * 3 * d * d)
            .map(|i| half::bf16::from_f32(a * unit(seed + layer as u64, i as u64)).to_bits())
            .collect();
        rust.set_layer_weights(layer, WeightRef { dtype: DType::BF16, shape, bytes: bytes(&w) }, None).unwrap();
        let desc = host_tensor(w.as_ptr(), BF16, shape);
        let status = unsafe { seer_gate_set_layer_weights(handle.0, layer as u32, &desc, std::ptr::null()) };
        expect(status, SEER_OK, "seer_gate_set_layer_weights");
    }
    let check = Inputs::random(&[(300, 300), (70, 200)], hq, hkv, d, 2.0, seed);
    let batch = batch_of(&check.lens);
    let (tq, tk) = (check.lens.total_q(), check.lens.total_k());
    let qv = Tensor3::new("q", bytes(&check.q), DType::BF16, Layout3::contiguous(tq, hq, d)).unwrap();
    let kv = Tensor3::new("k", bytes(&check.k), DType::BF16, Layout3::contiguous(tk, hkv, d)).unwrap();
    for layer in 0..layers {
        let mut p = handle.params(layer as u32);
        (p.sparsity_method, p.nz_ratio) = (1, 0.3);
        let (status, c_mask) = check.mask(handle.0, &p);
        expect(status, SEER_OK, "CPU mask through the handle");
        let r = rust.compute_block_mask(layer, &qv, &kv, &batch, &capi::rule(&p)).unwrap();
        let rows: Vec<Vec<i32>> = (0..r.counts.len()).map(|i| r.as_ref().row(i).to_vec()).collect();
        assert_eq!((&c_mask.counts, &c_mask.offsets), (&r.counts, &r.row_offsets), "the handle and the Rust gate");
        assert_eq!(c_mask.rows(), rows, "layer {layer}: the handle and the Rust gate select differently");
    }
    TestGate { handle, rust }
}

/// `params` with another rule: top-k (`nz_ratio`), or a threshold.
fn top_k(mut p: SeerMaskParams, nz_ratio: f32, last_block_dense: bool) -> SeerMaskParams {
    (p.sparsity_method, p.nz_ratio, p.last_block_dense) = (1, nz_ratio, last_block_dense as u32);
    p
}

fn threshold(mut p: SeerMaskParams, t: f32, upstream: bool) -> SeerMaskParams {
    (p.sparsity_method, p.threshold) = (0, t);
    // Upstream's comparison (bf16) and empty rows left empty.
    (p.threshold_compare, p.empty_rows) = (upstream as u32, upstream as u32);
    p
}

// ------------------------------------------------------ one layer on a GPU --

/// What one run of gate + prefill wrote, read back.
struct Results {
    mask: BlockMask,
    out: Vec<u8>,
    lse: Vec<u8>,
}

/// What gate + prefill write, on the device (poisoned): the mask arrays,
/// out `[tokens, hq, d]` in bf16 and lse.
struct Outputs {
    mask: MaskBuffers,
    out: DeviceBuffer,
    lse: DeviceBuffer,
    shape: [usize; 3],
}

impl Outputs {
    fn new(ctx: &cuda::Ctx, sizes: SeerMaskSizes, shape: [usize; 3]) -> Outputs {
        let [tokens, hq, d] = shape;
        let (out, lse) = (poisoned(ctx, tokens * hq * d * 2), poisoned(ctx, tokens * hq * 4));
        Outputs { mask: MaskBuffers::new(ctx, sizes), out, lse, shape }
    }

    fn out_desc(&self) -> SeerTensor {
        cuda_tensor(self.out.ptr(), self.shape)
    }

    /// `maybe_lse` and `lse_len`.
    fn lse(&self) -> (*mut f32, usize) {
        (self.lse.ptr() as *mut f32, self.lse.len() / 4)
    }

    fn poison(&self, ctx: &cuda::Ctx) {
        self.mask.poison(ctx);
        testing::fill(ctx, self.out.ptr(), 0xff, self.out.len()).unwrap();
        testing::fill(ctx, self.lse.ptr(), 0xff, self.lse.len()).unwrap();
    }

    /// Everything, read back (synchronize the stream that wrote it first).
    fn read(&self, ctx: &cuda::Ctx) -> Results {
        Results {
            mask: self.mask.read(ctx),
            out: read_back(ctx, self.out.ptr(), self.out.len()),
            lse: read_back(ctx, self.lse.ptr(), self.lse.len()),
        }
    }
}

/// One batch of one layer on the device, as an engine holds it: q (also the
/// gate's q_nope), k (also k_nope) and v; the outputs; the gate's and the
/// prefill's workspaces, sized by the C API's queries.
struct Layer {
    lens: Lens,
    hq: usize,
    hkv: usize,
    d: usize,
    q: DeviceBuffer,
    k: DeviceBuffer,
    v: DeviceBuffer,
    outputs: Outputs,
    gate_ws: DeviceBuffer,
    prefill_ws: DeviceBuffer,
}

impl Layer {
    fn new(ctx: &cuda::Ctx, gate: &capi::Gate, lens: &[(usize, usize)]) -> Layer {
        let c = gate.config();
        let (hq, hkv, d) = (c.num_q_heads as usize, c.num_kv_heads as usize, c.head_dim as usize);
        let lens = Lens::new(lens);
        let b = lens.batch();
        let (mut gate_ws, mut prefill_ws) = (0, 0);
        let status = unsafe { seer_gate_workspace_size(gate.0, &b, CUDA, &mut gate_ws) };
        expect(status, SEER_OK, "seer_gate_workspace_size");
        let status = unsafe { seer_prefill_workspace_size(&b, hq as u32, d as u32, CUDA, &mut prefill_ws) };
        expect(status, SEER_OK, "seer_prefill_workspace_size");
        let (tq, tk) = (lens.total_q(), lens.total_k());
        Layer {
            hq,
            hkv,
            d,
            q: poisoned(ctx, tq * hq * d * 2),
            k: poisoned(ctx, tk * hkv * d * 2),
            v: poisoned(ctx, tk * hkv * d * 2),
            outputs: Outputs::new(ctx, sizes(&b, hq as u32), [tq, hq, d]),
            gate_ws: poisoned(ctx, gate_ws),
            prefill_ws: poisoned(ctx, prefill_ws),
            lens,
        }
    }

    fn batch(&self) -> Batch {
        batch_of(&self.lens)
    }

    /// Descriptors of q, k and v.
    fn descs(&self) -> [SeerTensor; 3] {
        let (tq, tk) = (self.lens.total_q(), self.lens.total_k());
        [
            cuda_tensor(self.q.ptr(), [tq, self.hq, self.d]),
            cuda_tensor(self.k.ptr(), [tk, self.hkv, self.d]),
            cuda_tensor(self.v.ptr(), [tk, self.hkv, self.d]),
        ]
    }

    fn inputs<'a>(&'a self, inputs: &'a Inputs) -> [(&'a DeviceBuffer, &'a [u8]); 3] {
        assert_eq!((&inputs.lens.q, &inputs.lens.k), (&self.lens.q, &self.lens.k), "inputs of another batch");
        [(&self.q, bytes(&inputs.q)), (&self.k, bytes(&inputs.k)), (&self.v, bytes(&inputs.v))]
    }

    /// Write new inputs (complete on return).
    fn upload(&self, ctx: &cuda::Ctx, inputs: &Inputs) {
        for (buf, host) in self.inputs(inputs) {
            testing::copy_to_device(ctx, buf.ptr(), host).unwrap();
        }
    }

    /// Enqueue new inputs on `stream` (`cuMemcpyHtoDAsync`).
    fn upload_async(&self, stream: &Stream, inputs: &Inputs) {
        for (buf, host) in self.inputs(inputs) {
            testing::copy_to_device_async(stream, buf.ptr(), host).unwrap();
        }
    }

    /// `seer_gate_attention` of this layer on `stream`.
    ///
    /// # Safety
    /// `gate` is a live handle uploaded to this context.
    unsafe fn gate_attention(&self, gate: *const SeerGate, rule: &SeerMaskParams, stream: &Stream) -> SeerStatus {
        let ([q, k, v], o) = (self.descs(), &self.outputs);
        let (mp, pp) = (mask_params(rule, stream, &self.gate_ws), prefill_params(stream, &self.prefill_ws));
        let (lse, lse_len) = o.lse();
        let b = self.lens.batch();
        seer_gate_attention(gate, &mp, &pp, &b, &q, &k, &q, &k, &v, &o.mask.desc(), &o.out_desc(), lse, lse_len)
    }

    /// The same as two calls: `seer_gate_compute_mask`, then `seer_sparse_prefill`.
    ///
    /// # Safety
    /// As [`Layer::gate_attention`].
    unsafe fn two_calls(&self, gate: *const SeerGate, rule: &SeerMaskParams, stream: &Stream) -> SeerStatus {
        let ([q, k, v], o) = (self.descs(), &self.outputs);
        let (mp, pp) = (mask_params(rule, stream, &self.gate_ws), prefill_params(stream, &self.prefill_ws));
        let b = self.lens.batch();
        let status = seer_gate_compute_mask(gate, &mp, &b, &q, &k, &o.mask.desc());
        if status != SEER_OK {
            return status;
        }
        let (lse, lse_len) = o.lse();
        seer_sparse_prefill(&pp, &b, &q, &k, &v, &o.mask.desc(), &o.out_desc(), lse, lse_len)
    }
}

/// The last `chunk` tokens of a one-sequence `Layer` as a chunked-prefill
/// step over a K-block cache that holds the rest: the cache, the step's
/// outputs, and the workspaces (their sizes checked against the formulas).
/// The step reads q, k and v from the layer's buffers.
struct Chunk<'a> {
    seq: &'a Layer,
    prefix: usize,
    chunk: usize,
    cache: DeviceBuffer,
    caches: [u64; 1],
    gate_ws: DeviceBuffer,
    prefill_ws: DeviceBuffer,
    outputs: Outputs,
    prefix_lens: Lens,
    chunk_lens: Lens,
}

impl<'a> Chunk<'a> {
    fn new(ctx: &cuda::Ctx, gate: &capi::Gate, seq: &'a Layer, chunk: usize) -> Chunk<'a> {
        let (n, hq, hkv, d) = (seq.lens.total_q(), seq.hq, seq.hkv, seq.d);
        assert_eq!((seq.lens.q.len(), n), (2, seq.lens.total_k()), "a chunk of one whole sequence");
        let prefix = n - chunk;
        // Few query blocks over long rows: split-KV, in two parts.
        let sizes = check_sizes(gate, &[(chunk, n)], 2);
        let prefix_sizes = check_sizes(gate, &[(prefix, prefix)], 1);
        let cache = poisoned(ctx, kblock_cache_size(gate, n, hq, hkv, d));
        Chunk {
            seq,
            prefix,
            chunk,
            caches: [cache.ptr()],
            cache,
            gate_ws: poisoned(ctx, sizes.gate_ws.max(prefix_sizes.gate_ws)),
            prefill_ws: poisoned(ctx, sizes.prefill_ws),
            outputs: Outputs::new(ctx, sizes.mask, [chunk, hq, d]),
            prefix_lens: Lens::new(&[(prefix, prefix)]),
            chunk_lens: Lens::new(&[(chunk, n)]),
        }
    }

    fn batch(&self) -> Batch {
        batch_of(&self.chunk_lens)
    }

    /// Rows `first..first + tokens` of one of the sequence's `[tokens, heads, d]` buffers.
    fn rows(&self, buf: &DeviceBuffer, first: usize, tokens: usize, heads: usize) -> SeerTensor {
        let d = self.seq.d;
        cuda_tensor(buf.ptr() + (first * heads * d * 2) as u64, [tokens, heads, d])
    }

    /// The cache takes the prefix's keys (what earlier steps did).
    ///
    /// # Safety
    /// `gate` is a live handle uploaded to this context.
    unsafe fn fill_cache(&self, gate: *const SeerGate, rule: &SeerMaskParams, stream: &Stream) -> SeerStatus {
        let k_prefix = self.rows(&self.seq.k, 0, self.prefix, self.seq.hkv);
        let (b, mp) = (self.prefix_lens.batch(), mask_params(rule, stream, &self.gate_ws));
        seer_kblock_cache_update(gate, &mp, &b, &k_prefix, self.caches.as_ptr(), 1)
    }

    /// The step: the chunk's keys into the cache, the mask from the cache
    /// (no k_nope), the prefill over every key, split-KV.
    ///
    /// # Safety
    /// As [`Chunk::fill_cache`], which must have run.
    unsafe fn step(&self, gate: *const SeerGate, rule: &SeerMaskParams, stream: &Stream) -> seerattn::Result<()> {
        let (hq, hkv, o) = (self.seq.hq, self.seq.hkv, &self.outputs);
        let (b, mp) = (self.chunk_lens.batch(), mask_params(rule, stream, &self.gate_ws));
        let k_new = self.rows(&self.seq.k, self.prefix, self.chunk, hkv);
        ok(seer_kblock_cache_update(gate, &mp, &b, &k_new, self.caches.as_ptr(), 1), "K-block cache update")?;
        let cached = SeerMaskParams { maybe_kblock_caches: self.caches.as_ptr(), num_kblock_caches: 1, ..mp };
        let q = self.rows(&self.seq.q, self.prefix, self.chunk, hq);
        ok(seer_gate_compute_mask(gate, &cached, &b, &q, std::ptr::null(), &o.mask.desc()), "mask from the cache")?;
        let ([_, k, v], pp) = (self.seq.descs(), prefill_params(stream, &self.prefill_ws));
        let (lse, lse_len) = o.lse();
        ok(seer_sparse_prefill(&pp, &b, &q, &k, &v, &o.mask.desc(), &o.out_desc(), lse, lse_len), "split-KV prefill")
    }
}

/// A status as a `Result`, with this thread's message (for capture closures).
fn ok(status: SeerStatus, what: &str) -> seerattn::Result<()> {
    if status == SEER_OK {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{what}: {status:?}: {}", message())))
    }
}

fn first_difference<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Bit-identical results, or a panic naming the first difference.
fn assert_same(what: &str, a: &Results, b: &Results) {
    let parts: [(&str, Option<usize>); 5] = [
        ("mask counts", first_difference(&a.mask.counts, &b.mask.counts)),
        ("mask row offsets", first_difference(&a.mask.row_offsets, &b.mask.row_offsets)),
        ("mask indices", first_difference(&a.mask.indices, &b.mask.indices)),
        ("output bytes", first_difference(&a.out, &b.out)),
        ("lse bytes", first_difference(&a.lse, &b.lse)),
    ];
    for (name, diff) in parts {
        if let Some(i) = diff {
            let (x, y): (&[u8], &[u8]) = match name {
                "output bytes" => (&a.out, &b.out),
                "lse bytes" => (&a.lse, &b.lse),
                _ => panic!("{what}: {name} differ, first at index {i}"),
            };
            // How many, and where: a race shows as scattered bytes, a wrong
            // tile as whole rows.
            let differing: Vec<usize> =
                x.iter().zip(y).enumerate().filter(|(_, (p, q))| p != q).map(|(k, _)| k).collect();
            panic!(
                "{what}: {name} differ at {} of {} bytes, first at {i}, last at {}",
                differing.len(),
                x.len(),
                differing.last().copied().unwrap_or(i)
            );
        }
    }
}

/// The first index where `bad` holds, searched on every core.
fn par_find<T: Sync>(data: &[T], bad: impl Fn(&T) -> bool + Sync) -> Option<usize> {
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let per = data.len().div_ceil(threads).max(1);
    let bad = &bad;
    std::thread::scope(|s| {
        let found: Vec<_> = data
            .chunks(per)
            .enumerate()
            .map(|(c, chunk)| s.spawn(move || chunk.iter().position(bad).map(|i| c * per + i)))
            .collect();
        found.into_iter().filter_map(|h| h.join().unwrap()).min()
    })
}

fn decode_bf16(b: &[u8]) -> Vec<f32> {
    b.chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

fn decode_f32(b: &[u8]) -> Vec<f32> {
    b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// What must hold of any run, read whole: a valid mask (counts exactly the
/// rule's for top-k), every output element written and finite (the buffers
/// were poisoned with NaN), no NaN lse (finite where the rule leaves no row
/// empty). Returns the mask's density.
fn check_whole(what: &str, batch: &Batch, hq: usize, rule: &SeerMaskParams, r: &Results) -> f64 {
    let layout = MaskLayout::new(batch, hq, 64).unwrap();
    r.mask.as_ref().validate(&layout).unwrap_or_else(|e| panic!("{what}: the GPU mask is invalid: {e}"));
    let p = capi::rule(rule);
    if p.method == SparsityMethod::NzRatio {
        for (row, &count) in r.mask.counts.iter().enumerate() {
            let id = layout.row_id(row);
            let dense = p.last_block_dense && id.q_block + 2 >= id.k_blocks;
            let want = if dense { id.q_block + 1 } else { p.top_k(id.k_blocks).min(id.q_block + 1) };
            assert_eq!(count as usize, want, "{what}: row {row} ({id:?}) selects {count} blocks, top-k says {want}");
        }
    }
    let out: &[u16] = {
        // SAFETY: the bytes of bf16 values, read as their bits (even length).
        unsafe { std::slice::from_raw_parts(r.out.as_ptr().cast(), r.out.len() / 2) }
    };
    let row = out.len() / batch.total_q();
    let nan = |bits: &u16| bits & 0x7f80 == 0x7f80;
    if let Some(i) = par_find(out, nan) {
        panic!("{what}: output element {i} (token {}) is {:#06x}: not written, or not finite", i / row, out[i]);
    }
    let lse = decode_f32(&r.lse);
    let keeps_every_row = p.method == SparsityMethod::NzRatio || p.empty_rows == seerattn::EmptyRowPolicy::KeepDiagonal;
    if let Some(i) = lse.iter().position(|l| l.is_nan() || (keeps_every_row && !l.is_finite())) {
        panic!("{what}: lse {i} is {}", lse[i]);
    }
    r.mask.as_ref().density(&layout)
}

// ----------------------------------------------------------- concurrency --

/// Create a gate (kind 0: `seer_gate_load` of the bundled gate; 1:
/// `seer_gate_create` and random weights), upload it, run gate + prefill of
/// `inputs` on `stream`, wait, destroy it: engines loading and unloading
/// models beside a running one.
fn churn_once(ctx: &cuda::Ctx, stream: &Stream, lens: &[(usize, usize)], inputs: &Inputs, kind: usize) -> Results {
    let gate = if kind == 0 { capi::Gate::bundled() } else { random_gate(1, 8, 2, 128, 5).handle };
    expect(unsafe { seer_gate_upload(gate.0) }, SEER_OK, "churn: seer_gate_upload");
    let layer = Layer::new(ctx, &gate, lens);
    layer.upload(ctx, inputs);
    let rule = top_k(gate.params(0), 0.3, true);
    expect(unsafe { layer.gate_attention(gate.0, &rule, stream) }, SEER_OK, "churn: seer_gate_attention");
    stream.synchronize().unwrap();
    let results = layer.outputs.read(ctx);
    drop(layer);
    drop(gate);
    results
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_eight_threads_share_one_handle_and_match_a_serial_run() {
    let _x = exclusive();
    let ctx = ctx();
    let gate = capi::Gate::bundled();
    expect(unsafe { seer_gate_upload(gate.0) }, SEER_OK, "seer_gate_upload");
    let c = gate.config();
    let (hq, hkv, d) = (c.num_q_heads as usize, c.num_kv_heads as usize, c.head_dim as usize);
    const THREADS: usize = 8;
    const SETS: usize = 3;
    let rounds = repeats(6);
    // Per thread: its own batch (a plain sequence and a chunk over a cache),
    // gate layer and mask rule, and three sets of inputs.
    let shape = |t: usize| vec![(700 + 61 * t, 700 + 61 * t), (64 + 37 * t, 900 + 13 * t)];
    let rule = |t: usize| {
        let p = gate.params((t % 2) as u32);
        match t % 4 {
            0 => p,
            1 => top_k(p, 0.3, true),
            2 => threshold(p, 0.01, true),
            _ => top_k(p, 0.1, false),
        }
    };
    let inputs: Vec<Vec<Inputs>> = (0..THREADS)
        .map(|t| (0..SETS).map(|j| structured_inputs(&shape(t), hq, hkv, d, 100 * t as u64 + 10 * j as u64)).collect())
        .collect();

    // The serial run: one stream, seer_gate_attention for every (thread, set).
    let serial: Vec<Vec<Results>> = {
        let stream = Stream::new(&ctx).unwrap();
        (0..THREADS)
            .map(|t| {
                let layer = Layer::new(&ctx, &gate, &shape(t));
                (0..SETS)
                    .map(|j| {
                        layer.upload(&ctx, &inputs[t][j]);
                        layer.outputs.poison(&ctx);
                        let status = unsafe { layer.gate_attention(gate.0, &rule(t), &stream) };
                        expect(status, SEER_OK, "serial seer_gate_attention");
                        stream.synchronize().unwrap();
                        let r = layer.outputs.read(&ctx);
                        let density = check_whole(&format!("serial {t}/{j}"), &layer.batch(), hq, &rule(t), &r);
                        assert!(density > 0.0, "serial {t}/{j}: an empty mask");
                        r
                    })
                    .collect()
            })
            .collect()
    };

    // What the churn threads must get every time, and what the shared
    // handle's queries must answer.
    let churn_lens = [(500, 500), (100, 300)];
    let churn_inputs = structured_inputs(&churn_lens, hq, hkv, d, 77);
    let churn_ref: Vec<Results> = {
        let stream = Stream::new(&ctx).unwrap();
        (0..2).map(|kind| churn_once(&ctx, &stream, &churn_lens, &churn_inputs, kind)).collect()
    };
    let query_batch = Lens::new(&shape(3));
    let query = || {
        let (mut ws, mut cache) = (0usize, 0usize);
        let status = unsafe { seer_gate_workspace_size(gate.0, &query_batch.batch(), CUDA, &mut ws) };
        expect(status, SEER_OK, "seer_gate_workspace_size");
        expect(unsafe { seer_kblock_cache_size(gate.0, 100_000, &mut cache) }, SEER_OK, "seer_kblock_cache_size");
        let p = gate.params(1);
        (ws, cache, gate.config().num_layers, p.threshold.to_bits(), p.sparsity_method)
    };
    let queried = query();

    let done = AtomicBool::new(false);
    let cycles = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let computing: Vec<_> = (0..THREADS)
            .map(|t| {
                let (ctx, gate, inputs, serial, rule, shape) = (&ctx, &gate, &inputs, &serial, &rule, &shape);
                s.spawn(move || {
                    let stream = Stream::new(ctx).unwrap();
                    let layer = Layer::new(ctx, gate, &shape(t));
                    let rule = rule(t);
                    for round in 0..rounds {
                        let j = (t + round) % SETS;
                        layer.upload(ctx, &inputs[t][j]);
                        layer.outputs.poison(ctx);
                        let combined = (t + round) % 2 == 0;
                        let status = unsafe {
                            if combined {
                                layer.gate_attention(gate.0, &rule, &stream)
                            } else {
                                layer.two_calls(gate.0, &rule, &stream)
                            }
                        };
                        let what = format!(
                            "thread {t} round {round} (input set {j}, {})",
                            if combined { "seer_gate_attention" } else { "two calls" }
                        );
                        expect(status, SEER_OK, &what);
                        stream.synchronize().unwrap();
                        assert_same(&format!("{what} vs the serial run"), &layer.outputs.read(ctx), &serial[t][j]);
                    }
                })
            })
            .collect();
        for t in 0..THREADS {
            let (ctx, churn_lens, churn_inputs, churn_ref, done, cycles, query) =
                (&ctx, &churn_lens, &churn_inputs, &churn_ref, &done, &cycles, &query);
            s.spawn(move || {
                let stream = Stream::new(ctx).unwrap();
                let mut n = 0;
                while n < 3 || !done.load(Ordering::Acquire) {
                    let kind = (t + n) % 2;
                    let got = churn_once(ctx, &stream, churn_lens, churn_inputs, kind);
                    assert_same(&format!("churn thread {t} cycle {n} (kind {kind})"), &got, &churn_ref[kind]);
                    assert_eq!(query(), queried, "churn thread {t}: the shared handle's queries");
                    n += 1;
                }
                cycles.fetch_add(n, Ordering::Relaxed);
            });
        }
        // Stop the churn whatever happened to the computing threads, then
        // report their panics.
        let joined: Vec<_> = computing.into_iter().map(|h| h.join()).collect();
        done.store(true, Ordering::Release);
        for r in joined {
            if let Err(panic) = r {
                std::panic::resume_unwind(panic);
            }
        }
    });
    eprintln!(
        "{THREADS} threads x {rounds} rounds matched the serial run; {} gates created, uploaded, used and destroyed beside them",
        cycles.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------- graphs --

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_graph_of_four_layers_replays_new_inputs_as_eager_runs() {
    let _x = exclusive();
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let (hq, hkv, d) = (32, 8, 128);
    let gate = random_gate(4, hq, hkv, d, 40);
    let g = gate.handle.0;
    expect(unsafe { seer_gate_upload(g) }, SEER_OK, "seer_gate_upload");
    let lens = [(1000, 1000), (256, 1500), (64, 64)];
    let rules: Vec<SeerMaskParams> = (0..4)
        .map(|l| {
            let p = gate.handle.params(l as u32);
            [threshold(p, 0.01, false), top_k(p, 0.3, true), threshold(p, 0.02, true), top_k(p, 0.1, false)][l]
        })
        .collect();
    let layers: Vec<Layer> = (0..4).map(|_| Layer::new(&ctx, &gate.handle, &lens)).collect();
    let inputs = |round: u64| -> Vec<Inputs> {
        (0..4).map(|l| structured_inputs(&lens, hq, hkv, d, 1000 * round + 10 * l as u64)).collect()
    };
    let enqueue = || -> seerattn::Result<()> {
        for (l, layer) in layers.iter().enumerate() {
            ok(unsafe { layer.gate_attention(g, &rules[l], &stream) }, &format!("layer {l}"))?;
        }
        Ok(())
    };
    // One eager run first: the first call on a context loads the kernels,
    // which is not capturable.
    for (layer, x) in layers.iter().zip(inputs(1000)) {
        layer.upload(&ctx, &x);
    }
    enqueue().unwrap();
    stream.synchronize().unwrap();
    let graph = unsafe { testing::capture_with(&stream, CaptureMode::Global, enqueue) }
        .unwrap_or_else(|e| panic!("capturing four layers of gate + prefill: {e}"));
    let kinds = graph.node_kinds().unwrap();
    assert!(kinds.len() >= 8 && kinds.iter().all(|k| k == "kernel"), "the graph holds other than kernels: {kinds:?}");
    for round in 0..repeats(20) as u64 {
        let x = inputs(round);
        // New inputs in the same buffers, on the stream, outside the graph.
        for (layer, x) in layers.iter().zip(&x) {
            layer.upload_async(&stream, x);
        }
        for layer in &layers {
            layer.outputs.poison(&ctx);
        }
        graph.launch(&stream).unwrap();
        stream.synchronize().unwrap();
        let replayed: Vec<Results> = layers.iter().map(|l| l.outputs.read(&ctx)).collect();
        for layer in &layers {
            layer.outputs.poison(&ctx);
        }
        enqueue().unwrap();
        stream.synchronize().unwrap();
        for (l, layer) in layers.iter().enumerate() {
            let what = format!("round {round} layer {l}");
            let density = check_whole(&what, &layer.batch(), hq, &rules[l], &replayed[l]);
            assert!(density > 0.0, "{what}: an empty mask");
            assert_same(&format!("{what}: replay vs eager"), &replayed[l], &layer.outputs.read(&ctx));
        }
    }
    eprintln!("4 layers in one graph of {} kernels: 20 replays with new inputs equal the eager runs", kinds.len());
}

// -------------------------------------------------------------- hot path --

/// The hot path allocates nothing, copies nothing between host and device
/// and synchronizes nothing, shown in two ways:
///
/// 1. Here, at run time: the whole hot path of a chunked-prefill step (the
///    K-block cache update, the mask from the caches, the split-KV prefill)
///    and a one-shot `seer_gate_attention` are captured in
///    `CU_STREAM_CAPTURE_MODE_GLOBAL`. In that mode the driver refuses every
///    call it deems unsafe during a capture (allocations, the driver's own
///    example, synchronous copies, synchronizations) from *any* thread of
///    the process, and the refusal invalidates the capture: a capture that
///    ends cleanly means no such call happened while the library enqueued
///    its work. A control run shows that this driver does refuse: an
///    allocation on another thread during a global capture fails it. Work
///    enqueued on the stream is recorded instead: the graph holds kernel
///    nodes only (a copy or memset node would be a host-device copy or a
///    fill on the stream, an alloc node an allocation), and replaying it
///    reproduces the eager results bit for bit (work put on any other stream,
///    which a capture would not record, would be missing).
/// 2. In the source (`only_the_upload_allocates_copies_or_synchronizes`,
///    no GPU needed): the library's only calls to allocating, copying or
///    synchronizing driver functions are the upload's.
#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_hot_path_captures_in_global_mode_as_kernels_only() {
    let _x = exclusive();
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();

    // Control: an allocation on another thread during a global capture.
    let mut refused = None;
    let control = unsafe {
        testing::capture_with(&stream, CaptureMode::Global, || {
            refused =
                Some(std::thread::scope(|s| s.spawn(|| testing::alloc_zeroed(&ctx, 1 << 20).err()).join().unwrap()));
            Ok(())
        })
    };
    let refused = refused.unwrap();
    eprintln!("control: allocation on another thread: {refused:?}; capture: {:?}", control.as_ref().err());
    assert!(
        refused.is_some() || control.is_err(),
        "the driver let another thread allocate during a global-mode capture: this test would prove nothing here"
    );
    drop(control);

    let (hq, hkv, d) = (32, 8, 128);
    let gate = random_gate(1, hq, hkv, d, 21);
    let g = gate.handle.0;
    expect(unsafe { seer_gate_upload(g) }, SEER_OK, "seer_gate_upload");
    let rule = top_k(gate.handle.params(0), 0.2, true);
    // A 512-token chunk over 8192 cached tokens (split-KV: 8 query blocks x
    // 32 heads are too few CTAs), and a one-shot varlen batch.
    let n = 8192 + 512;
    let seq = Layer::new(&ctx, &gate.handle, &[(n, n)]);
    seq.upload(&ctx, &structured_inputs(&[(n, n)], hq, hkv, d, 3));
    let chunk = Chunk::new(&ctx, &gate.handle, &seq, 512);
    let one_shot = Layer::new(&ctx, &gate.handle, &[(2000, 2000), (300, 900)]);
    one_shot.upload(&ctx, &structured_inputs(&[(2000, 2000), (300, 900)], hq, hkv, d, 4));
    expect(unsafe { chunk.fill_cache(g, &rule, &stream) }, SEER_OK, "seer_kblock_cache_update of the prefix");
    stream.synchronize().unwrap();
    let snapshot = read_back(&ctx, chunk.cache.ptr(), chunk.cache.len());

    let step = || -> seerattn::Result<()> {
        unsafe { chunk.step(g, &rule, &stream) }?;
        ok(unsafe { one_shot.gate_attention(g, &rule, &stream) }, "one-shot seer_gate_attention")
    };
    let restore = || {
        testing::copy_to_device(&ctx, chunk.cache.ptr(), &snapshot).unwrap();
        chunk.outputs.poison(&ctx);
        one_shot.outputs.poison(&ctx);
    };
    let read = || {
        (chunk.outputs.read(&ctx), one_shot.outputs.read(&ctx), read_back(&ctx, chunk.cache.ptr(), chunk.cache.len()))
    };

    // Eager (this also loads every kernel the capture will launch).
    step().unwrap();
    stream.synchronize().unwrap();
    let eager = read();
    check_whole("eager chunk", &chunk.batch(), hq, &rule, &eager.0);
    check_whole("eager one-shot", &one_shot.batch(), hq, &rule, &eager.1);

    restore();
    let graph = unsafe { testing::capture_with(&stream, CaptureMode::Global, step) }
        .unwrap_or_else(|e| panic!("the hot path broke a global-mode capture: {e}"));
    let kinds = graph.node_kinds().unwrap();
    eprintln!("hot path captured in global mode: {} nodes: {kinds:?}", kinds.len());
    // Update (4 kernels) + mask (4) + split prefill (2) + gate (5) + prefill (1), give or take.
    assert!(kinds.len() >= 10, "too few nodes for the hot path: {kinds:?}");
    assert!(kinds.iter().all(|k| k == "kernel"), "the hot path put other than kernels on the stream: {kinds:?}");
    for replay in 0..2 {
        restore();
        graph.launch(&stream).unwrap();
        stream.synchronize().unwrap();
        let replayed = read();
        assert_same(&format!("replay {replay}: the chunk step"), &replayed.0, &eager.0);
        assert_same(&format!("replay {replay}: the one-shot batch"), &replayed.1, &eager.1);
        assert!(replayed.2 == eager.2, "replay {replay}: the K-block cache after the update differs");
    }
}

/// The source half of the hot-path check (see
/// `gpu_hot_path_captures_in_global_mode_as_kernels_only`): in `src/`, the
/// driver functions that allocate, free, copy, set memory, synchronize,
/// create streams or events, load modules or build graphs are called only
/// by `DeviceBuffer` (the upload's memory), by the module cache (a kernel
/// file's first use on a context: why a graph needs one eager call first)
/// and by `cuda::testing` (test support the library never calls); and
/// `DeviceBuffer` is only allocated by `DeviceGate::upload`, which only
/// `seer_gate_upload` calls. The library reaches the driver through
/// cudarc's raw `sys` bindings only, in `src/cuda/`.
#[test]
fn only_the_upload_allocates_copies_or_synchronizes() {
    let _x = exclusive(); // no CUDA here, but nothing beside a global-mode capture either
    let src = repo_root().join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let name = path.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
                files.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    assert!(files.iter().any(|(n, _)| n == "cuda/memory.rs"), "src/ not found at {}", src.display());
    const UNSAFE_ON_THE_HOT_PATH: [&str; 13] = [
        "cuMemAlloc",
        "cuMemFree",
        "cuMemcpy",
        "cuMemset",
        "cuMemHost",
        "Synchronize",
        "cuStreamCreate",
        "cuStreamDestroy",
        "cuEventCreate",
        "cuCtxCreate",
        "cuModuleLoad",
        "cuGraph",
        "Capture",
    ];
    let allowed = |file: &str, f: &str| match file {
        // The upload, and the GPU trainer's own state (DeviceBuffer::zeroed,
        // write, read: training is not a hot path, see src/distill/cuda.rs).
        "cuda/memory.rs" => [
            "cuMemAlloc_v2",
            "cuMemcpyHtoD_v2",
            "cuMemFree_v2",
            "cuMemsetD8_v2",
            "cuMemcpyDtoH_v2",
            "cuStreamSynchronize",
        ]
        .contains(&f),
        "cuda/module.rs" => f == "cuModuleLoadData",
        "cuda/testing.rs" => true,
        _ => false,
    };
    let mut found = Vec::new();
    for (name, text) in &files {
        if text.contains("cudarc::") {
            assert!(name.starts_with("cuda/"), "src/{name} uses cudarc: the driver belongs to src/cuda/");
        }
        for (line_no, line) in text.lines().enumerate() {
            if line.contains("cudarc::driver::") && !line.contains("cudarc::driver::sys") {
                panic!("src/{name}:{}: cudarc beyond its raw bindings: {line}", line_no + 1);
            }
            let code = line.trim_start();
            if (code.starts_with("use ") || code.starts_with("pub use ")) && code.contains("sys::") {
                // Imports of types only (CUxxx), never of functions (cuXxx).
                let items = line.split("sys::").nth(1).unwrap();
                let function = items.split(|c: char| !c.is_alphanumeric() && c != '_').find(|w| w.starts_with("cu"));
                assert!(function.is_none(), "src/{name}:{}: imports a driver function: {line}", line_no + 1);
            }
            for piece in line.split("sys::").skip(1) {
                let f: String = piece.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if f.starts_with("cu") && UNSAFE_ON_THE_HOT_PATH.iter().any(|u| f.contains(u)) {
                    found.push(format!("src/{name}:{}: {f}", line_no + 1));
                    assert!(allowed(name, &f), "src/{name}:{}: {f} outside the upload and test support", line_no + 1);
                }
            }
        }
    }
    // The check sees the calls it is about (it would pass vacuously otherwise).
    for f in ["cuMemAlloc_v2", "cuMemcpyHtoD_v2", "cuModuleLoadData", "cuStreamSynchronize"] {
        assert!(found.iter().any(|l| l.ends_with(f)), "no call of {f} found: the scan is broken ({found:?})");
    }
    // Who allocates device memory, and who calls that.
    let callers = |what: &str| -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, text) in &files {
            for (at, _) in text.match_indices(what) {
                // The function the call sits in: the last `fn` before it.
                let before = &text[..at];
                let f = before.rfind("fn ").map(|i| {
                    before[i + 3..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>()
                });
                out.push((name.clone(), f.unwrap_or_default()));
            }
        }
        out
    };
    for (name, f) in callers("DeviceBuffer::alloc(").into_iter().chain(callers("DeviceBuffer::upload(")) {
        let ok = matches!(
            (name.as_str(), f.as_str()),
            ("cuda/memory.rs", "upload" | "zeroed") | ("gpu/gate.rs", "upload") | ("distill/cuda.rs", "new")
        ) || name == "cuda/testing.rs";
        assert!(ok, "src/{name}: fn {f} allocates device memory");
    }
    for (name, f) in callers("DeviceGate::upload(") {
        assert!(
            matches!((name.as_str(), f.as_str()), ("ffi/gate.rs", "seer_gate_upload") | ("distill/cuda.rs", "new")),
            "DeviceGate::upload called by src/{name}: fn {f}"
        );
    }
    // The trainer's scratch and state: created by the trainer only (new,
    // ensure, discard), never by inference code.
    for (name, f) in callers("DeviceBuffer::zeroed(") {
        assert!(
            name == "distill/cuda.rs" && ["new", "ensure", "discard_accumulated"].contains(&f.as_str()),
            "src/{name}: fn {f} allocates device memory"
        );
    }
    for (name, _) in callers("testing::") {
        assert!(name.starts_with("cuda/"), "src/{name} uses cuda::testing");
    }
}

// ----------------------------------------------------------------- sizes --

/// The sizes of one batch, from the C API.
struct Sizes {
    mask: SeerMaskSizes,
    gate_ws: usize,
    prefill_ws: usize,
}

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

fn tri(n: usize) -> usize {
    n * (n + 1) / 2
}

/// The C API's sizes of `lens` for `gate`, asserted equal to their formulas:
/// - mask (`seer_mask_sizes`): a row per (sequence, head, query block),
///   each with its causal length of index slots;
/// - gate workspace (`seer_gate_workspace_size`, layout of src/gpu/gate.rs):
///   bf16 pooled Q `[hq][q_blocks + 64][d]`, pooled K `[k_rows][hkv][3d]`
///   and projected K `[hq][k_rows][d]` with `k_rows` the key blocks plus 64,
///   rounded up to 64; f64 RoPE pairs `[longest k_blocks][d/2]`; f32 staging
///   `[seqs][hkv][3d]`; each part from a 256-byte boundary;
/// - prefill workspace (`seer_prefill_workspace_size`): 256 bytes of
///   work-item counters, then when split into `splits` parts each part's
///   f32 output and lse of every row.
fn check_sizes(gate: &capi::Gate, lens: &[(usize, usize)], splits: usize) -> Sizes {
    let c = gate.config();
    let (hq, hkv, d) = (c.num_q_heads as usize, c.num_kv_heads as usize, c.head_dim as usize);
    let l = Lens::new(lens);
    let batch = batch_of(&l);
    let mask = sizes(&l.batch(), hq as u32);
    let (mut gate_ws, mut prefill_ws) = (0, 0);
    expect(unsafe { seer_gate_workspace_size(gate.0, &l.batch(), CUDA, &mut gate_ws) }, SEER_OK, "gate workspace");
    let status = unsafe { seer_prefill_workspace_size(&l.batch(), hq as u32, d as u32, CUDA, &mut prefill_ws) };
    expect(status, SEER_OK, "prefill workspace");

    let seqs: Vec<_> = batch.seqs(64).collect();
    let q_blocks: usize = seqs.iter().map(|s| s.q_blocks).sum();
    let k_blocks: usize = seqs.iter().map(|s| s.k_blocks).sum();
    let slots: usize = seqs.iter().map(|s| tri(s.k_blocks) - tri(s.first_q_block)).sum();
    assert_eq!(
        (mask.rows, mask.row_offsets_len, mask.indices_len),
        (hq * q_blocks, hq * q_blocks + 1, hq * slots),
        "{lens:?}: mask sizes"
    );
    let k_rows = align(k_blocks + 64, 64);
    let longest = seqs.iter().map(|s| s.k_blocks).max().unwrap();
    let mut ws = 0;
    for part in [
        hq * (q_blocks + 64) * d * 2,
        k_rows * hkv * 3 * d * 2,
        hq * k_rows * d * 2,
        longest * (d / 2) * 8,
        seqs.len() * hkv * 3 * d * 4,
        // The threshold rule's partial (max, sum) per row and chunk of 4 key tiles.
        hq * (q_blocks + 64) * longest.div_ceil(256).max(1) * 8,
    ] {
        ws = align(ws + part, 256);
    }
    assert_eq!(gate_ws, ws, "{lens:?}: gate workspace");
    let rows = batch.total_q() * hq;
    // 256 bytes of work-item counters, then the split-KV parts.
    let want = 256 + if splits == 1 { 0 } else { align(splits * rows * (d + 1) * 4, 256) };
    assert_eq!(prefill_ws, want, "{lens:?}: prefill workspace ({splits} parts)");
    Sizes { mask, gate_ws, prefill_ws }
}

/// `seer_kblock_cache_size` of `tokens`, asserted equal to its formula: the
/// f32 partial-block state `[hkv][3d]` (256-aligned), then bf16 projected K
/// rows `[blocks rounded up to 64][hq][d]`.
fn kblock_cache_size(gate: &capi::Gate, tokens: usize, hq: usize, hkv: usize, d: usize) -> usize {
    let mut bytes = 0;
    expect(unsafe { seer_kblock_cache_size(gate.0, tokens as u64, &mut bytes) }, SEER_OK, "seer_kblock_cache_size");
    let want = align(hkv * 3 * d * 4, 256) + align(tokens.div_ceil(64), 64) * hq * d * 2;
    assert_eq!(bytes, want, "K-block cache of {tokens} tokens");
    bytes
}

/// The varlen batch of `gpu_scale_batch_past_2_31_elements`: 64 chunks of
/// 8256 to 8312 queries over 25000 to 25052 earlier keys, so that Q, K, V and
/// the output each hold more than 2^31 elements (32 query heads, 8 KV heads,
/// head_dim 128).
fn past_2_31_lens() -> Vec<(usize, usize)> {
    (0..64)
        .map(|s| {
            let q = 8256 + 7 * (s % 9);
            (q, q + 25_000 + 13 * (s % 5))
        })
        .collect()
}

#[test]
fn scale_sizes_are_the_formulas() {
    let _x = exclusive(); // no CUDA here, but nothing beside a global-mode capture either
                          // No GPU needed: every size is a pure function of the gate and batch.
    let gate = random_gate(1, 32, 8, 128, 1);
    if !cuda::cuda_enabled() {
        let (mut bytes, l) = (0usize, Lens::new(&[(100, 100)]));
        let status = unsafe { seer_gate_workspace_size(gate.handle.0, &l.batch(), CUDA, &mut bytes) };
        expect(status, SEER_UNSUPPORTED, "CUDA sizes in a build without kernels");
        return;
    }
    for (lens, splits) in [
        (vec![(131072, 131072)], 1),
        (vec![(262144, 262144)], 1),
        (vec![(512, 131072)], 2),
        (vec![(512, 262144)], 2),
        (vec![(261632, 261632)], 1),
        (vec![(512, 8704)], 2),
        (vec![(1000, 1000), (256, 1500), (64, 64)], 1),
        (past_2_31_lens(), 1),
    ] {
        check_sizes(&gate.handle, &lens, splits);
    }
    for tokens in [1, 64, 65, 8704, 131072, 262144, 1 << 20] {
        kblock_cache_size(&gate.handle, tokens, 32, 8, 128);
    }
    // 2^31: the batch above crosses it in every tensor.
    let l = Lens::new(&past_2_31_lens());
    assert!(l.total_q() * 32 * 128 > 1 << 31 && l.total_k() * 8 * 128 > 1 << 31, "{} / {}", l.total_q(), l.total_k());
}

// ----------------------------------------------------------------- scale --

/// Phases of a long test, timed on stderr.
struct Clock(Instant, String);

impl Clock {
    fn new(what: &str) -> Clock {
        Clock(Instant::now(), what.to_string())
    }
    fn lap(&mut self, phase: &str) {
        eprintln!("{}: {phase}: {:.2} s", self.1, self.0.elapsed().as_secs_f64());
        self.0 = Instant::now();
    }
}

/// Host copies of a batch's inputs (q also the gate's q_nope, k its k_nope).
#[derive(Clone, Copy)]
struct Host<'a> {
    batch: &'a Batch,
    hq: usize,
    hkv: usize,
    d: usize,
    q: &'a [u8],
    k: &'a [u8],
    v: &'a [u8],
}

impl<'a> Host<'a> {
    fn of(batch: &'a Batch, x: &'a Inputs) -> Host<'a> {
        Host { batch, hq: x.hq, hkv: x.hkv, d: x.d, q: bytes(&x.q), k: bytes(&x.k), v: bytes(&x.v) }
    }
    fn views(&self) -> [Tensor3<'a>; 3] {
        let (tq, tk) = (self.batch.total_q(), self.batch.total_k());
        [
            Tensor3::new("q", self.q, DType::BF16, Layout3::contiguous(tq, self.hq, self.d)).unwrap(),
            Tensor3::new("k", self.k, DType::BF16, Layout3::contiguous(tk, self.hkv, self.d)).unwrap(),
            Tensor3::new("v", self.v, DType::BF16, Layout3::contiguous(tk, self.hkv, self.d)).unwrap(),
        ]
    }
}

/// Mask rows of query block `b` of sequence `s` (every head) against the
/// CPU gate. The reference scores a batch of just that block's queries over
/// its sequence's keys up to the block's end: the block's scores in the
/// whole batch (pooling, projection and RoPE are per block, at absolute
/// positions), at a fraction of the cost; top-k counts with the whole
/// sequence's key blocks. Returns the near-tie differences.
fn spot_check_mask(
    what: &str,
    gate: &TestGate,
    host: Host,
    rule: &SeerMaskParams,
    gpu: &BlockMask,
    picks: &[(usize, usize)],
) -> usize {
    let (hq, hkv, d) = (host.hq, host.hkv, host.d);
    let layout = MaskLayout::new(host.batch, hq, 64).unwrap();
    let (p, layer_index) = (capi::rule(rule), rule.layer as usize);
    // Per pick and head: the row, its id, the reference's probabilities and logits, its selection.
    type Checked = (usize, RowId, Vec<f32>, Vec<f32>, Vec<i32>);
    let per_pick: Vec<Vec<Checked>> = std::thread::scope(|s| {
        let handles: Vec<_> = picks
            .iter()
            .map(|&(seq_index, b)| {
                let (p, layout) = (&p, &layout);
                s.spawn(move || {
                    let seq = host.batch.seq(seq_index, 64);
                    let (lo, hi) = seq.q_block_range(b, 64);
                    let sub = Batch::from_lens(&[(hi - lo, hi)]).unwrap();
                    let q_row = hq * d * 2;
                    let first = seq.q_offset + lo - seq.q_start;
                    let q = &host.q[first * q_row..(first + hi - lo) * q_row];
                    let k = &host.k[seq.k_offset * hkv * d * 2..(seq.k_offset + hi) * hkv * d * 2];
                    let qv = Tensor3::new("q", q, DType::BF16, Layout3::contiguous(hi - lo, hq, d)).unwrap();
                    let kv = Tensor3::new("k", k, DType::BF16, Layout3::contiguous(hi, hkv, d)).unwrap();
                    let scores = gate.rust.scores(layer_index, &qv, &kv, &sub).unwrap();
                    (0..hq)
                        .map(|h| {
                            let r = scores.layout.row(0, h, 0);
                            let (probs, logits) = (scores.row_probs(r).to_vec(), scores.row_logits(r).to_vec());
                            let mut cpu = Vec::new();
                            select_row(p, &logits, &probs, b, seq.k_blocks, &mut cpu);
                            let id = RowId { seq: seq_index, head: h, q_block: b, k_blocks: seq.k_blocks };
                            (layout.row(seq_index, h, b - seq.first_q_block), id, probs, logits, cpu)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let rows = per_pick.iter().flatten().map(|(r, id, probs, logits, cpu)| MaskRowPair {
        r: *r,
        id: *id,
        probs,
        logits,
        gpu: gpu.as_ref().row(*r),
        cpu,
    });
    let near = compare_mask_rows(what, &p, rows);
    eprintln!(
        "{what}: mask rows of {picks:?} (sequence, query block), every head: as the CPU gate's, {near} near-ties"
    );
    near
}

/// Sampled query rows of blocks `picks` ((sequence, absolute query block)):
/// the block's first, second, a middle and its last query, in four heads
/// spread over the KV heads. Packed rows and heads.
fn sample_rows(batch: &Batch, hq: usize, picks: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut rows = Vec::new();
    for &(s, b) in picks {
        let seq = batch.seq(s, 64);
        let (lo, hi) = seq.q_block_range(b, 64);
        let mut positions = vec![lo, lo + 1, (lo + hi) / 2, hi - 1];
        positions.retain(|&p| p < hi);
        positions.dedup();
        for pos in positions {
            for h in [0, hq / 4 + 1, hq / 2 + 2, hq - 1] {
                rows.push((seq.q_offset + pos - seq.q_start, h));
            }
        }
    }
    rows
}

/// The GPU's output and lse at `rows` against `sparse_prefill_rows` over
/// the GPU's own mask: finite, relative error at most 1e-2 per row (the
/// output is bf16), lse within 1e-2 (relative above 1). Returns the worst
/// relative error.
fn spot_check_attention(what: &str, host: Host, gpu_mask: &BlockMask, gpu: &Results, rows: &[(usize, usize)]) -> f64 {
    let (hq, d, tq) = (host.hq, host.d, host.batch.total_q());
    let params = AttentionParams::for_head_dim(d);
    let [q, k, v] = host.views();
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let cpu: Vec<(Vec<f32>, f32)> = std::thread::scope(|s| {
        let handles: Vec<_> = rows
            .chunks(rows.len().div_ceil(threads).max(1))
            .map(|part| {
                let (q, k, v, params) = (&q, &k, &v, &params);
                s.spawn(move || sparse_prefill_rows(q, k, v, host.batch, gpu_mask.as_ref(), params, part).unwrap())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut worst = 0f64;
    for (&(t, h), (c, c_lse)) in rows.iter().zip(&cpu) {
        let at = (t * hq + h) * d * 2;
        let g = decode_bf16(&gpu.out[at..at + d * 2]);
        let g_lse = f32::from_le_bytes(gpu.lse[(h * tq + t) * 4..(h * tq + t) * 4 + 4].try_into().unwrap());
        assert!(g.iter().all(|x| x.is_finite()), "{what}: row {t} head {h}: GPU output not finite: {g:?}");
        let num: f64 = g.iter().zip(c).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        let den: f64 = c.iter().map(|b| (*b as f64).powi(2)).sum();
        let rel = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
        worst = worst.max(rel);
        assert!(rel <= 1e-2, "{what}: row {t} head {h}: relative error {rel:.2e} against the CPU reference");
        // A row that selects nothing: zeros (den = 0 above) and lse -inf on both.
        let lse_ok = if *c_lse == f32::NEG_INFINITY {
            g_lse == f32::NEG_INFINITY
        } else {
            g_lse.is_finite() && (g_lse - c_lse).abs() <= 1e-2 * (1.0 + c_lse.abs())
        };
        assert!(lse_ok, "{what}: row {t} head {h}: lse {g_lse} vs {c_lse}");
    }
    eprintln!("{what}: {} sampled query rows as the CPU reference's, worst relative error {worst:.2e}", rows.len());
    worst
}

/// The top-k rule of the scale tests: about 5% of each long row (top-k of
/// 1 - sqrt(1 - 0.1) = 5.1% of the key blocks), the last two rows dense.
fn scale_rule(gate: &capi::Gate) -> SeerMaskParams {
    top_k(gate.params(0), 0.1, true)
}

/// One sequence of `n` tokens through gate + sparse prefill, then a
/// 512-token chunk at its end over the K-block cache (split-KV).
fn long_sequence(n: usize) {
    let _x = exclusive();
    let what = format!("{}k tokens", n / 1024);
    let mut clock = Clock::new(&what);
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let (hq, hkv, d) = (32, 8, 128);
    let gate = random_gate(1, hq, hkv, d, 7);
    let g = gate.handle.0;
    expect(unsafe { seer_gate_upload(g) }, SEER_OK, "seer_gate_upload");
    let rule = scale_rule(&gate.handle);
    let inputs = structured_inputs(&[(n, n)], hq, hkv, d, 11);
    let batch = batch_of(&inputs.lens);
    clock.lap(&format!("host inputs ({:.1} GiB)", (inputs.q.len() + 2 * inputs.k.len()) as f64 * 2.0 / GIB));
    check_sizes(&gate.handle, &[(n, n)], 1);
    let one = Layer::new(&ctx, &gate.handle, &[(n, n)]);
    one.upload(&ctx, &inputs);
    clock.lap("upload");
    expect(unsafe { one.gate_attention(g, &rule, &stream) }, SEER_OK, "seer_gate_attention");
    stream.synchronize().unwrap();
    clock.lap("GPU gate + sparse prefill (with launch)");
    let r = one.outputs.read(&ctx);
    let density = check_whole(&what, &batch, hq, &rule, &r);
    clock.lap(&format!("read back and checked every row (density {density:.3})"));
    let host = Host::of(&batch, &inputs);
    let kb = n / 64;
    let picks = [(0, 0), (0, kb / 2 + 3), (0, kb - 1)];
    spot_check_mask(&what, &gate, host, &rule, &r.mask, &picks);
    clock.lap("CPU gate on the sampled blocks");
    spot_check_attention(&what, host, &r.mask, &r, &sample_rows(&batch, hq, &picks));
    clock.lap("CPU attention on the sampled rows");

    // A 512-token chunk at the end, over the K-block cache of the rest.
    let chunk = Chunk::new(&ctx, &gate.handle, &one, 512);
    expect(unsafe { chunk.fill_cache(g, &rule, &stream) }, SEER_OK, "seer_kblock_cache_update of the prefix");
    unsafe { chunk.step(g, &rule, &stream) }.unwrap();
    stream.synchronize().unwrap();
    clock.lap("GPU cache of the prefix, chunk update, mask and split-KV prefill");
    let c = chunk.outputs.read(&ctx);
    let chunk_batch = chunk.batch();
    check_whole(&format!("{what}, last chunk"), &chunk_batch, hq, &rule, &c);
    // The chunk's rows are the one-shot mask's last eight block rows, bit for bit.
    let (full, part) = (MaskLayout::new(&batch, hq, 64).unwrap(), MaskLayout::new(&chunk_batch, hq, 64).unwrap());
    for h in 0..hq {
        for i in 0..chunk.chunk / 64 {
            let (a, b) = (c.mask.as_ref().row(part.row(0, h, i)), r.mask.as_ref().row(full.row(0, h, kb - 8 + i)));
            assert_eq!(a, b, "{what}: chunk mask row (head {h}, block {}) differs from the one-shot mask", kb - 8 + i);
        }
    }
    let q_row = hq * d * 2;
    let chunk_host = Host { batch: &chunk_batch, q: &host.q[chunk.prefix * q_row..], ..host };
    let chunk_picks = [(0, kb - 8), (0, kb - 5), (0, kb - 1)];
    spot_check_attention(
        &format!("{what}, last chunk"),
        chunk_host,
        &c.mask,
        &c,
        &sample_rows(&chunk_batch, hq, &chunk_picks),
    );
    clock.lap("chunk checked (its mask rows are the one-shot's)");
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_scale_128k_tokens_in_one_sequence() {
    long_sequence(131072);
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_scale_256k_tokens_in_one_sequence() {
    long_sequence(262144);
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_scale_batch_past_2_31_elements() {
    let _x = exclusive();
    let what = "batch past 2^31 elements";
    let mut clock = Clock::new(what);
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let (hq, hkv, d) = (32, 8, 128);
    let lens = past_2_31_lens();
    let gate = random_gate(1, hq, hkv, d, 8);
    let g = gate.handle.0;
    expect(unsafe { seer_gate_upload(g) }, SEER_OK, "seer_gate_upload");
    let rule = scale_rule(&gate.handle);
    let inputs = structured_inputs(&lens, hq, hkv, d, 12);
    let batch = batch_of(&inputs.lens);
    let (tq, tk) = (batch.total_q(), batch.total_k());
    let limit = 1usize << 31;
    assert!(tq * hq * d > limit && tk * hkv * d > limit, "the batch must cross 2^31 elements in q, k, v and out");
    clock.lap(&format!(
        "host inputs: q {} and k, v {} elements each ({:.1} GiB)",
        tq * hq * d,
        tk * hkv * d,
        (inputs.q.len() + 2 * inputs.k.len()) as f64 * 2.0 / GIB
    ));
    check_sizes(&gate.handle, &lens, 1);
    let layer = Layer::new(&ctx, &gate.handle, &lens);
    layer.upload(&ctx, &inputs);
    clock.lap("upload");
    expect(unsafe { layer.gate_attention(g, &rule, &stream) }, SEER_OK, "seer_gate_attention");
    stream.synchronize().unwrap();
    clock.lap("GPU gate + sparse prefill (with launch)");
    let r = layer.outputs.read(&ctx);
    let density = check_whole(what, &batch, hq, &rule, &r);
    clock.lap(&format!("read back and checked every row (density {density:.3})"));

    // First, middle and last sequence; the last one's last block lies past
    // 2^31 elements in q and out, and its keys past 2^31 elements in k and v.
    let block = |s: usize, which: usize| {
        let seq = batch.seq(s, 64);
        [seq.first_q_block, seq.first_q_block + seq.q_blocks / 2, seq.k_blocks - 1][which]
    };
    let picks = [
        (0, block(0, 0)),
        (0, block(0, 2)),
        (31, block(31, 1)),
        (63, block(63, 0)),
        (63, block(63, 1)),
        (63, block(63, 2)),
    ];
    let rows = sample_rows(&batch, hq, &picks);
    let last = batch.seq(63, 64);
    let (t_last, _) = *rows.last().unwrap();
    assert!(t_last * hq * d >= limit, "the last sampled query row must lie past 2^31 elements of q");
    assert!((last.k_offset + last.k_len - 1) * hkv * d >= limit, "the last keys must lie past 2^31 elements of k");
    let host = Host::of(&batch, &inputs);
    spot_check_mask(what, &gate, host, &rule, &r.mask, &picks);
    clock.lap("CPU gate on the sampled blocks");
    spot_check_attention(what, host, &r.mask, &r, &rows);
    clock.lap("CPU attention on the sampled rows");
}

/// The scale tests' checks, run on the CPU path's own results (no GPU
/// needed): a mask and output the CPU computed over the whole batch must
/// pass `check_whole`, agree with `spot_check_mask` exactly (so that a
/// block's scores in the sub-batch it builds are the block's scores in the
/// batch, top-k counted over the whole sequence) and with
/// `spot_check_attention` (rows, heads and lse found where the GPU's are).
#[test]
fn spot_checks_pass_on_a_cpu_run() {
    let _x = exclusive(); // no CUDA here, but nothing beside a global-mode capture either
    let (hq, hkv, d) = (8, 2, 64);
    let lens = [(400, 400), (100, 500), (70, 70)];
    let gate = random_gate(1, hq, hkv, d, 3);
    let inputs = structured_inputs(&lens, hq, hkv, d, 5);
    let batch = batch_of(&inputs.lens);
    for rule in [top_k(gate.handle.params(0), 0.3, true), threshold(gate.handle.params(0), 0.02, true)] {
        let (status, mut mask) = inputs.mask(gate.handle.0, &rule);
        expect(status, SEER_OK, "CPU mask");
        let (status, out, lse) = inputs.prefill(&mut mask, 0.0);
        expect(status, SEER_OK, "CPU prefill");
        let r = Results {
            mask: BlockMask { counts: mask.counts, indices: mask.indices, row_offsets: mask.offsets },
            out: common::encode(&out, DType::BF16),
            lse: lse.iter().flat_map(|l| l.to_le_bytes()).collect(),
        };
        let density = check_whole("CPU run", &batch, hq, &rule, &r);
        assert!(density > 0.0 && density < 1.0, "density {density}");
        let host = Host::of(&batch, &inputs);
        // Whole blocks, the chunk's partial first block, last blocks.
        let picks = [(0, 0), (0, 3), (0, 6), (1, 6), (1, 7), (2, 1)];
        assert_eq!(spot_check_mask("CPU run", &gate, host, &rule, &r.mask, &picks), 0, "the CPU against itself");
        let worst = spot_check_attention("CPU run", host, &r.mask, &r, &sample_rows(&batch, hq, &picks));
        assert!(worst < 4e-3, "bf16 rounding only: {worst}");
    }
}
