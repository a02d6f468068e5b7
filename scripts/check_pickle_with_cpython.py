#!/usr/bin/env python3
"""Compare the data.pkl of .pth archives with what CPython's pickler emits
for the same dict the way torch.save pickles it. No torch needed.

    python3 scripts/check_pickle_with_cpython.py FILE.pth [FILE.pth ...]

torch.save pickles a dict of tensors at protocol 2 with `pickle.Pickler`,
each tensor reducing to `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, requires_grad, OrderedDict())` and each storage replaced by
the persistent id `('storage', torch.<Type>Storage, key, 'cpu', numel)`,
keys "0", "1", ... in order of appearance. Here stand-in modules named
`torch` and `torch._utils` supply objects with those names, the archive's
pickle is read back (names, storage classes, sizes) with a plain Unpickler,
the same dict is pickled again by CPython through the same hooks, and the
bytes are compared. Contiguous tensors with storages of their own, as
`seerattn::checkpoint::write_pth` writes, are assumed. Exit status 0 when
every file matches.
"""

import collections
import io
import pickle
import sys
import types
import zipfile

torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


def _rebuild_tensor_v2(*args):
    raise AssertionError("never called")


_rebuild_tensor_v2.__module__ = "torch._utils"
_rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
for _name in ("BFloat16Storage", "HalfStorage", "FloatStorage"):
    _cls = type(_name, (), {})
    _cls.__module__ = "torch"
    setattr(torch, _name, _cls)
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


class Storage:
    def __init__(self, cls, numel):
        self.cls, self.numel = cls, numel


class Tensor:
    def __init__(self, storage, size):
        self.storage, self.size = storage, size

    def __reduce_ex__(self, protocol):
        stride, s = [], 1
        for n in reversed(self.size):
            stride.append(s)
            s *= max(n, 1)
        args = (self.storage, 0, tuple(self.size), tuple(reversed(stride)), False, collections.OrderedDict())
        return (_rebuild_tensor_v2, args)


def cpu_tag():
    return "cpu"  # torch's location tag: one interned string for every storage


class TorchLikePickler(pickle.Pickler):
    def __init__(self, f):
        super().__init__(f, protocol=2)
        self.keys = {}

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            key = self.keys.setdefault(id(obj), str(len(self.keys)))
            return ("storage", obj.cls, key, cpu_tag(), obj.numel)
        return None


class Reader(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, requires_grad, hooks: (storage, list(size))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and hasattr(torch, name):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        return (pid[1], pid[4])


def check(path):
    z = zipfile.ZipFile(path)
    pkl_name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
    ours = z.read(pkl_name)
    entries = Reader(io.BytesIO(ours)).load()
    rebuilt = {name: Tensor(Storage(cls, numel), size) for name, ((cls, numel), size) in entries.items()}
    buf = io.BytesIO()
    TorchLikePickler(buf).dump(rebuilt)
    same = buf.getvalue() == ours
    print(f"[{'PASS' if same else 'FAIL'}] {path}: {len(entries)} tensors, data.pkl {len(ours)} bytes")
    if not same:
        theirs = buf.getvalue()
        i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        print(f"       first difference at byte {i}: ours {ours[i:i + 16]!r}, CPython {theirs[i:i + 16]!r}")
    return same


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    results = [check(p) for p in sys.argv[1:]]
    sys.exit(0 if all(results) else 1)
