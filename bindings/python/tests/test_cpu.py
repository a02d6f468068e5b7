"""The binding on the CPU path, with no PyTorch, numpy or GPU: buffers are
bytearrays and array.arrays. What the library computes is tested in the Rust
tests; here, that the binding hands it the right buffers and brings back
its results and errors: the declarations against the header, gate loading,
masks against the upstream vectors, prefill against a plain-Python
reference, and errors as exceptions carrying the library's messages.

    SEERATTN_LIBRARY=target/debug/libseerattn.so python3 -m unittest discover -s bindings/python/tests
"""

import array
import ctypes
import ctypes.util
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

import seerattn
from seerattn import _lib
from seerattn._errors import error_for
from support import GATE_DIR, INPUTS, UpstreamCase, repo_root

HEADER = os.path.join(repo_root(), "include", "seerattn.h")


def zeros(typecode, n):
    return array.array(typecode, bytes(array.array(typecode).itemsize * n))


def host_mask(sizes):
    """Host buffers for a mask of `sizes` (a seerattn.MaskSizes)."""
    return seerattn.BlockMask(zeros("i", sizes.rows), zeros("i", sizes.indices_len), zeros("q", sizes.row_offsets_len))


def f16_buffer(values):
    return bytearray(struct.pack(f"<{len(values)}e", *values))


def f16_values(buf):
    return list(struct.unpack(f"<{len(buf) // 2}e", bytes(buf)))


# ---------------------------------------------------------------- the header


C_TYPES = {
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "uint32_t": ctypes.c_uint32,
    "int32_t": ctypes.c_int32,
    "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
    "uint8_t": ctypes.c_uint8,
    "SeerStatus": ctypes.c_uint32,
}


def ctype_of(decl):
    """The ctypes type of a C type as the header spells it."""
    decl = re.sub(r"\bconst\b|\bstruct\b", " ", decl).strip()
    if decl == "char *":
        return ctypes.c_char_p
    if decl == "void":
        return None
    if decl.endswith("*"):
        inner = ctype_of(decl[:-1])
        return ctypes.c_void_p if inner is None else ctypes.POINTER(inner)
    if decl in C_TYPES:
        return C_TYPES[decl]
    return getattr(_lib, decl)


def strip_comments(text):
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


@unittest.skipUnless(os.path.exists(HEADER), f"no {HEADER}")
class HeaderTest(unittest.TestCase):
    """_lib's declarations are the header's: every field, enum value and
    signature it declares (the ctypes types that the C types map to)."""

    @classmethod
    def setUpClass(cls):
        with open(HEADER) as f:
            cls.header = strip_comments(f.read())

    def test_abi_version(self):
        (version,) = re.findall(r"#define SEER_ABI_VERSION (\d+)", self.header)
        self.assertEqual(int(version), _lib.ABI_VERSION)

    def test_structs(self):
        for struct_type in _lib.STRUCTS:
            name = struct_type.__name__
            (body,) = re.findall(r"typedef struct %s \{(.*?)\} %s;" % (name, name), self.header, re.S)
            fields = []
            for decl in filter(None, (d.strip() for d in body.split(";"))):
                m = re.fullmatch(r"(.*?)(\w+)(?:\[(\d+)\])?", decl, re.S)
                ctype = ctype_of(m.group(1))
                fields.append((m.group(2), ctype * int(m.group(3)) if m.group(3) else ctype))
            ours = list(struct_type._fields_)
            self.assertEqual([f for f, _ in ours], [f for f, _ in fields], f"{name}: field names")
            for (field, mine), (_, theirs) in zip(ours, fields):
                if hasattr(theirs, "_length_"):
                    self.assertEqual((mine._type_, mine._length_), (theirs._type_, theirs._length_), f"{name}.{field}")
                else:
                    self.assertIs(mine, theirs, f"{name}.{field}")

    def test_enums(self):
        for enum_name, (py_enum, prefix) in _lib.ENUMS.items():
            (body,) = re.findall(r"\nenum %s\n[^{]*\{(.*?)\};" % enum_name, self.header, re.S)
            theirs = {n: int(v) for n, v in re.findall(r"(\w+) = (\d+)", body)}
            ours = {prefix + m.name: m.value for m in py_enum}
            self.assertEqual(ours, theirs, enum_name)

    def test_functions(self):
        for name, (restype, argtypes) in _lib.FUNCTIONS.items():
            (m,) = re.findall(r"\n([\w ]+?\**)\s*\b%s\((.*?)\);" % name, self.header, re.S)
            params = [] if m[1].strip() == "void" else [p.strip() for p in m[1].split(",")]
            theirs = [ctype_of(re.fullmatch(r"(.*?)\w+", p, re.S).group(1)) for p in params]
            self.assertIs(restype, ctype_of(m[0]), f"{name}: return type")
            self.assertEqual(len(argtypes), len(theirs), f"{name}: parameters")
            for i, (mine, t) in enumerate(zip(argtypes, theirs)):
                self.assertIs(mine, t, f"{name}: parameter {i}")


class LibraryTest(unittest.TestCase):
    def test_versions_agree(self):
        self.assertEqual(seerattn.library_version(), seerattn.__version__)
        root = repo_root()
        for path, pattern in [
            ("Cargo.toml", r'\nversion = "(.*?)"'),
            ("bindings/python/pyproject.toml", r'\nversion = "(.*?)"'),
        ]:
            with open(os.path.join(root, path)) as f:
                self.assertEqual(re.search(pattern, f.read()).group(1), seerattn.__version__, path)

    def run_import(self, **env):
        """Import seerattn in a new interpreter with `env` changed (None
        removes a variable); its library path, or the failed run."""
        env = {k: v for k, v in dict(os.environ, **env).items() if v is not None}
        return subprocess.run(
            [sys.executable, "-c", "import seerattn; print(seerattn.library_path)"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    def test_a_library_that_does_not_load_is_an_import_error(self):
        r = self.run_import(SEERATTN_LIBRARY="/nonexistent/libseerattn.so")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("ImportError: seerattn: cannot load the library from $SEERATTN_LIBRARY", r.stderr)
        self.assertIn("/nonexistent/libseerattn.so", r.stderr)

    def test_a_library_without_the_entry_points_is_an_import_error(self):
        r = self.run_import(SEERATTN_LIBRARY=ctypes.util.find_library("c") or "libc.so.6")
        self.assertIn("has no seer_", r.stderr)

    @unittest.skipUnless(sys.platform == "linux", "LD_LIBRARY_PATH is how the test points the loader")
    def test_where_the_library_is_looked_for(self):
        if os.sep not in _lib.path:
            self.skipTest("this run loaded the library from the loader's path: no file to place elsewhere")
        library = os.path.abspath(_lib.path)
        with tempfile.TemporaryDirectory() as d:
            package = os.path.join(d, "seerattn")
            shutil.copytree(
                os.path.dirname(seerattn.__file__),
                package,
                ignore=shutil.ignore_patterns("__pycache__", "libseerattn.*"),
            )
            env = dict(PYTHONPATH=d, SEERATTN_LIBRARY=None, LD_LIBRARY_PATH=os.path.dirname(library))
            # Neither the variable nor a copy: the loader's search path.
            self.assertEqual(self.run_import(**env).stdout.strip(), _lib.LIBRARY_NAME)
            # A copy next to the module comes first.
            os.symlink(library, os.path.join(package, _lib.LIBRARY_NAME))
            self.assertEqual(self.run_import(**env).stdout.strip(), os.path.join(package, _lib.LIBRARY_NAME))
            # The variable before both.
            env["SEERATTN_LIBRARY"] = library
            self.assertEqual(self.run_import(**env).stdout.strip(), library)

    def test_another_abi_version_is_an_import_error(self):
        with self.assertRaisesRegex(ImportError, "ABI version 2, this package was written for 1"):
            _lib.check_abi(2, "libseerattn.so")


class ErrorTest(unittest.TestCase):
    def test_every_status_has_its_exception(self):
        bases = {
            _lib.Status.INVALID_ARGUMENT: (seerattn.InvalidArgumentError, ValueError),
            _lib.Status.NULL_POINTER: (seerattn.NullPointerError, ValueError),
            _lib.Status.UNSUPPORTED: (seerattn.UnsupportedError, NotImplementedError),
            _lib.Status.FORMAT_ERROR: (seerattn.FormatError, ValueError),
            _lib.Status.IO_ERROR: (seerattn.SeerIOError, OSError),
            _lib.Status.BUFFER_TOO_SMALL: (seerattn.BufferTooSmallError, ValueError),
            _lib.Status.NO_DEVICE: (seerattn.NoDeviceError, RuntimeError),
            _lib.Status.CUDA_ERROR: (seerattn.CudaError, RuntimeError),
            _lib.Status.PANIC: (seerattn.PanicError, RuntimeError),
        }
        for status in _lib.Status:
            name = _lib.lib.seer_status_name(status).decode()
            self.assertEqual(name, "SEER_" + status.name)
            if status == _lib.Status.OK:
                continue
            e = error_for(status, name, "seer_x: what went wrong")
            for cls in bases[status]:
                self.assertIsInstance(e, cls)
            self.assertIsInstance(e, seerattn.SeerError)
            self.assertEqual((e.status, e.status_name, e.message), (status, name, "seer_x: what went wrong"))
            self.assertEqual(str(e), f"{name}: seer_x: what went wrong")

    def test_a_status_of_a_newer_library_is_a_seer_error(self):
        e = error_for(42, "SEER_UNKNOWN_STATUS", "m")
        self.assertIs(type(e), seerattn.SeerError)
        self.assertEqual(e.status, 42)


class GateTest(unittest.TestCase):
    def test_load_config_and_close(self):
        with seerattn.Gate(GATE_DIR) as gate:
            c = gate.config
            self.assertEqual((c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim), (2, 8, 2, 128))
            self.assertEqual((c.gate_hidden, c.block_size, c.rope_scaling), (128, 64, seerattn.RopeScaling.LLAMA3))
            self.assertEqual(
                (c.q_pools, c.k_pools), (seerattn.Pool.AVG, seerattn.Pool.MAX | seerattn.Pool.MIN | seerattn.Pool.AVG)
            )
            self.assertEqual(c.sparsity_method, seerattn.SparsityMethod.THRESHOLD)
            self.assertAlmostEqual(c.threshold, 0.002, places=6)
            self.assertTrue(gate.has_layer(1))
            self.assertFalse(gate.has_layer(2))
        self.assertIn("closed", repr(gate))
        with self.assertRaisesRegex(ValueError, "the gate is closed"):
            gate.has_layer(1)
        gate.close()  # twice is fine

    def test_load_errors_carry_the_library_message(self):
        with self.assertRaises(seerattn.SeerIOError) as e:
            seerattn.Gate("/nonexistent/gates")
        self.assertIn("seer_gate_load: /nonexistent/gates/config.json", str(e.exception))
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(os.path.join(GATE_DIR, "attn_gate_weights.pth"), d)
            with open(os.path.join(GATE_DIR, "config.json")) as f:
                text = f.read()
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write(text[: len(text) // 2])
            with self.assertRaises(seerattn.FormatError) as e:
                seerattn.Gate(d)
            self.assertIn("config.json", e.exception.message)

    def test_workspace_and_cache_sizes(self):
        gate = seerattn.Gate(GATE_DIR)
        batch = seerattn.Batch.from_lengths([1000, 300], [1000, 700])
        self.assertEqual(batch.cu_seqlens_q, (0, 1000, 1300))
        self.assertEqual(batch.cu_seqlens_k, (0, 1000, 1700))
        self.assertEqual(seerattn.gate_workspace_size(gate, batch, "cpu"), 0)
        cuda = seerattn.gate_workspace_size(gate, batch)
        self.assertTrue(cuda > 0 and cuda % 256 == 0, cuda)
        small, large = seerattn.kblock_cache_size(gate, 64), seerattn.kblock_cache_size(gate, 100000)
        self.assertTrue(0 < small < large and small % 256 == 0, (small, large))
        self.assertEqual(seerattn.prefill_workspace_size(batch, 8, 128, "cpu"), 0)
        self.assertEqual(
            seerattn.mask_sizes(batch, 8),
            (8 * 16 + 8 * 5, 8 * 16 + 8 * 5 + 1, 8 * 136 + 8 * 5 * 9, 8 * 16 * 16 + 8 * 5 * 11),
        )

    def test_upload_without_a_gpu_is_no_device(self):
        try:
            seerattn.cuda_device_info()
        except seerattn.NoDeviceError:
            pass
        else:
            self.skipTest("a GPU is present")
        with self.assertRaisesRegex(seerattn.NoDeviceError, "seer_gate_upload: no CUDA device"):
            seerattn.Gate(GATE_DIR).upload()


class MaskTest(unittest.TestCase):
    """Masks on host buffers against upstream's (tests/data/upstream)."""

    @classmethod
    def setUpClass(cls):
        cls.case = UpstreamCase()
        cls.gate = seerattn.Gate(cls.case.gate_dir)

    def mask(self, rule, tokens=None):
        c = self.case
        n = tokens or c.seq_len
        batch = seerattn.Batch([0, n])
        sizes = seerattn.mask_sizes(batch, c.hq)
        q = seerattn.Tensor(c.rows("q_nope", n), "bf16", (n, c.hq, c.d))
        k = seerattn.Tensor(c.rows("k_nope", n), "bf16", (n, c.hkv, c.d))
        mask = seerattn.block_mask(self.gate, c.layer, q, k, rule=rule, mask=host_mask(sizes))
        return mask, seerattn.mask_to_dense(mask, batch, c.hq, out=bytearray(sizes.dense_bytes))

    def test_masks_match_upstream(self):
        upstream_rule = dict(threshold_compare="bf16", empty_rows="empty", last_block_dense=True)
        # Near-ties: blocks whose probability is within a bf16 ulp of the
        # threshold (PROVENANCE.md); the counts are what the CPU path gives.
        for name, rule, near_ties in [
            ("mask_nz_0_1", seerattn.MaskRule(nz_ratio=0.1, last_block_dense=False), 0),
            ("mask_nz_0_3", seerattn.MaskRule(nz_ratio=0.3, last_block_dense=False), 0),
            ("mask_threshold_0_05", seerattn.MaskRule(threshold=0.05, **upstream_rule), 1),
            ("mask_threshold_0_1", seerattn.MaskRule(threshold=0.1, **upstream_rule), 2),
        ]:
            mask, dense = self.mask(rule)
            upstream = self.case.tensors[name][2]
            self.assertEqual(len(dense), len(upstream))
            differ = sum(a != b for a, b in zip(dense, upstream))
            self.assertLessEqual(differ, near_ties, name)
            density = self.case.meta["mask_density"][name.replace("0_", "0.")]
            causal = mask.row_offsets[len(mask.row_offsets) - 1]
            self.assertAlmostEqual(mask.density(), density, delta=(near_ties + 0.5) / causal, msg=name)

    def test_the_gates_own_rule_and_the_dense_round_trip(self):
        c = self.case
        mask, dense = self.mask(None, tokens=300)
        # The gate's config: threshold 0.002 (every block of this case) with the last rows dense.
        self.assertEqual(sum(dense), c.hq * sum(range(1, 6)))
        batch = seerattn.Batch([0, 300])
        sizes = seerattn.mask_sizes(batch, c.hq)
        sparse = bytearray(dense)
        for i in range(0, len(sparse), 3):
            sparse[i] = 0
        back = seerattn.mask_from_dense(sparse, batch, c.hq, mask=host_mask(sizes))
        again = seerattn.mask_to_dense(back, batch, c.hq, out=bytearray(sizes.dense_bytes))
        self.assertEqual(again, sparse)
        self.assertEqual(
            list(mask.row_offsets), [sum(r % 5 + 1 for r in range(i)) for i in range(sizes.row_offsets_len)]
        )

    def test_mask_errors(self):
        c = self.case
        batch = seerattn.Batch([0, 128])
        q = seerattn.Tensor(c.rows("q_nope", 128), "bf16", (128, c.hq, c.d))
        k = seerattn.Tensor(c.rows("k_nope", 128), "bf16", (128, c.hkv, c.d))
        sizes = seerattn.mask_sizes(batch, c.hq)
        short = seerattn.BlockMask(zeros("i", sizes.rows), zeros("i", 1), zeros("q", sizes.row_offsets_len))
        with self.assertRaisesRegex(seerattn.BufferTooSmallError, "seer_gate_compute_mask: .*indices"):
            seerattn.block_mask(self.gate, c.layer, q, k, mask=short)
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, "seer_gate_compute_mask: .*threshold"):
            seerattn.block_mask(self.gate, c.layer, q, k, rule=seerattn.MaskRule(threshold=1.5), mask=host_mask(sizes))
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, "layer"):
            seerattn.block_mask(self.gate, 7, q, k, mask=host_mask(sizes))
        with self.assertRaisesRegex(ValueError, "threshold or nz_ratio, not both"):
            seerattn.block_mask(self.gate, 1, q, k, rule=seerattn.MaskRule(threshold=0.1, nz_ratio=0.1))
        with self.assertRaisesRegex(ValueError, "empty_rows must be one of 'keep_diagonal', 'empty'"):
            seerattn.block_mask(
                self.gate, 1, q, k, rule=seerattn.MaskRule(empty_rows="sometimes"), mask=host_mask(sizes)
            )
        float_counts = seerattn.BlockMask(zeros("f", sizes.rows), zeros("i", sizes.indices_len), zeros("q", 9))
        with self.assertRaisesRegex(TypeError, "mask.counts holds 'f' items of 4 bytes; it must hold int32"):
            seerattn.block_mask(self.gate, 1, q, k, mask=float_counts)
        with self.assertRaisesRegex(TypeError, "pass mask: seerattn allocates buffers .* only for torch tensor inputs"):
            seerattn.block_mask(self.gate, 1, q, k)
        with self.assertRaisesRegex(ValueError, "dense holds 5 bytes; the batch's dense map has 32"):
            seerattn.mask_from_dense(bytearray(5), batch, c.hq, mask=host_mask(sizes))
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, "seer_kblock_cache_update: "):
            seerattn.kblock_cache_update(self.gate, 1, k, [0x100000], batch=batch)
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, "seer_gate_compute_mask: .*cache"):
            seerattn.block_mask(self.gate, 1, q, None, batch=batch, kblock_caches=[0x100000], mask=host_mask(sizes))
        with self.assertRaisesRegex(ValueError, "pass batch: without k_nope"):
            seerattn.block_mask(self.gate, 1, q, None, kblock_caches=[0x100000], mask=host_mask(sizes))


def reference_attention(q, k, v, batch, hq, hkv, d, dense, scale):
    """Block-sparse causal attention in plain Python (f64): out [total_q, hq,
    d] and lse [hq, total_q], from flat [tokens, heads, d] lists and the
    dense block map (per sequence [hq, q_blocks, k_blocks])."""
    total_q = batch.cu_seqlens_q[-1]
    out, lse = [0.0] * (total_q * hq * d), [-math.inf] * (hq * total_q)
    base = 0
    for s in range(batch.num_seqs):
        q0, q1 = batch.cu_seqlens_q[s], batch.cu_seqlens_q[s + 1]
        k0, k1 = batch.cu_seqlens_k[s], batch.cu_seqlens_k[s + 1]
        first = (k1 - k0) - (q1 - q0)
        row0 = first // 64
        q_blocks, k_blocks = (k1 - k0 - 1) // 64 - row0 + 1, (k1 - k0 + 63) // 64
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(q1 - q0):
                p = first + i
                row = base + (h * q_blocks + p // 64 - row0) * k_blocks
                keys = [j for j in range(p + 1) if dense[row + j // 64]]
                if not keys:
                    continue
                qi = q[((q0 + i) * hq + h) * d :][:d]
                scores = [scale * sum(a * b for a, b in zip(qi, k[((k0 + j) * hkv + g) * d :][:d])) for j in keys]
                top = max(scores)
                w = [math.exp(x - top) for x in scores]
                z = sum(w)
                lse[h * total_q + q0 + i] = top + math.log(z)
                o = ((q0 + i) * hq + h) * d
                for j, wj in zip(keys, w):
                    vj = ((k0 + j) * hkv + g) * d
                    for x in range(d):
                        out[o + x] += wj / z * v[vj + x]
        base += hq * q_blocks * k_blocks
    return out, lse


class PrefillTest(unittest.TestCase):
    def test_sparse_prefill_matches_a_python_reference(self):
        # Two sequences: 80 tokens, and a 40-query chunk over 140 keys;
        # GQA (4 query heads over 2), head_dim 64, f16 in, f32 out and lse.
        hq, hkv, d = 4, 2, 64
        batch = seerattn.Batch.from_lengths([80, 40], [80, 140])
        total_q, total_k = 120, 220
        rng = random.Random(7)
        q, k, v = (
            [rng.uniform(-1, 1) for _ in range(n * h * d)] for n, h in ((total_q, hq), (total_k, hkv), (total_k, hkv))
        )
        qb, kb, vb = f16_buffer(q), f16_buffer(k), f16_buffer(v)
        q, k, v = f16_values(qb), f16_values(kb), f16_values(vb)  # what the library reads
        sizes = seerattn.mask_sizes(batch, hq)
        # Drop about a third of the blocks, the diagonal included here and there
        # (rows left empty must give zeros and an lse of -inf).
        dense = bytearray(rng.random() > 0.35 for _ in range(sizes.dense_bytes))
        mask = seerattn.mask_from_dense(dense, batch, hq, mask=host_mask(sizes))
        dense = seerattn.mask_to_dense(mask, batch, hq, out=bytearray(sizes.dense_bytes))  # causal part only
        out, lse = zeros("f", total_q * hq * d), zeros("f", hq * total_q)
        result = seerattn.sparse_prefill(
            seerattn.Tensor(qb, "f16", (total_q, hq, d)),
            seerattn.Tensor(kb, "f16", (total_k, hkv, d)),
            seerattn.Tensor(vb, "f16", (total_k, hkv, d)),
            mask,
            batch=batch,
            out=seerattn.Tensor(out, "f32", (total_q, hq, d)),
            lse=lse,
        )
        self.assertIs(result[1], lse)
        want_out, want_lse = reference_attention(q, k, v, batch, hq, hkv, d, dense, 1 / math.sqrt(d))
        self.assertLess(max(abs(a - b) for a, b in zip(out, want_out)), 1e-4)
        for a, b in zip(lse, want_lse):
            if b == -math.inf:
                self.assertEqual(a, -math.inf)
            else:
                self.assertAlmostEqual(a, b, delta=1e-4)
        self.assertIn(-math.inf, want_lse, "the mask should leave some rows empty")

    def test_gate_attention_is_block_mask_then_sparse_prefill(self):
        c = UpstreamCase()
        gate = seerattn.Gate(c.gate_dir)
        n = 192
        batch = seerattn.Batch([0, n])
        sizes = seerattn.mask_sizes(batch, c.hq)
        t = {
            name: seerattn.Tensor(c.rows(name, n), "bf16", (n, c.hq if name.startswith("q") else c.hkv, c.d))
            for name in INPUTS
        }
        rule = seerattn.MaskRule(nz_ratio=0.5, last_block_dense=False)
        one_call = bytearray(n * c.hq * c.d * 2)
        mask_one = host_mask(sizes)
        out = seerattn.Tensor(one_call, "bf16", (n, c.hq, c.d))
        returned = seerattn.gate_attention(
            gate, c.layer, *(t[name] for name in INPUTS), rule=rule, mask=mask_one, out=out
        )
        self.assertIs(returned, out)
        mask_two = seerattn.block_mask(gate, c.layer, t["q_nope"], t["k_nope"], rule=rule, mask=host_mask(sizes))
        two_calls = bytearray(len(one_call))
        seerattn.sparse_prefill(
            t["q"], t["k"], t["v"], mask_two, out=seerattn.Tensor(two_calls, "bf16", (n, c.hq, c.d))
        )
        self.assertEqual(one_call, two_calls)
        self.assertEqual(list(mask_one.counts), list(mask_two.counts))
        self.assertLess(sum(mask_one.counts), sizes.indices_len, "top-k 0.5 should drop blocks")
        self.assertNotEqual(one_call, bytearray(len(one_call)))

    def test_prefill_errors(self):
        hq, hkv, d, n = 4, 2, 64, 64
        batch = seerattn.Batch([0, n])
        sizes = seerattn.mask_sizes(batch, hq)
        mask = seerattn.mask_from_dense(bytearray(b"\x01" * sizes.dense_bytes), batch, hq, mask=host_mask(sizes))

        def t(heads, dtype="bf16", dim=d, tokens=n, **kw):
            size = {"bf16": 2, "f16": 2, "f32": 4}[dtype]
            return seerattn.Tensor(bytearray(tokens * heads * dim * size), dtype, (tokens, heads, dim), **kw)

        def prefill(q=None, k=None, v=None, out=None, m=mask, **kw):
            return seerattn.sparse_prefill(q or t(hq), k or t(hkv), v or t(hkv), m, out=out or t(hq), **kw)

        # The library's checks, its messages in the exceptions.
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, r"seer_sparse_prefill: .*heads"):
            prefill(q=t(3), out=t(3))
        with self.assertRaisesRegex(seerattn.UnsupportedError, r"seer_sparse_prefill: .*head_dim"):
            prefill(q=t(hq, dim=96), k=t(hkv, dim=96), v=t(hkv, dim=96), out=t(hq, dim=96))
        bad = host_mask(sizes)
        seerattn.mask_from_dense(bytearray(b"\x01" * sizes.dense_bytes), batch, hq, mask=bad)
        bad.indices[0] = 5  # a block past the diagonal
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, r"seer_sparse_prefill: .*mask"):
            prefill(m=bad)
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, r"softmax_scale"):
            prefill(softmax_scale=-1.0)
        # Python's: dtypes, devices, buffers, batches.
        with self.assertRaisesRegex(TypeError, "q has dtype f32; seerattn takes bf16 or f16 here"):
            prefill(q=t(hq, "f32"))
        with self.assertRaisesRegex(TypeError, "v is f16 but q bf16: they must have one dtype"):
            prefill(v=t(hkv, "f16"))
        with self.assertRaisesRegex(ValueError, "k is on cuda but q on cpu: one call takes buffers of one device"):
            prefill(k=seerattn.Tensor(0x10000, "bf16", (n, hkv, d), device="cuda"))
        with self.assertRaisesRegex(ValueError, "the CUDA kernels read rows with unit dim stride"):
            prefill(q=seerattn.Tensor(0x10000, "bf16", (n, hq, d), strides=(2 * hq * d, 2 * d, 2), device="cuda"))
        with self.assertRaisesRegex(ValueError, "the buffer holds 100 bytes, the descriptor spans 32768"):
            seerattn.Tensor(bytearray(100), "bf16", (n, hq, d))
        with self.assertRaisesRegex(TypeError, "read-only"):
            seerattn.Tensor(bytes(n * hq * d * 2), "bf16", (n, hq, d))
        with self.assertRaisesRegex(ValueError, "dtype must be one of 'bf16', 'f16', 'f32', got 'f64'"):
            seerattn.Tensor(bytearray(8), "f64", (1, 1, 1))
        with self.assertRaisesRegex(TypeError, "q must be a torch tensor or a seerattn.Tensor, got list"):
            seerattn.sparse_prefill([1.0], t(hkv), t(hkv), mask, out=t(hq))
        with self.assertRaisesRegex(TypeError, "pass out: seerattn allocates buffers"):
            seerattn.sparse_prefill(t(hq), t(hkv), t(hkv), mask)
        with self.assertRaisesRegex(ValueError, r"cu_seqlens_q \(2 entries\) and cu_seqlens_k \(3\)"):
            seerattn.Batch([0, 64], [0, 64, 128])
        with self.assertRaisesRegex(ValueError, "2147483648 does not fit"):
            seerattn.Batch([0, 2**31])
        with self.assertRaisesRegex(seerattn.InvalidArgumentError, "seer_mask_sizes: .*q_len"):
            seerattn.mask_sizes(seerattn.Batch([0, 100], [0, 50]), hq)


if __name__ == "__main__":
    unittest.main()
