/*
 * Test of the seerattn_ggml shim against ggml itself.
 *
 *   test_shim <gate_dir>            the CPU path (host pointers; runs in CI)
 *   test_shim <gate_dir> --cuda     the same cases on the GPU (a build with
 *                                   -DSEER_GGML_TEST_CUDA; the GPU machine)
 *
 * Every case builds its tensors with ggml as llama.cpp's graph does: F32
 * pre-RoPE Q and K (Qcur, Kcur after the reshape), ggml_rope_ext (NeoX) on
 * them, a KV cache tensor [head_dim * n_head_kv, kv_size] in F16 or BF16
 * holding the roped K and random V in its first n_kv_valid cells and large
 * finite garbage (60000) in the cells after them, the K/V views of
 * llama_kv_cache::get_k/get_v over n_kv_pad cells permuted as in
 * build_attn_mha, Q permuted the same way, and a causal F16 KQ mask with
 * -inf past the valid cells. ggml_flash_attn_ext computes on ggml's CPU
 * backend; the shim reads the same tensors (a second FLASH_ATTN_EXT node
 * over the same sources is its output).
 *
 * Checks, per case (the relative error is ||a - b|| / ||b|| per query head,
 * the worst head reported):
 *  1. every block selected: the shim against ggml_flash_attn_ext with the
 *     causal mask (within tol_ggml, below), and against a double-precision
 *     oracle of the same function (TOL_ORACLE);
 *  2. a sparse mask: the gate's where the gate's geometry fits the case
 *     (top-k, computed by the shim from the F32 pre-RoPE tensors, and equal,
 *     row for row, to the mask the library computes from packed copies of
 *     the same values rounded to bf16), else a random block map keeping the
 *     diagonal; the shim's attention over it equal, bit for bit, to the
 *     library's CPU reference called on packed copies (q rounded to K's
 *     type, the valid cells of K and V), within TOL_ORACLE of the oracle
 *     with that mask, and within tol_ggml of ggml_flash_attn_ext given the
 *     same sparsity as -inf in its KQ mask;
 *  3. refusals (once): a quantized KV cache, ALiBi, a node that is not
 *     flash attention, n_kv_valid out of range, an empty mask: statuses
 *     with messages.
 * With --cuda the case's buffers are copied to device memory (the views
 * keep their byte strides and offsets) and:
 *  4. every block: the shim on the GPU (F32 q rounded on the device)
 *     against the shim on the CPU (TOL_GPU) and against ggml (TOL_GPU +
 *     tol_ggml);
 *  5. the sparse mask: where the gate fits, the gate on the GPU from the
 *     F32 tensors, its mask rows equal to the CPU gate's for at least 90% of
 *     the rows (the GPU pools and projects in bf16, the reference in f32:
 *     near ties may flip; on these inputs, perturbing every input by up to
 *     0.8% on the CPU changed no row, five trials per case); attention over the GPU's mask (or the random one)
 *     against the CPU path over the same mask (TOL_GPU); for a chunk after
 *     cached tokens, the gate's mask through a K-block cache (filled by a
 *     first ubatch of the earlier keys) equal to the one-shot GPU mask.
 *
 * Tolerances. TOL_ORACLE = 1e-4: the library's CPU path accumulates in f32
 * over at most a few hundred keys (observed below 1e-6). tol_ggml: ggml
 * differs from seerattn by rounding, not by function. seerattn rounds Q to
 * K's type (as ggml-cuda does); ggml's CPU backend keeps Q in f32 on its
 * tiled path (n_tokens >= 64) and accumulates in f32 there and for BF16 V:
 * 1e-3 (observed up to 1.3e-4); on its one-row path (n_tokens < 64) with F16
 * V it rounds Q to F16 and accumulates V in F16, 2^-11 relative per key:
 * 1e-2 (observed 3.9e-3 over 637 keys). TOL_GPU = 1e-2, the library's own
 * GPU tolerance (tests/gpu_attention.rs: P rounded to 16 bits for P·V).
 *
 * Prints one line per check and "N passed, M failed"; exits 0 when all
 * pass, 1 otherwise, 2 when --cuda finds no GPU.
 */
#include "seerattn_ggml.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef SEER_GGML_TEST_CUDA
#include <cuda_runtime.h>
#endif

#define TOL_ORACLE 1e-4
#define TOL_GGML_F32_ACC 1e-3
#define TOL_GGML_F16_ACC 1e-2
#define TOL_GPU 1e-2
#define GARBAGE 60000.0f

typedef struct {
    const char *name;
    int n_head, n_head_kv, d;
    int n_past, n_tokens, n_kv_pad;
    enum ggml_type kv_type;
} Case;

static int passed, failed;

/* ggml's CPU flash attention accumulates V in F16 on its one-row path
 * (n_tokens < GGML_FA_TILE_Q = 64) when V is F16, else in f32. */
static double tol_ggml(const Case *c) {
    return c->n_tokens < 64 && c->kv_type == GGML_TYPE_F16 ? TOL_GGML_F16_ACC : TOL_GGML_F32_ACC;
}

static void report(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s  ", ok ? "PASS" : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    if (ok) passed++; else failed++;
}

/* A failing call ends the program: later checks would read garbage. */
#define SHIM(call)                                                                                  \
    do {                                                                                            \
        SeerStatus st_ = (call);                                                                    \
        if (st_ != SEER_OK) {                                                                       \
            fprintf(stderr, "%s:%d: %s: %s: %s\n", __FILE__, __LINE__, #call, seer_status_name(st_), \
                    seer_ggml_last_error());                                                        \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)
#define SEER(call)                                                                                  \
    do {                                                                                            \
        SeerStatus st_ = (call);                                                                    \
        if (st_ != SEER_OK) {                                                                       \
            fprintf(stderr, "%s:%d: %s: %s: %s\n", __FILE__, __LINE__, #call, seer_status_name(st_), \
                    seer_last_error_message());                                                     \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float uniform(void) { /* [-1, 1) */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (float)((rng * 2685821657736338717ull) >> 40) / (float)(1u << 23) - 1.0f;
}


/* Everything one case builds. */
typedef struct {
    Case c;
    int n_kv_valid, kv_size;
    struct ggml_context *ctx;
    struct ggml_tensor *q_nope, *k_nope; /* F32 [d, hq, n_tokens], [d, hkv, n_kv_valid] */
    struct ggml_tensor *qcur;            /* roped q_nope */
    struct ggml_tensor *kcache, *vcache; /* [d * hkv, kv_size] */
    struct ggml_tensor *q, *k, *v;       /* the flash-attention views */
    float scale;
} Setup;

static float cache_value(const Setup *s, const struct ggml_tensor *cache, int64_t cell, int64_t h, int64_t x) {
    const char *p = (const char *)cache->data + cell * cache->nb[1] + (h * s->c.d + x) * ggml_type_size(cache->type);
    if (cache->type == GGML_TYPE_F16) return ggml_fp16_to_fp32(*(const ggml_fp16_t *)p);
    return ggml_bf16_to_fp32(*(const ggml_bf16_t *)p);
}

static void set_cache(struct ggml_tensor *cache, int64_t cell, const float *row, int64_t n) {
    void *p = (char *)cache->data + cell * cache->nb[1];
    if (cache->type == GGML_TYPE_F16) ggml_fp32_to_fp16_row(row, p, n);
    else ggml_fp32_to_bf16_row_ref(row, p, n);
}

/* x rounded to K's type, as seerattn and ggml-cuda round Q. */
static float round_to(enum ggml_type t, float x) {
    return t == GGML_TYPE_F16 ? ggml_fp16_to_fp32(ggml_fp32_to_fp16(x)) : ggml_bf16_to_fp32(ggml_fp32_to_bf16(x));
}

static float get3(const struct ggml_tensor *t, int64_t i0, int64_t i1, int64_t i2) {
    return *(const float *)((const char *)t->data + i0 * t->nb[0] + i1 * t->nb[1] + i2 * t->nb[2]);
}

/* Values with per-(64-token block, head) structure, so that the gate's
 * pooled features differ between blocks and its masks are not uniform. */
static void fill_structured(struct ggml_tensor *t, int64_t first_pos) {
    const int64_t d = t->ne[0], heads = t->ne[1], tokens = t->ne[2];
    for (int64_t i = 0; i < tokens; i++) {
        const int64_t block = (first_pos + i) / 64;
        for (int64_t h = 0; h < heads; h++) {
            for (int64_t x = 0; x < d; x++) {
                const float mean = sinf(0.7f * (float)(block * 31 + h * 7 + x));
                *(float *)((char *)t->data + i * t->nb[2] + h * t->nb[1] + x * t->nb[0]) = mean + 0.8f * uniform();
            }
        }
    }
}

static void setup(Setup *s, const Case *c) {
    memset(s, 0, sizeof *s);
    s->c = *c;
    s->n_kv_valid = c->n_past + c->n_tokens;
    s->kv_size = c->n_kv_pad + 64;
    s->scale = 1.0f / sqrtf((float)c->d);
    struct ggml_init_params ip = {.mem_size = (size_t)256 << 20, .mem_buffer = NULL, .no_alloc = false};
    s->ctx = ggml_init(ip);
    const int d = c->d, hq = c->n_head, hkv = c->n_head_kv;
    s->q_nope = ggml_new_tensor_3d(s->ctx, GGML_TYPE_F32, d, hq, c->n_tokens);
    s->k_nope = ggml_new_tensor_3d(s->ctx, GGML_TYPE_F32, d, hkv, s->n_kv_valid);
    fill_structured(s->q_nope, c->n_past);
    fill_structured(s->k_nope, 0);
    struct ggml_tensor *pos_q = ggml_new_tensor_1d(s->ctx, GGML_TYPE_I32, c->n_tokens);
    struct ggml_tensor *pos_k = ggml_new_tensor_1d(s->ctx, GGML_TYPE_I32, s->n_kv_valid);
    for (int i = 0; i < c->n_tokens; i++) ((int32_t *)pos_q->data)[i] = c->n_past + i;
    for (int i = 0; i < s->n_kv_valid; i++) ((int32_t *)pos_k->data)[i] = i;
    s->qcur = ggml_rope_ext(s->ctx, s->q_nope, pos_q, NULL, d, GGML_ROPE_TYPE_NEOX, 0, 10000.0f, 1.0f, 0.0f, 1.0f,
                            32.0f, 1.0f);
    struct ggml_tensor *kcur = ggml_rope_ext(s->ctx, s->k_nope, pos_k, NULL, d, GGML_ROPE_TYPE_NEOX, 0, 10000.0f,
                                             1.0f, 0.0f, 1.0f, 32.0f, 1.0f);
    struct ggml_cgraph *gf = ggml_new_graph(s->ctx);
    ggml_build_forward_expand(gf, s->qcur);
    ggml_build_forward_expand(gf, kcur);
    if (ggml_graph_compute_with_ctx(s->ctx, gf, 2) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "rope graph failed\n");
        exit(1);
    }
    /* The KV cache, as llama_kv_cache holds it: one row of d * hkv per cell. */
    s->kcache = ggml_new_tensor_2d(s->ctx, c->kv_type, (int64_t)d * hkv, s->kv_size);
    s->vcache = ggml_new_tensor_2d(s->ctx, c->kv_type, (int64_t)d * hkv, s->kv_size);
    float *row = malloc((size_t)d * hkv * sizeof *row);
    for (int cell = 0; cell < s->kv_size; cell++) {
        for (int i = 0; i < d * hkv; i++) {
            row[i] = cell < s->n_kv_valid ? get3(kcur, i % d, i / d, cell) : GARBAGE;
        }
        set_cache(s->kcache, cell, row, (int64_t)d * hkv);
        for (int i = 0; i < d * hkv; i++) row[i] = cell < s->n_kv_valid ? uniform() : GARBAGE;
        set_cache(s->vcache, cell, row, (int64_t)d * hkv);
    }
    free(row);
    /* llama_kv_cache::get_k / get_v (v not transposed), then build_attn_mha's permutes. */
    const size_t es = ggml_type_size(c->kv_type);
    struct ggml_tensor *kview = ggml_view_4d(s->ctx, s->kcache, d, hkv, c->n_kv_pad, 1, es * d, es * d * hkv,
                                             es * d * hkv * s->kv_size, 0);
    struct ggml_tensor *vview = ggml_view_4d(s->ctx, s->vcache, d, hkv, c->n_kv_pad, 1, es * d, es * d * hkv,
                                             es * d * hkv * s->kv_size, 0);
    s->q = ggml_permute(s->ctx, s->qcur, 0, 2, 1, 3);
    s->k = ggml_permute(s->ctx, kview, 0, 2, 1, 3);
    s->v = ggml_permute(s->ctx, vview, 0, 2, 1, 3);
}

/* ggml_flash_attn_ext with the KQ mask llama.cpp builds (causal, -inf past
 * the valid cells) and, where `dense` is given, -inf in the blocks it does
 * not select ([hq][q_blocks][k_blocks] of the sequence's block rows). Writes
 * the result into `out` (n_tokens * hq * d floats, ggml's dst order). */
static void ggml_attention(Setup *s, const uint8_t *dense, float *out) {
    const Case *c = &s->c;
    struct ggml_tensor *kq_mask = ggml_new_tensor_4d(s->ctx, GGML_TYPE_F16, c->n_kv_pad, c->n_tokens, dense ? c->n_head : 1, 1);
    const int first_qb = c->n_past / 64, k_blocks = (s->n_kv_valid + 63) / 64, q_blocks = (s->n_kv_valid - 1) / 64 - first_qb + 1;
    for (int h = 0; h < kq_mask->ne[2]; h++) {
        for (int i = 0; i < c->n_tokens; i++) {
            ggml_fp16_t *m = (ggml_fp16_t *)((char *)kq_mask->data + i * kq_mask->nb[1] + h * kq_mask->nb[2]);
            const int pos = c->n_past + i;
            for (int j = 0; j < c->n_kv_pad; j++) {
                int visible = j < s->n_kv_valid && j <= pos;
                if (visible && dense) visible = dense[((size_t)h * q_blocks + (pos / 64 - first_qb)) * k_blocks + j / 64];
                m[j] = ggml_fp32_to_fp16(visible ? 0.0f : -INFINITY);
            }
        }
    }
    struct ggml_tensor *fa = ggml_flash_attn_ext(s->ctx, s->q, s->k, s->v, kq_mask, s->scale, 0.0f, 0.0f);
    ggml_prec_set_acc(fa, GGML_PREC_F32);
    struct ggml_cgraph *gf = ggml_new_graph(s->ctx);
    ggml_build_forward_expand(gf, fa);
    if (ggml_graph_compute_with_ctx(s->ctx, gf, 2) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "flash attention graph failed\n");
        exit(1);
    }
    memcpy(out, fa->data, ggml_nbytes(fa));
}

/* A FLASH_ATTN_EXT node over the case's q, k, v (no KQ mask), for the shim
 * to write into; ggml never computes it. */
static struct ggml_tensor *shim_node(Setup *s) {
    struct ggml_tensor *fa = ggml_flash_attn_ext(s->ctx, s->q, s->k, s->v, NULL, s->scale, 0.0f, 0.0f);
    ggml_prec_set_acc(fa, GGML_PREC_F32);
    for (int64_t i = 0; i < ggml_nelements(fa); i++) ((float *)fa->data)[i] = NAN;
    return fa;
}

/* Host mask arrays of one ubatch. */
typedef struct {
    SeerMaskSizes sizes;
    int32_t *counts, *indices;
    int64_t *offsets;
} HostMask;

static void mask_alloc(HostMask *m, const Setup *s) {
    memset(m, 0, sizeof *m);
    SHIM(seer_ggml_mask_sizes(s->c.n_head, s->c.n_tokens, s->n_kv_valid, &m->sizes));
    m->counts = calloc(m->sizes.rows, 4);
    m->indices = calloc(m->sizes.indices_len, 4);
    m->offsets = calloc(m->sizes.row_offsets_len, 8);
}

static SeerBlockMask mask_desc(HostMask *m) {
    SeerBlockMask b = {m->counts, m->sizes.rows, m->indices, m->sizes.indices_len, m->offsets,
                       m->sizes.row_offsets_len, SEER_DEVICE_CPU};
    return b;
}

static void mask_free(HostMask *m) {
    free(m->counts);
    free(m->indices);
    free(m->offsets);
}

static SeerBatch one_seq(const Setup *s, int32_t cu[4]) {
    cu[0] = 0, cu[1] = s->c.n_tokens, cu[2] = 0, cu[3] = s->n_kv_valid;
    SeerBatch b = {1, cu, cu + 2};
    return b;
}

/* The dense u8 map of a mask ([hq][q_blocks][k_blocks]). */
static uint8_t *to_dense(const Setup *s, HostMask *m) {
    int32_t cu[4];
    SeerBatch b = one_seq(s, cu);
    uint8_t *dense = malloc(m->sizes.dense_bytes);
    SeerBlockMask desc = mask_desc(m);
    SEER(seer_mask_to_dense(&b, (uint32_t)s->c.n_head, 64, &desc, dense, m->sizes.dense_bytes));
    return dense;
}

static int rows_equal(const HostMask *a, const HostMask *b, size_t r) {
    if (a->counts[r] != b->counts[r]) return 0;
    return memcmp(a->indices + a->offsets[r], b->indices + b->offsets[r], (size_t)a->counts[r] * 4) == 0;
}

/* Double-precision attention of the case's data (q rounded to K's type, the
 * cache's K and V) under `dense` (NULL: every block), in ggml's dst order. */
static void oracle(const Setup *s, const uint8_t *dense, float *out) {
    const Case *c = &s->c;
    const int d = c->d, group = c->n_head / c->n_head_kv;
    const int first_qb = c->n_past / 64, k_blocks = (s->n_kv_valid + 63) / 64,
              q_blocks = (s->n_kv_valid - 1) / 64 - first_qb + 1;
    double *w = malloc((size_t)s->n_kv_valid * sizeof *w);
    double *acc = malloc((size_t)d * sizeof *acc);
    for (int i = 0; i < c->n_tokens; i++) {
        const int pos = c->n_past + i;
        for (int h = 0; h < c->n_head; h++) {
            const int hk = h / group;
            double mx = -INFINITY;
            for (int j = 0; j <= pos; j++) {
                w[j] = -INFINITY;
                if (dense && !dense[((size_t)h * q_blocks + (pos / 64 - first_qb)) * k_blocks + j / 64]) continue;
                double dot = 0;
                for (int x = 0; x < d; x++) {
                    dot += (double)round_to(c->kv_type, get3(s->qcur, x, h, i)) * cache_value(s, s->kcache, j, hk, x);
                }
                w[j] = dot * s->scale;
                if (w[j] > mx) mx = w[j];
            }
            double sum = 0;
            for (int x = 0; x < d; x++) acc[x] = 0;
            for (int j = 0; j <= pos && mx > -INFINITY; j++) {
                if (w[j] == -INFINITY) continue;
                const double p = exp(w[j] - mx);
                sum += p;
                for (int x = 0; x < d; x++) acc[x] += p * cache_value(s, s->vcache, j, hk, x);
            }
            for (int x = 0; x < d; x++) out[((size_t)i * c->n_head + h) * d + x] = sum > 0 ? (float)(acc[x] / sum) : 0.0f;
        }
    }
    free(w);
    free(acc);
}

/* Worst per-head relative error ||a - b|| / ||b|| (dst order [tokens][heads][d]); NaN anywhere is infinite. */
static double rel_error(const Setup *s, const float *a, const float *b) {
    const Case *c = &s->c;
    double worst = 0;
    for (int h = 0; h < c->n_head; h++) {
        double num = 0, den = 0;
        for (int i = 0; i < c->n_tokens; i++) {
            for (int x = 0; x < c->d; x++) {
                const size_t at = ((size_t)i * c->n_head + h) * c->d + x;
                if (!isfinite(a[at]) || !isfinite(b[at])) return INFINITY;
                num += ((double)a[at] - b[at]) * ((double)a[at] - b[at]);
                den += (double)b[at] * b[at];
            }
        }
        const double rel = sqrt(num / (den > 0 ? den : 1));
        if (rel > worst) worst = rel;
    }
    return worst;
}

static const SeerGgmlParams CPU = {SEER_DEVICE_CPU, NULL, NULL, 0};

/* Packed [tokens, heads, d] copies, for the library called without the shim. */
static uint16_t *packed_16(const struct ggml_tensor *t, int tokens_dim, int64_t tokens, enum ggml_type to) {
    const int heads_dim = 3 - tokens_dim;
    const int64_t heads = t->ne[heads_dim], d = t->ne[0];
    uint16_t *p = malloc((size_t)(tokens * heads * d) * 2);
    for (int64_t i = 0; i < tokens; i++) {
        for (int64_t h = 0; h < heads; h++) {
            for (int64_t x = 0; x < d; x++) {
                const char *src = (const char *)t->data + i * t->nb[tokens_dim] + h * t->nb[heads_dim] + x * t->nb[0];
                float v;
                if (t->type == GGML_TYPE_F32) v = *(const float *)src;
                else if (t->type == GGML_TYPE_F16) v = ggml_fp16_to_fp32(*(const ggml_fp16_t *)src);
                else v = ggml_bf16_to_fp32(*(const ggml_bf16_t *)src);
                const size_t at = (size_t)((i * heads + h) * d + x);
                p[at] = to == GGML_TYPE_F16 ? ggml_fp32_to_fp16(v) : ggml_fp32_to_bf16(v).bits;
            }
        }
    }
    return p;
}

static SeerTensor packed_desc(void *data, enum ggml_type t, int64_t tokens, int64_t heads, int64_t d) {
    SeerTensor x = {data, t == GGML_TYPE_F16 ? SEER_DTYPE_F16 : SEER_DTYPE_BF16, SEER_DEVICE_CPU,
                    {tokens, heads, d}, {heads * d, d, 1}};
    return x;
}

#ifdef SEER_GGML_TEST_CUDA
#define CUDA(call)                                                                                 \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* Device copies of a case's buffers, and twins of its tensors whose data
 * points into them (same ne, nb, op and op params). */
typedef struct {
    void *q_nope, *k_nope, *qcur, *kcache, *vcache;
    struct ggml_tensor t_q_nope, t_k_nope, t_q, t_k, t_v, t_out;
    void *out;
} DevSetup;

static void *dev_copy(const struct ggml_tensor *t) {
    void *p = NULL;
    CUDA(cudaMalloc(&p, ggml_nbytes(t)));
    CUDA(cudaMemcpy(p, t->data, ggml_nbytes(t), cudaMemcpyHostToDevice));
    return p;
}

/* `t` (a view of `base`) with its data moved to `dbase`. */
static struct ggml_tensor twin(const struct ggml_tensor *t, const struct ggml_tensor *base, void *dbase) {
    struct ggml_tensor x = *t;
    x.data = (char *)dbase + ((const char *)t->data - (const char *)base->data);
    return x;
}

static void dev_setup(DevSetup *g, Setup *s, const struct ggml_tensor *node) {
    g->q_nope = dev_copy(s->q_nope);
    g->k_nope = dev_copy(s->k_nope);
    g->qcur = dev_copy(s->qcur);
    g->kcache = dev_copy(s->kcache);
    g->vcache = dev_copy(s->vcache);
    CUDA(cudaMalloc(&g->out, ggml_nbytes(node)));
    CUDA(cudaMemset(g->out, 0xFF, ggml_nbytes(node)));
    g->t_q_nope = twin(s->q_nope, s->q_nope, g->q_nope);
    g->t_k_nope = twin(s->k_nope, s->k_nope, g->k_nope);
    g->t_q = twin(s->q, s->qcur, g->qcur);
    g->t_k = twin(s->k, s->kcache, g->kcache);
    g->t_v = twin(s->v, s->vcache, g->vcache);
    g->t_out = twin(node, node, g->out);
    g->t_out.src[0] = &g->t_q;
    g->t_out.src[1] = &g->t_k;
    g->t_out.src[2] = &g->t_v;
}

static void dev_free(DevSetup *g) {
    CUDA(cudaFree(g->q_nope));
    CUDA(cudaFree(g->k_nope));
    CUDA(cudaFree(g->qcur));
    CUDA(cudaFree(g->kcache));
    CUDA(cudaFree(g->vcache));
    CUDA(cudaFree(g->out));
}

typedef struct {
    int32_t *counts, *indices;
    int64_t *offsets;
    SeerBlockMask desc;
} DevMask;

static void dev_mask(DevMask *m, const HostMask *h, int copy) {
    CUDA(cudaMalloc((void **)&m->counts, h->sizes.rows * 4));
    CUDA(cudaMalloc((void **)&m->indices, h->sizes.indices_len * 4));
    CUDA(cudaMalloc((void **)&m->offsets, h->sizes.row_offsets_len * 8));
    if (copy) {
        CUDA(cudaMemcpy(m->counts, h->counts, h->sizes.rows * 4, cudaMemcpyHostToDevice));
        CUDA(cudaMemcpy(m->indices, h->indices, h->sizes.indices_len * 4, cudaMemcpyHostToDevice));
        CUDA(cudaMemcpy(m->offsets, h->offsets, h->sizes.row_offsets_len * 8, cudaMemcpyHostToDevice));
    }
    SeerBlockMask d = {m->counts, h->sizes.rows, m->indices, h->sizes.indices_len, m->offsets,
                       h->sizes.row_offsets_len, SEER_DEVICE_CUDA};
    m->desc = d;
}

static void dev_mask_read(HostMask *h, const DevMask *m) {
    CUDA(cudaMemcpy(h->counts, m->counts, h->sizes.rows * 4, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(h->indices, m->indices, h->sizes.indices_len * 4, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(h->offsets, m->offsets, h->sizes.row_offsets_len * 8, cudaMemcpyDeviceToHost));
}

static void dev_mask_free(DevMask *m) {
    CUDA(cudaFree(m->counts));
    CUDA(cudaFree(m->indices));
    CUDA(cudaFree(m->offsets));
}

static void *dev_workspace(size_t bytes) {
    void *p = NULL;
    CUDA(cudaMalloc(&p, bytes ? bytes : 256));
    return p;
}

/* The GPU checks of one case (3 and 4 above). `dense_all` is the
 * every-block mask; `sparse` the CPU path's sparse mask (the CPU gate's
 * when `gate` is given, else a random one, which the GPU then uses as is). */
static void run_cuda(Setup *s, const SeerGate *gate, const SeerMaskParams *mp, HostMask *dense_all, HostMask *sparse,
                     const float *ggml_dense, const float *shim_dense) {
    const Case *c = &s->c;
    struct ggml_tensor *node = shim_node(s);
    DevSetup g;
    dev_setup(&g, s, node);
    cudaStream_t stream;
    CUDA(cudaStreamCreate(&stream));
    const size_t out_floats = (size_t)c->n_tokens * c->n_head * c->d;
    float *out = malloc(out_floats * 4), *cpu_out = malloc(out_floats * 4);
    size_t ws_bytes = 0;
    SHIM(seer_ggml_flash_attn_workspace_size(&g.t_q, &g.t_k, s->n_kv_valid, SEER_DEVICE_CUDA, &ws_bytes));
    void *ws = dev_workspace(ws_bytes);
    const SeerGgmlParams ap = {SEER_DEVICE_CUDA, stream, ws, ws_bytes};

    /* 3. Every block selected (F32 q rounded on the device, F32 output). */
    DevMask dm;
    dev_mask(&dm, dense_all, 1);
    SHIM(seer_ggml_flash_attn_ext(&g.t_out, s->n_kv_valid, &dm.desc, &ap));
    CUDA(cudaStreamSynchronize(stream));
    CUDA(cudaMemcpy(out, g.out, out_floats * 4, cudaMemcpyDeviceToHost));
    double e = rel_error(s, out, shim_dense);
    report(e <= TOL_GPU, "%s: GPU, every block: vs the CPU path, rel. error %.2e (<= %.0e)", c->name, e, TOL_GPU);
    e = rel_error(s, out, ggml_dense);
    report(e <= TOL_GPU + tol_ggml(c), "%s: GPU, every block: vs ggml_flash_attn_ext, rel. error %.2e (<= %.0e + %.0e)",
           c->name, e, TOL_GPU, tol_ggml(c));
    dev_mask_free(&dm);

    /* 4. A sparse mask: the GPU gate's, or the random one. */
    HostMask used;
    mask_alloc(&used, s);
    DevMask sm;
    void *gws = NULL;
    size_t gws_bytes = 0;
    if (gate != NULL) {
        SHIM(seer_ggml_gate_workspace_size(gate, &g.t_q_nope, s->n_kv_valid, SEER_DEVICE_CUDA, &gws_bytes));
        gws = dev_workspace(gws_bytes);
        const SeerGgmlParams gp = {SEER_DEVICE_CUDA, stream, gws, gws_bytes};
        dev_mask(&sm, sparse, 0);
        SHIM(seer_ggml_gate_mask(gate, mp, &g.t_q_nope, &g.t_k_nope, s->n_kv_valid, 0, &sm.desc, &gp));
        CUDA(cudaStreamSynchronize(stream));
        dev_mask_read(&used, &sm);
        size_t same = 0;
        for (size_t r = 0; r < used.sizes.rows; r++) same += rows_equal(&used, sparse, r);
        report(same * 10 >= used.sizes.rows * 9, "%s: GPU gate from F32 tensors: %zu of %zu mask rows equal the CPU "
               "gate's (>= 90%%)", c->name, same, used.sizes.rows);
    } else {
        dev_mask(&sm, sparse, 1);
        dev_mask_read(&used, &sm);
    }
    SHIM(seer_ggml_flash_attn_ext(&g.t_out, s->n_kv_valid, &sm.desc, &ap));
    CUDA(cudaStreamSynchronize(stream));
    CUDA(cudaMemcpy(out, g.out, out_floats * 4, cudaMemcpyDeviceToHost));
    struct ggml_tensor *cpu_node = shim_node(s);
    SeerBlockMask hm = mask_desc(&used);
    SHIM(seer_ggml_flash_attn_ext(cpu_node, s->n_kv_valid, &hm, &CPU));
    memcpy(cpu_out, cpu_node->data, out_floats * 4);
    e = rel_error(s, out, cpu_out);
    report(e <= TOL_GPU, "%s: GPU, %s mask: vs the CPU path on that mask, rel. error %.2e (<= %.0e)", c->name,
           gate != NULL ? "the GPU gate's" : "a random", e, TOL_GPU);

    if (gate != NULL && c->n_past > 0) {
        /* The K-block cache: a first ubatch of the n_past earlier keys
         * pooled into it without a mask (seer_ggml_kblock_cache_update, what
         * a dense ubatch does), then this ubatch's gate through it; the
         * workspace sized for the larger of the two ubatches. */
        size_t cache_bytes = 0;
        SEER(seer_kblock_cache_size(gate, (uint64_t)s->n_kv_valid, &cache_bytes));
        void *cache = dev_workspace(cache_bytes);
        struct ggml_tensor *k_first = ggml_view_3d(s->ctx, s->k_nope, c->d, c->n_head_kv, c->n_past,
                                                   s->k_nope->nb[1], s->k_nope->nb[2], 0);
        struct ggml_tensor *k_new = ggml_view_3d(s->ctx, s->k_nope, c->d, c->n_head_kv, c->n_tokens,
                                                 s->k_nope->nb[1], s->k_nope->nb[2],
                                                 (size_t)c->n_past * s->k_nope->nb[2]);
        struct ggml_tensor t_k_first = twin(k_first, s->k_nope, g.k_nope);
        struct ggml_tensor t_k_new = twin(k_new, s->k_nope, g.k_nope);
        size_t first_bytes = 0;
        SHIM(seer_ggml_gate_workspace_size(gate, &t_k_first, c->n_past, SEER_DEVICE_CUDA, &first_bytes));
        const size_t cws_bytes = first_bytes > gws_bytes ? first_bytes : gws_bytes;
        void *cws = dev_workspace(cws_bytes);
        const SeerGgmlParams cp = {SEER_DEVICE_CUDA, stream, cws, cws_bytes};
        DevMask cm;
        dev_mask(&cm, sparse, 0);
        SHIM(seer_ggml_kblock_cache_update(gate, mp->layer, &t_k_first, c->n_past, (uint64_t)(uintptr_t)cache, &cp));
        SHIM(seer_ggml_gate_mask(gate, mp, &g.t_q_nope, &t_k_new, s->n_kv_valid, (uint64_t)(uintptr_t)cache,
                                 &cm.desc, &cp));
        CUDA(cudaStreamSynchronize(stream));
        HostMask cached;
        mask_alloc(&cached, s);
        dev_mask_read(&cached, &cm);
        size_t eq = 0;
        for (size_t r = 0; r < cached.sizes.rows; r++) eq += rows_equal(&cached, &used, r);
        report(eq == cached.sizes.rows, "%s: GPU gate through a K-block cache: %zu of %zu rows equal the one-shot "
               "GPU mask", c->name, eq, cached.sizes.rows);
        mask_free(&cached);
        dev_mask_free(&cm);
        CUDA(cudaFree(cache));
        CUDA(cudaFree(cws));
    }
    if (gws != NULL) CUDA(cudaFree(gws));
    dev_mask_free(&sm);
    mask_free(&used);
    CUDA(cudaFree(ws));
    free(out);
    free(cpu_out);
    CUDA(cudaStreamDestroy(stream));
    dev_free(&g);
}
#endif

static void run_case(const Case *c, const SeerGate *gate, int cuda) {
    Setup s;
    setup(&s, c);
    const size_t out_floats = (size_t)c->n_tokens * c->n_head * c->d;
    float *ggml_out = malloc(out_floats * 4), *want = malloc(out_floats * 4);
    float *ggml_dense = malloc(out_floats * 4), *shim_dense = malloc(out_floats * 4);
    int32_t cu[4];
    SeerBatch batch = one_seq(&s, cu);

    /* 1. Every block selected. */
    HostMask all;
    mask_alloc(&all, &s);
    uint8_t *ones = malloc(all.sizes.dense_bytes);
    memset(ones, 1, all.sizes.dense_bytes);
    SeerBlockMask all_desc = mask_desc(&all);
    SEER(seer_mask_from_dense(&batch, (uint32_t)c->n_head, 64, ones, all.sizes.dense_bytes, &all_desc));
    free(ones);
    ggml_attention(&s, NULL, ggml_dense);
    struct ggml_tensor *node = shim_node(&s);
    SHIM(seer_ggml_flash_attn_ext(node, s.n_kv_valid, &all_desc, &CPU));
    memcpy(shim_dense, node->data, out_floats * 4);
    double e = rel_error(&s, shim_dense, ggml_dense);
    report(e <= tol_ggml(c), "%s: every block: vs ggml_flash_attn_ext, rel. error %.2e (<= %.0e)", c->name, e,
           tol_ggml(c));
    oracle(&s, NULL, want);
    e = rel_error(&s, shim_dense, want);
    report(e <= TOL_ORACLE, "%s: every block: vs the f64 oracle, rel. error %.2e (<= %.0e)", c->name, e, TOL_ORACLE);

    /* 2. A sparse mask: the gate's where the gate's geometry fits the case,
     * else a random block map keeping each row's diagonal block. */
    HostMask gm;
    mask_alloc(&gm, &s);
    SeerBlockMask gd = mask_desc(&gm);
    SeerMaskParams mp;
    memset(&mp, 0, sizeof mp);
    const char *source = gate != NULL ? "the gate's" : "a random";
    if (gate != NULL) {
        SEER(seer_mask_params_default(gate, &mp));
        mp.layer = 1;
        mp.sparsity_method = SEER_SPARSITY_NZ_RATIO; /* top-k: a sparse mask whatever the scores */
        mp.nz_ratio = 0.3f;
        mp.last_block_dense = 0;
        SHIM(seer_ggml_gate_mask(gate, &mp, s.q_nope, s.k_nope, s.n_kv_valid, 0, &gd, &CPU));
        /* The library on packed bf16 copies. */
        uint16_t *qb = packed_16(s.q_nope, 2, c->n_tokens, GGML_TYPE_BF16);
        uint16_t *kb = packed_16(s.k_nope, 2, s.n_kv_valid, GGML_TYPE_BF16);
        SeerTensor tqb = packed_desc(qb, GGML_TYPE_BF16, c->n_tokens, c->n_head, c->d);
        SeerTensor tkb = packed_desc(kb, GGML_TYPE_BF16, s.n_kv_valid, c->n_head_kv, c->d);
        HostMask lib;
        mask_alloc(&lib, &s);
        SeerBlockMask ld = mask_desc(&lib);
        SEER(seer_gate_compute_mask(gate, &mp, &batch, &tqb, &tkb, &ld));
        size_t same = 0;
        for (size_t r = 0; r < gm.sizes.rows; r++) same += rows_equal(&gm, &lib, r);
        report(same == gm.sizes.rows, "%s: gate from F32 ggml tensors: %zu of %zu rows equal the library's mask of "
               "packed bf16 copies", c->name, same, gm.sizes.rows);
        free(qb);
        free(kb);
        mask_free(&lib);
    } else {
        const int first_qb = c->n_past / 64, k_blocks = (s.n_kv_valid + 63) / 64;
        const int q_blocks = (s.n_kv_valid - 1) / 64 - first_qb + 1;
        uint8_t *map = malloc(gm.sizes.dense_bytes);
        for (int h = 0; h < c->n_head; h++) {
            for (int qb = 0; qb < q_blocks; qb++) {
                for (int kb = 0; kb < k_blocks; kb++) {
                    map[((size_t)h * q_blocks + qb) * k_blocks + kb] = kb == first_qb + qb || uniform() > 0.4f;
                }
            }
        }
        SEER(seer_mask_from_dense(&batch, (uint32_t)c->n_head, 64, map, gm.sizes.dense_bytes, &gd));
        free(map);
    }
    size_t selected = 0, causal = 0;
    for (size_t r = 0; r < gm.sizes.rows; r++) {
        selected += (size_t)gm.counts[r];
        causal += (size_t)(gm.offsets[r + 1] - gm.offsets[r]);
    }
    printf("      %s: %s mask keeps %zu of %zu causal blocks\n", c->name, source, selected, causal);
    {
        /* Attention over it: the shim, the library on packed copies, ggml with -inf blocks, the oracle. */
        node = shim_node(&s);
        SHIM(seer_ggml_flash_attn_ext(node, s.n_kv_valid, &gd, &CPU));
        uint16_t *q16 = packed_16(s.q, 1, c->n_tokens, c->kv_type);
        uint16_t *k16 = packed_16(s.k, 1, s.n_kv_valid, c->kv_type);
        uint16_t *v16 = packed_16(s.v, 1, s.n_kv_valid, c->kv_type);
        SeerTensor tq = packed_desc(q16, c->kv_type, c->n_tokens, c->n_head, c->d);
        SeerTensor tk = packed_desc(k16, c->kv_type, s.n_kv_valid, c->n_head_kv, c->d);
        SeerTensor tv = packed_desc(v16, c->kv_type, s.n_kv_valid, c->n_head_kv, c->d);
        float *lib_out = malloc(out_floats * 4);
        SeerTensor to = {lib_out, SEER_DTYPE_F32, SEER_DEVICE_CPU, {c->n_tokens, c->n_head, c->d},
                         {(int64_t)c->n_head * c->d, c->d, 1}};
        SeerPrefillParams pp;
        SEER(seer_prefill_params_default(&pp));
        pp.softmax_scale = s.scale;
        SEER(seer_sparse_prefill(&pp, &batch, &tq, &tk, &tv, &gd, &to, NULL, 0));
        report(memcmp(lib_out, node->data, out_floats * 4) == 0,
               "%s: %s mask: the shim equals the library on packed copies, bit for bit", c->name, source);
        uint8_t *dense = to_dense(&s, &gm);
        oracle(&s, dense, want);
        e = rel_error(&s, (const float *)node->data, want);
        report(e <= TOL_ORACLE, "%s: %s mask: vs the f64 oracle, rel. error %.2e (<= %.0e)", c->name, source, e,
               TOL_ORACLE);
        ggml_attention(&s, dense, ggml_out);
        e = rel_error(&s, (const float *)node->data, ggml_out);
        report(e <= tol_ggml(c), "%s: %s mask: vs ggml_flash_attn_ext with those blocks -inf, rel. error %.2e "
               "(<= %.0e)", c->name, source, e, tol_ggml(c));
        free(dense);
        free(lib_out);
        free(q16);
        free(k16);
        free(v16);
    }

#ifdef SEER_GGML_TEST_CUDA
    if (cuda) run_cuda(&s, gate, &mp, &all, &gm, ggml_dense, shim_dense);
#else
    (void)cuda;
#endif
    mask_free(&gm);
    mask_free(&all);
    free(ggml_out);
    free(want);
    free(ggml_dense);
    free(shim_dense);
    ggml_free(s.ctx);
}

/* Refusals: statuses with messages, no crash. */
static void run_refusals(const SeerGate *gate) {
    struct ggml_init_params ip = {.mem_size = (size_t)16 << 20, .mem_buffer = NULL, .no_alloc = false};
    struct ggml_context *ctx = ggml_init(ip);
    struct ggml_tensor *q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 64, 4, 2);
    struct ggml_tensor *k = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, 64, 256, 2);
    struct ggml_tensor *kq = ggml_new_tensor_3d(ctx, GGML_TYPE_Q8_0, 64, 256, 2);
    struct ggml_tensor *fa = ggml_flash_attn_ext(ctx, q, k, k, NULL, 0.125f, 0.0f, 0.0f);
    HostMask m;
    memset(&m, 0, sizeof m);
    SeerBlockMask md = mask_desc(&m);
    SeerStatus st = seer_ggml_flash_attn_ext(fa, 0, &md, &CPU);
    report(st == SEER_INVALID_ARGUMENT && strstr(seer_ggml_last_error(), "n_kv_valid"),
           "refusal: n_kv_valid 0: %s (%s)", seer_status_name(st), seer_ggml_last_error());
    struct ggml_tensor *fa_q8 = ggml_flash_attn_ext(ctx, q, kq, kq, NULL, 0.125f, 0.0f, 0.0f);
    st = seer_ggml_flash_attn_ext(fa_q8, 4, &md, &CPU);
    report(st == SEER_UNSUPPORTED, "refusal: a Q8_0 KV cache: %s (%s)", seer_status_name(st), seer_ggml_last_error());
    struct ggml_tensor *kq_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, 256, 2);
    struct ggml_tensor *fa_alibi = ggml_flash_attn_ext(ctx, q, k, k, kq_mask, 0.125f, 8.0f, 0.0f);
    st = seer_ggml_flash_attn_ext(fa_alibi, 4, &md, &CPU);
    report(st == SEER_UNSUPPORTED, "refusal: ALiBi: %s (%s)", seer_status_name(st), seer_ggml_last_error());
    st = seer_ggml_flash_attn_ext(q, 4, &md, &CPU);
    report(st == SEER_INVALID_ARGUMENT, "refusal: not a flash-attention node: %s (%s)", seer_status_name(st),
           seer_ggml_last_error());
    st = seer_ggml_flash_attn_ext(fa, 300, &md, &CPU);
    report(st == SEER_INVALID_ARGUMENT, "refusal: n_kv_valid past the view: %s (%s)", seer_status_name(st),
           seer_ggml_last_error());
    st = seer_ggml_flash_attn_ext(fa, 4, &md, &CPU);
    report(st == SEER_BUFFER_TOO_SMALL || st == SEER_INVALID_ARGUMENT, "refusal: an empty mask: %s (%s)",
           seer_status_name(st), seer_ggml_last_error());
    st = seer_ggml_flash_attn_ext(fa, 4, &md, NULL);
    report(st == SEER_NULL_POINTER, "refusal: NULL params: %s (%s)", seer_status_name(st), seer_ggml_last_error());
    struct ggml_tensor *q4 = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 64, 4, 2, 2);
    struct ggml_tensor *k4 = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, 64, 256, 2, 2);
    struct ggml_tensor *fa4 = ggml_flash_attn_ext(ctx, q4, k4, k4, NULL, 0.125f, 0.0f, 0.0f);
    st = seer_ggml_flash_attn_ext(fa4, 4, &md, &CPU);
    report(st == SEER_UNSUPPORTED, "refusal: two streams (ne[3] = 2): %s (%s)", seer_status_name(st),
           seer_ggml_last_error());
    struct ggml_tensor *odd = ggml_view_3d(ctx, k, 64, 200, 2, 131, 131 * 200, 0); /* 131-byte rows of F16 */
    st = seer_ggml_flash_attn(q, odd, odd, 4, 0.0f, &md, fa, &CPU);
    report(st == SEER_INVALID_ARGUMENT && strstr(seer_ggml_last_error(), "nb[1]"),
           "refusal: a byte stride that is no multiple of the element: %s (%s)", seer_status_name(st),
           seer_ggml_last_error());
    st = seer_ggml_flash_attn(q, NULL, k, 4, 0.0f, &md, fa, &CPU);
    report(st == SEER_NULL_POINTER, "refusal: NULL k: %s (%s)", seer_status_name(st), seer_ggml_last_error());
    if (gate != NULL) {
        /* k_nope must hold every key without a cache. */
        struct ggml_tensor *qn = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 128, 8, 70);
        struct ggml_tensor *kn = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 128, 2, 70);
        SeerMaskParams mp;
        SEER(seer_mask_params_default(gate, &mp));
        st = seer_ggml_gate_mask(gate, &mp, qn, kn, 100, 0, &md, &CPU);
        report(st == SEER_INVALID_ARGUMENT && strstr(seer_ggml_last_error(), "k_nope"),
               "refusal: k_nope short of n_kv_valid keys without a cache: %s (%s)", seer_status_name(st),
               seer_ggml_last_error());
    }
    ggml_free(ctx);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s <gate_dir> [--cuda]\n", argv[0]);
        return 1;
    }
    int cuda = argc > 2 && strcmp(argv[2], "--cuda") == 0;
#ifdef SEER_GGML_TEST_CUDA
    if (cuda) {
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
            fprintf(stderr, "no CUDA device\n");
            return 2;
        }
        CUDA(cudaSetDevice(0));
        CUDA(cudaFree(0)); /* the runtime's primary context is current: the gate uploads there */
    }
#else
    if (cuda) {
        fprintf(stderr, "this build has no CUDA (build with -DSEER_GGML_TEST_CUDA)\n");
        return 1;
    }
#endif
    SeerGate *gate = NULL;
    SEER(seer_gate_load(argv[1], &gate));
    SeerGateConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.struct_size = sizeof cfg;
    SEER(seer_gate_get_config(gate, &cfg));
    if (cuda) SEER(seer_gate_upload(gate));
    const int ghq = (int)cfg.num_q_heads, ghkv = (int)cfg.num_kv_heads, gd = (int)cfg.head_dim;

    /* name, n_head, n_head_kv, head_dim, n_past, n_tokens, n_kv_pad, KV type; the gate runs where its geometry fits. */
    const Case cases[] = {
        {"GQA d128 prompt of 100", 8, 2, 128, 0, 100, 256, GGML_TYPE_F16},
        {"MHA d64 prompt of 130", 4, 4, 64, 0, 130, 256, GGML_TYPE_F16},
        {"GQA d128 chunk of 70 after 150", 8, 2, 128, 150, 70, 256, GGML_TYPE_F16},
        {"GQA d128 chunk of 37 after 600 (one-row ggml path)", 8, 2, 128, 600, 37, 768, GGML_TYPE_F16},
        {"MQA d64 BF16 chunk of 33 after 64", 4, 1, 64, 64, 33, 256, GGML_TYPE_BF16},
        {"GQA d128 BF16 prompt of 300", 8, 2, 128, 0, 300, 512, GGML_TYPE_BF16},
    };
    printf("seerattn %s, ggml test of the llama.cpp shim (%s)\n", seer_version(), cuda ? "CPU and CUDA" : "CPU");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const Case *c = &cases[i];
        const int fits = c->n_head == ghq && c->n_head_kv == ghkv && c->d == gd;
        run_case(c, fits ? gate : NULL, cuda);
    }
    run_refusals(gate);
    seer_gate_destroy(gate);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
