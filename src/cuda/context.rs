//! Contexts: which CUDA context owns a caller's pointer, making it current
//! for the duration of a call, and checking that a pointer really is device
//! memory of the claimed size.

use super::{check, driver, lock, Handle};
use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUcontext, CUdevice, CUdeviceptr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::{Mutex, OnceLock};

/// A CUDA context and the facts about its device that kernels dispatch on.
/// Copyable: it does not own the context (the caller's, or a primary context
/// this module keeps retained), so it must not outlive the caller's context.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    raw: CUcontext,
    /// The driver's process-unique id of the context (`cuCtxGetId`). Caches
    /// key on it rather than on `raw`, because a destroyed context's handle
    /// value can be reused by a new context.
    id: u64,
    device: CUdevice,
    cc: (i32, i32),
    sm_count: i32,
}

// SAFETY: a context handle may be used from any thread (see `Handle`); the
// per-thread state (the current context) is managed by `make_current`.
unsafe impl Send for Ctx {}
// SAFETY: as above; `Ctx` is an immutable set of identifiers.
unsafe impl Sync for Ctx {}

impl Ctx {
    /// The raw driver handle.
    pub fn raw(&self) -> CUcontext {
        self.raw
    }
    /// The driver's unique id of this context (stable for the process lifetime).
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The device the context runs on.
    pub fn device(&self) -> CUdevice {
        self.device
    }
    /// Compute capability `(major, minor)`, e.g. `(9, 0)` for H100.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }
    /// Number of streaming multiprocessors (grid sizing of persistent kernels).
    pub fn sm_count(&self) -> i32 {
        self.sm_count
    }

    /// Make this context current on the calling thread until the guard drops,
    /// then restore whatever was current before. Kernel loads, launches and
    /// memory calls need the right current context; the caller's own current
    /// context (if any) must come back untouched.
    pub fn make_current(&self) -> Result<CurrentGuard> {
        push(self.raw)
    }

    fn from_raw(raw: CUcontext) -> Result<Ctx> {
        let mut id = 0u64;
        let mut device: CUdevice = 0;
        // SAFETY: out-pointers are valid locals; `raw` came from the driver.
        unsafe {
            check("cuCtxGetId", sys::cuCtxGetId(raw, &mut id))?;
            check("cuCtxGetDevice", sys::cuCtxGetDevice_v2(&mut device, raw))?;
        }
        let (cc, sm_count) = device_facts(device)?;
        Ok(Ctx { raw, id, device, cc, sm_count })
    }
}

/// Compute capability and SM count of a device.
type DeviceFacts = ((i32, i32), i32);

/// [`DeviceFacts`] of a device, queried once per device.
fn device_facts(device: CUdevice) -> Result<DeviceFacts> {
    static FACTS: OnceLock<Mutex<HashMap<CUdevice, DeviceFacts>>> = OnceLock::new();
    let facts = FACTS.get_or_init(Default::default);
    if let Some(f) = lock(facts).get(&device) {
        return Ok(*f);
    }
    let attr = |a: sys::CUdevice_attribute, what: &str| -> Result<i32> {
        let mut v = 0;
        // SAFETY: valid out-pointer; `device` came from the driver.
        check(what, unsafe { sys::cuDeviceGetAttribute(&mut v, a, device) })?;
        Ok(v)
    };
    use sys::CUdevice_attribute::*;
    let major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "cuDeviceGetAttribute(compute capability major)")?;
    let minor = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, "cuDeviceGetAttribute(compute capability minor)")?;
    let sms = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "cuDeviceGetAttribute(multiprocessor count)")?;
    let f = ((major, minor), sms);
    lock(facts).insert(device, f);
    Ok(f)
}

/// Guard of [`Ctx::make_current`]. Not `Send`: the context stack it restores
/// belongs to the thread that created it.
#[must_use = "the context is current only while the guard lives"]
pub struct CurrentGuard {
    pushed: bool,
    _thread_bound: PhantomData<*mut ()>,
}

pub(crate) fn push(raw: CUcontext) -> Result<CurrentGuard> {
    let mut current: CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut current) })?;
    if current == raw {
        // Already current: nothing to push, nothing to restore.
        return Ok(CurrentGuard { pushed: false, _thread_bound: PhantomData });
    }
    // SAFETY: `raw` is a live context handle from the driver.
    check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(raw) })?;
    Ok(CurrentGuard { pushed: true, _thread_bound: PhantomData })
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        if self.pushed {
            let mut popped: CUcontext = std::ptr::null_mut();
            // SAFETY: pops the context this guard pushed on this thread.
            // Nothing useful can be done with a failure in a destructor.
            let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
        }
    }
}

/// What the driver knows about an address (`cuPointerGetAttributes`).
struct PointerInfo {
    context: CUcontext,
    memory_type: u32,
    is_managed: bool,
    device_ordinal: i32,
    range_start: u64,
    range_size: u64,
}

impl PointerInfo {
    fn is_device(&self) -> bool {
        self.is_managed || self.memory_type == sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32
    }
}

fn pointer_info(ptr: u64) -> Result<PointerInfo> {
    use sys::CUpointer_attribute::*;
    // Zero-initialised 8-byte slots: the driver writes each attribute in its
    // own width (bool, int, pointer), the rest stays zero.
    let mut context: CUcontext = std::ptr::null_mut();
    let (mut memory_type, mut is_managed, mut ordinal) = (0u64, 0u64, 0u64);
    let (mut range_start, mut range_size) = (0u64, 0u64);
    let mut attributes = [
        CU_POINTER_ATTRIBUTE_CONTEXT,
        CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        CU_POINTER_ATTRIBUTE_IS_MANAGED,
        CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        CU_POINTER_ATTRIBUTE_RANGE_SIZE,
    ];
    let mut data: [*mut c_void; 6] = [
        (&mut context as *mut CUcontext).cast(),
        (&mut memory_type as *mut u64).cast(),
        (&mut is_managed as *mut u64).cast(),
        (&mut ordinal as *mut u64).cast(),
        (&mut range_start as *mut u64).cast(),
        (&mut range_size as *mut u64).cast(),
    ];
    // SAFETY: six attributes, six valid 8-byte out slots. Unlike
    // cuPointerGetAttribute, this call reports an address unknown to CUDA
    // (plain host memory) as success with zeroed attributes.
    let r = unsafe {
        sys::cuPointerGetAttributes(
            attributes.len() as u32,
            attributes.as_mut_ptr(),
            data.as_mut_ptr(),
            ptr as CUdeviceptr,
        )
    };
    if r == sys::CUresult::CUDA_ERROR_INVALID_VALUE {
        // Older drivers answer so for addresses they do not know.
        return Ok(PointerInfo {
            context: std::ptr::null_mut(),
            memory_type: 0,
            is_managed: false,
            device_ordinal: -1,
            range_start: 0,
            range_size: 0,
        });
    }
    check("cuPointerGetAttributes", r)?;
    Ok(PointerInfo {
        context,
        memory_type: memory_type as u32,
        is_managed: is_managed as u8 != 0,
        device_ordinal: ordinal as u32 as i32,
        range_start,
        range_size,
    })
}

/// The context that owns device pointer `ptr`. Allocations whose context the
/// driver does not report (stream-ordered pools, some drivers' primary
/// context allocations) resolve to their device's primary context, which is
/// then retained for the rest of the process.
pub fn context_of(ptr: u64) -> Result<Ctx> {
    driver()?;
    let info = pointer_info(ptr)?;
    if !info.is_device() {
        return Err(Error::invalid(format!("pointer {ptr:#x} is not device memory")));
    }
    if !info.context.is_null() {
        return Ctx::from_raw(info.context);
    }
    if info.device_ordinal >= 0 {
        return primary_context(info.device_ordinal);
    }
    Err(Error::invalid(format!("pointer {ptr:#x}: the driver reports neither its context nor its device")))
}

/// Refuse a pointer that is not device memory, or whose `len_bytes` do not
/// lie inside its allocation. `name` is the argument's name in the message.
/// A zero-length buffer is not accessed and passes whatever its pointer.
pub fn check_device_pointer(name: &str, ptr: u64, len_bytes: usize) -> Result<()> {
    driver()?;
    if len_bytes == 0 {
        return Ok(());
    }
    let info = pointer_info(ptr)?;
    if !info.is_device() {
        return Err(Error::invalid(format!(
            "{name} is not device memory (address {ptr:#x}: host memory cannot be passed as a CUDA buffer)"
        )));
    }
    let end = ptr.checked_add(len_bytes as u64);
    let alloc_end = info.range_start.saturating_add(info.range_size);
    // A zero range size means the driver does not track the allocation's
    // extent (possible for some mappings): nothing to check against.
    if info.range_size > 0 && (ptr < info.range_start || end.map_or(true, |e| e > alloc_end)) {
        return Err(Error::invalid(format!(
            "{name}: {len_bytes} bytes at {ptr:#x} run past its allocation ({} bytes at {:#x})",
            info.range_size, info.range_start
        )));
    }
    Ok(())
}

/// The calling thread's current context, or else device 0's primary context
/// (retained for the process lifetime): the context the CUDA runtime would use.
pub fn current_context() -> Result<Ctx> {
    driver()?;
    let mut current: CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut current) })?;
    if current.is_null() {
        primary_context(0)
    } else {
        Ctx::from_raw(current)
    }
}

/// Device `ordinal`'s primary context, retained once and never released, so
/// that the handle stays valid however the caller's runtime uses it.
pub(crate) fn primary_context(ordinal: i32) -> Result<Ctx> {
    static PRIMARY: OnceLock<Mutex<HashMap<i32, Handle<CUcontext>>>> = OnceLock::new();
    let map = PRIMARY.get_or_init(Default::default);
    let mut map = lock(map);
    let raw = match map.get(&ordinal) {
        Some(h) => h.0,
        None => {
            let mut device: CUdevice = 0;
            let mut raw: CUcontext = std::ptr::null_mut();
            // SAFETY: valid out-pointers; the ordinal is checked by the driver.
            unsafe {
                check("cuDeviceGet", sys::cuDeviceGet(&mut device, ordinal))?;
                check("cuDevicePrimaryCtxRetain", sys::cuDevicePrimaryCtxRetain(&mut raw, device))?;
            }
            map.insert(ordinal, Handle(raw));
            raw
        }
    };
    drop(map);
    Ctx::from_raw(raw)
}

/// The device's name as the driver reports it (e.g. `NVIDIA H100 80GB HBM3`).
pub fn device_name(ctx: &Ctx) -> Result<String> {
    driver()?;
    let mut buf = [0 as std::ffi::c_char; 256];
    // SAFETY: the buffer holds 256 bytes; the driver NUL-terminates within it.
    check("cuDeviceGetName", unsafe { sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, ctx.device()) })?;
    // SAFETY: NUL-terminated by the driver (and the buffer was zeroed).
    Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}
