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

// 2^x in one MUFU.EX2, subnormal results flushed to zero. exp2f() without
// --use_fast_math wraps the same instruction in a range check and two
// predicated multiplies (3 extra instructions per softmax score); softmax
// weights below 2^-126 of the row maximum are zero either way in 16-bit P.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Copy 64 rows of D elements of T into a swizzled [64][D] tile with cp.async
// by a CTA of THREADS threads: tile row r is row `row0 + r` of `base` (row
// stride in elements) when r is in [r_begin, r_end), zeros otherwise.
// Thread t owns chunk t % kChunks of rows t / kChunks + j * kRowsPerPass:
// a fixed trip count, so the loop unrolls and each copy costs one 64-bit
// add for its source (the address arithmetic was the prefill's busiest
// pipe).
template <int D, typename T, int THREADS>
__device__ __forceinline__ void load_rows_swizzled(uint32_t dst, const T* base, long long row_stride, long long row0,
                                                   int r_begin, int r_end) {
    using Tile = Swizzled<D * 2>;
    constexpr int kChunks = Tile::kChunks;
    constexpr int kRowsPerPass = THREADS / kChunks;
    static_assert(THREADS % kChunks == 0 && 64 % kRowsPerPass == 0, "whole rows per pass");
    const int c = threadIdx.x % kChunks;
    const int r0 = threadIdx.x / kChunks;
    const T* src = base + (row0 + r0) * row_stride + c * 8;
    const long long step = kRowsPerPass * row_stride;
#pragma unroll
    for (int j = 0; j < 64 / kRowsPerPass; ++j) {
        const int r = r0 + j * kRowsPerPass;
        const bool valid = r >= r_begin && r < r_end;
        cp_async16(dst + Tile::offset(r, c), valid ? src + j * step : base, valid);
    }
}

// A warp's A fragments of its 16 rows (from row0) of a swizzled [64][D]
// tile at `sq`, for all D / 16 k-steps (kept in registers by the caller).
template <int D>
__device__ __forceinline__ void load_a_fragments(uint32_t (&qa)[D / 16][4], uint32_t sq, int row0, int lane) {
    using Tile = Swizzled<D * 2>;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) ldmatrix_x4(qa[ks], sq + Tile::offset(row0 + lane % 16, ks * 2 + lane / 16));
}

// S = Q K^T for one warp's 16 query rows and a 64-key tile: Q as the A
// fragments of its D / 16 k-steps (held in registers), K a swizzled
// [64][D] tile of T (Swizzled<D * 2>) at shared address `sk`. S in the C
// layout, n8 tile n holding keys 8n..8n+7.
template <int D, typename T>
__device__ __forceinline__ void qk_tile(float (&s)[8][4], const uint32_t (&qa)[D / 16][4], uint32_t sk, int lane) {
    using Tile = Swizzled<D * 2>;
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, sk + Tile::offset(np * 16 + lane % 8 + (lane / 16) * 8, ks * 2 + (lane / 8) % 2));
            mma_16816<T>(s[2 * np], qa[ks], b[0], b[1]);
            mma_16816<T>(s[2 * np + 1], qa[ks], b[2], b[3]);
        }
    }
}

// Online softmax statistics of one 16-row score tile of NT n8 tiles in the
// m16n8 C layout (lane 4g + t holds rows g and g + 8 of the warp's 16; a
// row's quad of lanes holds all its columns): the running maximum of the
// raw scores and this thread's share of sum exp2(s * scale_log2 -
// max * scale_log2), rescaled when the maximum moves. Scores of -inf
// (masked) add nothing; a row with nothing unmasked yet keeps max -inf and
// sum 0. `tile_max` returns the tile's row maxima (the quad agrees).
template <int NT>
__device__ __forceinline__ void online_max_sum(const float (&s)[NT][4], float scale_log2, float (&row_max)[2],
                                               float (&row_sum)[2], float (&tile_max)[2]) {
    tile_max[0] = tile_max[1] = -__int_as_float(0x7f800000);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        tile_max[0] = fmaxf(tile_max[0], fmaxf(s[n][0], s[n][1]));
        tile_max[1] = fmaxf(tile_max[1], fmaxf(s[n][2], s[n][3]));
    }
    float base[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
        const float new_max = fmaxf(row_max[h], tile_max[h]);
        base[h] = new_max == -__int_as_float(0x7f800000) ? 0.f : new_max * scale_log2;
        row_sum[h] *= fast_exp2(row_max[h] * scale_log2 - base[h]);
        row_max[h] = new_max;
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int j = 0; j < 4; ++j) row_sum[j >> 1] += fast_exp2(fmaf(s[n][j], scale_log2, -base[j >> 1]));
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

// ---------------------------------------------------------------- Hopper (sm_90)
//
// Tiles brought by the tensor memory accelerator (TMA): one thread issues a
// bulk tensor copy per 64-column box, completion is counted in bytes on an
// mbarrier that every thread waits on. The shared-memory layout is TMA's
// 128-byte swizzle (the one wgmma reads, too).

namespace seer::tile {

// A [64 rows][D] tile of 16-bit elements as TMA writes it with 128-byte
// swizzle and 64-element boxes: D / 64 boxes of [64 rows][128 bytes], each
// 1024-byte aligned; inside a box the 16-byte chunk index is XORed with
// (row % 8) (address bits 4-6 with bits 7-9).
template <int D>
struct Boxes128 {
    static constexpr int kChunks = D / 8;
    __device__ __forceinline__ static uint32_t offset(int row, int chunk) {
        return static_cast<uint32_t>((chunk >> 3) * (64 * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
    }
};

// A CUtensorMap (128 bytes, 64-byte aligned), opaque; built on the host by
// cuTensorMapEncodeTiled and passed by value as a __grid_constant__ kernel
// parameter.
struct alignas(64) TensorMap {
    unsigned long long opaque[16];
};

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void fence_mbar_init() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
#endif
}
// Arrive once and announce `bytes` of transactions to come.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes));
#endif
}
// A 32-bit word in shared memory by address, ordered with the asm around it
// (a hand-over next to mbarrier arrivals and waits).
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t addr) {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
    return v;
}
// Arrive once (a consumer handing a buffer back).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// Wait until phase `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "wait_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra wait_%=;\n"
        "}\n" ::"r"(bar),
        "r"(parity));
#endif
}
// Order this thread's earlier generic-proxy shared-memory writes before
// later async-proxy (TMA) accesses of the same memory.
__device__ __forceinline__ void fence_proxy_async() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::);
#endif
}
// One box of a 3-D tensor map (coordinates innermost first) into shared
// memory at `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const TensorMap* map, int c0, int c1, int c2, uint32_t bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
#endif
}

}  // namespace seer::tile
