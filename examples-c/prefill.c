/*
 * A complete use of the seerattn C API on the CPU path: load a released gate
 * directory, compute a layer's block mask for a two-sequence batch (one
 * plain prefill, one chunk over a KV cache), run block-sparse prefill with
 * that mask and with the full causal mask, and report the mask density and
 * the difference between the two outputs.
 *
 *   prefill <gate_dir> [layer]
 *
 * Exits 0 on success, 1 on any API error (printing the library's message).
 */
#include "example.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 0x1234567887654321ull;

static uint16_t *random_bf16(size_t n) {
    uint16_t *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++) p[i] = to_bf16(uniform(&rng_state));
    return p;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s <gate_dir> [layer]\n", argv[0]);
        return 2;
    }
    if (seer_abi_version() != SEER_ABI_VERSION) {
        fprintf(stderr, "ABI mismatch: header %d, library %u\n", SEER_ABI_VERSION, seer_abi_version());
        return 1;
    }
    printf("seerattn %s (ABI %u)\n", seer_version(), seer_abi_version());

    SeerGate *gate = NULL;
    CHECK(seer_gate_load(argv[1], &gate));
    SeerGateConfig cfg;
    cfg.struct_size = sizeof cfg;
    CHECK(seer_gate_get_config(gate, &cfg));
    const uint32_t layer = argc > 2 ? (uint32_t)atoi(argv[2]) : cfg.num_layers - 1;
    printf("gate: %u layers, %u q heads, %u kv heads, head_dim %u\n", cfg.num_layers, cfg.num_q_heads,
           cfg.num_kv_heads, cfg.head_dim);

    /* Sequence 0: 700-token prefill. Sequence 1: 200 new tokens after 440 cached ones. */
    const int32_t cu_q[3] = {0, 700, 900};
    const int32_t cu_k[3] = {0, 700, 1340};
    const SeerBatch batch = {2, cu_q, cu_k};
    const int64_t hq = cfg.num_q_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;
    const int64_t total_q = cu_q[2], total_k = cu_k[2];

    uint16_t *q_nope = random_bf16((size_t)(total_q * hq * d));
    uint16_t *k_nope = random_bf16((size_t)(total_k * hkv * d));
    uint16_t *q = random_bf16((size_t)(total_q * hq * d));
    uint16_t *k = random_bf16((size_t)(total_k * hkv * d));
    uint16_t *v = random_bf16((size_t)(total_k * hkv * d));
    float *out_sparse = calloc((size_t)(total_q * hq * d), sizeof(float));
    float *out_dense = calloc((size_t)(total_q * hq * d), sizeof(float));
    SeerTensor tq_nope = tensor(q_nope, SEER_DTYPE_BF16, SEER_DEVICE_CPU, total_q, hq, d);
    SeerTensor tk_nope = tensor(k_nope, SEER_DTYPE_BF16, SEER_DEVICE_CPU, total_k, hkv, d);
    SeerTensor tq = tensor(q, SEER_DTYPE_BF16, SEER_DEVICE_CPU, total_q, hq, d);
    SeerTensor tk = tensor(k, SEER_DTYPE_BF16, SEER_DEVICE_CPU, total_k, hkv, d);
    SeerTensor tv = tensor(v, SEER_DTYPE_BF16, SEER_DEVICE_CPU, total_k, hkv, d);
    SeerTensor tsparse = tensor(out_sparse, SEER_DTYPE_F32, SEER_DEVICE_CPU, total_q, hq, d);
    SeerTensor tdense = tensor(out_dense, SEER_DTYPE_F32, SEER_DEVICE_CPU, total_q, hq, d);

    /* The caller owns every buffer: ask for the sizes, allocate, compute. */
    SeerMaskSizes sizes;
    sizes.struct_size = sizeof sizes;
    CHECK(seer_mask_sizes(&batch, cfg.num_q_heads, cfg.block_size, &sizes));
    SeerBlockMask mask = {
        calloc(sizes.rows, sizeof(int32_t)), sizes.rows,
        calloc(sizes.indices_len, sizeof(int32_t)), sizes.indices_len,
        calloc(sizes.row_offsets_len, sizeof(int64_t)), sizes.row_offsets_len,
        SEER_DEVICE_CPU,
    };
    SeerMaskParams mp;
    CHECK(seer_mask_params_default(gate, &mp));
    mp.layer = layer;
    mp.sparsity_method = SEER_SPARSITY_NZ_RATIO;
    mp.nz_ratio = 0.3f;
    CHECK(seer_gate_compute_mask(gate, &mp, &batch, &tq_nope, &tk_nope, &mask));

    size_t selected = 0;
    for (size_t r = 0; r < sizes.rows; r++) selected += (size_t)mask.counts[r];
    /* Every causal (row, key block) pair: the full mask, built from a dense map of ones. */
    uint8_t *ones = malloc(sizes.dense_bytes);
    memset(ones, 1, sizes.dense_bytes);
    SeerBlockMask full = {
        calloc(sizes.rows, sizeof(int32_t)), sizes.rows,
        calloc(sizes.indices_len, sizeof(int32_t)), sizes.indices_len,
        calloc(sizes.row_offsets_len, sizeof(int64_t)), sizes.row_offsets_len,
        SEER_DEVICE_CPU,
    };
    CHECK(seer_mask_from_dense(&batch, cfg.num_q_heads, cfg.block_size, ones, sizes.dense_bytes, &full));
    size_t causal = 0;
    for (size_t r = 0; r < sizes.rows; r++) causal += (size_t)full.counts[r];

    SeerPrefillParams pp;
    CHECK(seer_prefill_params_default(&pp));
    float *lse = calloc((size_t)(hq * total_q), sizeof(float));
    CHECK(seer_sparse_prefill(&pp, &batch, &tq, &tk, &tv, &mask, &tsparse, lse, (size_t)(hq * total_q)));
    CHECK(seer_sparse_prefill(&pp, &batch, &tq, &tk, &tv, &full, &tdense, NULL, 0));

    double max_err = 0.0, max_ref = 0.0;
    for (int64_t i = 0; i < total_q * hq * d; i++) {
        double e = fabs((double)out_sparse[i] - (double)out_dense[i]);
        if (e > max_err) max_err = e;
        if (fabs((double)out_dense[i]) > max_ref) max_ref = fabs((double)out_dense[i]);
        if (out_sparse[i] != out_sparse[i]) {
            fprintf(stderr, "NaN in the sparse output at %lld\n", (long long)i);
            return 1;
        }
    }
    printf("layer %u: mask rows %zu, density %.4f (%zu of %zu causal blocks)\n", layer, sizes.rows,
           (double)selected / (double)causal, selected, causal);
    printf("sparse vs dense attention: max |diff| %.4f (max |dense| %.4f)\n", max_err, max_ref);

    seer_gate_destroy(gate);
    seer_gate_destroy(NULL);
    free(q_nope); free(k_nope); free(q); free(k); free(v); free(out_sparse); free(out_dense); free(lse);
    free(ones);
    free(mask.counts); free(mask.indices); free(mask.row_offsets);
    free(full.counts); free(full.indices); free(full.row_offsets);
    printf("ok\n");
    return 0;
}
