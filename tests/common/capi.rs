//! Calling the C API from Rust tests on host buffers, as a C caller would:
//! handles destroyed on drop, descriptors of owned buffers, and the mask
//! and prefill calls of a batch.

use seerattn::ffi::args::{SeerBatch, SeerBlockMask, SeerTensor};
use seerattn::ffi::attention::{seer_prefill_params_default, seer_sparse_prefill, SeerPrefillParams};
use seerattn::ffi::gate::*;
use seerattn::ffi::mask::{seer_mask_sizes, SeerMaskSizes};
use seerattn::ffi::status::{seer_last_error_message, SeerStatus};
use seerattn::{EmptyRowPolicy, MaskParams, SparsityMethod, ThresholdCompare};
use std::ffi::{CStr, CString};
use std::mem::MaybeUninit;

pub use SeerStatus::*;

pub const BF16: u32 = 0;
pub const F16: u32 = 1;
pub const F32: u32 = 2;

/// This thread's last error message.
pub fn message() -> String {
    unsafe { CStr::from_ptr(seer_last_error_message()) }.to_string_lossy().into_owned()
}

/// Assert a status, showing the message on a mismatch; returns the message.
#[track_caller]
pub fn expect(got: SeerStatus, want: SeerStatus, what: &str) -> String {
    let msg = if got == SEER_OK { String::new() } else { message() };
    assert_eq!(got, want, "{what}: {msg}");
    msg
}

/// A gate handle, destroyed on drop (unless taken).
pub struct Gate(pub *mut SeerGate);

// The C API makes handles usable from any thread.
unsafe impl Send for Gate {}
unsafe impl Sync for Gate {}

impl Drop for Gate {
    fn drop(&mut self) {
        unsafe { seer_gate_destroy(self.0) };
    }
}

impl Gate {
    /// `seer_gate_load` of a directory.
    pub fn load(dir: &std::path::Path) -> Gate {
        let path = CString::new(dir.to_str().unwrap()).unwrap();
        let mut gate = std::ptr::null_mut();
        expect(unsafe { seer_gate_load(path.as_ptr(), &mut gate) }, SEER_OK, "seer_gate_load");
        Gate(gate)
    }

    /// The bundled upstream test gate (8 query heads, 2 KV heads, head_dim 128, 2 layers).
    pub fn bundled() -> Gate {
        Gate::load(&super::upstream_dir().join("gqa4_s1000_gates"))
    }

    pub fn config(&self) -> SeerGateConfig {
        let mut c = MaybeUninit::<SeerGateConfig>::zeroed();
        unsafe { (*c.as_mut_ptr()).struct_size = std::mem::size_of::<SeerGateConfig>() };
        expect(unsafe { seer_gate_get_config(self.0, c.as_mut_ptr()) }, SEER_OK, "seer_gate_get_config");
        unsafe { c.assume_init() }
    }

    /// The gate's own mask rule, for `layer`.
    pub fn params(&self, layer: u32) -> SeerMaskParams {
        let mut p = MaybeUninit::<SeerMaskParams>::uninit();
        expect(unsafe { seer_mask_params_default(self.0, p.as_mut_ptr()) }, SEER_OK, "seer_mask_params_default");
        let mut p = unsafe { p.assume_init() };
        p.layer = layer;
        p
    }
}

/// The Rust view of a C mask rule (for the reference and the tolerance of comparisons).
pub fn rule(p: &SeerMaskParams) -> MaskParams {
    MaskParams {
        method: if p.sparsity_method == 0 { SparsityMethod::Threshold } else { SparsityMethod::NzRatio },
        threshold: p.threshold,
        nz_ratio: p.nz_ratio,
        last_block_dense: p.last_block_dense != 0,
        empty_rows: if p.empty_rows == 0 { EmptyRowPolicy::KeepDiagonal } else { EmptyRowPolicy::Empty },
        threshold_compare: if p.threshold_compare == 0 { ThresholdCompare::F32 } else { ThresholdCompare::Bf16 },
    }
}

/// A value with raw pointers (params structs) shared by test threads, as C
/// callers share them: the pointers it holds are not written through.
#[derive(Clone, Copy)]
pub struct Shared<T>(pub T);

unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The value (a method, so that closures capture the whole wrapper).
    pub fn get(&self) -> &T {
        &self.0
    }
}

/// `seer_gate_config_default` with the geometry set.
pub fn gate_config(layers: u32, hq: u32, hkv: u32, head_dim: u32, gate_hidden: u32) -> SeerGateConfig {
    let mut c = MaybeUninit::<SeerGateConfig>::uninit();
    expect(unsafe { seer_gate_config_default(c.as_mut_ptr()) }, SEER_OK, "seer_gate_config_default");
    let mut c = unsafe { c.assume_init() };
    (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim, c.gate_hidden) = (layers, hq, hkv, head_dim, gate_hidden);
    c
}

/// A descriptor of a contiguous host tensor at `data` (from `as_ptr`, or
/// `as_mut_ptr` for an output).
pub fn host_tensor<T>(data: *const T, dtype: u32, shape: [usize; 3]) -> SeerTensor {
    let s = shape.map(|x| x as i64);
    SeerTensor { data: data.cast_mut().cast(), dtype, device: 0, shape: s, strides: [s[1] * s[2], s[2], 1] }
}

/// Round f32 to bf16 bits.
pub fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
}

/// A batch: its cumulative lengths, kept alive with the descriptor.
pub struct Lens {
    pub q: Vec<i32>,
    pub k: Vec<i32>,
}

impl Lens {
    pub fn new(lens: &[(usize, usize)]) -> Lens {
        let (mut q, mut k) = (vec![0i32], vec![0i32]);
        for &(lq, lk) in lens {
            q.push(q.last().unwrap() + lq as i32);
            k.push(k.last().unwrap() + lk as i32);
        }
        Lens { q, k }
    }
    pub fn batch(&self) -> SeerBatch {
        SeerBatch { num_seqs: self.q.len() as u32 - 1, cu_seqlens_q: self.q.as_ptr(), cu_seqlens_k: self.k.as_ptr() }
    }
    pub fn total_q(&self) -> usize {
        *self.q.last().unwrap() as usize
    }
    pub fn total_k(&self) -> usize {
        *self.k.last().unwrap() as usize
    }
}

/// `seer_mask_sizes` of a batch.
pub fn sizes(batch: &SeerBatch, hq: u32) -> SeerMaskSizes {
    let mut s = MaybeUninit::<SeerMaskSizes>::zeroed();
    unsafe { (*s.as_mut_ptr()).struct_size = std::mem::size_of::<SeerMaskSizes>() };
    expect(unsafe { seer_mask_sizes(batch, hq, 64, s.as_mut_ptr()) }, SEER_OK, "seer_mask_sizes");
    unsafe { s.assume_init() }
}

/// A mask in host memory, sized for a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMask {
    pub counts: Vec<i32>,
    pub indices: Vec<i32>,
    pub offsets: Vec<i64>,
}

impl HostMask {
    pub fn new(s: &SeerMaskSizes) -> HostMask {
        HostMask { counts: vec![-1; s.rows], indices: vec![-1; s.indices_len], offsets: vec![-1; s.row_offsets_len] }
    }
    pub fn desc(&mut self) -> SeerBlockMask {
        SeerBlockMask {
            counts: self.counts.as_mut_ptr(),
            counts_len: self.counts.len(),
            indices: self.indices.as_mut_ptr(),
            indices_len: self.indices.len(),
            row_offsets: self.offsets.as_mut_ptr(),
            row_offsets_len: self.offsets.len(),
            device: 0,
        }
    }
    /// Selected blocks of row `r`.
    pub fn row(&self, r: usize) -> &[i32] {
        let lo = self.offsets[r] as usize;
        &self.indices[lo..lo + self.counts[r] as usize]
    }
    /// The selections only (slots past a row's count are unused).
    pub fn rows(&self) -> Vec<Vec<i32>> {
        (0..self.counts.len()).map(|r| self.row(r).to_vec()).collect()
    }
}

/// Host inputs of one batch for the gate (pre-RoPE q, k) and prefill (q, k, v), bf16.
pub struct Inputs {
    pub lens: Lens,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub q: Vec<u16>,
    pub k: Vec<u16>,
    pub v: Vec<u16>,
}

impl Inputs {
    /// Uniform values in [-scale, scale) (rounded to bf16).
    pub fn random(lens: &[(usize, usize)], hq: usize, hkv: usize, d: usize, scale: f32, seed: u64) -> Inputs {
        let lens = Lens::new(lens);
        let mut rng = super::Rng(seed);
        let mut gen = |n: usize| bf16_bits(&(0..n).map(|_| rng.uniform(-scale, scale)).collect::<Vec<_>>());
        let (tq, tk) = (lens.total_q(), lens.total_k());
        let (q, k, v) = (gen(tq * hq * d), gen(tk * hkv * d), gen(tk * hkv * d));
        Inputs { lens, hq, hkv, d, q, k, v }
    }

    pub fn q_desc(&self) -> SeerTensor {
        host_tensor(self.q.as_ptr(), BF16, [self.lens.total_q(), self.hq, self.d])
    }
    pub fn k_desc(&self) -> SeerTensor {
        host_tensor(self.k.as_ptr(), BF16, [self.lens.total_k(), self.hkv, self.d])
    }
    pub fn v_desc(&self) -> SeerTensor {
        host_tensor(self.v.as_ptr(), BF16, [self.lens.total_k(), self.hkv, self.d])
    }

    /// `seer_gate_compute_mask` with the inputs as pre-RoPE q and k.
    pub fn mask(&self, gate: *const SeerGate, params: &SeerMaskParams) -> (SeerStatus, HostMask) {
        let batch = self.lens.batch();
        let mut mask = HostMask::new(&sizes(&batch, self.hq as u32));
        let desc = mask.desc();
        let (q, k) = (self.q_desc(), self.k_desc());
        let status = unsafe { seer_gate_compute_mask(gate, params, &batch, &q, &k, &desc) };
        (status, mask)
    }

    /// `seer_sparse_prefill` into an f32 output with LSE; `scale` 0 is the default.
    pub fn prefill(&self, mask: &mut HostMask, scale: f32) -> (SeerStatus, Vec<f32>, Vec<f32>) {
        let mut p = MaybeUninit::<SeerPrefillParams>::uninit();
        expect(unsafe { seer_prefill_params_default(p.as_mut_ptr()) }, SEER_OK, "seer_prefill_params_default");
        let mut p = unsafe { p.assume_init() };
        p.softmax_scale = scale;
        let tq = self.lens.total_q();
        let mut out = vec![f32::NAN; tq * self.hq * self.d];
        let mut lse = vec![f32::NAN; tq * self.hq];
        let (q, k, v) = (self.q_desc(), self.k_desc(), self.v_desc());
        let o = host_tensor(out.as_mut_ptr(), F32, [tq, self.hq, self.d]);
        let (batch, m) = (self.lens.batch(), mask.desc());
        let status = unsafe { seer_sparse_prefill(&p, &batch, &q, &k, &v, &m, &o, lse.as_mut_ptr(), lse.len()) };
        (status, out, lse)
    }
}
