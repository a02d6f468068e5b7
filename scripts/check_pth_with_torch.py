#!/usr/bin/env python3
"""Check a gate exported by `seerattn export-pth` against PyTorch itself.

    python3 scripts/check_pth_with_torch.py EXPORT_DIR SOURCE [--no-resave]

EXPORT_DIR holds `attn_gate_weights.pth` and `config.json` as written by
`seerattn export-pth` (or `checkpoint::export_gate_dir_to_pth`). SOURCE is
what was exported: a gate directory, or its weights file (`.safetensors`, or
a `.pth` written by torch).

Checks, each reported on its own line:
1. `torch.load(..., weights_only=True)` loads the archive (torch's restricted
   unpickler: only allow-listed globals) into a dict of CPU tensors, each
   contiguous, at storage offset 0, with a storage of its own, no grad.
2. Every tensor equals the source's bit for bit: same names, shapes and
   dtypes, same bytes. The source `.safetensors` is parsed here by hand
   (8-byte header length, JSON header, raw little-endian data), not by the
   `safetensors` package. Where the export changed the dtype (`--dtype`),
   the export must equal torch's own `source.to(dtype)` bit for bit.
3. `config.json` is a JSON object with a non-empty `base_model` (upstream's
   `from_pretrained` loads that model) and the source config's gate fields.
4. Unless --no-resave: `torch.save` of the loaded dict, under the same file
   name, gives the same bytes as the export (the writer's claim to write what
   torch writes, serialization id included); on a difference, the first
   differing ZIP member is named.

Needs only PyTorch (numpy is used when present, for speed). Exit status 0
when every check passes, 1 otherwise.
"""

import argparse
import io
import json
import os
import struct
import sys
import tempfile
import zipfile

import torch

ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
GATE_FIELDS = (
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "rope_theta",
    "rope_scaling",
)


def raw_bytes(t):
    """The tensor's elements as little-endian bytes, row-major."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    try:
        return flat.numpy().tobytes()
    except Exception:  # no numpy
        return bytes(flat.tolist())


def read_safetensors(path):
    """name -> tensor, parsed by hand from the file's bytes."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = info["shape"]
        chunk = bytearray(body[begin:end])
        if len(chunk) == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(chunk, dtype=dtype).reshape(shape)
        out[name] = t
    return out


def source_files(source):
    """(weights path, config path or None) of SOURCE."""
    if os.path.isdir(source):
        pth = os.path.join(source, "attn_gate_weights.pth")
        if os.path.isfile(pth):
            weights = pth
        else:
            found = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))
            if len(found) != 1:
                sys.exit(f"{source}: expected attn_gate_weights.pth or one *.safetensors, found {found}")
            weights = os.path.join(source, found[0])
        config = os.path.join(source, "config.json")
        return weights, config if os.path.isfile(config) else None
    return source, None


def load_source(path):
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class Report:
    def __init__(self):
        self.failed = 0

    def check(self, ok, what, detail=""):
        print(f"[{'PASS' if ok else 'FAIL'}] {what}{': ' + detail if detail else ''}")
        if not ok:
            self.failed += 1
        return ok


def first_member_difference(a_path, b_path):
    za, zb = zipfile.ZipFile(a_path), zipfile.ZipFile(b_path)
    na, nb = za.namelist(), zb.namelist()
    if na != nb:
        return f"member lists differ: export {na} vs torch {nb}"
    for name in na:
        ia, ib = za.getinfo(name), zb.getinfo(name)
        if za.read(name) != zb.read(name):
            extra = ""
            if name.endswith("serialization_id"):
                extra = f" (export {za.read(name)!r}, torch {zb.read(name)!r})"
            return f"member {name} differs{extra}"
        if (ia.header_offset, ia.extra, ia.flag_bits) != (ib.header_offset, ib.extra, ib.flag_bits):
            return f"member {name}: header offset/extra/flags differ"
    return "members equal; the difference is in the ZIP records around them"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export_dir")
    ap.add_argument("source")
    ap.add_argument("--no-resave", action="store_true", help="skip the torch.save byte comparison")
    args = ap.parse_args()
    r = Report()
    print(f"torch {torch.__version__}")

    pth = os.path.join(args.export_dir, "attn_gate_weights.pth")
    try:
        loaded = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as e:  # the check is whether torch accepts the file at all
        r.check(False, f"torch.load({pth}, weights_only=True)", repr(e))
        sys.exit(1)
    r.check(isinstance(loaded, dict), "loads as a dict", type(loaded).__name__)
    bad = [k for k, t in loaded.items() if not isinstance(t, torch.Tensor)]
    r.check(not bad, f"{len(loaded)} values are tensors", f"not tensors: {bad[:5]}" if bad else "")
    layout = []
    for k, t in loaded.items():
        if not isinstance(t, torch.Tensor):
            continue
        own = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0 and own and not t.requires_grad):
            layout.append(k)
    r.check(not layout, "every tensor: CPU, contiguous, offset 0, own storage, no grad", ", ".join(layout[:5]))

    weights, src_config = source_files(args.source)
    src = load_source(weights)
    same_names = set(src) == set(loaded)
    r.check(same_names, f"same {len(src)} names as {weights}", "" if same_names else
            f"only in source {sorted(set(src) - set(loaded))[:5]}, only in export {sorted(set(loaded) - set(src))[:5]}")
    mismatched, converted = [], 0
    for name, s in src.items():
        t = loaded.get(name)
        if not isinstance(t, torch.Tensor):
            continue
        if tuple(t.shape) != tuple(s.shape):
            mismatched.append(f"{name}: shape {tuple(t.shape)} vs {tuple(s.shape)}")
            continue
        want = s
        if t.dtype != s.dtype:
            want = s.to(t.dtype)  # torch's rounding (nearest even) is the reference
            converted += 1
        if raw_bytes(t) != raw_bytes(want):
            mismatched.append(f"{name}: bytes differ ({s.dtype} -> {t.dtype})")
    detail = f"{converted} converted by dtype, compared with torch's .to()" if converted else "dtypes kept"
    r.check(not mismatched, "every tensor equal to the source bit for bit", "; ".join(mismatched[:5]) or detail)
    print("       dtypes in export:", sorted({str(t.dtype) for t in loaded.values() if isinstance(t, torch.Tensor)}))

    cfg_path = os.path.join(args.export_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    r.check(isinstance(cfg, dict) and isinstance(cfg.get("base_model"), str) and cfg["base_model"] != "",
            "config.json has a base_model", repr(cfg.get("base_model")) if isinstance(cfg, dict) else "not an object")
    if src_config:
        with open(src_config) as f:
            scfg = json.load(f)
        keys = [k for k in scfg if k.startswith("seerattn_") or k in GATE_FIELDS]
        diff = [k for k in keys if cfg.get(k) != scfg[k]]
        r.check(not diff, f"config.json keeps the source's {len(keys)} gate fields", f"differ: {diff}")
    missing = [k for k in ("hidden_size", "intermediate_size", "vocab_size") if k not in cfg]
    if missing:
        print(f"       note: config.json lacks {missing}; upstream builds the model from it (gate-only config?)")

    if not args.no_resave:
        with tempfile.TemporaryDirectory() as tmp:
            again = os.path.join(tmp, "attn_gate_weights.pth")
            torch.save(loaded, again)
            with open(pth, "rb") as a, open(again, "rb") as b:
                same = a.read() == b.read()
            r.check(same, "torch.save of the loaded dict writes the same bytes",
                    "" if same else first_member_difference(pth, again))

    print("all checks passed" if r.failed == 0 else f"{r.failed} check(s) failed")
    sys.exit(0 if r.failed == 0 else 1)


if __name__ == "__main__":
    main()
