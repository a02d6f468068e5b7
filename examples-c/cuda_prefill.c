/*
 * The CUDA path of the seerattn C API from C, with the CUDA runtime: load a
 * released gate directory, upload it, put a sequence's pre-RoPE Q/K and
 * post-RoPE Q/K/V in device memory, run gate + block-sparse prefill of one
 * layer with seer_gate_attention on a stream (timed with events, also as a
 * CUDA graph), then check the output against the CPU path of the same
 * library on the same mask, and print density, error and time.
 *
 *   cuda_prefill <gate_dir> [seq_len] [layer]
 *
 * Inputs are random (the gate's own rule decides the density). Exits 0 when
 * the GPU output matches the CPU path (relative error <= 1e-2), 1 on any
 * API or CUDA error or a mismatch, 2 when no CUDA device is present.
 */
#include "example.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CUDA(call)                                                                        \
    do {                                                                                  \
        cudaError_t err_ = (call);                                                        \
        if (err_ != cudaSuccess) {                                                        \
            fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(err_));          \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;

/* n bf16 values: a per-(64-token block, head) mean plus noise, so that the
 * gate's pooled features differ between blocks and the mask is sparse. */
static uint16_t *structured_bf16(int64_t tokens, int64_t heads, int64_t dim) {
    int64_t blocks = (tokens + 63) / 64;
    float *means = malloc((size_t)(blocks * heads * dim) * sizeof *means);
    for (int64_t i = 0; i < blocks * heads * dim; i++) means[i] = 1.5f * uniform(&rng_state);
    uint16_t *p = malloc((size_t)(tokens * heads * dim) * sizeof *p);
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t x = 0; x < dim; x++)
                p[(t * heads + h) * dim + x] = to_bf16(means[((t / 64) * heads + h) * dim + x] + uniform(&rng_state));
    free(means);
    return p;
}

/* Device memory holding `host`'s bytes, or, for host == NULL, 0xFF bytes
 * (NaN in bf16 and f32: an output the library did not write shows). */
static void *to_device(const void *host, size_t bytes) {
    void *d = NULL;
    CUDA(cudaMalloc(&d, bytes ? bytes : 16));
    if (host)
        CUDA(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice));
    else
        CUDA(cudaMemset(d, 0xFF, bytes ? bytes : 16));
    return d;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s <gate_dir> [seq_len] [layer]\n", argv[0]);
        return 1;
    }
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        fprintf(stderr, "no CUDA device\n");
        return 2;
    }
    CUDA(cudaSetDevice(0));
    CUDA(cudaFree(0)); /* the runtime's primary context is now current: the gate uploads there */

    SeerGate *gate = NULL;
    CHECK(seer_gate_load(argv[1], &gate));
    SeerGateConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.struct_size = sizeof cfg;
    CHECK(seer_gate_get_config(gate, &cfg));
    const int32_t n = argc > 2 ? atoi(argv[2]) : 8192;
    uint32_t layer = 0;
    if (argc > 3) {
        layer = (uint32_t)atoi(argv[3]);
    } else {
        while (layer < cfg.num_layers && !seer_gate_has_layer(gate, layer)) layer++; /* the first with weights */
    }
    const int64_t hq = cfg.num_q_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;
    CHECK(seer_gate_upload(gate));

    /* Inputs (pre-RoPE for the gate; q/k/v stand in for the post-RoPE ones). */
    uint16_t *q_nope = structured_bf16(n, hq, d), *k_nope = structured_bf16(n, hkv, d);
    uint16_t *q = structured_bf16(n, hq, d), *k = structured_bf16(n, hkv, d), *v = structured_bf16(n, hkv, d);
    const size_t qb = (size_t)(n * hq * d) * 2, kb = (size_t)(n * hkv * d) * 2;
    void *dq_nope = to_device(q_nope, qb), *dk_nope = to_device(k_nope, kb);
    void *dq = to_device(q, qb), *dk = to_device(k, kb), *dv = to_device(v, kb);
    void *dout = to_device(NULL, qb);

    const int32_t cu[2] = {0, n};
    SeerBatch batch = {1, cu, cu};
    SeerMaskSizes sizes;
    memset(&sizes, 0, sizeof sizes);
    sizes.struct_size = sizeof sizes;
    CHECK(seer_mask_sizes(&batch, (uint32_t)hq, cfg.block_size, &sizes));
    int32_t *dcounts = to_device(NULL, sizes.rows * 4);
    int32_t *dindices = to_device(NULL, sizes.indices_len * 4);
    int64_t *doffsets = to_device(NULL, sizes.row_offsets_len * 8);
    SeerBlockMask dmask = {dcounts, sizes.rows, dindices, sizes.indices_len, doffsets, sizes.row_offsets_len,
                           SEER_DEVICE_CUDA};

    size_t gate_ws = 0, prefill_ws = 0;
    CHECK(seer_gate_workspace_size(gate, &batch, SEER_DEVICE_CUDA, &gate_ws));
    CHECK(seer_prefill_workspace_size(&batch, (uint32_t)hq, (uint32_t)d, SEER_DEVICE_CUDA, &prefill_ws));
    void *dgate_ws = to_device(NULL, gate_ws), *dprefill_ws = prefill_ws ? to_device(NULL, prefill_ws) : NULL;

    cudaStream_t stream;
    CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    SeerMaskParams mp;
    CHECK(seer_mask_params_default(gate, &mp));
    mp.layer = layer;
    mp.cuda_stream = stream;
    mp.workspace = dgate_ws;
    mp.workspace_bytes = gate_ws;
    SeerPrefillParams pp;
    CHECK(seer_prefill_params_default(&pp));
    pp.cuda_stream = stream;
    pp.workspace = dprefill_ws;
    pp.workspace_bytes = prefill_ws;

    SeerTensor tq_nope = tensor(dq_nope, SEER_DTYPE_BF16, SEER_DEVICE_CUDA, n, hq, d);
    SeerTensor tk_nope = tensor(dk_nope, SEER_DTYPE_BF16, SEER_DEVICE_CUDA, n, hkv, d);
    SeerTensor tq = tensor(dq, SEER_DTYPE_BF16, SEER_DEVICE_CUDA, n, hq, d);
    SeerTensor tk = tensor(dk, SEER_DTYPE_BF16, SEER_DEVICE_CUDA, n, hkv, d);
    SeerTensor tv = tensor(dv, SEER_DTYPE_BF16, SEER_DEVICE_CUDA, n, hkv, d);
    SeerTensor tout = tensor(dout, SEER_DTYPE_BF16, SEER_DEVICE_CUDA, n, hq, d);

    /* Eager once (loads the kernels), then timed, then as a graph. */
    CHECK(seer_gate_attention(gate, &mp, &pp, &batch, &tq_nope, &tk_nope, &tq, &tk, &tv, &dmask, &tout, NULL, 0));
    CUDA(cudaStreamSynchronize(stream));
    cudaEvent_t start, stop;
    CUDA(cudaEventCreate(&start));
    CUDA(cudaEventCreate(&stop));
    const int reps = 10;
    CUDA(cudaEventRecord(start, stream));
    for (int i = 0; i < reps; i++)
        CHECK(seer_gate_attention(gate, &mp, &pp, &batch, &tq_nope, &tk_nope, &tq, &tk, &tv, &dmask, &tout, NULL, 0));
    CUDA(cudaEventRecord(stop, stream));
    CUDA(cudaEventSynchronize(stop));
    float eager_ms = 0;
    CUDA(cudaEventElapsedTime(&eager_ms, start, stop));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    CHECK(seer_gate_attention(gate, &mp, &pp, &batch, &tq_nope, &tk_nope, &tq, &tk, &tv, &dmask, &tout, NULL, 0));
    CUDA(cudaStreamEndCapture(stream, &graph));
    CUDA(cudaGraphInstantiate(&exec, graph, 0));
    CUDA(cudaEventRecord(start, stream));
    for (int i = 0; i < reps; i++) CUDA(cudaGraphLaunch(exec, stream));
    CUDA(cudaEventRecord(stop, stream));
    CUDA(cudaEventSynchronize(stop));
    float graph_ms = 0;
    CUDA(cudaEventElapsedTime(&graph_ms, start, stop));

    /* Results back; the CPU path of the same library on the GPU's mask. */
    uint16_t *out = malloc(qb);
    int32_t *counts = malloc(sizes.rows * 4), *indices = malloc(sizes.indices_len * 4);
    int64_t *offsets = malloc(sizes.row_offsets_len * 8);
    CUDA(cudaMemcpy(out, dout, qb, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(counts, dcounts, sizes.rows * 4, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(indices, dindices, sizes.indices_len * 4, cudaMemcpyDeviceToHost));
    CUDA(cudaMemcpy(offsets, doffsets, sizes.row_offsets_len * 8, cudaMemcpyDeviceToHost));
    SeerBlockMask hmask = {counts, sizes.rows, indices, sizes.indices_len, offsets, sizes.row_offsets_len,
                           SEER_DEVICE_CPU};
    float *cpu_out = malloc((size_t)(n * hq * d) * sizeof *cpu_out);
    SeerTensor hq_ = tensor(q, SEER_DTYPE_BF16, SEER_DEVICE_CPU, n, hq, d);
    SeerTensor hk = tensor(k, SEER_DTYPE_BF16, SEER_DEVICE_CPU, n, hkv, d);
    SeerTensor hv = tensor(v, SEER_DTYPE_BF16, SEER_DEVICE_CPU, n, hkv, d);
    SeerTensor hout = tensor(cpu_out, SEER_DTYPE_F32, SEER_DEVICE_CPU, n, hq, d);
    SeerPrefillParams cpu_pp;
    CHECK(seer_prefill_params_default(&cpu_pp));
    CHECK(seer_sparse_prefill(&cpu_pp, &batch, &hq_, &hk, &hv, &hmask, &hout, NULL, 0));

    double num = 0, den = 0, selected = 0, causal = 0;
    for (size_t i = 0; i < (size_t)(n * hq * d); i++) {
        double g = from_bf16(out[i]), c = cpu_out[i];
        if (!isfinite(g)) {
            fprintf(stderr, "GPU output %zu is not finite\n", i);
            return 1;
        }
        num += (g - c) * (g - c);
        den += c * c;
    }
    for (size_t r = 0; r < sizes.rows; r++) {
        selected += counts[r];
        causal += (double)(offsets[r + 1] - offsets[r]);
    }
    const double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    char name[256] = "unknown";
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) snprintf(name, sizeof name, "%s", prop.name);
    printf("device %s, %d tokens, %lld q heads, %lld kv heads, head_dim %lld, layer %u\n", name, n, (long long)hq,
           (long long)hkv, (long long)d, layer);
    printf("mask density %.4f of the causal blocks; prefill workspace %zu bytes\n", selected / causal, prefill_ws);
    printf("gate + sparse prefill: %.3f ms eager, %.3f ms as a CUDA graph (mean of %d)\n", eager_ms / reps,
           graph_ms / reps, reps);
    printf("GPU vs CPU path on the same mask: relative error %.2e\n", rel);

    CUDA(cudaGraphExecDestroy(exec));
    CUDA(cudaGraphDestroy(graph));
    CUDA(cudaStreamDestroy(stream));
    seer_gate_destroy(gate);
    if (!(rel <= 1e-2)) {
        fprintf(stderr, "relative error %.2e exceeds 1e-2\n", rel);
        return 1;
    }
    printf("ok\n");
    return 0;
}
