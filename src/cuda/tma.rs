//! Tensor maps for the tensor memory accelerator (TMA, sm_90 and later):
//! the descriptor a kernel's bulk tensor copies read, encoded on the host
//! (no device work, no allocation: it is passed by value as a kernel
//! parameter, so a launch that carries one is graph-capturable).

use super::{check, driver};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::sys;

/// A `CUtensorMap`: 128 opaque bytes (the driver wants them 64-byte
/// aligned; CUDA 13's header declares 128), as kernels take it.
#[repr(C, align(128))]
#[derive(Clone, Copy)]
pub struct TensorMap(pub [u64; 16]);

/// The map of a `[tokens, heads, dim]` tensor of 16-bit elements (unit dim
/// stride, element strides `row_stride` and `head_stride`), read in boxes of
/// `box_tokens` tokens x 1 head x `box_dim` elements, 128-byte swizzled in
/// shared memory (`box_dim * 2` must be 128), zero-filled outside the
/// tensor.
///
/// The driver wants strides that grow with the dimension: the map's middle
/// dimension is whichever of heads and tokens has the smaller stride.
/// Returns the map and `true` when that is tokens (coordinates
/// `(dim, token, head)`), `false` for `(dim, head, token)`; `None` when the
/// driver refuses the layout (`CUDA_ERROR_INVALID_VALUE`: the caller then
/// uses plain copies); an error for anything else. The driver wants a
/// current context: `ctx` is made current for the call.
#[allow(clippy::too_many_arguments)]
pub fn map_3d(
    ctx: &super::Ctx,
    ptr: u64,
    dtype: DType,
    shape: [usize; 3],
    row_stride: usize,
    head_stride: usize,
    box_tokens: u32,
    box_dim: u32,
) -> Result<Option<(TensorMap, bool)>> {
    driver()?;
    let _current = ctx.make_current()?;
    let data_type = match dtype {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => return Err(Error::unsupported("tensor maps are built for 16-bit tensors only")),
    };
    let [tokens, heads, dim] = shape;
    let token_major = head_stride > row_stride;
    let (dims, strides, boxes) = if token_major {
        ([dim, tokens, heads], [row_stride, head_stride], [box_dim, box_tokens, 1])
    } else {
        ([dim, heads, tokens], [head_stride, row_stride], [box_dim, 1, box_tokens])
    };
    let dims = dims.map(|x| x as u64);
    let strides = strides.map(|x| (x * 2) as u64);
    let element_strides = [1u32; 3];
    let mut map = TensorMap([0; 16]);
    // SAFETY: `map` is a writable, 64-byte aligned 128-byte CUtensorMap; the
    // arrays hold rank (3) entries, the strides rank - 1. Encoding reads
    // nothing at `ptr`.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut TensorMap).cast(),
            data_type,
            3,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r == sys::CUresult::CUDA_ERROR_INVALID_VALUE {
        return Ok(None);
    }
    check("cuTensorMapEncodeTiled", r)?;
    Ok(Some((map, token_major)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tensor_map_is_a_cutensormap() {
        assert_eq!(std::mem::size_of::<super::TensorMap>(), std::mem::size_of::<cudarc::driver::sys::CUtensorMap>());
        assert!(std::mem::align_of::<super::TensorMap>() >= 64);
    }
}
