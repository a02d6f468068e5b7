/*
 * Small tile abstractions for tensor-core kernels on sm_80 and later:
 * 16-byte async copies into shared memory, a swizzled shared-memory tile of
 * 16-bit elements, ldmatrix fragment loads and the m16n8k16 mma.sync with
 * f32 accumulators. Fragment layouts follow the PTX ISA ("Matrix fragments
 * for mma.m16n8k16"): for lane l, g = l / 4 and t = l % 4,
 *   A (16x16, row-major):  a0 = (g, 2t..2t+1)    a1 = (g+8, 2t..)
 *                          a2 = (g, 8+2t..)      a3 = (g+8, 8+2t..)
 *   B (16x8, "col"):       b0 = (k 2t..2t+1, n g) b1 = (k 8+2t.., n g)
 *   C (16x8, f32):         c0,c1 = (g, 2t..2t+1)  c2,c3 = (g+8, 2t..2t+1)
 * so the C fragments of two adjacent n8 tiles are, packed to 16 bits, the A
 * fragment of one k16 step (what the attention kernel uses to feed P into
 * P·V without a trip through shared memory).
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace seer::tile {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses registers. With `valid`
// false nothing is read and the 16 bytes are zero-filled (rows past the end
// of a sequence); `src` must still be a mapped address.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A [rows][kBytesPerRow / 16] tile of 16-byte chunks in shared memory. The
// chunk index is XORed with (row % 8): the eight rows one ldmatrix reads at
// the same column then sit in eight different 16-byte bank groups, so the
// load is conflict-free. Needs at least 8 chunks (128 bytes) per row.
template <int kBytesPerRow>
struct Swizzled {
    static_assert(kBytesPerRow % 128 == 0, "a swizzled row holds a multiple of 8 chunks");
    static constexpr int kChunks = kBytesPerRow / 16;
    __device__ __forceinline__ static uint32_t offset(int row, int chunk) {
        return static_cast<uint32_t>(row * kBytesPerRow + ((chunk ^ (row & 7)) << 4));
    }
    // Byte offset of byte `byte` of row `row` (the chunk swizzled, the byte
    // within it kept).
    __device__ __forceinline__ static uint32_t byte_offset(int row, int byte) {
        return offset(row, byte >> 4) + (byte & 15);
    }
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a * b for one m16n8k16 tile, 16-bit inputs of type T, f32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                          uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T and packed into one 32-bit register (lo first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Two consecutive output elements of type O, written to shared memory.
template <typename O>
__device__ __forceinline__ void store2(unsigned char* p, float lo, float hi);
template <>
__device__ __forceinline__ void store2<float>(unsigned char* p, float lo, float hi) {
    *reinterpret_cast<float2*>(p) = make_float2(lo, hi);
}
template <>
__device__ __forceinline__ void store2<__nv_bfloat16>(unsigned char* p, float lo, float hi) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
}
template <>
__device__ __forceinline__ void store2<__half>(unsigned char* p, float lo, float hi) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(lo, hi);
}

}  // namespace seer::tile
