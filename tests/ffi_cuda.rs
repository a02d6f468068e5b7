//! The CUDA path of the C API: `seer_gate_upload`, `seer_gate_workspace_size`
//! and `seer_gate_compute_mask` with `SEER_DEVICE_CUDA` descriptors, called
//! as a C caller would (the `extern "C"` functions of `seerattn::ffi`).
//!
//! - CPU-only tests run everywhere (`cargo test`, CI): workspace sizes,
//!   unsupported gates, no driver, descriptor checks that need no device
//!   (mixed devices, overlap, strides, sizes, the missing upload). Fake
//!   device addresses are used there: every one of these checks happens on
//!   the host, before anything could touch them.
//! - GPU tests (`#[ignore]`d, run by `scripts/gpu-test.sh run`): the bundled
//!   upstream gate through the C API on a caller stream, against the CPU
//!   path of the same C API; bad device buffers; weights set after an
//!   upload; graph capture.

mod common;
use common::capi::rule;
use common::*;
use seerattn::cuda::{self, testing, testing::Stream, Ctx, DeviceBuffer};
use seerattn::ffi::args::{SeerBatch, SeerBlockMask, SeerDevice, SeerTensor};
use seerattn::ffi::attention::{
    seer_gate_attention, seer_prefill_params_default, seer_sparse_prefill, SeerPrefillParams,
};
use seerattn::ffi::gate::{
    seer_gate_compute_mask, seer_gate_config_default, seer_gate_create, seer_gate_destroy, seer_gate_get_config,
    seer_gate_load, seer_gate_set_layer_weights, seer_gate_upload, seer_gate_workspace_size, seer_kblock_cache_size,
    seer_kblock_cache_update, seer_mask_params_default, SeerGate, SeerGateConfig, SeerMaskParams,
};
use seerattn::ffi::mask::{seer_mask_sizes, SeerMaskSizes};
use seerattn::ffi::status::{seer_last_error_message, SeerStatus};
use seerattn::gpu::gate::{kblock_cache_bytes, GatePlan};
use seerattn::*;
use std::ffi::{c_void, CStr, CString};
use std::mem::MaybeUninit;

const CPU: u32 = SeerDevice::SEER_DEVICE_CPU as u32;
const CUDA: u32 = SeerDevice::SEER_DEVICE_CUDA as u32;

fn last_error() -> String {
    unsafe { CStr::from_ptr(seer_last_error_message()) }.to_string_lossy().into_owned()
}

#[track_caller]
fn assert_status(got: SeerStatus, want: SeerStatus, what: &str) -> String {
    let msg = if got == SeerStatus::SEER_OK { String::new() } else { last_error() };
    assert_eq!(got, want, "{what}: {msg}");
    msg
}

/// A gate handle, destroyed on drop.
struct Handle(*mut SeerGate);

impl Drop for Handle {
    fn drop(&mut self) {
        unsafe { seer_gate_destroy(self.0) };
    }
}

fn load(dir: &std::path::Path) -> Handle {
    let path = CString::new(dir.to_str().unwrap()).unwrap();
    let mut gate = std::ptr::null_mut();
    assert_status(unsafe { seer_gate_load(path.as_ptr(), &mut gate) }, SeerStatus::SEER_OK, "seer_gate_load");
    Handle(gate)
}

fn bundled() -> Handle {
    load(&upstream_dir().join("gqa4_s1000_gates"))
}

fn config_of(gate: &Handle) -> SeerGateConfig {
    let mut c = MaybeUninit::<SeerGateConfig>::zeroed();
    unsafe { (*c.as_mut_ptr()).struct_size = std::mem::size_of::<SeerGateConfig>() };
    assert_status(unsafe { seer_gate_get_config(gate.0, c.as_mut_ptr()) }, SeerStatus::SEER_OK, "get_config");
    unsafe { c.assume_init() }
}

/// A weightless gate of the released type with the given geometry.
fn created(head_dim: u32, gate_hidden: u32) -> Handle {
    let mut c = MaybeUninit::<SeerGateConfig>::uninit();
    assert_status(unsafe { seer_gate_config_default(c.as_mut_ptr()) }, SeerStatus::SEER_OK, "config_default");
    let mut c = unsafe { c.assume_init() };
    c.num_layers = 1;
    c.num_q_heads = 8;
    c.num_kv_heads = 2;
    c.head_dim = head_dim;
    c.gate_hidden = gate_hidden;
    let mut gate = std::ptr::null_mut();
    assert_status(unsafe { seer_gate_create(&c, &mut gate) }, SeerStatus::SEER_OK, "seer_gate_create");
    Handle(gate)
}

fn mask_params(gate: &Handle) -> SeerMaskParams {
    let mut p = MaybeUninit::<SeerMaskParams>::uninit();
    assert_status(unsafe { seer_mask_params_default(gate.0, p.as_mut_ptr()) }, SeerStatus::SEER_OK, "params_default");
    unsafe { p.assume_init() }
}

/// `cu_seqlens` arrays kept alive with the `SeerBatch` that points at them.
struct Lens {
    q: Vec<i32>,
    k: Vec<i32>,
}

impl Lens {
    fn new(lens: &[(usize, usize)]) -> Lens {
        let mut q = vec![0i32];
        let mut k = vec![0i32];
        for &(lq, lk) in lens {
            q.push(q.last().unwrap() + lq as i32);
            k.push(k.last().unwrap() + lk as i32);
        }
        Lens { q, k }
    }
    fn batch(&self) -> SeerBatch {
        SeerBatch { num_seqs: (self.q.len() - 1) as u32, cu_seqlens_q: self.q.as_ptr(), cu_seqlens_k: self.k.as_ptr() }
    }
    fn rust(&self) -> Batch {
        Batch::from_cu_seqlens(&self.q, &self.k).unwrap()
    }
}

fn sizes(batch: &SeerBatch, hq: u32) -> SeerMaskSizes {
    let mut s = MaybeUninit::<SeerMaskSizes>::zeroed();
    unsafe { (*s.as_mut_ptr()).struct_size = std::mem::size_of::<SeerMaskSizes>() };
    assert_status(unsafe { seer_mask_sizes(batch, hq, 64, s.as_mut_ptr()) }, SeerStatus::SEER_OK, "mask_sizes");
    unsafe { s.assume_init() }
}

fn workspace_size(gate: &Handle, batch: &SeerBatch, device: u32) -> (SeerStatus, usize) {
    let mut bytes = usize::MAX;
    let status = unsafe { seer_gate_workspace_size(gate.0, batch, device, &mut bytes) };
    (status, bytes)
}

/// A contiguous `[tokens, heads, dim]` descriptor.
fn desc(data: u64, dtype: DType, device: u32, shape: [usize; 3]) -> SeerTensor {
    let [t, h, d] = shape.map(|x| x as i64);
    SeerTensor {
        data: data as *mut c_void,
        dtype: match dtype {
            DType::BF16 => 0,
            DType::F16 => 1,
            DType::F32 => 2,
        },
        device,
        shape: [t, h, d],
        strides: [h * d, d, 1],
    }
}

/// Zeroed host mask arrays of the sizes `s`.
fn host_mask(s: &SeerMaskSizes) -> BlockMask {
    BlockMask { counts: vec![0; s.rows], indices: vec![0; s.indices_len], row_offsets: vec![0; s.row_offsets_len] }
}

/// The CPU descriptor of `m` (which must outlive its use).
fn host_mask_desc(m: &mut BlockMask, s: &SeerMaskSizes) -> SeerBlockMask {
    mask_desc(m.counts.as_mut_ptr() as u64, m.indices.as_mut_ptr() as u64, m.row_offsets.as_mut_ptr() as u64, s, CPU)
}

fn mask_desc(counts: u64, indices: u64, offsets: u64, s: &SeerMaskSizes, device: u32) -> SeerBlockMask {
    SeerBlockMask {
        counts: counts as *mut i32,
        counts_len: s.rows,
        indices: indices as *mut i32,
        indices_len: s.indices_len,
        row_offsets: offsets as *mut i64,
        row_offsets_len: s.row_offsets_len,
        device,
    }
}

// ---------------------------------------------------------------- CPU-only

#[test]
fn workspace_size_cpu_is_zero_and_cuda_is_the_plan() {
    let gate = bundled();
    let c = config_of(&gate);
    for lens in [vec![(1000, 1000)], vec![(600, 600), (100, 400), (5, 5)]] {
        let l = Lens::new(&lens);
        let b = l.batch();
        let (status, bytes) = workspace_size(&gate, &b, CPU);
        assert_status(status, SeerStatus::SEER_OK, "CPU workspace");
        assert_eq!(bytes, 0);
        let (status, bytes) = workspace_size(&gate, &b, CUDA);
        if !cuda::cuda_enabled() {
            assert_status(status, SeerStatus::SEER_UNSUPPORTED, "CUDA workspace in a build without kernels");
            continue;
        }
        assert_status(status, SeerStatus::SEER_OK, "CUDA workspace");
        assert!(bytes > 0 && bytes % 256 == 0, "{bytes}");
        let rust_gate = Gate::load_dir(&upstream_dir().join("gqa4_s1000_gates")).unwrap();
        assert_eq!(rust_gate.config().head_dim, c.head_dim as usize);
        assert_eq!(bytes, GatePlan::new(rust_gate.config(), &l.rust()).unwrap().workspace_bytes());
    }
    // Bad arguments.
    let l = Lens::new(&[(100, 100)]);
    let b = l.batch();
    let (status, bytes) = workspace_size(&gate, &b, 7);
    assert_status(status, SeerStatus::SEER_INVALID_ARGUMENT, "device 7");
    assert_eq!(bytes, usize::MAX, "out-parameter written on failure");
    let status = unsafe { seer_gate_workspace_size(gate.0, &b, CUDA, std::ptr::null_mut()) };
    assert_status(status, SeerStatus::SEER_NULL_POINTER, "NULL out_bytes");
    let mut bytes = 0;
    let status = unsafe { seer_gate_workspace_size(std::ptr::null(), &b, CPU, &mut bytes) };
    assert_status(status, SeerStatus::SEER_NULL_POINTER, "NULL gate");
    let status = unsafe { seer_gate_workspace_size(gate.0, std::ptr::null(), CPU, &mut bytes) };
    assert_status(status, SeerStatus::SEER_NULL_POINTER, "NULL batch");
    if cuda::cuda_enabled() {
        let many = Lens::new(&vec![(3, 3); 257]);
        let (status, _) = workspace_size(&gate, &many.batch(), CUDA);
        let msg = assert_status(status, SeerStatus::SEER_UNSUPPORTED, "257 sequences");
        assert!(msg.starts_with("seer_gate_workspace_size: ") && msg.contains("256"), "{msg}");
        let (status, _) = workspace_size(&gate, &many.batch(), CPU);
        assert_status(status, SeerStatus::SEER_OK, "257 sequences on the CPU");
    }
}

#[test]
fn unsupported_gates_are_refused_without_a_device() {
    let l = Lens::new(&[(200, 200)]);
    let b = l.batch();
    for (head_dim, gate_hidden, why) in [(128, 64, "gate_hidden"), (256, 256, "head_dim")] {
        let gate = created(head_dim, gate_hidden);
        let (status, bytes) = workspace_size(&gate, &b, CPU);
        assert_status(status, SeerStatus::SEER_OK, "CPU workspace");
        assert_eq!(bytes, 0);
        let (status, _) = workspace_size(&gate, &b, CUDA);
        let msg = assert_status(status, SeerStatus::SEER_UNSUPPORTED, "CUDA workspace of an unsupported gate");
        if cuda::cuda_enabled() {
            assert!(msg.contains(why), "{msg}");
        }
        let msg = assert_status(unsafe { seer_gate_upload(gate.0) }, SeerStatus::SEER_UNSUPPORTED, "upload");
        assert!(msg.starts_with("seer_gate_upload: ") && msg.contains(why), "{msg}");
    }
}

#[test]
fn upload_without_a_driver_is_a_status() {
    if cuda::driver().is_ok() {
        return; // a GPU machine: the GPU tests cover the upload
    }
    let gate = bundled();
    let want = if cuda::cuda_enabled() { SeerStatus::SEER_NO_DEVICE } else { SeerStatus::SEER_UNSUPPORTED };
    let msg = assert_status(unsafe { seer_gate_upload(gate.0) }, want, "upload without a driver");
    assert!(msg.starts_with("seer_gate_upload: "), "{msg}");
    // Twice: the driver's absence is remembered, still no crash.
    assert_status(unsafe { seer_gate_upload(gate.0) }, want, "second upload without a driver");
    assert_status(unsafe { seer_gate_upload(std::ptr::null_mut()) }, SeerStatus::SEER_NULL_POINTER, "NULL gate");
}

/// Fake, disjoint device addresses for the bundled gate over `lens`: q, k,
/// the three mask arrays and a workspace, 64 MiB apart.
struct Fake {
    lens: Lens,
    sizes: SeerMaskSizes,
    q: SeerTensor,
    k: SeerTensor,
    mask: SeerBlockMask,
    params: SeerMaskParams,
}

const BASE: u64 = 0x7f00_0000_0000;
const GAP: u64 = 64 << 20;

fn fake(gate: &Handle, lens: &[(usize, usize)]) -> Fake {
    let c = config_of(gate);
    let lens = Lens::new(lens);
    let b = lens.batch();
    let sizes = sizes(&b, c.num_q_heads);
    let (tq, tk) = (*lens.q.last().unwrap() as usize, *lens.k.last().unwrap() as usize);
    let (hq, hkv, d) = (c.num_q_heads as usize, c.num_kv_heads as usize, c.head_dim as usize);
    let q = desc(BASE, DType::BF16, CUDA, [tq, hq, d]);
    let k = desc(BASE + GAP, DType::BF16, CUDA, [tk, hkv, d]);
    let mask = mask_desc(BASE + 2 * GAP, BASE + 3 * GAP, BASE + 4 * GAP, &sizes, CUDA);
    let mut params = mask_params(gate);
    params.layer = 1;
    params.workspace = (BASE + 5 * GAP) as *mut c_void;
    params.workspace_bytes = 4 << 20;
    Fake { lens, sizes, q, k, mask, params }
}

impl Fake {
    fn run(&self, gate: &Handle) -> SeerStatus {
        let b = self.lens.batch();
        unsafe { seer_gate_compute_mask(gate.0, &self.params, &b, &self.q, &self.k, &self.mask) }
    }
}

#[test]
fn cuda_descriptors_without_an_upload_are_refused_clearly() {
    let gate = bundled();
    let f = fake(&gate, &[(1000, 1000)]);
    let msg = assert_status(f.run(&gate), SeerStatus::SEER_INVALID_ARGUMENT, "CUDA call before any upload");
    assert!(msg.starts_with("seer_gate_compute_mask: ") && msg.contains("call seer_gate_upload"), "{msg}");
    // A failed upload (no driver here) leaves the gate without a device copy.
    if cuda::driver().is_err() {
        assert_ne!(unsafe { seer_gate_upload(gate.0) }, SeerStatus::SEER_OK);
        let msg = assert_status(f.run(&gate), SeerStatus::SEER_INVALID_ARGUMENT, "CUDA call after a failed upload");
        assert!(msg.contains("call seer_gate_upload"), "{msg}");
    }
}

#[test]
fn mixed_devices_are_invalid_arguments_naming_the_argument() {
    let gate = bundled();
    let c = config_of(&gate);
    let f = fake(&gate, &[(1000, 1000)]);
    let b = f.lens.batch();
    let (hq, hkv, d) = (c.num_q_heads as usize, c.num_kv_heads as usize, c.head_dim as usize);
    let host_q = vec![0u16; 1000 * hq * d];
    let host_k = vec![0u16; 1000 * hkv * d];
    let (mut counts, mut indices, mut offsets) =
        (vec![0i32; f.sizes.rows], vec![0i32; f.sizes.indices_len], vec![0i64; f.sizes.row_offsets_len]);
    let cpu_q = desc(host_q.as_ptr() as u64, DType::BF16, CPU, [1000, hq, d]);
    let cpu_k = desc(host_k.as_ptr() as u64, DType::BF16, CPU, [1000, hkv, d]);
    let cpu_mask =
        mask_desc(counts.as_mut_ptr() as u64, indices.as_mut_ptr() as u64, offsets.as_mut_ptr() as u64, &f.sizes, CPU);
    let mut cpu_params = f.params;
    cpu_params.workspace = std::ptr::null_mut();
    cpu_params.workspace_bytes = 0;
    let run = |p: &SeerMaskParams, q: &SeerTensor, k: &SeerTensor, m: &SeerBlockMask| unsafe {
        seer_gate_compute_mask(gate.0, p, &b, q, k, m)
    };
    let cases: [(&str, &SeerMaskParams, &SeerTensor, &SeerTensor, &SeerBlockMask, &str); 5] = [
        ("CPU q_nope, CUDA k_nope", &cpu_params, &cpu_q, &f.k, &cpu_mask, "k_nope"),
        ("CUDA q_nope, CPU k_nope", &f.params, &f.q, &cpu_k, &f.mask, "k_nope"),
        ("CUDA inputs, CPU mask", &f.params, &f.q, &f.k, &cpu_mask, "out_mask"),
        ("CPU inputs, CUDA mask", &cpu_params, &cpu_q, &cpu_k, &f.mask, "out_mask"),
        ("CUDA q_nope, unknown device k_nope", &f.params, &f.q, &SeerTensor { device: 9, ..f.k }, &f.mask, "k_nope"),
    ];
    for (what, p, q, k, m, name) in cases {
        let msg = assert_status(run(p, q, k, m), SeerStatus::SEER_INVALID_ARGUMENT, what);
        assert!(msg.starts_with(&format!("seer_gate_compute_mask: {name}")), "{what}: {msg}");
    }
    let msg = assert_status(
        run(&f.params, &SeerTensor { device: 5, ..f.q }, &f.k, &f.mask),
        SeerStatus::SEER_INVALID_ARGUMENT,
        "unknown device",
    );
    assert!(msg.contains("not a SeerDevice"), "{msg}");
    // The CPU path still works with host buffers.
    assert_status(run(&cpu_params, &cpu_q, &cpu_k, &cpu_mask), SeerStatus::SEER_OK, "CPU path");
}

#[test]
fn cuda_descriptors_are_checked_on_the_host_first() {
    let gate = bundled();
    let f = fake(&gate, &[(1000, 1000)]);
    let expect = |g: &Fake, want: SeerStatus, needle: &str, what: &str| {
        let msg = assert_status(g.run(&gate), want, what);
        assert!(msg.contains(needle), "{what}: {msg}");
    };
    let with = |edit: &dyn Fn(&mut Fake)| {
        let mut g = fake(&gate, &[(1000, 1000)]);
        edit(&mut g);
        g
    };
    use SeerStatus::*;
    expect(&with(&|g| g.q.strides[0] = -1), SEER_INVALID_ARGUMENT, "non-negative", "negative stride");
    expect(&with(&|g| g.q.shape[1] = 0), SEER_INVALID_ARGUMENT, "positive", "zero extent");
    expect(&with(&|g| g.q.data = std::ptr::null_mut()), SEER_NULL_POINTER, "q_nope->data", "NULL data");
    expect(&with(&|g| g.k.data = (BASE + GAP + 1) as *mut c_void), SEER_INVALID_ARGUMENT, "aligned", "odd address");
    expect(&with(&|g| g.q.dtype = 9), SEER_INVALID_ARGUMENT, "SeerDType", "unknown dtype");
    expect(&with(&|g| g.q.strides[0] = i64::MAX / 2), SEER_INVALID_ARGUMENT, "q_nope", "overflowing stride");
    expect(&with(&|g| g.mask.counts = std::ptr::null_mut()), SEER_NULL_POINTER, "mask->counts", "NULL counts");
    expect(
        &with(&|g| g.mask.row_offsets = (BASE + 4 * GAP + 4) as *mut i64),
        SEER_INVALID_ARGUMENT,
        "aligned",
        "offsets",
    );
    expect(
        &with(&|g| g.params.workspace = (BASE + (1 << 20)) as *mut c_void),
        SEER_INVALID_ARGUMENT,
        "params->workspace overlaps q_nope",
        "workspace overlapping q",
    );
    expect(
        &with(&|g| g.mask.indices = g.mask.counts),
        SEER_INVALID_ARGUMENT,
        "overlaps",
        "mask arrays overlapping each other",
    );
    expect(
        &with(&|g| g.mask.counts = (BASE + 5 * GAP + 256) as *mut i32),
        SEER_INVALID_ARGUMENT,
        "mask->counts overlaps params->workspace",
        "mask inside the workspace",
    );
    expect(
        &with(&|g| g.params.workspace = std::ptr::null_mut()),
        SEER_NULL_POINTER,
        "params->workspace",
        "NULL workspace with a size",
    );
    expect(&with(&|g| g.mask.indices_len = 3), SEER_BUFFER_TOO_SMALL, "seer_mask_sizes", "indices too small");
    // Reads may overlap each other (q and k views of one fused buffer):
    // such a call gets as far as the upload check.
    expect(&with(&|g| g.k.data = g.q.data), SEER_INVALID_ARGUMENT, "call seer_gate_upload", "q and k overlapping");
    // An unsupported gate says so (not "upload first": the upload would fail too).
    let unsupported = created(128, 64);
    let mut g = fake(&unsupported, &[(200, 200)]);
    g.params.layer = 0;
    let msg = assert_status(g.run(&unsupported), SEER_UNSUPPORTED, "unsupported gate");
    assert!(msg.contains("gate_hidden"), "{msg}");
    drop(f);
}

// ---------------------------------------------------------------- GPU

fn ctx() -> Ctx {
    cuda::current_context().expect("a CUDA device")
}

fn to_device(ctx: &Ctx, bytes: &[u8]) -> DeviceBuffer {
    let b = testing::alloc_zeroed(ctx, bytes.len()).unwrap();
    testing::copy_to_device(ctx, b.ptr(), bytes).unwrap();
    b
}

fn read_back(ctx: &Ctx, b: &DeviceBuffer) -> Vec<u8> {
    let mut v = vec![0u8; b.len()];
    testing::copy_to_host(ctx, &mut v, b.ptr()).unwrap();
    v
}

/// Device mask arrays and workspace for one batch, poisoned (0xff) so that
/// an unwritten entry shows.
struct DeviceOut {
    sizes: SeerMaskSizes,
    counts: DeviceBuffer,
    indices: DeviceBuffer,
    offsets: DeviceBuffer,
    workspace: DeviceBuffer,
}

impl DeviceOut {
    fn new(ctx: &Ctx, gate: &Handle, batch: &SeerBatch) -> DeviceOut {
        let sizes = sizes(batch, config_of(gate).num_q_heads);
        let (status, ws) = workspace_size(gate, batch, CUDA);
        assert_status(status, SeerStatus::SEER_OK, "CUDA workspace size");
        let poisoned = |len: usize| to_device(ctx, &vec![0xffu8; len]);
        DeviceOut {
            sizes,
            counts: poisoned(sizes.rows * 4),
            indices: poisoned(sizes.indices_len * 4),
            offsets: poisoned(sizes.row_offsets_len * 8),
            workspace: poisoned(ws),
        }
    }
    fn desc(&self) -> SeerBlockMask {
        mask_desc(self.counts.ptr(), self.indices.ptr(), self.offsets.ptr(), &self.sizes, CUDA)
    }
    fn params(&self, base: SeerMaskParams, stream: &Stream) -> SeerMaskParams {
        SeerMaskParams {
            cuda_stream: stream.raw() as *mut c_void,
            workspace: self.workspace.ptr() as *mut c_void,
            workspace_bytes: self.workspace.len(),
            ..base
        }
    }
    fn read(&self, ctx: &Ctx) -> BlockMask {
        let i32s = |v: Vec<u8>| v.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
        BlockMask {
            counts: i32s(read_back(ctx, &self.counts)),
            indices: i32s(read_back(ctx, &self.indices)),
            row_offsets: read_back(ctx, &self.offsets)
                .chunks(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        }
    }
}

/// The first `tokens` rows of a stored `[tokens, heads, dim]` bf16 tensor.
fn rows(s: &Stored, tokens: usize) -> (&[u8], [usize; 3]) {
    let shape = [tokens, s.shape[1], s.shape[2]];
    (&s.bytes[..shape.iter().product::<usize>() * 2], shape)
}

fn host_view(s: &Stored, tokens: usize) -> Tensor3<'_> {
    let (bytes, [t, h, d]) = rows(s, tokens);
    Tensor3::new("stored", bytes, DType::BF16, Layout3::contiguous(t, h, d)).unwrap()
}

/// The CPU path of the same C API: host descriptors, host mask; the first
/// `tq` / `tk` rows of the stored q and k.
fn cpu_mask(
    gate: &Handle,
    params: &SeerMaskParams,
    batch: &SeerBatch,
    q: &Stored,
    k: &Stored,
    tq: usize,
    tk: usize,
) -> BlockMask {
    let s = sizes(batch, config_of(gate).num_q_heads);
    let mut m = host_mask(&s);
    let md = host_mask_desc(&mut m, &s);
    let ((qb, qs), (kb, ks)) = (rows(q, tq), rows(k, tk));
    let qd = desc(qb.as_ptr() as u64, DType::BF16, CPU, qs);
    let kd = desc(kb.as_ptr() as u64, DType::BF16, CPU, ks);
    let p = SeerMaskParams {
        cuda_stream: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        workspace_bytes: 0,
        ..*params
    };
    assert_status(unsafe { seer_gate_compute_mask(gate.0, &p, batch, &qd, &kd, &md) }, SeerStatus::SEER_OK, "CPU mask");
    m
}

/// The upstream gqa4_s1000 case on the device.
struct Inputs {
    case: Case,
    q: DeviceBuffer,
    k: DeviceBuffer,
}

impl Inputs {
    fn new(ctx: &Ctx) -> Inputs {
        let case = Case::load("gqa4_s1000");
        let q = to_device(ctx, &case.get("q_nope").bytes);
        let k = to_device(ctx, &case.get("k_nope").bytes);
        Inputs { case, q, k }
    }
    /// CUDA descriptors of the first `tq` / `tk` rows of q and k.
    fn descs(&self, tq: usize, tk: usize) -> (SeerTensor, SeerTensor) {
        (
            desc(self.q.ptr(), DType::BF16, CUDA, rows(self.case.get("q_nope"), tq).1),
            desc(self.k.ptr(), DType::BF16, CUDA, rows(self.case.get("k_nope"), tk).1),
        )
    }
}

/// The rules every GPU comparison runs: the gate's default, upstream's
/// thresholds with bf16 comparison and empty rows, and top-k.
fn rules(base: SeerMaskParams) -> Vec<SeerMaskParams> {
    let mut out = vec![base];
    for t in [0.002f32, 0.01, 0.05] {
        out.push(SeerMaskParams {
            sparsity_method: 0,
            threshold: t,
            last_block_dense: 1,
            empty_rows: 1,
            threshold_compare: 1,
            ..base
        });
    }
    out.push(SeerMaskParams { sparsity_method: 1, nz_ratio: 0.3, last_block_dense: 0, ..base });
    out
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_mask_matches_the_cpu_path_on_the_upstream_case() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let inputs = Inputs::new(&ctx);
    let case = &inputs.case;
    let gate = load(&case.gate_dir());
    let rust_gate = Gate::load_dir(&case.gate_dir()).unwrap();
    let layer = case.gate_layer();
    let n = case.usize("seq_len");
    // One sequence as upstream ran it, and the same tokens as a varlen batch
    // of two (the second a chunk of 200 queries over 400 keys).
    for lens in [vec![(n, n)], vec![(600, 600), (200, 400)]] {
        let l = Lens::new(&lens);
        let b = l.batch();
        let (tq, tk) = (l.rust().total_q(), l.rust().total_k());
        let (q, k) = inputs.descs(tq, tk);
        let out = DeviceOut::new(&ctx, &gate, &b);
        let mut base = mask_params(&gate);
        base.layer = layer as u32;
        if lens.len() == 1 {
            let msg = assert_status(
                unsafe { seer_gate_compute_mask(gate.0, &out.params(base, &stream), &b, &q, &k, &out.desc()) },
                SeerStatus::SEER_INVALID_ARGUMENT,
                "CUDA call before the upload",
            );
            assert!(msg.contains("call seer_gate_upload"), "{msg}");
            assert_status(unsafe { seer_gate_upload(gate.0) }, SeerStatus::SEER_OK, "upload");
        }
        let (qv, kv) = (host_view(case.get("q_nope"), tq), host_view(case.get("k_nope"), tk));
        let scores = rust_gate.scores(layer, &qv, &kv, &l.rust()).unwrap();
        for p in rules(base) {
            let params = out.params(p, &stream);
            let status = unsafe { seer_gate_compute_mask(gate.0, &params, &b, &q, &k, &out.desc()) };
            assert_status(status, SeerStatus::SEER_OK, "CUDA compute_mask");
            stream.synchronize().unwrap();
            let gpu = out.read(&ctx);
            let cpu = cpu_mask(&gate, &params, &b, case.get("q_nope"), case.get("k_nope"), tq, tk);
            let what = format!("{lens:?} method {} t={} nz={}", p.sparsity_method, p.threshold, p.nz_ratio);
            let near = compare_masks(&what, &rule(&p), &scores, &gpu, &cpu);
            println!("{what}: {near} near-tie differences");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_refuses_bad_device_buffers() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let inputs = Inputs::new(&ctx);
    let gate = load(&inputs.case.gate_dir());
    assert_status(unsafe { seer_gate_upload(gate.0) }, SeerStatus::SEER_OK, "upload");
    let n = inputs.case.usize("seq_len");
    let l = Lens::new(&[(n, n)]);
    let b = l.batch();
    let out = DeviceOut::new(&ctx, &gate, &b);
    let mut base = mask_params(&gate);
    base.layer = inputs.case.gate_layer() as u32;
    let params = out.params(base, &stream);
    let (q, k) = inputs.descs(n, n);
    let run = |p: &SeerMaskParams, q: &SeerTensor, m: &SeerBlockMask| unsafe {
        seer_gate_compute_mask(gate.0, p, &b, q, &k, m)
    };

    // Host memory described as CUDA memory (16-byte aligned, so that only
    // the pointer check can object).
    let host = vec![0u128; inputs.case.get("q_nope").bytes.len() / 16];
    let host_q = SeerTensor { data: host.as_ptr() as *mut c_void, ..q };
    let msg = assert_status(run(&params, &host_q, &out.desc()), SeerStatus::SEER_INVALID_ARGUMENT, "host q_nope");
    assert!(msg.contains("q_nope is not device memory"), "{msg}");
    // A workspace one step short of the size the query gave.
    let short = SeerMaskParams { workspace_bytes: out.workspace.len() - 256, ..params };
    let msg = assert_status(run(&short, &q, &out.desc()), SeerStatus::SEER_BUFFER_TOO_SMALL, "small workspace");
    assert!(msg.contains("workspace"), "{msg}");
    // Rows not 16-byte aligned: unsupported by the CUDA gate, with the reason.
    let skewed =
        SeerTensor { data: (q.data as u64 + 2) as *mut c_void, shape: [n as i64 - 1, q.shape[1], q.shape[2]], ..q };
    let l2 = Lens::new(&[(n - 1, n)]);
    let b2 = l2.batch();
    let out2 = DeviceOut::new(&ctx, &gate, &b2);
    let status = unsafe { seer_gate_compute_mask(gate.0, &out2.params(base, &stream), &b2, &skewed, &k, &out2.desc()) };
    let msg = assert_status(status, SeerStatus::SEER_UNSUPPORTED, "misaligned rows");
    assert!(msg.contains("16-byte"), "{msg}");
    // A layer out of range.
    let far = SeerMaskParams { layer: 7, ..params };
    assert_status(run(&far, &q, &out.desc()), SeerStatus::SEER_INVALID_ARGUMENT, "layer out of range");
    // Nothing above was enqueued; the stream is clean, and a good call works.
    stream.synchronize().unwrap();
    assert_status(run(&params, &q, &out.desc()), SeerStatus::SEER_OK, "good call");
    stream.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_set_layer_weights_after_upload_needs_a_new_upload() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let inputs = Inputs::new(&ctx);
    let case = &inputs.case;
    let gate = load(&case.gate_dir());
    let layer = case.gate_layer();
    let n = case.usize("seq_len");
    let l = Lens::new(&[(n, n)]);
    let b = l.batch();
    let out = DeviceOut::new(&ctx, &gate, &b);
    let mut base = mask_params(&gate);
    base.layer = layer as u32;
    // Between 1/11 and 1/10: with zero weights every causal block of a row
    // has probability 1/(q_block + 1), so rows up to q_block 9 are dense and
    // no probability sits near the threshold.
    base.threshold = 0.095;
    let params = out.params(base, &stream);
    let (q, k) = inputs.descs(n, n);
    let run = || unsafe { seer_gate_compute_mask(gate.0, &params, &b, &q, &k, &out.desc()) };
    assert_status(unsafe { seer_gate_upload(gate.0) }, SeerStatus::SEER_OK, "upload");
    assert_status(run(), SeerStatus::SEER_OK, "first upload");
    stream.synchronize().unwrap();

    // New weights for the layer: zeros.
    let mut rust_gate = Gate::load_dir(&case.gate_dir()).unwrap();
    let shape = rust_gate.config().k_weight_shape();
    let zeros = vec![0u16; shape.iter().product()];
    let w = desc(zeros.as_ptr() as u64, DType::BF16, CPU, shape);
    let status = unsafe { seer_gate_set_layer_weights(gate.0, layer as u32, &w, std::ptr::null()) };
    assert_status(status, SeerStatus::SEER_OK, "set_layer_weights");
    let zero_bytes = vec![0u8; zeros.len() * 2];
    rust_gate.set_layer_weights(layer, WeightRef { dtype: DType::BF16, shape, bytes: &zero_bytes }, None).unwrap();

    let msg = assert_status(run(), SeerStatus::SEER_INVALID_ARGUMENT, "CUDA call with stale device weights");
    assert!(msg.contains("call seer_gate_upload again"), "{msg}");
    // The CPU path uses the new weights at once.
    let cpu = cpu_mask(&gate, &params, &b, case.get("q_nope"), case.get("k_nope"), n, n);
    assert_status(unsafe { seer_gate_upload(gate.0) }, SeerStatus::SEER_OK, "second upload");
    assert_status(run(), SeerStatus::SEER_OK, "after the second upload");
    stream.synchronize().unwrap();
    let gpu = out.read(&ctx);
    let scores = rust_gate
        .scores(layer, &host_view(case.get("q_nope"), n), &host_view(case.get("k_nope"), n), &l.rust())
        .unwrap();
    let near = compare_masks("zero weights", &rule(&params), &scores, &gpu, &cpu);
    assert_eq!(near, 0, "zero weights put no probability near the threshold");
    // Slots past a row's count are unused (the GPU leaves what the earlier
    // call wrote there): compare counts, offsets and the selected blocks.
    assert_eq!(gpu.counts, cpu.counts, "zero weights: counts");
    assert_eq!(gpu.row_offsets, cpu.row_offsets, "zero weights: row offsets");
    for r in 0..gpu.counts.len() {
        assert_eq!(gpu.as_ref().row(r), cpu.as_ref().row(r), "zero weights: row {r}");
    }
    // Uniform probabilities 1/(q_block + 1): dense up to q_block 9, then the
    // diagonal alone (kept by the default policy), the last two rows dense.
    let layout = &scores.layout;
    assert_eq!(gpu.as_ref().row(layout.row(0, 0, 5)), [0, 1, 2, 3, 4, 5]);
    assert_eq!(gpu.as_ref().row(layout.row(0, 3, 12)), [12]);
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_call_is_graph_capturable_after_one_eager_call() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let inputs = Inputs::new(&ctx);
    let gate = load(&inputs.case.gate_dir());
    assert_status(unsafe { seer_gate_upload(gate.0) }, SeerStatus::SEER_OK, "upload");
    let n = inputs.case.usize("seq_len");
    let l = Lens::new(&[(n, n)]);
    let b = l.batch();
    let out = DeviceOut::new(&ctx, &gate, &b);
    let mut base = mask_params(&gate);
    base.layer = inputs.case.gate_layer() as u32;
    base.sparsity_method = 1;
    base.nz_ratio = 0.3;
    let params = out.params(base, &stream);
    let (q, k) = inputs.descs(n, n);
    let run = || unsafe { seer_gate_compute_mask(gate.0, &params, &b, &q, &k, &out.desc()) };
    assert_status(run(), SeerStatus::SEER_OK, "eager call");
    stream.synchronize().unwrap();
    let eager = out.read(&ctx);
    // Poison the outputs, then replay the captured call.
    testing::copy_to_device(&ctx, out.counts.ptr(), &vec![0xffu8; out.counts.len()]).unwrap();
    let graph = unsafe {
        testing::capture(&stream, || match run() {
            SeerStatus::SEER_OK => Ok(()),
            s => Err(Error::Cuda(format!("{s:?} during capture: {}", last_error()))),
        })
    }
    .unwrap();
    graph.launch(&stream).unwrap();
    stream.synchronize().unwrap();
    assert_eq!(out.read(&ctx), eager, "graph replay differs from the eager call");
}

// ------------------------------------------------- K-block cache (CPU-only)
//
// `seer_kblock_cache_size`, `seer_kblock_cache_update` and
// `seer_gate_compute_mask` with `SeerMaskParams::maybe_kblock_caches`: the
// checks that need no device, and the struct_size versioning of
// SeerMaskParams (the caches were appended after its first release).

/// `SeerMaskParams` as released first: everything before `maybe_kblock_caches`.
const MASK_PARAMS_V1: usize = std::mem::offset_of!(SeerMaskParams, maybe_kblock_caches);

fn cache_size(gate: &Handle, tokens: u64) -> (SeerStatus, usize) {
    let mut bytes = usize::MAX;
    let status = unsafe { seer_kblock_cache_size(gate.0, tokens, &mut bytes) };
    (status, bytes)
}

#[test]
fn kblock_cache_size_is_the_layouts_and_needs_no_device() {
    let gate = bundled();
    if !cuda::cuda_enabled() {
        let (status, bytes) = cache_size(&gate, 1000);
        assert_status(status, SeerStatus::SEER_UNSUPPORTED, "cache size in a build without kernels");
        assert_eq!(bytes, usize::MAX);
        return;
    }
    let rust_gate = Gate::load_dir(&upstream_dir().join("gqa4_s1000_gates")).unwrap();
    let mut last = 0;
    for tokens in [0u64, 1, 63, 64, 1000, 4096, 4097, 100_000, 1 << 20] {
        let (status, bytes) = cache_size(&gate, tokens);
        assert_status(status, SeerStatus::SEER_OK, "cache size");
        assert!(bytes > 0 && bytes % 256 == 0, "{tokens} tokens: {bytes} bytes");
        assert!(bytes >= last, "{tokens} tokens: {bytes} bytes, less than {last} for fewer tokens");
        assert_eq!(bytes, kblock_cache_bytes(rust_gate.config(), tokens as usize).unwrap(), "{tokens} tokens");
        last = bytes;
    }
    // It grows with the tokens: 64-block tiles of [hq 8][128] bf16 rows.
    let (_, small) = cache_size(&gate, 4096);
    let (_, big) = cache_size(&gate, 4097);
    assert_eq!(big - small, 64 * 8 * 128 * 2);
    let (_, long) = cache_size(&gate, 128 * 1024);
    assert!(long > 16 * small, "{long} vs {small}");
    // Overflow is an argument error, the out-parameter untouched.
    let (status, bytes) = cache_size(&gate, u64::MAX);
    assert_status(status, SeerStatus::SEER_INVALID_ARGUMENT, "u64::MAX tokens");
    assert_eq!(bytes, usize::MAX);
    // Bad arguments.
    let status = unsafe { seer_kblock_cache_size(gate.0, 100, std::ptr::null_mut()) };
    assert_status(status, SeerStatus::SEER_NULL_POINTER, "NULL out_bytes");
    let mut bytes = 0;
    let status = unsafe { seer_kblock_cache_size(std::ptr::null(), 100, &mut bytes) };
    assert_status(status, SeerStatus::SEER_NULL_POINTER, "NULL gate");
    // Gates the CUDA path does not take.
    for (head_dim, gate_hidden, why) in [(128, 64, "gate_hidden"), (256, 256, "head_dim")] {
        let unsupported = created(head_dim, gate_hidden);
        let (status, bytes) = cache_size(&unsupported, 1000);
        let msg = assert_status(status, SeerStatus::SEER_UNSUPPORTED, "cache size of an unsupported gate");
        assert!(msg.starts_with("seer_kblock_cache_size: ") && msg.contains(why), "{msg}");
        assert_eq!(bytes, usize::MAX);
    }
}

#[test]
fn mask_params_default_has_no_caches() {
    let gate = bundled();
    assert_eq!(std::mem::size_of::<SeerMaskParams>(), 80);
    // Garbage everywhere: the default must write every field.
    let mut p = MaybeUninit::<SeerMaskParams>::uninit();
    unsafe { p.as_mut_ptr().cast::<u8>().write_bytes(0xa5, std::mem::size_of::<SeerMaskParams>()) };
    assert_status(unsafe { seer_mask_params_default(gate.0, p.as_mut_ptr()) }, SeerStatus::SEER_OK, "default");
    let p = unsafe { p.assume_init() };
    assert_eq!(p.struct_size, std::mem::size_of::<SeerMaskParams>());
    assert!(p.maybe_kblock_caches.is_null());
    assert_eq!(p.num_kblock_caches, 0);
    assert_eq!(MASK_PARAMS_V1, 64, "the first release's SeerMaskParams (64-bit platforms)");
}

/// Fake device addresses of a chunk: the one-shot [`Fake`] plus k_new
/// (`[total_q, hkv, d]`) and one K-block cache per sequence, each sized for
/// its `k_len`, all 64 MiB apart.
struct FakeChunk {
    f: Fake,
    k_new: SeerTensor,
    caches: Vec<u64>,
}

fn fake_chunk(gate: &Handle, lens: &[(usize, usize)]) -> FakeChunk {
    let f = fake(gate, lens);
    let c = config_of(gate);
    let tq = *f.lens.q.last().unwrap() as usize;
    let k_new = desc(BASE + 6 * GAP, DType::BF16, CUDA, [tq, c.num_kv_heads as usize, c.head_dim as usize]);
    let caches = (0..lens.len() as u64).map(|s| BASE + (7 + s) * GAP).collect();
    FakeChunk { f, k_new, caches }
}

impl FakeChunk {
    fn update(&self, gate: &Handle) -> SeerStatus {
        let b = self.f.lens.batch();
        unsafe {
            seer_kblock_cache_update(gate.0, &self.f.params, &b, &self.k_new, self.caches.as_ptr(), self.caches.len())
        }
    }
    /// `seer_gate_compute_mask` with the caches and no k_nope.
    fn compute(&self, gate: &Handle) -> SeerStatus {
        let b = self.f.lens.batch();
        let params = SeerMaskParams {
            maybe_kblock_caches: self.caches.as_ptr(),
            num_kblock_caches: self.caches.len(),
            ..self.f.params
        };
        unsafe { seer_gate_compute_mask(gate.0, &params, &b, &self.f.q, std::ptr::null(), &self.f.mask) }
    }
}

#[test]
fn kblock_cache_calls_without_an_upload_are_refused_clearly() {
    let gate = bundled();
    // A chunk of 100 queries over 400 keys, and a fresh sequence beside it.
    let f = fake_chunk(&gate, &[(100, 400), (37, 37)]);
    // A failed upload (no driver here) leaves the gate without a device copy;
    // on a GPU machine the gate is simply not uploaded. Either way the calls
    // get past every host check to the upload's absence.
    if cuda::driver().is_err() {
        let want = if cuda::cuda_enabled() { SeerStatus::SEER_NO_DEVICE } else { SeerStatus::SEER_UNSUPPORTED };
        assert_status(unsafe { seer_gate_upload(gate.0) }, want, "upload without a driver");
    }
    if !cuda::cuda_enabled() {
        // Without kernels the cache regions cannot be sized: the gate is refused as unsupported.
        assert_status(f.update(&gate), SeerStatus::SEER_UNSUPPORTED, "update in a build without kernels");
        return;
    }
    let msg = assert_status(f.update(&gate), SeerStatus::SEER_INVALID_ARGUMENT, "update before any upload");
    assert!(msg.starts_with("seer_kblock_cache_update: ") && msg.contains("call seer_gate_upload"), "{msg}");
    let msg = assert_status(f.compute(&gate), SeerStatus::SEER_INVALID_ARGUMENT, "cached mask before any upload");
    assert!(msg.starts_with("seer_gate_compute_mask: ") && msg.contains("call seer_gate_upload"), "{msg}");
    // An unsupported gate says so.
    let unsupported = created(128, 64);
    let mut g = fake_chunk(&unsupported, &[(100, 400)]);
    g.f.params.layer = 0;
    let msg = assert_status(g.update(&unsupported), SeerStatus::SEER_UNSUPPORTED, "update, unsupported gate");
    assert!(msg.contains("gate_hidden"), "{msg}");
    let msg = assert_status(g.compute(&unsupported), SeerStatus::SEER_UNSUPPORTED, "cached mask, unsupported gate");
    assert!(msg.contains("gate_hidden"), "{msg}");
}

#[test]
fn kblock_cache_arguments_are_checked_on_the_host() {
    if !cuda::cuda_enabled() {
        return; // the cache regions are sized by the CUDA layout
    }
    let gate = bundled();
    let lens = [(100, 400), (37, 37)];
    let b_lens = Lens::new(&lens);
    let b = b_lens.batch();
    use SeerStatus::*;
    let update_with = |edit: &dyn Fn(&mut FakeChunk), caches: Option<(*const u64, usize)>| {
        let mut f = fake_chunk(&gate, &lens);
        edit(&mut f);
        let (ptr, n) = caches.unwrap_or((f.caches.as_ptr(), f.caches.len()));
        let status = unsafe { seer_kblock_cache_update(gate.0, &f.f.params, &b, &f.k_new, ptr, n) };
        (status, if status == SEER_OK { String::new() } else { last_error() })
    };
    let expect = |(status, msg): (SeerStatus, String), want: SeerStatus, needle: &str, what: &str| {
        assert_eq!(status, want, "{what}: {msg}");
        assert!(msg.starts_with("seer_kblock_cache_update: ") && msg.contains(needle), "{what}: {msg}");
    };
    let f = fake_chunk(&gate, &lens);
    // num_caches must be the batch's sequence count.
    expect(update_with(&|_| {}, Some((f.caches.as_ptr(), 1))), SEER_INVALID_ARGUMENT, "num_caches = 1", "one cache");
    expect(update_with(&|_| {}, Some((f.caches.as_ptr(), 3))), SEER_INVALID_ARGUMENT, "num_caches = 3", "three");
    expect(update_with(&|_| {}, Some((std::ptr::null(), 0))), SEER_INVALID_ARGUMENT, "num_caches = 0", "no caches");
    expect(update_with(&|_| {}, Some((std::ptr::null(), 2))), SEER_NULL_POINTER, "caches", "NULL caches");
    // k_new: a CUDA descriptor, checked like k_nope.
    expect(
        update_with(&|f| f.k_new.device = CPU, None),
        SEER_INVALID_ARGUMENT,
        "k_new is SEER_DEVICE_CPU",
        "CPU k_new",
    );
    expect(update_with(&|f| f.k_new.data = std::ptr::null_mut(), None), SEER_NULL_POINTER, "k_new->data", "NULL k_new");
    expect(update_with(&|f| f.k_new.strides[1] = -1, None), SEER_INVALID_ARGUMENT, "non-negative", "negative stride");
    // Caches: non-NULL, disjoint from each other, k_new and the workspace.
    expect(update_with(&|f| f.caches[1] = 0, None), SEER_NULL_POINTER, "K-block cache", "NULL cache");
    expect(update_with(&|f| f.caches[1] = f.caches[0], None), SEER_INVALID_ARGUMENT, "overlaps", "a cache twice");
    expect(
        update_with(&|f| f.caches[0] = BASE + 6 * GAP + 4096, None),
        SEER_INVALID_ARGUMENT,
        "overlaps k_new",
        "a cache inside k_new",
    );
    expect(
        update_with(&|f| f.caches[1] = BASE + 5 * GAP, None),
        SEER_INVALID_ARGUMENT,
        "overlaps",
        "a cache on the workspace",
    );
    expect(
        update_with(&|f| f.f.params.struct_size = 8, None),
        SEER_INVALID_ARGUMENT,
        "struct_size",
        "params struct_size 8",
    );
    // The good call reaches the upload check (after the checks above).
    expect(update_with(&|_| {}, None), SEER_INVALID_ARGUMENT, "call seer_gate_upload", "good arguments");

    // compute_mask with caches: the count, and the caches against the outputs.
    let compute_with = |edit: &dyn Fn(&mut FakeChunk, &mut SeerMaskParams)| {
        let mut f = fake_chunk(&gate, &lens);
        // The Vec's buffer stays put while an edit changes its entries.
        let mut p =
            SeerMaskParams { maybe_kblock_caches: f.caches.as_ptr(), num_kblock_caches: f.caches.len(), ..f.f.params };
        edit(&mut f, &mut p);
        let status = unsafe { seer_gate_compute_mask(gate.0, &p, &b, &f.f.q, std::ptr::null(), &f.f.mask) };
        (status, if status == SEER_OK { String::new() } else { last_error() })
    };
    let expect = |(status, msg): (SeerStatus, String), want: SeerStatus, needle: &str, what: &str| {
        assert_eq!(status, want, "{what}: {msg}");
        assert!(msg.starts_with("seer_gate_compute_mask: ") && msg.contains(needle), "{what}: {msg}");
    };
    expect(
        compute_with(&|_, p| p.num_kblock_caches = 1),
        SEER_INVALID_ARGUMENT,
        "params->num_kblock_caches = 1",
        "one cache for two sequences",
    );
    expect(
        compute_with(&|f, _| f.caches[0] = BASE + 2 * GAP + 64),
        SEER_INVALID_ARGUMENT,
        "overlaps",
        "a cache on the mask counts",
    );
    expect(compute_with(&|_, _| {}), SEER_INVALID_ARGUMENT, "call seer_gate_upload", "good arguments, k_nope NULL");
    // Without caches k_nope is required again.
    expect(
        compute_with(&|_, p| {
            p.num_kblock_caches = 0;
            p.maybe_kblock_caches = std::ptr::null();
        }),
        SEER_NULL_POINTER,
        "k_nope",
        "no caches and no k_nope",
    );
}

/// Host descriptors and mask arrays of the bundled case over `n` tokens.
struct HostCall {
    case: Case,
    lens: Lens,
    sizes: SeerMaskSizes,
    q: SeerTensor,
    k: SeerTensor,
    params: SeerMaskParams,
}

impl HostCall {
    fn new(gate: &Handle, n: usize) -> HostCall {
        let case = Case::load("gqa4_s1000");
        let lens = Lens::new(&[(n, n)]);
        let sizes = sizes(&lens.batch(), config_of(gate).num_q_heads);
        let (qb, qs) = rows(case.get("q_nope"), n);
        let (kb, ks) = rows(case.get("k_nope"), n);
        let q = desc(qb.as_ptr() as u64, DType::BF16, CPU, qs);
        let k = desc(kb.as_ptr() as u64, DType::BF16, CPU, ks);
        let mut params = mask_params(gate);
        params.layer = case.gate_layer() as u32;
        HostCall { case, lens, sizes, q, k, params }
    }
    /// The CPU mask with these params (a copy of `self.params`, edited).
    fn run(&self, gate: &Handle, params: *const SeerMaskParams) -> (SeerStatus, BlockMask) {
        let s = &self.sizes;
        let mut m = BlockMask {
            counts: vec![-1; s.rows],
            indices: vec![-1; s.indices_len],
            row_offsets: vec![-1; s.row_offsets_len],
        };
        let md = mask_desc(
            m.counts.as_mut_ptr() as u64,
            m.indices.as_mut_ptr() as u64,
            m.row_offsets.as_mut_ptr() as u64,
            s,
            CPU,
        );
        let b = self.lens.batch();
        let status = unsafe { seer_gate_compute_mask(gate.0, params, &b, &self.q, &self.k, &md) };
        (status, m)
    }
}

#[test]
fn mask_params_of_the_first_release_are_still_read() {
    let gate = bundled();
    let h = HostCall::new(&gate, 300);
    assert!(!h.case.name.is_empty());
    let (status, current) = h.run(&gate, &h.params);
    assert_status(status, SeerStatus::SEER_OK, "CPU mask, current struct_size");

    // A caller compiled against the first header: its struct ends before the
    // caches. Whatever lies past its struct_size is not read (here: a caches
    // pointer and count that would be refused if they were).
    let bogus = [0x1234u64; 3];
    let old = SeerMaskParams {
        struct_size: MASK_PARAMS_V1,
        maybe_kblock_caches: bogus.as_ptr(),
        num_kblock_caches: 3,
        ..h.params
    };
    let (status, m) = h.run(&gate, &old);
    assert_status(status, SeerStatus::SEER_OK, "CPU mask, first-release struct_size");
    assert_eq!(m, current, "first-release struct_size gives another mask");
    // Really only the first-release bytes: from a buffer that ends there.
    let mut bytes = vec![0u64; MASK_PARAMS_V1 / 8];
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&old as *const SeerMaskParams).cast::<u8>(),
            bytes.as_mut_ptr().cast(),
            MASK_PARAMS_V1,
        )
    };
    let (status, m) = h.run(&gate, bytes.as_ptr().cast());
    assert_status(status, SeerStatus::SEER_OK, "CPU mask, a first-release struct in a 64-byte buffer");
    assert_eq!(m, current);
    // Between the releases (no header ever had it): read as the first release.
    let (status, m) = h.run(&gate, &SeerMaskParams { struct_size: MASK_PARAMS_V1 + 8, ..old });
    assert_status(status, SeerStatus::SEER_OK, "struct_size between releases");
    assert_eq!(m, current);
    // A newer caller's larger struct: this release's fields are read, caches included.
    let newer = SeerMaskParams { struct_size: 4096, num_kblock_caches: 1, ..old };
    let (status, _) = h.run(&gate, &newer);
    let msg = assert_status(status, SeerStatus::SEER_INVALID_ARGUMENT, "newer struct_size with caches on the CPU");
    assert!(msg.contains("CUDA path feature"), "{msg}");
    // Below the first release: refused, with both sizes named.
    for size in [0, 8, MASK_PARAMS_V1 - 8, MASK_PARAMS_V1 - 1] {
        let (status, m) = h.run(&gate, &SeerMaskParams { struct_size: size, ..h.params });
        let msg = assert_status(status, SeerStatus::SEER_INVALID_ARGUMENT, &format!("struct_size {size}"));
        assert!(msg.contains("struct_size") && msg.contains(&MASK_PARAMS_V1.to_string()), "{msg}");
        assert!(m.counts.iter().all(|&c| c == -1), "struct_size {size}: the mask was written");
    }

    // The CUDA path of a first-release caller: no caches, so k_nope is required.
    let f = fake_chunk(&gate, &[(100, 400)]);
    let b = f.f.lens.batch();
    let p = SeerMaskParams {
        struct_size: MASK_PARAMS_V1,
        maybe_kblock_caches: f.caches.as_ptr(),
        num_kblock_caches: f.caches.len(),
        ..f.f.params
    };
    let status = unsafe { seer_gate_compute_mask(gate.0, &p, &b, &f.f.q, std::ptr::null(), &f.f.mask) };
    let msg = assert_status(status, SeerStatus::SEER_NULL_POINTER, "first-release params, CUDA, no k_nope");
    assert!(msg.contains("k_nope"), "{msg}");
    let status = unsafe { seer_gate_compute_mask(gate.0, &p, &b, &f.f.q, &f.f.k, &f.f.mask) };
    // The caches lie past a first-release struct and are not read: the plain
    // CUDA path, which gets past every host check to the missing upload in
    // any build (as cuda_descriptors_without_an_upload_are_refused_clearly).
    let msg = assert_status(status, SeerStatus::SEER_INVALID_ARGUMENT, "first-release params, CUDA, with k_nope");
    assert!(msg.contains("call seer_gate_upload"), "{msg}");
}

#[test]
fn kblock_caches_with_host_buffers_are_refused() {
    let gate = bundled();
    let h = HostCall::new(&gate, 300);
    let caches = [BASE, BASE + GAP];
    let with = |n: usize| SeerMaskParams { maybe_kblock_caches: caches.as_ptr(), num_kblock_caches: n, ..h.params };
    let (status, m) = h.run(&gate, &with(1));
    let msg = assert_status(status, SeerStatus::SEER_INVALID_ARGUMENT, "CPU descriptors with caches");
    assert!(
        msg.starts_with("seer_gate_compute_mask: ") && msg.contains("K-block caches are a CUDA path feature"),
        "{msg}"
    );
    assert!(m.counts.iter().all(|&c| c == -1), "the mask was written");
    // A wrong count is named first (it is wrong on any device).
    let (status, _) = h.run(&gate, &with(2));
    let msg = assert_status(status, SeerStatus::SEER_INVALID_ARGUMENT, "CPU descriptors, two caches for one sequence");
    assert!(msg.contains("num_kblock_caches = 2"), "{msg}");
    // NULL caches with a count: no caches (NULL is "none").
    let none = SeerMaskParams { maybe_kblock_caches: std::ptr::null(), num_kblock_caches: 1, ..h.params };
    assert_status(h.run(&gate, &none).0, SeerStatus::SEER_OK, "NULL caches with a count");
    // seer_kblock_cache_update takes only CUDA keys.
    let b = h.lens.batch();
    let status = unsafe { seer_kblock_cache_update(gate.0, &h.params, &b, &h.k, caches.as_ptr(), 1) };
    let msg = assert_status(status, SeerStatus::SEER_INVALID_ARGUMENT, "update with host keys");
    assert!(msg.contains("k_new is SEER_DEVICE_CPU"), "{msg}");
}

// ------------------------------------------------------ K-block cache (GPU)

/// The CPU path of the C API over host bytes: q `[tq, hq, d]` and k
/// `[tk, hkv, d]`, contiguous bf16. No caches (they are a CUDA feature).
fn cpu_mask_of(
    gate: &Handle,
    params: &SeerMaskParams,
    batch: &SeerBatch,
    q: (&[u8], [usize; 3]),
    k: (&[u8], [usize; 3]),
) -> BlockMask {
    let s = sizes(batch, config_of(gate).num_q_heads);
    let mut m = host_mask(&s);
    let md = host_mask_desc(&mut m, &s);
    let qd = desc(q.0.as_ptr() as u64, DType::BF16, CPU, q.1);
    let kd = desc(k.0.as_ptr() as u64, DType::BF16, CPU, k.1);
    let p = SeerMaskParams {
        cuda_stream: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        workspace_bytes: 0,
        maybe_kblock_caches: std::ptr::null(),
        num_kblock_caches: 0,
        ..*params
    };
    assert_status(unsafe { seer_gate_compute_mask(gate.0, &p, batch, &qd, &kd, &md) }, SeerStatus::SEER_OK, "CPU mask");
    m
}

/// Chunked prefill of the upstream gqa4_s1000 case through the C API only:
/// each sequence slot holds the case's tokens; each step is a batch of
/// (slot, new tokens) in batch order. Per step: `seer_kblock_cache_update`
/// with the chunk's keys, then for every rule `seer_gate_compute_mask` with
/// the caches (no k_nope), against the one-shot CUDA mask over all keys so
/// far (same batch: q_len = chunk, k_len = total so far), which it must
/// equal exactly (counts, offsets, selected blocks), and against the CPU
/// path up to near-threshold differences.
fn run_c_api_kcache(name: &str, slots: usize, steps: &[Vec<(usize, usize)>]) {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let case = Case::load("gqa4_s1000");
    let gate = load(&case.gate_dir());
    let rust_gate = Gate::load_dir(&case.gate_dir()).unwrap();
    let layer = case.gate_layer();
    let n = case.usize("seq_len");
    let c = config_of(&gate);
    let (hq, hkv, d) = (c.num_q_heads as usize, c.num_kv_heads as usize, c.head_dim as usize);
    let (q_all, k_all) = (&case.get("q_nope").bytes, &case.get("k_nope").bytes);
    let (q_row, k_row) = (hq * d * 2, hkv * d * 2);
    assert_status(unsafe { seer_gate_upload(gate.0) }, SeerStatus::SEER_OK, "upload");
    let (status, cache_bytes) = cache_size(&gate, n as u64);
    assert_status(status, SeerStatus::SEER_OK, "cache size");
    // Poisoned (0xff: NaN state and rows): an update must not read what no
    // earlier update wrote.
    let caches_buf: Vec<DeviceBuffer> = (0..slots).map(|_| to_device(&ctx, &vec![0xffu8; cache_bytes])).collect();
    let mut done = vec![0usize; slots];
    let mut base = mask_params(&gate);
    base.layer = layer as u32;
    for (step, entries) in steps.iter().enumerate() {
        let lens: Vec<(usize, usize)> = entries.iter().map(|&(s, m)| (m, done[s] + m)).collect();
        let l = Lens::new(&lens);
        let b = l.batch();
        let (tq, tk) = (l.rust().total_q(), l.rust().total_k());
        // Packed host rows: the chunk's queries and keys, and every key so far.
        let cat = |all: &[u8], row: usize, range: &dyn Fn(usize, usize) -> (usize, usize)| -> Vec<u8> {
            entries
                .iter()
                .flat_map(|&(s, m)| {
                    let (from, to) = range(s, m);
                    all[from * row..to * row].to_vec()
                })
                .collect()
        };
        let q_host = cat(q_all, q_row, &|s, m| (done[s], done[s] + m));
        let k_new_host = cat(k_all, k_row, &|s, m| (done[s], done[s] + m));
        let k_host = cat(k_all, k_row, &|s, m| (0, done[s] + m));
        let (q_dev, k_new_dev, k_dev) =
            (to_device(&ctx, &q_host), to_device(&ctx, &k_new_host), to_device(&ctx, &k_host));
        let q = desc(q_dev.ptr(), DType::BF16, CUDA, [tq, hq, d]);
        let k_new = desc(k_new_dev.ptr(), DType::BF16, CUDA, [tq, hkv, d]);
        let k = desc(k_dev.ptr(), DType::BF16, CUDA, [tk, hkv, d]);
        let caches: Vec<u64> = entries.iter().map(|&(s, _)| caches_buf[s].ptr()).collect();
        let cached_out = DeviceOut::new(&ctx, &gate, &b);
        let one_shot_out = DeviceOut::new(&ctx, &gate, &b);

        let status = unsafe {
            seer_kblock_cache_update(
                gate.0,
                &cached_out.params(base, &stream),
                &b,
                &k_new,
                caches.as_ptr(),
                caches.len(),
            )
        };
        assert_status(status, SeerStatus::SEER_OK, "seer_kblock_cache_update");

        let qv = Tensor3::new("q", &q_host, DType::BF16, Layout3::contiguous(tq, hq, d)).unwrap();
        let kv = Tensor3::new("k", &k_host, DType::BF16, Layout3::contiguous(tk, hkv, d)).unwrap();
        let scores = rust_gate.scores(layer, &qv, &kv, &l.rust()).unwrap();
        for p in rules(base) {
            let what =
                format!("{name} step {step} {lens:?} method {} t={} nz={}", p.sparsity_method, p.threshold, p.nz_ratio);
            let cached_params = SeerMaskParams {
                maybe_kblock_caches: caches.as_ptr(),
                num_kblock_caches: caches.len(),
                ..cached_out.params(p, &stream)
            };
            let status =
                unsafe { seer_gate_compute_mask(gate.0, &cached_params, &b, &q, std::ptr::null(), &cached_out.desc()) };
            assert_status(status, SeerStatus::SEER_OK, &format!("{what}: cached compute_mask"));
            let one_shot_params = one_shot_out.params(p, &stream);
            let status = unsafe { seer_gate_compute_mask(gate.0, &one_shot_params, &b, &q, &k, &one_shot_out.desc()) };
            assert_status(status, SeerStatus::SEER_OK, &format!("{what}: one-shot compute_mask"));
            stream.synchronize().unwrap();
            let (cached, one_shot) = (cached_out.read(&ctx), one_shot_out.read(&ctx));
            // Slots past a row's count are unused: compare counts, offsets
            // and the selected blocks.
            assert_eq!(cached.counts, one_shot.counts, "{what}: counts, cached vs one-shot");
            assert_eq!(cached.row_offsets, one_shot.row_offsets, "{what}: row offsets, cached vs one-shot");
            for r in 0..cached.counts.len() {
                assert_eq!(cached.as_ref().row(r), one_shot.as_ref().row(r), "{what}: row {r}, cached vs one-shot");
            }
            let cpu = cpu_mask_of(&gate, &p, &b, (&q_host, [tq, hq, d]), (&k_host, [tk, hkv, d]));
            let near = compare_masks(&format!("{what} (cached vs CPU)"), &rule(&p), &scores, &cached, &cpu);
            println!("{what}: identical to one-shot, {near} near-ties vs CPU");
        }
        for &(s, m) in entries {
            done[s] += m;
        }
    }
    assert!(done.iter().all(|&t| t == n), "{name}: the schedule leaves a sequence unfinished: {done:?}");
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_kblock_cache_chunked_prefill_matches_one_shot() {
    // Chunks that start and end mid-block, one of a single token.
    run_c_api_kcache("one sequence", 1, &[vec![(0, 300)], vec![(0, 64)], vec![(0, 1)], vec![(0, 635)]]);
    // Two sequences at different cached lengths, changing places, one leaving.
    run_c_api_kcache(
        "two sequences",
        2,
        &[vec![(0, 300), (1, 64)], vec![(1, 500), (0, 64)], vec![(0, 1), (1, 436)], vec![(0, 635)]],
    );
}

// ------------------------------------------------ gate + prefill in one call

/// Prefill parameters with the given stream.
fn prefill_params(stream: *mut c_void) -> SeerPrefillParams {
    let mut p = MaybeUninit::<SeerPrefillParams>::uninit();
    assert_status(unsafe { seer_prefill_params_default(p.as_mut_ptr()) }, SeerStatus::SEER_OK, "prefill defaults");
    SeerPrefillParams { cuda_stream: stream, ..unsafe { p.assume_init() } }
}

#[test]
fn gate_attention_on_the_cpu_equals_the_two_calls() {
    let case = Case::load("gqa4_s1000");
    let gate = load(&case.gate_dir());
    let n = 300;
    let l = Lens::new(&[(n, n)]);
    let b = l.batch();
    let c = config_of(&gate);
    let (hq, d) = (c.num_q_heads as usize, c.head_dim as usize);
    let mut mp = mask_params(&gate);
    mp.layer = case.gate_layer() as u32;
    let pp = prefill_params(std::ptr::null_mut());
    let host = |name: &str, tokens: usize| {
        let (bytes, shape) = rows(case.get(name), tokens);
        desc(bytes.as_ptr() as u64, DType::BF16, CPU, shape)
    };
    let (qn, kn, q, k, v) = (host("q_nope", n), host("k_nope", n), host("q", n), host("k", n), host("v", n));
    let s = sizes(&b, hq as u32);
    let run = |combined: bool| {
        let mut m = host_mask(&s);
        let md = host_mask_desc(&mut m, &s);
        let mut out = vec![0xffu8; n * hq * d * 2];
        let mut lse = vec![0f32; n * hq];
        let od = desc(out.as_mut_ptr() as u64, DType::BF16, CPU, [n, hq, d]);
        let status = unsafe {
            if combined {
                seer_gate_attention(gate.0, &mp, &pp, &b, &qn, &kn, &q, &k, &v, &md, &od, lse.as_mut_ptr(), lse.len())
            } else {
                let s1 = seer_gate_compute_mask(gate.0, &mp, &b, &qn, &kn, &md);
                assert_status(s1, SeerStatus::SEER_OK, "compute_mask");
                seer_sparse_prefill(&pp, &b, &q, &k, &v, &md, &od, lse.as_mut_ptr(), lse.len())
            }
        };
        assert_status(status, SeerStatus::SEER_OK, if combined { "seer_gate_attention" } else { "prefill" });
        (m, out, lse)
    };
    let (m1, o1, l1) = run(true);
    let (m2, o2, l2) = run(false);
    assert_eq!(m1, m2, "the combined call's mask");
    assert_eq!(o1, o2, "the combined call's output");
    assert!(l1.iter().zip(&l2).all(|(a, b)| a.to_bits() == b.to_bits()), "the combined call's lse");

    // Devices must agree across the two halves; the gate half's errors are named.
    let cuda_q = SeerTensor { device: CUDA, ..q };
    let mut out = vec![0u8; n * hq * d * 2];
    let od = desc(out.as_mut_ptr() as u64, DType::BF16, CPU, [n, hq, d]);
    let mut m = host_mask(&s);
    let md = host_mask_desc(&mut m, &s);
    let status = unsafe {
        seer_gate_attention(gate.0, &mp, &pp, &b, &qn, &kn, &cuda_q, &k, &v, &md, &od, std::ptr::null_mut(), 0)
    };
    let msg = assert_status(status, SeerStatus::SEER_INVALID_ARGUMENT, "q on another device than q_nope");
    assert!(msg.contains("q"), "{msg}");
    let mut bad = mp;
    bad.layer = 99;
    let status =
        unsafe { seer_gate_attention(gate.0, &bad, &pp, &b, &qn, &kn, &q, &k, &v, &md, &od, std::ptr::null_mut(), 0) };
    let msg = assert_status(status, SeerStatus::SEER_INVALID_ARGUMENT, "bad layer");
    assert!(msg.starts_with("seer_gate_attention: the gate half"), "{msg}");
    let status = unsafe {
        seer_gate_attention(std::ptr::null(), &mp, &pp, &b, &qn, &kn, &q, &k, &v, &md, &od, std::ptr::null_mut(), 0)
    };
    assert_status(status, SeerStatus::SEER_NULL_POINTER, "NULL gate");
    let status = unsafe {
        seer_gate_attention(gate.0, &mp, std::ptr::null(), &b, &qn, &kn, &q, &k, &v, &md, &od, std::ptr::null_mut(), 0)
    };
    assert_status(status, SeerStatus::SEER_NULL_POINTER, "NULL prefill params");
}

#[test]
fn gate_attention_refuses_two_streams_and_a_workspace_over_the_inputs() {
    // Fake device addresses: refused on the host before anything reads them.
    let gate = bundled();
    let c = config_of(&gate);
    let (hq, hkv, d) = (c.num_q_heads as usize, c.num_kv_heads as usize, c.head_dim as usize);
    let n = 128;
    let l = Lens::new(&[(n, n)]);
    let b = l.batch();
    let s = sizes(&b, hq as u32);
    let base = 0x7f00_0000_0000u64;
    let at = |i: u64| base + i * 0x100_0000;
    let (qn, kn) = (desc(at(1), DType::BF16, CUDA, [n, hq, d]), desc(at(2), DType::BF16, CUDA, [n, hkv, d]));
    let (q, k, v) = (
        desc(at(3), DType::BF16, CUDA, [n, hq, d]),
        desc(at(4), DType::BF16, CUDA, [n, hkv, d]),
        desc(at(5), DType::BF16, CUDA, [n, hkv, d]),
    );
    let out = desc(at(6), DType::BF16, CUDA, [n, hq, d]);
    let md = mask_desc(at(7), at(8), at(9), &s, CUDA);
    let mut mp = mask_params(&gate);
    mp.workspace = at(10) as *mut c_void;
    mp.workspace_bytes = 1 << 20;
    mp.cuda_stream = 0x10 as *mut c_void;
    let pp = prefill_params(0x20 as *mut c_void);
    let call = |mp: &SeerMaskParams, pp: &SeerPrefillParams| unsafe {
        seer_gate_attention(gate.0, mp, pp, &b, &qn, &kn, &q, &k, &v, &md, &out, std::ptr::null_mut(), 0)
    };
    let msg = assert_status(call(&mp, &pp), SeerStatus::SEER_INVALID_ARGUMENT, "two streams");
    assert!(msg.contains("cuda_stream"), "{msg}");
    let pp = prefill_params(0x10 as *mut c_void);
    let over = SeerMaskParams { workspace: at(3) as *mut c_void, ..mp };
    let msg = assert_status(call(&over, &pp), SeerStatus::SEER_INVALID_ARGUMENT, "workspace over q");
    assert!(msg.contains("workspace"), "{msg}");
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_api_gate_attention_matches_the_two_calls_the_cpu_and_a_graph() {
    let ctx = ctx();
    let stream = Stream::new(&ctx).unwrap();
    let case = Case::load("gqa4_s1000");
    let gate = load(&case.gate_dir());
    assert_status(unsafe { seer_gate_upload(gate.0) }, SeerStatus::SEER_OK, "upload");
    let c = config_of(&gate);
    let (hq, d) = (c.num_q_heads as usize, c.head_dim as usize);
    let n = case.usize("seq_len");
    let l = Lens::new(&[(n, n)]);
    let b = l.batch();
    let bufs: Vec<DeviceBuffer> =
        ["q_nope", "k_nope", "q", "k", "v"].iter().map(|name| to_device(&ctx, &case.get(name).bytes)).collect();
    let dev =
        |i: usize, name: &str| desc(bufs[i].ptr(), DType::BF16, CUDA, case.get(name).shape.clone().try_into().unwrap());
    let (qn, kn, q, k, v) = (dev(0, "q_nope"), dev(1, "k_nope"), dev(2, "q"), dev(3, "k"), dev(4, "v"));
    let mut base = mask_params(&gate);
    base.layer = case.gate_layer() as u32;
    let pp = prefill_params(stream.raw() as *mut c_void);
    let outs: Vec<(DeviceOut, DeviceBuffer, DeviceBuffer)> = (0..2)
        .map(|_| {
            let m = DeviceOut::new(&ctx, &gate, &b);
            (m, to_device(&ctx, &vec![0xffu8; n * hq * d * 2]), to_device(&ctx, &vec![0xffu8; n * hq * 4]))
        })
        .collect();
    let combined = |i: usize| {
        let (m, o, lse) = &outs[i];
        let od = desc(o.ptr(), DType::BF16, CUDA, [n, hq, d]);
        let mp = m.params(base, &stream);
        unsafe {
            seer_gate_attention(
                gate.0,
                &mp,
                &pp,
                &b,
                &qn,
                &kn,
                &q,
                &k,
                &v,
                &m.desc(),
                &od,
                lse.ptr() as *mut f32,
                n * hq,
            )
        }
    };
    assert_status(combined(0), SeerStatus::SEER_OK, "seer_gate_attention on CUDA");
    {
        let (m, o, lse) = &outs[1];
        let od = desc(o.ptr(), DType::BF16, CUDA, [n, hq, d]);
        let mp = m.params(base, &stream);
        assert_status(
            unsafe { seer_gate_compute_mask(gate.0, &mp, &b, &qn, &kn, &m.desc()) },
            SeerStatus::SEER_OK,
            "mask",
        );
        let status = unsafe { seer_sparse_prefill(&pp, &b, &q, &k, &v, &m.desc(), &od, lse.ptr() as *mut f32, n * hq) };
        assert_status(status, SeerStatus::SEER_OK, "prefill");
    }
    stream.synchronize().unwrap();
    let (mask0, out0, lse0) = (outs[0].0.read(&ctx), read_back(&ctx, &outs[0].1), read_back(&ctx, &outs[0].2));
    assert_eq!(mask0, outs[1].0.read(&ctx), "mask: combined vs two calls");
    assert_eq!(out0, read_back(&ctx, &outs[1].1), "out: combined vs two calls");
    assert_eq!(lse0, read_back(&ctx, &outs[1].2), "lse: combined vs two calls");

    // Against the CPU path of the same library on the GPU's mask.
    let mut cpu_out = vec![0u8; n * hq * d * 4];
    {
        let host = |name: &str| {
            let st = case.get(name);
            desc(st.bytes.as_ptr() as u64, DType::BF16, CPU, st.shape.clone().try_into().unwrap())
        };
        let mut m = mask0.clone();
        let s = sizes(&b, hq as u32);
        let md = mask_desc(
            m.counts.as_mut_ptr() as u64,
            m.indices.as_mut_ptr() as u64,
            m.row_offsets.as_mut_ptr() as u64,
            &s,
            CPU,
        );
        let od = desc(cpu_out.as_mut_ptr() as u64, DType::F32, CPU, [n, hq, d]);
        let status = unsafe {
            seer_sparse_prefill(
                &prefill_params(std::ptr::null_mut()),
                &b,
                &host("q"),
                &host("k"),
                &host("v"),
                &md,
                &od,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_status(status, SeerStatus::SEER_OK, "CPU prefill");
    }
    let gpu: Vec<f32> = out0.chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    let cpu: Vec<f32> = cpu_out.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let (mut num, mut den) = (0f64, 0f64);
    for (g, c) in gpu.iter().zip(&cpu) {
        assert!(g.is_finite(), "GPU output not finite");
        num += ((g - c) as f64).powi(2);
        den += (*c as f64).powi(2);
    }
    let rel = (num / den).sqrt();
    assert!(rel <= 1e-2, "GPU vs CPU relative error {rel:.2e}");

    // Two "layers" (the gate's layer twice, into two output sets) captured
    // into one graph and replayed: identical to the eager runs.
    let graph = unsafe {
        testing::capture(&stream, || {
            for i in 0..2 {
                match combined(i) {
                    SeerStatus::SEER_OK => {}
                    s => return Err(Error::Cuda(format!("{s:?} during capture: {}", last_error()))),
                }
            }
            Ok(())
        })
    }
    .unwrap();
    for (_, o, lse) in &outs {
        testing::copy_to_device(&ctx, o.ptr(), &vec![0xffu8; o.len()]).unwrap();
        testing::copy_to_device(&ctx, lse.ptr(), &vec![0xffu8; lse.len()]).unwrap();
    }
    graph.launch(&stream).unwrap();
    stream.synchronize().unwrap();
    for (m, o, lse) in &outs {
        assert_eq!(m.read(&ctx), mask0, "replayed mask");
        assert_eq!(read_back(&ctx, o), out0, "replayed output");
        assert_eq!(read_back(&ctx, lse), lse0, "replayed lse");
    }
}
