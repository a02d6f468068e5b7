"""What the CPU and GPU tests share: where the repository's test data is,
a reader of the upstream vectors (safetensors, read here in plain Python so
that the CPU tests need neither PyTorch nor numpy), and the upstream case."""

import json
import os
import struct


def repo_root():
    """The checkout: $SEERATTN_TEST_ROOT (as the Rust tests use it), else
    the repository this file lies in."""
    return os.environ.get("SEERATTN_TEST_ROOT") or os.path.abspath(
        os.path.join(os.path.dirname(__file__), "..", "..", "..")
    )


UPSTREAM = os.path.join(repo_root(), "tests", "data", "upstream")
GATE_DIR = os.path.join(UPSTREAM, "gqa4_s1000_gates")
# The recorded inputs of a layer, in the order gate_attention takes them.
INPUTS = ("q_nope", "k_nope", "q", "k", "v")


def read_safetensors(path):
    """{name: (dtype, shape, bytearray)} of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = (t["dtype"], t["shape"], bytearray(data[start:end]))
    return out


class UpstreamCase:
    """The recorded gqa4_s1000 case (tests/data/upstream/PROVENANCE.md):
    1000 tokens, 8 query heads, 2 KV heads, head_dim 128, bf16 inputs, the
    gate of layer `layer`, and upstream's masks [heads, q_blocks, k_blocks]."""

    def __init__(self, name="gqa4_s1000"):
        with open(os.path.join(UPSTREAM, name + ".json")) as f:
            self.meta = json.load(f)
        self.tensors = read_safetensors(os.path.join(UPSTREAM, name + ".safetensors"))
        self.gate_dir = os.path.join(UPSTREAM, self.meta["gate_dir"])
        self.layer = self.meta["gate_layer"]
        self.seq_len = self.meta["seq_len"]
        self.hq, self.hkv, self.d = self.meta["num_q_heads"], self.meta["num_kv_heads"], self.meta["head_dim"]

    def rows(self, name, tokens):
        """A writable copy of the first `tokens` rows of a [seq, heads, dim] input."""
        _, shape, data = self.tensors[name]
        row = len(data) // shape[0]
        return bytearray(data[: tokens * row])
