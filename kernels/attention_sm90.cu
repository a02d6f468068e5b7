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
 * and three consumer warpgroups (512 threads, setmaxnreg 32 / 160). Three
 * independent chains of waits per SM are what moved the kernel (v22 at
 * D = 64, v23 at D = 128; kernels/NOTES.md).
 * - Warpgroup 0 produces: lane 0 of warp c takes consumer c's next work
 *   item when the consumer's Q buffer is free, hands its number over in
 *   shared memory, and brings, by TMA, its Q and K_j, V_j per listed block
 *   into the consumer's ring of kSlots tiles (4 at D = 64, 3 at D = 128),
 *   each completing on its slot's "full" mbarrier; a slot is reused once
 *   the consumer has arrived on its "empty" mbarrier. The mask decides what
 *   is fetched: skipped blocks cost nothing. Items come in the launch's
 *   head-major, longest-first order from a counter in the caller's
 *   workspace (AttnArgs::ticket), so rows of any length balance (a top-k
 *   gate's dense last rows are 20x the others at 32k); without a workspace
 *   consumer c of CTA b takes items 3b + c + k * 3 * gridDim.x.
 * - Warpgroups 1 to 3 consume, each the items its producer lane hands it. Q is
 *   S's A operand: at D = 64 from registers (read once per item, its
 *   buffer handed back after the first S), at D = 128 from shared memory
 *   (the 32 registers it would take are what a third consumer lacks; its
 *   buffer goes back after the item's last S). Per listed key block j:
 *   S_j = Q K_j^T (D / 16 wgmma m64n64k16) is issued, then
 *   O += P_{j-1} V_{j-1} (4 wgmma m64nDk16, P from registers, V from shared
 *   memory read transposed through its descriptor); the online softmax of
 *   S_j (kernels/attention_row.cuh) runs while that second product may
 *   still be on the tensor cores, and O is rescaled for block j (only when
 *   a row maximum of the warp moved) once it has landed. The consumers'
 *   softmax and matrix work interleave on the SM.
 * - Epilogue per item: O / row sum straight from the accumulators to the
 *   caller's buffer (rows that hold queries only), lse per row.
 *
 * Budget per computed 64x64 block at head_dim D: 4 * 64 * 64 * D FLOPs
 * (2.1 MFLOP at D = 128: 512 cycles of an SM's 4096 dense bf16 FLOP per
 * cycle, 989 TFLOP/s over 132 SMs), 64 * 64 exponentials (256 cycles of
 * the SM's 16 MUFU lanes, to overlap with the other consumers' wgmma), K
 * and V tiles 2 * 64 * D * 2 bytes (32 KB at D = 128) from L2: 15.6 bytes
 * per kFLOP, 7.6 TB/s at v23's 488 TFLOP/s, which ncu reads as 86% of the
 * L2's throughput. That is v23's limit at D = 128: without the K/V loads
 * the same kernel runs at 615 / 605 / 536 TFLOP/s (100 / 50 / 10%
 * density). Going further takes fewer L2 bytes per FLOP (tiles shared by
 * consumers whose rows list the same blocks); the chain-shaping changes
 * of v19-v21 did not pay (kernels/NOTES.md).
 * Per item: Q 64 * D * 2 bytes in, O 64 * D * sizeof(out) out.
 *
 * Shared memory: per consumer Q + kSlots ring tiles of [64][D] 16-bit
 * elements in TMA's 128-byte swizzle (64 KB at D = 128, 192 KB per CTA;
 * 40 KB at D = 64, 120 KB), plus 1 KB alignment slack and the mbarriers.
 *
 * Robustness: the mask is read as by the mma.sync kernels (counts, offsets
 * and indices only inside their declared lengths, indices outside the
 * causal range skipped; lists in any order); producer and consumer derive
 * the same block sequence from it. Keys past a sequence's end (only in its
 * last block, the last query block's diagonal) are masked in S, and that
 * block's P V runs on mma.sync with their V rows zeroed in the B fragments
 * (P is 0 there, but 0 * NaN from a neighbour's rows would be NaN); the
 * TMA-written ring is never written by threads.
 */
#include "attention_row.cuh"
#include "wgmma.cuh"

namespace seer::attn::sm90 {

using namespace seer::tile;

// Three consumer warpgroups per CTA at both head dims (v22 at D = 64, v23
// at D = 128: one more independent chain of waits per SM is what moved the
// kernel, kernels/NOTES.md).
constexpr int kConsumers = 3;
constexpr int kThreads = 128 * (1 + kConsumers);

// Per head dim: whether Q lives in registers (the A operand of S, read once
// per item; at D = 64 they are 16 registers a thread) or stays in shared
// memory as S's SS operand (at D = 128: the 32 registers Q would take are
// what the third consumer cannot spare), and the tiles in a consumer's ring.
template <int D>
struct Shape {
    static constexpr bool kQInRegs = D == 64;
    // Ring tiles: at D = 128 three 16 KB tiles beside Q fill what three
    // consumers can have of 227 KB (3 x 64 KB); at D = 64 four 8 KB tiles.
    static constexpr int kSlots = D == 64 ? 4 : 3;
};

// One consumer's shared memory: Q, then its ring of kSlots [64][D] tiles
// (each tile 1024-byte aligned, as TMA's 128-byte swizzle needs). Only TMA
// writes them.
template <int D>
struct Buffers {
    static constexpr int kSlots = Shape<D>::kSlots;
    static constexpr uint32_t kTile = kBlock * D * 2;
    static constexpr uint32_t kBytes = (1 + kSlots) * kTile;
    uint32_t base;
    __device__ __forceinline__ uint32_t q() const { return base; }
    __device__ __forceinline__ uint32_t slot(int i) const { return base + (1 + i) * kTile; }
};

// One consumer's mbarriers (8 bytes each): Q full/empty, then per ring slot
// full and empty; then 8 bytes holding the consumer's current work item,
// written by its producer lane before it arrives on Q full.
template <int D>
struct Barriers {
    static constexpr int kSlots = Shape<D>::kSlots;
    static constexpr uint32_t kBytes = 8 * (3 + 2 * kSlots);
    uint32_t base;
    __device__ __forceinline__ uint32_t q_full() const { return base; }
    __device__ __forceinline__ uint32_t q_empty() const { return base + 8; }
    __device__ __forceinline__ uint32_t full(int i) const { return base + 16 + 16 * i; }
    __device__ __forceinline__ uint32_t empty(int i) const { return base + 24 + 16 * i; }
    __device__ __forceinline__ uint32_t item() const { return base + 16 + 16 * kSlots; }

    __device__ __forceinline__ void init() const {
        mbar_init(q_full(), 1);
        mbar_init(q_empty(), 128);
        for (int i = 0; i < kSlots; ++i) {
            mbar_init(full(i), 1);
            mbar_init(empty(i), 128);
        }
    }
};

// Position in a ring: the n-th tile a ring carries sits in slot n % kSlots,
// and that slot's barriers are in their (n / kSlots)-th phase, whose parity
// mbarrier waits take. Counted, not divided.
template <int kSlots>
struct RingPos {
    int slot = 0;
    uint32_t parity = 0;
    // This position, and the ring moved on to the next.
    __device__ __forceinline__ RingPos take() {
        const RingPos here = *this;
        if (++slot == kSlots) {
            slot = 0;
            parity ^= 1;
        }
        return here;
    }
};

__device__ __forceinline__ unsigned total_items(const AttnArgs& a) {
    return static_cast<unsigned>(a.units) * static_cast<unsigned>(a.hq) * static_cast<unsigned>(a.splits);
}

// The work items of the launch, handed out in their order (head-major,
// longest rows first). With a ticket counter (AttnArgs::ticket, zeroed
// before the launch) each producer lane takes the next item when its
// consumer is ready for one, so a consumer that drew a long row (a gate's
// dense last rows: 512 blocks at 32k against ~26 elsewhere) takes fewer
// others; without one (no workspace) consumer c of CTA b takes items
// 3b + c, 3b + c + 3 * gridDim.x, ...
struct ItemSource {
    static constexpr unsigned kNone = 0xFFFFFFFFu;  // handed over at the end: no more items
    unsigned* ticket;
    unsigned next_static;
    unsigned stride;
    __device__ __forceinline__ ItemSource(const AttnArgs& a, int c)
        : ticket(static_cast<unsigned*>(a.ticket)), next_static(kConsumers * blockIdx.x + c),
          stride(kConsumers * gridDim.x) {}
    __device__ __forceinline__ unsigned next() {
        if (ticket != nullptr) return atomicAdd(ticket, 1u);
        const unsigned item = next_static;
        next_static += stride;
        return item;
    }
};

// Consumer c's producer lane (lane 0 of producer warp c): its Q once per
// item, then per listed block K_j and V_j through one ring, a tile's slot
// being the one freed kSlots tiles earlier. (The consumer frees them in the
// order K_j, K_{j+1}, V_j: it issues S_{j+1} before P_j V_j. Loading in that
// order instead measured the same at D = 128 and 1% slower at D = 64.)
template <int D, int S>
__device__ __forceinline__ void produce(const AttnArgs& a, const SeqTable<S>& tab, const TensorMap* map_q,
                                        const TensorMap* map_k, const TensorMap* map_v, int c, Buffers<D> buf,
                                        Barriers<D> bar) {
    uint32_t items = 0;
    RingPos<Shape<D>::kSlots> ring;
    const unsigned total = total_items(a);
    auto put = [&](const TensorMap* map, int which, const RowWork& work, int kb) {
        const auto pos = ring.take();
        mbar_wait(bar.empty(pos.slot), pos.parity ^ 1);
        tma_tile<D>(a, buf.slot(pos.slot), map, which, work.kv_head, work.key_token0(kb), bar.full(pos.slot));
    };
    ItemSource source(a, c);
    for (;;) {
        // Every item, and the end, goes to the consumer through Q's
        // barriers: the item number in shared memory, then Q full (with Q's
        // tile when the item has blocks to compute, else a plain arrival).
        // The ticket is taken only once the consumer can take the item (its
        // Q buffer is free), so no item waits behind a long one.
        mbar_wait(bar.q_empty(), (items & 1) ^ 1);
        ++items;
        unsigned item = source.next();
        if (item >= total) item = ItemSource::kNone;
        st_shared_u32(bar.item(), item);
        if (item == ItemSource::kNone) {
            mbar_arrive(bar.q_full());
            return;
        }
        const RowWork work = decode_work(a, tab, item);
        int kb = -1;
        int slot = work.mask.next(0, kb);
        if (slot >= work.mask.count) {  // nothing to fetch: the consumer writes zeros
            mbar_arrive(bar.q_full());
            continue;
        }
        tma_tile<D>(a, buf.q(), map_q, 0, work.head, work.q_token0, bar.q_full());
        for (; slot < work.mask.count; slot = work.mask.next(slot + 1, kb)) {
            put(map_k, 1, work, kb);
            put(map_v, 2, work, kb);
        }
    }
}

// The warpgroup's 64 query rows as the A operand of D / 16 k16 steps, read
// once per item from the TMA-written tile (ldmatrix, following its swizzle).
template <int D>
__device__ __forceinline__ void load_q(uint32_t (&q)[D / 16][4], uint32_t sQ, int row0, int lane) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) ldmatrix_x4(q[ks], sQ + Boxes128<D>::offset(row0 + lane % 16, ks * 2 + lane / 16));
}

// Q as S's A operand: fragments in registers (Shape::kQInRegs) or the tile
// in shared memory.
template <int D, bool kInRegs = Shape<D>::kQInRegs>
struct QOperand;
template <int D>
struct QOperand<D, true> {
    uint32_t frag[D / 16][4];
    __device__ __forceinline__ void load(uint32_t sQ, int row0, int lane) { load_q<D>(frag, sQ, row0, lane); }
};
template <int D>
struct QOperand<D, false> {
    uint64_t desc;
    __device__ __forceinline__ void load(uint32_t sQ, int, int) { desc = sw128_desc(sQ, 16, 1024); }
};

// S = Q K^T for the warpgroup's 64 rows and the 64 keys of a K tile.
template <int D, typename T>
__device__ __forceinline__ void qk(float (&s)[32], const QOperand<D>& q, uint32_t sK) {
    // The descriptor's low bits are the address / 16 (no carry out of them:
    // shared memory is below 256 KB), so steps are additions.
    const uint64_t desc = sw128_desc(sK, 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        // k16 step ks: box ks / 4 (64 columns), 32 bytes into its 128-byte
        // rows, the same offset in Q's tile and in K's.
        const uint32_t off = (ks / 4) * 64 * 128 + (ks % 4) * 32;
        if constexpr (Shape<D>::kQInRegs) wgmma_m64n64k16_rs<T, 0>(s, q.frag[ks], desc + (off >> 4), ks > 0);
        else wgmma_m64n64k16_ss<T>(s, q.desc + (off >> 4), desc + (off >> 4), ks > 0);
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

// O += P V for a sequence's partial last block (the last query block's
// diagonal, the only block with fewer than 64 keys), on mma.sync: P is 0 for its
// keys past the sequence, but their V rows may hold anything (a neighbour's
// keys, a cache's uninitialised padding) and 0 * NaN is NaN, so those rows
// are zeroed in the B fragments, in registers. The ring's tile is only
// read (zeroing it in place raced with the next TMA load of its slot, v14).
// The m64nD accumulators are mma.sync's m16n8 tiles per warp, and P's A
// fragments its m16k16 A layout, so both feed mma.sync as they are.
template <int D, typename T>
__device__ __forceinline__ void pv_tail(float (&o)[D / 8][4], const uint32_t (&p)[4][4], uint32_t sV, int rows,
                                        int lane) {
    using Tile = Boxes128<D>;
    // ldmatrix.trans gives lane 4g + t keys 2t and 2t + 1 (low, high half)
    // of column g of each 8x8 matrix: matrices 0 and 2 hold keys 0-7 of the
    // k16 step, 1 and 3 keys 8-15.
    const int key_lo = 2 * (lane % 4);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const int k0 = kk * 16 + key_lo;
        const uint32_t keep0 = (k0 < rows ? 0x0000FFFFu : 0u) | (k0 + 1 < rows ? 0xFFFF0000u : 0u);
        const uint32_t keep1 = (k0 + 8 < rows ? 0x0000FFFFu : 0u) | (k0 + 9 < rows ? 0xFFFF0000u : 0u);
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, sV + Tile::offset(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, np * 2 + lane / 16));
            mma_16816<T>(o[2 * np], p[kk], b[0] & keep0, b[1] & keep1);
            mma_16816<T>(o[2 * np + 1], p[kk], b[2] & keep0, b[3] & keep1);
        }
    }
}

// A consumer (its warpgroup's 128 threads): the items its producer lane
// hands it, their key blocks, the epilogue.
template <int D, typename T, typename O, int S>
__device__ __forceinline__ void consume(const AttnArgs& a, const SeqTable<S>& tab, Buffers<D> buf, Barriers<D> bar) {
    const int tid = threadIdx.x % 128;
    const int warp = tid / 32, lane = tid % 32;
    const int row0 = warp * 16;  // this warp's first row of the 64
    uint32_t items = 0;
    RingPos<Shape<D>::kSlots> ring;
    for (;;) {
        mbar_wait(bar.q_full(), items & 1);
        ++items;
        const unsigned item = ld_shared_u32(bar.item());
        if (item == ItemSource::kNone) return;
        const RowWork work = decode_work(a, tab, item);
        WarpRows<D, 1> w;
        w.init();
        float(&o)[D / 2] = reinterpret_cast<float(&)[D / 2]>(w.o[0]);
        int kb = -1;
        int slot = work.mask.next(0, kb);
        if (slot >= work.mask.count) {
            mbar_arrive(bar.q_empty());  // no Q came: the item number is read
        } else {
            // Software pipeline over the listed blocks: S_j = Q K_j^T is
            // issued before O += P_{j-1} V_{j-1}, and the softmax of S_j runs
            // while P_{j-1} V_{j-1} may still be on the tensor cores; O is
            // rescaled for block j only after that product has landed.
            QOperand<D> q;
            q.load(buf.q(), row0, lane);
            float s[1][8][4];
            float(&sf)[32] = reinterpret_cast<float(&)[32]>(s[0]);
            uint32_t p[4][4];
            auto kpos = ring.take();
            auto vpos = ring.take();
            mbar_wait(bar.full(kpos.slot), kpos.parity);
            qk<D, T>(sf, q, buf.slot(kpos.slot));
            int next_kb = -1;
            int next_slot = work.mask.next(slot + 1, next_kb);
            wgmma_wait<0>();
            fence_accumulators(sf);
            mbar_arrive(bar.empty(kpos.slot));
            // Q's buffer goes back once no S needs it: with Q in registers
            // after the first S has consumed them (handing it back right
            // after the ldmatrix let the next item's TMA load overwrite Q
            // under those reads, v16), else after the last S.
            if (Shape<D>::kQInRegs || next_slot >= work.mask.count) {
                fence_proxy_async();
                mbar_arrive(bar.q_empty());
            }
            {
                float corr[1][2];  // O is still zero: nothing to rescale
                softmax_scores<D, 1, 8>(s, w, a.scale_log2, kb == work.qb, row0, 0, lane, corr);
            }
            pack_p<T>(p, sf);
            while (next_slot < work.mask.count) {
                const auto prev_vpos = vpos;
                const int prev_kb = kb;
                slot = next_slot;
                kb = next_kb;
                kpos = ring.take();
                vpos = ring.take();
                mbar_wait(bar.full(kpos.slot), kpos.parity);
                qk<D, T>(sf, q, buf.slot(kpos.slot));
                mbar_wait(bar.full(prev_vpos.slot), prev_vpos.parity);
                if (work.key_rows(prev_kb) == kBlock) {
                    pv<D, T>(o, p, buf.slot(prev_vpos.slot));
                } else {
                    // The partial block before others (a list in no
                    // particular order): S_j lands first, so that no wgmma
                    // is in flight beside the mma.sync.
                    wgmma_wait<0>();
                    fence_accumulators(sf);
                    pv_tail<D, T>(w.o[0], p, buf.slot(prev_vpos.slot), work.key_rows(prev_kb), lane);
                }
                next_slot = work.mask.next(slot + 1, next_kb);
                wgmma_wait<1>();  // S_j has landed; P_{j-1} V_{j-1} may still run
                fence_accumulators(sf);
                mbar_arrive(bar.empty(kpos.slot));
                if (!Shape<D>::kQInRegs && next_slot >= work.mask.count) mbar_arrive(bar.q_empty());
                float corr[1][2];
                softmax_scores<D, 1, 8>(s, w, a.scale_log2, kb == work.qb, row0, 0, lane, corr);
                wgmma_wait<0>();
                fence_accumulators(o);
                mbar_arrive(bar.empty(prev_vpos.slot));
                // Most blocks leave every row maximum of the warp unchanged
                // (corr exactly 1): skip the D / 2 multiplies then.
                if (__any_sync(0xffffffffu, corr[0][0] != 1.f || corr[0][1] != 1.f)) rescale_o<D, 1>(w, corr);
                pack_p<T>(p, sf);
            }
            mbar_wait(bar.full(vpos.slot), vpos.parity);
            if (work.key_rows(kb) == kBlock) {
                pv<D, T>(o, p, buf.slot(vpos.slot));
                wgmma_wait<0>();
                fence_accumulators(o);
            } else {
                pv_tail<D, T>(w.o[0], p, buf.slot(vpos.slot), work.key_rows(kb), lane);
            }
            mbar_arrive(bar.empty(vpos.slot));
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

template <int D, typename T, typename O, int S>
__device__ __forceinline__ void sparse_fwd(const AttnArgs& a, const SeqTable<S>& tab, const TensorMap* map_q,
                                           const TensorMap* map_k, const TensorMap* map_v) {
    using Buf = Buffers<D>;
    using Bar = Barriers<D>;
    // Registers per thread after setmaxnreg: the producer keeps a few, the
    // consumers take the rest. setmaxnreg.inc draws on the registers the CTA
    // was launched with (65536 / threads, rounded down to 8, per thread), not
    // on the register file: asking for more hangs the consumers in the
    // allocation (v19's first run, kernels/NOTES.md). 32 * 128 + 160 * 384
    // = 65536 of 128 * 512.
    constexpr int kProducerRegs = 32;
    constexpr int kConsumerRegs = 160;
    constexpr int kLaunchRegs = (65536 / kThreads) & ~7;
    static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumers <= kLaunchRegs * kThreads,
                  "setmaxnreg.inc would wait forever");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    // TMA's 128-byte swizzle needs 1024-byte aligned tiles (the host adds
    // the slack to the dynamic shared memory size). Consumer c's buffers and
    // barriers are computed on each side of the register reallocation, not
    // before it: values live across setmaxnreg were spilled (a local load
    // per block in the consumer's loop).
    auto base = [&] { return (smem_addr(smem_raw) + 1023) & ~1023u; };
    auto buffers = [&](int c) { return Buf{base() + c * Buf::kBytes}; };
    auto barriers = [&](int c) { return Bar{base() + kConsumers * Buf::kBytes + c * Bar::kBytes}; };
    if (threadIdx.x < kConsumers) {
        barriers(threadIdx.x).init();
        fence_mbar_init();
    }
    __syncthreads();
    if (threadIdx.x < 128) {
        regs_release<kProducerRegs>();
        // Lane 0 of producer warp c feeds consumer c (warp 3 idles).
        const int c = threadIdx.x / 32;
        if (threadIdx.x % 32 == 0 && c < kConsumers) produce<D>(a, tab, map_q, map_k, map_v, c, buffers(c), barriers(c));
    } else {
        regs_claim<kConsumerRegs>();
        // Consumer c is warpgroup c + 1.
        const int c = threadIdx.x / 128 - 1;
        consume<D, T, O>(a, tab, buffers(c), barriers(c));
    }
}

}  // namespace seer::attn::sm90

// One extern "C" symbol per (head_dim, input dtype, output dtype, table
// capacity): seer_attn_fwd_wgmma_d{D}_{in}_{out}_s{S}; 512 threads,
// 3 * (1 + kSlots) * 64 * D * 2 + 1024 + 3 * 8 * (3 + 2 * kSlots) bytes of
// dynamic shared memory (src/gpu/attention.rs computes the same).
// Built for sm_90a only; the sm_80 and compute_90 (PTX) images trap, and the
// host selects these kernels only on compute capability 9.0.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SEER_IF_SM90A(...) __VA_ARGS__
#else
#define SEER_IF_SM90A(...) __trap();
#endif

#define SEER_ATTN_WGMMA(D, T, TN, O, ON, S)                                                                       \
    extern "C" __global__ void __launch_bounds__(seer::attn::sm90::kThreads, 1)                                 \
        seer_attn_fwd_wgmma_d##D##_##TN##_##ON##_s##S(                                                  \
            const __grid_constant__ seer::attn::AttnArgs a, const __grid_constant__ seer::attn::SeqTable<S> tab, \
            const __grid_constant__ seer::tile::TensorMap tq, const __grid_constant__ seer::tile::TensorMap tk,  \
            const __grid_constant__ seer::tile::TensorMap tv) {                                                   \
        SEER_IF_SM90A(seer::attn::sm90::sparse_fwd<D, T, O, S>(a, tab, &tq, &tk, &tv);)                       \
    }

#define SEER_ATTN_WGMMA_OUTS(D, T, TN, S) \
    SEER_ATTN_WGMMA(D, T, TN, T, TN, S)   \
    SEER_ATTN_WGMMA(D, T, TN, float, f32, S)

#define SEER_ATTN_WGMMA_ALL(S)                         \
    SEER_ATTN_WGMMA_OUTS(64, __nv_bfloat16, bf16, S)   \
    SEER_ATTN_WGMMA_OUTS(64, __half, f16, S)           \
    SEER_ATTN_WGMMA_OUTS(128, __nv_bfloat16, bf16, S)  \
    SEER_ATTN_WGMMA_OUTS(128, __half, f16, S)

SEER_ATTN_WGMMA_ALL(16)
SEER_ATTN_WGMMA_ALL(256)
