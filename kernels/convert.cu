// seerattn: f32 to bf16 / f16, from a strided [tokens, heads, dim] tensor
// into a packed one in the caller's workspace.
//
// Callers that hold Q in f32 (llama.cpp's graph does: Q comes out of a
// matmul in f32, and so do the gate's pre-RoPE Q and K) pass it as is; the
// kernels read 16-bit rows, so the library first rounds it here, once per
// call, into the workspace the size queries reported, and runs the kernels on
// that copy: for attention to K's dtype (what ggml-cuda's flash attention
// and ggml's one-row CPU path do with Q), for the gate to bf16 (what the
// gate projects in). Rounding is to nearest even (__float2bfloat16_rn,
// __float2half_rn), as the CPU path's `half` crate rounds: both paths see the
// same 16-bit values (NaN stays NaN, payload aside; overflow goes to inf).
//
// Budget: reads 4 bytes and writes 2 per element, no arithmetic; one CTA per
// (token, head) row, grid-stride over rows past the grid.
// Tested on the GPU by tests/gpu_attention.rs and tests/gpu_gate.rs (f32
// inputs against the CPU path of the same library).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

namespace seer::convert {

// seer::convert::Args; src/gpu/convert.rs mirrors it (size checked there).
struct Args {
    uint64_t src;        // const float*
    uint64_t dst;        // bf16 or f16, packed [tokens, heads, dim]
    int64_t row_stride;  // of src, in elements
    int64_t head_stride;
    int64_t dim_stride;
    int64_t rows;        // tokens * heads
    int32_t heads;
    int32_t dim;
};
static_assert(sizeof(Args) == 56, "src/gpu/convert.rs mirrors Args");

template <typename T>
__device__ __forceinline__ T round_from(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 round_from<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half round_from<__half>(float x) {
    return __float2half_rn(x);
}

template <typename T>
__device__ void convert_rows(const Args& a) {
    const float* src = reinterpret_cast<const float*>(a.src);
    T* dst = reinterpret_cast<T*>(a.dst);
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const int64_t t = r / a.heads;
        const int64_t h = r - t * a.heads;
        const float* s = src + t * a.row_stride + h * a.head_stride;
        T* o = dst + r * a.dim;
        for (int32_t x = threadIdx.x; x < a.dim; x += blockDim.x) {
            o[x] = round_from<T>(s[x * a.dim_stride]);
        }
    }
}

}  // namespace seer::convert

extern "C" __global__ void seer_convert_f32_bf16(seer::convert::Args a) {
    seer::convert::convert_rows<__nv_bfloat16>(a);
}

extern "C" __global__ void seer_convert_f32_f16(seer::convert::Args a) {
    seer::convert::convert_rows<__half>(a);
}
