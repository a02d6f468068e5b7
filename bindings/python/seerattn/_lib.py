"""The C ABI through ctypes: the structs, enums and functions of
include/seerattn.h that this package uses, declared exactly as there (field
order and types; tests/test_cpu.py checks them against the header), and the
loading of the shared library.

Which library: the path in the environment variable SEERATTN_LIBRARY, else a
copy installed next to this module, else `libseerattn.so` (`.dylib` on
macOS) from the dynamic loader's search path. Its `seer_abi_version()` must
be ABI_VERSION, or importing the package fails.
"""

import ctypes
import enum
import os
import sys

from ._errors import error_for

# SEER_ABI_VERSION of the header these declarations mirror.
ABI_VERSION = 1

c_void_p, c_char_p, c_size_t = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
c_uint32, c_int32, c_int64, c_uint64 = ctypes.c_uint32, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64
c_float, c_double = ctypes.c_float, ctypes.c_double
P = ctypes.POINTER


class Status(enum.IntEnum):
    OK = 0
    INVALID_ARGUMENT = 1
    NULL_POINTER = 2
    UNSUPPORTED = 3
    FORMAT_ERROR = 4
    IO_ERROR = 5
    BUFFER_TOO_SMALL = 6
    NO_DEVICE = 7
    CUDA_ERROR = 8
    PANIC = 9


class DType(enum.IntEnum):
    BF16 = 0
    F16 = 1
    F32 = 2


class Device(enum.IntEnum):
    CPU = 0
    CUDA = 1


class Pool(enum.IntEnum):
    MAX = 1
    MIN = 2
    AVG = 4


class RopeScaling(enum.IntEnum):
    NONE = 0
    LINEAR = 1
    LLAMA3 = 2


class SparsityMethod(enum.IntEnum):
    THRESHOLD = 0
    NZ_RATIO = 1


class EmptyRows(enum.IntEnum):
    KEEP_DIAGONAL = 0
    EMPTY = 1


class ThresholdCompare(enum.IntEnum):
    F32 = 0
    BF16 = 1


# The header's enum name and value prefix of each Python enum (for the header check).
ENUMS = {
    "SeerStatus": (Status, "SEER_"),
    "SeerDType": (DType, "SEER_DTYPE_"),
    "SeerDevice": (Device, "SEER_DEVICE_"),
    "SeerPool": (Pool, "SEER_POOL_"),
    "SeerRopeScaling": (RopeScaling, "SEER_ROPE_"),
    "SeerSparsityMethod": (SparsityMethod, "SEER_SPARSITY_"),
    "SeerEmptyRows": (EmptyRows, "SEER_EMPTY_ROWS_"),
    "SeerThresholdCompare": (ThresholdCompare, "SEER_THRESHOLD_"),
}


class SeerGate(ctypes.Structure):
    """Opaque handle; only pointers to it cross the boundary."""


class SeerPrefillParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("softmax_scale", c_float),
        ("block_size", c_uint32),
        ("cuda_stream", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
    ]


class SeerBatch(ctypes.Structure):
    _fields_ = [
        ("num_seqs", c_uint32),
        ("cu_seqlens_q", P(c_int32)),
        ("cu_seqlens_k", P(c_int32)),
    ]


class SeerTensor(ctypes.Structure):
    _fields_ = [
        ("data", c_void_p),
        ("dtype", c_uint32),
        ("device", c_uint32),
        ("shape", c_int64 * 3),
        ("strides", c_int64 * 3),
    ]


class SeerBlockMask(ctypes.Structure):
    _fields_ = [
        ("counts", P(c_int32)),
        ("counts_len", c_size_t),
        ("indices", P(c_int32)),
        ("indices_len", c_size_t),
        ("row_offsets", P(c_int64)),
        ("row_offsets_len", c_size_t),
        ("device", c_uint32),
    ]


class SeerMaskParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("layer", c_uint32),
        ("sparsity_method", c_uint32),
        ("threshold", c_float),
        ("nz_ratio", c_float),
        ("last_block_dense", c_uint32),
        ("empty_rows", c_uint32),
        ("threshold_compare", c_uint32),
        ("cuda_stream", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("maybe_kblock_caches", P(c_uint64)),
        ("num_kblock_caches", c_size_t),
    ]


class SeerGateConfig(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("num_layers", c_uint32),
        ("num_q_heads", c_uint32),
        ("num_kv_heads", c_uint32),
        ("head_dim", c_uint32),
        ("gate_hidden", c_uint32),
        ("block_size", c_uint32),
        ("q_pools", c_uint32),
        ("k_pools", c_uint32),
        ("force_double", c_uint32),
        ("rope_scaling", c_uint32),
        ("rope_theta", c_double),
        ("rope_factor", c_double),
        ("rope_low_freq_factor", c_double),
        ("rope_high_freq_factor", c_double),
        ("rope_original_max_position_embeddings", c_double),
        ("sparsity_method", c_uint32),
        ("threshold", c_float),
        ("nz_ratio", c_float),
        ("last_block_dense", c_uint32),
    ]


class SeerMaskSizes(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("rows", c_size_t),
        ("row_offsets_len", c_size_t),
        ("indices_len", c_size_t),
        ("dense_bytes", c_size_t),
    ]


STRUCTS = [SeerPrefillParams, SeerBatch, SeerTensor, SeerBlockMask, SeerMaskParams, SeerGateConfig, SeerMaskSizes]

# name: (restype, argtypes). A SeerStatus is a uint32_t.
FUNCTIONS = {
    "seer_last_error_message": (c_char_p, []),
    "seer_status_name": (c_char_p, [c_uint32]),
    "seer_abi_version": (c_uint32, []),
    "seer_version": (c_char_p, []),
    "seer_prefill_params_default": (c_uint32, [P(SeerPrefillParams)]),
    "seer_sparse_prefill": (
        c_uint32,
        [
            P(SeerPrefillParams),
            P(SeerBatch),
            P(SeerTensor),
            P(SeerTensor),
            P(SeerTensor),
            P(SeerBlockMask),
            P(SeerTensor),
            P(c_float),
            c_size_t,
        ],
    ),
    "seer_gate_attention": (
        c_uint32,
        [
            P(SeerGate),
            P(SeerMaskParams),
            P(SeerPrefillParams),
            P(SeerBatch),
            P(SeerTensor),
            P(SeerTensor),
            P(SeerTensor),
            P(SeerTensor),
            P(SeerTensor),
            P(SeerBlockMask),
            P(SeerTensor),
            P(c_float),
            c_size_t,
        ],
    ),
    "seer_cuda_device_info": (c_uint32, [P(c_int32), P(c_int32)]),
    "seer_gate_load": (c_uint32, [c_char_p, P(P(SeerGate))]),
    "seer_gate_get_config": (c_uint32, [P(SeerGate), P(SeerGateConfig)]),
    "seer_gate_has_layer": (c_uint32, [P(SeerGate), c_uint32]),
    "seer_gate_upload": (c_uint32, [P(SeerGate)]),
    "seer_gate_workspace_size": (c_uint32, [P(SeerGate), P(SeerBatch), c_uint32, P(c_size_t)]),
    "seer_gate_destroy": (None, [P(SeerGate)]),
    "seer_mask_params_default": (c_uint32, [P(SeerGate), P(SeerMaskParams)]),
    "seer_gate_compute_mask": (
        c_uint32,
        [P(SeerGate), P(SeerMaskParams), P(SeerBatch), P(SeerTensor), P(SeerTensor), P(SeerBlockMask)],
    ),
    "seer_kblock_cache_size": (c_uint32, [P(SeerGate), c_uint64, P(c_size_t)]),
    "seer_kblock_cache_update": (
        c_uint32,
        [P(SeerGate), P(SeerMaskParams), P(SeerBatch), P(SeerTensor), P(c_uint64), c_size_t],
    ),
    "seer_mask_sizes": (c_uint32, [P(SeerBatch), c_uint32, c_uint32, P(SeerMaskSizes)]),
    "seer_prefill_workspace_size": (c_uint32, [P(SeerBatch), c_uint32, c_uint32, c_uint32, P(c_size_t)]),
    "seer_mask_from_dense": (
        c_uint32,
        [P(SeerBatch), c_uint32, c_uint32, P(ctypes.c_uint8), c_size_t, P(SeerBlockMask)],
    ),
    "seer_mask_to_dense": (
        c_uint32,
        [P(SeerBatch), c_uint32, c_uint32, P(SeerBlockMask), P(ctypes.c_uint8), c_size_t],
    ),
}

LIBRARY_ENV = "SEERATTN_LIBRARY"
LIBRARY_NAME = {"darwin": "libseerattn.dylib", "win32": "seerattn.dll"}.get(sys.platform, "libseerattn.so")


def _locate():
    """(path, where it came from): the first of the three places that applies.
    Only one is tried: falling back from an explicit choice would hide a typo."""
    env = os.environ.get(LIBRARY_ENV)
    if env:
        return env, f"${LIBRARY_ENV}"
    packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME)
    if os.path.exists(packaged):
        return packaged, "the copy installed with the package"
    return LIBRARY_NAME, "the dynamic loader's search path"


def check_abi(found, path):
    if found != ABI_VERSION:
        raise ImportError(
            f"seerattn: {path} has ABI version {found}, this package was written for {ABI_VERSION}: "
            "install the package and the library from the same release"
        )


def load():
    """Load and declare the library; ImportError saying which path failed and why."""
    path, source = _locate()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise ImportError(
            f"seerattn: cannot load the library from {source} ({path}): {e}. Set {LIBRARY_ENV} to the path "
            f"of {LIBRARY_NAME} (cargo build --release puts it in target/release/)"
        ) from e
    for name, (restype, argtypes) in FUNCTIONS.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise ImportError(f"seerattn: {path} has no {name}: not a seerattn library of this release") from e
        fn.restype, fn.argtypes = restype, argtypes
    check_abi(lib.seer_abi_version(), path)
    return lib, path


lib, path = load()


def call(name, *args):
    """Call a status-returning function; raise its SeerError on failure."""
    status = getattr(lib, name)(*args)
    if status != Status.OK:
        # Read on the same thread right after the call: the message is thread-local.
        message = lib.seer_last_error_message().decode("utf-8", "replace")
        raise error_for(status, lib.seer_status_name(status).decode(), message)
