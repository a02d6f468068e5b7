"""seerattn: SeerAttention block-sparse attention from Python.

A pure-Python binding (ctypes) of the seerattn shared library: a learned
gate predicts which 64x64 blocks of the causal attention map matter, and a
block-sparse FlashAttention-style kernel computes only those.

    import torch, seerattn
    gate = seerattn.Gate("/models/llama-3.1-8b-seer-gates")
    gate.upload()                                  # once, for CUDA tensors
    out = seerattn.gate_attention(gate, layer, q_nope, k_nope, q, k, v)

Tensors are `[tokens, heads, head_dim]` (PyTorch tensors, or `Tensor`
descriptors of host buffers or raw addresses without PyTorch); a batch of
several sequences is a `Batch` of cumulative lengths. CPU tensors run the
library's reference path, CUDA tensors its kernels on PyTorch's current
stream. Failures raise `SeerError` subclasses carrying the library's
message. The library is found through $SEERATTN_LIBRARY, a copy next to
this module, or the loader's path (see `_lib`).
"""

from ._api import (
    Batch,
    BlockMask,
    Gate,
    GateConfig,
    MaskRule,
    MaskSizes,
    Tensor,
    block_mask,
    cuda_device_info,
    gate_attention,
    gate_workspace_size,
    kblock_cache_size,
    kblock_cache_update,
    mask_from_dense,
    mask_sizes,
    mask_to_dense,
    prefill_workspace_size,
    sparse_prefill,
)
from ._errors import (
    BufferTooSmallError,
    CudaError,
    FormatError,
    InvalidArgumentError,
    NoDeviceError,
    NullPointerError,
    PanicError,
    SeerError,
    SeerIOError,
    UnsupportedError,
)
from ._lib import Device, DType, EmptyRows, Pool, RopeScaling, SparsityMethod, ThresholdCompare
from ._lib import lib as _library
from ._lib import path as library_path

__version__ = "0.1.0"


def library_version():
    """The loaded library's version ("MAJOR.MINOR.PATCH")."""
    return _library.seer_version().decode()


__all__ = [
    "Batch",
    "BlockMask",
    "BufferTooSmallError",
    "CudaError",
    "DType",
    "Device",
    "EmptyRows",
    "FormatError",
    "Gate",
    "GateConfig",
    "InvalidArgumentError",
    "MaskRule",
    "MaskSizes",
    "NoDeviceError",
    "NullPointerError",
    "PanicError",
    "Pool",
    "RopeScaling",
    "SeerError",
    "SeerIOError",
    "SparsityMethod",
    "Tensor",
    "ThresholdCompare",
    "UnsupportedError",
    "block_mask",
    "cuda_device_info",
    "gate_attention",
    "gate_workspace_size",
    "kblock_cache_size",
    "kblock_cache_update",
    "library_path",
    "library_version",
    "mask_from_dense",
    "mask_sizes",
    "mask_to_dense",
    "prefill_workspace_size",
    "sparse_prefill",
]
