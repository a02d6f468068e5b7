/*
 * seerattn_ggml: ggml tensors (llama.cpp's flash-attention layouts) to
 * seerattn's C API. See seerattn_ggml.h for the layouts and the rules.
 *
 * Each ggml tensor becomes a SeerTensor over the same data: shape
 * [tokens, heads, head_dim] and element strides taken from nb[] (bytes
 * divided by the element size), so the permuted Q, the KV cache views and
 * the output need no copy. Everything else (shapes against each other,
 * GQA, alignment, device memory, overlap, mask sizes) is checked by the
 * library, whose message is passed on.
 */
#include "seerattn_ggml.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[1024];

const char *seer_ggml_last_error(void) { return last_error; }

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static SeerStatus fail(SeerStatus status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

/* A library status, its message prefixed with what the shim was doing. */
static SeerStatus library(SeerStatus status, const char *what) {
    if (status != SEER_OK) {
        snprintf(last_error, sizeof last_error, "%s: %s: %s", what, seer_status_name(status),
                 seer_last_error_message());
    }
    return status;
}

static SeerStatus dtype_of(const char *name, const struct ggml_tensor *t, uint32_t *out) {
    switch (t->type) {
    case GGML_TYPE_F32: *out = SEER_DTYPE_F32; return SEER_OK;
    case GGML_TYPE_F16: *out = SEER_DTYPE_F16; return SEER_OK;
    case GGML_TYPE_BF16: *out = SEER_DTYPE_BF16; return SEER_OK;
    default:
        return fail(SEER_UNSUPPORTED, "%s: ggml type %s (seerattn takes F32, F16 and BF16; quantized KV caches "
                    "need ggml's own flash attention)", name, ggml_type_name(t->type));
    }
}

/*
 * View `t` ([head_dim, a, b, 1] in ne order) as a SeerTensor
 * [tokens, heads, head_dim]: the tokens are dimension `token_dim` (1 or 2)
 * and the heads the other one. Of the tokens, the first `tokens` are taken
 * (-1: all of them).
 */
static SeerStatus view(const char *name, const struct ggml_tensor *t, int token_dim, int64_t tokens, uint32_t device,
                       SeerTensor *out) {
    if (t == NULL) return fail(SEER_NULL_POINTER, "%s is NULL", name);
    if (t->ne[3] != 1) {
        return fail(SEER_UNSUPPORTED, "%s: ne[3] = %lld: one stream/sequence per call (ne[3] == 1)", name,
                    (long long)t->ne[3]);
    }
    uint32_t dtype = 0;
    SeerStatus st = dtype_of(name, t, &dtype);
    if (st != SEER_OK) return st;
    const size_t es = ggml_type_size(t->type);
    for (int i = 0; i < 3; i++) {
        if (t->nb[i] % es != 0) {
            return fail(SEER_INVALID_ARGUMENT, "%s: nb[%d] = %zu bytes is not a multiple of the %zu-byte element", name,
                        i, t->nb[i], es);
        }
    }
    const int head_dim_index = 3 - token_dim;
    const int64_t have = t->ne[token_dim];
    if (tokens < 0) tokens = have;
    if (tokens > have) {
        return fail(SEER_INVALID_ARGUMENT, "%s: %lld tokens requested, the tensor has %lld (ne[%d])", name,
                    (long long)tokens, (long long)have, token_dim);
    }
    memset(out, 0, sizeof *out);
    out->data = t->data;
    out->dtype = dtype;
    out->device = device;
    out->shape[0] = tokens;
    out->shape[1] = t->ne[head_dim_index];
    out->shape[2] = t->ne[0];
    out->strides[0] = (int64_t)(t->nb[token_dim] / es);
    out->strides[1] = (int64_t)(t->nb[head_dim_index] / es);
    out->strides[2] = (int64_t)(t->nb[0] / es);
    return SEER_OK;
}

static SeerStatus check_params(const SeerGgmlParams *p) {
    if (p == NULL) return fail(SEER_NULL_POINTER, "params is NULL");
    if (p->device != SEER_DEVICE_CPU && p->device != SEER_DEVICE_CUDA) {
        return fail(SEER_INVALID_ARGUMENT, "params->device = %u is not a SeerDevice", p->device);
    }
    return SEER_OK;
}

/* The one-sequence batch of a ubatch; `cu` holds its four offsets. */
static SeerStatus batch_of(int64_t n_tokens, int64_t n_kv_valid, int32_t cu[4], SeerBatch *out) {
    if (n_tokens < 1 || n_kv_valid < n_tokens || n_kv_valid > INT32_MAX) {
        return fail(SEER_INVALID_ARGUMENT,
                    "n_tokens = %lld, n_kv_valid = %lld: need 1 <= n_tokens <= n_kv_valid <= INT32_MAX (the ubatch's "
                    "queries are the last n_tokens of the n_kv_valid cells)",
                    (long long)n_tokens, (long long)n_kv_valid);
    }
    cu[0] = 0;
    cu[1] = (int32_t)n_tokens;
    cu[2] = 0;
    cu[3] = (int32_t)n_kv_valid;
    out->num_seqs = 1;
    out->cu_seqlens_q = cu;
    out->cu_seqlens_k = cu + 2;
    return SEER_OK;
}

SeerStatus seer_ggml_mask_sizes(int64_t n_head, int64_t n_tokens, int64_t n_kv_valid, SeerMaskSizes *out) {
    if (out == NULL) return fail(SEER_NULL_POINTER, "out is NULL");
    if (n_head < 1 || n_head > UINT32_MAX) return fail(SEER_INVALID_ARGUMENT, "n_head = %lld", (long long)n_head);
    int32_t cu[4];
    SeerBatch batch;
    SeerStatus st = batch_of(n_tokens, n_kv_valid, cu, &batch);
    if (st != SEER_OK) return st;
    SeerMaskSizes sizes;
    memset(&sizes, 0, sizeof sizes);
    sizes.struct_size = sizeof sizes;
    st = library(seer_mask_sizes(&batch, (uint32_t)n_head, 64, &sizes), "seer_mask_sizes");
    if (st == SEER_OK) *out = sizes;
    return st;
}

SeerStatus seer_ggml_flash_attn_workspace_size(const struct ggml_tensor *q, const struct ggml_tensor *k,
                                               int64_t n_kv_valid, uint32_t device, size_t *out_bytes) {
    if (out_bytes == NULL) return fail(SEER_NULL_POINTER, "out_bytes is NULL");
    SeerTensor tq, tk;
    SeerStatus st = view("q", q, 1, -1, device, &tq);
    if (st == SEER_OK) st = view("k", k, 1, n_kv_valid, device, &tk);
    if (st != SEER_OK) return st;
    int32_t cu[4];
    SeerBatch batch;
    st = batch_of(tq.shape[0], n_kv_valid, cu, &batch);
    if (st != SEER_OK) return st;
    return library(seer_prefill_workspace_size_dtype(&batch, (uint32_t)tq.shape[1], (uint32_t)tq.shape[2], tq.dtype,
                                                     tk.dtype, device, out_bytes),
                   "seer_prefill_workspace_size_dtype");
}

SeerStatus seer_ggml_flash_attn(const struct ggml_tensor *q, const struct ggml_tensor *k, const struct ggml_tensor *v,
                                int64_t n_kv_valid, float scale, const SeerBlockMask *mask,
                                const struct ggml_tensor *out, const SeerGgmlParams *params) {
    SeerStatus st = check_params(params);
    if (st != SEER_OK) return st;
    if (mask == NULL) return fail(SEER_NULL_POINTER, "mask is NULL");
    SeerTensor tq, tk, tv, to;
    /* q [d, n_tokens, n_head], k/v [d, n_kv, n_head_kv]: tokens in ne[1];
     * out [d, n_head, n_tokens]: tokens in ne[2]. */
    if ((st = view("q", q, 1, -1, params->device, &tq)) != SEER_OK) return st;
    if ((st = view("k", k, 1, n_kv_valid, params->device, &tk)) != SEER_OK) return st;
    if ((st = view("v", v, 1, n_kv_valid, params->device, &tv)) != SEER_OK) return st;
    if ((st = view("out", out, 2, -1, params->device, &to)) != SEER_OK) return st;
    int32_t cu[4];
    SeerBatch batch;
    if ((st = batch_of(tq.shape[0], n_kv_valid, cu, &batch)) != SEER_OK) return st;
    if (!(scale >= 0.0f) || isinf(scale)) return fail(SEER_INVALID_ARGUMENT, "scale = %g", (double)scale);
    SeerPrefillParams pp;
    if ((st = library(seer_prefill_params_default(&pp), "seer_prefill_params_default")) != SEER_OK) return st;
    pp.softmax_scale = scale;
    pp.cuda_stream = params->cuda_stream;
    pp.workspace = params->workspace;
    pp.workspace_bytes = params->workspace_bytes;
    return library(seer_sparse_prefill(&pp, &batch, &tq, &tk, &tv, mask, &to, NULL, 0), "seer_sparse_prefill");
}

SeerStatus seer_ggml_flash_attn_ext(const struct ggml_tensor *dst, int64_t n_kv_valid, const SeerBlockMask *mask,
                                    const SeerGgmlParams *params) {
    if (dst == NULL) return fail(SEER_NULL_POINTER, "dst is NULL");
    if (dst->op != GGML_OP_FLASH_ATTN_EXT) {
        return fail(SEER_INVALID_ARGUMENT, "dst is a %s node, not FLASH_ATTN_EXT", ggml_op_name(dst->op));
    }
    float scale, max_bias, softcap;
    int32_t n_kv_max;
    memcpy(&scale, (const char *)dst->op_params + 0, sizeof scale);
    memcpy(&max_bias, (const char *)dst->op_params + 4, sizeof max_bias);
    memcpy(&softcap, (const char *)dst->op_params + 8, sizeof softcap);
    memcpy(&n_kv_max, (const char *)dst->op_params + 16, sizeof n_kv_max);
    if (max_bias != 0.0f) return fail(SEER_UNSUPPORTED, "ALiBi (max_bias = %g)", (double)max_bias);
    if (softcap != 0.0f) return fail(SEER_UNSUPPORTED, "logit softcapping (%g)", (double)softcap);
    if (dst->src[4] != NULL) return fail(SEER_UNSUPPORTED, "attention sinks (src[4])");
    if (n_kv_max != 0) return fail(SEER_UNSUPPORTED, "top-k KV selection (n_kv_max = %d)", n_kv_max);
    const struct ggml_tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2];
    if (q == NULL || k == NULL || v == NULL) return fail(SEER_NULL_POINTER, "dst->src[0..2] (q, k, v) must be set");
    if (k->ne[0] != v->ne[0]) {
        return fail(SEER_UNSUPPORTED, "K head size %lld differs from V's %lld", (long long)k->ne[0],
                    (long long)v->ne[0]);
    }
    return seer_ggml_flash_attn(q, k, v, n_kv_valid, scale, mask, dst, params);
}

SeerStatus seer_ggml_gate_workspace_size(const SeerGate *gate, const struct ggml_tensor *x, int64_t n_kv_valid,
                                         uint32_t device, size_t *out_bytes) {
    if (out_bytes == NULL) return fail(SEER_NULL_POINTER, "out_bytes is NULL");
    SeerTensor tq;
    SeerStatus st = view("x", x, 2, -1, device, &tq);
    if (st != SEER_OK) return st;
    int32_t cu[4];
    SeerBatch batch;
    if ((st = batch_of(tq.shape[0], n_kv_valid, cu, &batch)) != SEER_OK) return st;
    return library(seer_gate_workspace_size_dtype(gate, &batch, tq.dtype, device, out_bytes),
                   "seer_gate_workspace_size_dtype");
}

SeerStatus seer_ggml_gate_mask(const SeerGate *gate, const SeerMaskParams *mask_params,
                               const struct ggml_tensor *q_nope, const struct ggml_tensor *k_nope,
                               int64_t n_kv_valid, uint64_t maybe_kblock_cache, const SeerBlockMask *mask,
                               const SeerGgmlParams *params) {
    SeerStatus st = check_params(params);
    if (st != SEER_OK) return st;
    if (mask_params == NULL) return fail(SEER_NULL_POINTER, "mask_params is NULL");
    if (mask == NULL) return fail(SEER_NULL_POINTER, "mask is NULL");
    SeerTensor tq, tk;
    /* Pre-RoPE Qcur [d, n_head, n_tokens] and Kcur [d, n_head_kv, n]: tokens in ne[2]. */
    if ((st = view("q_nope", q_nope, 2, -1, params->device, &tq)) != SEER_OK) return st;
    if ((st = view("k_nope", k_nope, 2, -1, params->device, &tk)) != SEER_OK) return st;
    int32_t cu[4];
    SeerBatch batch;
    if ((st = batch_of(tq.shape[0], n_kv_valid, cu, &batch)) != SEER_OK) return st;
    SeerMaskParams mp = *mask_params;
    /* Every field below is set here, the K-block cache ones included: this
     * header's struct, whatever struct_size the caller's copy carried. */
    mp.struct_size = sizeof mp;
    mp.cuda_stream = params->cuda_stream;
    mp.workspace = params->workspace;
    mp.workspace_bytes = params->workspace_bytes;
    mp.maybe_kblock_caches = NULL;
    mp.num_kblock_caches = 0;
    if (maybe_kblock_cache == 0) {
        if (tk.shape[0] != n_kv_valid) {
            return fail(SEER_INVALID_ARGUMENT,
                        "k_nope holds %lld keys (ne[2]); without a K-block cache it must hold all n_kv_valid = %lld",
                        (long long)tk.shape[0], (long long)n_kv_valid);
        }
        return library(seer_gate_compute_mask(gate, &mp, &batch, &tq, &tk, mask), "seer_gate_compute_mask");
    }
    if (tk.shape[0] != tq.shape[0]) {
        return fail(SEER_INVALID_ARGUMENT,
                    "k_nope holds %lld keys (ne[2]); with a K-block cache it holds this ubatch's n_tokens = %lld",
                    (long long)tk.shape[0], (long long)tq.shape[0]);
    }
    const uint64_t caches[1] = {maybe_kblock_cache};
    st = library(seer_kblock_cache_update(gate, &mp, &batch, &tk, caches, 1), "seer_kblock_cache_update");
    if (st != SEER_OK) return st;
    mp.maybe_kblock_caches = caches;
    mp.num_kblock_caches = 1;
    return library(seer_gate_compute_mask(gate, &mp, &batch, &tq, NULL, mask), "seer_gate_compute_mask (cached)");
}

SeerStatus seer_ggml_kblock_cache_update(const SeerGate *gate, uint32_t layer, const struct ggml_tensor *k_new,
                                         int64_t n_kv_valid, uint64_t kblock_cache, const SeerGgmlParams *params) {
    SeerStatus st = check_params(params);
    if (st != SEER_OK) return st;
    if (kblock_cache == 0) return fail(SEER_NULL_POINTER, "kblock_cache is 0");
    SeerTensor tk;
    if ((st = view("k_new", k_new, 2, -1, params->device, &tk)) != SEER_OK) return st;
    int32_t cu[4];
    SeerBatch batch;
    if ((st = batch_of(tk.shape[0], n_kv_valid, cu, &batch)) != SEER_OK) return st;
    SeerMaskParams mp;
    if ((st = library(seer_mask_params_default(gate, &mp), "seer_mask_params_default")) != SEER_OK) return st;
    mp.layer = layer;
    mp.cuda_stream = params->cuda_stream;
    mp.workspace = params->workspace;
    mp.workspace_bytes = params->workspace_bytes;
    const uint64_t caches[1] = {kblock_cache};
    return library(seer_kblock_cache_update(gate, &mp, &batch, &tk, caches, 1), "seer_kblock_cache_update");
}
