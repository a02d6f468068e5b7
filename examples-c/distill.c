/*
 * Training a gate by self-distillation through the seerattn C API, on the
 * CPU path: a small random gate learns, from one layer's Q and K with a
 * planted structure (each query head attends to key block 0 and to one
 * other block), which blocks matter. Then the trained gate is saved as a
 * gate directory, loaded back with seer_gate_load, and its block mask's
 * density and recall of the planted blocks are printed.
 *
 *   distill <out_gate_dir>
 *
 * Exits 0 on success, 1 on an API error (printing the library's message)
 * or when training did not learn the planted blocks.
 */
#include "example.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { TOKENS = 384, HQ = 4, HKV = 2, D = 16, BLOCKS = TOKENS / 64, STEPS = 40 };
static const double ROPE_THETA = 500000.0;
/* Besides block 0, query head h attends to key block PLANTED[h]. */
static const int PLANTED[HQ] = {2, 3, 4, 5};

/* Query head h looks along one of the two lowest-frequency RoPE dimensions. */
static int direction(int h) { return h % 2 == 0 ? D / 2 - 1 : D - 1; }

/* NeoX RoPE at `pos`, as the model applies it: pairs (x[i], x[i + D/2]). */
static void rope(float *x, int pos) {
    for (int i = 0; i < D / 2; i++) {
        double angle = pos * pow(ROPE_THETA, -2.0 * i / D);
        float c = (float)cos(angle), s = (float)sin(angle), a = x[i], b = x[i + D / 2];
        x[i] = a * c - b * s;
        x[i + D / 2] = b * c + a * s;
    }
}

/* One token's row of Q (kind 'q', head h) or K (kind 'k', KV head h): noise,
 * plus the attended direction. Written pre-RoPE to `nope`, post-RoPE to `roped`, as bf16. */
static void make_row(char kind, int pos, int h, uint64_t *rng, uint16_t *nope, uint16_t *roped) {
    float row[D];
    for (int i = 0; i < D; i++) row[i] = 0.8f * uniform(rng);
    if (kind == 'q') {
        row[direction(h)] += 4.0f;
    } else {
        for (int qh = h * (HQ / HKV); qh < (h + 1) * (HQ / HKV); qh++)
            if (pos / 64 == 0 || pos / 64 == PLANTED[qh]) row[direction(qh)] += 4.0f;
    }
    for (int i = 0; i < D; i++) {
        nope[i] = to_bf16(row[i]);
        row[i] = from_bf16(nope[i]);
    }
    rope(row, pos);
    for (int i = 0; i < D; i++) roped[i] = to_bf16(row[i]);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s <out_gate_dir>\n", argv[0]);
        return 2;
    }
    /* The inputs of one layer for one 384-token sequence. */
    static uint16_t q_nope[TOKENS][HQ][D], q[TOKENS][HQ][D], k_nope[TOKENS][HKV][D], k[TOKENS][HKV][D];
    uint64_t rng = 42;
    for (int pos = 0; pos < TOKENS; pos++) {
        for (int h = 0; h < HQ; h++) make_row('q', pos, h, &rng, q_nope[pos][h], q[pos][h]);
        for (int h = 0; h < HKV; h++) make_row('k', pos, h, &rng, k_nope[pos][h], k[pos][h]);
    }
    const int32_t cu[2] = {0, TOKENS};
    const SeerBatch batch = {1, cu, cu};
    SeerTensor tq_nope = tensor(q_nope, SEER_DTYPE_BF16, SEER_DEVICE_CPU, TOKENS, HQ, D);
    SeerTensor tk_nope = tensor(k_nope, SEER_DTYPE_BF16, SEER_DEVICE_CPU, TOKENS, HKV, D);
    SeerTensor tq = tensor(q, SEER_DTYPE_BF16, SEER_DEVICE_CPU, TOKENS, HQ, D);
    SeerTensor tk = tensor(k, SEER_DTYPE_BF16, SEER_DEVICE_CPU, TOKENS, HKV, D);

    /* A one-layer gate of the released type, random weights; threshold 0.05 as its mask rule. */
    SeerGateConfig cfg;
    CHECK(seer_gate_config_default(&cfg));
    cfg.num_layers = 1;
    cfg.num_q_heads = HQ;
    cfg.num_kv_heads = HKV;
    cfg.head_dim = D;
    cfg.gate_hidden = D;
    cfg.rope_theta = ROPE_THETA;
    cfg.threshold = 0.05f;
    cfg.last_block_dense = 0;
    SeerTrainParams params;
    CHECK(seer_train_params_default(STEPS, &params)); /* upstream's recipe, then a shorter warmup, higher lr */
    params.lr = 2e-2;
    params.warmup_steps = 2;
    SeerTrainer *trainer = NULL;
    CHECK(seer_trainer_create_random(&cfg, 7, &params, &trainer));

    SeerTrainFeedParams feed;
    CHECK(seer_train_feed_params_default(&feed)); /* layer 0, softmax scale 1/sqrt(head_dim) */
    double first = 0.0, loss = 0.0;
    for (int s = 0; s < STEPS; s++) {
        CHECK(seer_trainer_accumulate(trainer, &feed, &batch, &tq_nope, &tk_nope, &tq, &tk));
        SeerStepReport report;
        report.struct_size = sizeof report;
        CHECK(seer_trainer_step(trainer, &report));
        size_t written = 0;
        CHECK(seer_trainer_layer_losses(trainer, &loss, 1, &written));
        if (s == 0) first = loss;
        printf("step %2llu  lr %.2e  grad_norm %.3f  loss %.5f\n", (unsigned long long)report.step, report.lr,
               report.grad_norm, loss);
    }
    CHECK(seer_trainer_save_gate_dir(trainer, argv[1], SEER_DTYPE_F32, NULL));
    seer_trainer_destroy(trainer);
    seer_trainer_destroy(NULL);
    printf("saved the trained gate to %s\n", argv[1]);

    /* Load it as any released gate and compute its mask with the config's rule. */
    SeerGate *gate = NULL;
    CHECK(seer_gate_load(argv[1], &gate));
    SeerMaskSizes sizes;
    sizes.struct_size = sizeof sizes;
    CHECK(seer_mask_sizes(&batch, HQ, 64, &sizes));
    int32_t *counts = calloc(sizes.rows, sizeof *counts), *indices = calloc(sizes.indices_len, sizeof *indices);
    int64_t *offsets = calloc(sizes.row_offsets_len, sizeof *offsets);
    SeerBlockMask mask = {counts, sizes.rows, indices, sizes.indices_len, offsets, sizes.row_offsets_len,
                          SEER_DEVICE_CPU};
    SeerMaskParams mp;
    CHECK(seer_mask_params_default(gate, &mp));
    CHECK(seer_gate_compute_mask(gate, &mp, &batch, &tq_nope, &tk_nope, &mask));
    /* Rows are (head, query block) for one sequence; row r has r % BLOCKS + 1 causal blocks. */
    size_t selected = 0, causal = 0, planted = 0, found = 0;
    for (size_t r = 0; r < sizes.rows; r++) {
        int h = (int)(r / BLOCKS), i = (int)(r % BLOCKS);
        selected += (size_t)counts[r];
        causal += (size_t)i + 1;
        const int wanted[2] = {0, PLANTED[h]};
        for (int w = 0; w < 2; w++) {
            if (wanted[w] > i) continue; /* not causal for this row yet */
            planted++;
            for (int j = 0; j < counts[r]; j++) found += indices[offsets[r] + j] == wanted[w];
        }
    }
    double density = (double)selected / (double)causal, recall = (double)found / (double)planted;
    printf("reloaded gate, threshold %.2f: mask density %.3f (%zu of %zu causal blocks; the planted ones are %zu), "
           "planted-block recall %.3f\n",
           (double)mp.threshold, density, selected, causal, planted, recall);
    seer_gate_destroy(gate);
    free(counts); free(indices); free(offsets);
    if (!(loss < 0.5 * first && recall >= 0.9)) {
        fprintf(stderr, "training did not learn the planted blocks (loss %.5f -> %.5f, recall %.3f)\n", first, loss,
                recall);
        return 1;
    }
    printf("ok\n");
    return 0;
}
