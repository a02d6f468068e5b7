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
#include "attention_row.cuh"

#include <type_traits>

namespace seer::attn {

// S = Q K^T for one warp: M x NT tiles of m16n8 (16 * M rows, 8 * NT keys
// from key col0). Q's A fragments are read from shared memory per k16 step
// (registers hold O and S; caching Q too would not fit), K's B fragments
// once per step and reused by all M row tiles.
template <int D, int M, int NT, typename T, typename Tile>
__device__ __forceinline__ void qk_tile(float (&s)[M][NT][4], uint32_t sQ, uint32_t sK, int row0, int col0,
                                        int lane) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int n = 0; n < NT; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t qa[M][4];
#pragma unroll
        for (int m = 0; m < M; ++m) ldmatrix_x4(qa[m], sQ + Tile::offset(row0 + m * 16 + lane % 16, ks * 2 + lane / 16));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, sK + Tile::offset(col0 + np * 16 + lane % 8 + (lane / 16) * 8, ks * 2 + (lane / 8) % 2));
#pragma unroll
            for (int m = 0; m < M; ++m) {
                mma_16816<T>(s[m][2 * np], qa[m], b[0], b[1]);
                mma_16816<T>(s[m][2 * np + 1], qa[m], b[2], b[3]);
            }
        }
    }
}
// O += P V for one warp: P's C fragments, packed to 16 bits, are the A
// fragments of four k16 steps; V's B fragments (ldmatrix.trans) are loaded
// once per step and reused by all M row tiles. Keys from `valid_keys` on
// (past the sequence, in its last block) have P = 0 but V rows that may
// hold anything, and 0 * NaN is NaN: their V elements are zeroed in the
// fragments. Lane 4g + t holds keys 2t and 2t + 1 (low and high half) of
// each 8-key matrix: matrices 0 and 2 are keys 0-7 of the k16 step, 1 and
// 3 keys 8-15. (Zeroing them in shared memory instead, which TMA writes
// again later, raced in the wgmma kernel: kernels/NOTES.md, v14.)
template <int D, int M, int NT, typename T, typename Tile, bool kPartial>
__device__ __forceinline__ void pv_tile_keys(WarpRows<D, M>& w, const float (&s)[M][NT][4], uint32_t sV, int col0,
                                             int lane, int valid_keys) {
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        uint32_t p[M][4];
#pragma unroll
        for (int m = 0; m < M; ++m) {
            p[m][0] = pack2<T>(s[m][2 * kk][0], s[m][2 * kk][1]);
            p[m][1] = pack2<T>(s[m][2 * kk][2], s[m][2 * kk][3]);
            p[m][2] = pack2<T>(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
            p[m][3] = pack2<T>(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b,
                              sV + Tile::offset(col0 + kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, dp * 2 + lane / 16));
            if constexpr (kPartial) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int key = col0 + kk * 16 + (j % 2) * 8 + 2 * (lane % 4);
                    if (key >= valid_keys) b[j] = 0;
                    else if (key + 1 >= valid_keys) b[j] &= 0xFFFFu;
                }
            }
#pragma unroll
            for (int m = 0; m < M; ++m) {
                mma_16816<T>(w.o[m][2 * dp], p[m], b[0], b[1]);
                mma_16816<T>(w.o[m][2 * dp + 1], p[m], b[2], b[3]);
            }
        }
    }
}

// The full-block loop carries no key checks (a partial block is rare).
template <int D, int M, int NT, typename T, typename Tile>
__device__ __forceinline__ void pv_tile(WarpRows<D, M>& w, const float (&s)[M][NT][4], uint32_t sV, int col0,
                                        int lane, int valid_keys) {
    if (valid_keys < kBlock) pv_tile_keys<D, M, NT, T, Tile, true>(w, s, sV, col0, lane, valid_keys);
    else pv_tile_keys<D, M, NT, T, Tile, false>(w, s, sV, col0, lane, valid_keys);
}

// The kernel body. M: m16 row tiles per warp; N: parts the 64 keys of a
// tile are split into. The CTA has (4 / M) * N warps: warp w owns rows
// 16 * M * (w % (4 / M)) onward and keys 64 / N * (w / (4 / M)) onward of
// every tile, with its own online softmax state; with N = 2 the two key
// halves of each row are merged in the epilogue (as split-KV partials are).
// Shared memory holds one Q, one K and one V tile; the loads are
// interleaved with the math as in FlashAttention-2: V_j is fetched while
// S_j = Q K_j^T and its softmax run, K_{j+1} while O += P_j V_j runs.
// kTma (sm_90): one thread brings each tile with TMA bulk tensor copies
// (map_q, map_k, map_v) completing on mbarriers, in TMA's 128-byte swizzle
// layout; otherwise every thread issues 16-byte cp.async copies (sm_80).
template <int D, int M, int N, bool kTma, int kKStages, typename T, typename O, int S>
__device__ __forceinline__ void sparse_fwd(const AttnArgs& a, const SeqTable<S>& tab, const TensorMap* map_q,
                                           const TensorMap* map_k, const TensorMap* map_v) {
    constexpr int kRowWarps = 4 / M;
    constexpr int kWarps = kRowWarps * N;
    constexpr int kThreads = kWarps * 32;
    constexpr int kNT = 8 / N;  // n8 key tiles per warp
    constexpr int kTileBytes = kBlock * D * 2;
    using Tile = std::conditional_t<kTma, Boxes128<D>, Swizzled<D * 2>>;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    // TMA's 128-byte swizzle needs 1024-byte aligned boxes (the host adds
    // the slack to the dynamic shared memory size).
    unsigned char* smem = kTma ? smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023) : smem_raw;
    static_assert(kKStages == 1 || (kTma && kKStages == 2), "two K stages only with TMA");
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sK = sQ + kTileBytes;  // stage s at sK + s * kTileBytes
    const uint32_t sV = sK + kKStages * kTileBytes;
    // mbarriers: Q, V, then one per K stage.
    const uint32_t barQ = sV + kTileBytes, barV = barQ + 8, barK = barQ + 16;

    // One CTA per work item (kernels/attention_row.cuh: head-major, longest
    // rows first; with split-KV, a.splits consecutive CTAs share a row, each
    // taking a contiguous part of its key list and writing its own partial
    // output).
    const RowWork work = decode_work(a, tab, blockIdx.x);
    const int split = work.split, head = work.head, kv_head = work.kv_head, qb = work.qb;
    const int r_begin = work.r_begin, r_end = work.r_end;
    const long long q_token0 = work.q_token0;

    const T* q = static_cast<const T*>(a.q) + head * a.q_head_stride;
    const T* k = static_cast<const T*>(a.k) + kv_head * a.k_head_stride;
    const T* v = static_cast<const T*>(a.v) + kv_head * a.v_head_stride;
    auto key_rows = [&](int block) { return work.key_rows(block); };
    auto key_token0 = [&](int block) { return work.key_token0(block); };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = (warp % kRowWarps) * 16 * M;  // this warp's first query row in the tile
    const int key_part = warp / kRowWarps;
    const int col0 = key_part * (kBlock / N);  // and its first key of each key tile
    MaskRow mask = work.mask;

    WarpRows<D, M> w;
    w.init();
    int kb = -1;
    int slot = mask.next(0, kb);
    if constexpr (kTma) {
        if (slot < mask.count) {
            const bool issuer = threadIdx.x == 0;
            if (issuer) {
                mbar_init(barQ, 1);
                mbar_init(barV, 1);
                for (int st = 0; st < kKStages; ++st) mbar_init(barK + 8 * st, 1);
                fence_mbar_init();
            }
            __syncthreads();
            if (issuer) {
                // Rows outside [r_begin, r_end) hold other tokens (or TMA's
                // zeros past the tensor): their outputs are never stored.
                tma_tile<D>(a, sQ, map_q, 0, head, q_token0, barQ);
                tma_tile<D>(a, sK, map_k, 1, kv_head, key_token0(kb), barK);
            }
            mbar_wait(barQ, 0);
            uint32_t v_phase = 0, k_phases = 0;  // bit st: parity of K stage st
            int stage = 0;
            while (true) {
                // The next block: read now with two K stages (its copy starts
                // this iteration), after S with one (fewer live registers).
                int next_kb = -1, next_slot = mask.count;
                if (kKStages == 2) next_slot = mask.next(slot + 1, next_kb);
                mbar_wait(barK + 8 * stage, (k_phases >> stage) & 1);  // K_j landed
                k_phases ^= 1u << stage;
                // Every warp is done with V_{j-1} (and, with two K stages,
                // with the other stage, read by S_{j-1}).
                __syncthreads();
                if (issuer) {
                    tma_tile<D>(a, sV, map_v, 2, kv_head, key_token0(kb), barV);
                    if (kKStages == 2 && next_slot < mask.count)
                        tma_tile<D>(a, sK + (stage ^ 1) * kTileBytes, map_k, 1, kv_head, key_token0(next_kb), barK + 8 * (stage ^ 1));
                }

                float s[M][kNT][4];
                qk_tile<D, M, kNT, T, Tile>(s, sQ, sK + stage * kTileBytes, row0, col0, lane);
                softmax_tile<D, M, kNT>(s, w, a.scale_log2, kb == qb, row0, col0, lane);

                mbar_wait(barV, v_phase);  // V_j landed
                v_phase ^= 1;
                // One K stage: every warp is done with K_j before it is
                // overwritten.
                if (kKStages == 1) __syncthreads();
                if (kKStages == 1) {
                    next_slot = mask.next(slot + 1, next_kb);
                    if (next_slot < mask.count && issuer) tma_tile<D>(a, sK, map_k, 1, kv_head, key_token0(next_kb), barK);
                }
                // Keys past the sequence's end: TMA brought whatever lies
                // there (the next sequence's keys, or zeros past the tensor).
                pv_tile<D, M, kNT, T, Tile>(w, s, sV, col0, lane, key_rows(kb));
                if (next_slot >= mask.count) break;
                slot = next_slot;
                kb = next_kb;
                if (kKStages == 2) stage ^= 1;
            }
            // Every warp is done with V before the epilogue reuses shared memory.
            __syncthreads();
        }
    } else if (slot < mask.count) {
        load_rows_swizzled<D, T, kThreads>(sQ, q, a.q_row_stride, q_token0, r_begin, r_end);
        load_rows_swizzled<D, T, kThreads>(sK, k, a.k_row_stride, key_token0(kb), 0, key_rows(kb));
        cp_async_commit();
        while (true) {
            // K_j (and Q) landed; every warp is done with V_{j-1}.
            cp_async_wait<0>();
            __syncthreads();
            load_rows_swizzled<D, T, kThreads>(sV, v, a.v_row_stride, key_token0(kb), 0, key_rows(kb));
            cp_async_commit();

            float s[M][kNT][4];
            qk_tile<D, M, kNT, T, Tile>(s, sQ, sK, row0, col0, lane);
            softmax_tile<D, M, kNT>(s, w, a.scale_log2, kb == qb, row0, col0, lane);

            // V_j landed; every warp is done with K_j.
            cp_async_wait<0>();
            __syncthreads();
            int next_kb = -1;
            const int next_slot = mask.next(slot + 1, next_kb);
            if (next_slot < mask.count) {
                load_rows_swizzled<D, T, kThreads>(sK, k, a.k_row_stride, key_token0(next_kb), 0, key_rows(next_kb));
                cp_async_commit();
            }
            // load_rows_swizzled zero-filled the rows past the sequence.
            pv_tile<D, M, kNT, T, Tile>(w, s, sV, col0, lane, kBlock);
            if (next_slot >= mask.count) break;
            slot = next_slot;
            kb = next_kb;
        }
        // Every warp is done with V before the epilogue reuses shared memory.
        __syncthreads();
    }

    // ---- epilogue. Row sums: the quad's shares.
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            w.row_sum[m][h] += __shfl_xor_sync(0xffffffffu, w.row_sum[m][h], 1);
            w.row_sum[m][h] += __shfl_xor_sync(0xffffffffu, w.row_sum[m][h], 2);
        }
    if constexpr (N == 2) {
        // Merge the key halves: the second half's warps hand their O, max and
        // sum over shared memory (laid out [value][thread], conflict-free) to
        // the first half's warps, which rescale both to the common max.
        constexpr int kVals = M * WarpRows<D, M>::kDTiles * 4;
        float* xfer = reinterpret_cast<float*>(smem);
        const int t = threadIdx.x % (kRowWarps * 32);
        static_assert((kVals + 4 * M) * kRowWarps * 32 * 4 <= 3 * kTileBytes, "merge fits in shared memory");
        if (key_part == 1) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
#pragma unroll
                for (int n = 0; n < WarpRows<D, M>::kDTiles; ++n)
#pragma unroll
                    for (int j = 0; j < 4; ++j) xfer[((m * WarpRows<D, M>::kDTiles + n) * 4 + j) * (kRowWarps * 32) + t] = w.o[m][n][j];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    xfer[(kVals + m * 4 + h) * (kRowWarps * 32) + t] = w.row_max[m][h];
                    xfer[(kVals + m * 4 + 2 + h) * (kRowWarps * 32) + t] = w.row_sum[m][h];
                }
            }
        }
        __syncthreads();
        if (key_part == 0) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float f_mine[2], f_other[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float other_max = xfer[(kVals + m * 4 + h) * (kRowWarps * 32) + t];
                    const float other_sum = xfer[(kVals + m * 4 + 2 + h) * (kRowWarps * 32) + t];
                    const float new_max = fmaxf(w.row_max[m][h], other_max);
                    const float base = new_max == -CUDART_INF_F ? 0.f : new_max * a.scale_log2;
                    f_mine[h] = fast_exp2(w.row_max[m][h] * a.scale_log2 - base);
                    f_other[h] = fast_exp2(other_max * a.scale_log2 - base);
                    w.row_sum[m][h] = w.row_sum[m][h] * f_mine[h] + other_sum * f_other[h];
                    w.row_max[m][h] = new_max;
                }
#pragma unroll
                for (int n = 0; n < WarpRows<D, M>::kDTiles; ++n)
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        w.o[m][n][j] = w.o[m][n][j] * f_mine[j >> 1] +
                                       xfer[((m * WarpRows<D, M>::kDTiles + n) * 4 + j) * (kRowWarps * 32) + t] *
                                           f_other[j >> 1];
            }
        }
        __syncthreads();
    }

    // Normalise, stage O in shared memory (over the K and V tiles, free
    // now), write whole 16-byte chunks of the rows that hold queries.
    using OutTile = Swizzled<D * sizeof(O)>;
    static_assert(kBlock * D * sizeof(O) <= 2 * kTileBytes, "O is staged over the K and V tiles");
    unsigned char* staged = smem + kTileBytes;
    if (key_part == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const int r0 = row0 + m * 16 + lane / 4;
            float inv[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) inv[h] = w.row_sum[m][h] > 0.f ? 1.f / w.row_sum[m][h] : 0.f;
#pragma unroll
            for (int n = 0; n < WarpRows<D, M>::kDTiles; ++n) {
                const int byte = (n * 8 + 2 * (lane % 4)) * static_cast<int>(sizeof(O));
                store2<O>(staged + OutTile::byte_offset(r0, byte), w.o[m][n][0] * inv[0], w.o[m][n][1] * inv[0]);
                store2<O>(staged + OutTile::byte_offset(r0 + 8, byte), w.o[m][n][2] * inv[1], w.o[m][n][3] * inv[1]);
            }
            if (a.lse != nullptr && lane % 4 == 0) {
                constexpr float kLn2 = 0.693147180559945309f;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = r0 + 8 * h;
                    if (r >= r_begin && r < r_end) {
                        const float sum = w.row_sum[m][h];
                        const float lse =
                            sum > 0.f ? (w.row_max[m][h] * a.scale_log2 + log2f(sum)) * kLn2 : -CUDART_INF_F;
                        a.lse[split * a.split_lse_stride + head * a.lse_head_stride + q_token0 + r] = lse;
                    }
                }
            }
        }
    }
    __syncthreads();
    O* out = static_cast<O*>(a.out) + split * a.split_out_stride + head * a.o_head_stride;
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

// Split-KV combine: one warp per (token, head); each lane owns D / 32
// consecutive elements. Parts with lse = -inf (no key in their share of
// the row) weigh 0; a row empty in every part gives zeros and -inf.
template <int D, typename O>
__device__ __forceinline__ void combine(const CombineArgs& c) {
    constexpr int kPer = D / 32;
    const long long pair = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (pair >= c.total_q * c.hq) return;
    const long long t = pair / c.hq;
    const int h = static_cast<int>(pair % c.hq);
    float m = -CUDART_INF_F;
    for (int s = 0; s < c.splits; ++s) m = fmaxf(m, c.part_lse[(s * c.hq + h) * c.total_q + t]);
    float acc[kPer] = {};
    float sum = 0.f;
    if (m != -CUDART_INF_F) {
        for (int s = 0; s < c.splits; ++s) {
            const float w = __expf(c.part_lse[(s * c.hq + h) * c.total_q + t] - m);
            sum += w;
            const float* part = c.parts + ((s * c.total_q + t) * c.hq + h) * D + lane * kPer;
#pragma unroll
            for (int j = 0; j < kPer; ++j) acc[j] += w * part[j];
        }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    O* out = static_cast<O*>(c.out) + t * c.o_row_stride + h * c.o_head_stride + lane * kPer;
#pragma unroll
    for (int j = 0; j < kPer; j += 2) store2<O>(reinterpret_cast<unsigned char*>(out + j), acc[j] * inv, acc[j + 1] * inv);
    if (c.lse != nullptr && lane == 0) c.lse[h * c.total_q + t] = sum > 0.f ? m + __logf(sum) : -CUDART_INF_F;
}

}  // namespace seer::attn

// One extern "C" symbol per (head_dim, warp layout, input dtype, output
// dtype, table capacity): seer_attn_fwd_d{D}_m{M}n{N}_{in}_{out}_s{S}; the
// CTA has (4 / M) * N warps and 3 * 64 * D * 2 bytes of dynamic shared
// memory. The _tma variants (sm_90 and later; a trap on older GPUs, which
// the host never selects) take the Q, K and V tensor maps and 1024 + 64
// more bytes (alignment slack and the mbarriers).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SEER_IF_SM90(...) __trap();
#else
#define SEER_IF_SM90(...) __VA_ARGS__
#endif

#define SEER_ATTN_CPASYNC(D, M, N, T, TN, O, ON, S)                                                                \
    extern "C" __global__ void __launch_bounds__(4 / M * N * 32)                                                  \
        seer_attn_fwd_d##D##_m##M##n##N##_##TN##_##ON##_s##S(const __grid_constant__ seer::attn::AttnArgs a,     \
                                                              const __grid_constant__ seer::attn::SeqTable<S> tab) { \
        seer::attn::sparse_fwd<D, M, N, false, 1, T, O, S>(a, tab, nullptr, nullptr, nullptr);                     \
    }

#define SEER_ATTN_TMA_K(D, M, N, KS, T, TN, O, ON, S)                                                              \
    extern "C" __global__ void __launch_bounds__(4 / M * N * 32)                                                  \
        seer_attn_fwd_tma_k##KS##_d##D##_m##M##n##N##_##TN##_##ON##_s##S(                                          \
            const __grid_constant__ seer::attn::AttnArgs a, const __grid_constant__ seer::attn::SeqTable<S> tab,   \
            const __grid_constant__ seer::tile::TensorMap tq, const __grid_constant__ seer::tile::TensorMap tk,    \
            const __grid_constant__ seer::tile::TensorMap tv) {                                                     \
        SEER_IF_SM90(seer::attn::sparse_fwd<D, M, N, true, KS, T, O, S>(a, tab, &tq, &tk, &tv);)                   \
    }
// One K stage: two (the next K tile fetched a whole iteration ahead) spilled
// at 255 registers and cost a CTA per SM: 16% slower (kernels/NOTES.md).
#define SEER_ATTN_TMA(D, M, N, T, TN, O, ON, S) SEER_ATTN_TMA_K(D, M, N, 1, T, TN, O, ON, S)

#define SEER_ATTN_OUTS(KIND, D, M, N, T, TN, S) \
    KIND(D, M, N, T, TN, T, TN, S)              \
    KIND(D, M, N, T, TN, float, f32, S)

#define SEER_ATTN_TYPES(KIND, D, M, N, S)                 \
    SEER_ATTN_OUTS(KIND, D, M, N, __nv_bfloat16, bf16, S) \
    SEER_ATTN_OUTS(KIND, D, M, N, __half, f16, S)

// Built: cp.async with the m1n1 layout (4 warps x 16 rows), the fastest
// measured on H100 (kernels/NOTES.md); TMA with m1n1 and m2n1 (2 warps x 32
// rows, FA2's per-warp shape, which cp.async could not afford: its copy
// addresses pushed it past 255 registers).
#define SEER_ATTN_ALL(S)                              \
    SEER_ATTN_TYPES(SEER_ATTN_CPASYNC, 64, 1, 1, S)   \
    SEER_ATTN_TYPES(SEER_ATTN_CPASYNC, 128, 1, 1, S)  \
    SEER_ATTN_TYPES(SEER_ATTN_TMA, 64, 2, 1, S)       \
    SEER_ATTN_TYPES(SEER_ATTN_TMA, 128, 2, 1, S)

#define SEER_COMBINE(D, O, ON)                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                                     \
        seer_attn_combine_d##D##_##ON(const __grid_constant__ seer::attn::CombineArgs c) {               \
        seer::attn::combine<D, O>(c);                                                                      \
    }
SEER_COMBINE(64, __nv_bfloat16, bf16)
SEER_COMBINE(64, __half, f16)
SEER_COMBINE(64, float, f32)
SEER_COMBINE(128, __nv_bfloat16, bf16)
SEER_COMBINE(128, __half, f16)
SEER_COMBINE(128, float, f32)

SEER_ATTN_ALL(16)
SEER_ATTN_ALL(256)

// Zeroes the wgmma kernel's work-item counters (AttnArgs::ticket, the front
// of the caller's workspace) before its launches. A kernel rather than a
// memset: the hot path puts nothing but kernels on the caller's stream, so
// a graph captured from it holds kernels only.
extern "C" __global__ void seer_attn_zero_counters(unsigned* counters, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) counters[i] = 0;
}
