/*
 * Block-sparse causal attention forward (prefill) for Hopper (sm_90a):
 * wgmma, TMA and warp specialization. Same arguments, masks and results as
 * kernels/attention.cu (the mma.sync kernels for sm_80 and later); the CPU
 * reference is src/reference/attention.rs.
 *
 * What it computes: for every work item (kernels/attention_row.cuh: a mask
 * row of (sequence, query head, query block), or with split-KV a part of
 * one) the 64 queries of the block attend the keys of the listed key blocks,
 * causally inside the diagonal block:
 *   out[t, h] = softmax_j(scale * q_t . k_j) . v_j,  lse = ln sum_j exp(scale * q_t . k_j)
 * A row that selects no block gives zeros and lse = -inf.
 *
 * Structure: a persistent grid of one CTA per SM, one producer warpgroup
 * and C consumer warpgroups: C = 2 at D = 128 (their accumulators and Q
 * fragments fill the register file), C = 3 at D = 64 (v22: a third chain
 * of waits per SM, +14-16% there).
 * - Warpgroup 0 produces. With two consumers its warps c and c + 2 feed
 *   consumer c: one lane of each walks the consumer's work items and their
 *   key lists; the first brings Q once per item and K per listed block, the
 *   second V. With three, one lane of warp c brings consumer c's Q, K and
 *   V. All by TMA into rings of kStages K and V buffers, each completing on a
 *   "full" mbarrier; a buffer is reused once the consumer has arrived on
 *   its "empty" mbarrier. The mask decides what is fetched: skipped blocks
 *   cost nothing.
 * - Warpgroups 1 to C consume, each its own work items, round robin over
 *   the launch (item = C * blockIdx.x + c + k * C * gridDim.x, so the items
 *   in flight are neighbours in the head-major, longest-first order). Per
 *   item, Q goes from its tile into registers (the A operand of S; its
 *   buffer is handed back after the item's first S). Per listed key block j: S_j = Q K_j^T
 *   (D / 16 wgmma m64n64k16, K from shared memory) is issued, then
 *   O += P_{j-1} V_{j-1} (4 wgmma m64nDk16, P from registers, V from shared
 *   memory read transposed through its descriptor); the online softmax of
 *   S_j (kernels/attention_row.cuh) runs while that second product is still
 *   on the tensor cores, and O is rescaled for block j (only when a row
 *   maximum of the warp moved) once it has landed. The consumers' softmax
 *   and matrix work interleave on the SM.
 * - Epilogue per item: O / row sum straight from the accumulators to the
 *   caller's buffer (rows that hold queries only), lse per row.
 *
 * Budget per computed 64x64 block at head_dim D: 4 * 64 * 64 * D FLOPs
 * (2.1 MFLOP at D = 128: 512 cycles of an SM's 4096 dense bf16 FLOP per
 * cycle, 989 TFLOP/s over 132 SMs), 64 * 64 exponentials (256 cycles of
 * the SM's 16 MUFU lanes, to overlap with the other consumer's wgmma), K
 * and V tiles 2 * 64 * D * 2 bytes (32 KB at D = 128) from L2: at 450
 * TFLOP/s that is 6.9 TB/s, 74% of L2 throughput. Sharing tiles between
 * the two consumers halves that and leaves the time unchanged (v17 in
 * kernels/NOTES.md), and neither halving the waits per FLOP with 128-key
 * steps (v19), pipelining across items (v20) nor pinning the softmax
 * between the two products' waits (v21) made it faster: ncu finds the
 * consumers never waiting for K or V, their time in their own softmax
 * (~40%) and wgmma issue and waits (~45%).
 * Per item: Q 64 * D * 2 bytes in, O 64 * D * sizeof(out) out.
 *
 * Shared memory: per consumer Q + kStages K + kStages V + one tail tile of
 * [64][D] 16-bit elements in TMA's 128-byte swizzle (96 KB at D = 128 and
 * two stages, 192 KB per CTA; 48 KB at D = 64, 144 KB for three), plus 1 KB
 * alignment slack and the mbarriers.
 *
 * Robustness: the mask is read as by the mma.sync kernels (counts, offsets
 * and indices only inside their declared lengths, indices outside the
 * causal range skipped); producer and consumer derive the same block
 * sequence from it. Keys past a sequence's end (only in its last, diagonal
 * block) are masked in S, and P V reads a copy of that block's V with
 * their rows zeroed (P is 0 there, but 0 * NaN from a neighbour's rows
 * would be NaN).
 */
#include "attention_row.cuh"
#include "wgmma.cuh"

namespace seer::attn::sm90 {

using namespace seer::tile;

// Consumer warpgroups per CTA: two at D = 128 (their registers fill the
// file), three at D = 64 (half the accumulators and Q fragments, half the
// shared memory per consumer: v22, +14-16% over two).
template <int D>
constexpr int kConsumersFor = D == 64 ? 3 : 2;
template <int D>
constexpr int kThreadsFor = 128 * (1 + kConsumersFor<D>);

// One consumer's shared memory: Q, then the K ring, then the V ring, then
// the tail tile (each tile 1024-byte aligned, as TMA's 128-byte swizzle
// needs). Only TMA writes Q, K and V; only the consumer's threads write the
// tail tile (see v_tail).
template <int D, int kStages>
struct Buffers {
    static constexpr uint32_t kTile = kBlock * D * 2;
    static constexpr uint32_t kBytes = (2 + 2 * kStages) * kTile;
    uint32_t base;
    __device__ __forceinline__ uint32_t q() const { return base; }
    __device__ __forceinline__ uint32_t k(int st) const { return base + (1 + st) * kTile; }
    __device__ __forceinline__ uint32_t v(int st) const { return base + (1 + kStages + st) * kTile; }
    __device__ __forceinline__ uint32_t tail() const { return base + (1 + 2 * kStages) * kTile; }
};

// One consumer's mbarriers (8 bytes each): Q full/empty, then per stage K
// full, K empty, V full, V empty.
template <int kStages>
struct Barriers {
    static constexpr uint32_t kBytes = 8 * (2 + 4 * kStages);
    uint32_t base;
    __device__ __forceinline__ uint32_t q_full() const { return base; }
    __device__ __forceinline__ uint32_t q_empty() const { return base + 8; }
    __device__ __forceinline__ uint32_t k_full(int st) const { return base + 16 + 32 * st; }
    __device__ __forceinline__ uint32_t k_empty(int st) const { return base + 24 + 32 * st; }
    __device__ __forceinline__ uint32_t v_full(int st) const { return base + 32 + 32 * st; }
    __device__ __forceinline__ uint32_t v_empty(int st) const { return base + 40 + 32 * st; }

    __device__ __forceinline__ void init() const {
        mbar_init(q_full(), 1);
        mbar_init(q_empty(), 128);
        for (int st = 0; st < kStages; ++st) {
            mbar_init(k_full(st), 1);
            mbar_init(k_empty(st), 128);
            mbar_init(v_full(st), 1);
            mbar_init(v_empty(st), 128);
        }
    }
};

// Position in a ring: the n-th tile a pipeline carries sits in stage
// n % kStages, and that stage's barriers are in their (n / kStages)-th
// phase, whose parity mbarrier waits take. Counted, not divided.
template <int kStages>
struct RingPos {
    int stage = 0;
    uint32_t parity = 0;
    __device__ __forceinline__ void advance() {
        if (++stage == kStages) {
            stage = 0;
            parity ^= 1;
        }
    }
};

__device__ __forceinline__ unsigned total_items(const AttnArgs& a) {
    return static_cast<unsigned>(a.units) * static_cast<unsigned>(a.hq) * static_cast<unsigned>(a.splits);
}

// A producer lane of consumer c, in exactly the order the consumer takes
// them: with `keys`, Q per item and K per listed block; with `values`, V per
// listed block. With two consumers each has two lanes (of two warps), one
// for each, so that a K load never waits behind the release of a V buffer:
// the consumer frees K_j right after S_j but V_j only after P_j V_j, a
// softmax later. With three (D = 64) one lane per consumer does both, in
// the order K_j, V_j.
template <int D, int kStages, int S>
__device__ __forceinline__ void produce(const AttnArgs& a, const SeqTable<S>& tab, const TensorMap* map_q,
                                        const TensorMap* map_k, const TensorMap* map_v, int c, bool keys, bool values,
                                        Buffers<D, kStages> buf, Barriers<kStages> bar) {
    constexpr int C = kConsumersFor<D>;
    uint32_t items = 0;
    RingPos<kStages> pos;
    const unsigned total = total_items(a);
    for (unsigned item = C * blockIdx.x + c; item < total; item += C * gridDim.x) {
        const RowWork work = decode_work(a, tab, item);
        int kb = -1;
        int slot = work.mask.next(0, kb);
        if (slot >= work.mask.count) continue;  // nothing to fetch: the consumer writes zeros
        if (keys) {
            // The consumer has the previous item's Q in registers.
            mbar_wait(bar.q_empty(), (items & 1) ^ 1);
            tma_tile<D>(a, buf.q(), map_q, 0, work.head, work.q_token0, bar.q_full());
            ++items;
        }
        while (slot < work.mask.count) {
            const long long token0 = work.key_token0(kb);
            if (keys) {
                mbar_wait(bar.k_empty(pos.stage), pos.parity ^ 1);
                tma_tile<D>(a, buf.k(pos.stage), map_k, 1, work.kv_head, token0, bar.k_full(pos.stage));
            }
            if (values) {
                mbar_wait(bar.v_empty(pos.stage), pos.parity ^ 1);
                tma_tile<D>(a, buf.v(pos.stage), map_v, 2, work.kv_head, token0, bar.v_full(pos.stage));
            }
            slot = work.mask.next(slot + 1, kb);
            pos.advance();
        }
    }
}

// The warpgroup's 64 query rows as the A operand of D / 16 k16 steps, read
// once per item from the TMA-written tile (ldmatrix, following its swizzle):
// S then reads only K from shared memory (Q from shared memory too reads
// 4 KB per m64n64k16, all of the 128 bytes a cycle shared memory serves).
template <int D>
__device__ __forceinline__ void load_q(uint32_t (&q)[D / 16][4], uint32_t sQ, int row0, int lane) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) ldmatrix_x4(q[ks], sQ + Boxes128<D>::offset(row0 + lane % 16, ks * 2 + lane / 16));
}

// S = Q K^T for the warpgroup's 64 rows and the 64 keys of a K tile.
template <int D, typename T>
__device__ __forceinline__ void qk(float (&s)[32], const uint32_t (&q)[D / 16][4], uint32_t sK) {
    // The descriptor's low bits are the address / 16 (no carry out of them:
    // shared memory is below 256 KB), so steps are additions.
    const uint64_t desc = sw128_desc(sK, 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        // k16 step ks: box ks / 4 (64 columns), 32 bytes into its 128-byte rows.
        const uint32_t off = (ks / 4) * 64 * 128 + (ks % 4) * 32;
        wgmma_m64n64k16_rs<T, 0>(s, q[ks], desc + (off >> 4), ks > 0);
    }
    wgmma_commit();
}

// P (64 rows x 64 keys) as the A operand of four k16 steps: the S
// accumulators, rounded to 16 bits, in place.
template <typename T>
__device__ __forceinline__ void pack_p(uint32_t (&p)[4][4], const float (&s)[32]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) p[kk][r] = pack2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
}

// O += P V: four k16 steps of 16 keys (2048 bytes of V rows each).
template <int D, typename T>
__device__ __forceinline__ void pv(float (&o)[D / 2], const uint32_t (&p)[4][4], uint32_t sV) {
    const uint64_t desc = sw128_desc(sV, 64 * 128, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const uint64_t step = desc + ((kk * 16 * 128) >> 4);
        if constexpr (D == 128) wgmma_m64n128k16_rs<T, 1>(o, p[kk], step, 1);
        else wgmma_m64n64k16_rs<T, 1>(o, p[kk], step, 1);
    }
    wgmma_commit();
}

// Keys past the sequence (its last block only): P is 0 there, but their V
// rows may hold anything (a neighbour's keys, a cache's uninitialised
// padding) and 0 * NaN is NaN. The block's V is copied into the tail tile
// with those rows zeroed, and P V reads the copy; the ring buffer itself is
// never written by threads (zeroing it in place raced with the next TMA
// load of the same stage: a later tile sometimes kept zero rows). The copy
// is made visible to wgmma (async proxy) by each writer's proxy fence and
// the warpgroup's named barrier. Returns the tile P V must read.
template <int D>
__device__ __forceinline__ uint32_t v_tail(uint32_t sV, uint32_t sTail, int rows, int tid, int c) {
    using Tile = Boxes128<D>;
    const auto* src = static_cast<const unsigned char*>(__cvta_shared_to_generic(sV));
    auto* dst = static_cast<unsigned char*>(__cvta_shared_to_generic(sTail));
    for (int idx = tid; idx < kBlock * Tile::kChunks; idx += 128) {
        const int r = idx / Tile::kChunks, ch = idx % Tile::kChunks;
        const uint32_t off = Tile::offset(r, ch);
        *reinterpret_cast<uint4*>(dst + off) = r < rows ? *reinterpret_cast<const uint4*>(src + off) : make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
    named_sync(1 + c, 128);
    return sTail;
}

// Consumer c (its warpgroup's 128 threads): the items, their key blocks, the
// epilogue.
template <int D, int kStages, typename T, typename O, int S>
__device__ __forceinline__ void consume(const AttnArgs& a, const SeqTable<S>& tab, int c, Buffers<D, kStages> buf,
                                        Barriers<kStages> bar) {
    const int tid = threadIdx.x % 128;
    const int warp = tid / 32, lane = tid % 32;
    const int row0 = warp * 16;  // this warp's first row of the 64
    uint32_t items = 0;
    RingPos<kStages> pos;
    const unsigned total = total_items(a);
    constexpr int C = kConsumersFor<D>;
    for (unsigned item = C * blockIdx.x + c; item < total; item += C * gridDim.x) {
        const RowWork work = decode_work(a, tab, item);
        WarpRows<D, 1> w;
        w.init();
        float(&o)[D / 2] = reinterpret_cast<float(&)[D / 2]>(w.o[0]);
        int kb = -1;
        int slot = work.mask.next(0, kb);
        if (slot < work.mask.count) {
            // Software pipeline over the listed blocks: S_j = Q K_j^T is
            // issued before O += P_{j-1} V_{j-1}, and the softmax of S_j runs
            // while P_{j-1} V_{j-1} is still on the tensor cores; O is
            // rescaled for block j only after that product has landed.
            mbar_wait(bar.q_full(), items & 1);
            ++items;
            uint32_t q[D / 16][4];
            load_q<D>(q, buf.q(), row0, lane);
            float s[1][8][4];
            float(&sf)[32] = reinterpret_cast<float(&)[32]>(s[0]);
            uint32_t p[4][4];
            mbar_wait(bar.k_full(pos.stage), pos.parity);
            qk<D, T>(sf, q, buf.k(pos.stage));
            int next_kb = -1;
            int next_slot = work.mask.next(slot + 1, next_kb);
            wgmma_wait<0>();
            fence_accumulators(sf);
            mbar_arrive(bar.k_empty(pos.stage));
            // Q's buffer goes back only now: the first S has consumed the
            // registers load_q filled, so those shared-memory reads are
            // done. Handing it back right after the ldmatrix let the next
            // item's TMA load overwrite Q under them now and then (seen as
            // bit differences between graph replays, once the producer ran
            // further ahead).
            fence_proxy_async();
            mbar_arrive(bar.q_empty());
            {
                float corr[1][2];  // O is still zero: nothing to rescale
                softmax_scores<D, 1, 8>(s, w, a.scale_log2, kb == work.qb, row0, 0, lane, corr);
            }
            pack_p<T>(p, sf);
            while (next_slot < work.mask.count) {
                const RingPos<kStages> prev = pos;
                const int prev_kb = kb;
                slot = next_slot;
                kb = next_kb;
                pos.advance();
                mbar_wait(bar.k_full(pos.stage), pos.parity);
                qk<D, T>(sf, q, buf.k(pos.stage));
                mbar_wait(bar.v_full(prev.stage), prev.parity);
                uint32_t sV = buf.v(prev.stage);
                if (work.key_rows(prev_kb) < kBlock) sV = v_tail<D>(sV, buf.tail(), work.key_rows(prev_kb), tid, c);
                pv<D, T>(o, p, sV);
                next_slot = work.mask.next(slot + 1, next_kb);
                wgmma_wait<1>();  // S_j has landed; P_{j-1} V_{j-1} may still run
                fence_accumulators(sf);
                mbar_arrive(bar.k_empty(pos.stage));
                float corr[1][2];
                softmax_scores<D, 1, 8>(s, w, a.scale_log2, kb == work.qb, row0, 0, lane, corr);
                wgmma_wait<0>();
                fence_accumulators(o);
                mbar_arrive(bar.v_empty(prev.stage));
                // Most blocks leave every row maximum of the warp unchanged
                // (corr exactly 1): skip the D / 2 multiplies then.
                if (__any_sync(0xffffffffu, corr[0][0] != 1.f || corr[0][1] != 1.f)) rescale_o<D, 1>(w, corr);
                pack_p<T>(p, sf);
            }
            mbar_wait(bar.v_full(pos.stage), pos.parity);
            uint32_t sV = buf.v(pos.stage);
            if (work.key_rows(kb) < kBlock) sV = v_tail<D>(sV, buf.tail(), work.key_rows(kb), tid, c);
            pv<D, T>(o, p, sV);
            wgmma_wait<0>();
            fence_accumulators(o);
            mbar_arrive(bar.v_empty(pos.stage));
            pos.advance();
        }

        // ---- epilogue: row sums (the quad's shares), O / sum to the
        // caller's rows that hold queries, lse.
        O* out = static_cast<O*>(a.out) + work.split * a.split_out_stride + work.head * a.o_head_stride;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            w.row_sum[0][h] += __shfl_xor_sync(0xffffffffu, w.row_sum[0][h], 1);
            w.row_sum[0][h] += __shfl_xor_sync(0xffffffffu, w.row_sum[0][h], 2);
            const int r = row0 + lane / 4 + 8 * h;
            if (r < work.r_begin || r >= work.r_end) continue;
            const float sum = w.row_sum[0][h];
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            O* dst = out + (work.q_token0 + r) * a.o_row_stride + 2 * (lane % 4);
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                store2<O>(reinterpret_cast<unsigned char*>(dst + n * 8), w.o[0][n][2 * h] * inv,
                          w.o[0][n][2 * h + 1] * inv);
            if (a.lse != nullptr && lane % 4 == 0) {
                constexpr float kLn2 = 0.693147180559945309f;
                const float lse = sum > 0.f ? (w.row_max[0][h] * a.scale_log2 + log2f(sum)) * kLn2 : -CUDART_INF_F;
                a.lse[work.split * a.split_lse_stride + work.head * a.lse_head_stride + work.q_token0 + r] = lse;
            }
        }
    }
}

template <int D, int kStages, typename T, typename O, int S>
__device__ __forceinline__ void sparse_fwd(const AttnArgs& a, const SeqTable<S>& tab, const TensorMap* map_q,
                                           const TensorMap* map_k, const TensorMap* map_v) {
    using Buf = Buffers<D, kStages>;
    using Bar = Barriers<kStages>;
    // Registers per thread after setmaxnreg: the producer keeps a few, the
    // consumers take the rest. setmaxnreg.inc draws on the registers the CTA
    // was launched with (65536 / threads, rounded down to 8, per thread), not
    // on the register file: asking for more hangs the consumers in the
    // allocation (v19's first run, kernels/NOTES.md).
    constexpr int C = kConsumersFor<D>;
    constexpr int kThreads = kThreadsFor<D>;
    // Two consumers: 48 * 128 + 224 * 256 = 63488 of 168 * 384. Three: 32 *
    // 128 + 160 * 384 = 65536 of 128 * 512.
    constexpr int kProducerRegs = C == 2 ? 48 : 32;
    constexpr int kConsumerRegs = C == 2 ? 224 : 160;
    constexpr int kLaunchRegs = (65536 / kThreads) & ~7;
    static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * C <= kLaunchRegs * kThreads,
                  "setmaxnreg.inc would wait forever");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    // TMA's 128-byte swizzle needs 1024-byte aligned tiles (the host adds
    // the slack to the dynamic shared memory size).
    const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
    const int wg = threadIdx.x / 128;
    const int pw = (threadIdx.x / 32) % 4;  // producer warp
    // Two consumers: producer warps 0 and 1 bring Q and K for consumers 0
    // and 1, warps 2 and 3 their V. Three: warp c brings consumer c's Q, K
    // and V (warp 3 idles).
    const int c = wg == 0 ? (C == 2 ? pw % 2 : (pw < C ? pw : 0)) : wg - 1;
    const Buf buf{base + c * Buf::kBytes};
    const Bar bar{base + C * Buf::kBytes + c * Bar::kBytes};
    if (threadIdx.x < C) {
        Bar{base + C * Buf::kBytes + threadIdx.x * Bar::kBytes}.init();
        fence_mbar_init();
    }
    __syncthreads();
    if (wg == 0) {
        regs_release<kProducerRegs>();
        if (threadIdx.x % 32 == 0 && pw < (C == 2 ? 4 : C)) {
            const bool keys = C == 2 ? pw < 2 : true;
            const bool values = C == 2 ? pw >= 2 : true;
            produce<D, kStages>(a, tab, map_q, map_k, map_v, c, keys, values, buf, bar);
        }
    } else {
        regs_claim<kConsumerRegs>();
        consume<D, kStages, T, O>(a, tab, c, buf, bar);
    }
}

}  // namespace seer::attn::sm90

// One extern "C" symbol per (head_dim, input dtype, output dtype, table
// capacity): seer_attn_fwd_wgmma_k{kStages}_d{D}_{in}_{out}_s{S}; 128 * (1 + C)
// threads, C * (2 + 2 * kStages) * 64 * D * 2 + 1024 + C * 8 * (2 + 4 * kStages)
// bytes of dynamic shared memory (src/gpu/attention.rs computes the same).
// Built for sm_90a only; the sm_80 and compute_90 (PTX) images trap, and the
// host selects these kernels only on compute capability 9.0.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SEER_IF_SM90A(...) __VA_ARGS__
#else
#define SEER_IF_SM90A(...) __trap();
#endif

#define SEER_ATTN_WGMMA(KS, D, T, TN, O, ON, S)                                                                  \
    extern "C" __global__ void __launch_bounds__(seer::attn::sm90::kThreadsFor<D>, 1)                           \
        seer_attn_fwd_wgmma_k##KS##_d##D##_##TN##_##ON##_s##S(                                                  \
            const __grid_constant__ seer::attn::AttnArgs a, const __grid_constant__ seer::attn::SeqTable<S> tab, \
            const __grid_constant__ seer::tile::TensorMap tq, const __grid_constant__ seer::tile::TensorMap tk,  \
            const __grid_constant__ seer::tile::TensorMap tv) {                                                   \
        SEER_IF_SM90A(seer::attn::sm90::sparse_fwd<D, KS, T, O, S>(a, tab, &tq, &tk, &tv);)                       \
    }

#define SEER_ATTN_WGMMA_OUTS(KS, D, T, TN, S) \
    SEER_ATTN_WGMMA(KS, D, T, TN, T, TN, S)   \
    SEER_ATTN_WGMMA(KS, D, T, TN, float, f32, S)

#define SEER_ATTN_WGMMA_ALL(KS, S)                         \
    SEER_ATTN_WGMMA_OUTS(KS, 64, __nv_bfloat16, bf16, S)   \
    SEER_ATTN_WGMMA_OUTS(KS, 64, __half, f16, S)           \
    SEER_ATTN_WGMMA_OUTS(KS, 128, __nv_bfloat16, bf16, S)  \
    SEER_ATTN_WGMMA_OUTS(KS, 128, __half, f16, S)

SEER_ATTN_WGMMA_ALL(2, 16)
SEER_ATTN_WGMMA_ALL(2, 256)
