/*
 * The gate's distillation loss and its gradient in the K projection
 * (issue 8), sm_80 and later, for the released gate type (no Q weight):
 * what follows the gate's own pool -> project -> logits kernels
 * (kernels/gate.cu), which leave q_gate, pooled_k, the RoPE table and the
 * f32 logit of every causal (row, key block) pair in the workspace.
 *
 * Per sequence s, with kept rows the query-block rows at or after
 * floor(k_blocks * skip_fraction) and norm = hq * kept_rows * k_blocks
 * (upstream's KLDivLoss 'mean' over the kept [heads, rows, k_blocks] map):
 *   loss_s = sum over kept rows of KL(t_row || softmax(z_row)) / norm
 *   dz     = (softmax(z) * sum(t) - t) / norm            (kept rows; else 0)
 *   d(q_gate . k_gate)            = dz / sqrt(hidden)
 *   dk_gate[h, j]                 = sum_i dz[h, i, j] / sqrt(hidden) * q_gate[h, i]
 *   dk_proj[h, j]                 = R(64 j)^T dk_gate[h, j]   (RoPE is a rotation)
 *   dW[h]                        += sum_j pooled_k[j, kv(h)]^T dk_proj[h, j]
 * The derivation, link by link: docs/distillation.md; the CPU reference:
 * src/reference/distill.rs (distill_loss_and_grad).
 *
 * Kernels, in launch order (src/gpu/distill.rs):
 *   seer_distill_loss_s*   one warp per mask row: max, logsumexp, the row's
 *                          KL term, dz written over the logits in place.
 *   seer_distill_seq_loss_s*  one CTA per sequence: its rows' terms summed
 *                          in a fixed order (deterministic, no atomics).
 *   seer_distill_dk_d*_s*  one CTA per (16 key blocks, sequence, head):
 *                          dk_gate by a loop over the causal rows, then the
 *                          inverse rotation, into an f32 scratch.
 *   seer_distill_dw_d*     one CTA per (64 rows of W, head): dW += over all
 *                          key blocks of the batch, each element owned by
 *                          one thread (deterministic).
 *
 * Budget at 32k tokens, 32 heads, D = 128 (512 key blocks): 4.2 M logits
 * read and rewritten (34 MB); dk 1.1 GFLOP over q_gate rows from L2; dW
 * 1.6 GFLOP. All of it is small next to the target (kernels/distill.cu,
 * 4.4 TFLOP): these are plain f32 SIMT loops.
 */
#include "gate.cuh"

#include <math_constants.h>

namespace seer::distill_grad {

// Mirrored by src/gpu/distill.rs.
struct GradArgs {
    const float* target;  // the mask's slot layout, f32
    float* logits;        // same slots: the logits in, dz out
    float* row_loss;      // [total_rows] scratch
    float* seq_loss;      // [num_seqs] out
    float* dk;            // [hq][kblock_rows][D] f32 scratch
    float* dw;            // [hq][3D][D] f32, accumulated (+=)
    double skip_fraction;
};
static_assert(sizeof(GradArgs) == 56, "GradArgs layout is shared with Rust");

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kDkBlocks = 16;  // key blocks per dk CTA

// The sequence holding mask row `row` (rows in batch order).
template <int S>
__device__ __forceinline__ int seq_of_row(const SeqTable<S>& tab, long long row) {
    int lo = 0, hi = tab.num_seqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tab.seq[mid].row_base <= row) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// First slot of (head, i) in the sequence's part of the slot layout.
__device__ __forceinline__ long long row_slot(const SeqEntry& e, int head, int i) {
    const long long per_head = tri(e.k_blocks) - tri(e.first_q_block);
    return e.slot_base + head * per_head + tri(e.first_q_block + i) - tri(e.first_q_block);
}

// Kept rows of a sequence: local row index of the first one.
__device__ __forceinline__ int first_kept_row(const SeqEntry& e, double skip_fraction) {
    const int skip = static_cast<int>(floor(static_cast<double>(e.k_blocks) * skip_fraction));
    return min(max(skip - e.first_q_block, 0), e.q_blocks);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <int S>
__device__ void loss_rows(const GateArgs& a, const GradArgs& g, const SeqTable<S>& tab) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long row = static_cast<long long>(blockIdx.x) * kWarps + warp;
    if (row >= a.total_rows) return;
    const SeqEntry& e = tab.seq[seq_of_row(tab, row)];
    const long long local = row - e.row_base;
    const int head = static_cast<int>(local / e.q_blocks);
    const int i = static_cast<int>(local % e.q_blocks);
    const int n = e.first_q_block + i + 1;  // the row's causal key blocks
    float* z = g.logits + row_slot(e, head, i);
    const float* t = g.target + row_slot(e, head, i);
    const int kept_from = first_kept_row(e, g.skip_fraction);
    if (i < kept_from) {
        for (int j = lane; j < n; j += 32) z[j] = 0.f;
        if (lane == 0) g.row_loss[row] = 0.f;
        return;
    }
    const float norm = static_cast<float>(a.hq) * static_cast<float>(e.q_blocks - kept_from) *
                       static_cast<float>(e.k_blocks);
    float m = -CUDART_INF_F;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, z[j]);
    m = warp_max(m);
    float sum = 0.f, mass = 0.f;
    for (int j = lane; j < n; j += 32) {
        sum += __expf(z[j] - m);
        mass += t[j];
    }
    sum = warp_sum(sum);
    mass = warp_sum(mass);
    const float lse = m + __logf(sum);
    float loss = 0.f;
    for (int j = lane; j < n; j += 32) {
        const float zj = z[j], tj = t[j];
        // t ln t is 0 where t is 0 (torch's xlogy).
        if (tj > 0.f) loss += tj * (__logf(tj) - (zj - lse));
        z[j] = (__expf(zj - lse) * mass - tj) / norm;
    }
    loss = warp_sum(loss);
    if (lane == 0) g.row_loss[row] = loss / norm;
}

template <int S>
__device__ void seq_loss(const GateArgs& a, const GradArgs& g, const SeqTable<S>& tab) {
    __shared__ float part[kThreads];
    const SeqEntry& e = tab.seq[blockIdx.x];
    const long long rows = static_cast<long long>(a.hq) * e.q_blocks;
    float s = 0.f;
    for (long long r = threadIdx.x; r < rows; r += kThreads) s += g.row_loss[e.row_base + r];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) g.seq_loss[blockIdx.x] = part[0];
}

// One CTA of D threads per (16 key blocks, sequence, head); thread d owns
// column d of the 16 dk_gate rows.
template <int D, int S>
__device__ void dk_rows(const GateArgs& a, const GradArgs& g, const SeqTable<S>& tab) {
    __shared__ float acc_s[kDkBlocks][D];
    const SeqEntry& e = tab.seq[blockIdx.y];
    const int head = blockIdx.z;
    const int j0 = blockIdx.x * kDkBlocks;
    if (j0 >= e.k_blocks) return;
    const int d = threadIdx.x;
    float acc[kDkBlocks];
#pragma unroll
    for (int jj = 0; jj < kDkBlocks; ++jj) acc[jj] = 0.f;
    // Rows whose causal blocks reach j0, kept rows only (dz is 0 elsewhere).
    const int i_begin = max(j0 - e.first_q_block, first_kept_row(e, g.skip_fraction));
    const bf16* qg = a.q_gate + (static_cast<long long>(head) * a.q_gate_rows + e.qblock_base) * D + d;
    for (int i = max(i_begin, 0); i < e.q_blocks; ++i) {
        const float q = __bfloat162float(qg[static_cast<long long>(i) * D]);
        const float* dz = g.logits + row_slot(e, head, i) + j0;
        const int n = min(e.first_q_block + i + 1 - j0, kDkBlocks);  // causal blocks of the tile
#pragma unroll
        for (int jj = 0; jj < kDkBlocks; ++jj)
            if (jj < n) acc[jj] = fmaf(dz[jj], q, acc[jj]);
    }
#pragma unroll
    for (int jj = 0; jj < kDkBlocks; ++jj) acc_s[jj][d] = acc[jj] * a.scale;
    __syncthreads();
    if (d >= D / 2) return;
    for (int jj = 0; jj < kDkBlocks && j0 + jj < e.k_blocks; ++jj) {
        const int j = j0 + jj;
        // The transpose of rope_pair's rotation at the block's first token.
        const float2 cs = a.rope[static_cast<long long>(j) * (D / 2) + d];
        const float g1 = acc_s[jj][d], g2 = acc_s[jj][d + D / 2];
        float* out = g.dk + (static_cast<long long>(head) * a.kblock_rows + e.kblock_base + j) * D;
        out[d] = g1 * cs.x + g2 * cs.y;
        out[d + D / 2] = g2 * cs.x - g1 * cs.y;
    }
}

// dW[h][r][c] += sum over the batch's key blocks b of pooled_k[b][kv][r] *
// dk[h][b][c], for 64 rows r of one head per CTA of 256 threads: thread t
// owns column t % D of rows (t / D) * R .. + R.
template <int D>
__device__ void dw_tile(const GateArgs& a, const GradArgs& g) {
    constexpr int kThreadsW = 256;
    constexpr int kRowsTile = 64;
    constexpr int kGroups = kThreadsW / D;
    constexpr int R = kRowsTile / kGroups;
    constexpr int kChunk = 32;  // key blocks staged per step
    __shared__ float pk[kChunk][kRowsTile];
    __shared__ float dks[kChunk][D];
    const int head = blockIdx.y;
    const int kv = head / a.group;
    const int r0 = blockIdx.x * kRowsTile;
    const int c = threadIdx.x % D, rg = threadIdx.x / D;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    for (long long b0 = 0; b0 < a.kblock_rows; b0 += kChunk) {
        for (int x = threadIdx.x; x < kChunk * kRowsTile; x += kThreadsW) {
            const int bb = x / kRowsTile, rr = x % kRowsTile;
            const long long b = b0 + bb;
            pk[bb][rr] = b < a.kblock_rows
                             ? __bfloat162float(a.pooled_k[(b * a.hkv + kv) * 3 * D + r0 + rr])
                             : 0.f;
        }
        for (int x = threadIdx.x; x < kChunk * D; x += kThreadsW) {
            const int bb = x / D, cc = x % D;
            const long long b = b0 + bb;
            dks[bb][cc] = b < a.kblock_rows ? g.dk[(static_cast<long long>(head) * a.kblock_rows + b) * D + cc] : 0.f;
        }
        __syncthreads();
#pragma unroll 4
        for (int bb = 0; bb < kChunk; ++bb) {
            const float dkv = dks[bb][c];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] = fmaf(pk[bb][rg * R + r], dkv, acc[r]);
        }
        __syncthreads();
    }
    float* dw = g.dw + (static_cast<long long>(head) * 3 * D + r0 + rg * R) * D + c;
#pragma unroll
    for (int r = 0; r < R; ++r) dw[static_cast<long long>(r) * D] += acc[r];
}

// ------------------------------------------------------------- optimizer --

// One AdamW update of a layer's f32 master weights, as the CPU trainer's
// AdamState::update (src/distill/mod.rs) computes it: f64 arithmetic, each
// operation rounded as written (no contraction into FMA), f32 stored, so the
// two agree bit for bit given the same gradient. Also writes the bf16 copy
// the gate kernels read and zeroes the gradient for the next step.
struct AdamArgs {
    float* param;
    float* m;
    float* v;
    float* grad;
    __nv_bfloat16* weights;  // the gate's bf16 copy of param
    long long n;
    double lr, beta1, beta2, eps, weight_decay;
    double bias1;        // 1 - beta1^step
    double bias2_sqrt;   // sqrt(1 - beta2^step)
    double factor;       // loss scale / sequences * clip
};
static_assert(sizeof(AdamArgs) == 112, "AdamArgs layout is shared with Rust");

__device__ void adamw(const AdamArgs& a) {
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < a.n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const double g = __dmul_rn(static_cast<double>(a.grad[i]), a.factor);
        const double decayed = __dmul_rn(static_cast<double>(a.param[i]), __dsub_rn(1.0, __dmul_rn(a.lr, a.weight_decay)));
        const double m_new = __dadd_rn(__dmul_rn(a.beta1, static_cast<double>(a.m[i])), __dmul_rn(__dsub_rn(1.0, a.beta1), g));
        const double v_new =
            __dadd_rn(__dmul_rn(a.beta2, static_cast<double>(a.v[i])), __dmul_rn(__dmul_rn(__dsub_rn(1.0, a.beta2), g), g));
        const float m32 = static_cast<float>(m_new), v32 = static_cast<float>(v_new);
        const double denom = __dadd_rn(__ddiv_rn(__dsqrt_rn(static_cast<double>(v32)), a.bias2_sqrt), a.eps);
        const double step = __ddiv_rn(__dmul_rn(__ddiv_rn(a.lr, a.bias1), static_cast<double>(m32)), denom);
        const float p = static_cast<float>(__dsub_rn(decayed, step));
        a.m[i] = m32;
        a.v[i] = v32;
        a.param[i] = p;
        a.weights[i] = __float2bfloat16_rn(p);
        a.grad[i] = 0.f;
    }
}

// Sum of squares of n f32 values: CTA b writes its part to partial[b]
// (f64, a fixed reduction order: the host adds the parts in order).
__device__ void sum_squares(const float* x, long long n, double* partial) {
    __shared__ double part[256];
    double s = 0.0;
    for (long long i = blockIdx.x * 256LL + threadIdx.x; i < n; i += gridDim.x * 256LL) {
        const double v = x[i];
        s = fma(v, v, s);
    }
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = part[0];
}

}  // namespace seer::distill_grad

extern "C" __global__ void __launch_bounds__(256) seer_distill_adamw(const seer::distill_grad::AdamArgs a) {
    seer::distill_grad::adamw(a);
}
extern "C" __global__ void __launch_bounds__(256)
    seer_distill_sum_squares(const float* x, long long n, double* partial) {
    seer::distill_grad::sum_squares(x, n, partial);
}

#define SEER_DISTILL_GRAD_SEQ(S)                                                                              \
    extern "C" __global__ void __launch_bounds__(seer::distill_grad::kThreads)                                \
        seer_distill_loss_s##S(const seer::GateArgs a, const seer::distill_grad::GradArgs g,                  \
                               const __grid_constant__ seer::SeqTable<S> tab) {                               \
        seer::distill_grad::loss_rows<S>(a, g, tab);                                                          \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(seer::distill_grad::kThreads)                                \
        seer_distill_seq_loss_s##S(const seer::GateArgs a, const seer::distill_grad::GradArgs g,              \
                                   const __grid_constant__ seer::SeqTable<S> tab) {                           \
        seer::distill_grad::seq_loss<S>(a, g, tab);                                                           \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) seer_distill_dk_d128_s##S(                              \
        const seer::GateArgs a, const seer::distill_grad::GradArgs g,                                         \
        const __grid_constant__ seer::SeqTable<S> tab) {                                                      \
        seer::distill_grad::dk_rows<128, S>(a, g, tab);                                                       \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(64) seer_distill_dk_d64_s##S(                                \
        const seer::GateArgs a, const seer::distill_grad::GradArgs g,                                         \
        const __grid_constant__ seer::SeqTable<S> tab) {                                                      \
        seer::distill_grad::dk_rows<64, S>(a, g, tab);                                                        \
    }

SEER_DISTILL_GRAD_SEQ(16)
SEER_DISTILL_GRAD_SEQ(256)

extern "C" __global__ void __launch_bounds__(256)
    seer_distill_dw_d128(const seer::GateArgs a, const seer::distill_grad::GradArgs g) {
    seer::distill_grad::dw_tile<128>(a, g);
}
extern "C" __global__ void __launch_bounds__(256)
    seer_distill_dw_d64(const seer::GateArgs a, const seer::distill_grad::GradArgs g) {
    seer::distill_grad::dw_tile<64>(a, g);
}
