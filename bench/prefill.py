#!/usr/bin/env python3
"""Sparse prefill benchmark: seerattn against its anchors, one run, same inputs.

Runs on the GPU machine (needs PyTorch with CUDA; FlexAttention for the
flex anchor). Loads the library staged by `scripts/gpu-test.sh build`
(.devbuild/lib/libseerattn.so) through ctypes and times, for each sequence
length and mask density, on the same q, k, v tensors:

  seerattn_prefill  seer_sparse_prefill on the 64x64 block mask
  flex_block64      torch FlexAttention with the same block mask
                    (kernel_options BLOCK_M = BLOCK_N = 64), compiled
  sdpa_flash        dense causal SDPA, FlashAttention-2 backend (density 1)
  sdpa_cudnn        dense causal SDPA, cuDNN backend (density 1)

With --total NZ (e.g. 0.1), also the whole layer at that density, on a
synthetic gate (the released Qavg_Kmaxminavg type, gate_hidden 128,
random weights, the top-k rule keeping NZ of each row's causal blocks):

  seerattn_gate     seer_gate_compute_mask alone (through bindings/python)
  seerattn_prefill  seer_sparse_prefill on the mask the gate made (tag
                    "gate_mask"), for the split of the total
  seerattn_total    seer_gate_attention: gate, mask and prefill in one call

Shape: one sequence, 32 q heads, 8 kv heads, head_dim 128 (--head-dim 64
for the other size the kernels are built for), bf16, causal.
Masks: for each query block row, the diagonal block plus randomly chosen
earlier blocks, round(density * (row + 1)) blocks in all (density 1 is the
full causal map). FLOPs are counted on computed blocks: 4 * 64 * 64 * D per
selected block, half of that for diagonal blocks (the causal half), so that
density 1 counts what dense causal attention counts (2 * N^2 * D per head,
up to the diagonal's rounding).

Before timing, each seerattn output is checked against the anchor on the
same inputs (flex at that density; SDPA flash at density 1): relative error
at most 2e-2 or the benchmark fails.

Timing: CUDA events around each call, median of the repeats, three input
sets rotated so repeated calls do not measure L2-resident data. Every
measurement starts from the same state: 1 s idle, then at least 0.3 s of
warm-up calls (an idle H100 sits at 345 MHz). The rest matters: dense
prefill draws the H100's 700 W cap and its clock falls to 1600-1700 MHz,
so a measurement that followed a heavy one without it was up to 15% slower
(the "50% density dip" of earlier runs: 50% timed right after 100%; with
50% first, 100% second, the 100% run was the slow one).

Usage: python3 bench/prefill.py OUT.jsonl [--seqs 8192,32768,65536]
           [--densities 1,0.5,0.2,0.1,0.05] [--lib .devbuild/lib/libseerattn.so]
           [--head-dim 128|64] [--chunk N] [--total NZ] [--no-anchors] [--tag T]
"""
import argparse
import ctypes
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

BLOCK = 64
HQ, HKV, D = 32, 8, 128


# ---------------------------------------------------------------- library


class SeerTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_uint32),
        ("device", ctypes.c_uint32),
        ("shape", ctypes.c_int64 * 3),
        ("strides", ctypes.c_int64 * 3),
    ]


class SeerBatch(ctypes.Structure):
    _fields_ = [
        ("num_seqs", ctypes.c_uint32),
        ("cu_seqlens_q", ctypes.POINTER(ctypes.c_int32)),
        ("cu_seqlens_k", ctypes.POINTER(ctypes.c_int32)),
    ]


class SeerBlockMask(ctypes.Structure):
    _fields_ = [
        ("counts", ctypes.c_void_p),
        ("counts_len", ctypes.c_size_t),
        ("indices", ctypes.c_void_p),
        ("indices_len", ctypes.c_size_t),
        ("row_offsets", ctypes.c_void_p),
        ("row_offsets_len", ctypes.c_size_t),
        ("device", ctypes.c_uint32),
    ]


class SeerPrefillParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("softmax_scale", ctypes.c_float),
        ("block_size", ctypes.c_uint32),
        ("cuda_stream", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
    ]


DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def descriptor(t):
    assert t.dim() == 3 and t.is_cuda
    return SeerTensor(t.data_ptr(), DTYPES[t.dtype], 1, (ctypes.c_int64 * 3)(*t.shape), (ctypes.c_int64 * 3)(*t.stride()))


class Library:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.seer_last_error_message.restype = ctypes.c_char_p
        self.lib.seer_prefill_params_default.argtypes = [ctypes.POINTER(SeerPrefillParams)]
        self.lib.seer_sparse_prefill.argtypes = [
            ctypes.POINTER(SeerPrefillParams),
            ctypes.POINTER(SeerBatch),
            ctypes.POINTER(SeerTensor),
            ctypes.POINTER(SeerTensor),
            ctypes.POINTER(SeerTensor),
            ctypes.POINTER(SeerBlockMask),
            ctypes.POINTER(SeerTensor),
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]

    def check(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what}: status {status}: {self.lib.seer_last_error_message().decode()}")

    def workspace_size(self, q_len, k_len):
        cu_q, cu_k = (ctypes.c_int32 * 2)(0, q_len), (ctypes.c_int32 * 2)(0, k_len)
        batch = SeerBatch(1, cu_q, cu_k)
        size = ctypes.c_size_t(0)
        self.check(self.lib.seer_prefill_workspace_size(ctypes.byref(batch), HQ, D, 1, ctypes.byref(size)), "ws size")
        return size.value

    def prefill_call(self, q, k, v, mask, out, workspace=None):
        """A closure that enqueues seer_sparse_prefill on the current stream
        (descriptors built once, as an engine would). q may be the last
        q.shape[0] of k.shape[0] positions (a chunk)."""
        cu_q = (ctypes.c_int32 * 2)(0, q.shape[0])
        cu_k = (ctypes.c_int32 * 2)(0, k.shape[0])
        batch = SeerBatch(1, cu_q, cu_k)
        cu = (cu_q, cu_k)
        params = SeerPrefillParams()
        self.check(self.lib.seer_prefill_params_default(ctypes.byref(params)), "params")
        if workspace is not None:
            params.workspace = workspace.data_ptr()
            params.workspace_bytes = workspace.numel()
        counts, indices, offsets = mask
        m = SeerBlockMask(
            counts.data_ptr(), counts.numel(), indices.data_ptr(), indices.numel(), offsets.data_ptr(), offsets.numel(), 1
        )
        tq, tk, tv, to = descriptor(q), descriptor(k), descriptor(v), descriptor(out)
        keep = (cu, batch, params, m, tq, tk, tv, to)

        def call():
            _ = keep
            # The stream current at the call (a graph capture's, when capturing).
            params.cuda_stream = torch.cuda.current_stream().cuda_stream
            self.check(
                self.lib.seer_sparse_prefill(
                    ctypes.byref(params), ctypes.byref(batch), ctypes.byref(tq), ctypes.byref(tk), ctypes.byref(tv),
                    ctypes.byref(m), ctypes.byref(to), None, 0,
                ),
                "seer_sparse_prefill",
            )

        return call


# ---------------------------------------------------------------- masks


def block_mask(nb, density, gen):
    """Dense bool [HQ, nb, nb]: per row the diagonal plus random earlier
    blocks, round(density * (row + 1)) in all."""
    rows = torch.arange(nb, device="cuda")
    want = torch.clamp(torch.round(density * (rows + 1).double()).long(), min=1)
    score = torch.rand(HQ, nb, nb, device="cuda", generator=gen)
    causal = rows[None, :] <= rows[:, None]
    score = torch.where(causal, score, torch.full_like(score, -1.0))
    score[:, rows, rows] = 2.0  # the diagonal first
    rank = torch.argsort(torch.argsort(score, dim=-1, descending=True), dim=-1)
    return (rank < want[None, :, None]) & causal


def index_list(dense, first_row=0):
    """The library's index-list mask (rows head-major, each row's capacity
    its causal length) from a dense [HQ, nb, nb] map; only the rows from
    absolute query block `first_row` (a chunk's query blocks)."""
    dense = dense[:, first_row:, :]
    h, nb, _ = dense.shape
    counts = dense.sum(-1).to(torch.int32).reshape(-1)
    cap = torch.arange(first_row + 1, first_row + nb + 1, device="cuda", dtype=torch.int64).repeat(h)
    offsets = torch.zeros(h * nb + 1, device="cuda", dtype=torch.int64)
    offsets[1:] = torch.cumsum(cap, 0)
    pos = dense.to(torch.int64).cumsum(-1) - 1
    hh, ii, jj = torch.nonzero(dense, as_tuple=True)
    slot = offsets[hh * nb + ii] + pos[hh, ii, jj]
    indices = torch.full((int(offsets[-1]),), -1, device="cuda", dtype=torch.int32)
    indices[slot] = jj.to(torch.int32)
    return counts, indices, offsets


def flex_block_mask(dense, n):
    from torch.nn.attention.flex_attention import BlockMask

    nb = dense.shape[1]
    rows = torch.arange(nb, device="cuda")
    diag = torch.zeros_like(dense)
    diag[:, rows, rows] = True
    full = dense & ~diag
    partial = dense & diag

    def lists(m):
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num[None], idx[None]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    try:
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=causal, seq_lengths=(n, n))
    except TypeError:  # releases without seq_lengths
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=causal)


def computed_flops_rows(rows, first):
    """FLOPs of the computed blocks of query-block rows `first..` ([HQ, r, nb])."""
    r = rows.shape[1]
    idx = torch.arange(r, device="cuda")
    diag = int(rows[:, idx, idx + first].sum())
    total = int(rows.sum())
    return (total - diag) * 4 * BLOCK * BLOCK * D + diag * 2 * BLOCK * BLOCK * D


def computed_flops(dense):
    nb = dense.shape[1]
    rows = torch.arange(nb, device="cuda")
    diag = int(dense[:, rows, rows].sum())
    total = int(dense.sum())
    return (total - diag) * 4 * BLOCK * BLOCK * D + diag * 2 * BLOCK * BLOCK * D


# ---------------------------------------------------------------- gate


def write_gate_dir(path, seed):
    """A one-layer gate directory of the released format for the benchmark's
    shape: config.json (Qavg_Kmaxminavg, gate_hidden 128, plain RoPE) and
    random weights `mask_linear_k.weight` [HQ, 3 * D, 128] as bf16
    safetensors (written here: no safetensors package needed)."""
    os.makedirs(path, exist_ok=True)
    hidden = 128
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HQ * D,
        "num_attention_heads": HQ, "num_key_value_heads": HKV, "head_dim": D, "num_hidden_layers": 1,
        "max_position_embeddings": 262144, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
        "seerattn_gate_type": "Qavg_Kmaxminavg", "seerattn_gate_block_size": BLOCK,
        "seerattn_gate_hidden_size": hidden, "seerattn_gate_force_double": False,
        "seerattn_sparsity_method": "nz_ratio", "seerattn_threshold": 0.0, "seerattn_nz_ratio": 0.1,
        "seerattn_last_block_dense": True,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(HQ, 3 * D, hidden, generator=g) / math.sqrt(3 * D)).to(torch.bfloat16)
    data = w.view(torch.int16).numpy().tobytes()
    name = "model.layers.0.self_attn.attn_gate.mask_linear_k.weight"
    header = json.dumps({
        "__metadata__": {"format": "pt"},
        name: {"dtype": "BF16", "shape": list(w.shape), "data_offsets": [0, len(data)]},
    }).encode()
    header += b" " * (-len(header) % 8)
    with open(os.path.join(path, "attn_gate_weights.safetensors"), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + data)


def dense_of(mask, nb):
    """Dense bool [HQ, nb, nb] of an index-list mask of one sequence (device
    tensors counts, indices, row_offsets)."""
    counts, indices, offsets = mask
    rows = counts.numel()
    total = int(offsets[-1])
    slot = torch.arange(total, device="cuda")
    row = torch.searchsorted(offsets[1:], slot, right=True)
    keep = (slot - offsets[row]) < counts[row].long()
    dense = torch.zeros(rows, nb, dtype=torch.bool, device="cuda")
    dense[row[keep], indices[:total][keep].long()] = True
    return dense.view(HQ, nb, nb)


# ---------------------------------------------------------------- timing


def time_ms(calls, warmup, reps, warm_s=0.3, rest_s=1.0):
    """Median ms of `reps` timed calls, rotating over `calls` (input sets),
    after `rest_s` seconds idle and then at least `warmup` calls and
    `warm_s` seconds of them."""
    torch.cuda.synchronize()
    time.sleep(rest_s)
    start = time.perf_counter()
    i = 0
    while i < warmup or time.perf_counter() - start < warm_s:
        calls[i % len(calls)]()
        i += 1
        if i % 4 == 0:
            torch.cuda.synchronize()  # host time then tracks device time
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[i % len(calls)]()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def time_total(args, lib, n, sets, emit):
    """The whole layer at top-k density args.total: the gate alone, the
    prefill on its mask, and both in one seer_gate_attention call, on the
    same inputs (pre-RoPE q and k are the post-RoPE ones here: the timing
    does not depend on their values)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
    os.environ.setdefault("SEERATTN_LIBRARY", os.path.abspath(args.lib))
    import seerattn

    nb = n // BLOCK
    with tempfile.TemporaryDirectory() as gdir:
        write_gate_dir(gdir, seed=1)
        gate = seerattn.Gate(gdir)
    gate.upload()
    batch = seerattn.Batch.from_lengths([n])
    rule = seerattn.MaskRule(nz_ratio=args.total)
    gws = torch.empty(seerattn.gate_workspace_size(gate, batch), dtype=torch.uint8, device="cuda")
    pws = torch.empty(max(seerattn.prefill_workspace_size(batch, HQ, D), 16), dtype=torch.uint8, device="cuda")
    masks = [seerattn.BlockMask.empty(batch, HQ, device="cuda") for _ in sets]
    outs = [torch.empty_like(s[0]) for s in sets]

    def gate_call(i):
        q, k, _ = sets[i]
        seerattn.block_mask(gate, 0, q, k, batch=batch, rule=rule, mask=masks[i], workspace=gws)

    def total_call(i):
        q, k, v = sets[i]
        seerattn.gate_attention(gate, 0, q, k, q, k, v, batch=batch, rule=rule, mask=masks[i], out=outs[i],
                                gate_workspace=gws, prefill_workspace=pws)

    for i in range(len(sets)):
        gate_call(i)
    torch.cuda.synchronize()
    mask = (masks[0].counts, masks[0].indices, masks[0].row_offsets)
    dense = dense_of(mask, nb)
    density = float(dense.sum()) / (HQ * nb * (nb + 1) / 2)
    flops = computed_flops(dense)
    # The one call gives what the two calls give.
    total_call(0)
    ref = torch.empty_like(outs[0])
    lib.prefill_call(sets[0][0], sets[0][1], sets[0][2], mask, ref, pws)()
    torch.cuda.synchronize()
    err = rel_err(outs[0], ref)
    print(f"  gate_attention vs gate then prefill: relative difference {err:.2e} (density {density:.3f})")
    if not err <= 1e-6:
        raise SystemExit(f"seer_gate_attention disagrees with its two halves at n={n}: {err}")

    # Timed as CUDA graph replays, as an engine runs a layer: the binding's
    # Python work per call (~0.1 ms) would otherwise sit inside the events.
    def graphs(fn):
        out = []
        for i in range(len(sets)):
            fn(i)  # eager first: loads the kernels
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(i)
            out.append(g.replay)
        return out

    prefill_calls = []
    for i, (q, k, v) in enumerate(sets):
        m = (masks[i].counts, masks[i].indices, masks[i].row_offsets)
        prefill_calls.append(lib.prefill_call(q, k, v, m, outs[i], pws))
    blocks = int(dense.sum())
    ms = time_ms(graphs(gate_call), 3, 10)
    emit("seerattn_gate", n, density, ms, 0, method="nz_ratio", graph=True)
    ms = time_ms(graphs(lambda i: prefill_calls[i]()), 3, 10)
    emit("seerattn_prefill", n, density, ms, flops, computed_blocks=blocks, mask="gate_mask", graph=True)
    ms = time_ms(graphs(total_call), 3, 10)
    emit("seerattn_total", n, density, ms, flops, computed_blocks=blocks, method="nz_ratio", graph=True)
    torch.cuda.synchronize()
    gate.close()


def main():
    global D  # the shape's head_dim, read by the helpers above
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seqs", default="8192,32768,65536")
    ap.add_argument("--densities", default="1,0.5,0.2,0.1,0.05")
    ap.add_argument("--lib", default=".devbuild/lib/libseerattn.so")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-anchors", action="store_true", help="time seerattn only (tuning runs)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    ap.add_argument("--total", type=float, default=0.0,
                    help="also time gate + prefill at this top-k density (seerattn_gate, seerattn_total)")
    ap.add_argument("--chunk", type=int, default=0,
                    help="also time a chunk of this many queries over each seq_len keys (split-KV vs unsplit)")
    args = ap.parse_args()
    D = args.head_dim

    lib = Library(os.path.abspath(args.lib))
    dev = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    out_file = open(args.out, "a")
    table = []

    def emit(impl, n, density, ms, flops, **extra):
        rec = dict(impl=impl, seq_len=n, density=round(density, 4), ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                   device=dev, date=date, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="bf16", **extra)
        if args.tag:
            rec["tag"] = args.tag
        out_file.write(json.dumps(rec) + "\n")
        out_file.flush()
        table.append(rec)
        print(f"{impl:18s} {n:6d} {density:6.3f} {ms:9.3f} ms {rec['tflops']:7.1f} TFLOP/s", flush=True)

    flex = None
    if not args.no_flex and not args.no_anchors:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    # With --chunk only the chunk timings run.
    for n in [] if args.chunk else [int(s) for s in args.seqs.split(",")]:
        nb = n // BLOCK
        reps = 20 if n <= 8192 else 10 if n <= 32768 else 5
        sets = []
        for _ in range(3):
            q = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
            sets.append((q, k, v))
        bhsd = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731  [1, H, S, D] view
        dense_flops = 2 * n * n * D * HQ

        # Dense anchors.
        anchors = [] if args.no_anchors else [("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                               ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]
        for name, backend in anchors:
            try:
                with sdpa_kernel([backend]):
                    def call(s):
                        q, k, v = s
                        torch.nn.functional.scaled_dot_product_attention(
                            bhsd(q), bhsd(k), bhsd(v), is_causal=True, enable_gqa=True)
                    calls = [lambda s=s, c=call: c(s) for s in sets]
                    ms = time_ms(calls, 2, reps)
                emit(name, n, 1.0, ms, dense_flops)
            except Exception as e:  # a backend that refuses the shape is reported, not fatal
                print(f"{name} at {n}: unavailable: {e}", file=sys.stderr)

        for density in [float(x) for x in args.densities.split(",")]:
            dense = block_mask(nb, density, gen)
            mask = index_list(dense)
            real_density = float(dense.sum()) / (HQ * nb * (nb + 1) / 2)
            flops = computed_flops(dense)
            outs = [torch.empty_like(s[0]) for s in sets]
            seer_calls = [lib.prefill_call(q, k, v, mask, o) for (q, k, v), o in zip(sets, outs)]
            # Correctness against the anchor on the same inputs first.
            seer_calls[0]()
            torch.cuda.synchronize()
            bm = None
            if flex is not None:
                try:
                    bm = flex_block_mask(dense, n)
                    q, k, v = sets[0]
                    ref = flex(bhsd(q), bhsd(k), bhsd(v), block_mask=bm, enable_gqa=True,
                               kernel_options={"BLOCK_M": BLOCK, "BLOCK_N": BLOCK})
                except Exception as e:  # reported, and the flex line is missing from the results
                    print(f"flex_block64 at {n}, density {density}: unavailable: {e!r}", file=sys.stderr)
                    bm = None
            if bm is not None:
                err = rel_err(bhsd(outs[0]), ref)
                print(f"  check vs flex at density {real_density:.3f}: relative error {err:.2e}")
                if not err <= 2e-2:
                    raise SystemExit(f"seerattn disagrees with flex at n={n} density={density}: {err}")
            if density == 1.0:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    q, k, v = sets[0]
                    ref = torch.nn.functional.scaled_dot_product_attention(
                        bhsd(q), bhsd(k), bhsd(v), is_causal=True, enable_gqa=True)
                err = rel_err(bhsd(outs[0]), ref)
                print(f"  check vs sdpa_flash at density 1: relative error {err:.2e}")
                if not err <= 2e-2:
                    raise SystemExit(f"seerattn disagrees with SDPA at n={n}: {err}")
            ms = time_ms(seer_calls, 3, reps)
            emit("seerattn_prefill", n, real_density, ms, flops, computed_blocks=int(dense.sum()))
            if bm is not None:
                flex_calls = []
                for (q, k, v) in sets:
                    flex_calls.append(lambda q=q, k=k, v=v: flex(
                        bhsd(q), bhsd(k), bhsd(v), block_mask=bm, enable_gqa=True,
                        kernel_options={"BLOCK_M": BLOCK, "BLOCK_N": BLOCK}))
                ms = time_ms(flex_calls, 3, reps)
                emit("flex_block64", n, real_density, ms, flops, computed_blocks=int(dense.sum()))
            del outs, seer_calls, mask
        if args.total:
            time_total(args, lib, n, sets, emit)
        del sets
        torch.cuda.empty_cache()

    if args.chunk:
        # Chunked prefill: the last `chunk` queries over all keys, with the
        # workspace (split-KV) and without (unsplit); seerattn only (SDPA's
        # is_causal aligns a short query block top-left, not as a chunk).
        for n in [int(x) for x in args.seqs.split(",")]:
            nb, qc = n // BLOCK, args.chunk
            first = (n - qc) // BLOCK
            q = torch.randn(qc, HQ, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
            ws_bytes = lib.workspace_size(qc, n)
            ws = torch.empty(max(ws_bytes, 16), device="cuda", dtype=torch.uint8)
            for density in [float(x) for x in args.densities.split(",")]:
                dense = block_mask(nb, density, gen)
                mask = index_list(dense, first)
                rows = dense[:, first:, :]
                flops = computed_flops_rows(rows, first)
                outs = {}
                for split in (True, False):
                    out = torch.empty_like(q)
                    call = lib.prefill_call(q, k, v, mask, out, ws if split else None)
                    call()
                    torch.cuda.synchronize()
                    outs[split] = out
                    ms = time_ms([call], 3, 20)
                    emit("seerattn_prefill", n, float(rows.sum()) / float(HQ * sum(first + i + 1 for i in range(nb - first))),
                         ms, flops, chunk=qc, split_kv=split, workspace_bytes=ws_bytes if split else 0)
                err = rel_err(outs[True], outs[False])
                print(f"  split vs unsplit: relative difference {err:.2e}")
                if not err <= 1e-2:
                    raise SystemExit(f"split-KV and unsplit disagree at n={n}: {err}")

    print("\n| impl | seq | density | ms | TFLOP/s |\n|---|---|---|---|---|")
    for r in table:
        extra = f" chunk {r['chunk']} split {r['split_kv']}" if "chunk" in r else ""
        print(f"| {r['impl']}{extra} | {r['seq_len']} | {r['density']:.3f} | {r['ms']:.3f} | {r['tflops']:.1f} |")


if __name__ == "__main__":
    main()
