//! Target `c_api`: the C entry points with fuzzer-built arguments.
//!
//! The input picks an entry point and a small valid call (a gate geometry, a
//! batch, inputs), then a list of mutations, each `[selector][value]`, that
//! change one field of one argument: a pointer to NULL, misaligned, aliasing
//! another buffer of the call or a made-up device address; a dtype, device,
//! shape or stride; a batch length; a mask length or entry; a params field
//! (`struct_size` included); the gate handle (NULL, destroyed, not a handle).
//!
//! The fuzzer keeps the one promise the library cannot check: every host
//! pointer refers to memory of the size the documentation gives it. Each
//! host buffer is its own allocation of exactly the bytes its descriptor
//! spans (AddressSanitizer catches a read one past it); a descriptor whose
//! span the library must refuse (a bad dtype, a non-positive extent, a
//! negative stride, an overflow) gets a small buffer; a span too large to
//! allocate skips the call. A made-up device address is given only to a
//! `SEER_DEVICE_CUDA` descriptor, which the host must never dereference; a
//! buffer aliasing another one may run past it only where the call writes
//! it, so the overlap check must refuse it first.
//!
//! Checks: the status is never `SEER_PANIC`, a failure has a message,
//! out-parameters are untouched on failure, and what a success writes is
//! valid (masks pass validation, dense maps hold 0/1, attention of small
//! finite inputs is finite).

use super::Bytes;
use seerattn::ffi::args::{SeerBatch, SeerBlockMask, SeerTensor};
use seerattn::ffi::attention::{seer_prefill_params_default, seer_sparse_prefill, SeerPrefillParams};
use seerattn::ffi::gate::*;
use seerattn::ffi::mask::*;
use seerattn::ffi::status::{seer_last_error_message, seer_status_name, SeerStatus};
use seerattn::{Batch, BlockMaskRef, MaskLayout};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::{c_void, CStr};
use std::mem::size_of;

use SeerStatus::*;

/// Host buffers larger than this are not allocated (the call is skipped).
const MAX_BUFFER: usize = 4 << 20;

/// Values a mutation picks from: the boundaries where checks live.
const INTERESTING: [i64; 32] = [
    0,
    1,
    -1,
    2,
    3,
    7,
    8,
    16,
    63,
    64,
    65,
    96,
    127,
    128,
    129,
    256,
    1000,
    4096,
    65536,
    i32::MAX as i64,
    i32::MAX as i64 + 1,
    i32::MIN as i64,
    u32::MAX as i64,
    1 << 32,
    1 << 40,
    i64::MAX,
    i64::MIN,
    i64::MAX / 2,
    i64::MAX / 64,
    -64,
    1 << 62,
    (1 << 31) / 64,
];

impl Bytes<'_> {
    /// A value for a mutation: an interesting one, a small one, or raw bits.
    fn value(&mut self) -> i64 {
        match self.u8() {
            s @ 0..=127 => INTERESTING[s as usize % INTERESTING.len()],
            s @ 128..=223 => (s as i64) - 144,
            _ => self.u64() as i64,
        }
    }
    fn small(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.u8() as usize % (hi - lo + 1)
    }
}

/// Where a pointer argument points.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ptr {
    /// Its own allocation of exactly the described size.
    Valid,
    Null,
    /// Its own allocation, `1..=7` bytes past an aligned address.
    Misaligned(usize),
    /// Inside the buffer `of` (an earlier buffer of the call), at byte `at`.
    Alias {
        of: usize,
        at: usize,
    },
    /// A made-up device address (only ever given to CUDA descriptors).
    Fake(u64),
}

impl Ptr {
    fn from(r: &mut Bytes) -> Ptr {
        match r.u8() % 8 {
            0 => Ptr::Null,
            1 | 2 => Ptr::Misaligned(r.small(1, 7)),
            3 | 4 => Ptr::Alias { of: r.u8() as usize, at: r.u16() as usize },
            5 => Ptr::Fake(match r.u8() % 4 {
                0 => 0x7f00_0000_0000 + (r.u16() as u64) * 256,
                1 => 0x1000,
                2 => 0x10 * r.u8() as u64 + 2,
                _ => r.u64(),
            }),
            _ => Ptr::Valid,
        }
    }
}

/// How a data buffer is filled.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fill {
    /// Finite values in [-2, 2] of the buffer's dtype.
    Small,
    Zeros,
    /// Finite values near the dtype's largest (bf16 and f32: 1e30; f16: 6e4).
    Huge,
    /// Raw bytes: NaN, infinities, denormals.
    Raw,
}

/// The memory of one call: every buffer is a separate allocation, freed at
/// the end of the call.
struct Memory {
    bufs: Vec<(*mut u8, Layout)>,
    /// `(start, len)` of each buffer an alias may point into.
    regions: Vec<(usize, usize)>,
    seed: u64,
}

impl Drop for Memory {
    fn drop(&mut self) {
        for &(p, l) in &self.bufs {
            unsafe { dealloc(p, l) };
        }
    }
}

/// The bytes a tensor descriptor spans, as the library must compute them:
/// `None` where it must refuse the descriptor before touching its data.
fn described_bytes(t: &SeerTensor) -> Option<usize> {
    let size = match t.dtype {
        0 | 1 => 2usize,
        2 => 4,
        _ => return None,
    };
    let mut last = 0usize;
    for d in 0..3 {
        if t.shape[d] <= 0 || t.strides[d] < 0 {
            return None;
        }
        let term = (t.shape[d] as usize - 1).checked_mul(t.strides[d] as usize)?;
        last = last.checked_add(term)?;
    }
    last.checked_add(1)?.checked_mul(size)
}

impl Memory {
    fn new(seed: u64) -> Self {
        Memory { bufs: Vec::new(), regions: Vec::new(), seed }
    }

    fn next(&mut self) -> u64 {
        self.seed = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A fresh zeroed allocation of `bytes` (at least 1) bytes, 16-aligned.
    fn alloc(&mut self, bytes: usize) -> *mut u8 {
        let layout = Layout::from_size_align(bytes.max(1), 16).unwrap();
        let p = unsafe { alloc_zeroed(layout) };
        assert!(!p.is_null(), "out of memory");
        self.bufs.push((p, layout));
        p
    }

    /// Fill `bytes` at `p` with values of `dtype` (a `SeerDType` code; other
    /// codes are filled as bf16).
    fn fill(&mut self, p: *mut u8, bytes: usize, dtype: u32, fill: Fill) {
        let buf = unsafe { std::slice::from_raw_parts_mut(p, bytes) };
        let elem = if dtype == 2 { 4 } else { 2 };
        for chunk in buf.chunks_mut(elem) {
            let r = self.next();
            let unit = ((r >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0;
            let v = match fill {
                Fill::Zeros => 0.0,
                Fill::Small => 2.0 * unit,
                Fill::Huge => unit * if dtype == 1 { 6.0e4 } else { 1.0e30 },
                Fill::Raw => f32::NAN, // replaced by raw bits below
            };
            let bits: [u8; 4] = match (fill, dtype) {
                (Fill::Raw, _) => (r as u32).to_le_bytes(),
                (_, 2) => v.to_le_bytes(),
                (_, 1) => {
                    let h = half::f16::from_f32(v).to_le_bytes();
                    [h[0], h[1], 0, 0]
                }
                _ => {
                    let h = half::bf16::from_f32(v).to_le_bytes();
                    [h[0], h[1], 0, 0]
                }
            };
            let n = chunk.len();
            chunk.copy_from_slice(&bits[..n]);
        }
    }

    /// The pointer for a buffer of `bytes` (`None`: the library must refuse
    /// the argument before reading it, so a small buffer stands in).
    /// `written`: the call writes it (an alias may then run past its target).
    /// `cuda`: a device descriptor (never dereferenced on the host).
    /// `Err(())`: no valid memory can be given; skip the call.
    fn place(&mut self, ptr: Ptr, bytes: Option<usize>, written: bool, cuda: bool) -> Result<*mut u8, ()> {
        let need = bytes.unwrap_or(64);
        // Where the pointer would land inside an earlier buffer: reads must
        // stay inside it; a written buffer (or a device one, never touched
        // on the host) may run past it, which the overlap check must refuse.
        let alias = match ptr {
            Ptr::Alias { of, at } => match self.regions.get(of % self.regions.len().max(1)).copied() {
                Some((start, len)) if len > 0 && ((at % len).saturating_add(need) <= len || written || cuda) => {
                    Some(start + at % len)
                }
                _ => None,
            },
            _ => None,
        };
        let allocates = match ptr {
            Ptr::Null => false,
            Ptr::Fake(_) => !cuda,
            Ptr::Alias { .. } => alias.is_none(),
            Ptr::Valid | Ptr::Misaligned(_) => true,
        };
        if allocates && need > MAX_BUFFER {
            return Err(());
        }
        let p = match ptr {
            Ptr::Null => std::ptr::null_mut(),
            Ptr::Fake(addr) if cuda => addr as *mut u8,
            Ptr::Misaligned(m) => unsafe { self.alloc(need + m).add(m) },
            _ => match alias {
                Some(addr) => addr as *mut u8,
                None => self.alloc(need),
            },
        };
        if !p.is_null() && !matches!(ptr, Ptr::Fake(_) if cuda) {
            self.regions.push((p as usize, need));
        }
        Ok(p)
    }

    /// As [`Memory::place`] for a host array that is not a data region of
    /// the call (no alias lands in it, the overlap checks do not see it).
    fn place_array(&mut self, ptr: Ptr, bytes: Option<usize>) -> Result<*mut u8, ()> {
        let ptr = if matches!(ptr, Ptr::Alias { .. } | Ptr::Fake(_)) { Ptr::Valid } else { ptr };
        let before = self.regions.len();
        let p = self.place(ptr, bytes, false, false)?;
        self.regions.truncate(before);
        Ok(p)
    }
}

/// A tensor argument: its descriptor (data filled in at placement), where
/// its pointer points, and how it is filled.
#[derive(Clone, Copy, Debug)]
struct TensorArg {
    desc: SeerTensor,
    ptr: Ptr,
    fill: Fill,
    /// NULL descriptor pointer (not NULL data).
    absent: bool,
}

impl TensorArg {
    fn new(dtype: u32, shape: [usize; 3]) -> Self {
        let s = shape.map(|x| x as i64);
        TensorArg {
            desc: SeerTensor {
                data: std::ptr::null_mut(),
                dtype,
                device: 0,
                shape: s,
                strides: [s[1] * s[2], s[2], 1],
            },
            ptr: Ptr::Valid,
            fill: Fill::Small,
            absent: false,
        }
    }

    fn mutate(&mut self, r: &mut Bytes) {
        match r.u8() % 9 {
            0 => self.ptr = Ptr::from(r),
            1 => self.desc.dtype = (r.value() as u32) % 4,
            2 => self.desc.device = if r.u8() % 4 == 0 { r.value() as u32 } else { r.u8() as u32 % 2 },
            3 => {
                let d = r.small(0, 2);
                self.desc.shape[d] = r.value();
            }
            4 => {
                let d = r.small(0, 2);
                self.desc.strides[d] = r.value();
            }
            5 => {
                // A strided view: padded rows (a fused QKV buffer).
                let pad = r.small(0, 64) as i64;
                self.desc.strides[0] = self.desc.strides[0].saturating_add(pad);
            }
            6 => {
                // Heads and tokens swapped in memory (a transposed view).
                let [t, h, d] = self.desc.shape;
                self.desc.strides = [d, t.saturating_mul(d), 1];
                let _ = h;
            }
            7 => {
                self.fill = match r.u8() % 4 {
                    0 => Fill::Small,
                    1 => Fill::Zeros,
                    2 => Fill::Huge,
                    _ => Fill::Raw,
                }
            }
            _ => self.absent = !self.absent,
        }
    }

    /// Place the data and return the descriptor pointer (NULL when absent).
    fn place(&mut self, mem: &mut Memory, written: bool) -> Result<*const SeerTensor, ()> {
        if self.absent {
            return Ok(std::ptr::null());
        }
        let cuda = self.desc.device == 1;
        let bytes = described_bytes(&self.desc);
        let p = mem.place(self.ptr, bytes, written, cuda)?;
        let host_owned =
            matches!(self.ptr, Ptr::Valid | Ptr::Misaligned(_)) || (!cuda && matches!(self.ptr, Ptr::Fake(_)));
        if host_owned && !p.is_null() {
            mem.fill(p, bytes.unwrap_or(64), self.desc.dtype, self.fill);
        }
        self.desc.data = p.cast::<c_void>();
        Ok(&self.desc)
    }
}

/// A mask argument: lengths, pointers, device, and edits of its contents.
#[derive(Clone, Debug)]
struct MaskArg {
    lens: [usize; 3],
    ptrs: [Ptr; 3],
    device: u32,
    /// `(array, index, value)` written after a valid mask is laid down.
    edits: Vec<(u8, usize, i64)>,
    absent: bool,
    desc: SeerBlockMask,
}

impl MaskArg {
    fn new(sizes: &SeerMaskSizes) -> Self {
        MaskArg {
            lens: [sizes.rows, sizes.indices_len, sizes.row_offsets_len],
            ptrs: [Ptr::Valid; 3],
            device: 0,
            edits: Vec::new(),
            absent: false,
            desc: SeerBlockMask {
                counts: std::ptr::null_mut(),
                counts_len: 0,
                indices: std::ptr::null_mut(),
                indices_len: 0,
                row_offsets: std::ptr::null_mut(),
                row_offsets_len: 0,
                device: 0,
            },
        }
    }

    fn mutate(&mut self, r: &mut Bytes) {
        let a = r.small(0, 2);
        match r.u8() % 6 {
            0 => self.ptrs[a] = Ptr::from(r),
            1 => self.lens[a] = r.value() as usize,
            2 => self.lens[a] = self.lens[a].wrapping_add(r.u8() as usize).wrapping_sub(128),
            3 => self.device = if r.u8() % 4 == 0 { r.value() as u32 } else { r.u8() as u32 % 2 },
            4 => {
                let (i, v) = (r.u16() as usize, r.value());
                self.edits.push((a as u8, i, v))
            }
            _ => self.absent = !self.absent,
        }
    }

    /// Place the arrays; `content` (a valid mask for the batch, if any) is
    /// copied in where it fits, then the edits are applied.
    fn place(
        &mut self,
        mem: &mut Memory,
        written: bool,
        content: Option<&seerattn::BlockMask>,
    ) -> Result<*const SeerBlockMask, ()> {
        if self.absent {
            return Ok(std::ptr::null());
        }
        let cuda = self.device == 1;
        let elem = [4usize, 4, 8];
        let mut ptrs = [std::ptr::null_mut::<u8>(); 3];
        // Elements actually allocated for each array (a stand-in buffer for
        // an overflowing length holds fewer than the length says).
        let mut held = [0usize; 3];
        for i in 0..3 {
            let bytes = self.lens[i].checked_mul(elem[i]).filter(|&b| b <= isize::MAX as usize);
            // An overflowing length is refused before use; a huge one cannot be given.
            let bytes = match bytes {
                Some(b) => Some(b),
                None if matches!(self.ptrs[i], Ptr::Null | Ptr::Fake(_)) => Some(0),
                None => None,
            };
            ptrs[i] = mem.place(self.ptrs[i], bytes, written, cuda)?;
            held[i] = bytes.unwrap_or(64) / elem[i];
        }
        let host = |i: usize| !cuda && matches!(self.ptrs[i], Ptr::Valid | Ptr::Misaligned(_)) && !ptrs[i].is_null();
        // Element `i` of array `a` as little-endian bytes, unaligned.
        let put = |a: usize, i: usize, v: i64| unsafe {
            let dst = ptrs[a].add(i * elem[a]);
            let bytes = v.to_le_bytes();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, elem[a]);
        };
        if let Some(m) = content {
            let arrays: [Vec<i64>; 3] = [
                m.counts.iter().map(|&x| x as i64).collect(),
                m.indices.iter().map(|&x| x as i64).collect(),
                m.row_offsets.clone(),
            ];
            for (a, values) in arrays.iter().enumerate() {
                if host(a) {
                    values.iter().take(held[a]).enumerate().for_each(|(i, &v)| put(a, i, v));
                }
            }
        }
        for &(a, i, v) in &self.edits {
            let a = a as usize;
            if host(a) && held[a] > 0 {
                put(a, i % held[a], v);
            }
        }
        self.desc = SeerBlockMask {
            counts: ptrs[0].cast(),
            counts_len: self.lens[0],
            indices: ptrs[1].cast(),
            indices_len: self.lens[1],
            row_offsets: ptrs[2].cast(),
            row_offsets_len: self.lens[2],
            device: self.device,
        };
        Ok(&self.desc)
    }
}

/// The batch argument: `num_seqs` and the two cumulative arrays.
#[derive(Clone, Debug)]
struct BatchArg {
    num_seqs: u32,
    cu: [Vec<i32>; 2],
    ptrs: [Ptr; 2],
    absent: bool,
    desc: SeerBatch,
}

impl BatchArg {
    fn new(lens: &[(usize, usize)]) -> Self {
        let mut cu = [vec![0i32], vec![0i32]];
        for &(q, k) in lens {
            let (lq, lk) = (*cu[0].last().unwrap(), *cu[1].last().unwrap());
            cu[0].push(lq + q as i32);
            cu[1].push(lk + k as i32);
        }
        BatchArg {
            num_seqs: lens.len() as u32,
            cu,
            ptrs: [Ptr::Valid; 2],
            absent: false,
            desc: SeerBatch { num_seqs: 0, cu_seqlens_q: std::ptr::null(), cu_seqlens_k: std::ptr::null() },
        }
    }

    fn mutate(&mut self, r: &mut Bytes) {
        let a = r.small(0, 1);
        match r.u8() % 5 {
            0 => self.ptrs[a] = Ptr::from(r),
            1 => self.num_seqs = r.value() as u32,
            2 => {
                let i = r.u8() as usize % self.cu[a].len();
                self.cu[a][i] = r.value() as i32;
            }
            3 => self.num_seqs = self.num_seqs.wrapping_add(1),
            _ => self.absent = !self.absent,
        }
    }

    fn place(&mut self, mem: &mut Memory) -> Result<*const SeerBatch, ()> {
        if self.absent {
            return Ok(std::ptr::null());
        }
        // The library reads num_seqs + 1 entries of each array (none for 0).
        let n = if self.num_seqs == 0 { 0 } else { self.num_seqs as usize + 1 };
        let mut ptrs = [std::ptr::null::<i32>(); 2];
        for (out, (ptr, cu)) in ptrs.iter_mut().zip(self.ptrs.iter().zip(&self.cu)) {
            let p = mem.place_array(*ptr, Some(n * 4))?;
            if !p.is_null() {
                for i in 0..n {
                    // Entries past the ones set are a plausible continuation.
                    let v = cu.get(i).copied().unwrap_or_else(|| cu.last().unwrap().wrapping_add(i as i32));
                    unsafe { p.cast::<i32>().add(i).write_unaligned(v) };
                }
            }
            *out = p.cast();
        }
        self.desc = SeerBatch { num_seqs: self.num_seqs, cu_seqlens_q: ptrs[0], cu_seqlens_k: ptrs[1] };
        Ok(&self.desc)
    }
}

/// Place a params struct at a possibly misaligned address; `None` for NULL.
fn place_struct<T: Copy>(mem: &mut Memory, value: T, ptr: Ptr) -> *mut T {
    let m = match ptr {
        Ptr::Null => return std::ptr::null_mut(),
        Ptr::Misaligned(m) => m,
        _ => 0,
    };
    let p = unsafe { mem.alloc(size_of::<T>() + m).add(m) }.cast::<T>();
    unsafe { p.write_unaligned(value) };
    p
}

/// Which gate handle a call gets.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Handle {
    Live,
    Null,
    Destroyed,
    /// A host address that is not a handle.
    Bogus,
}

fn status_ok(what: &str, s: SeerStatus) -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *TRACE.get_or_init(|| std::env::var_os("SEERATTN_FUZZ_TRACE").is_some()) {
        eprintln!("{what}: {s:?} {}", if s == SEER_OK { String::new() } else { last_error() });
    }
    assert_ne!(s, SEER_PANIC, "{what}: a panic reached the C boundary: {}", last_error());
    let name = unsafe { CStr::from_ptr(seer_status_name(s as u32)) }.to_str().unwrap();
    assert_ne!(name, "SEER_UNKNOWN_STATUS", "{what}");
    if s != SEER_OK {
        assert!(!last_error().is_empty(), "{what}: {name} without a message");
    }
    s == SEER_OK
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(seer_last_error_message()) }.to_string_lossy().into_owned()
}

/// The C API target.
pub fn c_api(data: &[u8]) {
    let mut r = Bytes::new(data);
    let op = r.u8() % 12;
    // The valid call: a gate geometry and a batch.
    let hkv = [1usize, 1, 2, 1][r.u8() as usize % 4];
    let hq = hkv * [1usize, 2, 1, 4][r.u8() as usize % 4];
    let d = [64usize, 128, 64, 32][r.u8() as usize % 4];
    let hidden = [d, d, 32, 64][r.u8() as usize % 4];
    let num_layers = r.small(1, 2);
    let num_seqs = r.small(1, 3);
    let mut lens = Vec::new();
    for _ in 0..num_seqs {
        let k = r.small(1, 140);
        let q = 1 + r.u8() as usize % k;
        lens.push((q, k));
    }
    let (tq, tk) = (lens.iter().map(|l| l.0).sum::<usize>(), lens.iter().map(|l| l.1).sum::<usize>());
    let dtype = r.u8() as u32 % 2;
    let mut mem = Memory::new(r.u64());

    let geometry = || {
        let mut c = default_config();
        (c.num_layers, c.num_q_heads, c.num_kv_heads) = (num_layers as u32, hq as u32, hkv as u32);
        (c.head_dim, c.gate_hidden) = (d as u32, hidden as u32);
        c
    };
    let mut config = geometry();
    if r.u8() % 4 == 3 {
        config.q_pools = 1 + r.u8() as u32 % 7;
        config.k_pools = 1 + r.u8() as u32 % 7;
        config.force_double = r.u8() as u32 % 2;
    }
    let mut batch = BatchArg::new(&lens);
    let rust_batch = Batch::from_lens(&lens).unwrap();
    let layout = MaskLayout::new(&rust_batch, hq, 64).unwrap();
    let sizes = SeerMaskSizes {
        struct_size: size_of::<SeerMaskSizes>(),
        rows: layout.rows(),
        row_offsets_len: layout.rows() + 1,
        indices_len: layout.index_capacity(),
        dense_bytes: layout.dense_len(),
    };
    // A valid mask for the batch: a dense map from the input.
    let dense_bits: Vec<u8> = (0..layout.dense_len()).map(|i| ((mem.next() >> (i % 7)) & 1) as u8).collect();
    let valid_mask = seerattn::BlockMask::from_dense(&layout, &dense_bits).unwrap();

    let mut q = TensorArg::new(dtype, [tq, hq, d]);
    let mut k = TensorArg::new(dtype, [tk, hkv, d]);
    let mut v = TensorArg::new(dtype, [tk, hkv, d]);
    let mut out = TensorArg::new(if r.u8() % 2 == 0 { 2 } else { dtype }, [tq, hq, d]);
    let mut mask = MaskArg::new(&sizes);
    let (mut lse_len, mut lse_ptr, mut lse_on) = (hq * tq, Ptr::Valid, r.u8() % 2 == 0);
    let (mut dense_len, mut dense_ptr) = (sizes.dense_bytes, Ptr::Valid);
    let mut handle = Handle::Live;
    let mut mask_params_ptr = Ptr::Valid;
    let mut prefill_params_ptr = Ptr::Valid;
    let mut out_ptr = Ptr::Valid;
    let mut arg_heads = hq as u32;
    let mut arg_block = 64u32;
    let mut arg_dim = d as u32;
    let mut arg_device = 0u32;
    let mut arg_layer = 0u32;
    let mut arg_tokens = (tk as u64) + 10;
    let mut caches: Vec<u64> = (0..num_seqs).map(|i| 0x7f10_0000_0000 + (i as u64) * (1 << 24)).collect();
    // The CPU path refuses caches: only the update gets them by default.
    let mut caches_ptr = if op == 9 { Ptr::Valid } else { Ptr::Null };
    let mut num_caches = num_seqs;
    let mut weights_missing = false;
    let mut mp = SeerMaskParams {
        struct_size: size_of::<SeerMaskParams>(),
        layer: 0,
        sparsity_method: r.u8() as u32 % 2,
        threshold: [0.0f32, 0.002, 0.05, 0.5, 1.0][r.u8() as usize % 5],
        nz_ratio: [1.0f32, 0.5, 0.1, 0.01][r.u8() as usize % 4],
        last_block_dense: r.u8() as u32 % 2,
        empty_rows: r.u8() as u32 % 2,
        threshold_compare: r.u8() as u32 % 2,
        cuda_stream: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        workspace_bytes: 0,
        maybe_kblock_caches: std::ptr::null(),
        num_kblock_caches: 0,
    };
    let mut pp = SeerPrefillParams {
        struct_size: size_of::<SeerPrefillParams>(),
        softmax_scale: 0.0,
        block_size: 64,
        cuda_stream: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        workspace_bytes: 0,
    };
    // The weights of the released gate type (K heads per KV head where the
    // gate has a Q projection, README "Semantics").
    let k_heads = if hidden != d { hkv } else { hq };
    let mut kw = TensorArg::new(dtype, [k_heads, 3 * d, hidden]);
    let mut qw_on = hidden != d;
    let mut qw = TensorArg::new(dtype, [hq, d, hidden]);

    // The mutations.
    let mut edits = 0;
    while !r.is_empty() && edits < 64 {
        edits += 1;
        match r.u8() % 24 {
            0 => q.mutate(&mut r),
            1 => k.mutate(&mut r),
            2 => v.mutate(&mut r),
            3 => out.mutate(&mut r),
            4 | 5 => mask.mutate(&mut r),
            6 => batch.mutate(&mut r),
            7 => {
                lse_on = true;
                match r.u8() % 3 {
                    0 => lse_len = r.value() as usize,
                    1 => lse_ptr = Ptr::from(&mut r),
                    _ => lse_len = lse_len.wrapping_add(r.u8() as usize).wrapping_sub(128),
                }
            }
            8 => match r.u8() % 2 {
                0 => dense_len = r.value() as usize,
                _ => dense_ptr = Ptr::from(&mut r),
            },
            9 => {
                handle = match r.u8() % 4 {
                    0 => Handle::Null,
                    1 => Handle::Destroyed,
                    2 => Handle::Bogus,
                    _ => Handle::Live,
                }
            }
            10 => match r.u8() % 10 {
                0 => mp.struct_size = r.value() as usize,
                1 => mp.layer = r.value() as u32,
                2 => mp.sparsity_method = r.value() as u32,
                3 => mp.threshold = f32::from_bits(r.u32()),
                4 => mp.nz_ratio = f32::from_bits(r.u32()),
                5 => mp.last_block_dense = r.value() as u32,
                6 => mp.empty_rows = r.value() as u32,
                7 => mp.threshold_compare = r.value() as u32,
                8 => {
                    mp.workspace = r.u64() as *mut c_void;
                    mp.workspace_bytes = r.value() as usize;
                }
                _ => mp.cuda_stream = r.u64() as *mut c_void,
            },
            11 => match r.u8() % 4 {
                0 => caches_ptr = Ptr::from(&mut r),
                1 => num_caches = r.value() as usize,
                2 => {
                    let i = r.u8() as usize % caches.len();
                    caches[i] = r.u64();
                }
                _ => caches_ptr = Ptr::Valid,
            },
            12 => match r.u8() % 4 {
                0 => pp.struct_size = r.value() as usize,
                1 => pp.softmax_scale = f32::from_bits(r.u32()),
                2 => pp.block_size = r.value() as u32,
                _ => {
                    pp.workspace = r.u64() as *mut c_void;
                    pp.workspace_bytes = r.value() as usize;
                }
            },
            13 => mask_params_ptr = Ptr::from(&mut r),
            14 => prefill_params_ptr = Ptr::from(&mut r),
            15 => out_ptr = Ptr::from(&mut r),
            16 => arg_heads = r.value() as u32,
            17 => arg_block = r.value() as u32,
            18 => arg_dim = r.value() as u32,
            19 => arg_device = if r.u8() % 4 == 0 { r.value() as u32 } else { r.u8() as u32 % 2 },
            20 => match r.u8() % 3 {
                0 => arg_layer = r.value() as u32,
                1 => arg_tokens = r.value() as u64,
                _ => weights_missing = !weights_missing,
            },
            21 => kw.mutate(&mut r),
            22 => {
                qw_on = true;
                qw.mutate(&mut r)
            }
            _ => match r.u8() % 12 {
                0 => config.struct_size = r.value() as usize,
                1 => config.num_layers = r.value() as u32,
                2 => config.num_q_heads = r.value() as u32,
                3 => config.num_kv_heads = r.value() as u32,
                4 => config.head_dim = r.value() as u32,
                5 => config.gate_hidden = r.value() as u32,
                6 => config.block_size = r.value() as u32,
                7 => config.q_pools = r.value() as u32,
                8 => config.k_pools = r.value() as u32,
                9 => config.rope_scaling = r.value() as u32,
                10 => config.rope_theta = f64::from_bits(r.u64()),
                _ => {
                    config.rope_factor = f64::from_bits(r.u64());
                    config.rope_low_freq_factor = r.value() as f64;
                    config.rope_high_freq_factor = r.value() as f64;
                    config.rope_original_max_position_embeddings = r.value() as f64;
                }
            },
        }
    }

    // The gate: created from the config (geometry as fuzzed), every layer
    // set from small weights unless a layer is to be missing.
    let mut gate: *mut SeerGate = std::ptr::null_mut();
    let created = unsafe { seer_gate_create(&config, &mut gate) };
    if !status_ok("seer_gate_create", created) {
        assert!(gate.is_null(), "seer_gate_create wrote its out-parameter on failure");
        if op != 7 {
            // Everything else needs a gate: use the unmutated geometry.
            config = geometry();
            assert!(status_ok("seer_gate_create", unsafe { seer_gate_create(&config, &mut gate) }));
        }
    }
    let _guard = GateGuard(gate);
    if !gate.is_null() {
        set_all_weights(gate, weights_missing, &mut mem);
    }
    // The weights are not arguments of the call: nothing may alias them.
    mem.regions.clear();
    let gate_arg: *mut SeerGate = match handle {
        Handle::Live => gate,
        Handle::Null => std::ptr::null_mut(),
        Handle::Destroyed => {
            let mut other: *mut SeerGate = std::ptr::null_mut();
            assert!(status_ok("seer_gate_create", unsafe { seer_gate_create(&default_small_config(), &mut other) }));
            unsafe { seer_gate_destroy(other) };
            other
        }
        Handle::Bogus => mem.alloc(256).cast(),
    };

    let _ = run_op(
        op,
        &mut OpArgs {
            mem: &mut mem,
            gate,
            gate_arg,
            config: &config,
            batch: &mut batch,
            q: &mut q,
            k: &mut k,
            v: &mut v,
            out: &mut out,
            mask: &mut mask,
            valid_mask: &valid_mask,
            lse: (lse_on, lse_len, lse_ptr),
            dense: (dense_len, dense_ptr, &dense_bits),
            mp,
            mp_ptr: mask_params_ptr,
            pp,
            pp_ptr: prefill_params_ptr,
            out_ptr,
            sizes: (arg_heads, arg_block, arg_dim, arg_device, arg_layer, arg_tokens),
            caches: (caches, caches_ptr, num_caches),
            weights: (&mut kw, qw_on, &mut qw),
        },
    );
}

/// Destroys the call's gate at the end, however the call ends.
struct GateGuard(*mut SeerGate);

impl Drop for GateGuard {
    fn drop(&mut self) {
        unsafe { seer_gate_destroy(self.0) };
    }
}

fn default_config() -> SeerGateConfig {
    let mut c: SeerGateConfig = unsafe { std::mem::zeroed() };
    assert!(status_ok("seer_gate_config_default", unsafe { seer_gate_config_default(&mut c) }));
    c
}

fn default_small_config() -> SeerGateConfig {
    let mut c = default_config();
    c.num_layers = 1;
    c.num_q_heads = 1;
    c.num_kv_heads = 1;
    c.head_dim = 2;
    c.gate_hidden = 2;
    c
}

/// Set every layer's weights (small values, the shapes of the gate's
/// config, README "Semantics"), except the last when `missing`.
fn set_all_weights(gate: *mut SeerGate, missing: bool, mem: &mut Memory) {
    let mut c = default_config();
    assert!(status_ok("seer_gate_get_config", unsafe { seer_gate_get_config(gate, &mut c) }));
    let has_q = c.q_pools.count_ones() > 1 || c.gate_hidden != c.head_dim || c.force_double != 0;
    let (h, d, hid) = (c.num_q_heads as usize, c.head_dim as usize, c.gate_hidden as usize);
    let k_heads = if has_q { c.num_kv_heads as usize } else { h };
    let k_in = d * c.k_pools.count_ones() as usize;
    let q_in = d * c.q_pools.count_ones() as usize;
    // A fuzzed config may describe thousands of large layers: set as many
    // as 1M weight elements allow (the others stay without weights, which
    // calls on them must refuse), so that one input cannot take minutes.
    let per_layer = (k_heads * k_in * hid).saturating_add(if has_q { h * q_in * hid } else { 0 });
    let layers = (c.num_layers as usize - missing as usize).min((1 << 20) / per_layer.max(1));
    for layer in 0..layers {
        let mut kw = TensorArg::new(0, [k_heads, k_in, hid]);
        let mut qw = TensorArg::new(0, [h, q_in, hid]);
        let (Ok(kp), Ok(qp)) = (kw.place(mem, false), qw.place(mem, false)) else { return };
        let qp = if has_q { qp } else { std::ptr::null() };
        let status = unsafe { seer_gate_set_layer_weights(gate, layer as u32, kp, qp) };
        assert!(status_ok("seer_gate_set_layer_weights", status), "{}", last_error());
    }
}

struct OpArgs<'a> {
    mem: &'a mut Memory,
    gate: *mut SeerGate,
    gate_arg: *mut SeerGate,
    config: &'a SeerGateConfig,
    batch: &'a mut BatchArg,
    q: &'a mut TensorArg,
    k: &'a mut TensorArg,
    v: &'a mut TensorArg,
    out: &'a mut TensorArg,
    mask: &'a mut MaskArg,
    valid_mask: &'a seerattn::BlockMask,
    lse: (bool, usize, Ptr),
    dense: (usize, Ptr, &'a [u8]),
    mp: SeerMaskParams,
    mp_ptr: Ptr,
    pp: SeerPrefillParams,
    pp_ptr: Ptr,
    out_ptr: Ptr,
    /// heads, block size, head_dim, device, layer, tokens of the size queries.
    sizes: (u32, u32, u32, u32, u32, u64),
    caches: (Vec<u64>, Ptr, usize),
    weights: (&'a mut TensorArg, bool, &'a mut TensorArg),
}

/// A `usize` out-parameter with a sentinel, placed as fuzzed.
fn out_usize(mem: &mut Memory, ptr: Ptr) -> *mut usize {
    place_struct(mem, 0xDEAD_BEEFusize, if matches!(ptr, Ptr::Alias { .. } | Ptr::Fake(_)) { Ptr::Valid } else { ptr })
}

fn sentinel_kept(p: *const usize) -> bool {
    p.is_null() || unsafe { p.read_unaligned() } == 0xDEAD_BEEF
}

/// The batch the library would read, if valid.
fn batch_of(b: &SeerBatch) -> Option<Batch> {
    if b.num_seqs == 0 || b.cu_seqlens_q.is_null() || b.cu_seqlens_k.is_null() {
        return None;
    }
    let n = b.num_seqs as usize + 1;
    let (q, k) = unsafe {
        (std::slice::from_raw_parts(b.cu_seqlens_q, n).to_vec(), std::slice::from_raw_parts(b.cu_seqlens_k, n).to_vec())
    };
    Batch::from_cu_seqlens(&q, &k).ok()
}

/// Check a mask the library wrote: valid for the batch and heads.
fn check_written_mask(m: &SeerBlockMask, batch: &SeerBatch, heads: usize) {
    let b = batch_of(batch).expect("a call succeeded on an invalid batch");
    let layout = MaskLayout::new(&b, heads, 64).unwrap();
    let view = unsafe {
        BlockMaskRef {
            counts: std::slice::from_raw_parts(m.counts, m.counts_len),
            indices: std::slice::from_raw_parts(m.indices, m.indices_len),
            row_offsets: std::slice::from_raw_parts(m.row_offsets, m.row_offsets_len),
        }
    };
    view.validate(&layout).expect("a mask written by the library is valid");
}

fn run_op(op: u8, a: &mut OpArgs) -> Result<(), ()> {
    let (heads, block, dim, device, layer, tokens) = a.sizes;
    match op {
        0 => {
            let b = a.batch.place(a.mem)?;
            let out = place_struct(
                a.mem,
                SeerMaskSizes {
                    struct_size: size_of::<SeerMaskSizes>(),
                    rows: 7,
                    row_offsets_len: 7,
                    indices_len: 7,
                    dense_bytes: 7,
                },
                a.out_ptr,
            );
            if !out.is_null() && a.mem.next() % 4 == 0 {
                unsafe { std::ptr::addr_of_mut!((*out).struct_size).write_unaligned(a.mem.next() as usize % 64) };
            }
            let s = unsafe { seer_mask_sizes(b, heads, block, out) };
            if status_ok("seer_mask_sizes", s) {
                let o = unsafe { out.read_unaligned() };
                assert_eq!(o.row_offsets_len, o.rows + 1);
            } else if !out.is_null() {
                assert_eq!(unsafe { out.read_unaligned() }.rows, 7, "seer_mask_sizes wrote on failure");
            }
        }
        1 => {
            let b = a.batch.place(a.mem)?;
            let out = out_usize(a.mem, a.out_ptr);
            let s = unsafe { seer_prefill_workspace_size(b, heads, dim, device, out) };
            if !status_ok("seer_prefill_workspace_size", s) {
                assert!(sentinel_kept(out));
            }
        }
        2 => {
            let b = a.batch.place(a.mem)?;
            let (len, ptr, bits) = a.dense;
            let dense = a.mem.place(ptr, Some(len), false, false)?;
            if matches!(ptr, Ptr::Valid | Ptr::Misaligned(_)) && !dense.is_null() {
                unsafe { std::ptr::copy_nonoverlapping(bits.as_ptr(), dense, len.min(bits.len())) };
            }
            let m = a.mask.place(a.mem, true, None)?;
            let s = unsafe { seer_mask_from_dense(b, heads, block, dense, len, m) };
            if status_ok("seer_mask_from_dense", s) {
                check_written_mask(unsafe { &*m }, unsafe { &*b }, heads as usize);
            }
        }
        3 => {
            let b = a.batch.place(a.mem)?;
            let m = a.mask.place(a.mem, false, Some(a.valid_mask))?;
            let (len, ptr, _) = a.dense;
            let dense = a.mem.place(ptr, Some(len), true, false)?;
            let s = unsafe { seer_mask_to_dense(b, heads, block, m, dense, len) };
            if status_ok("seer_mask_to_dense", s) {
                let out = unsafe { std::slice::from_raw_parts(dense, len) };
                assert!(out.iter().all(|&x| x <= 1), "a dense map holds 0 and 1 only");
            }
        }
        4 => {
            let params = with_caches(a);
            let mp = place_struct(a.mem, params, a.mp_ptr);
            let b = a.batch.place(a.mem)?;
            let q = a.q.place(a.mem, false)?;
            let k = a.k.place(a.mem, false)?;
            let m = a.mask.place(a.mem, true, None)?;
            let s = unsafe { seer_gate_compute_mask(a.gate_arg, mp, b, q, k, m) };
            if status_ok("seer_gate_compute_mask", s) {
                assert_eq!(a.mask.device, 0, "no CUDA mask can be computed here");
                check_written_mask(unsafe { &*m }, unsafe { &*b }, a.config.num_q_heads as usize);
            }
        }
        5 => {
            let pp = place_struct(a.mem, a.pp, a.pp_ptr);
            let b = a.batch.place(a.mem)?;
            let q = a.q.place(a.mem, false)?;
            let k = a.k.place(a.mem, false)?;
            let v = a.v.place(a.mem, false)?;
            let m = a.mask.place(a.mem, false, Some(a.valid_mask))?;
            let o = a.out.place(a.mem, true)?;
            let (on, len, ptr) = a.lse;
            let lse = if on {
                a.mem.place(ptr, len.checked_mul(4), true, false)?.cast::<f32>()
            } else {
                std::ptr::null_mut()
            };
            let s = unsafe { seer_sparse_prefill(pp, b, q, k, v, m, o, lse, len) };
            if status_ok("seer_sparse_prefill", s) {
                let finite_inputs = [&*a.q, &*a.k, &*a.v].iter().all(|t| t.fill != Fill::Raw && t.fill != Fill::Huge)
                    && a.pp.softmax_scale.abs() <= 16.0;
                if finite_inputs {
                    check_finite_output(unsafe { &*o });
                    if !lse.is_null() {
                        let l = unsafe { std::slice::from_raw_parts(lse, len) };
                        assert!(l.iter().all(|x| x.is_finite() || *x == f32::NEG_INFINITY), "lse is finite or -inf");
                    }
                }
            }
        }
        6 => {
            let b = a.batch.place(a.mem)?;
            let out = out_usize(a.mem, a.out_ptr);
            let s = unsafe { seer_gate_workspace_size(a.gate_arg, b, device, out) };
            if status_ok("seer_gate_workspace_size", s) {
                let bytes = unsafe { out.read_unaligned() };
                assert!(device != 0 || bytes == 0, "the CPU needs no workspace");
            } else {
                assert!(sentinel_kept(out));
            }
        }
        7 => {
            // Weights of a fuzzed gate (or its fallback) through the C API.
            if a.gate.is_null() {
                return Ok(());
            }
            let (kw, qw_on, qw) = &mut a.weights;
            let kp = kw.place(a.mem, false)?;
            let qp = if *qw_on { qw.place(a.mem, false)? } else { std::ptr::null() };
            let s = unsafe { seer_gate_set_layer_weights(a.gate_arg, layer, kp, qp) };
            if status_ok("seer_gate_set_layer_weights", s) {
                assert_eq!(unsafe { seer_gate_has_layer(a.gate_arg, layer) }, 1);
            }
        }
        8 => {
            let out = out_usize(a.mem, a.out_ptr);
            let s = unsafe { seer_kblock_cache_size(a.gate_arg, tokens, out) };
            if !status_ok("seer_kblock_cache_size", s) {
                assert!(sentinel_kept(out));
            }
        }
        9 => {
            let mp = place_struct(a.mem, a.mp, a.mp_ptr);
            let b = a.batch.place(a.mem)?;
            let k = a.k.place(a.mem, false)?;
            let (caches, ptr, n) = (&a.caches.0, a.caches.1, a.caches.2);
            let cp = cache_array(a.mem, caches, ptr, n)?;
            let s = unsafe { seer_kblock_cache_update(a.gate_arg, mp, b, k, cp, n) };
            // Nothing was uploaded: no update can succeed here.
            assert!(!status_ok("seer_kblock_cache_update", s));
        }
        10 => {
            let mut cfg = default_config();
            if a.mem.next() % 3 == 0 {
                cfg.struct_size = a.mem.next() as usize % 200;
            }
            let s = unsafe { seer_gate_get_config(a.gate_arg, &mut cfg) };
            if status_ok("seer_gate_get_config", s) {
                assert_eq!(cfg.num_q_heads, a.config.num_q_heads);
            }
            let mut mp: SeerMaskParams = unsafe { std::mem::zeroed() };
            status_ok("seer_mask_params_default", unsafe { seer_mask_params_default(a.gate_arg, &mut mp) });
            let _ = unsafe { seer_gate_has_layer(a.gate_arg, layer) };
            let mut pp: SeerPrefillParams = unsafe { std::mem::zeroed() };
            let ppp = place_struct(a.mem, pp, a.pp_ptr);
            status_ok("seer_prefill_params_default", unsafe { seer_prefill_params_default(ppp) });
            pp.struct_size = 0;
            let _ = pp;
            let _ = seer_status_name(layer);
        }
        _ => {
            // A handle destroyed while in use by this thread: any later use
            // is a clean status, and destroying again is ignored.
            if a.gate.is_null() || a.gate_arg != a.gate {
                unsafe { seer_gate_destroy(a.gate_arg) };
                return Ok(());
            }
            unsafe { seer_gate_destroy(a.gate) };
            let mut cfg = default_config();
            let s = unsafe { seer_gate_get_config(a.gate, &mut cfg) };
            assert_eq!(s, SEER_INVALID_ARGUMENT, "a destroyed handle is refused");
            let mp = place_struct(a.mem, a.mp, Ptr::Valid);
            let b = a.batch.place(a.mem)?;
            let q = a.q.place(a.mem, false)?;
            let k = a.k.place(a.mem, false)?;
            let m = a.mask.place(a.mem, true, None)?;
            let s = unsafe { seer_gate_compute_mask(a.gate, mp, b, q, k, m) };
            assert!(matches!(s, SEER_INVALID_ARGUMENT | SEER_NULL_POINTER), "{s:?}");
            // The guard destroys it again: ignored.
        }
    }
    Ok(())
}

fn with_caches(a: &mut OpArgs) -> SeerMaskParams {
    let mut mp = a.mp;
    let (caches, ptr, n) = (&a.caches.0, a.caches.1, a.caches.2);
    if ptr != Ptr::Null {
        if let Ok(p) = cache_array(a.mem, caches, ptr, n) {
            mp.maybe_kblock_caches = p;
            mp.num_kblock_caches = n;
        }
    }
    mp
}

/// The host array of cache addresses: `n` entries (the library reads that many).
fn cache_array(mem: &mut Memory, caches: &[u64], ptr: Ptr, n: usize) -> Result<*const u64, ()> {
    let bytes = n.checked_mul(8).filter(|&b| b <= isize::MAX as usize);
    let bytes = if ptr == Ptr::Null { Some(0) } else { bytes };
    let p = mem.place_array(ptr, bytes)?;
    if !p.is_null() {
        // A stand-in buffer for an overflowing count holds 64 bytes.
        for i in 0..bytes.map_or(8, |_| n) {
            unsafe { p.cast::<u64>().add(i).write_unaligned(caches.get(i).copied().unwrap_or(0x7f20_0000_0000)) };
        }
    }
    Ok(p.cast())
}

/// Every element of an output tensor (host memory) is finite.
fn check_finite_output(t: &SeerTensor) {
    let shape = t.shape.map(|x| x as usize);
    let size = if t.dtype == 2 { 4 } else { 2 };
    for i in 0..shape[0] {
        for h in 0..shape[1] {
            for x in 0..shape[2] {
                let off = (i * t.strides[0] as usize + h * t.strides[1] as usize + x * t.strides[2] as usize) * size;
                let p = unsafe { t.data.cast::<u8>().add(off) };
                let v = unsafe {
                    match t.dtype {
                        2 => p.cast::<f32>().read_unaligned(),
                        1 => half::f16::from_bits(p.cast::<u16>().read_unaligned()).to_f32(),
                        _ => half::bf16::from_bits(p.cast::<u16>().read_unaligned()).to_f32(),
                    }
                };
                assert!(v.is_finite(), "output ({i}, {h}, {x}) = {v} from finite inputs");
            }
        }
    }
}
