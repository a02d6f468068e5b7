/*
 * seerattn_ggml: seerattn's gate and block-sparse prefill over ggml tensors
 * laid out as llama.cpp's flash-attention path holds them.
 *
 * Tensors (ggml's ne order, innermost first; byte strides nb[]):
 *
 *   q        [head_dim, n_tokens, n_head, 1]   F32 (or K's type): the
 *            permuted view ggml_flash_attn_ext takes (llama.cpp's
 *            ggml_permute(Qcur, 0, 2, 1, 3) of post-RoPE Qcur).
 *   k, v     [head_dim, n_kv, n_head_kv, 1]    F16 or BF16 (one type): views
 *            of the KV cache, n_kv padded past the valid cells (llama.cpp
 *            pads to 256); only the first n_kv_valid cells are read.
 *   out      [head_dim, n_head, n_tokens, 1]   F32 (or K's type): the
 *            layout ggml_flash_attn_ext writes.
 *   q_nope   [head_dim, n_head, n_tokens, 1]   F32, F16 or BF16: pre-RoPE
 *            Q as llama.cpp's graph holds it before ggml_rope_ext (Qcur
 *            after ggml_reshape_3d; a view into a fused QKV result works).
 *   k_nope   [head_dim, n_head_kv, n, 1]       pre-RoPE K, same type as
 *            q_nope: n = n_kv_valid (every key of the sequence), or, with a
 *            K-block cache (CUDA), n = n_tokens (this ubatch's new keys).
 *
 * Sequence model: one sequence whose KV cells 0 .. n_kv_valid-1 hold
 * positions 0 .. n_kv_valid-1 in order, the ubatch's n_tokens queries being
 * the last n_tokens of them (n_tokens <= n_kv_valid; n_tokens < n_kv_valid
 * is a chunk after cached tokens). That is llama.cpp's single-sequence
 * prompt processing with a unified cache and no cell shifting; other cache
 * states must take ggml's own flash attention.
 *
 * No copies beyond what the layouts force: every tensor above is handed to
 * the library as a strided SeerTensor over tensor->data, with element
 * strides nb[i] / element size (the KV views, the permuted Q and the
 * output's [tokens, heads] order need none). The one copy is the library's:
 * an F32 q (attention) or F32 q_nope / k_nope (gate) is rounded to 16 bits
 * because the kernels read 16-bit rows: on CUDA into the front of the
 * workspace by a conversion kernel (kernels/convert.cu; the workspace sizes
 * below count it), on the CPU into a host buffer. q is rounded to K's type,
 * what ggml-cuda's flash attention and ggml's CPU one-row path do with Q;
 * the gate's inputs to bf16. Byte strides must be multiples of the element
 * size (SEER_INVALID_ARGUMENT otherwise); on CUDA rows need unit dim stride
 * and 16-byte aligned strides (llama.cpp's views have both).
 *
 * Device: `params->device` says what tensor->data points to:
 * SEER_DEVICE_CPU (host memory, the library's CPU reference path) or
 * SEER_DEVICE_CUDA (device memory; work enqueued on params->cuda_stream,
 * nothing allocated, copied or synchronized, graph-capturable). Masks are
 * SeerBlockMask arrays in the same memory, sized by seer_ggml_mask_sizes.
 *
 * Errors: every function returns a SeerStatus; on failure
 * seer_ggml_last_error() (thread-local) says what, naming the tensor and,
 * for failures inside the library, the library's own message.
 */
#ifndef SEERATTN_GGML_H
#define SEERATTN_GGML_H

#include "ggml.h"
#include "seerattn.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Where the tensors live and the CUDA resources of a call. */
typedef struct SeerGgmlParams {
    /* SEER_DEVICE_CPU or SEER_DEVICE_CUDA: what every tensor->data and mask array is. */
    uint32_t device;
    /* cudaStream_t for SEER_DEVICE_CUDA (NULL: the legacy default stream). */
    void *cuda_stream;
    /* Device scratch of the size the matching *_workspace_size function
     * reports, 256-byte aligned (cudaMalloc's and ggml-cuda's pool are),
     * apart from every tensor; NULL/0 on the CPU. */
    void *workspace;
    size_t workspace_bytes;
} SeerGgmlParams;

/* The message of the last failed seer_ggml_* call on this thread ("" if none). */
const char *seer_ggml_last_error(void);

/* Mask array sizes for one ubatch: n_head query heads, n_tokens queries
 * over n_kv_valid keys (64-token blocks). */
SeerStatus seer_ggml_mask_sizes(int64_t n_head, int64_t n_tokens, int64_t n_kv_valid, SeerMaskSizes *out);

/* Workspace bytes of seer_ggml_flash_attn for these tensors on `device`
 * (seer_prefill_workspace_size_dtype: on CUDA the rounded copy of an F32 q
 * plus the optional split-KV scratch; 0 on the CPU). */
SeerStatus seer_ggml_flash_attn_workspace_size(const struct ggml_tensor *q, const struct ggml_tensor *k,
                                               int64_t n_kv_valid, uint32_t device, size_t *out_bytes);

/* Block-sparse causal attention of one ubatch: out = softmax(scale * q k^T) v
 * over the key blocks `mask` selects (causal inside the diagonal block),
 * reading k and v's first n_kv_valid cells. scale 0 means 1/sqrt(head_dim).
 * With every causal block selected this is ggml_flash_attn_ext with
 * llama.cpp's causal KQ mask (no ALiBi, softcap or sinks). */
SeerStatus seer_ggml_flash_attn(const struct ggml_tensor *q, const struct ggml_tensor *k, const struct ggml_tensor *v,
                                int64_t n_kv_valid, float scale, const SeerBlockMask *mask,
                                const struct ggml_tensor *out, const SeerGgmlParams *params);

/* seer_ggml_flash_attn for a GGML_OP_FLASH_ATTN_EXT node: q, k, v from
 * dst->src[0..2], the scale from its op params, the output into dst. The
 * KQ mask (src[3]) is not read: the causal structure comes from
 * n_kv_valid and the block mask. SEER_UNSUPPORTED for nodes seerattn does
 * not compute: ALiBi (max_bias != 0), logit softcapping, attention sinks
 * (src[4]), K and V head sizes that differ, ne[3] != 1. */
SeerStatus seer_ggml_flash_attn_ext(const struct ggml_tensor *dst, int64_t n_kv_valid, const SeerBlockMask *mask,
                                    const SeerGgmlParams *params);

/* Workspace bytes of seer_ggml_gate_mask and seer_ggml_kblock_cache_update
 * (seer_gate_workspace_size_dtype; 0 on the CPU) for a ubatch whose
 * n_tokens and input type are those of `x`: q_nope, or a cache update's
 * k_new (both hold the ubatch's tokens in ne[2]). */
SeerStatus seer_ggml_gate_workspace_size(const SeerGate *gate, const struct ggml_tensor *x, int64_t n_kv_valid,
                                         uint32_t device, size_t *out_bytes);

/* CUDA: pool this ubatch's new pre-RoPE keys k_new [head_dim, n_head_kv,
 * n_tokens] into layer `layer`'s K-block cache of the sequence
 * (seer_kblock_cache_update), without computing a mask: for ubatches that
 * take ggml's dense attention (decode steps) but whose keys later gated
 * ubatches need. The cache must hold exactly the first n_kv_valid -
 * n_tokens keys. */
SeerStatus seer_ggml_kblock_cache_update(const SeerGate *gate, uint32_t layer, const struct ggml_tensor *k_new,
                                         int64_t n_kv_valid, uint64_t kblock_cache, const SeerGgmlParams *params);

/* The gate's block mask of one ubatch from the pre-RoPE q_nope and k_nope.
 * `mask_params`: the layer and rule (seer_mask_params_default, then set
 * .layer); its stream, workspace and cache fields are replaced by `params`
 * and `maybe_kblock_cache`.
 * - maybe_kblock_cache == 0: k_nope holds all n_kv_valid keys.
 * - otherwise (CUDA): the device address of this layer's K-block cache
 *   (seer_kblock_cache_size) of the sequence; k_nope holds this ubatch's
 *   n_tokens new keys, which are pooled into the cache first
 *   (seer_kblock_cache_update), then the mask is computed from it. The cache
 *   must hold exactly the sequence's first n_kv_valid - n_tokens keys. */
SeerStatus seer_ggml_gate_mask(const SeerGate *gate, const SeerMaskParams *mask_params,
                               const struct ggml_tensor *q_nope, const struct ggml_tensor *k_nope,
                               int64_t n_kv_valid, uint64_t maybe_kblock_cache, const SeerBlockMask *mask,
                               const SeerGgmlParams *params);

#ifdef __cplusplus
}
#endif

#endif /* SEERATTN_GGML_H */
