/*
 * Bad input through the C API: every case must return its documented status
 * with a non-empty message, and never crash. Also checks the basic contracts
 * (version strings, destroy(NULL), out-parameters untouched on failure).
 *
 *   api_errors <gate_dir> <scratch_dir>
 *
 * <gate_dir> is a valid released gate (the upstream test gate); corrupted
 * copies of it are written under <scratch_dir>. Prints one line per check
 * and a closing "N passed, M failed"; exits non-zero if any failed.
 */
#include "seerattn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int passed = 0, failed = 0;

static void expect(const char *what, SeerStatus got, SeerStatus want) {
    const char *msg = seer_last_error_message();
    int ok = got == want && (want == SEER_OK || (msg != NULL && msg[0] != '\0'));
    if (ok) {
        passed++;
        printf("ok   %-58s %s%s%s\n", what, seer_status_name(got), want == SEER_OK ? "" : ": ",
               want == SEER_OK ? "" : msg);
    } else {
        failed++;
        printf("FAIL %-58s got %s, want %s (%s)\n", what, seer_status_name(got), seer_status_name(want),
               msg ? msg : "(null)");
    }
}

static void expect_true(const char *what, int cond) {
    if (cond) { passed++; printf("ok   %s\n", what); }
    else { failed++; printf("FAIL %s\n", what); }
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    *len = fread(buf, 1, (size_t)n, f);
    fclose(f);
    return buf;
}

static void write_file(const char *path, const char *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    fwrite(data, 1, len, f);
    fclose(f);
}

/* Make <scratch>/<name>/ holding the given config.json and .pth bytes. */
static void make_gate_dir(char *out, size_t cap, const char *scratch, const char *name,
                          const char *config, size_t config_len, const char *pth, size_t pth_len) {
    char cmd[1024], path[1024];
    snprintf(out, cap, "%s/%s", scratch, name);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", out);
    if (system(cmd) != 0) exit(2);
    snprintf(path, sizeof path, "%s/config.json", out);
    write_file(path, config, config_len);
    snprintf(path, sizeof path, "%s/attn_gate_weights.pth", out);
    write_file(path, pth, pth_len);
}

static uint32_t crc32(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return ~c;
}

static uint32_t rd32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t rd16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static void wr32(unsigned char *p, uint32_t v) { p[0] = v & 255; p[1] = v >> 8 & 255; p[2] = v >> 16 & 255; p[3] = v >> 24; }

/* After editing the stored data.pkl entry of a torch zip, rewrite its CRC-32
   in the local header and the central directory so only the pickle is wrong. */
static void fix_pickle_crc(char *zip, size_t len) {
    unsigned char *z = (unsigned char *)zip;
    for (size_t i = 0; i + 46 <= len; i++) {
        if (rd32(z + i) != 0x02014b50u) continue; /* central directory entry */
        uint16_t name_len = rd16(z + i + 28);
        const char *name = zip + i + 46;
        if (name_len < 8 || i + 46 + name_len > len || memcmp(name + name_len - 8, "data.pkl", 8) != 0) continue;
        uint32_t size = rd32(z + i + 20), local = rd32(z + i + 42);
        uint16_t lname = rd16(z + local + 26), lextra = rd16(z + local + 28);
        uint32_t crc = crc32(z + local + 30 + lname + lextra, size);
        wr32(z + i + 16, crc);
        wr32(z + local + 14, crc);
        return;
    }
}

static SeerTensor tensor(void *data, SeerDType dtype, int64_t t, int64_t h, int64_t d) {
    SeerTensor x;
    memset(&x, 0, sizeof x);
    x.data = data;
    x.dtype = (uint32_t)dtype;
    x.device = SEER_DEVICE_CPU;
    x.shape[0] = t; x.shape[1] = h; x.shape[2] = d;
    x.strides[0] = h * d; x.strides[1] = d; x.strides[2] = 1;
    return x;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <gate_dir> <scratch_dir>\n", argv[0]);
        return 2;
    }
    const char *gate_dir = argv[1], *scratch = argv[2];
    char path[2048], dir[1024];

    expect_true("seer_version is non-empty", seer_version()[0] != '\0');
    expect_true("seer_version matches the header", strcmp(seer_version(), SEER_VERSION_STRING) == 0);
    expect_true("seer_abi_version matches the header", seer_abi_version() == SEER_ABI_VERSION);
    expect_true("seer_status_name of an unknown code", strcmp(seer_status_name(999), "SEER_UNKNOWN_STATUS") == 0);
    seer_gate_destroy(NULL);
    expect_true("seer_gate_destroy(NULL) is a no-op", 1);

    /* ---- loading ---- */
    SeerGate *gate = (SeerGate *)0x1; /* must stay untouched on failure */
    expect("load: NULL dir", seer_gate_load(NULL, &gate), SEER_NULL_POINTER);
    expect("load: NULL out", seer_gate_load(gate_dir, NULL), SEER_NULL_POINTER);
    snprintf(path, sizeof path, "%s/does-not-exist", scratch);
    expect("load: missing directory", seer_gate_load(path, &gate), SEER_IO_ERROR);
    expect_true("load: out untouched on failure", gate == (SeerGate *)0x1);

    size_t config_len = 0, pth_len = 0;
    snprintf(path, sizeof path, "%s/config.json", gate_dir);
    char *config = read_file(path, &config_len);
    snprintf(path, sizeof path, "%s/attn_gate_weights.pth", gate_dir);
    char *pth = read_file(path, &pth_len);
    if (!config || !pth) { fprintf(stderr, "cannot read %s\n", gate_dir); return 2; }

    make_gate_dir(dir, sizeof dir, scratch, "truncated_pth", config, config_len, pth, pth_len / 2);
    expect("load: truncated .pth", seer_gate_load(dir, &gate), SEER_FORMAT_ERROR);
    make_gate_dir(dir, sizeof dir, scratch, "truncated_config", config, config_len / 2, pth, pth_len);
    expect("load: truncated config.json", seer_gate_load(dir, &gate), SEER_FORMAT_ERROR);
    {
        /* The pickle inside the archive names os.system instead of the rebuild function:
           same length, so the archive stays well-formed and only the pickle reader objects. */
        char *evil = malloc(pth_len);
        memcpy(evil, pth, pth_len);
        const char *needle = "torch._utils\n_rebuild_tensor_v2";
        size_t nlen = strlen(needle), patched = 0;
        for (size_t i = 0; i + nlen <= pth_len; i++) {
            if (memcmp(evil + i, needle, nlen) == 0) {
                /* GLOBAL reads "module\nname\n": make it "os\nsystem\n", pad with newlines. */
                memset(evil + i, '\n', nlen);
                memcpy(evil + i, "os\nsystem", 9);
                patched++;
                break;
            }
        }
        fix_pickle_crc(evil, pth_len);
        expect_true("forbidden-global fixture was patched", patched == 1);
        make_gate_dir(dir, sizeof dir, scratch, "forbidden_global", config, config_len, evil, pth_len);
        expect("load: pickle naming os.system", seer_gate_load(dir, &gate), SEER_FORMAT_ERROR);
        expect_true("load: the message names the forbidden global", strstr(seer_last_error_message(), "system") != NULL);
        free(evil);
    }
    {
        /* A safetensors file whose header claims more bytes than the file holds. */
        const char st[16] = {(char)0xff, (char)0xff, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '};
        snprintf(dir, sizeof dir, "%s/bad_safetensors", scratch);
        snprintf(path, sizeof path, "mkdir -p '%s'", dir);
        if (system(path) != 0) return 2;
        snprintf(path, sizeof path, "%s/config.json", dir);
        write_file(path, config, config_len);
        snprintf(path, sizeof path, "%s/gate.safetensors", dir);
        write_file(path, st, sizeof st);
        expect("load: corrupted .safetensors", seer_gate_load(dir, &gate), SEER_FORMAT_ERROR);
    }
    {
        const char *bad_rope = "{\"num_attention_heads\": 8, \"num_key_value_heads\": 2, \"head_dim\": 128,"
                               " \"num_hidden_layers\": 2, \"rope_theta\": 10000.0,"
                               " \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0},"
                               " \"seerattn_gate_type\": \"Qavg_Kmaxminavg\"}";
        make_gate_dir(dir, sizeof dir, scratch, "yarn", bad_rope, strlen(bad_rope), pth, pth_len);
        expect("load: unsupported rope type yarn", seer_gate_load(dir, &gate), SEER_UNSUPPORTED);
        const char *bad_type = "{\"num_attention_heads\": 8, \"num_key_value_heads\": 2, \"head_dim\": 128,"
                               " \"num_hidden_layers\": 2, \"seerattn_gate_type\": \"Qmean_Kmax\"}";
        make_gate_dir(dir, sizeof dir, scratch, "gate_type", bad_type, strlen(bad_type), pth, pth_len);
        expect("load: unsupported gate type", seer_gate_load(dir, &gate), SEER_UNSUPPORTED);
    }
    expect("load: the valid gate", seer_gate_load(gate_dir, &gate), SEER_OK);

    /* ---- config and weights ---- */
    SeerGateConfig cfg;
    cfg.struct_size = 0;
    expect("get_config: struct_size 0", seer_gate_get_config(gate, &cfg), SEER_INVALID_ARGUMENT);
    cfg.struct_size = sizeof cfg;
    expect("get_config: NULL gate", seer_gate_get_config(NULL, &cfg), SEER_NULL_POINTER);
    expect("get_config", seer_gate_get_config(gate, &cfg), SEER_OK);
    const int64_t hq = cfg.num_q_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;

    SeerGateConfig c2;
    expect("config_default", seer_gate_config_default(&c2), SEER_OK);
    SeerGate *made = NULL;
    expect("create: geometry left at zero", seer_gate_create(&c2, &made), SEER_INVALID_ARGUMENT);
    c2.num_layers = 1; c2.num_q_heads = 6; c2.num_kv_heads = 4; c2.head_dim = 128;
    expect("create: kv heads not dividing q heads", seer_gate_create(&c2, &made), SEER_INVALID_ARGUMENT);
    c2.num_kv_heads = 2; c2.block_size = 32;
    expect("create: block size 32", seer_gate_create(&c2, &made), SEER_UNSUPPORTED);
    c2.block_size = 64; c2.struct_size = 8;
    expect("create: struct_size too small", seer_gate_create(&c2, &made), SEER_INVALID_ARGUMENT);
    c2.struct_size = sizeof c2; c2.q_pools = 0;
    expect("create: no Q pooling", seer_gate_create(&c2, &made), SEER_INVALID_ARGUMENT);
    c2.q_pools = SEER_POOL_AVG; c2.rope_scaling = 9;
    expect("create: unknown rope scaling", seer_gate_create(&c2, &made), SEER_INVALID_ARGUMENT);
    c2.rope_scaling = SEER_ROPE_NONE;
    expect("create: valid config", seer_gate_create(&c2, &made), SEER_OK);
    uint16_t *w = calloc((size_t)(6 * 384 * 128), sizeof(uint16_t));
    SeerTensor tw = tensor(w, SEER_DTYPE_BF16, 6, 384, 128);
    expect("set_layer_weights: layer out of range", seer_gate_set_layer_weights(made, 1, &tw, NULL), SEER_INVALID_ARGUMENT);
    tw.shape[1] = 383;
    expect("set_layer_weights: wrong shape", seer_gate_set_layer_weights(made, 0, &tw, NULL), SEER_INVALID_ARGUMENT);
    tw.shape[1] = 384; tw.dtype = 7;
    expect("set_layer_weights: unknown dtype", seer_gate_set_layer_weights(made, 0, &tw, NULL), SEER_INVALID_ARGUMENT);
    tw.dtype = SEER_DTYPE_BF16;
    expect("set_layer_weights: NULL weight", seer_gate_set_layer_weights(made, 0, NULL, NULL), SEER_NULL_POINTER);
    expect("set_layer_weights: unexpected Q weight", seer_gate_set_layer_weights(made, 0, &tw, &tw), SEER_INVALID_ARGUMENT);
    expect_true("has_layer before weights is 0", seer_gate_has_layer(made, 0) == 0);
    expect("set_layer_weights", seer_gate_set_layer_weights(made, 0, &tw, NULL), SEER_OK);
    expect_true("has_layer after weights is 1", seer_gate_has_layer(made, 0) == 1);
    seer_gate_destroy(made);
    expect("use after destroy is detected", seer_gate_get_config(made, &cfg), SEER_INVALID_ARGUMENT);
    seer_gate_destroy(made); /* a double destroy is ignored, with a message */
    expect_true("double destroy is reported", strstr(seer_last_error_message(), "not a live handle") != NULL);
    expect("set_layer_weights after destroy", seer_gate_set_layer_weights(made, 0, &tw, NULL), SEER_INVALID_ARGUMENT);
    {
        uint64_t not_a_gate[4] = {0, 0, 0, 0};
        expect("get_config: not a handle", seer_gate_get_config((const SeerGate *)(void *)not_a_gate, &cfg), SEER_INVALID_ARGUMENT);
    }
    free(w);

    /* ---- mask ---- */
    const int32_t cu_q[3] = {0, 100, 150}, cu_k[3] = {0, 100, 230};
    SeerBatch batch = {2, cu_q, cu_k};
    const int64_t tq = 150, tk = 230;
    uint16_t *qn = calloc((size_t)(tq * hq * d), 2), *kn = calloc((size_t)(tk * hkv * d), 2);
    uint16_t *v = calloc((size_t)(tk * hkv * d), 2);
    float *qf = calloc((size_t)(tq * hq * d), 4);
    SeerTensor tqn = tensor(qn, SEER_DTYPE_BF16, tq, hq, d), tkn = tensor(kn, SEER_DTYPE_BF16, tk, hkv, d);
    SeerTensor tv = tensor(v, SEER_DTYPE_BF16, tk, hkv, d);
    SeerMaskSizes sizes;
    sizes.struct_size = sizeof sizes;
    SeerBatch empty = {0, cu_q, cu_k};
    expect("mask_sizes: zero sequences", seer_mask_sizes(&empty, (uint32_t)hq, 64, &sizes), SEER_INVALID_ARGUMENT);
    const int32_t zero_q[2] = {0, 0}, zero_k[2] = {0, 10};
    SeerBatch zero_len = {1, zero_q, zero_k};
    expect("mask_sizes: zero-length query", seer_mask_sizes(&zero_len, (uint32_t)hq, 64, &sizes), SEER_INVALID_ARGUMENT);
    const int32_t long_q[2] = {0, 20}, short_k[2] = {0, 10};
    SeerBatch q_gt_k = {1, long_q, short_k};
    expect("mask_sizes: q_len > k_len", seer_mask_sizes(&q_gt_k, (uint32_t)hq, 64, &sizes), SEER_INVALID_ARGUMENT);
    expect("mask_sizes: block size 128", seer_mask_sizes(&batch, (uint32_t)hq, 128, &sizes), SEER_UNSUPPORTED);
    expect("mask_sizes", seer_mask_sizes(&batch, (uint32_t)hq, 64, &sizes), SEER_OK);
    int32_t *counts = calloc(sizes.rows, 4), *indices = calloc(sizes.indices_len, 4);
    int64_t *offsets = calloc(sizes.row_offsets_len, 8);
    SeerBlockMask mask = {counts, sizes.rows, indices, sizes.indices_len, offsets, sizes.row_offsets_len, SEER_DEVICE_CPU};
    SeerMaskParams mp;
    expect("mask_params_default", seer_mask_params_default(gate, &mp), SEER_OK);
    mp.layer = cfg.num_layers - 1;
    expect("compute_mask: NULL q_nope", seer_gate_compute_mask(gate, &mp, &batch, NULL, &tkn, &mask), SEER_NULL_POINTER);
    SeerTensor bad = tqn;
    bad.shape[1] = hq + 1;
    expect("compute_mask: wrong head count", seer_gate_compute_mask(gate, &mp, &batch, &bad, &tkn, &mask), SEER_INVALID_ARGUMENT);
    /* f32 pre-RoPE input is taken (rounded to bf16, as llama.cpp's F32 Qcur would be). */
    bad = tensor(qf, SEER_DTYPE_F32, tq, hq, d);
    expect("compute_mask: f32 input is rounded to bf16", seer_gate_compute_mask(gate, &mp, &batch, &bad, &tkn, &mask), SEER_OK);
    bad = tqn;
    bad.device = SEER_DEVICE_CUDA;
    expect("compute_mask: CUDA q_nope, CPU k_nope", seer_gate_compute_mask(gate, &mp, &batch, &bad, &tkn, &mask), SEER_INVALID_ARGUMENT);
    bad = tkn;
    bad.device = SEER_DEVICE_CUDA;
    expect("compute_mask: CPU q_nope, CUDA k_nope", seer_gate_compute_mask(gate, &mp, &batch, &tqn, &bad, &mask), SEER_INVALID_ARGUMENT);
    expect_true("compute_mask: the message names k_nope", strstr(seer_last_error_message(), "k_nope") != NULL);
    bad = tqn;
    bad.data = (char *)qn + 1;
    expect("compute_mask: misaligned data", seer_gate_compute_mask(gate, &mp, &batch, &bad, &tkn, &mask), SEER_INVALID_ARGUMENT);
    bad = tqn;
    bad.strides[0] = -1;
    expect("compute_mask: negative stride", seer_gate_compute_mask(gate, &mp, &batch, &bad, &tkn, &mask), SEER_INVALID_ARGUMENT);
    bad = tqn;
    bad.strides[0] = INT64_MAX / 2;
    expect("compute_mask: stride overflowing", seer_gate_compute_mask(gate, &mp, &batch, &bad, &tkn, &mask), SEER_INVALID_ARGUMENT);
    bad = tqn;
    bad.shape[0] = 0;
    expect("compute_mask: zero extent", seer_gate_compute_mask(gate, &mp, &batch, &bad, &tkn, &mask), SEER_INVALID_ARGUMENT);
    bad = tqn;
    bad.device = 5;
    expect("compute_mask: device 5", seer_gate_compute_mask(gate, &mp, &batch, &bad, &tkn, &mask), SEER_INVALID_ARGUMENT);
    SeerBlockMask small = mask;
    small.device = 5;
    expect("compute_mask: mask device 5", seer_gate_compute_mask(gate, &mp, &batch, &tqn, &tkn, &small), SEER_INVALID_ARGUMENT);
    small = mask;
    small.indices_len = 3;
    expect("compute_mask: indices too small", seer_gate_compute_mask(gate, &mp, &batch, &tqn, &tkn, &small), SEER_BUFFER_TOO_SMALL);
    small = mask;
    small.counts = (int32_t *)qn;
    expect("compute_mask: output overlapping input", seer_gate_compute_mask(gate, &mp, &batch, &tqn, &tkn, &small), SEER_INVALID_ARGUMENT);
    mp.nz_ratio = 1.5f; mp.sparsity_method = SEER_SPARSITY_NZ_RATIO;
    expect("compute_mask: nz_ratio 1.5", seer_gate_compute_mask(gate, &mp, &batch, &tqn, &tkn, &mask), SEER_INVALID_ARGUMENT);
    mp.nz_ratio = 0.5f; mp.layer = 99;
    expect("compute_mask: layer out of range", seer_gate_compute_mask(gate, &mp, &batch, &tqn, &tkn, &mask), SEER_INVALID_ARGUMENT);
    mp.layer = cfg.num_layers - 1; mp.struct_size = 4;
    expect("compute_mask: params struct_size 4", seer_gate_compute_mask(gate, &mp, &batch, &tqn, &tkn, &mask), SEER_INVALID_ARGUMENT);
    mp.struct_size = sizeof mp;
    counts[0] = -7;
    expect("compute_mask", seer_gate_compute_mask(gate, &mp, &batch, &tqn, &tkn, &mask), SEER_OK);
    expect_true("compute_mask wrote the counts", counts[0] == 1);

    /* ---- the CUDA gate: sizes, upload, descriptors (no GPU needed) ---- */
    {
        int cc = 0, sms = 0;
        /* SEER_OK on a GPU machine, SEER_NO_DEVICE without one, SEER_UNSUPPORTED without kernels. */
        SeerStatus dev = seer_cuda_device_info(&cc, &sms);
        size_t ws = 12345;
        expect("gate_workspace_size: CPU", seer_gate_workspace_size(gate, &batch, SEER_DEVICE_CPU, &ws), SEER_OK);
        expect_true("gate_workspace_size: the CPU needs none", ws == 0);
        if (dev == SEER_UNSUPPORTED) {
            expect("gate_workspace_size: CUDA without kernels", seer_gate_workspace_size(gate, &batch, SEER_DEVICE_CUDA, &ws), SEER_UNSUPPORTED);
        } else {
            expect("gate_workspace_size: CUDA", seer_gate_workspace_size(gate, &batch, SEER_DEVICE_CUDA, &ws), SEER_OK);
            expect_true("gate_workspace_size: CUDA is positive, 256-aligned", ws > 0 && ws % 256 == 0);
        }
        size_t none = 7;
        expect("gate_workspace_size: device 7", seer_gate_workspace_size(gate, &batch, 7, &none), SEER_INVALID_ARGUMENT);
        expect_true("gate_workspace_size: out untouched on failure", none == 7);
        expect("prefill_workspace_size: CPU", seer_prefill_workspace_size(&batch, (uint32_t)hq, (uint32_t)d, SEER_DEVICE_CPU, &none), SEER_OK);
        if (dev == SEER_UNSUPPORTED) {
            expect("prefill_workspace_size: CUDA without kernels", seer_prefill_workspace_size(&batch, (uint32_t)hq, (uint32_t)d, SEER_DEVICE_CUDA, &none), SEER_UNSUPPORTED);
        } else {
            expect("prefill_workspace_size: CUDA", seer_prefill_workspace_size(&batch, (uint32_t)hq, (uint32_t)d, SEER_DEVICE_CUDA, &none), SEER_OK);
            expect_true("prefill_workspace_size: CUDA, unsplit: the 256 bytes of work-item counters", none == 256);
            expect("prefill_workspace_size: CUDA head_dim 256", seer_prefill_workspace_size(&batch, (uint32_t)hq, 256, SEER_DEVICE_CUDA, &none), SEER_UNSUPPORTED);
        }

        /* A gate the CUDA path does not take: gate_hidden != head_dim (it has a Q projection). */
        c2.gate_hidden = 64;
        SeerGate *odd = NULL;
        expect("create: gate_hidden 64, head_dim 128", seer_gate_create(&c2, &odd), SEER_OK);
        expect("gate_workspace_size: CUDA, unsupported gate", seer_gate_workspace_size(odd, &batch, SEER_DEVICE_CUDA, &none), SEER_UNSUPPORTED);
        expect("upload: unsupported gate", seer_gate_upload(odd), SEER_UNSUPPORTED);
        seer_gate_destroy(odd);
        expect("upload: NULL gate", seer_gate_upload(NULL), SEER_NULL_POINTER);

        /* CUDA descriptors at made-up device addresses: every check below
           happens on the host, before anything could touch them. */
        const uintptr_t base = (uintptr_t)0x7f0000000000ull, gap = (uintptr_t)64 << 20;
        SeerTensor dq = tqn, dk = tkn;
        dq.device = dk.device = SEER_DEVICE_CUDA;
        dq.data = (void *)base;
        dk.data = (void *)(base + gap);
        SeerBlockMask dm = {(int32_t *)(base + 2 * gap), sizes.rows, (int32_t *)(base + 3 * gap), sizes.indices_len,
                            (int64_t *)(base + 4 * gap), sizes.row_offsets_len, SEER_DEVICE_CUDA};
        SeerMaskParams dp = mp;
        dp.workspace = (void *)(base + 5 * gap);
        dp.workspace_bytes = ws;
        expect("compute_mask: CUDA inputs, CPU mask", seer_gate_compute_mask(gate, &dp, &batch, &dq, &dk, &mask), SEER_INVALID_ARGUMENT);
        SeerMaskParams overlap = dp;
        overlap.workspace = (void *)(base + 4096);
        expect("compute_mask: workspace overlapping q_nope", seer_gate_compute_mask(gate, &overlap, &batch, &dq, &dk, &dm), SEER_INVALID_ARGUMENT);
        SeerTensor neg = dq;
        neg.strides[1] = -(int64_t)d;
        expect("compute_mask: CUDA, negative stride", seer_gate_compute_mask(gate, &dp, &batch, &neg, &dk, &dm), SEER_INVALID_ARGUMENT);
        if (dev != SEER_UNSUPPORTED) {
            expect("compute_mask: CUDA before seer_gate_upload", seer_gate_compute_mask(gate, &dp, &batch, &dq, &dk, &dm), SEER_INVALID_ARGUMENT);
            expect_true("compute_mask: the message says to upload", strstr(seer_last_error_message(), "seer_gate_upload") != NULL);
        }
        /* The K-block cache (chunked prefill): its size, the update, cached masks. */
        size_t cache_bytes = 0;
        if (dev == SEER_UNSUPPORTED) {
            expect("kblock_cache_size: without kernels", seer_kblock_cache_size(gate, 1000, &cache_bytes), SEER_UNSUPPORTED);
        } else {
            expect("kblock_cache_size", seer_kblock_cache_size(gate, 1000, &cache_bytes), SEER_OK);
            expect_true("kblock_cache_size: positive, 256-aligned", cache_bytes > 0 && cache_bytes % 256 == 0);
        }
        expect("kblock_cache_size: NULL out", seer_kblock_cache_size(gate, 1000, NULL), SEER_NULL_POINTER);
        /* One cache per sequence of the batch (at most 3 here). */
        const uint64_t caches[4] = {(uint64_t)(base + 7 * gap), (uint64_t)(base + 8 * gap), (uint64_t)(base + 9 * gap),
                                    (uint64_t)(base + 10 * gap)};
        const size_t nseq = batch.num_seqs;
        expect_true("kblock caches: a batch of at most 3 sequences", nseq <= 3);
        SeerTensor dk_new = dk;
        dk_new.data = (void *)(base + 6 * gap);
        expect("kblock_cache_update: one cache too many", seer_kblock_cache_update(gate, &dp, &batch, &dk_new, caches, nseq + 1), SEER_INVALID_ARGUMENT);
        expect_true("kblock_cache_update: the message names num_caches", strstr(seer_last_error_message(), "num_caches") != NULL);
        SeerMaskParams cp = mp;
        cp.maybe_kblock_caches = caches;
        cp.num_kblock_caches = nseq;
        expect("compute_mask: K-block caches with host buffers", seer_gate_compute_mask(gate, &cp, &batch, &tqn, &tkn, &mask), SEER_INVALID_ARGUMENT);
        expect_true("compute_mask: caches are a CUDA path feature", strstr(seer_last_error_message(), "CUDA path feature") != NULL);
        if (dev != SEER_UNSUPPORTED) {
            expect("kblock_cache_update: before seer_gate_upload", seer_kblock_cache_update(gate, &dp, &batch, &dk_new, caches, nseq), SEER_INVALID_ARGUMENT);
            expect_true("kblock_cache_update: the message says to upload", strstr(seer_last_error_message(), "seer_gate_upload") != NULL);
            SeerMaskParams dcp = dp;
            dcp.maybe_kblock_caches = caches;
            dcp.num_kblock_caches = nseq;
            expect("compute_mask: cached, no k_nope, before seer_gate_upload", seer_gate_compute_mask(gate, &dcp, &batch, &dq, NULL, &dm), SEER_INVALID_ARGUMENT);
            expect_true("compute_mask: cached, the message says to upload", strstr(seer_last_error_message(), "seer_gate_upload") != NULL);
        }
        /* Uploads where there is a GPU, says why not where there is none. */
        expect("upload", seer_gate_upload(gate), dev);
    }

    /* ---- prefill ---- */
    SeerPrefillParams pp;
    expect("prefill_params_default", seer_prefill_params_default(&pp), SEER_OK);
    float *out = calloc((size_t)(tq * hq * d), 4);
    float *lse = calloc((size_t)(tq * hq), 4);
    SeerTensor tout = tensor(out, SEER_DTYPE_F32, tq, hq, d);
    expect("prefill", seer_sparse_prefill(&pp, &batch, &tqn, &tkn, &tv, &mask, &tout, lse, (size_t)(tq * hq)), SEER_OK);
    expect("prefill: NULL v", seer_sparse_prefill(&pp, &batch, &tqn, &tkn, NULL, &mask, &tout, NULL, 0), SEER_NULL_POINTER);
    expect("prefill: lse too short", seer_sparse_prefill(&pp, &batch, &tqn, &tkn, &tv, &mask, &tout, lse, 5), SEER_INVALID_ARGUMENT);
    SeerTensor alias = tensor(qn, SEER_DTYPE_BF16, tq, hq, d);
    expect("prefill: out aliasing q", seer_sparse_prefill(&pp, &batch, &tqn, &tkn, &tv, &mask, &alias, NULL, 0), SEER_INVALID_ARGUMENT);
    SeerTensor f16k = tkn;
    f16k.dtype = SEER_DTYPE_F16;
    expect("prefill: k dtype differs from q", seer_sparse_prefill(&pp, &batch, &tqn, &f16k, &tv, &mask, &tout, NULL, 0), SEER_INVALID_ARGUMENT);
    /* An f32 q is rounded to k's dtype; f32 keys and values are not taken. */
    SeerTensor f32q = tensor(qf, SEER_DTYPE_F32, tq, hq, d);
    expect("prefill: f32 q is rounded to k's dtype", seer_sparse_prefill(&pp, &batch, &f32q, &tkn, &tv, &mask, &tout, NULL, 0), SEER_OK);
    SeerTensor f32k = tensor(qf, SEER_DTYPE_F32, tk, hkv, d); /* read only: may overlap q */
    expect("prefill: f32 k and v", seer_sparse_prefill(&pp, &batch, &f32q, &f32k, &f32k, &mask, &tout, NULL, 0), SEER_UNSUPPORTED);
    SeerTensor q96 = tensor(qn, SEER_DTYPE_BF16, tq, hq, 96), k96 = tensor(kn, SEER_DTYPE_BF16, tk, hkv, 96);
    SeerTensor v96 = tensor(v, SEER_DTYPE_BF16, tk, hkv, 96), o96 = tensor(out, SEER_DTYPE_F32, tq, hq, 96);
    expect("prefill: head_dim 96", seer_sparse_prefill(&pp, &batch, &q96, &k96, &v96, &mask, &o96, NULL, 0), SEER_UNSUPPORTED);
    pp.softmax_scale = -1.0f;
    expect("prefill: negative scale", seer_sparse_prefill(&pp, &batch, &tqn, &tkn, &tv, &mask, &tout, NULL, 0), SEER_INVALID_ARGUMENT);
    pp.softmax_scale = 0.0f;
    int32_t saved = indices[offsets[1]];
    counts[1] = 1;
    indices[offsets[1]] = 5; /* row 1 is query block 1: block 5 is above its diagonal */
    expect("prefill: non-causal mask index", seer_sparse_prefill(&pp, &batch, &tqn, &tkn, &tv, &mask, &tout, NULL, 0), SEER_INVALID_ARGUMENT);
    indices[offsets[1]] = saved;

    /* ---- dense conversion ---- */
    uint8_t *dense = calloc(sizes.dense_bytes, 1);
    expect("mask_to_dense", seer_mask_to_dense(&batch, (uint32_t)hq, 64, &mask, dense, sizes.dense_bytes), SEER_OK);
    expect("mask_to_dense: wrong length", seer_mask_to_dense(&batch, (uint32_t)hq, 64, &mask, dense, 3), SEER_BUFFER_TOO_SMALL);
    expect("mask_from_dense: wrong length", seer_mask_from_dense(&batch, (uint32_t)hq, 64, dense, 3, &mask), SEER_INVALID_ARGUMENT);
    expect("mask_from_dense", seer_mask_from_dense(&batch, (uint32_t)hq, 64, dense, sizes.dense_bytes, &mask), SEER_OK);

    seer_gate_destroy(gate);
    free(config); free(pth); free(qn); free(kn); free(v); free(qf); free(counts); free(indices); free(offsets);
    free(out); free(lse); free(dense);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
