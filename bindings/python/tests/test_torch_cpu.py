"""The PyTorch path on CPU tensors (the library's reference path): the
comparisons with SDPA of test_gpu on the CPU, and the buffers seerattn
allocates itself. Needs PyTorch, not a GPU; skipped without PyTorch.
"""

import sys
import unittest

import seerattn
import test_gpu
from support import INPUTS, UpstreamCase

torch = test_gpu.torch


def setUpModule():
    if torch is None:
        print("SKIPPED: PyTorch is not installed: the PyTorch tests of the Python binding did not run", file=sys.stderr)
        raise unittest.SkipTest("SKIPPED: PyTorch is not installed")


class CpuDenseAgainstSdpaTest(test_gpu.DenseAgainstSdpaTest):
    device = "cpu"


def upstream_rows(case, n):
    """The first n tokens of the case's inputs as CPU tensors."""
    return {name: torch.frombuffer(case.rows(name, n), dtype=torch.bfloat16).view(n, -1, case.d) for name in INPUTS}


class AllocatedBuffersTest(unittest.TestCase):
    """Outputs, LSE, masks and workspaces that seerattn allocates must live
    until the library has written them (a mask freed before the call once
    corrupted the heap), and equal what the caller's own buffers get."""

    def test_gate_attention_with_and_without_buffers(self):
        case = UpstreamCase()
        n = 256
        t = upstream_rows(case, n)
        gate = seerattn.Gate(case.gate_dir)
        rule = seerattn.MaskRule(nz_ratio=0.3, last_block_dense=False)
        args = (gate, case.layer, *(t[name] for name in INPUTS))
        # Several rounds, so that memory freed too early would be reused.
        allocated = [seerattn.gate_attention(*args, rule=rule, lse=True) for _ in range(3)]
        batch = seerattn.Batch([0, n])
        mask = seerattn.BlockMask.empty(batch, case.hq)
        out, lse = torch.empty(n, case.hq, case.d, dtype=torch.bfloat16), torch.empty(case.hq, n)
        seerattn.gate_attention(*args, rule=rule, mask=mask, out=out, lse=lse)
        for a_out, a_lse in allocated:
            self.assertTrue(torch.equal(a_out, out) and torch.equal(a_lse, lse))
        self.assertLess(mask.density(), 0.5)
        allocated_mask = seerattn.block_mask(gate, case.layer, t["q_nope"], t["k_nope"], rule=rule)
        self.assertEqual(test_gpu.mask_rows(allocated_mask), test_gpu.mask_rows(mask))
        self.assertTrue(torch.equal(seerattn.sparse_prefill(t["q"], t["k"], t["v"], allocated_mask), out))

    def test_dense_maps_both_ways(self):
        batch = seerattn.Batch.from_lengths([200, 64], [200, 300])
        size = seerattn.mask_sizes(batch, 4).dense_bytes
        dense = (torch.rand(size, generator=torch.Generator().manual_seed(3)) < 0.5).to(torch.uint8)
        mask = seerattn.mask_from_dense(dense, batch, 4)
        back = seerattn.mask_to_dense(mask, batch, 4)
        self.assertEqual(back.dtype, torch.uint8)
        # Blocks above the diagonal are dropped; the causal ones come back.
        self.assertTrue(torch.equal(back, seerattn.mask_to_dense(seerattn.mask_from_dense(back, batch, 4), batch, 4)))
        self.assertTrue(bool((back <= dense).all()))
        self.assertGreater(int(back.sum()), 0)


if __name__ == "__main__":
    unittest.main()
