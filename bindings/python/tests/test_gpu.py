"""The binding on CUDA through PyTorch: sparse prefill against
torch.nn.functional.scaled_dot_product_attention (every block selected) and
against the library's CPU path (sparse masks), gate + prefill on the bundled
upstream gate, chunked prefill with K-block caches, CUDA graph capture with
torch.cuda.graph, and the exceptions for wrong dtypes, devices and shapes.

Needs PyTorch with a CUDA GPU. Without one every test is skipped with a
"SKIPPED: no CUDA" message, unless SEERATTN_REQUIRE_GPU=1 (as
scripts/gpu-test.sh sets it), which turns the missing GPU into a failure.
"""

import math
import os
import sys
import unittest

import seerattn
from support import GATE_DIR, INPUTS, UpstreamCase

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None


def setUpModule():
    if torch is None:
        why = "PyTorch is not installed"
    elif not torch.cuda.is_available():
        why = "torch.cuda.is_available() is False"
    else:
        return
    if os.environ.get("SEERATTN_REQUIRE_GPU") == "1":
        raise RuntimeError(f"SEERATTN_REQUIRE_GPU=1 but the GPU tests cannot run: {why}")
    print(f"SKIPPED: no CUDA ({why}): the GPU tests of the Python binding did not run", file=sys.stderr)
    raise unittest.SkipTest(f"SKIPPED: no CUDA ({why})")


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def random_qkv(total_q, total_k, hq, hkv, d, dtype=None, seed=0, device="cuda"):
    dtype = dtype or torch.bfloat16
    g = torch.Generator(device=device).manual_seed(seed)

    def r(n, h):
        return torch.randn(n, h, d, device=device, dtype=dtype, generator=g)

    return r(total_q, hq), r(total_k, hkv), r(total_k, hkv)


def on(mask, device):
    return seerattn.BlockMask(mask.counts.to(device), mask.indices.to(device), mask.row_offsets.to(device))


def full_mask(batch, hq, device="cuda"):
    """Every causal block."""
    dense = torch.ones(seerattn.mask_sizes(batch, hq).dense_bytes, dtype=torch.uint8)
    return on(seerattn.mask_from_dense(dense, batch, hq), device)


def mask_rows(mask):
    """Each row's selected blocks (slots past a row's count are unused)."""
    counts, indices, offsets = (a.cpu().tolist() for a in (mask.counts, mask.indices, mask.row_offsets))
    return [indices[offsets[r] : offsets[r] + counts[r]] for r in range(len(counts))]


def sdpa(q, k, v, batch):
    """Dense causal attention per sequence with SDPA, each sequence's queries
    the last q_len of its k_len positions: is_causal where q_len == k_len,
    else an explicit bool mask (is_causal aligns a short query block at the
    top left). GQA by repeating K/V heads. Also the LSE [hq, total_q]."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    outs, lses = [], []
    for s in range(batch.num_seqs):
        q0, q1 = batch.cu_seqlens_q[s], batch.cu_seqlens_q[s + 1]
        k0, k1 = batch.cu_seqlens_k[s], batch.cu_seqlens_k[s + 1]
        tq, tk = q1 - q0, k1 - k0
        qs = q[q0:q1].transpose(0, 1).unsqueeze(0)
        ks = k[k0:k1].repeat_interleave(hq // hkv, dim=1).transpose(0, 1).unsqueeze(0)
        vs = v[k0:k1].repeat_interleave(hq // hkv, dim=1).transpose(0, 1).unsqueeze(0)
        allowed = torch.arange(tk, device=q.device)[None, :] <= (tk - tq + torch.arange(tq, device=q.device))[:, None]
        if tq == tk:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed)
        outs.append(o[0].transpose(0, 1))
        scores = (qs[0].float() @ ks[0].float().transpose(1, 2)) / math.sqrt(d)
        lses.append(torch.logsumexp(scores.masked_fill(~allowed, -math.inf), dim=-1))
    return torch.cat(outs), torch.cat(lses, dim=1)


class DenseAgainstSdpaTest(unittest.TestCase):
    """Every causal block selected: the kernel is dense causal attention.
    (test_torch_cpu runs this on the CPU path too.)"""

    device = "cuda"

    def check(self, what, lens, hq, hkv, d, dtype=None, out_dtype=None, fused=False):
        dtype = dtype or torch.bfloat16
        batch = seerattn.Batch.from_lengths([a for a, _ in lens], [b for _, b in lens])
        total_q, total_k = batch.cu_seqlens_q[-1], batch.cu_seqlens_k[-1]
        if fused:
            # Views into one [tokens, hq + 2 hkv, d] QKV buffer (q_len == k_len).
            qkv = torch.randn(total_q, hq + 2 * hkv, d, device=self.device, dtype=dtype)
            q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
        else:
            q, k, v = random_qkv(total_q, total_k, hq, hkv, d, dtype, seed=len(what), device=self.device)
        out = None if out_dtype is None else torch.empty(total_q, hq, d, device=self.device, dtype=out_dtype)
        got, lse = seerattn.sparse_prefill(q, k, v, full_mask(batch, hq, self.device), batch=batch, out=out, lse=True)
        self.assertEqual(got.dtype, out_dtype or dtype)
        want, want_lse = sdpa(q, k, v, batch)
        err = rel_err(got, want)
        self.assertLessEqual(err, 1e-2, f"{what}: relative error {err:.2e} against SDPA")
        self.assertLessEqual(float((lse - want_lse).abs().max()), 1e-2, f"{what}: lse")
        print(f"{self.device} {what}: relative error {err:.2e} against SDPA", file=sys.stderr)

    def test_one_sequence(self):
        self.check("MHA 256 tokens d128", [(256, 256)], 8, 8, 128)
        self.check("GQA 1000 tokens d128", [(1000, 1000)], 8, 2, 128)
        self.check("MQA 130 tokens d64", [(130, 130)], 4, 1, 64)
        self.check("GQA 777 tokens d64 f16", [(777, 777)], 8, 4, 64, dtype=torch.float16)
        self.check("GQA 300 tokens, f32 out", [(300, 300)], 8, 2, 128, out_dtype=torch.float32)
        self.check("fused QKV views 500 tokens", [(500, 500)], 8, 2, 128, fused=True)

    def test_varlen_batch(self):
        self.check("3 sequences", [(100, 100), (300, 300), (64, 64)], 8, 2, 128)

    def test_chunks_over_a_kv_cache(self):
        self.check("chunk of 200 over 700", [(200, 700)], 8, 2, 128)
        self.check("one query over 513", [(1, 513)], 8, 2, 128)
        self.check("chunk of 64 over 8192 (split-KV)", [(64, 8192)], 8, 2, 128)
        self.check("a sequence and a chunk", [(128, 128), (70, 333)], 4, 2, 64)


class SparseAgainstCpuTest(unittest.TestCase):
    """Sparse masks: the kernel against the library's CPU reference, same
    inputs and mask copied to the host."""

    def check(self, what, lens, hq, hkv, d, keep, seed):
        batch = seerattn.Batch.from_lengths([a for a, _ in lens], [b for _, b in lens])
        total_q, total_k = batch.cu_seqlens_q[-1], batch.cu_seqlens_k[-1]
        q, k, v = random_qkv(total_q, total_k, hq, hkv, d, seed=seed)
        g = torch.Generator().manual_seed(seed)
        dense = (torch.rand(seerattn.mask_sizes(batch, hq).dense_bytes, generator=g) < keep).to(torch.uint8)
        cpu_mask = seerattn.mask_from_dense(dense, batch, hq)
        gpu, gpu_lse = seerattn.sparse_prefill(q, k, v, on(cpu_mask, "cuda"), batch=batch, lse=True)
        cpu_out = torch.empty(total_q, hq, d, dtype=torch.float32)
        cpu, cpu_lse = seerattn.sparse_prefill(q.cpu(), k.cpu(), v.cpu(), cpu_mask, batch=batch, out=cpu_out, lse=True)
        err = rel_err(gpu.cpu(), cpu)
        self.assertLessEqual(err, 1e-2, f"{what}: relative error {err:.2e} against the CPU path")
        gpu_lse = gpu_lse.cpu()
        empty = torch.isinf(cpu_lse)
        self.assertTrue(bool(torch.equal(torch.isinf(gpu_lse), empty)), f"{what}: empty rows")
        self.assertTrue(bool(empty.any()), f"{what}: the mask should leave some rows empty")
        self.assertTrue(bool((gpu.cpu()[empty.t()] == 0).all()), f"{what}: empty rows are zeros")
        self.assertLessEqual(float((gpu_lse[~empty] - cpu_lse[~empty]).abs().max()), 1e-2, f"{what}: lse")
        print(
            f"{what}: density {cpu_mask.density():.2f}, relative error {err:.2e} against the CPU path", file=sys.stderr
        )

    def test_sparse_masks(self):
        self.check("2 sequences, d128", [(300, 300), (100, 450)], 8, 2, 128, 0.4, 1)
        self.check("1 sequence, d64", [(200, 200)], 4, 4, 64, 0.3, 2)


def upstream_tensors(case):
    """The case's inputs as CUDA tensors."""
    out = {}
    for name in INPUTS:
        _, shape, data = case.tensors[name]
        out[name] = torch.frombuffer(bytearray(data), dtype=torch.bfloat16).view(shape).cuda()
    return out


class GateTest(unittest.TestCase):
    """The bundled upstream gate (tests/data/upstream/gqa4_s1000_gates) on
    its recorded inputs: 1000 tokens, 8 query heads, 2 KV heads, d128."""

    @classmethod
    def setUpClass(cls):
        cls.case = UpstreamCase()
        cls.t = upstream_tensors(cls.case)
        cls.gate = seerattn.Gate(cls.case.gate_dir)
        cls.gate.upload()

    @classmethod
    def tearDownClass(cls):
        cls.gate.close()

    RULES = [
        None,  # the gate's own (threshold 0.002, last rows dense)
        seerattn.MaskRule(threshold=0.05, threshold_compare="bf16", empty_rows="empty", last_block_dense=True),
        seerattn.MaskRule(nz_ratio=0.3, last_block_dense=False),
    ]

    def test_gate_attention_matches_the_cpu_path(self):
        c, t = self.case, self.t
        batch = seerattn.Batch([0, c.seq_len])
        host = {name: x.cpu() for name, x in t.items()}
        for rule in self.RULES:
            mask = seerattn.BlockMask.empty(batch, c.hq, "cuda")
            out = seerattn.gate_attention(self.gate, c.layer, *(t[name] for name in INPUTS), rule=rule, mask=mask)
            torch.cuda.synchronize()
            # The CPU path on the GPU's mask.
            cpu = seerattn.sparse_prefill(
                host["q"], host["k"], host["v"], on(mask, "cpu"), out=torch.empty(out.shape, dtype=torch.float32)
            )
            err = rel_err(out.cpu(), cpu)
            self.assertLessEqual(err, 1e-2, f"{rule}: relative error {err:.2e}")
            # The GPU's mask against the CPU gate's: equal but for near-ties
            # (the GPU pools in bf16, the reference in f32; PROVENANCE.md).
            cpu_mask = seerattn.block_mask(self.gate, c.layer, host["q_nope"], host["k_nope"], rule=rule)
            differ = sum(len(set(a) ^ set(b)) for a, b in zip(mask_rows(mask), mask_rows(cpu_mask)))
            self.assertLessEqual(differ, 10, f"{rule}: blocks that differ from the CPU gate's mask (1% of 1088)")
            print(
                f"{rule}: density {mask.density():.3f}, relative error {err:.2e}, {differ} near-ties", file=sys.stderr
            )

    def test_two_calls_equal_one_and_a_side_stream(self):
        c, t = self.case, self.t
        rule = self.RULES[2]
        mask = seerattn.block_mask(self.gate, c.layer, t["q_nope"], t["k_nope"], rule=rule)
        two = seerattn.sparse_prefill(t["q"], t["k"], t["v"], mask)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        one = seerattn.gate_attention(self.gate, c.layer, *(t[name] for name in INPUTS), rule=rule, stream=side)
        side.synchronize()
        self.assertTrue(bool(torch.equal(one, two)))

    def test_chunked_prefill_with_kblock_caches(self):
        c, t = self.case, self.t
        cache = torch.empty(seerattn.kblock_cache_size(self.gate, c.seq_len), dtype=torch.uint8, device="cuda")
        done = 0
        for m in (300, 64, 1, 635):  # chunks that start and end mid-block, one of a single token
            batch = seerattn.Batch([0, m], [0, done + m])
            chunk = slice(done, done + m)
            seerattn.kblock_cache_update(self.gate, c.layer, t["k_nope"][chunk], [cache], batch=batch)
            for rule in self.RULES:
                cached = seerattn.block_mask(
                    self.gate, c.layer, t["q_nope"][chunk], None, batch=batch, rule=rule, kblock_caches=[cache]
                )
                one_shot = seerattn.block_mask(
                    self.gate, c.layer, t["q_nope"][chunk], t["k_nope"][: done + m], batch=batch, rule=rule
                )
                self.assertEqual(mask_rows(cached), mask_rows(one_shot), f"chunk at {done}, {rule}")
            args = (t["q"][chunk], t["k"][: done + m], t["v"][: done + m])
            with_caches = seerattn.gate_attention(
                self.gate, c.layer, t["q_nope"][chunk], None, *args, batch=batch, kblock_caches=[cache]
            )
            one_shot = seerattn.gate_attention(
                self.gate, c.layer, t["q_nope"][chunk], t["k_nope"][: done + m], *args, batch=batch
            )
            self.assertTrue(bool(torch.equal(with_caches, one_shot)), f"chunk at {done}: gate_attention")
            done += m

    def capture(self, mode):
        """gate_attention captured by torch.cuda.graph; replays with new
        inputs copied into the captured tensors equal eager calls."""
        c = self.case
        n, hq, d = c.seq_len, c.hq, c.d
        batch = seerattn.Batch([0, n])
        rule = self.RULES[2]
        static = {name: torch.empty_like(x) for name, x in self.t.items()}
        out = torch.empty(n, hq, d, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(hq, n, device="cuda", dtype=torch.float32)
        mask = seerattn.BlockMask.empty(batch, hq, "cuda")
        gate_ws = torch.empty(seerattn.gate_workspace_size(self.gate, batch), dtype=torch.uint8, device="cuda")
        prefill_ws = torch.empty(
            max(seerattn.prefill_workspace_size(batch, hq, d), 16), dtype=torch.uint8, device="cuda"
        )

        def call(out, lse, mask=None):
            buffers = dict(mask=mask, out=out, lse=lse, gate_workspace=gate_ws, prefill_workspace=prefill_ws)
            return seerattn.gate_attention(self.gate, c.layer, *(static[n] for n in INPUTS), rule=rule, **buffers)

        for name, x in self.t.items():
            static[name].copy_(x)
        call(out=out, lse=lse, mask=mask)  # eager first: loads the kernels
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=mode):
            call(out=out, lse=lse, mask=mask)
        g = torch.Generator(device="cuda").manual_seed(5)
        for round in range(3):
            for x in static.values():
                x.copy_(torch.randn(x.shape, device="cuda", generator=g, dtype=torch.float32) * (1 + round))
            eager_out, eager_lse = call(out=torch.empty_like(out), lse=torch.empty_like(lse))
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            self.assertTrue(bool(torch.equal(out, eager_out)), f"{mode} round {round}: replay differs from eager")
            self.assertTrue(bool(torch.equal(lse, eager_lse)), f"{mode} round {round}: lse")

    def test_cuda_graph_capture(self):
        self.capture("thread_local")

    def test_cuda_graph_capture_in_pytorchs_default_mode(self):
        self.capture("global")


class WrongInputsTest(unittest.TestCase):
    """Python's checks and the library's, as exceptions that say what is wrong."""

    @classmethod
    def setUpClass(cls):
        cls.gate = seerattn.Gate(GATE_DIR)

    @classmethod
    def tearDownClass(cls):
        cls.gate.close()

    def setUp(self):
        self.n, self.hq, self.hkv, self.d = 128, 8, 2, 128
        self.q, self.k, self.v = random_qkv(self.n, self.n, self.hq, self.hkv, self.d)
        self.batch = seerattn.Batch([0, self.n])
        self.mask = full_mask(self.batch, self.hq)

    def prefill(self, **kw):
        a = dict(q=self.q, k=self.k, v=self.v, mask=self.mask)
        a.update(kw)
        return seerattn.sparse_prefill(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("mask"), **a)

    def test_dtypes(self):
        with self.assertRaisesRegex(TypeError, r"q has dtype torch.float32; seerattn takes bf16 or f16 here"):
            self.prefill(q=self.q.float())
        with self.assertRaisesRegex(TypeError, "v is f16 but q bf16"):
            self.prefill(v=self.v.half())
        with self.assertRaisesRegex(TypeError, r"out has dtype torch.float64"):
            self.prefill(out=torch.empty(self.q.shape, dtype=torch.float64, device="cuda"))
        bad = seerattn.BlockMask(self.mask.counts.long(), self.mask.indices, self.mask.row_offsets)
        with self.assertRaisesRegex(TypeError, r"mask.counts has dtype torch.int64; it must be torch.int32"):
            self.prefill(mask=bad)

    def test_devices(self):
        with self.assertRaisesRegex(ValueError, r"k is on cpu but q on cuda:0: one call takes buffers of one device"):
            self.prefill(k=self.k.cpu())
        with self.assertRaisesRegex(ValueError, r"mask.counts is on cpu but q on cuda"):
            self.prefill(mask=on(self.mask, "cpu"))
        with self.assertRaisesRegex(ValueError, "cu_seqlens_q must be in host memory"):
            seerattn.Batch(torch.tensor([0, self.n], dtype=torch.int32, device="cuda"))
        with self.assertRaisesRegex(ValueError, "mask must be in host memory"):
            seerattn.mask_to_dense(self.mask, self.batch, self.hq)
        with self.assertRaisesRegex(ValueError, "dense must be in host memory"):
            seerattn.mask_from_dense(torch.ones(64, dtype=torch.uint8, device="cuda"), self.batch, self.hq)
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, "call seer_gate_upload"):
            seerattn.block_mask(seerattn.Gate(GATE_DIR), 1, self.q, self.k)

    def test_shapes_and_layouts(self):
        with self.assertRaisesRegex(ValueError, r"q must be \[tokens, heads, head_dim\], got shape \(1, 128, 8, 128\)"):
            self.prefill(q=self.q.unsqueeze(0))
        wide = torch.randn(self.n, self.hq, 2 * self.d, device="cuda", dtype=torch.bfloat16)
        with self.assertRaisesRegex(
            ValueError, "stride 2 along head_dim; the CUDA kernels read rows with unit dim stride"
        ):
            self.prefill(q=wide[..., ::2])
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, "seer_sparse_prefill: "):
            self.prefill(q=self.q[:, :3], out=torch.empty(self.n, 3, self.d, device="cuda", dtype=torch.bfloat16))
        flat = torch.randn(self.n * self.hq * self.d + 1, device="cuda", dtype=torch.bfloat16)
        with self.assertRaisesRegex(seerattn.UnsupportedError, "seer_sparse_prefill: .*16-byte"):
            self.prefill(q=flat[1:].view(self.n, self.hq, self.d))
        d256 = torch.randn(self.n, self.hq, 256, device="cuda", dtype=torch.bfloat16)
        kv256 = torch.randn(self.n, self.hkv, 256, device="cuda", dtype=torch.bfloat16)
        with self.assertRaisesRegex(seerattn.UnsupportedError, "head_dim"):
            self.prefill(q=d256, k=kv256, v=kv256)
        self.gate.upload()
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, "seer_gate_compute_mask: "):
            seerattn.block_mask(self.gate, 1, self.q[:, :4], self.k)  # 4 query heads, the gate has 8
        cache = torch.empty(256, dtype=torch.uint8, device="cuda")
        with self.assertRaisesRegex(ValueError, r"kblock_caches\[0\] holds 256 bytes; a sequence of 128 tokens needs"):
            seerattn.kblock_cache_update(self.gate, 1, self.k, [cache], batch=self.batch)


if __name__ == "__main__":
    unittest.main()
