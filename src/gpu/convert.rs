//! Host side of `kernels/convert.cu`: f32 inputs rounded to a 16-bit type
//! in the caller's workspace.
//!
//! The prefill and gate kernels read bf16 or f16 rows. A caller that holds
//! Q (attention) or the pre-RoPE Q/K (gate) in f32, as llama.cpp's graph
//! does, passes it as is: the library rounds it once per call into the
//! front of the workspace (sized by the workspace queries, which count it
//! exactly: [`packed_bytes`] rounded up to 256 per tensor) and runs the
//! kernels on that packed copy. The CPU path rounds the same way on the
//! host ([`round_host`]): round to nearest even, so both paths compute on
//! the same 16-bit values.

use crate::cuda::{self, kernels, CUstream, Ctx};
use crate::error::{Error, Result};
use crate::gpu::{check_buffer, DeviceTensor};
use crate::tensor::{DType, Layout3, Tensor3};
use std::ffi::c_void;

/// `seer::convert::Args` (kernels/convert.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Args {
    src: u64,
    dst: u64,
    row_stride: i64,
    head_stride: i64,
    dim_stride: i64,
    rows: i64,
    heads: i32,
    dim: i32,
}

/// Threads per CTA (one CTA per row of `dim` elements) and the grid's cap
/// (the kernel strides over rows past it).
const THREADS: u32 = 128;
const MAX_CTAS: usize = 1 << 20;

/// Workspace bytes of the packed 16-bit copy of a `shape` tensor: its
/// elements at 2 bytes, rounded up to 256 so that what follows stays
/// aligned for every kernel.
pub fn packed_bytes(shape: [usize; 3]) -> usize {
    (shape[0] * shape[1] * shape[2] * 2).div_ceil(256) * 256
}

/// Round the f32 tensor `src` (any strides, 4-byte aligned, device memory
/// of `ctx`) into a packed `[tokens, heads, dim]` tensor of `dtype` (bf16
/// or f16) at `dst`, which must hold [`packed_bytes`]; returns the packed
/// tensor's descriptor. Enqueued on `stream`; no allocation, copy or sync.
///
/// # Safety
/// `dst` must be device memory of `ctx` of at least [`packed_bytes`] bytes,
/// not overlapping `src`; both must stay valid until the work completes.
pub(crate) unsafe fn to_16bit(
    ctx: &Ctx,
    ctx_name: &str,
    name: &str,
    src: &DeviceTensor,
    dst: u64,
    dtype: DType,
    stream: CUstream,
) -> Result<DeviceTensor> {
    if src.dtype != DType::F32 {
        return Err(Error::invalid(format!("{name}: the conversion reads f32, not {}", src.dtype.name())));
    }
    let kernel = match dtype {
        DType::BF16 => "seer_convert_f32_bf16",
        DType::F16 => "seer_convert_f32_f16",
        DType::F32 => return Err(Error::invalid(format!("{name}: f32 is converted to bf16 or f16, not f32"))),
    };
    if src.ptr % 4 != 0 {
        return Err(Error::invalid(format!("{name} ({:#x}) is not aligned to 4 bytes (f32)", src.ptr)));
    }
    check_buffer(ctx, ctx_name, name, src.ptr, src.span_bytes(name)?)?;
    let [tokens, heads, dim] = src.layout.shape;
    let packed = DeviceTensor { ptr: dst, dtype, layout: Layout3::contiguous(tokens, heads, dim) };
    let rows = tokens * heads;
    if rows == 0 || dim == 0 {
        return Ok(packed);
    }
    let as_i32 = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::invalid(format!("{name}: {what} {v} does not fit the conversion kernel")))
    };
    let mut args = Args {
        src: src.ptr,
        dst,
        row_stride: src.layout.strides[0] as i64,
        head_stride: src.layout.strides[1] as i64,
        dim_stride: src.layout.strides[2] as i64,
        rows: rows as i64,
        heads: as_i32(heads, "heads")?,
        dim: as_i32(dim, "dim")?,
    };
    let f = cuda::function(ctx, kernels::fatbin("convert")?, kernel)?;
    let grid = [rows.min(MAX_CTAS) as u32, 1, 1];
    let mut params: [*mut c_void; 1] = [(&mut args as *mut Args).cast()];
    cuda::launch(f, grid, [THREADS, 1, 1], 0, stream, &mut params)?;
    Ok(packed)
}

/// The host twin of [`to_16bit`]: `src` (any dtype, any strides) rounded
/// to `dtype` into packed bytes of `[tokens, heads, dim]`, round to nearest
/// even. For f32 inputs of the CPU path.
pub fn round_host(src: &Tensor3, dtype: DType) -> Vec<u8> {
    src.rounded(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_match_the_kernel() {
        // kernels/convert.cu static_asserts the same size.
        assert_eq!(std::mem::size_of::<Args>(), 56);
    }

    #[test]
    fn packed_bytes_are_256_aligned() {
        assert_eq!(packed_bytes([1, 1, 64]), 256);
        assert_eq!(packed_bytes([3, 2, 64]), 768);
        assert_eq!(packed_bytes([0, 8, 128]), 0);
    }

    #[test]
    fn host_rounding_is_to_nearest_even_from_strided_f32() {
        // [2 tokens, 1 head, 2 dim] read with a token stride of 3.
        let vals = [1.0f32 + 1.0 / 512.0, 9.0, 3.0, 65520.0, 7.0, 2.0f32.powi(-20)];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor3::new("q", &bytes, DType::F32, Layout3 { shape: [2, 1, 2], strides: [3, 3, 1] }).unwrap();
        let bf = round_host(&t, DType::BF16);
        let got: Vec<f32> = (0..4).map(|i| crate::tensor::load_f32(&bf, DType::BF16, i)).collect();
        // 1 + 2^-9 is a tie between 1 and 1 + 2^-7 in bf16: even is 1.
        assert_eq!(got, [1.0, 9.0, 65536.0, 7.0]);
        let h = round_host(&t, DType::F16);
        let got: Vec<f32> = (0..4).map(|i| crate::tensor::load_f32(&h, DType::F16, i)).collect();
        // 65520 rounds past f16's largest finite value (65504) to inf.
        assert_eq!(got, [1.0 + 1.0 / 512.0, 9.0, f32::INFINITY, 7.0]);
    }
}
