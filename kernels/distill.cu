/*
 * The gate's distillation target (SeerAttention's self-distillation, issue
 * 8), sm_80 and later.
 *
 * What it computes: for every (sequence, query head h, query block qb) and
 * every causal key block kb <= qb, the largest attention probability of the
 * frozen model inside the 64 x 64 block,
 *   pooled[qb, kb] = max over valid rows r of block qb, keys j of block kb,
 *                    j causal for r, of softmax_j(scale * q_r . k_j),
 * then each (h, qb) row normalised to sum 1:
 *   target[qb, kb] = pooled[qb, kb] / sum_kb' pooled[qb, kb'].
 * Post-RoPE Q [total_q, hq, D] and K [total_k, hkv, D], bf16 or f16, GQA,
 * variable-length batches, q_len <= k_len (the queries are the last q_len
 * of k_len positions). Partial blocks: only rows that are queries of the
 * sequence (positions [k_len - q_len, k_len)) and keys that exist count.
 * Upstream's attn_with_pooling computes the same map (it also keeps the
 * attention output, which the target does not need). The CPU reference is
 * src/reference/distill.rs.
 *
 * Output: f32, one value per causal (row, key block) pair, in the slot
 * layout of the block mask (src/mask.rs MaskLayout: row (seq, head, i) owns
 * slots [row_offsets[row], +first_q_block + i + 1), slot s = key block s).
 *
 * How, without the attention output: softmax_j(x_rj) = exp(x_rj - c_r) with
 * c_r = logsumexp_j x_rj, so
 *   pooled[qb, kb] = exp(max_r (t_r,kb - c_r)),  t_r,kb = max_{j in kb} x_rj.
 * One pass over the causal key blocks computes S = Q K^T per 64 x 64 tile,
 * each row's tile maximum t (written to a per-CTA f32 scratch slab, [kb][64
 * rows]) and the online logsumexp (running max and sum, one exp per score).
 * c_r is known only after the last key block, so the epilogue reads the
 * slab back, takes the maximum over the block's rows of t - c per key
 * block, exponentiates and normalises. No second Q K^T pass, no P V.
 *
 * Structure: a persistent grid (CTAS_PER_SM per SM, src/gpu/distill.rs),
 * CTA c takes work items c, c + grid, ... in the prefill's order
 * (head-major, longest rows first; kernels/attention_row.cuh). 4 warps,
 * warp w owns rows 16w..16w+15 of the 64-row query tile; Q is held in
 * registers as mma.sync A fragments for the whole item; K tiles are
 * double-buffered with cp.async.
 *
 * Budget per computed 64 x 64 tile, head_dim D: Q K^T 2 * 64 * 64 * D
 * FLOPs (1.05 MFLOP at D = 128: half of an attention block, no P V), 4096
 * exp2, a 64 * D * 2-byte K tile from L2 (16 KB at D = 128) and 256 bytes
 * of slab written (read once in the epilogue). At 32k tokens, 32 query
 * heads, D = 128: 4.4 TFLOP, 17.2 G exp2, 69 GB of K tiles from L2, 2.2 GB
 * of slab traffic. A dense causal attention forward of the same shape is
 * 8.8 TFLOP. Shared memory: Q [64][D] + K [2][64][D], 16-bit, swizzled
 * (48 KB at D = 128).
 */
#include "attention_row.cuh"

namespace seer::distill {

using namespace seer::tile;
using seer::attn::kBlock;
using seer::attn::SeqEntry;
using seer::attn::SeqTable;

// Everything a launch shares; mirrored by src/gpu/distill.rs. Strides in
// elements, the dim stride 1.
struct DistillArgs {
    const void* q;           // [total_q, hq, D] post-RoPE
    const void* k;           // [total_k, hkv, D] post-RoPE
    float* target;           // the mask's slot layout, f32
    float* scratch;          // per CTA: [k_blocks_max][64] f32
    long long q_row_stride, q_head_stride;
    long long k_row_stride, k_head_stride;
    long long target_len;    // slots `target` holds: nothing is written past it
    long long scratch_slab;  // floats per CTA slab: k_blocks_max * 64
    float scale_log2;        // softmax_scale * log2(e)
    int hq;
    int group;               // hq / hkv
    int units;               // query blocks in this launch's table
};
static_assert(sizeof(DistillArgs) == 96, "DistillArgs layout is shared with Rust");

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// One work item: a (head, query block) row of the target. SeqEntry's
// row_base holds, for this kernel, the sequence's first target slot (head
// 0, its first query block); a head's rows follow each other.
struct Item {
    int head, kv_head, qb;
    int r_begin, r_end;   // tile rows that are queries of the sequence
    long long q_token0;   // packed token of tile row 0
    long long k_off;      // packed token of key 0
    int k_len;
    long long slot0;      // first target slot of the row
};

template <int S>
__device__ __forceinline__ Item decode_item(const DistillArgs& a, const SeqTable<S>& tab, unsigned item) {
    Item w;
    w.head = static_cast<int>(item / static_cast<unsigned>(a.units));
    const long long unit = item % static_cast<unsigned>(a.units);
    const SeqEntry& e = tab.seq[seer::attn::seq_of_unit(tab, unit)];
    const int i = e.q_blocks - 1 - static_cast<int>(unit - e.unit_base);
    w.qb = e.first_q_block + i;
    w.kv_head = w.head / a.group;
    w.r_begin = max(e.q_start - w.qb * kBlock, 0);
    w.r_end = min(e.k_len - w.qb * kBlock, kBlock);
    w.q_token0 = e.q_off + (static_cast<long long>(w.qb) * kBlock - e.q_start);
    w.k_off = e.k_off;
    w.k_len = e.k_len;
    // Row i of a head has first_q_block + i + 1 slots.
    const long long fq1 = e.first_q_block + 1;
    const long long per_head = e.q_blocks * fq1 + static_cast<long long>(e.q_blocks) * (e.q_blocks - 1) / 2;
    w.slot0 = e.row_base + w.head * per_head + i * fq1 + static_cast<long long>(i) * (i - 1) / 2;
    return w;
}

// A 64-row tile into swizzled shared memory: row r is token `token0 + r`
// when r is in [r_begin, r_end), zeros otherwise.
template <int D, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T* base, long long row_stride, long long token0,
                                          int r_begin, int r_end) {
    load_rows_swizzled<D, T, kThreads>(dst, base, row_stride, token0, r_begin, r_end);
}

// The main loop of one item: every causal key block, the row tile maxima
// into `slab` and each row's log2-sum-exp2 of scaled scores returned in
// lse2 (rows g and g + 8 of the warp's 16; the quad's lanes agree).
template <int D, typename T>
__device__ __forceinline__ void scan_keys(const DistillArgs& a, const Item& w, uint32_t sQ, uint32_t sK,
                                          float* slab, float (&lse2)[2]) {
    constexpr int kTileBytes = kBlock * D * 2;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = warp * 16;
    const T* k = static_cast<const T*>(a.k) + w.kv_head * a.k_head_stride;

    load_tile<D, T>(sK, k, a.k_row_stride, w.k_off, 0, min(w.k_len, kBlock));
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    // Q's A fragments for all D / 16 k-steps stay in registers for the item.
    uint32_t qa[D / 16][4];
    load_a_fragments<D>(qa, sQ, row0, lane);

    float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};  // raw scores
    float row_sum[2] = {0.f, 0.f};                      // this thread's share
    for (int kb = 0; kb <= w.qb; ++kb) {
        const uint32_t cur = sK + (kb & 1) * kTileBytes;
        if (kb < w.qb) {
            const int next = kb + 1;
            load_tile<D, T>(sK + (next & 1) * kTileBytes, k, a.k_row_stride, w.k_off + next * kBlock, 0,
                            min(w.k_len - next * kBlock, kBlock));
        }
        cp_async_commit();

        float s[8][4];
        qk_tile<D, T>(s, qa, cur, lane);
        // Keys that do not exist (past k_len, last block) or are after the
        // query (diagonal block): -inf. Lane 4g + t holds rows g, g + 8 and
        // keys 8n + 2t, 8n + 2t + 1.
        const int key_limit = w.k_len - kb * kBlock;  // keys [0, key_limit) exist
        if (kb == w.qb || key_limit < kBlock) {
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int key = n * 8 + 2 * (lane % 4) + (j & 1);
                    const int row = row0 + lane / 4 + (j >> 1) * 8;
                    if (key >= key_limit || (kb == w.qb && key > row)) s[n][j] = -CUDART_INF_F;
                }
        }
        // An invalid row's zero scores are still finite, so only a row whose
        // keys were all masked keeps max -inf (and sum 0).
        float tile_max[2];
        online_max_sum<8>(s, a.scale_log2, row_max, row_sum, tile_max);
        if (lane % 4 == 0) {
            slab[kb * kBlock + row0 + lane / 4] = tile_max[0];
            slab[kb * kBlock + row0 + lane / 4 + 8] = tile_max[1];
        }

        cp_async_wait<0>();
        // The next tile has landed for every thread, and every warp is done
        // reading this one before the iteration after next overwrites it.
        __syncthreads();
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
        row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
        lse2[h] = row_max[h] * a.scale_log2 + __log2f(row_sum[h]);
    }
}

// The epilogue of one item: per key block, max over the valid rows of
// (t * scale_log2 - lse2), exp2, then the row normalised. Warp w takes key
// blocks w, w + 4, ...; lane l reads rows 2l, 2l + 1 of the slab.
__device__ __forceinline__ void pool_rows(const DistillArgs& a, const Item& w, const float* slab,
                                          const float* lse2_rows, float* warp_sums) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float c0 = lse2_rows[2 * lane], c1 = lse2_rows[2 * lane + 1];
    float sum = 0.f;
    for (int kb = warp; kb <= w.qb; kb += kWarps) {
        const float2 t = *reinterpret_cast<const float2*>(slab + kb * kBlock + 2 * lane);
        float v = fmaxf(fmaf(t.x, a.scale_log2, -c0), fmaf(t.y, a.scale_log2, -c1));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        const float p = exp2f(v);
        sum += p;
        const long long slot = w.slot0 + kb;
        if (lane == 0 && slot < a.target_len) a.target[slot] = p;
    }
    if (lane == 0) warp_sums[warp] = sum;
    __syncthreads();
    const float total = warp_sums[0] + warp_sums[1] + warp_sums[2] + warp_sums[3];
    const float inv = total > 0.f ? 1.f / total : 0.f;
    // Each thread rescales what its warp's lane 0 wrote (the same thread:
    // no ordering needed beyond program order).
    if (lane == 0)
        for (int kb = warp; kb <= w.qb; kb += kWarps) {
            const long long slot = w.slot0 + kb;
            if (slot < a.target_len) a.target[slot] *= inv;
        }
}

template <int D, typename T, int S>
__device__ __forceinline__ void distill_target(const DistillArgs& a, const SeqTable<S>& tab) {
    constexpr int kTileBytes = kBlock * D * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ float lse2_rows[kBlock];
    __shared__ float warp_sums[kWarps];
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sK = sQ + kTileBytes;
    float* slab = a.scratch + blockIdx.x * a.scratch_slab;
    const unsigned items = static_cast<unsigned>(a.units) * static_cast<unsigned>(a.hq);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    for (unsigned it = blockIdx.x; it < items; it += gridDim.x) {
        const Item w = decode_item(a, tab, it);
        const T* q = static_cast<const T*>(a.q) + w.head * a.q_head_stride;
        load_tile<D, T>(sQ, q, a.q_row_stride, w.q_token0, w.r_begin, w.r_end);
        float lse2[2];
        scan_keys<D, T>(a, w, sQ, sK, slab, lse2);
        // Rows that are not queries of the sequence take no part: +inf
        // makes their t - lse2 -inf.
        if (lane % 4 == 0) {
            const int r = warp * 16 + lane / 4;
            lse2_rows[r] = (r >= w.r_begin && r < w.r_end) ? lse2[0] : CUDART_INF_F;
            lse2_rows[r + 8] = (r + 8 >= w.r_begin && r + 8 < w.r_end) ? lse2[1] : CUDART_INF_F;
        }
        // The slab's writes (global) and lse2_rows are visible to the CTA.
        __syncthreads();
        pool_rows(a, w, slab, lse2_rows, warp_sums);
        // Before the next item reuses Q, K, lse2_rows and warp_sums.
        __syncthreads();
    }
}

}  // namespace seer::distill

#define SEER_DISTILL_KERNEL(D, T, TN, S)                                                                       \
    extern "C" __global__ void __launch_bounds__(seer::distill::kThreads, 4)                                  \
        seer_distill_target_d##D##_##TN##_s##S(const seer::distill::DistillArgs a,                            \
                                               const seer::attn::SeqTable<S> tab) {                           \
        seer::distill::distill_target<D, T, S>(a, tab);                                                       \
    }

#define SEER_DISTILL_KERNELS(S)                           \
    SEER_DISTILL_KERNEL(64, __nv_bfloat16, bf16, S)       \
    SEER_DISTILL_KERNEL(64, __half, f16, S)               \
    SEER_DISTILL_KERNEL(128, __nv_bfloat16, bf16, S)      \
    SEER_DISTILL_KERNEL(128, __half, f16, S)

SEER_DISTILL_KERNELS(16)
SEER_DISTILL_KERNELS(256)
