/*
 * Block-sparse causal attention forward (prefill), sm_80 and later.
 *
 * What it computes: for every (sequence, query head h, query block qb) row
 * of the block mask (kernels/gate.cuh's index-list format, also written by
 * callers), the 64 queries of block qb attend the keys of the listed key
 * blocks, causally inside the diagonal block:
 *   out[t, h] = softmax_j(scale * q_t . k_j) . v_j,   lse = ln sum_j exp(scale * q_t . k_j)
 * with GQA (head h reads KV head h / group), q_len <= k_len (queries are
 * the last q_len of k_len positions), blocks aligned to absolute positions.
 * The CPU reference is src/reference/attention.rs; a row that selects no
 * block gives zeros and lse = -inf, never NaN.
 *
 * Structure (FlashAttention-2 on mma.sync): one CTA of 4 warps per mask row;
 * warp w owns query rows 16w..16w+15 for the whole row. Q is loaded once
 * into registers as A fragments. For each listed key block: S = Q K^T
 * (16x64 per warp, m16n8k16), online softmax in registers (exp2, running
 * max and sum per row), P packed to 16 bits as the A operand of O += P V.
 * K and V tiles are double-buffered with cp.async: the next listed block is
 * fetched while the current one is computed. The epilogue divides by the
 * row sums, stages O through shared memory and writes 16-byte rows.
 *
 * Robust to any mask contents: counts, offsets and indices are read only
 * inside the lengths the host passed; a count is clamped to the row's
 * slots and to the causal row length; indices outside [0, qb] are skipped.
 *
 * Budget per computed 64x64 block, head_dim D: 4 * 64 * 64 * D FLOPs
 * (2.1 MFLOP at D = 128) on tensor cores; K and V tiles 2 * 64 * D * 2
 * bytes (32 KB at D = 128) from L2 (a KV head's tiles are shared by the
 * `group` query heads and by every query block that lists them). Per row,
 * Q 64 * D * 2 bytes in and O 64 * D * sizeof(out) out. At 32k tokens,
 * 32 q heads, D = 128, 100% causal density: 8.8 TFLOP (26.7 ms at 330
 * TFLOP/s), K/V tile traffic 134 GB from L2. The time is the tensor-core
 * rate; see kernels/NOTES.md.
 *
 * Shared memory: Q [64][D] + K [2][64][D] + V [2][64][D], 16-bit, swizzled
 * (80 KB at D = 128: two CTAs per SM on A100 and H100).
 */
#include "attention.cuh"
#include "tile.cuh"

#include <math_constants.h>

namespace seer::attn {

using namespace seer::tile;

constexpr int kBlock = 64;  // mask block = query tile = key tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// The sequence that owns work unit `unit` (sequences in launch order).
template <int S>
__device__ __forceinline__ int seq_of_unit(const SeqTable<S>& tab, long long unit) {
    int lo = 0, hi = tab.num_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tab.seq[mid].unit_base <= unit) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// One mask row, read defensively: slots [first, first + count) of indices,
// with count clamped to the row's slots, the array and the causal length.
struct MaskRow {
    const int* slots;
    int count;
    int diag;  // the row's absolute query block: the largest valid key block

    // The first slot >= s holding a valid key block, or count. Every thread
    // of the CTA reads the same entries (a broadcast through L1).
    __device__ __forceinline__ int next(int s, int& block) const {
        for (; s < count; ++s) {
            const int b = __ldg(slots + s);
            if (b >= 0 && b <= diag) {
                block = b;
                return s;
            }
        }
        return count;
    }
};

__device__ __forceinline__ MaskRow read_mask_row(const AttnArgs& a, long long row, int diag) {
    MaskRow m{a.indices, 0, diag};
    if (row < 0 || row >= a.counts_len || row + 1 >= a.row_offsets_len) return m;
    const long long first = a.row_offsets[row];
    const long long end = a.row_offsets[row + 1];
    const long long count = a.counts[row];
    if (first < 0 || first > a.indices_len) return m;
    long long n = count < 0 ? 0 : count;
    n = min(n, end - first);
    n = min(n, a.indices_len - first);
    n = min(n, static_cast<long long>(diag) + 1);
    if (n <= 0) return m;
    m.slots = a.indices + first;
    m.count = static_cast<int>(n);
    return m;
}

// Copy a 64-row tile of one head into swizzled shared memory: row r is
// token `token0 + r` when `r` is in [r_begin, r_end), zeros otherwise.
template <int D, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T* base, long long row_stride, long long token0,
                                          int r_begin, int r_end) {
    using Tile = Swizzled<D * 2>;
    constexpr int kChunks = Tile::kChunks;
#pragma unroll
    for (int i = threadIdx.x; i < kBlock * kChunks; i += kThreads) {
        const int r = i / kChunks, c = i % kChunks;
        const bool valid = r >= r_begin && r < r_end;
        const T* src = valid ? base + (token0 + r) * row_stride + c * 8 : base;
        cp_async16(dst + Tile::offset(r, c), src, valid);
    }
}

template <int D, typename T, typename O, int S>
__device__ __forceinline__ void sparse_fwd(const AttnArgs& a, const SeqTable<S>& tab) {
    using Tile = Swizzled<D * 2>;
    constexpr int kTileBytes = kBlock * D * 2;
    constexpr int kDTiles = D / 8;   // n8 tiles of O
    constexpr int kDSteps = D / 16;  // k16 steps of Q K^T
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sK = sQ + kTileBytes;      // stage s at sK + s * kTileBytes
    const uint32_t sV = sK + 2 * kTileBytes;  // stage s at sV + s * kTileBytes

    // Work unit: blockIdx.x = unit * hq + head (the heads of a unit, and so
    // the query heads sharing a KV head, run side by side); each sequence's
    // query blocks run last to first, longest rows first.
    const int head = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.hq));
    const long long unit = blockIdx.x / static_cast<unsigned>(a.hq);
    const SeqEntry& e = tab.seq[seq_of_unit(tab, unit)];
    const int i = e.q_blocks - 1 - static_cast<int>(unit - e.unit_base);
    const int qb = e.first_q_block + i;
    const long long row = e.row_base + static_cast<long long>(head) * e.q_blocks + i;
    const int kv_head = head / a.group;
    // Rows of the tile that hold queries: absolute positions [q_start, k_len).
    const int r_begin = max(e.q_start - qb * kBlock, 0);
    const int r_end = min(e.k_len - qb * kBlock, kBlock);
    const long long q_token0 = e.q_off + (static_cast<long long>(qb) * kBlock - e.q_start);
    const long long k_token0 = e.k_off;  // + key block * 64

    const T* q = static_cast<const T*>(a.q) + head * a.q_head_stride;
    const T* k = static_cast<const T*>(a.k) + kv_head * a.k_head_stride;
    const T* v = static_cast<const T*>(a.v) + kv_head * a.v_head_stride;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const MaskRow mask = read_mask_row(a, row, qb);

    float o[kDTiles][4];
#pragma unroll
    for (int n = 0; n < kDTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
    float row_sum[2] = {0.f, 0.f};  // this thread's share; the quad's sum is the row's

    int kb = -1;
    int slot = mask.next(0, kb);
    if (slot < mask.count) {
        // ---- prologue: Q and the first K/V tiles
        load_tile<D>(sQ, q, a.q_row_stride, q_token0, r_begin, r_end);
        const int k_rows = min(e.k_len - kb * kBlock, kBlock);
        load_tile<D>(sK, k, a.k_row_stride, k_token0 + static_cast<long long>(kb) * kBlock, 0, k_rows);
        load_tile<D>(sV, v, a.v_row_stride, k_token0 + static_cast<long long>(kb) * kBlock, 0, k_rows);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        uint32_t qf[kDSteps][4];
#pragma unroll
        for (int ks = 0; ks < kDSteps; ++ks) ldmatrix_x4(qf[ks], sQ + Tile::offset(warp * 16 + lane % 16, ks * 2 + lane / 16));

        // ---- main loop over the row's key blocks
        int stage = 0;
        const int r0 = warp * 16 + lane / 4;  // this thread's rows: r0 and r0 + 8
        while (true) {
            int next_kb = -1;
            const int next_slot = mask.next(slot + 1, next_kb);
            if (next_slot < mask.count) {
                const int rows = min(e.k_len - next_kb * kBlock, kBlock);
                const long long t0 = k_token0 + static_cast<long long>(next_kb) * kBlock;
                load_tile<D>(sK + (stage ^ 1) * kTileBytes, k, a.k_row_stride, t0, 0, rows);
                load_tile<D>(sV + (stage ^ 1) * kTileBytes, v, a.v_row_stride, t0, 0, rows);
            }
            cp_async_commit();

            // S = Q K^T: 16 rows x 64 keys per warp.
            float s[8][4];
#pragma unroll
            for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            const uint32_t kTile = sK + stage * kTileBytes;
#pragma unroll
            for (int ks = 0; ks < kDSteps; ++ks) {
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    uint32_t b[4];
                    ldmatrix_x4(b, kTile + Tile::offset(np * 16 + lane % 8 + (lane / 16) * 8, ks * 2 + (lane / 8) % 2));
                    mma_16816<T>(s[2 * np], qf[ks], b[0], b[1]);
                    mma_16816<T>(s[2 * np + 1], qf[ks], b[2], b[3]);
                }
            }

            // Online softmax in the log2 domain; causal mask in the diagonal block.
            const bool diagonal = kb == qb;
            float tile_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
            for (int n = 0; n < 8; ++n) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int col = n * 8 + 2 * (lane % 4) + (j & 1);
                    const int r = r0 + (j >> 1) * 8;
                    float x = s[n][j] * a.scale_log2;
                    if (diagonal && col > r) x = -CUDART_INF_F;
                    s[n][j] = x;
                    tile_max[j >> 1] = fmaxf(tile_max[j >> 1], x);
                }
            }
            float base[2], corr[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
                tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
                const float new_max = fmaxf(row_max[h], tile_max[h]);
                // A row with nothing unmasked yet keeps max -inf: subtract 0
                // instead, so that exp2 gives 0, not NaN.
                base[h] = new_max == -CUDART_INF_F ? 0.f : new_max;
                corr[h] = exp2f(row_max[h] - base[h]);
                row_max[h] = new_max;
                row_sum[h] *= corr[h];
            }
#pragma unroll
            for (int n = 0; n < 8; ++n) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float p = exp2f(s[n][j] - base[j >> 1]);
                    s[n][j] = p;
                    row_sum[j >> 1] += p;
                }
            }
#pragma unroll
            for (int n = 0; n < kDTiles; ++n) {
                o[n][0] *= corr[0];
                o[n][1] *= corr[0];
                o[n][2] *= corr[1];
                o[n][3] *= corr[1];
            }

            // O += P V: P's C fragments are the A fragments of four k16 steps.
            const uint32_t vTile = sV + stage * kTileBytes;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                uint32_t p[4];
                p[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
                p[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
                p[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                p[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int dp = 0; dp < kDTiles / 2; ++dp) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, vTile + Tile::offset(kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, dp * 2 + lane / 16));
                    mma_16816<T>(o[2 * dp], p, b[0], b[1]);
                    mma_16816<T>(o[2 * dp + 1], p, b[2], b[3]);
                }
            }

            // The next tiles have landed, and every warp is done with this
            // stage before the next iteration's prefetch overwrites it.
            cp_async_wait<0>();
            __syncthreads();
            if (next_slot >= mask.count) break;
            slot = next_slot;
            kb = next_kb;
            stage ^= 1;
        }
    }

    // ---- epilogue: normalise, stage O in shared memory (over the K tiles,
    // free now), write whole 16-byte chunks of the rows that hold queries.
    using OutTile = Swizzled<D * sizeof(O)>;
    const int r0 = warp * 16 + lane / 4;
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
        row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
        inv[h] = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
    }
    unsigned char* staged = smem + kTileBytes;
#pragma unroll
    for (int n = 0; n < kDTiles; ++n) {
        const int byte = (n * 8 + 2 * (lane % 4)) * static_cast<int>(sizeof(O));
        store2<O>(staged + OutTile::byte_offset(r0, byte), o[n][0] * inv[0], o[n][1] * inv[0]);
        store2<O>(staged + OutTile::byte_offset(r0 + 8, byte), o[n][2] * inv[1], o[n][3] * inv[1]);
    }
    if (a.lse != nullptr && lane % 4 == 0) {
        constexpr float kLn2 = 0.693147180559945309f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = r0 + 8 * h;
            if (r >= r_begin && r < r_end) {
                const float lse = row_sum[h] > 0.f ? (row_max[h] + log2f(row_sum[h])) * kLn2 : -CUDART_INF_F;
                a.lse[head * a.lse_head_stride + q_token0 + r] = lse;
            }
        }
    }
    __syncthreads();
    O* out = static_cast<O*>(a.out) + head * a.o_head_stride;
    constexpr int kOutChunks = OutTile::kChunks;
    constexpr int kPerChunk = 16 / sizeof(O);
#pragma unroll
    for (int idx = threadIdx.x; idx < kBlock * kOutChunks; idx += kThreads) {
        const int r = idx / kOutChunks, c = idx % kOutChunks;
        if (r < r_begin || r >= r_end) continue;
        const uint4 val = *reinterpret_cast<const uint4*>(staged + OutTile::offset(r, c));
        *reinterpret_cast<uint4*>(out + (q_token0 + r) * a.o_row_stride + c * kPerChunk) = val;
    }
}

}  // namespace seer::attn

// Shared memory of one CTA: Q, and two stages of K and V.
#define SEER_ATTN_SMEM(D) (5 * 64 * (D) * 2)

// One extern "C" symbol per (head_dim, input dtype, output dtype, table
// capacity): seer_attn_fwd_d{D}_{in}_{out}_s{S}.
#define SEER_ATTN(D, T, TN, O, ON, S)                                                                        \
    extern "C" __global__ void __launch_bounds__(seer::attn::kThreads, 2)                                    \
        seer_attn_fwd_d##D##_##TN##_##ON##_s##S(const __grid_constant__ seer::attn::AttnArgs a,             \
                                                 const __grid_constant__ seer::attn::SeqTable<S> tab) {      \
        seer::attn::sparse_fwd<D, T, O, S>(a, tab);                                                          \
    }

#define SEER_ATTN_OUTS(D, T, TN, S)  \
    SEER_ATTN(D, T, TN, T, TN, S)    \
    SEER_ATTN(D, T, TN, float, f32, S)

#define SEER_ATTN_ALL(S)                              \
    SEER_ATTN_OUTS(64, __nv_bfloat16, bf16, S)        \
    SEER_ATTN_OUTS(64, __half, f16, S)                \
    SEER_ATTN_OUTS(128, __nv_bfloat16, bf16, S)       \
    SEER_ATTN_OUTS(128, __half, f16, S)

SEER_ATTN_ALL(16)
SEER_ATTN_ALL(256)
