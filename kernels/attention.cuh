/*
 * The structs the host passes by value to the sparse prefill kernels
 * (kernels/attention.cu). Mirrored field for field by #[repr(C)] structs in
 * src/gpu/attention.rs; a size check on both sides keeps them in step.
 */
#pragma once

namespace seer::attn {

// Everything a launch shares. Strides are in elements; the dim stride of
// every tensor is 1 (checked on the host).
struct AttnArgs {
    const void* q;            // [total_q, hq, D]
    const void* k;            // [total_k, hkv, D]
    const void* v;            // [total_k, hkv, D]
    void* out;                // [total_q, hq, D], T or f32
    float* lse;               // [hq, total_q] or null
    long long q_row_stride, q_head_stride;
    long long k_row_stride, k_head_stride;
    long long v_row_stride, v_head_stride;
    long long o_row_stride, o_head_stride;
    long long lse_head_stride;  // total_q
    const int* counts;          // the block mask, index-list format
    const int* indices;
    const long long* row_offsets;
    long long counts_len;       // entries each array holds: the kernel reads
    long long indices_len;      // nothing outside them, whatever the mask says
    long long row_offsets_len;
    float scale_log2;           // softmax_scale * log2(e)
    int hq;
    int group;                  // hq / hkv
    int units;                  // query blocks in this launch's table (CTAs per head)
    int tma_token_major;        // TMA kernels: bit 0 q, bit 1 k, bit 2 v: the map's
                                // coordinates are (dim, token, head), else (dim, head, token)
    int splits;                 // split-KV: parts each row's key list is cut into (1: none)
    long long split_out_stride; // split-KV: elements between the parts' outputs (out is then
    long long split_lse_stride; // an f32 workspace) and between their lse arrays
    void* ticket;               // wgmma kernel: a zeroed 32-bit counter that hands out
                                // work items, or null for the static round robin
};
static_assert(sizeof(AttnArgs) == 208, "AttnArgs layout is shared with Rust");

// The split-KV combine: out[t, h] = sum_s w_s * part_s[t, h] with
// w_s = exp(lse_s - lse) and lse = log sum_s exp(lse_s).
struct CombineArgs {
    const float* parts;        // [splits][total_q][hq][D], f32
    const float* part_lse;     // [splits][hq][total_q]
    void* out;                 // [total_q, hq, D] of the output dtype
    float* lse;                // [hq, total_q] or null
    long long o_row_stride, o_head_stride;
    long long total_q;
    int hq;
    int splits;
};
static_assert(sizeof(CombineArgs) == 64, "CombineArgs layout is shared with Rust");

// One sequence of the launch. The host orders sequences longest first;
// `unit_base` numbers their query blocks in that order.
struct SeqEntry {
    long long q_off;      // packed row of the first query token
    long long k_off;      // packed row of the first key token
    long long row_base;   // first mask row (head 0, first query block)
    long long unit_base;  // first work unit (query block) of this sequence in the launch
    int q_len;
    int k_len;
    int q_start;          // absolute position of the first query: k_len - q_len
    int first_q_block;    // q_start / 64
    int q_blocks;         // ceil(k_len / 64) - first_q_block
    int reserved;
};
static_assert(sizeof(SeqEntry) == 56, "SeqEntry layout is shared with Rust");

template <int S>
struct SeqTable {
    int num_seqs;
    int reserved;
    SeqEntry seq[S];
};

}  // namespace seer::attn
