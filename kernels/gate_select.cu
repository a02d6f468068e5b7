/*
 * The gate's threshold selection without materialized logits (the block
 * mask stage of the gate; kernels/gate.cu computes q_gate and k_gate).
 *
 * What it computes: for every mask row (sequence, query head h, query block
 * i) the key blocks j <= i (causal, in block units) with
 *     p_ij = softmax_j(scale * q_gate[h, i] . k_gate[h, j]) > threshold,
 * written as the row's index list in ascending order (counts, indices,
 * row_offsets: the mask format of src/mask.rs), with the empty-row policy
 * and the dense last blocks of MaskParams. The rule of
 * seer_gate_logits_* + seer_gate_select_* for SparsityMethod::Threshold;
 * top-k (which needs each row's k-th largest logit) stays on that path.
 *
 * How: the rows are the "queries" and the key blocks the "keys" of a causal
 * attention of head_dim D (q_gate, k_gate: bf16), and the softmax needs
 * only each row's log-sum-exp, which one online pass gives (as in
 * FlashAttention). Pass 1 computes S = Q K^T tile by tile with the running
 * max and sum per row; pass 2 computes the same tiles again (the same mma
 * sequence: the same bits) and keeps s * scale * log2(e) > lse2 + log2(t)
 * (p > t without an exponential; with the bf16 comparison or t <= 0, p by
 * exp2 and compared as the staged select does). Each row's kept columns of
 * a 64-key tile form a 64-bit word (a quad of lanes holds a row: OR over the
 * quad); every lane then writes its own kept columns at their rank in the
 * word, so the list is ascending with no serial loop.
 *
 * Why: the staged path writes every causal logit (4 bytes per (row, key
 * block)) and reads it back for the selection: 268 MB each way at 128k
 * tokens with 32 heads, ~0.56 ms of the gate's 1.1 ms at 128k (ncu:
 * logits 320 us at 54 TFLOP/s, select 243 us). Here nothing but the kept
 * indices leaves the SM, for twice the Q K^T FLOPs on tensor cores.
 *
 * Budget per (row tile of 64, key tile of 64), D = 128: 2 x 1.05 MFLOP
 * (two passes), 4096 exp2 (pass 1), a 16 KB K tile from L2 per pass; at
 * 128k tokens, 32 heads: 34 GFLOP, 134 M exp2, 2 x 1.1 GB of K tiles from
 * L2 (k_gate is 16 MB: it stays in L2). Shared memory: Q [64][D] + K
 * [2][64][D] bf16, swizzled (48 KB at D = 128).
 *
 * Structure: one CTA of 4 warps per (64-row tile, sequence, head), the
 * longest rows first (blockIdx.x counts from the last tile); warp w owns
 * rows 16w..16w+15, Q as mma.sync A fragments in registers for the item, K
 * tiles double-buffered with cp.async. Tested by tests/gpu_gate.rs against
 * the CPU reference (every threshold rule there runs this kernel).
 */
#include "gate.cuh"
#include "tile.cuh"

#include <math_constants.h>

namespace seer::gate_select {

using namespace seer::tile;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 64;  // mask rows per CTA
constexpr int kKeys = 64;  // key blocks per tile

// Rows [row0, row0 + 64) of `base` (row stride `stride` elements) into a
// swizzled [64][D] tile; rows at or past `valid` are zero-filled.
template <int D>
__device__ __forceinline__ void load_rows(uint32_t dst, const bf16* base, long long stride, int row0, int valid) {
    load_rows_swizzled<D, bf16, kThreads>(dst, base, stride, row0, 0, valid - row0);
}

// Key tiles per work item: an item is (sequence, head, 64-row tile, chunk
// of kChunkTiles key tiles), so a long row's key range is spread over
// several CTAs instead of one CTA walking it alone (the latency of a tile's
// K load then overlaps across CTAs; one CTA per row tile left 6-10% of the
// warp slots busy at 32k).
constexpr int kChunkTiles = 4;
// Words of 64 key blocks a compaction warp holds per lane: rows of up to
// 32 * kWordsPerLane * 64 key blocks (1M tokens); longer rows take the
// staged logits + select path (src/gpu/gate.rs).
constexpr int kWordsPerLane = 8;

// Where the partial (max, sum) of (row, chunk) lives in the workspace: per
// head, per global query-block row, `chunks` float2.
__device__ __forceinline__ float2* partial_at(const GateArgs& a, float2* partials, int chunks, int head,
                                              long long qrow) {
    return partials + (static_cast<long long>(head) * a.q_gate_rows + qrow) * chunks;
}

// The item of this CTA: grid (row tiles x chunks, sequences, heads), row
// tiles from the last (longest) down. False when the chunk lies past the
// row tile's causal key tiles (the CTA has nothing to do).
struct Item {
    int head, i0, rows, tile0, tile_end, tiles;  // key tiles [tile0, tile_end) of the row tile's `tiles`
};

template <int MAXS>
__device__ __forceinline__ bool decode(const SeqTable<MAXS>& tab, int chunks, Item& w) {
    const SeqEntry& e = tab.seq[blockIdx.y];
    const int row_tiles = static_cast<int>(gridDim.x) / chunks;
    const int r = row_tiles - 1 - static_cast<int>(blockIdx.x) / chunks;
    const int c = static_cast<int>(blockIdx.x) % chunks;
    w.head = blockIdx.z;
    w.i0 = r * kRows;
    if (w.i0 >= e.q_blocks) return false;
    w.rows = min(kRows, e.q_blocks - w.i0);
    w.tiles = (e.first_q_block + w.i0 + w.rows + kKeys - 1) / kKeys;
    w.tile0 = c * kChunkTiles;
    w.tile_end = min(w.tiles, w.tile0 + kChunkTiles);
    return w.tile0 < w.tiles;
}

// Pass 1 (PASS == 1) or 2 of one item. Pass 1: each row's max and sum of
// exp2 over the item's key tiles, online (as kernels/distill.cu), into the
// workspace. Pass 2: the row's log-sum-exp from every chunk's partials,
// then each kept (row, key tile) as a 64-bit word (bit c: key block 64 t +
// c kept) in the row's own index slots, word t at slots 2t (bits 0-31) and
// 2t + 1 (bits 32-63, written only if the row has keys there): a row of n
// slots has room for its ceil(n / 64) words. The compaction kernel turns
// the words into the index list in place.
template <int D, int MAXS, int PASS>
__device__ void threshold_pass(const GateArgs& a, const SeqTable<MAXS>& tab, float2* partials, int chunks) {
    constexpr int kTileBytes = kRows * D * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    Item w;
    if (!decode(tab, chunks, w)) return;
    const SeqEntry& e = tab.seq[blockIdx.y];
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sK = sQ + kTileBytes;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = warp * 16;

    const bf16* q = a.q_gate + (static_cast<long long>(w.head) * a.q_gate_rows + e.qblock_base) * D;
    const bf16* k = e.k_gate + w.head * a.k_gate_head_stride;
    load_rows<D>(sQ, q, D, w.i0, e.q_blocks);
    load_rows<D>(sK, k, a.k_gate_row_stride, w.tile0 * kKeys, e.k_blocks);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qa[D / 16][4];
    load_a_fragments<D>(qa, sQ, row0, lane);

    // This lane's two rows (g and g + 8 of the warp's 16): local index,
    // absolute query block (its causal limit in key blocks), whether real.
    int local[2], qb[2];
    bool real[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        local[h] = w.i0 + row0 + lane / 4 + 8 * h;
        qb[h] = e.first_q_block + local[h];
        real[h] = local[h] < w.i0 + w.rows;
    }
    const float scale_log2 = a.scale * 1.4426950408889634f;
    const int chunk = w.tile0 / kChunkTiles;

    float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
    float row_sum[2] = {0.f, 0.f};
    float lse2[2] = {0.f, 0.f}, cut2[2] = {0.f, 0.f};
    bool dense[2] = {false, false};
    const bool by_logit = !a.threshold_bf16 && a.threshold > 0.f;
    const float t_bf16 = __bfloat162float(__float2bfloat16(a.threshold));
    if (PASS == 2) {
        // The row's softmax normaliser from the partials of every chunk of
        // its row tile (a chunk past the row's own keys holds max -inf).
        const int row_chunks = (w.tiles + kChunkTiles - 1) / kChunkTiles;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float2* part = partial_at(a, partials, chunks, w.head, e.qblock_base + local[h]);
            float m = -CUDART_INF_F;
            for (int c = 0; c < row_chunks; ++c) m = fmaxf(m, __ldcg(&part[c].x));
            float l = 0.f;
            for (int c = 0; c < row_chunks; ++c) {
                const float2 p = __ldcg(&part[c]);
                if (p.x != -CUDART_INF_F) l += p.y * fast_exp2((p.x - m) * scale_log2);
            }
            lse2[h] = m * scale_log2 + __log2f(l);
            dense[h] = a.last_block_dense && qb[h] + 2 >= e.k_blocks;
            // p > t  <=>  s * scale_log2 > lse2 + log2(t); a dense row keeps
            // every causal block (every finite score is above -inf).
            cut2[h] = dense[h] ? -CUDART_INF_F : (by_logit ? lse2[h] + log2f(a.threshold) : 0.f);
        }
    }
    const long long head_slot = head_slot_base(e, w.head);

    for (int t = w.tile0; t < w.tile_end; ++t) {
        const uint32_t cur = sK + ((t - w.tile0) & 1) * kTileBytes;
        if (t + 1 < w.tile_end) {
            load_rows<D>(sK + ((t + 1 - w.tile0) & 1) * kTileBytes, k, a.k_gate_row_stride, (t + 1) * kKeys,
                         e.k_blocks);
        }
        cp_async_commit();
        float s[8][4];
        qk_tile<D, bf16>(s, qa, cur, lane);
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int key = t * kKeys + n * 8 + 2 * (lane % 4) + (j & 1);
                if (key > qb[j >> 1]) s[n][j] = -CUDART_INF_F;  // not causal
            }
        if (PASS == 1) {
            float tile_max[2];
            online_max_sum<8>(s, scale_log2, row_max, row_sum, tile_max);
        } else {
            // Bit 8 n + (j & 1) of the lane's word, then one shift by
            // 2 (lane % 4) for the quad position: every per-element shift is
            // a constant after unrolling.
            unsigned long long word[2] = {0ull, 0ull};
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int h = j >> 1;
                    const float x = s[n][j];
                    bool keep;
                    if (by_logit) {
                        // cut2 is -inf for a dense row; -inf (not causal) is
                        // never above any cut.
                        keep = x * scale_log2 > cut2[h];
                    } else if (x == -CUDART_INF_F) {
                        keep = false;  // not causal
                    } else if (dense[h]) {
                        keep = true;
                    } else {
                        const float p = exp2f(x * scale_log2 - lse2[h]);
                        keep = a.threshold_bf16 ? __bfloat162float(__float2bfloat16(p)) > t_bf16 : p > a.threshold;
                    }
                    word[h] |= static_cast<unsigned long long>(keep) << (n * 8 + (j & 1));
                }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                word[h] <<= 2 * (lane % 4);
                word[h] |= __shfl_xor_sync(0xffffffffu, word[h], 1);
                word[h] |= __shfl_xor_sync(0xffffffffu, word[h], 2);
                const int n_keys = qb[h] + 1;  // the row's slots
                if (real[h] && lane % 4 == 0 && t * kKeys < n_keys) {
                    unsigned* out = reinterpret_cast<unsigned*>(a.indices + head_slot + tri(qb[h]));
                    out[2 * t] = static_cast<unsigned>(word[h]);
                    if (t * kKeys + 32 < n_keys) out[2 * t + 1] = static_cast<unsigned>(word[h] >> 32);
                }
            }
        }
        cp_async_wait<0>();
        // The next tile has landed for every thread, and every warp is done
        // with this one before the tile after next overwrites it.
        __syncthreads();
    }
    if (PASS == 1) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
            row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
            if (real[h] && lane % 4 == 0) {
                partial_at(a, partials, chunks, w.head, e.qblock_base + local[h])[chunk] =
                    make_float2(row_max[h], row_sum[h]);
            }
        }
    }
}

// One warp per mask row: its words (all read into registers first: the
// index list is written over them) become the ascending index list, with
// the empty-row policy; counts and row_offsets written.
template <int MAXS>
__device__ void compact(const GateArgs& a, const SeqTable<MAXS>& tab) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long row = static_cast<long long>(blockIdx.x) * kWarps + warp;
    if (blockIdx.x == 0 && threadIdx.x == 0) a.row_offsets[a.total_rows] = a.total_slots;
    if (row >= a.total_rows) return;
    const MaskRowAt m = mask_row_at(tab, row);
    const int q_block = m.q_block;
    const long long slot = m.slot;
    const int n = q_block + 1;
    const int words = (n + kKeys - 1) / kKeys;
    const unsigned* in = reinterpret_cast<const unsigned*>(a.indices + slot);
    unsigned long long held[kWordsPerLane];
#pragma unroll
    for (int r = 0; r < kWordsPerLane; ++r) {
        const int t = r * 32 + lane;
        held[r] = 0ull;
        if (t < words) {
            held[r] = in[2 * t];
            if (t * kKeys + 32 < n) held[r] |= static_cast<unsigned long long>(in[2 * t + 1]) << 32;
        }
    }
    __syncwarp();  // every word read before any index lands on it
    // Per round of 32 words (one a lane), whichever way is shorter for this
    // row: a dense round broadcasts its words in order and ranks the kept
    // keys of each 32 by a ballot (2 steps a word, whatever it holds); a
    // sparse one gives each lane its word's offset by a prefix sum of the
    // popcounts and lets it write its own set bits (as many steps as the
    // fullest word holds). At 32k tokens rows keep ~60% of 8 words (ballots);
    // at 128k ~9% of 32 words, where the ballots did 64 steps a row for ~6
    // keys a word. Both write the ascending list.
    int* out = a.indices + slot;
    int count = 0;
#pragma unroll
    for (int r = 0; r < kWordsPerLane; ++r) {
        const int in_round = min(words - r * 32, 32);
        if (in_round <= 0) break;
        const int pop = __popcll(held[r]);
        int fullest = pop;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) fullest = max(fullest, __shfl_xor_sync(0xffffffffu, fullest, o));
        // A set-bit step costs about half a ballot step (ffs, store, clear
        // against shift, ballot, two popcounts, store): walk bits when the
        // fullest word has fewer set bits than 3x the round's words.
        if (fullest < 3 * in_round) {
            int before = pop;  // inclusive prefix sum of the popcounts over lanes
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, before, o);
                if (lane >= o) before += v;
            }
            int at = count + before - pop;
            const int t0 = (r * 32 + lane) * kKeys;
            for (unsigned long long w = held[r]; w != 0ull; w &= w - 1ull) out[at++] = t0 + __ffsll(w) - 1;
            count += __shfl_sync(0xffffffffu, before, 31);
        } else {
            for (int src = 0; src < in_round; ++src) {
                const unsigned long long word = __shfl_sync(0xffffffffu, held[r], src);
                const int t = r * 32 + src;
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const bool keep = (word >> (half * 32 + lane)) & 1ull;
                    count = warp_append(out, count, keep, t * kKeys + half * 32 + lane, lane);
                }
            }
        }
    }
    finish_row(a, row, slot, out, count, q_block, lane);
}

}  // namespace seer::gate_select

// Entry points: per (hidden = head_dim, table capacity), the two passes
// (grid (row tiles x chunks, sequences, heads), 128 threads, 3 * 64 * D * 2
// bytes of dynamic shared memory) and the compaction (one warp per mask
// row), launched in that order by src/gpu/gate.rs.
#define SEER_GATE_THRESHOLD(D, S)                                                                  \
    extern "C" __global__ void __launch_bounds__(seer::gate_select::kThreads, 4)                  \
        seer_gate_threshold_lse_d##D##_s##S(const seer::GateArgs a,                                \
                                            const __grid_constant__ seer::SeqTable<S> tab,         \
                                            float2* partials, int chunks) {                        \
        seer::gate_select::threshold_pass<D, S, 1>(a, tab, partials, chunks);                      \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(seer::gate_select::kThreads, 4)                  \
        seer_gate_threshold_bits_d##D##_s##S(const seer::GateArgs a,                               \
                                             const __grid_constant__ seer::SeqTable<S> tab,        \
                                             float2* partials, int chunks) {                       \
        seer::gate_select::threshold_pass<D, S, 2>(a, tab, partials, chunks);                      \
    }

#define SEER_GATE_COMPACT(S)                                                                       \
    extern "C" __global__ void __launch_bounds__(seer::gate_select::kThreads)                     \
        seer_gate_threshold_compact_s##S(const seer::GateArgs a,                                   \
                                         const __grid_constant__ seer::SeqTable<S> tab) {          \
        seer::gate_select::compact<S>(a, tab);                                                     \
    }

SEER_GATE_THRESHOLD(64, 16)
SEER_GATE_THRESHOLD(64, 256)
SEER_GATE_THRESHOLD(128, 16)
SEER_GATE_THRESHOLD(128, 256)
SEER_GATE_COMPACT(16)
SEER_GATE_COMPACT(256)
