"""seerattn as the attention of a PyTorch model's layer.

A Llama-style self-attention layer (q/k/v/o projections, rotary position
embeddings, grouped-query attention) whose attention is computed by
seerattn.gate_attention: the layer's SeerAttention gate reads the pre-RoPE
queries and keys, picks the 64x64 blocks that matter, and the block-sparse
kernel attends over those only. Sequences of different lengths are packed
into one [tokens, hidden] batch, as inference engines do.

    SEERATTN_LIBRARY=target/release/libseerattn.so python3 bindings/python/examples/torch_layer.py [gate_dir]

Runs on CUDA when PyTorch sees a GPU (else on the library's CPU path, with
shorter sequences), with random weights and inputs, and prints the mask
density and the difference to dense causal attention (small where the mask
is dense, as the gate's own rule makes it on random inputs; --nz-ratio 0.2
shows a sparse one).
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import seerattn

BUNDLED_GATE = os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "tests", "data", "upstream", "gqa4_s1000_gates"
)


def rotate(x, positions, theta):
    """NeoX-style rotary embedding of x [tokens, heads, dim] at `positions`."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None, :]
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return (x.float() * cos + half.float() * sin).to(x.dtype)


class SeerAttention(torch.nn.Module):
    """Self-attention of layer `layer` of a model whose gates are `gate`."""

    def __init__(self, gate, layer, hidden, rule=None):
        super().__init__()
        c = gate.config
        self.gate, self.layer, self.rule = gate, layer, rule
        self.hq, self.hkv, self.d, self.theta = c.num_q_heads, c.num_kv_heads, c.head_dim, c.rope_theta
        self.q_proj = torch.nn.Linear(hidden, self.hq * self.d, bias=False)
        self.k_proj = torch.nn.Linear(hidden, self.hkv * self.d, bias=False)
        self.v_proj = torch.nn.Linear(hidden, self.hkv * self.d, bias=False)
        self.o_proj = torch.nn.Linear(self.hq * self.d, hidden, bias=False)

    def forward(self, x, batch, positions, mask=None):
        """x [tokens, hidden]: the sequences of `batch` packed; `mask`, if
        given, receives the block mask the gate chose."""
        q_nope = self.q_proj(x).view(-1, self.hq, self.d)
        k_nope = self.k_proj(x).view(-1, self.hkv, self.d)
        v = self.v_proj(x).view(-1, self.hkv, self.d)
        q, k = rotate(q_nope, positions, self.theta), rotate(k_nope, positions, self.theta)
        # The gate wants the keys before RoPE (it rotates its pooled blocks itself).
        out = seerattn.gate_attention(
            self.gate, self.layer, q_nope, k_nope, q, k, v, batch=batch, rule=self.rule, mask=mask
        )
        return self.o_proj(out.reshape(-1, self.hq * self.d)), (q, k, v)


def dense_reference(q, k, v, batch, hq, hkv):
    """Dense causal attention per sequence (SDPA), for comparison."""
    outs = []
    for s in range(batch.num_seqs):
        a, b = batch.cu_seqlens_q[s], batch.cu_seqlens_q[s + 1]
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=hq != hkv)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gate_dir", nargs="?", default=BUNDLED_GATE)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument(
        "--threshold", type=float, help="keep blocks above this gate probability (default: the gate's rule)"
    )
    ap.add_argument("--nz-ratio", type=float, help="keep the top blocks of each row for this density")
    args = ap.parse_args()
    rule = seerattn.MaskRule(threshold=args.threshold, nz_ratio=args.nz_ratio)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = [4096, 1500, 700] if device == "cuda" else [300, 130]
    torch.manual_seed(0)
    with seerattn.Gate(args.gate_dir) as gate, torch.no_grad():
        if device == "cuda":
            gate.upload()
        layer = SeerAttention(gate, args.layer, args.hidden, rule).to(device, torch.bfloat16)
        batch = seerattn.Batch.from_lengths(lengths)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        x = torch.randn(sum(lengths), args.hidden, device=device, dtype=torch.bfloat16)
        mask = seerattn.BlockMask.empty(batch, gate.config.num_q_heads, device)
        y, (q, k, v) = layer(x, batch, positions, mask)
        dense = layer.o_proj(dense_reference(q, k, v, batch, layer.hq, layer.hkv).reshape(-1, layer.hq * layer.d))
        diff = float((y.float() - dense.float()).norm() / dense.float().norm())
        print(f"{device}: {len(lengths)} sequences of {lengths} tokens, hidden {args.hidden}, layer {args.layer}")
        print(f"output {tuple(y.shape)} {y.dtype}; mask density {mask.density():.3f} of the causal blocks")
        print(f"relative difference to dense causal attention: {diff:.3e}")
    if not torch.isfinite(y).all():
        sys.exit("non-finite output")


if __name__ == "__main__":
    main()
