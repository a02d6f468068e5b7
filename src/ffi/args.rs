//! Descriptors the C caller fills in, and the checks that turn them into safe
//! Rust views. Nothing in this module trusts a pointer it has not checked for
//! NULL, alignment and size; every slice formed from caller memory is first
//! checked not to alias another buffer of the same call that is written.

use super::status::{FfiError, FfiResult, SeerStatus};
use crate::batch::Batch;
use crate::gpu::{DeviceMask, DeviceTensor};
use crate::mask::BlockMaskRef;
use crate::tensor::{DType, Layout3, Tensor3, Tensor3Mut};
use std::ffi::c_void;
use std::mem::{align_of, size_of};

/// Element types of `SeerTensor::dtype`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeerDType {
    SEER_DTYPE_BF16 = 0,
    SEER_DTYPE_F16 = 1,
    SEER_DTYPE_F32 = 2,
}

/// Where a buffer lives (`device` fields).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeerDevice {
    /// Host memory: the CPU reference path.
    SEER_DEVICE_CPU = 0,
    /// CUDA device memory, used on the stream given in the call's params.
    SEER_DEVICE_CUDA = 1,
}

/// A `[tokens, heads, dim]` tensor: pointer, element type, shape and strides
/// **in elements** (64-bit). Strides may describe views (a KV cache slice, one
/// of Q/K/V inside a fused QKV buffer): no contiguity is required. `data`
/// must be aligned to the element size. Inputs are only read.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeerTensor {
    pub data: *mut c_void,
    /// A `SeerDType` value.
    pub dtype: u32,
    /// A `SeerDevice` value.
    pub device: u32,
    pub shape: [i64; 3],
    pub strides: [i64; 3],
}

/// Sequence lengths of a variable-length batch, FlashAttention style:
/// sequence `s` owns query rows `cu_seqlens_q[s]..cu_seqlens_q[s+1]` and key
/// rows `cu_seqlens_k[s]..cu_seqlens_k[s+1]`; its queries are the last
/// `q_len` of its `k_len` positions (`q_len < k_len` is chunked prefill over
/// a KV cache). Both arrays hold `num_seqs + 1` entries in **host** memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeerBatch {
    pub num_seqs: u32,
    pub cu_seqlens_q: *const i32,
    pub cu_seqlens_k: *const i32,
}

/// A block mask in the index-list format (see the README): `counts[rows]`,
/// `row_offsets[rows + 1]` and `indices[row_offsets[rows]]`, all in the memory
/// named by `device`. Written by `seer_gate_compute_mask` and
/// `seer_mask_from_dense`, read by `seer_sparse_prefill` and `seer_mask_to_dense`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeerBlockMask {
    pub counts: *mut i32,
    pub counts_len: usize,
    pub indices: *mut i32,
    pub indices_len: usize,
    pub row_offsets: *mut i64,
    pub row_offsets_len: usize,
    /// A `SeerDevice` value.
    pub device: u32,
}

pub(crate) fn null(name: &str) -> FfiError {
    FfiError::new(SeerStatus::SEER_NULL_POINTER, format!("{name} is NULL"))
}

pub(crate) fn invalid(msg: impl Into<String>) -> FfiError {
    FfiError::new(SeerStatus::SEER_INVALID_ARGUMENT, msg)
}

/// Borrow `*ptr`, refusing NULL and misalignment.
pub(crate) unsafe fn deref<'a, T>(name: &str, ptr: *const T) -> FfiResult<&'a T> {
    Ok(&*out_ptr(name, ptr.cast_mut())?)
}

/// Check a pointer for NULL and alignment. Out-parameters go through this
/// before any work is done, so a call with nowhere to put its result has no effect.
pub(crate) fn out_ptr<T>(name: &str, ptr: *mut T) -> FfiResult<*mut T> {
    if ptr.is_null() {
        return Err(null(name));
    }
    if (ptr as usize) % align_of::<T>() != 0 {
        return Err(invalid(format!("{name} is not aligned to {} bytes", align_of::<T>())));
    }
    Ok(ptr)
}

/// Read a versioned params struct whose first field is `struct_size`. The
/// caller's `struct_size` must cover this version's struct; fields a newer
/// caller appended past it are not read.
pub(crate) unsafe fn read_sized<T: Copy>(name: &str, ptr: *const T) -> FfiResult<T> {
    let head: &usize = deref(name, ptr.cast::<usize>())?;
    if (ptr as usize) % align_of::<T>() != 0 {
        return Err(invalid(format!("{name} is not aligned to {} bytes", align_of::<T>())));
    }
    if *head < size_of::<T>() {
        return Err(invalid(format!(
            "{name}->struct_size = {} but this library's struct is {} bytes: set struct_size = sizeof(the struct) \
             (use the matching *_default function to initialise it)",
            head,
            size_of::<T>()
        )));
    }
    Ok(ptr.read())
}

/// Read a versioned params struct that has grown: `versions` lists the
/// sizes of its earlier releases (each one the offset of the first field
/// the next release appended). A caller whose `struct_size` covers this
/// library's struct gets it read whole, as [`read_sized`]; one whose
/// `struct_size` is smaller but covers an earlier release (compiled against
/// an older header) gets the fields of the largest such release read from
/// its memory and every later field taken from `defaults` (NULL/0: the
/// feature is absent). Nothing past the caller's `struct_size` is read.
/// Sizes below the oldest release are refused.
pub(crate) unsafe fn read_versioned<T: Copy>(
    name: &str,
    ptr: *const T,
    versions: &[usize],
    defaults: T,
) -> FfiResult<T> {
    let head: &usize = deref(name, ptr.cast::<usize>())?;
    if (ptr as usize) % align_of::<T>() != 0 {
        return Err(invalid(format!("{name} is not aligned to {} bytes", align_of::<T>())));
    }
    let full = size_of::<T>();
    if *head >= full {
        return Ok(ptr.read());
    }
    let Some(&known) = versions.iter().filter(|&&v| v <= *head && v <= full).max() else {
        let oldest = versions.iter().copied().min().unwrap_or(full);
        return Err(invalid(format!(
            "{name}->struct_size = {head} but this library reads this struct from {oldest} bytes on (its first \
             release) and is {full} bytes now: set struct_size = sizeof(the struct) (use the matching *_default \
             function to initialise it)"
        )));
    };
    let mut value = defaults;
    // The caller's struct is laid out like ours up to `known` bytes (the
    // release it was compiled against, or a later one it covers).
    std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&mut value as *mut T).cast::<u8>(), known);
    Ok(value)
}

/// Write a versioned output struct after checking the caller's `struct_size`.
pub(crate) unsafe fn write_sized<T: Copy>(name: &str, ptr: *mut T, value: T) -> FfiResult {
    let head: &usize = deref(name, ptr.cast::<usize>().cast_const())?;
    if (ptr as usize) % align_of::<T>() != 0 {
        return Err(invalid(format!("{name} is not aligned to {} bytes", align_of::<T>())));
    }
    if *head < size_of::<T>() {
        return Err(invalid(format!(
            "{name}->struct_size = {head} but this library's struct is {} bytes: set struct_size = sizeof(the struct)",
            size_of::<T>()
        )));
    }
    ptr.write(value);
    Ok(())
}

/// A byte range of caller memory, for aliasing checks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    pub name: &'static str,
    pub start: usize,
    pub len: usize,
}

impl Region {
    fn overlaps(&self, other: &Region) -> bool {
        self.len > 0 && other.len > 0 && self.start < other.start + other.len && other.start < self.start + self.len
    }
}

/// Refuse any written region that overlaps another region of the call.
pub(crate) fn check_disjoint(written: &[Region], read: &[Region]) -> FfiResult {
    for (i, w) in written.iter().enumerate() {
        for other in written[i + 1..].iter().chain(read) {
            if w.overlaps(other) {
                return Err(invalid(format!("{} overlaps {} in memory", w.name, other.name)));
            }
        }
    }
    Ok(())
}

/// A checked slice of caller memory: NULL only with length 0, aligned, and
/// not larger than the address space allows.
pub(crate) struct RawSlice<T> {
    pub ptr: *mut T,
    pub len: usize,
    pub region: Region,
}

pub(crate) fn raw_slice<T>(name: &'static str, ptr: *mut T, len: usize) -> FfiResult<RawSlice<T>> {
    if ptr.is_null() {
        if len == 0 {
            return Ok(RawSlice {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
                region: Region { name, start: 0, len: 0 },
            });
        }
        return Err(null(name));
    }
    if (ptr as usize) % align_of::<T>() != 0 {
        return Err(invalid(format!("{name} is not aligned to {} bytes", align_of::<T>())));
    }
    let bytes = len
        .checked_mul(size_of::<T>())
        .filter(|&b| b <= isize::MAX as usize && (ptr as usize).checked_add(b).is_some())
        .ok_or_else(|| invalid(format!("{name}: length {len} exceeds the address space")))?;
    Ok(RawSlice { ptr, len, region: Region { name, start: ptr as usize, len: bytes } })
}

impl<T> RawSlice<T> {
    /// # Safety
    /// The caller promised `len` valid elements at `ptr` for the call.
    pub unsafe fn get<'a>(&self) -> &'a [T] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }
    /// # Safety
    /// As [`RawSlice::get`], and the region was checked disjoint from every
    /// other buffer of the call.
    pub unsafe fn get_mut<'a>(&self) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }
}

pub(crate) fn dtype_of(name: &str, code: u32) -> FfiResult<DType> {
    match code {
        0 => Ok(DType::BF16),
        1 => Ok(DType::F16),
        2 => Ok(DType::F32),
        _ => Err(invalid(format!("{name}: dtype {code} is not a SeerDType (0 = bf16, 1 = f16, 2 = f32)"))),
    }
}

/// Refuse a device the calling operation cannot serve yet, with the reason.
/// The message is prefixed with the entry point's name (the operation) by
/// the boundary, so it reads "seer_x: CUDA buffers for q: ...".
pub(crate) fn require_cpu(name: &str, device: u32) -> FfiResult {
    match device {
        0 => Ok(()),
        1 => Err(FfiError::new(
            SeerStatus::SEER_UNSUPPORTED,
            format!(
                "CUDA buffers for {name}: this operation has no CUDA path yet (its CPU reference path takes host memory)"
            ),
        )),
        _ => Err(invalid(format!("{name}: device {device} is not a SeerDevice (0 = CPU, 1 = CUDA)"))),
    }
}

/// The `SeerDevice` of a descriptor field, refusing values that are none.
pub(crate) fn device_of(name: &str, code: u32) -> FfiResult<SeerDevice> {
    match code {
        0 => Ok(SeerDevice::SEER_DEVICE_CPU),
        1 => Ok(SeerDevice::SEER_DEVICE_CUDA),
        _ => Err(invalid(format!("{name}: device {code} is not a SeerDevice (0 = CPU, 1 = CUDA)"))),
    }
}

pub(crate) fn device_name(d: SeerDevice) -> &'static str {
    match d {
        SeerDevice::SEER_DEVICE_CPU => "SEER_DEVICE_CPU",
        SeerDevice::SEER_DEVICE_CUDA => "SEER_DEVICE_CUDA",
    }
}

/// Refuse a buffer on another device than the call's (named by `reference`,
/// the argument that decided it): one call never mixes host and device memory.
pub(crate) fn require_same_device(name: &str, code: u32, want: SeerDevice, reference: &str) -> FfiResult {
    let got = device_of(name, code)?;
    if got != want {
        return Err(invalid(format!(
            "{name} is {} but {reference} is {}: all buffers of one call must be on the same device",
            device_name(got),
            device_name(want)
        )));
    }
    Ok(())
}

/// Refuse a descriptor that is not in CUDA memory where one is expected.
fn require_cuda(name: &str, code: u32) -> FfiResult {
    match device_of(name, code)? {
        SeerDevice::SEER_DEVICE_CUDA => Ok(()),
        other => Err(invalid(format!("{name} is {}, expected SEER_DEVICE_CUDA", device_name(other)))),
    }
}

/// Shape and strides of a descriptor: positive extents, non-negative strides.
fn layout_of(name: &str, t: &SeerTensor) -> FfiResult<Layout3> {
    let mut shape = [0usize; 3];
    let mut strides = [0usize; 3];
    for d in 0..3 {
        if t.shape[d] <= 0 {
            return Err(invalid(format!("{name}: shape {:?} must be positive in every dimension", t.shape)));
        }
        if t.strides[d] < 0 {
            return Err(invalid(format!("{name}: strides {:?} must be non-negative", t.strides)));
        }
        shape[d] = t.shape[d] as usize;
        strides[d] = t.strides[d] as usize;
    }
    Ok(Layout3 { shape, strides })
}

/// A checked tensor descriptor: its layout, dtype and memory region.
pub(crate) struct CheckedTensor {
    pub dtype: DType,
    pub layout: Layout3,
    pub bytes: RawSlice<u8>,
}

/// The host-side facts of a tensor descriptor, whatever its device: a known
/// dtype, a valid layout, the byte length its strides address (without
/// overflow), and a non-NULL pointer aligned to the element size.
fn described_bytes(name: &str, t: &SeerTensor) -> FfiResult<(DType, Layout3, usize)> {
    let dtype = dtype_of(name, t.dtype)?;
    let layout = layout_of(name, t)?;
    let span = layout.span(name).map_err(FfiError::from)?;
    let len = span.checked_mul(dtype.size()).ok_or_else(|| invalid(format!("{name}: byte size overflows")))?;
    if t.data.is_null() {
        return Err(null(&format!("{name}->data")));
    }
    if (t.data as usize) % dtype.size() != 0 {
        return Err(invalid(format!("{name}->data is not aligned to its {}-byte elements", dtype.size())));
    }
    Ok((dtype, layout, len))
}

pub(crate) unsafe fn tensor(name: &'static str, ptr: *const SeerTensor) -> FfiResult<CheckedTensor> {
    let t = deref(name, ptr)?;
    require_cpu(name, t.device)?;
    let (dtype, layout, len) = described_bytes(name, t)?;
    let bytes = raw_slice(name, t.data.cast::<u8>(), len)?;
    Ok(CheckedTensor { dtype, layout, bytes })
}

impl CheckedTensor {
    pub unsafe fn view<'a>(&self, name: &str) -> FfiResult<Tensor3<'a>> {
        Ok(Tensor3::new(name, self.bytes.get(), self.dtype, self.layout)?)
    }
    pub unsafe fn view_mut<'a>(&self, name: &str) -> FfiResult<Tensor3Mut<'a>> {
        Ok(Tensor3Mut::new(name, self.bytes.get_mut(), self.dtype, self.layout)?)
    }
}

/// A checked descriptor of a tensor in CUDA device memory: the address,
/// dtype and layout the GPU code takes, and its byte range for the overlap
/// checks. Only host-side facts are checked here (NULL, element alignment,
/// shape, strides, the span not wrapping the address space); that the
/// address is device memory of that size, in the right context, is checked
/// by the GPU code through the driver. No slice is ever formed from it.
pub(crate) struct CheckedDeviceTensor {
    pub tensor: DeviceTensor,
    pub region: Region,
}

pub(crate) unsafe fn device_tensor(name: &'static str, ptr: *const SeerTensor) -> FfiResult<CheckedDeviceTensor> {
    let t = deref(name, ptr)?;
    require_cuda(name, t.device)?;
    let (dtype, layout, len) = described_bytes(name, t)?;
    let region = device_region(name, t.data as usize, len, 1)?;
    Ok(CheckedDeviceTensor { tensor: DeviceTensor { ptr: t.data as u64, dtype, layout }, region })
}

/// The byte range of `len` elements of `elem` bytes at device address
/// `addr`: NULL only with length 0, aligned to the element, not wrapping.
pub(crate) fn device_region(name: &'static str, addr: usize, len: usize, elem: usize) -> FfiResult<Region> {
    if addr == 0 {
        if len == 0 {
            return Ok(Region { name, start: 0, len: 0 });
        }
        return Err(null(name));
    }
    if addr % elem != 0 {
        return Err(invalid(format!("{name} is not aligned to {elem} bytes")));
    }
    let bytes = len
        .checked_mul(elem)
        .filter(|&b| b <= isize::MAX as usize && addr.checked_add(b).is_some())
        .ok_or_else(|| invalid(format!("{name}: length {len} exceeds the address space")))?;
    Ok(Region { name, start: addr, len: bytes })
}

pub(crate) unsafe fn batch(ptr: *const SeerBatch) -> FfiResult<Batch> {
    let b = deref("batch", ptr)?;
    if b.num_seqs == 0 {
        return Err(invalid("batch->num_seqs is 0: a batch needs at least one sequence"));
    }
    let n = b.num_seqs as usize + 1;
    let q = raw_slice("batch->cu_seqlens_q", b.cu_seqlens_q.cast_mut(), n)?;
    let k = raw_slice("batch->cu_seqlens_k", b.cu_seqlens_k.cast_mut(), n)?;
    Ok(Batch::from_cu_seqlens(q.get(), k.get())?)
}

/// The three arrays of a mask descriptor, checked.
pub(crate) struct CheckedMask {
    pub counts: RawSlice<i32>,
    pub indices: RawSlice<i32>,
    pub row_offsets: RawSlice<i64>,
}

pub(crate) unsafe fn mask(name: &'static str, ptr: *const SeerBlockMask) -> FfiResult<CheckedMask> {
    let m = deref(name, ptr)?;
    require_cpu(name, m.device)?;
    let counts = raw_slice("mask->counts", m.counts, m.counts_len)?;
    let indices = raw_slice("mask->indices", m.indices, m.indices_len)?;
    let row_offsets = raw_slice("mask->row_offsets", m.row_offsets, m.row_offsets_len)?;
    Ok(CheckedMask { counts, indices, row_offsets })
}

impl CheckedMask {
    pub fn regions(&self) -> [Region; 3] {
        [self.counts.region, self.indices.region, self.row_offsets.region]
    }
    pub unsafe fn view<'a>(&self) -> BlockMaskRef<'a> {
        BlockMaskRef { counts: self.counts.get(), indices: self.indices.get(), row_offsets: self.row_offsets.get() }
    }
}

/// A checked mask descriptor in CUDA device memory (see [`device_tensor`]
/// for what is checked here and what the GPU code checks).
pub(crate) struct CheckedDeviceMask {
    pub mask: DeviceMask,
    pub regions: [Region; 3],
}

pub(crate) unsafe fn device_mask(name: &'static str, ptr: *const SeerBlockMask) -> FfiResult<CheckedDeviceMask> {
    let m = deref(name, ptr)?;
    require_cuda(name, m.device)?;
    let counts = device_region("mask->counts", m.counts as usize, m.counts_len, size_of::<i32>())?;
    let indices = device_region("mask->indices", m.indices as usize, m.indices_len, size_of::<i32>())?;
    let row_offsets = device_region("mask->row_offsets", m.row_offsets as usize, m.row_offsets_len, size_of::<i64>())?;
    Ok(CheckedDeviceMask {
        mask: DeviceMask {
            counts: m.counts as u64,
            counts_len: m.counts_len,
            indices: m.indices as u64,
            indices_len: m.indices_len,
            row_offsets: m.row_offsets as u64,
            row_offsets_len: m.row_offsets_len,
        },
        regions: [counts, indices, row_offsets],
    })
}

/// `0` or `1` for a C boolean field; anything else is refused.
pub(crate) fn flag(name: &str, v: u32) -> FfiResult<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(invalid(format!("{name} = {v} must be 0 or 1"))),
    }
}
