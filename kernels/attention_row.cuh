/*
 * One mask row of the block-sparse prefill, shared by its kernels
 * (kernels/attention.cu on mma.sync, kernels/attention_sm90.cu on wgmma):
 * which work item a CTA (or warpgroup) takes, how a mask row is read
 * without trusting it, and the online softmax over one 64-key tile held in
 * the m16n8 accumulator layout (mma.sync C fragments and wgmma m64nN
 * accumulators share it: per warp, rows g and g + 8 of 16, columns
 * 8n + 2t and 8n + 2t + 1 for lane 4g + t).
 */
#pragma once

#include "attention.cuh"
#include "tile.cuh"

#include <math_constants.h>

namespace seer::attn {

using namespace seer::tile;

constexpr int kBlock = 64;  // mask block = query tile = key tile

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

// One work item of a launch: a mask row, or with split-KV one part of its
// key list. Items are numbered head-major, item = (head * units + unit) *
// splits + split, so that the work in flight shares one KV head's K and V
// (an L2-sized working set; the query heads of a GQA group follow each
// other and reuse it); within a head, each sequence's query blocks run last
// to first, longest rows first.
struct RowWork {
    int head, kv_head;
    int qb;            // absolute query block
    int split;
    int r_begin, r_end;  // tile rows that hold queries: positions [q_start, k_len)
    long long q_token0;  // packed token of tile row 0
    long long k_off;     // packed token of key 0
    int k_len;
    MaskRow mask;        // this item's share of the row's key list

    __device__ __forceinline__ int key_rows(int block) const { return min(k_len - block * kBlock, kBlock); }
    __device__ __forceinline__ long long key_token0(int block) const {
        return k_off + static_cast<long long>(block) * kBlock;
    }
};

template <int S>
__device__ __forceinline__ RowWork decode_work(const AttnArgs& a, const SeqTable<S>& tab, unsigned item) {
    // 32-bit division: a launch holds fewer than 2^31 items (checked on the host).
    RowWork w;
    w.split = static_cast<int>(item % static_cast<unsigned>(a.splits));
    const unsigned row_item = item / static_cast<unsigned>(a.splits);
    w.head = static_cast<int>(row_item / static_cast<unsigned>(a.units));
    const long long unit = row_item % static_cast<unsigned>(a.units);
    const SeqEntry& e = tab.seq[seq_of_unit(tab, unit)];
    const int i = e.q_blocks - 1 - static_cast<int>(unit - e.unit_base);
    w.qb = e.first_q_block + i;
    const long long row = e.row_base + static_cast<long long>(w.head) * e.q_blocks + i;
    w.kv_head = w.head / a.group;
    w.r_begin = max(e.q_start - w.qb * kBlock, 0);
    w.r_end = min(e.k_len - w.qb * kBlock, kBlock);
    w.q_token0 = e.q_off + (static_cast<long long>(w.qb) * kBlock - e.q_start);
    w.k_off = e.k_off;
    w.k_len = e.k_len;
    w.mask = read_mask_row(a, row, w.qb);
    if (a.splits > 1) {
        const int lo = static_cast<int>(static_cast<long long>(w.mask.count) * w.split / a.splits);
        const int hi = static_cast<int>(static_cast<long long>(w.mask.count) * (w.split + 1) / a.splits);
        w.mask.slots += lo;
        w.mask.count = hi - lo;
    }
    return w;
}

// TMA kernels (sm_90): loads one [64][D] tile (D / 64 boxes of 64 columns,
// 128-byte swizzle) of `map` at (head, token0) into `dst`, completing on
// `bar`. `which` selects the tensor's
// coordinate order (AttnArgs::tma_token_major). Rows past the tensor arrive
// as zeros and count towards the bytes all the same.
template <int D>
__device__ __forceinline__ void tma_tile(const AttnArgs& a, uint32_t dst, const TensorMap* map, int which, int head,
                                         long long token0, uint32_t bar) {
    const bool token_major = (a.tma_token_major >> which) & 1;
    const int c1 = token_major ? static_cast<int>(token0) : head;
    const int c2 = token_major ? head : static_cast<int>(token0);
    mbar_expect_tx(bar, kBlock * D * 2);
#pragma unroll
    for (int b = 0; b < D / 64; ++b) tma_load_3d(dst + b * 64 * 128, map, b * 64, c1, c2, bar);
}

// One warp's share of a 64-row query tile: M m16 tiles (16 * M rows) and
// their running softmax state.
template <int D, int M>
struct WarpRows {
    static constexpr int kDTiles = D / 8;  // n8 tiles of O
    float o[M][kDTiles][4];
    float row_max[M][2];  // of the raw scores q.k; -inf until a key is seen
    float row_sum[M][2];  // this thread's share; the quad's sum is the row's

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int m = 0; m < M; ++m) {
#pragma unroll
            for (int n = 0; n < kDTiles; ++n) o[m][n][0] = o[m][n][1] = o[m][n][2] = o[m][n][3] = 0.f;
            row_max[m][0] = row_max[m][1] = -CUDART_INF_F;
            row_sum[m][0] = row_sum[m][1] = 0.f;
        }
    }
};

// Online softmax over one key tile. The running max is kept on the raw
// scores (the scale is positive, so the max commutes with it) and the scale
// folds into the exponent: p = exp2(s * scale_log2 - max * scale_log2), one
// FFMA and one MUFU per score. The causal mask is applied only in the
// diagonal block (keys past the query: -inf, so p = 0).
template <int D, int M, int NT>
__device__ __forceinline__ void softmax_scores(float (&s)[M][NT][4], WarpRows<D, M>& w, float scale_log2,
                                               bool diagonal, int row0, int col0, int lane, float (&corr)[M][2]) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
        // Keys past the query (diagonal block only, a branch the whole CTA
        // takes alike): a column limit per row, relative to this warp's
        // first key.
        if (diagonal) {
            const int limit = row0 + m * 16 + lane / 4 - 2 * (lane % 4) - col0;
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    if (n * 8 + (j & 1) > limit + (j >> 1) * 8) s[m][n][j] = -CUDART_INF_F;
        }
        float tile_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            tile_max[0] = fmaxf(tile_max[0], fmaxf(s[m][n][0], s[m][n][1]));
            tile_max[1] = fmaxf(tile_max[1], fmaxf(s[m][n][2], s[m][n][3]));
        }
        float base[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
            const float old_max = w.row_max[m][h];
            const float new_max = fmaxf(old_max, tile_max[h]);
            // A row with nothing unmasked yet keeps max -inf: subtract 0
            // instead, so that exp2 gives 0, not NaN.
            base[h] = new_max == -CUDART_INF_F ? 0.f : new_max * scale_log2;
            // Exactly 1 when the maximum did not move, which callers test
            // to skip rescaling O. Computing it would not give that: the
            // FFMA old * scale - base leaves the rounding error of
            // base = new * scale, so exp2 of it is 1 +- an ulp, and the
            // wgmma kernel rescaled O after every block (v18).
            corr[m][h] = new_max == old_max ? 1.f : fast_exp2(old_max * scale_log2 - base[h]);
            w.row_max[m][h] = new_max;
            w.row_sum[m][h] *= corr[m][h];
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float p = fast_exp2(fmaf(s[m][n][j], scale_log2, -base[j >> 1]));
                s[m][n][j] = p;
                w.row_sum[m][j >> 1] += p;
            }
        }
    }
}

// O *= the correction factors of softmax_scores (each row's old maximum
// against its new one).
template <int D, int M>
__device__ __forceinline__ void rescale_o(WarpRows<D, M>& w, const float (&corr)[M][2]) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int n = 0; n < WarpRows<D, M>::kDTiles; ++n) {
            w.o[m][n][0] *= corr[m][0];
            w.o[m][n][1] *= corr[m][0];
            w.o[m][n][2] *= corr[m][1];
            w.o[m][n][3] *= corr[m][1];
        }
}

// Both: the scores of one key tile into P, and O rescaled for it.
template <int D, int M, int NT>
__device__ __forceinline__ void softmax_tile(float (&s)[M][NT][4], WarpRows<D, M>& w, float scale_log2, bool diagonal,
                                             int row0, int col0, int lane) {
    float corr[M][2];
    softmax_scores<D, M, NT>(s, w, scale_log2, diagonal, row0, col0, lane, corr);
    rescale_o<D, M>(w, corr);
}

}  // namespace seer::attn
