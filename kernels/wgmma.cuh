/*
 * Hopper warpgroup matrix multiply (wgmma, sm_90a) for the attention
 * kernels: shared-memory matrix descriptors for TMA's 128-byte swizzle, the
 * three instruction shapes the prefill uses, and the fences around them.
 *
 * A warpgroup (4 consecutive warps, the first a multiple of 4) issues each
 * wgmma together; it runs asynchronously and is waited for by commit group.
 * Accumulators are f32 registers in the m64nN layout: warp w of the group
 * holds rows 16w + g and 16w + g + 8 (lane = 4g + t), columns 8i + 2t and
 * 8i + 2t + 1 in d[4i..4i+1] and d[4i+2..4i+3] - mma.sync's m16n8 C layout
 * repeated over n8 tiles. A operands from registers use mma.sync's m16k16 A
 * layout per warp, so S's accumulators packed to 16 bits are P's A operand.
 *
 * Only built for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); the kernels that use it
 * trap elsewhere and the host never selects them there.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace seer::tile {

// Descriptor of a tile in TMA's 128-byte swizzle layout (rows of 128 bytes,
// 16-byte chunks XORed with row % 8 inside 1024-byte atoms of 8 rows).
// K-major (the reduction dimension contiguous: Q, K): `addr` is the atom
// row of the first element plus 32 bytes per k16 step, `sbo` the bytes
// between 8-row groups (1024); `lbo` unused. MN-major (V, the B operand of
// P V, read transposed): `lbo` is the bytes between 64-column boxes, `sbo`
// between 8-row groups along K.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
           (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);  // layout type 1: 128B swizzle
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SEER_SM90A(...) __VA_ARGS__
#else
#define SEER_SM90A(...)
#endif

// Before the first wgmma that reads registers written by other instructions
// (accumulators rescaled by the softmax, P packed into A fragments).
__device__ __forceinline__ void wgmma_fence() { SEER_SM90A(asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");) }
__device__ __forceinline__ void wgmma_commit() {
    SEER_SM90A(asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");)
}
// Wait until at most N committed groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    SEER_SM90A(asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");)
}
// The accumulator registers are outputs of the wgmma asm statement, so the
// compiler believes them ready right after it; this pins every later access
// below the wait that really makes them ready.
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define SEER_REGS32                                                                                               \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define SEER_REGS64                                                                                                 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "   \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, " \
    "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define SEER_ACC8(i)                                                                                          \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
        "+f"(d[i + 7])
#define SEER_ACC32 SEER_ACC8(0), SEER_ACC8(8), SEER_ACC8(16), SEER_ACC8(24)
#define SEER_ACC64 SEER_ACC32, SEER_ACC8(32), SEER_ACC8(40), SEER_ACC8(48), SEER_ACC8(56)

// The instruction's type suffix for 16-bit inputs of type T.
#define SEER_WGMMA_TYPE(T) (std::is_same_v<T, __nv_bfloat16> ? 0 : 1)

// d (64x64) = (accumulate ? d : 0) + A (64x16, smem, K-major) * B (16x64,
// smem, K-major: 64 rows of keys).
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
#define SEER_SS(TY)                                                                                                   \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                         \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " SEER_REGS32 ", %32, %33, p, 1, 1, 0, 0;\n}\n" \
                 : SEER_ACC32                                                                                         \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate))
    if constexpr (SEER_WGMMA_TYPE(T) == 0) SEER_SM90A(SEER_SS("bf16");) else SEER_SM90A(SEER_SS("f16");)
#undef SEER_SS
}

// d (64xN) = (accumulate ? d : 0) + A (64x16, registers) * B (16xN, smem):
// B K-major (kTransB 0: rows of N, the reduction dimension contiguous, as
// K's keys) or MN-major (kTransB 1: rows of the reduction dimension, as V).
template <typename T, int kTransB>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                                   int accumulate) {
#define SEER_RS64(TY)                                                                                            \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                    \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " SEER_REGS32                         \
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                                                \
                 : SEER_ACC32                                                                                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(kTransB))
    if constexpr (SEER_WGMMA_TYPE(T) == 0) SEER_SM90A(SEER_RS64("bf16");) else SEER_SM90A(SEER_RS64("f16");)
#undef SEER_RS64
}
template <typename T, int kTransB>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                    int accumulate) {
#define SEER_RS128(TY)                                                                                           \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                    \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " SEER_REGS64                        \
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                                                \
                 : SEER_ACC64                                                                                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(kTransB))
    if constexpr (SEER_WGMMA_TYPE(T) == 0) SEER_SM90A(SEER_RS128("bf16");) else SEER_SM90A(SEER_RS128("f16");)
#undef SEER_RS128
}

#undef SEER_WGMMA_TYPE
#undef SEER_ACC64
#undef SEER_ACC32
#undef SEER_ACC8
#undef SEER_REGS64
#undef SEER_REGS32

// Warpgroup register budgets (sm_90a): the producer gives registers back,
// the consumers take them. Needs a register cap at kernel entry
// (__launch_bounds__(threads, 1)); every warp of the warpgroup executes it.
template <int R>
__device__ __forceinline__ void regs_release() {
    SEER_SM90A(asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));)
}
template <int R>
__device__ __forceinline__ void regs_claim() {
    SEER_SM90A(asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));)
}

}  // namespace seer::tile
