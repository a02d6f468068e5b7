/*
 * Shared definitions of the gate kernels (kernels/gate.cu) and the structs
 * the host passes to them by value. The layouts here are mirrored field for
 * field by #[repr(C)] structs in src/gpu/gate.rs; a size check on both
 * sides (static_assert here, a unit test there) keeps them in step.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace seer {

using bf16 = __nv_bfloat16;

// Tokens per block: the gate pools 64-token blocks.
constexpr int kBlock = 64;
// GateArgs::method values.
constexpr int kMethodThreshold = 0;
constexpr int kMethodTopK = 1;

// The K-block cache of one (layer, sequence), for chunked prefill: the K
// side of the gate for every block seen so far, so that a chunk pools only
// its new keys. One caller-owned device buffer (256-byte aligned), sized by
// kblock_cache_bytes(config, tokens) in src/gpu/gate.rs; offsets do not
// depend on its capacity:
//   [0, state_bytes)  kv_state: f32 [hkv][3][D], the running max, min and sum
//                     of the sequence's trailing partial block (only while
//                     the cached length is not a multiple of 64; its token
//                     count, cached % 64, is known on the host);
//                     state_bytes = align_up(hkv * 3 * D * 4, 256)
//   [state_bytes, ..) k_gate: bf16 [blocks][hq][D], RoPE(pooled_k . W[h]) of
//                     every block (a partial block's row is rewritten when it
//                     grows), blocks = align_up(ceil(tokens / 64), 64): the
//                     select kernels read whole 64-row tiles.
// No header lives on the device: the host knows the cached length
// (k_len - q_len) from the batch. Never needs zeroing.

// One sequence of the batch, computed on the host from cu_seqlens.
struct SeqEntry {
    long long q_off;        // packed row of the first query token
    long long k_off;        // packed row of the first key token
    long long kblock_base;  // first global key-block row (pooled_k, k_gate)
    long long qblock_base;  // first global query-block row (q_gate)
    long long row_base;     // first mask row
    long long slot_base;    // first index slot
    bf16* k_gate;           // this sequence's k_gate rows (block 0, head 0): the
                            // workspace's or its K-block cache's (see below)
    float* kv_state;        // K-block cache only: the partial block's [hkv][3][D] state
    int q_len;
    int k_len;
    int q_start;            // absolute position of the first query: k_len - q_len
    int k_blocks;           // ceil(k_len / 64)
    int first_q_block;      // q_start / 64
    int q_blocks;           // k_blocks - first_q_block
};
static_assert(sizeof(SeqEntry) == 88, "SeqEntry layout is shared with Rust");

// The batch, by value in the kernel parameters (capacity S sequences).
template <int S>
struct SeqTable {
    long long total_q_blocks;  // query-block rows over the batch (q_gate rows in use)
    int num_seqs;
    int reserved;
    SeqEntry seq[S];
};

// Everything else a gate launch needs, by value.
struct GateArgs {
    const void* q;                // pre-RoPE Q [total_q, hq, D], dim stride 1
    const void* k;                // pre-RoPE K [total_k, hkv, D], dim stride 1
    long long q_row_stride;       // elements between tokens
    long long q_head_stride;      // elements between heads
    long long k_row_stride;
    long long k_head_stride;
    bf16* q_gate;                 // scratch [hq][q_gate_rows][D]: rotated pooled Q
    bf16* pooled_k;               // scratch [kblock_rows_padded][hkv][3D]: [max|min|avg]
    bf16* k_gate;                 // scratch [hq][kblock_rows_padded][D]: rotated projected K
    float2* rope;                 // scratch [max k_blocks][D/2]: (cos, sin) at each block start
    float* state_staging;         // scratch [seqs][hkv][3][D]: partial-block states an update
                                  // writes before they replace the caches' (see kcache_commit)
    const bf16* weights;          // this layer's mask_linear_k [hq][3D][D]
    int* counts;                  // mask outputs
    int* indices;
    long long* row_offsets;
    long long q_gate_rows;        // rows per head of q_gate, padding included
    long long kblock_rows;        // real key-block rows over the batch
    long long kblock_rows_padded; // allocated key-block rows (a multiple of 64, plus 16 spare)
    long long total_rows;         // mask rows
    long long total_slots;        // mask index slots
    double topk_ratio;            // 1 - sqrt(1 - nz_ratio)
    double inv_freq[128];         // RoPE inverse frequencies, D/2 used
    int hq;
    int hkv;
    int group;                    // hq / hkv
    int method;                   // kMethodThreshold or kMethodTopK
    float threshold;
    float scale;                  // 1 / sqrt(hidden)
    int threshold_bf16;           // compare in bf16 as upstream does
    int keep_diagonal;            // empty rows keep their diagonal block
    int last_block_dense;
    int reserved;
    // How the select kernels find row j of head h in a sequence's k_gate:
    // e.k_gate + h * k_gate_head_stride + j * k_gate_row_stride (elements).
    // Workspace: [hq][kblock_rows_padded][D]; K-block cache: [blocks][hq][D].
    long long k_gate_head_stride;
    long long k_gate_row_stride;
};
static_assert(sizeof(GateArgs) == 1248, "GateArgs layout is shared with Rust");

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// n(n+1)/2: index slots of causal rows 0..n-1.
__device__ __forceinline__ long long tri(long long n) { return n * (n + 1) / 2; }

// The index slot of mask row (head, absolute query block qb) of sequence e
// is head_slot_base(e, head) + tri(qb): a head's rows follow each other,
// row qb holding qb + 1 slots (src/mask.rs).
__device__ __forceinline__ long long head_slot_base(const SeqEntry& e, int head) {
    return e.slot_base + head * (tri(e.k_blocks) - tri(e.first_q_block)) - tri(e.first_q_block);
}

// The last sequence whose `field` (kblock_base, qblock_base or row_base:
// each non-decreasing over the table) is <= value: the sequence a global
// key-block row, query-block row or mask row belongs to. Binary search.
template <int MAXS>
__device__ int seq_containing(const SeqTable<MAXS>& tab, long long SeqEntry::*field, long long value) {
    int lo = 0, hi = tab.num_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tab.seq[mid].*field <= value) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// NeoX RoPE of the pair (x1, x2) = (x[c], x[c + D/2]) by the rotation
// (cos, sin) of the rope table.
__device__ __forceinline__ void rope_pair(float& x1, float& x2, float2 cs) {
    const float a = x1, b = x2;
    x1 = a * cs.x - b * cs.y;
    x2 = b * cs.x + a * cs.y;
}

// Mask row `row` of the batch (rows of sequence e: head-major, then query
// block): its sequence, head, absolute query block and first index slot.
struct MaskRowAt {
    const SeqEntry* e;
    int head;
    int q_block;
    long long slot;
};
template <int MAXS>
__device__ __forceinline__ MaskRowAt mask_row_at(const SeqTable<MAXS>& tab, long long row) {
    MaskRowAt m;
    m.e = &tab.seq[seq_containing(tab, &SeqEntry::row_base, row)];
    const long long local = row - m.e->row_base;
    m.head = static_cast<int>(local / m.e->q_blocks);
    m.q_block = m.e->first_q_block + static_cast<int>(local % m.e->q_blocks);
    m.slot = head_slot_base(*m.e, m.head) + tri(m.q_block);
    return m;
}

// Warp-wide append to a mask row's index list: every lane whose `keep` is
// set writes `value` at out[count + (kept lanes below it)], in lane order.
// Returns the new count (the same on every lane).
__device__ __forceinline__ int warp_append(int* out, int count, bool keep, int value, int lane) {
    const unsigned kept = __ballot_sync(0xffffffffu, keep);
    if (keep) out[count + __popc(kept & ((1u << lane) - 1u))] = value;
    return count + __popc(kept);
}

// The end of a mask row written by one warp: a row that kept nothing keeps
// its diagonal block when the empty-row policy says so; then the row's
// count and first slot.
__device__ __forceinline__ void finish_row(const GateArgs& a, long long row, long long slot, int* out, int count,
                                           int q_block, int lane) {
    if (count == 0 && a.keep_diagonal) {
        if (lane == 0) out[0] = q_block;
        count = 1;
    }
    if (lane == 0) {
        a.counts[row] = count;
        a.row_offsets[row] = slot;
    }
}

}  // namespace seer
