//! Kernel modules and launches. A fatbin is loaded once per context (the
//! driver JITs the PTX there if the GPU has no matching SASS, which can take
//! a while: it must not happen per call), its functions are looked up once
//! by name, and launches go through [`launch`].

use super::context::{push, Ctx};
use super::{check, driver, lock, require_kernels, Handle};
use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUcontext, CUfunction, CUmodule, CUstream};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Mutex, OnceLock};

/// One loaded fatbin in one context, and the functions looked up in it.
struct Module {
    raw: Handle<CUmodule>,
    functions: HashMap<String, Handle<CUfunction>>,
}

/// What [`launch`] needs to know about a function it did not create.
struct FunctionInfo {
    name: String,
    context: Handle<CUcontext>,
    /// The dynamic shared memory limit set on the function so far. Starts at
    /// 0, not the driver's 48 KiB default: that default also counts the
    /// kernel's static shared memory, so static + dynamic above 48 KiB needs
    /// the attribute even when the dynamic part alone is below it.
    max_dynamic_smem: u32,
}

#[derive(Default)]
struct Cache {
    /// Keyed by (context id, fatbin address): fatbins are `'static` and
    /// context ids are never reused. Modules are never unloaded; a destroyed
    /// context takes its modules with it, and its entries are simply never hit again.
    modules: HashMap<(u64, usize), Module>,
    functions: HashMap<Handle<CUfunction>, FunctionInfo>,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Kernel `name` of `fatbin` (one of [`super::kernels`]) in context `ctx`,
/// loading the module on first use. Thread-safe; later calls are a map lookup.
pub fn function(ctx: &Ctx, fatbin: &'static [u8], name: &str) -> Result<CUfunction> {
    require_kernels()?;
    driver()?;
    let mut cache = lock(cache());
    let key = (ctx.id(), fatbin.as_ptr() as usize);
    if let Some(f) = cache.modules.get(&key).and_then(|m| m.functions.get(name)) {
        return Ok(f.0);
    }
    check_fatbin(fatbin)?;
    let c_name = CString::new(name).map_err(|_| Error::invalid(format!("kernel name {name:?} contains NUL")))?;
    let _current = ctx.make_current()?;
    let module = match cache.modules.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let mut raw: CUmodule = std::ptr::null_mut();
            // SAFETY: `fatbin` is a complete fatbin image produced by build.rs,
            // valid for 'static; the driver copies what it needs.
            check("cuModuleLoadData", unsafe { sys::cuModuleLoadData(&mut raw, fatbin.as_ptr().cast()) })?;
            e.insert(Module { raw: Handle(raw), functions: HashMap::new() })
        }
    };
    let mut f: CUfunction = std::ptr::null_mut();
    // SAFETY: valid out-pointer, loaded module, NUL-terminated name.
    check(&format!("cuModuleGetFunction({name})"), unsafe {
        sys::cuModuleGetFunction(&mut f, module.raw.0, c_name.as_ptr())
    })?;
    module.functions.insert(name.to_string(), Handle(f));
    cache
        .functions
        .insert(Handle(f), FunctionInfo { name: name.to_string(), context: Handle(ctx.raw()), max_dynamic_smem: 0 });
    Ok(f)
}

/// Refuse bytes that are not a whole fatbin before the driver parses them:
/// the magic, and a header whose declared size fits in the slice (header:
/// u32 magic, u16 version, u16 header size, u64 payload size).
fn check_fatbin(fatbin: &[u8]) -> Result<()> {
    let le =
        |range: std::ops::Range<usize>| fatbin.get(range).map(|b| b.iter().rev().fold(0u64, |a, &x| a << 8 | x as u64));
    let whole = match (le(0..4), le(6..8), le(8..16)) {
        (Some(0xBA55_ED50), Some(header), Some(payload)) => {
            header.checked_add(payload).is_some_and(|n| n <= fatbin.len() as u64)
        }
        _ => false,
    };
    if whole {
        Ok(())
    } else {
        Err(Error::invalid("function: the image is not a complete fatbin (use a seerattn::cuda::kernels constant)"))
    }
}

/// Launch `f` (from [`function`]) on `stream` with `smem_bytes` of dynamic
/// shared memory. The function's context is made current for the launch and
/// the caller's current context restored after. Above 48 KiB of shared memory
/// the function's limit is raised first (once per function and size).
/// Asynchronous: errors of the kernel itself surface at the caller's next
/// synchronization, not here.
///
/// # Safety
/// `params` must hold one pointer per kernel parameter, each pointing to a
/// value of that parameter's type, and every device pointer among them must
/// be valid for what the kernel accesses until it completes. `stream` must
/// be a stream of `f`'s context (or NULL, the legacy default stream).
pub unsafe fn launch(
    f: CUfunction,
    grid: [u32; 3],
    block: [u32; 3],
    smem_bytes: u32,
    stream: CUstream,
    params: &mut [*mut c_void],
) -> Result<()> {
    require_kernels()?;
    driver()?;
    let context = {
        let mut cache = lock(cache());
        let info = cache
            .functions
            .get_mut(&Handle(f))
            .ok_or_else(|| Error::invalid("launch: the function was not obtained from cuda::function"))?;
        if smem_bytes > info.max_dynamic_smem {
            let _current = push(info.context.0)?;
            check(
                &format!("cuFuncSetAttribute({}, MAX_DYNAMIC_SHARED_SIZE_BYTES = {smem_bytes})", info.name),
                sys::cuFuncSetAttribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem_bytes as i32,
                ),
            )?;
            info.max_dynamic_smem = smem_bytes;
        }
        info.context.0
    };
    let _current = push(context)?;
    let r = sys::cuLaunchKernel(
        f,
        grid[0],
        grid[1],
        grid[2],
        block[0],
        block[1],
        block[2],
        smem_bytes,
        stream,
        params.as_mut_ptr(),
        std::ptr::null_mut(),
    );
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    // The message is built only on failure: the hot path allocates nothing.
    let name = lock(cache()).functions.get(&Handle(f)).map(|i| i.name.clone()).unwrap_or_default();
    check(&format!("cuLaunchKernel({name}, grid {grid:?}, block {block:?}, smem {smem_bytes})"), r)
}

#[cfg(test)]
mod tests {
    use super::check_fatbin;

    #[test]
    fn fatbin_check_accepts_built_kernels_and_refuses_partial_images() {
        for (name, bytes) in super::super::kernels::ALL {
            check_fatbin(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(check_fatbin(&bytes[..bytes.len() - 1]).is_err(), "{name} truncated");
        }
        assert!(check_fatbin(b"").is_err());
        assert!(check_fatbin(&[0u8; 64]).is_err());
        let mut huge = 0xBA55_ED50u32.to_le_bytes().to_vec();
        huge.extend([1, 0, 16, 0]);
        huge.extend(u64::MAX.to_le_bytes());
        assert!(check_fatbin(&huge).is_err());
    }
}
