/*
 * The SeerAttention gate on the GPU: pre-RoPE Q and K in, block mask out.
 *
 * What it computes (the contract is src/reference/{pooling,scores,select}.rs):
 *   per sequence, 64-token block and head, Q average-pooled and K pooled
 *   [max|min|avg]; k_gate = RoPE(pooled_k · W[h]); q_gate = RoPE(pooled_q);
 *   logits = q_gate · k_gate / sqrt(hidden) over causal key blocks; softmax;
 *   threshold or top-k; the index-list block mask (counts, indices, row_offsets).
 *   Released gate type only (Qavg_Kmaxminavg, no Q projection, hidden == head_dim).
 *
 * One-shot gate (compute_mask): five launches on the caller's stream, no
 * allocation, no synchronization:
 *   seer_gate_rope_*     cos/sin of every block-start position (double
 *                        precision, once per block instead of once per head);
 *   seer_gate_pool_*     one pass over Q and K, whole token rows per CTA (the
 *                        memory-bound part, at the DRAM floor);
 *   seer_gate_project_*  K projection on bf16 tensor cores (mma.sync, the
 *                        head's weights staged once per CTA), RoPE epilogue;
 *   seer_gate_logits_*   every causal logit on tensor cores, written as f32
 *                        into the mask's own index slots;
 *   seer_gate_select_*   one warp per row: softmax statistics, threshold or
 *                        radix top-k, the selected blocks written over the
 *                        logits in place. No row is held in shared memory, so
 *                        sequences of any length work.
 * For the threshold rule on rows of 257 key blocks and more (16k tokens),
 * kernels/gate_select.cu replaces the last two: two passes over recomputed
 * logits (log-sum-exp, then kept bits) and a compaction, no logit written.
 * The logits kernel finds each sequence's k_gate rows through SeqEntry::k_gate
 * and GateArgs::k_gate_{head,row}_stride: the workspace here, a cache below.
 *
 * Chunked prefill with K-block caches (see "The K-block cache" in gate.cuh):
 *   update_kblock_cache: seer_gate_rope_*, then
 *     seer_gate_kcache_pool_*     pools only the chunk's new keys (packed like
 *                                 Q) per touched block, merging with the
 *                                 cached partial block's f32 state and staging
 *                                 the new one in the workspace;
 *     seer_gate_kcache_commit_*   copies staged states into the caches (a
 *                                 separate launch: the chunk's first block
 *                                 must read the old state before it changes);
 *     seer_gate_kcache_project_*  the projection kernel over the touched
 *                                 blocks, each row written to its sequence's
 *                                 cache at its absolute block index;
 *   compute_mask_cached: seer_gate_rope_*, seer_gate_pool_* over the query
 *     heads only (K is not read), seer_gate_logits_* reading the caches,
 *     seer_gate_select_*.
 *
 * The per-sequence table travels by value in the kernel parameters (it is
 * computed on the host from the host cu_seqlens and cache pointers), so no
 * host-to-device copy is needed and a captured graph replays exactly the
 * shapes it captured.
 *
 * Budget at 32k tokens, 32 q heads, 8 kv heads, head_dim 128, bf16:
 *   bytes: Q 268 MB + K 67 MB read once (the floor: ~0.11 ms at 3 TB/s);
 *          scratch (q_gate 4 MB, pooled_k 3 MB, k_gate 4 MB) written once, read from L2;
 *          logits 4 bytes per causal (row, key block): 17 MB at 32k (L2), 268 MB at 128k.
 *   FLOPs: projection 1.6 G, logits 1.1 G, both on tensor cores; softmax and
 *          selection O(rows * k_blocks).
 * Tested by tests/gpu_gate.rs against the CPU reference (and, for the K-block
 * cache, against the one-shot gate over the same chunks).
 */
#include "gate.cuh"
#include "tile.cuh"

#include <mma.h>

namespace seer {
namespace {

using namespace nvcuda;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------- pooling --

// cos/sin of position 64 j times every inverse frequency, for every key
// block j of the longest sequence: the rotations the pool (Q) and project
// (K) epilogues apply. Angles in double: positions reach 2^17 and more,
// where an f32 angle would be off by ~1e-2 rad (the CPU reference uses f64).
template <int D>
__device__ void rope_table(const GateArgs& a) {
    const int j = blockIdx.x;
    for (int c = threadIdx.x; c < D / 2; c += kThreads) {
        double s, co;
        sincos(static_cast<double>(j) * kBlock * a.inv_freq[c], &s, &co);
        a.rope[static_cast<long long>(j) * (D / 2) + c] = make_float2(static_cast<float>(co), static_cast<float>(s));
    }
}

constexpr int kPoolThreads = 256;

// One CTA pools one block of one sequence for a slice of the heads (all of
// them unless the host splits heads to make enough CTAs): query block
// `blockIdx.y` (average, then RoPE at the block start, into q_gate) and key
// block `blockIdx.y` (max, min, average into pooled_k), slice `blockIdx.x`.
// Each token row of the slice is read whole and contiguously (a row of Q is
// hq * D elements): thread t owns the 16-byte pieces t, t + 256, ... of the
// row and accumulates them over the block's tokens in registers, so no
// cross-thread reduction is needed. Rows are fetched R at a time, every load
// of a batch issued before the first is used. QP and KP bound the Q and K
// pieces a thread owns.
template <int D, typename T, int MAXS, int QP, int KP>
__device__ void pool(const GateArgs& a, const SeqTable<MAXS>& tab) {
    constexpr int kPieceElems = 8;                 // elements per 16-byte piece
    constexpr int kHeadPieces = D / kPieceElems;
    constexpr int R = (QP + KP) <= 3 ? 2 : 1;  // rows per batch (two batches in flight)
    extern __shared__ __align__(16) float pooled_q[];  // [slice q heads][D]

    const int slices = gridDim.x;
    const int slice = blockIdx.x;
    const int q_heads = a.hq / slices, k_heads = a.hkv / slices;
    const int q_head0 = slice * q_heads, k_head0 = slice * k_heads;
    const int q_pieces = q_heads * kHeadPieces, k_pieces = k_heads * kHeadPieces;
    const int local = blockIdx.y;
    const int tid = threadIdx.x;

    if (blockIdx.z == tab.num_seqs) {
        // The extra grid row zeroes the scratch padding that the tensor-core
        // tiles of the later stages read past the last real block.
        const long long qrow = tab.total_q_blocks + local;
        if (qrow < a.q_gate_rows) {
            for (int x = tid; x < q_heads * D; x += kPoolThreads) {
                a.q_gate[(static_cast<long long>(q_head0 + x / D) * a.q_gate_rows + qrow) * D + x % D] =
                    __float2bfloat16(0.f);
            }
        }
        const long long krow = a.kblock_rows + local;
        if (krow < a.kblock_rows_padded) {
            for (int x = tid; x < k_heads * 3 * D; x += kPoolThreads) {
                a.pooled_k[(krow * a.hkv + k_head0) * (3 * D) + x] = __float2bfloat16(0.f);
            }
        }
        return;
    }
    const SeqEntry& e = tab.seq[blockIdx.z];

    // Query block `local`: tokens [lo, hi) of the chunk.
    const bool has_q = local < e.q_blocks;
    const int q_abs = e.first_q_block + local;
    const int q_lo = has_q ? max(q_abs * kBlock, e.q_start) : 0;
    const int q_count = has_q ? min(q_abs * kBlock + kBlock, e.k_len) - q_lo : 0;
    const T* qbase = static_cast<const T*>(a.q) + (e.q_off + (q_lo - e.q_start)) * a.q_row_stride +
                     static_cast<long long>(q_head0) * a.q_head_stride;
    // Key block `local` (none when K comes from K-block caches: a.k is null).
    const bool has_k = a.k != nullptr && local < e.k_blocks;
    const int k_count = has_k ? min(kBlock, e.k_len - local * kBlock) : 0;
    const T* kbase = static_cast<const T*>(a.k) + (e.k_off + static_cast<long long>(local) * kBlock) * a.k_row_stride +
                     static_cast<long long>(k_head0) * a.k_head_stride;

    // Element offset of piece p within a row of the slice (heads may be strided).
    auto q_offset = [&](int p) { return (p / kHeadPieces) * a.q_head_stride + (p % kHeadPieces) * kPieceElems; };
    auto k_offset = [&](int p) { return (p / kHeadPieces) * a.k_head_stride + (p % kHeadPieces) * kPieceElems; };

    float qsum[QP][8];
    float kmax[KP][8], kmin[KP][8], ksum[KP][8];
#pragma unroll
    for (int i = 0; i < QP; ++i)
#pragma unroll
        for (int x = 0; x < 8; ++x) qsum[i][x] = 0.f;
#pragma unroll
    for (int i = 0; i < KP; ++i)
#pragma unroll
        for (int x = 0; x < 8; ++x) {
            kmax[i][x] = -INFINITY;
            kmin[i][x] = INFINITY;
            ksum[i][x] = 0.f;
        }

    // Batches of R rows, double-buffered: the loads of batch b + 1 are in
    // flight while batch b is accumulated, so a thread never waits on memory
    // with nothing requested.
    const int rows = max(q_count, k_count);
    uint4 qraw[2][R][QP], kraw[2][R][KP];
    auto issue = [&](int t0, uint4 (&qr)[R][QP], uint4 (&kr)[R][KP]) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int i = 0; i < QP; ++i) {
                const int p = tid + i * kPoolThreads;
                qr[r][i] = (t0 + r < q_count && p < q_pieces)
                               ? *reinterpret_cast<const uint4*>(qbase + (t0 + r) * a.q_row_stride + q_offset(p))
                               : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int i = 0; i < KP; ++i) {
                const int p = tid + i * kPoolThreads;
                kr[r][i] = (t0 + r < k_count && p < k_pieces)
                               ? *reinterpret_cast<const uint4*>(kbase + (t0 + r) * a.k_row_stride + k_offset(p))
                               : make_uint4(0, 0, 0, 0);
            }
        }
    };
    auto consume = [&](int t0, const uint4 (&qr)[R][QP], const uint4 (&kr)[R][KP]) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int i = 0; i < QP; ++i) {
                const T* v = reinterpret_cast<const T*>(&qr[r][i]);
#pragma unroll
                for (int x = 0; x < 8; ++x) qsum[i][x] += to_float(v[x]);  // zero past the block
            }
            if (t0 + r < k_count) {
#pragma unroll
                for (int i = 0; i < KP; ++i) {
                    const T* v = reinterpret_cast<const T*>(&kr[r][i]);
#pragma unroll
                    for (int x = 0; x < 8; ++x) {
                        const float f = to_float(v[x]);
                        kmax[i][x] = fmaxf(kmax[i][x], f);
                        kmin[i][x] = fminf(kmin[i][x], f);
                        ksum[i][x] += f;
                    }
                }
            }
        }
    };
    if (rows > 0) issue(0, qraw[0], kraw[0]);
    for (int t0 = 0; t0 < rows; t0 += 2 * R) {
        if (t0 + R < rows) issue(t0 + R, qraw[1], kraw[1]);
        consume(t0, qraw[0], kraw[0]);
        if (t0 + R >= rows) break;
        if (t0 + 2 * R < rows) issue(t0 + 2 * R, qraw[0], kraw[0]);
        consume(t0 + R, qraw[1], kraw[1]);
    }

    if (has_k) {
#pragma unroll
        for (int i = 0; i < KP; ++i) {
            const int p = tid + i * kPoolThreads;
            if (p >= k_pieces) continue;
            const int h = p / kHeadPieces, d0 = (p % kHeadPieces) * kPieceElems;
            bf16* out = a.pooled_k + ((e.kblock_base + local) * a.hkv + k_head0 + h) * (3 * D) + d0;
            __align__(16) bf16 mx[8], mn[8], av[8];
#pragma unroll
            for (int x = 0; x < 8; ++x) {
                mx[x] = __float2bfloat16(kmax[i][x]);
                mn[x] = __float2bfloat16(kmin[i][x]);
                av[x] = __float2bfloat16(ksum[i][x] / static_cast<float>(k_count));
            }
            *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(mx);
            *reinterpret_cast<uint4*>(out + D) = *reinterpret_cast<const uint4*>(mn);
            *reinterpret_cast<uint4*>(out + 2 * D) = *reinterpret_cast<const uint4*>(av);
        }
    }
    if (!has_q) return;  // uniform over the CTA: no barrier is skipped by part of it
#pragma unroll
    for (int i = 0; i < QP; ++i) {
        const int p = tid + i * kPoolThreads;
        if (p >= q_pieces) continue;
#pragma unroll
        for (int x = 0; x < 8; ++x) pooled_q[p * kPieceElems + x] = qsum[i][x] / static_cast<float>(q_count);
    }
    __syncthreads();
    for (int w = tid; w < q_heads * (D / 2); w += kPoolThreads) {
        const int h = w / (D / 2), c = w % (D / 2);
        float x1 = pooled_q[h * D + c], x2 = pooled_q[h * D + c + D / 2];
        rope_pair(x1, x2, a.rope[static_cast<long long>(q_abs) * (D / 2) + c]);
        bf16* out = a.q_gate + (static_cast<long long>(q_head0 + h) * a.q_gate_rows + e.qblock_base + local) * D;
        out[c] = __float2bfloat16(x1);
        out[c + D / 2] = __float2bfloat16(x2);
    }
}

// K-block cache update: one CTA pools the new keys of one touched block of
// one sequence, all KV heads. The new keys of a sequence are packed like Q
// (a.k with the q_off rows of the table; k_new[i] sits at position
// q_start + i), so the touched blocks are exactly its query blocks. Thread t
// owns the 16-byte pieces t, t + 256, ... of a token row and accumulates
// them over the block's tokens in token order, starting from the cached
// partial state when the block began in an earlier chunk: the same float
// operations in the same order as the one-shot pool kernel, so a block pooled
// in pieces gives the same bits as one pooled at once. A block the chunk
// leaves unfinished writes its state back. The pooled [max|min|avg] row
// (average over every token of the block so far) goes to pooled_k row
// qblock_base + local, for the projection to write into the cache's k_gate.
template <int D, typename T, int MAXS>
__device__ void kcache_pool(const GateArgs& a, const SeqTable<MAXS>& tab) {
    constexpr int kPieceElems = 8;
    constexpr int kHeadPieces = D / kPieceElems;
    constexpr int kUnroll = 8;  // token rows in flight per thread
    const int local = blockIdx.y;
    const SeqEntry& e = tab.seq[blockIdx.z];
    if (local >= e.q_blocks) return;
    const int start = (e.first_q_block + local) * kBlock;
    const int lo = max(start, e.q_start);
    const int hi = min(start + kBlock, e.k_len);
    const int count = hi - lo;
    const T* base = static_cast<const T*>(a.k) + (e.q_off + (lo - e.q_start)) * a.k_row_stride;
    const int k_pieces = a.hkv * kHeadPieces;
    for (int p = threadIdx.x; p < k_pieces; p += kPoolThreads) {
        const int h = p / kHeadPieces, d0 = (p % kHeadPieces) * kPieceElems;
        const T* src = base + h * a.k_head_stride + d0;
        // The cached state is [hkv][3][D]; only the chunk's first block reads it.
        const float* state = e.kv_state + static_cast<long long>(h) * 3 * D + d0;
        float mx[8], mn[8], sum[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) {
            const bool cont = lo > start;
            mx[x] = cont ? state[x] : -INFINITY;
            mn[x] = cont ? state[D + x] : INFINITY;
            sum[x] = cont ? state[2 * D + x] : 0.f;
        }
        for (int t0 = 0; t0 < count; t0 += kUnroll) {
            uint4 raw[kUnroll];
#pragma unroll
            for (int r = 0; r < kUnroll; ++r) {
                raw[r] = t0 + r < count ? *reinterpret_cast<const uint4*>(src + (t0 + r) * a.k_row_stride)
                                        : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int r = 0; r < kUnroll; ++r) {
                if (t0 + r >= count) break;
                const T* v = reinterpret_cast<const T*>(&raw[r]);
#pragma unroll
                for (int x = 0; x < 8; ++x) {
                    const float f = to_float(v[x]);
                    mx[x] = fmaxf(mx[x], f);
                    mn[x] = fminf(mn[x], f);
                    sum[x] += f;
                }
            }
        }
        if (hi < start + kBlock) {
            // Staged, not written to the cache: another CTA of this launch
            // (the chunk's first block) may not have read the old state yet.
            // kcache_commit copies it over after this kernel.
            float* staged = a.state_staging + (static_cast<long long>(blockIdx.z) * a.hkv + h) * 3 * D + d0;
#pragma unroll
            for (int x = 0; x < 8; ++x) {
                staged[x] = mx[x];
                staged[D + x] = mn[x];
                staged[2 * D + x] = sum[x];
            }
        }
        bf16* out = a.pooled_k + ((e.qblock_base + local) * a.hkv + h) * (3 * D) + d0;
        __align__(16) bf16 omx[8], omn[8], oav[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) {
            omx[x] = __float2bfloat16(mx[x]);
            omn[x] = __float2bfloat16(mn[x]);
            oav[x] = __float2bfloat16(sum[x] / static_cast<float>(hi - start));
        }
        *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(omx);
        *reinterpret_cast<uint4*>(out + D) = *reinterpret_cast<const uint4*>(omn);
        *reinterpret_cast<uint4*>(out + 2 * D) = *reinterpret_cast<const uint4*>(oav);
    }
}

// After kcache_pool: the partial-block state of every sequence whose chunk
// ends inside a block (k_len not a multiple of 64) replaces the one in its
// cache. One CTA per sequence.
template <int D, int MAXS>
__device__ void kcache_commit(const GateArgs& a, const SeqTable<MAXS>& tab) {
    const SeqEntry& e = tab.seq[blockIdx.x];
    if (e.k_len % kBlock == 0) return;
    const float* staged = a.state_staging + static_cast<long long>(blockIdx.x) * a.hkv * 3 * D;
    for (int x = threadIdx.x; x < a.hkv * 3 * D; x += kPoolThreads) e.kv_state[x] = staged[x];
}

// ------------------------------------------------------------- projection --

// The K projection of one query head: k_gate = RoPE(pooled_k[kv] . W[h]),
// a [rows x 3D] . [3D x D] GEMM on mma.sync (m16n8k16, f32 accumulators)
// with the rotation in the epilogue. 1.6 GFLOP at 32k tokens (6.4 at 128k),
// W[h] 3D * D * 2 bytes (96 KB at D = 128), pooled_k 3 MB and k_gate 4 MB
// at 32k: small, so what decides the time is latency, not bandwidth (v7's
// WMMA kernel waited on a 32-wide operand chunk from L2 every 0.3 us of
// tensor work: 36 us at 32k).
//
// Each CTA stages W[h] in shared memory once (cp.async, swizzled so the
// ldmatrix.trans reads of B fragments are conflict-free) and then walks its
// share of the 64-row tiles, `per` consecutive tiles (chosen by the host so
// that the CTAs fill the GPU once). 8 warps: warp w takes rows
// 16 (w % 4) .. + 16 of the tile and columns [c0, c0 + D/4) and their RoPE
// partners [c0 + D/2, c0 + 3D/4), c0 = (w / 4) D/4, so the epilogue rotates
// (c, c + D/2) pairs in registers. A fragments come straight from global
// memory in 16-byte loads (each row piece read by the two warps of its
// rows), a third of the reduction ahead of the products that use them.
//
// CACHED (K-block cache update): the rows are the batch's touched blocks
// (pooled_k rows numbered like q_gate rows, see kcache_pool) and each goes
// to its sequence's cache, k_gate row [block][head]; rows past the last
// touched block are computed from scratch padding and dropped.
constexpr int kProjectThreads = 256;
// CTAs per SM the registers are budgeted for: two on Hopper (227 KB of
// shared memory hold two heads' weights at D = 128), one on sm_80 (164 KB
// hold one there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kProjectMinBlocks = 1;
#else
constexpr int kProjectMinBlocks = 2;
#endif

// W[h] in shared memory: row k of the [3D][D] matrix, 16-byte chunks of
// columns, chunk c of row k at c ^ f(k). The A fragments come from 16-byte
// loads (see project), so a B fragment's 8 rows are k = 8a + b + const for
// a = 0..3, b = 0..1; f(k) = 2 ((k >> 3) & 3) + (k & 1) puts those 8 rows
// in 8 different bank groups (ldmatrix without conflicts).
template <int D>
__device__ __forceinline__ uint32_t weight_offset(int k, int chunk) {
    const int f = (((k >> 3) & 3) << 1) | (k & 1);
    return static_cast<uint32_t>(k * D * 2 + ((chunk ^ f) << 4));
}

template <int D, int MAXS, bool CACHED>
__device__ void project(const GateArgs& a, const SeqTable<MAXS>& tab) {
    constexpr int kRows = 64;
    constexpr int kIn = 3 * D;
    constexpr int kChunks = kIn / 32;     // 32-wide pieces of the reduction (two k16 steps)
    constexpr int kGroup = kChunks / 3;   // pieces whose A fragments are loaded together
    constexpr int kHalfTiles = D / 32;    // n8 tiles per column half of a warp
    constexpr int kWChunks = D / 8;       // 16-byte chunks per row of W
    extern __shared__ __align__(128) unsigned char smem_w[];
    __shared__ int position_block[kRows];
    __shared__ bf16* row_out[kRows];  // where each row's k_gate goes (null: nowhere)

    const int head = blockIdx.y;
    const int kv = head / a.group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int wrow = (warp % 4) * 16;
    const int c0 = (warp / 4) * (D / 4);
    const long long tiles = CACHED ? (tab.total_q_blocks + kRows - 1) / kRows : a.kblock_rows_padded / kRows;
    const long long per = (tiles + gridDim.x - 1) / gridDim.x;
    const long long tile0 = blockIdx.x * per;
    const long long tile1 = min(tiles, tile0 + per);
    if (tile0 >= tile1) return;

    // W[h] into shared memory, all of it, once.
    const uint32_t sw = tile::smem_addr(smem_w);
    {
        const bf16* w = a.weights + static_cast<long long>(head) * kIn * D;
        for (int p = threadIdx.x; p < kIn * kWChunks; p += kProjectThreads) {
            const int k = p / kWChunks, ch = p % kWChunks;
            tile::cp_async16(sw + weight_offset<D>(k, ch), w + static_cast<long long>(k) * D + ch * 8, true);
        }
        tile::cp_async_commit();
    }

    // A of tile `tl`, pieces [p0, p0 + kGroup): this thread's 16 bytes of
    // rows g and g + 8 of the warp's 16 (elements 8t .. 8t + 7 of each
    // 32-wide piece). Whole 64-byte row segments per warp instruction; the
    // k16 steps then take the reduction in the order these loads give it
    // (k 8t + 2j, 8t + 2j + 1 as the fragment's column pair 2t + 8 (j % 2)
    // of step j / 2), and the B fragments read W's rows in the same order.
    const long long ldA = static_cast<long long>(a.hkv) * kIn;
    auto load_a = [&](uint4 (&f)[kGroup][2], long long tl, int p0) {
        const bf16* arow = a.pooled_k + (tl * kRows + wrow + g) * ldA + kv * kIn + 8 * t;
#pragma unroll
        for (int p = 0; p < kGroup; ++p) {
            f[p][0] = __ldg(reinterpret_cast<const uint4*>(arow + (p0 + p) * 32));
            f[p][1] = __ldg(reinterpret_cast<const uint4*>(arow + 8 * ldA + (p0 + p) * 32));
        }
    };
    uint4 fa[2][kGroup][2];
    load_a(fa[0], tile0, 0);

    // Where this lane's ldmatrix rows of B start, per (k16 step of a piece,
    // column half, n16 pair): row i of matrix m (lane 8m + i) is the
    // fragment's k 8 (m & 1) + i, which the A loads put at W row
    // 32 piece + 8 (i / 2) + 4 step + 2 (m & 1) + i % 2, whose swizzle
    // f is i. A piece moves every address by 64 D bytes, an immediate.
    uint32_t b_addr[2][2][kHalfTiles / 2];
    {
        const int m = lane / 8, i = lane % 8;
#pragma unroll
        for (int step = 0; step < 2; ++step)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int np = 0; np < kHalfTiles / 2; ++np) {
                    const int k = 8 * (i / 2) + 4 * step + 2 * (m & 1) + i % 2;
                    const int n = c0 + h * (D / 2) + np * 16 + (m >> 1) * 8;
                    b_addr[step][h][np] = sw + weight_offset<D>(k, n / 8);
                }
    }
    for (long long tl = tile0; tl < tile1; ++tl) {
        const long long row0 = tl * kRows;
        // The previous tile's epilogue has read position_block and row_out.
        __syncthreads();
        if (threadIdx.x < kRows) {
            // Which block of its sequence each row is (rows past the last
            // sequence are zero padding: any position rotates zero to zero).
            const long long row = row0 + threadIdx.x;
            if (CACHED) {
                const SeqEntry& e = tab.seq[seq_containing(tab, &SeqEntry::qblock_base, row)];
                const long long local = row - e.qblock_base;
                const bool real = row < tab.total_q_blocks && local < e.q_blocks;
                const int block = real ? e.first_q_block + static_cast<int>(local) : 0;
                position_block[threadIdx.x] = block;
                row_out[threadIdx.x] = real ? e.k_gate + (static_cast<long long>(block) * a.hq + head) * D : nullptr;
            } else {
                const SeqEntry& e = tab.seq[seq_containing(tab, &SeqEntry::kblock_base, row)];
                const long long local = row - e.kblock_base;
                position_block[threadIdx.x] = local < e.k_blocks ? static_cast<int>(local) : 0;
                row_out[threadIdx.x] = a.k_gate + (static_cast<long long>(head) * a.kblock_rows_padded + row) * D;
            }
        }
        tile::cp_async_wait<0>();  // W[h] (first tile only; nothing pending after)
        __syncthreads();

        float acc[2][kHalfTiles][4];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int n = 0; n < kHalfTiles; ++n) acc[h][n][0] = acc[h][n][1] = acc[h][n][2] = acc[h][n][3] = 0.f;
#pragma unroll
        for (int grp = 0; grp < 3; ++grp) {
            // The next group's fragments (after the last group, the next
            // tile's first, into the buffer the last group leaves) are in
            // flight while this group's products run.
            if (grp + 1 < 3) load_a(fa[(grp + 1) & 1], tl, (grp + 1) * kGroup);
#pragma unroll
            for (int p = 0; p < kGroup; ++p) {
                const uint4 lo = fa[grp & 1][p][0], hi = fa[grp & 1][p][1];
                const int piece = grp * kGroup + p;
#pragma unroll
                for (int step = 0; step < 2; ++step) {
                    const uint32_t af[4] = {step ? lo.z : lo.x, step ? hi.z : hi.x, step ? lo.w : lo.y,
                                            step ? hi.w : hi.y};
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
#pragma unroll
                        for (int np = 0; np < kHalfTiles / 2; ++np) {
                            // Matrices (k 0..7, n), (k 8..15, n), (k 0..7,
                            // n + 8), (k 8..15, n + 8): b0, b1 of n8 tiles
                            // 2np and 2np + 1.
                            uint32_t b[4];
                            tile::ldmatrix_x4_trans(b, b_addr[step][h][np] + piece * 64 * D);
                            tile::mma_16816<bf16>(acc[h][2 * np], af, b[0], b[1]);
                            tile::mma_16816<bf16>(acc[h][2 * np + 1], af, b[2], b[3]);
                        }
                    }
                }
            }
        }
        if (tl + 1 < tile1) load_a(fa[0], tl + 1, 0);

        // Epilogue: rotate (c, c + D/2) at each row's block-start position,
        // round to bf16, store pairs of columns. Every (cos, sin) is loaded
        // before the first store: the compiler cannot move a load of the
        // table above a store through `out`, and one L2 round trip per
        // column pair made the epilogue a third of the kernel.
        float4 cs[2][kHalfTiles];  // (cos, sin) of columns c and c + 1
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float2* rope = a.rope + static_cast<long long>(position_block[wrow + g + 8 * half]) * (D / 2);
#pragma unroll
            for (int n = 0; n < kHalfTiles; ++n)
                cs[half][n] = __ldg(reinterpret_cast<const float4*>(rope + c0 + n * 8 + 2 * t));
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            bf16* out = row_out[wrow + g + 8 * half];
            if (out == nullptr) continue;
#pragma unroll
            for (int n = 0; n < kHalfTiles; ++n) {
                const int c = c0 + n * 8 + 2 * t;
                float x1a = acc[0][n][2 * half], x2a = acc[1][n][2 * half];
                float x1b = acc[0][n][2 * half + 1], x2b = acc[1][n][2 * half + 1];
                rope_pair(x1a, x2a, make_float2(cs[half][n].x, cs[half][n].y));
                rope_pair(x1b, x2b, make_float2(cs[half][n].z, cs[half][n].w));
                *reinterpret_cast<__nv_bfloat162*>(out + c) = __floats2bfloat162_rn(x1a, x1b);
                *reinterpret_cast<__nv_bfloat162*>(out + c + D / 2) = __floats2bfloat162_rn(x2a, x2b);
            }
        }
    }
}

// -------------------------------------------------------------- selection --

// f32 -> u32 whose unsigned order is the float order (for the top-k search).
__device__ __forceinline__ unsigned order_key(float x) {
    const unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_fsum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The k-th largest key of row[0..n) (1 <= k <= n) by radix select, 8 bits a
// pass from the top, with a per-warp histogram in shared memory; also how
// many elements equal to it belong to the top k (`*ties`). Four passes over
// the row instead of a comparison sort or a 32-step bisection.
__device__ unsigned kth_largest_key(const float* row, int n, int k, unsigned* hist, int* ties) {
    const int lane = threadIdx.x % 32;
    unsigned prefix = 0, prefix_mask = 0;
    int need = k;  // how many still to find among keys matching the prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = lane; b < 256; b += 32) hist[b] = 0;
        __syncwarp();
        for (int j = lane; j < n; j += 32) {
            const unsigned key = order_key(row[j]);
            if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncwarp();
        // Lane L owns digits 255 - 8L down to 248 - 8L: lanes in order walk
        // the digits from the top. An exclusive scan over lanes finds the
        // lane, then the digit, where the running count reaches `need`.
        int own = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) own += hist[255 - 8 * lane - i];
        int before = own;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int up = __shfl_up_sync(0xffffffffu, before, o);
            if (lane >= o) before += up;
        }
        before -= own;
        int digit = -1, rest = 0;
        if (before < need && before + own >= need) {
            int acc = before;
            for (int i = 0; i < 8; ++i) {
                const int b = 255 - 8 * lane - i;
                if (acc + static_cast<int>(hist[b]) >= need) {
                    digit = b;
                    rest = need - acc;
                    break;
                }
                acc += hist[b];
            }
        }
        const unsigned owner = __ballot_sync(0xffffffffu, digit >= 0);
        const int src = __ffs(owner) - 1;
        digit = __shfl_sync(0xffffffffu, digit, src);
        need = __shfl_sync(0xffffffffu, rest, src);
        prefix |= static_cast<unsigned>(digit) << shift;
        prefix_mask |= 255u << shift;
        __syncwarp();
    }
    *ties = need;
    return prefix;
}

// One warp decides one mask row from its scaled logits `row[0..n)` and
// writes the selected blocks to the row's slots in ascending order (ballot
// compaction keeps the order). `row` may be those very slots: a chunk of 32
// logits is read (and the ballot taken) before any index of the chunk is
// written, and indices land at or before the position they were read from.
__device__ void select_row(const GateArgs& a, float* row, int n, int q_block, int k_blocks, long long mask_row,
                           long long slot, unsigned* hist) {
    const int lane = threadIdx.x % 32;
    float m = -INFINITY;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, row[j]);
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < n; j += 32) s += expf(row[j] - m);
    s = warp_fsum(s);

    const bool dense = a.last_block_dense && q_block + 2 >= k_blocks;
    int keep_top = 0;            // top-k: how many to keep
    unsigned kth = 0;            // top-k: the k-th largest key
    int ties_left = 0;           // top-k: elements equal to kth still to keep, lowest index first
    if (!dense && a.method == kMethodTopK) {
        keep_top = min(n, max(1, static_cast<int>(a.topk_ratio * static_cast<double>(k_blocks))));
        kth = kth_largest_key(row, n, keep_top, hist, &ties_left);
    }
    const float t_bf16 = __bfloat162float(__float2bfloat16(a.threshold));
    // exp(l - m) / s > t  <=>  l > m + log(t s): one compare per block
    // instead of an exponential. The exponential stays where the two forms
    // can disagree beyond rounding: upstream's bf16 comparison, and t = 0
    // (where an underflowed probability must not count as positive).
    const bool by_logit = !a.threshold_bf16 && a.threshold > 0.f;
    const float logit_cut = m + logf(a.threshold * s);

    int count = 0;
    int* out = a.indices + slot;
    for (int base = 0; base < n; base += 32) {
        const int j = base + lane;
        bool keep = false;
        bool tie = false;
        if (j < n) {
            if (dense) {
                keep = true;
            } else if (a.method == kMethodTopK) {
                const unsigned key = order_key(row[j]);
                keep = key > kth;
                tie = key == kth;
            } else if (by_logit) {
                keep = row[j] > logit_cut;
            } else {
                const float p = expf(row[j] - m) / s;
                keep = a.threshold_bf16 ? __bfloat162float(__float2bfloat16(p)) > t_bf16 : p > a.threshold;
            }
        }
        const unsigned ties = __ballot_sync(0xffffffffu, tie);
        if (tie) keep = __popc(ties & ((1u << lane) - 1u)) < ties_left;
        ties_left -= min(ties_left, __popc(ties));
        count = warp_append(out, count, keep, j, lane);
    }
    finish_row(a, mask_row, slot, out, count, q_block, lane);
}

// The logits of every causal (query block, key block) pair, scaled by
// 1 / sqrt(hidden), written as f32 into the mask's own index slots (the
// slot of row r, column j holds its logit until the select kernel replaces
// it by an index): logits[rows x n] = q_gate · k_gate^T on bf16 tensor cores.
// One CTA: 16 * RW query-block rows of one (sequence, head). Its 4 warps form
// RW row groups of 16 rows times 4 / RW column groups, each taking
// 64 * RW / 4 columns of every 64-column key tile, which is shared through
// shared memory (cp.async). RW = 4 fetches each key block once per 64 rows;
// RW = 1 makes 4x more CTAs when there are few rows to spread over the GPU.
template <int D, int MAXS, int RW>
__device__ void logits(const GateArgs& a, const SeqTable<MAXS>& tab) {
    constexpr int kRows = 16 * RW;
    constexpr int kCols = 64;
    constexpr int kColGroups = 4 / RW;
    constexpr int kWarpCols = kCols / kColGroups;  // columns of a tile per warp
    constexpr int kKLd = D + 16;
    constexpr int kSLd = kWarpCols + 4;
    __shared__ __align__(128) bf16 keys[kCols][kKLd];
    __shared__ __align__(128) float scratch[4][16][kSLd];

    const SeqEntry& e = tab.seq[blockIdx.y];
    const int head = blockIdx.z;
    const int i0 = blockIdx.x * kRows;
    if (i0 >= e.q_blocks) return;
    const int rows = min(kRows, e.q_blocks - i0);
    const int n_max = e.first_q_block + i0 + rows;  // causal columns of the tile's last row
    const int tiles = (n_max + kCols - 1) / kCols;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int rg = warp / kColGroups, cg = warp % kColGroups;
    const bool warp_active = rg * 16 < rows;

    const bf16* Q = a.q_gate + (static_cast<long long>(head) * a.q_gate_rows + e.qblock_base + i0 + rg * 16) * D;
    const bf16* K = e.k_gate + head * a.k_gate_head_stride;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fq[D / 16];
    if (warp_active) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(fq[kk], Q + kk * 16, D);
    }
    const long long head_slot = head_slot_base(e, head);

    for (int t = 0; t < tiles; ++t) {
        __syncthreads();  // everyone is done with the previous tile
        for (int p = threadIdx.x; p < kCols * D / 8; p += kThreads) {
            const int row = p / (D / 8), c = (p % (D / 8)) * 8;
            const bf16* src = K + (static_cast<long long>(t) * kCols + row) * a.k_gate_row_stride + c;
            tile::cp_async16(tile::smem_addr(&keys[row][c]), src, true);
        }
        tile::cp_async_commit();
        tile::cp_async_wait<0>();
        __syncthreads();
        if (!warp_active) continue;
#pragma unroll
        for (int nt = 0; nt < kWarpCols / 16; ++nt) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fk;
                wmma::load_matrix_sync(fk, &keys[cg * kWarpCols + nt * 16][kk * 16], kKLd);
                wmma::mma_sync(acc, fq[kk], fk, acc);
            }
            wmma::store_matrix_sync(&scratch[warp][0][nt * 16], acc, kSLd, wmma::mem_row_major);
        }
        __syncwarp();
        // Row by row, consecutive lanes write consecutive columns (coalesced);
        // only causal columns have a slot.
        for (int x = lane; x < 16 * kWarpCols; x += 32) {
            const int r = x / kWarpCols, c = x % kWarpCols;
            const int i = i0 + rg * 16 + r;
            const int j = t * kCols + cg * kWarpCols + c;
            const int q_block = e.first_q_block + i;
            if (i < e.q_blocks && j <= q_block) {
                reinterpret_cast<float*>(a.indices)[head_slot + tri(q_block) + j] = scratch[warp][r][c] * a.scale;
            }
        }
    }
}

// One warp per mask row: softmax statistics, then the threshold or top-k
// rule over the row's logits (left in its slots by the logits kernel), the
// selected blocks written over them in place. Rows of any length: nothing is
// held in shared memory but a 256-bin radix histogram per warp.
template <int MAXS>
__device__ void select_rows(const GateArgs& a, const SeqTable<MAXS>& tab) {
    __shared__ unsigned hist[kWarps][256];
    const int warp = threadIdx.x / 32;
    const long long row = static_cast<long long>(blockIdx.x) * kWarps + warp;
    if (blockIdx.x == 0 && threadIdx.x == 0) a.row_offsets[a.total_rows] = a.total_slots;
    if (row >= a.total_rows) return;
    const MaskRowAt m = mask_row_at(tab, row);
    float* logits_row = reinterpret_cast<float*>(a.indices + m.slot);
    select_row(a, logits_row, m.q_block + 1, m.q_block, m.e->k_blocks, row, m.slot, hist[warp]);
}

}  // namespace
}  // namespace seer

// ------------------------------------------------------------ entry points --
// One extern "C" symbol per (head_dim, input dtype, table capacity), so the
// host picks a kernel by name (see src/gpu/gate.rs).

#define SEER_POOL(D, T, TN, S, QP, KP)                                                             \
    extern "C" __global__ void __launch_bounds__(seer::kPoolThreads)                              \
        seer_gate_pool_d##D##_##TN##_s##S##_q##QP##_k##KP(const seer::GateArgs a,                  \
                                                          const __grid_constant__ seer::SeqTable<S> tab) { \
        seer::pool<D, T, S, QP, KP>(a, tab);                                                       \
    }
#define SEER_POOL_PIECES(D, T, TN, S)                                                              \
    SEER_POOL(D, T, TN, S, 1, 1)                                                                   \
    SEER_POOL(D, T, TN, S, 2, 1)                                                                   \
    SEER_POOL(D, T, TN, S, 4, 1)                                                                   \
    SEER_POOL(D, T, TN, S, 8, 1)                                                                   \
    SEER_POOL(D, T, TN, S, 4, 2)                                                                   \
    SEER_POOL(D, T, TN, S, 8, 2)
#define SEER_PROJECT(D, S)                                                                         \
    extern "C" __global__ void __launch_bounds__(seer::kProjectThreads, seer::kProjectMinBlocks)  \
        seer_gate_project_d##D##_s##S(const seer::GateArgs a, const __grid_constant__ seer::SeqTable<S> tab) { \
        seer::project<D, S, false>(a, tab);                                                        \
    }
#define SEER_ROPE(D)                                                                               \
    extern "C" __global__ void __launch_bounds__(seer::kThreads) seer_gate_rope_d##D(const seer::GateArgs a) { \
        seer::rope_table<D>(a);                                                                    \
    }
#define SEER_LOGITS(D, S, RW)                                                                      \
    extern "C" __global__ void __launch_bounds__(seer::kThreads)                                  \
        seer_gate_logits_d##D##_s##S##_r##RW(const seer::GateArgs a,                               \
                                             const __grid_constant__ seer::SeqTable<S> tab) {      \
        seer::logits<D, S, RW>(a, tab);                                                            \
    }
#define SEER_SELECT_ROWS(S)                                                                        \
    extern "C" __global__ void __launch_bounds__(seer::kThreads)                                  \
        seer_gate_select_s##S(const seer::GateArgs a, const __grid_constant__ seer::SeqTable<S> tab) { \
        seer::select_rows<S>(a, tab);                                                              \
    }
#define SEER_KCACHE(D, T, TN, S)                                                                   \
    extern "C" __global__ void __launch_bounds__(seer::kPoolThreads)                              \
        seer_gate_kcache_pool_d##D##_##TN##_s##S(const seer::GateArgs a,                           \
                                                 const __grid_constant__ seer::SeqTable<S> tab) {  \
        seer::kcache_pool<D, T, S>(a, tab);                                                        \
    }
#define SEER_KCACHE_COMMIT(D, S)                                                                   \
    extern "C" __global__ void __launch_bounds__(seer::kPoolThreads)                              \
        seer_gate_kcache_commit_d##D##_s##S(const seer::GateArgs a,                                \
                                            const __grid_constant__ seer::SeqTable<S> tab) {       \
        seer::kcache_commit<D, S>(a, tab);                                                         \
    }
#define SEER_KCACHE_PROJECT(D, S)                                                                  \
    extern "C" __global__ void __launch_bounds__(seer::kProjectThreads, seer::kProjectMinBlocks)  \
        seer_gate_kcache_project_d##D##_s##S(const seer::GateArgs a,                               \
                                             const __grid_constant__ seer::SeqTable<S> tab) {      \
        seer::project<D, S, true>(a, tab);                                                      \
    }
#define SEER_GATE_KERNELS(S)                                                                       \
    SEER_POOL_PIECES(64, __nv_bfloat16, bf16, S)                                                   \
    SEER_POOL_PIECES(64, __half, f16, S)                                                           \
    SEER_POOL_PIECES(128, __nv_bfloat16, bf16, S)                                                  \
    SEER_POOL_PIECES(128, __half, f16, S)                                                          \
    SEER_PROJECT(64, S)                                                                            \
    SEER_PROJECT(128, S)                                                                           \
    SEER_KCACHE(64, __nv_bfloat16, bf16, S)                                                        \
    SEER_KCACHE(64, __half, f16, S)                                                                \
    SEER_KCACHE(128, __nv_bfloat16, bf16, S)                                                       \
    SEER_KCACHE(128, __half, f16, S)                                                               \
    SEER_KCACHE_COMMIT(64, S)                                                                      \
    SEER_KCACHE_COMMIT(128, S)                                                                     \
    SEER_KCACHE_PROJECT(64, S)                                                                     \
    SEER_KCACHE_PROJECT(128, S)                                                                    \
    SEER_LOGITS(64, S, 1)                                                                          \
    SEER_LOGITS(64, S, 4)                                                                          \
    SEER_LOGITS(128, S, 1)                                                                         \
    SEER_LOGITS(128, S, 4)                                                                         \
    SEER_SELECT_ROWS(S)

SEER_ROPE(64)
SEER_ROPE(128)
SEER_GATE_KERNELS(16)
SEER_GATE_KERNELS(256)
