"""The Python API over the C ABI (see the package docstring).

Buffers are PyTorch tensors, or, without PyTorch, `Tensor` descriptors and
host buffers (anything with a writable buffer: array.array, bytearray, ctypes
arrays, numpy arrays) or raw addresses. PyTorch is never imported here: a
tensor can only be passed once the caller has imported it, so the module is
looked up in `sys.modules` when needed.

What Python can tell better than the library is checked here: dtypes,
devices, the dim stride of CUDA tensors, the sizes of host buffers and of
K-block caches (which the library cannot see), the arity of a batch. The
rest (shapes against the batch and the gate, overlap, alignment, device
memory) is the library's to check; its message comes back in the exception.
"""

import collections
import ctypes
import dataclasses
import os
import sys

from . import _lib
from ._lib import Device, DType, EmptyRows, SparsityMethod, ThresholdCompare, call

_BYREF = ctypes.byref


def _torch():
    return sys.modules.get("torch")


def _is_torch(x):
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _enum(cls, what, value):
    """An enum member from itself or its name, any case ("bf16", "cuda")."""
    if isinstance(value, cls):
        return value
    try:
        return cls[str(value).upper()]
    except KeyError:
        names = ", ".join(repr(m.name.lower()) for m in cls)
        raise ValueError(f"{what} must be one of {names}, got {value!r}") from None


_TORCH_NAMES = {DType.BF16: "bfloat16", DType.F16: "float16", DType.F32: "float32"}
_TORCH_DTYPES = {name: dtype for dtype, name in _TORCH_NAMES.items()}
_ELEMENT_BYTES = {DType.BF16: 2, DType.F16: 2, DType.F32: 4}
# Element types the library reads as attention inputs and writes as outputs.
_INPUTS = (DType.BF16, DType.F16)
_OUTPUTS = (DType.BF16, DType.F16, DType.F32)


def _host_address(what, data, nbytes_needed):
    """Address of a writable host buffer holding at least `nbytes_needed`
    bytes, and the ctypes object that pins it while the call runs."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"{what} must be a torch tensor, an address (int) or a writable host buffer, got {type(data).__name__}"
        ) from None
    if view.readonly:
        raise TypeError(f"{what}: the buffer is read-only (bytes?); pass a writable one (bytearray, array.array)")
    if not view.c_contiguous:
        raise ValueError(f"{what}: the buffer must be C-contiguous")
    if view.nbytes < nbytes_needed:
        raise ValueError(f"{what}: the buffer holds {view.nbytes} bytes, the descriptor spans {nbytes_needed}")
    pin = (ctypes.c_char * view.nbytes).from_buffer(view.cast("B"))
    return ctypes.addressof(pin), pin


class Tensor:
    """A `[tokens, heads, dim]` descriptor of memory the caller owns, for use
    without PyTorch. `data` is an address (int; host or CUDA memory) or a
    writable host buffer; `dtype` "bf16", "f16" or "f32"; `strides` in
    elements (default: contiguous); `device` "cpu" or "cuda"."""

    def __init__(self, data, dtype, shape, strides=None, device="cpu"):
        self.dtype = _enum(DType, "dtype", dtype)
        self.device = _enum(Device, "device", device)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise ValueError(f"shape must be [tokens, heads, dim], got {self.shape}")
        _, h, d = self.shape
        self.strides = (h * d, d, 1) if strides is None else tuple(int(s) for s in strides)
        if len(self.strides) != 3:
            raise ValueError(f"strides must have 3 entries, got {self.strides}")
        if isinstance(data, int):
            self.address, self._pin = data, None
        elif self.device == Device.CUDA:
            raise TypeError("a CUDA Tensor takes its data as an address (int); buffer objects are host memory")
        else:
            # The library cannot see how large a host buffer is; Python can.
            span = sum((n - 1) * s for n, s in zip(self.shape, self.strides) if n > 0) + 1
            self.address, self._pin = _host_address("data", data, span * _ELEMENT_BYTES[self.dtype])


_ARRAY_KINDS = {
    # kind: (bytes, buffer format letters, torch dtype names)
    "int32": (4, "il", ("int32",)),
    "int64": (8, "ql", ("int64",)),
    "float32": (4, "f", ("float32",)),
    "uint8": (1, "Bb?c", ("uint8", "bool")),
}


class BlockMask:
    """A block mask in the library's index-list format: `counts` int32
    [rows], `indices` int32 [indices_len], `row_offsets` int64 [rows + 1]
    (sizes from `mask_sizes`). Each array is a contiguous torch tensor, a
    writable host buffer, or an `(address, length)` pair; `device` ("cpu" or
    "cuda") says where the pairs' memory is."""

    def __init__(self, counts, indices, row_offsets, device=None):
        self.counts, self.indices, self.row_offsets = counts, indices, row_offsets
        self.device = None if device is None else _enum(Device, "device", device)

    @classmethod
    def empty(cls, batch, num_q_heads, device="cpu"):
        """Uninitialised torch arrays for a mask of `batch` on `device`: pass
        it to `gate_attention` to read the mask it used."""
        torch = _torch()
        if torch is None:
            raise TypeError("BlockMask.empty allocates with PyTorch; without it, pass host buffers")
        return _new_mask(_Args(torch.device(device)), batch, num_q_heads)

    def density(self):
        """Selected blocks over causal blocks (reads the arrays: for CUDA
        tensors, waits for the mask)."""
        if _is_torch(self.counts):
            return float(self.counts.sum()) / float(self.row_offsets[-1])
        if isinstance(self.counts, tuple) or isinstance(self.row_offsets, tuple):
            raise TypeError("density reads the arrays: (address, length) pairs cannot be read here")
        return sum(self.counts) / self.row_offsets[len(self.row_offsets) - 1]

    def __repr__(self):
        return f"BlockMask(counts={self.counts!r}, indices={self.indices!r}, row_offsets={self.row_offsets!r})"


class _Args:
    """The buffers of one library call: each converted for ctypes, all
    checked to be on one device, pinned until the call returns."""

    def __init__(self, torch_device=None):
        self.device = None  # Device of the first buffer
        self.torch_device = torch_device  # torch.device of the first torch tensor (allocations go there)
        self.first = None  # the first buffer's name, for messages
        self.pins = []
        self.cuda_stream = None  # the call's cudaStream_t, once `use_stream` has chosen it
        self._alloc_stream = None  # a torch stream to allocate on, when not the current one

    def place(self, name, device, torch_device=None):
        if torch_device is not None and self.torch_device is None:
            self.torch_device = torch_device
        if self.device is None:
            self.device, self.first = device, name
            return
        if device != self.device or (
            torch_device is not None and self.torch_device is not None and torch_device != self.torch_device
        ):
            here = torch_device if torch_device is not None else device.name.lower()
            there = self.torch_device if self.torch_device is not None else self.device.name.lower()
            raise ValueError(f"{name} is on {here} but {self.first} on {there}: one call takes buffers of one device")

    def _torch_place(self, name, t):
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on {t.device}; seerattn takes CPU and CUDA tensors")
        self.place(name, Device.CUDA if t.is_cuda else Device.CPU, t.device)
        # Tensors allocated here have no other owner until the call returns.
        self.pins.append(t)

    def tensor(self, name, t, dtypes):
        """A SeerTensor for a [tokens, heads, dim] torch tensor or Tensor."""
        if _is_torch(t):
            if t.dim() != 3:
                raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
            dtype = _TORCH_DTYPES.get(str(t.dtype).replace("torch.", ""))
            device = Device.CUDA if t.is_cuda else Device.CPU
            address, shape, strides = t.data_ptr(), t.shape, t.stride()
            shown = t.dtype
            self._torch_place(name, t)
        elif isinstance(t, Tensor):
            dtype, device, address, shape, strides = t.dtype, t.device, t.address, t.shape, t.strides
            shown = dtype.name.lower()
            self.place(name, device)
            self.pins.append(t._pin)
        else:
            raise TypeError(f"{name} must be a torch tensor or a seerattn.Tensor, got {type(t).__name__}")
        if dtype not in dtypes:
            allowed = " or ".join(d.name.lower() for d in dtypes)
            raise TypeError(f"{name} has dtype {shown}; seerattn takes {allowed} here")
        if device == Device.CUDA and strides[2] != 1:
            raise ValueError(
                f"{name} has stride {strides[2]} along head_dim; the CUDA kernels read rows with unit dim stride "
                "(.contiguous() makes one)"
            )
        return _lib.SeerTensor(address, dtype, device, tuple(shape), tuple(strides))

    def same_dtype(self, names, descriptors):
        first = descriptors[0].dtype
        for name, d in zip(names[1:], descriptors[1:]):
            if d.dtype != first:
                raise TypeError(
                    f"{name} is {DType(d.dtype).name.lower()} but {names[0]} {DType(first).name.lower()}: "
                    "they must have one dtype"
                )

    def array(self, name, a, kind, device=None):
        """(address, length in elements) of a 1-D array: a contiguous torch
        tensor, a writable host buffer, or an (address, length) pair on `device`."""
        size, formats, torch_dtypes = _ARRAY_KINDS[kind]
        if _is_torch(a):
            if str(a.dtype).replace("torch.", "") not in torch_dtypes:
                raise TypeError(f"{name} has dtype {a.dtype}; it must be torch.{torch_dtypes[0]}")
            if not a.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
            self._torch_place(name, a)
            return a.data_ptr(), a.numel()
        if isinstance(a, tuple):
            if device is None:
                raise ValueError(f"{name} is an (address, length) pair: say on which device (device='cpu' or 'cuda')")
            self.place(name, device)
            address, length = a
            return int(address), int(length)
        try:
            fmt = memoryview(a).format.lstrip("@=<>!")
            itemsize = memoryview(a).itemsize
        except TypeError:
            raise TypeError(
                f"{name} must be a torch tensor, a writable host buffer or an (address, length) pair, "
                f"got {type(a).__name__}"
            ) from None
        if itemsize != size or fmt not in formats:
            raise TypeError(f"{name} holds {fmt!r} items of {itemsize} bytes; it must hold {kind}")
        self.place(name, Device.CPU)
        address, pin = _host_address(name, a, 0)
        self.pins.append(pin)
        return address, len(pin) // size

    def mask(self, name, m):
        if not isinstance(m, BlockMask):
            raise TypeError(f"{name} must be a seerattn.BlockMask, got {type(m).__name__}")
        counts = self.array(f"{name}.counts", m.counts, "int32", m.device)
        indices = self.array(f"{name}.indices", m.indices, "int32", m.device)
        offsets = self.array(f"{name}.row_offsets", m.row_offsets, "int64", m.device)
        return _lib.SeerBlockMask(
            _ptr(counts[0], ctypes.c_int32),
            counts[1],
            _ptr(indices[0], ctypes.c_int32),
            indices[1],
            _ptr(offsets[0], ctypes.c_int64),
            offsets[1],
            self.device,
        )

    def empty(self, name, shape, dtype):
        """A new torch tensor (dtype named as in torch) on the device of this
        call's tensors, allocated on the call's stream: PyTorch's allocator
        then reuses its memory only after the work enqueued there."""
        torch = _torch()
        if self.torch_device is None:
            raise TypeError(f"pass {name}: seerattn allocates buffers (with PyTorch) only for torch tensor inputs")
        if self._alloc_stream is None:
            return torch.empty(shape, dtype=getattr(torch, dtype), device=self.torch_device)
        with torch.cuda.stream(self._alloc_stream):
            return torch.empty(shape, dtype=getattr(torch, dtype), device=self.torch_device)

    def use_stream(self, stream):
        """Choose the call's cudaStream_t: the one given (a torch.cuda.Stream
        or a handle), else PyTorch's current stream of the tensors' device,
        else NULL (the legacy default stream). Call once the inputs are placed."""
        if self.device != Device.CUDA:
            return None
        torch = _torch()
        if stream is None:
            if self.torch_device is not None:
                self.cuda_stream = torch.cuda.current_stream(self.torch_device).cuda_stream
        elif hasattr(stream, "cuda_stream"):
            self.cuda_stream, self._alloc_stream = stream.cuda_stream, stream
        else:
            self.cuda_stream = int(stream)
            if self.torch_device is not None:
                self._alloc_stream = torch.cuda.ExternalStream(self.cuda_stream, device=self.torch_device)
        return self.cuda_stream


def _ptr(address, ctype):
    return ctypes.cast(address, ctypes.POINTER(ctype))


def _int32s(what, values):
    if _is_torch(values) and values.is_cuda:
        raise ValueError(f"{what} must be in host memory (a list or a CPU tensor): the library reads it on the host")
    out = [int(v) for v in values]
    for v in out:
        if not -(2**31) <= v < 2**31:
            raise ValueError(f"{what}: {v} does not fit the library's int32 offsets")
    return out


class Batch:
    """The sequences of a variable-length batch, FlashAttention style:
    sequence s owns query rows cu_seqlens_q[s]..cu_seqlens_q[s+1] and key
    rows cu_seqlens_k[s]..cu_seqlens_k[s+1]; its queries are the last q_len
    of its k_len positions (q_len < k_len: a chunk over a KV cache). Both
    lists have num_seqs + 1 entries; cu_seqlens_k defaults to cu_seqlens_q."""

    def __init__(self, cu_seqlens_q, cu_seqlens_k=None):
        q = _int32s("cu_seqlens_q", cu_seqlens_q)
        k = q if cu_seqlens_k is None else _int32s("cu_seqlens_k", cu_seqlens_k)
        # The library reads num_seqs + 1 entries of each: a shorter list would be read past its end.
        if len(q) != len(k) or not q:
            raise ValueError(f"cu_seqlens_q ({len(q)} entries) and cu_seqlens_k ({len(k)}) need num_seqs + 1 each")
        self.cu_seqlens_q, self.cu_seqlens_k = tuple(q), tuple(k)
        self._q, self._k = (ctypes.c_int32 * len(q))(*q), (ctypes.c_int32 * len(k))(*k)
        self._c = _lib.SeerBatch(len(q) - 1, self._q, self._k)

    @classmethod
    def from_lengths(cls, q_lens, k_lens=None):
        """A batch from per-sequence query (and key) lengths."""

        def cumulative(lens):
            out = [0]
            for n in lens:
                out.append(out[-1] + int(n))
            return out

        return cls(cumulative(q_lens), None if k_lens is None else cumulative(k_lens))

    @property
    def num_seqs(self):
        return len(self.cu_seqlens_q) - 1

    def __repr__(self):
        return f"Batch(cu_seqlens_q={list(self.cu_seqlens_q)}, cu_seqlens_k={list(self.cu_seqlens_k)})"


def _batch(batch, q_desc, k_desc):
    """The call's batch; by default one sequence over all rows of q and k."""
    if batch is not None:
        if not isinstance(batch, Batch):
            raise TypeError(f"batch must be a seerattn.Batch, got {type(batch).__name__}")
        return batch
    if k_desc is None:
        raise ValueError("pass batch: without k_nope (K-block caches) the key lengths are not known")
    return Batch([0, q_desc.shape[0]], [0, k_desc.shape[0]])


GateConfig = collections.namedtuple("GateConfig", [name for name, _ in _lib.SeerGateConfig._fields_[1:]])
GateConfig.__doc__ = """A gate's configuration: the fields of SeerGateConfig, enums as their
integer values (seerattn.Pool bits, seerattn.RopeScaling, seerattn.SparsityMethod)."""

MaskSizes = collections.namedtuple("MaskSizes", ["rows", "row_offsets_len", "indices_len", "dense_bytes"])


class Gate:
    """The gates of every layer of one model, loaded from a released gate
    directory (config.json plus attn_gate_weights.pth or .safetensors).
    Usable as a context manager; `close()` (or garbage collection) frees it."""

    def __init__(self, directory):
        handle = ctypes.POINTER(_lib.SeerGate)()
        call("seer_gate_load", os.fsencode(directory), _BYREF(handle))
        self._handle = handle
        self._cuda_device = None
        # Kept for __del__ at interpreter exit, when module globals may be gone.
        self._destroy = _lib.lib.seer_gate_destroy
        config = _lib.SeerGateConfig(struct_size=ctypes.sizeof(_lib.SeerGateConfig))
        call("seer_gate_get_config", handle, _BYREF(config))
        self.config = GateConfig(*(getattr(config, name) for name in GateConfig._fields))

    @property
    def handle(self):
        if self._handle is None:
            raise ValueError("the gate is closed")
        return self._handle

    def has_layer(self, layer):
        """Whether layer `layer` has gate weights."""
        return bool(_lib.lib.seer_gate_has_layer(self.handle, layer))

    def upload(self, device=None):
        """Copy the weights to a CUDA device, for masks of CUDA tensors. With
        PyTorch: to `device` (default: the current CUDA device), into the
        context PyTorch uses. Without: to the thread's current CUDA context,
        else device 0. Synchronous; not for the hot path or a graph capture."""
        torch = _torch()
        if torch is None or not torch.cuda.is_available():
            if device is not None and torch is None:
                raise TypeError("upload(device=...) needs PyTorch; without it the gate goes to device 0")
            # Not recorded: close() cannot synchronize without PyTorch; the caller does.
            # Where PyTorch sees no GPU, the library says why (NoDeviceError).
            call("seer_gate_upload", self.handle)
            return
        dev = torch.device("cuda" if device is None else device)
        if dev.type != "cuda":
            raise ValueError(f"upload takes a CUDA device, got {dev}")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        with torch.cuda.device(index):
            # The library uploads to the thread's current context: a runtime
            # call on the device makes its primary context (PyTorch's) current.
            torch.cuda.synchronize()
            call("seer_gate_upload", self.handle)
        self._cuda_device = index

    def close(self):
        handle, self._handle = self._handle, None
        if handle is None:
            return
        torch = _torch()
        if self._cuda_device is not None and torch is not None:
            # Destroying frees the device weights: work still enqueued must not read them.
            torch.cuda.synchronize(self._cuda_device)
        self._destroy(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_handle", None) is not None:
            self.close()

    def __repr__(self):
        c = self.config
        state = "closed" if self._handle is None else f"{c.num_layers} layers"
        return f"<seerattn.Gate {state}, {c.num_q_heads} q heads, {c.num_kv_heads} kv heads, head_dim {c.head_dim}>"


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """How gate scores become a mask; a field left None keeps the gate's
    config (threshold or top-k rule, last_block_dense) or the library's
    default (empty_rows "keep_diagonal", threshold_compare "f32"). Giving
    `threshold` selects the threshold rule, `nz_ratio` the top-k rule."""

    threshold: float = None
    nz_ratio: float = None
    last_block_dense: bool = None
    empty_rows: str = None
    threshold_compare: str = None

    def apply(self, p):
        if self.threshold is not None and self.nz_ratio is not None:
            raise ValueError("MaskRule takes threshold or nz_ratio, not both: each selects its own rule")
        if self.threshold is not None:
            p.sparsity_method, p.threshold = SparsityMethod.THRESHOLD, self.threshold
        if self.nz_ratio is not None:
            p.sparsity_method, p.nz_ratio = SparsityMethod.NZ_RATIO, self.nz_ratio
        if self.last_block_dense is not None:
            p.last_block_dense = int(bool(self.last_block_dense))
        if self.empty_rows is not None:
            p.empty_rows = _enum(EmptyRows, "empty_rows", self.empty_rows)
        if self.threshold_compare is not None:
            p.threshold_compare = _enum(ThresholdCompare, "threshold_compare", self.threshold_compare)


def _device_code(device):
    return _enum(Device, "device", getattr(device, "type", device))


# Tokens per block of every mask: the one size the library supports.
_BLOCK = 64


def mask_sizes(batch, num_q_heads):
    """Entries of each mask array (and bytes of the dense map) for a batch."""
    s = _lib.SeerMaskSizes(struct_size=ctypes.sizeof(_lib.SeerMaskSizes))
    call("seer_mask_sizes", _BYREF(batch._c), num_q_heads, _BLOCK, _BYREF(s))
    return MaskSizes(s.rows, s.row_offsets_len, s.indices_len, s.dense_bytes)


def prefill_workspace_size(batch, num_q_heads, head_dim, device="cuda"):
    """Scratch bytes `sparse_prefill` uses on `device` for this batch
    (0 on the CPU; on CUDA 256 bytes of work-item counters, plus the
    split-KV parts for batches that are split)."""
    out = ctypes.c_size_t()
    call("seer_prefill_workspace_size", _BYREF(batch._c), num_q_heads, head_dim, _device_code(device), _BYREF(out))
    return out.value


def gate_workspace_size(gate, batch, device="cuda"):
    """Scratch bytes the gate needs on `device` for this batch (0 on the CPU)."""
    out = ctypes.c_size_t()
    call("seer_gate_workspace_size", gate.handle, _BYREF(batch._c), _device_code(device), _BYREF(out))
    return out.value


def kblock_cache_size(gate, max_tokens):
    """Bytes of one K-block cache (one layer, one sequence) for sequences
    of up to `max_tokens` tokens."""
    out = ctypes.c_size_t()
    call("seer_kblock_cache_size", gate.handle, max_tokens, _BYREF(out))
    return out.value


def cuda_device_info():
    """(compute capability as major * 10 + minor, SM count) of the GPU the
    library would use; NoDeviceError without a driver or GPU."""
    cc, sms = ctypes.c_int32(), ctypes.c_int32()
    call("seer_cuda_device_info", _BYREF(cc), _BYREF(sms))
    return cc.value, sms.value


def _workspace(args, name, given, nbytes):
    """(address, bytes) of a workspace: the given torch uint8 tensor or
    (address, bytes) pair, else a new torch buffer of `nbytes` (none for 0)."""
    if given is not None:
        return args.array(name, given, "uint8", args.device)
    if nbytes == 0:
        return None, 0
    return args.array(name, args.empty(name, (nbytes,), "uint8"), "uint8")


def _caches(args, gate, batch, caches):
    """The host array of K-block cache addresses: torch uint8 tensors
    (their size checked here: the library sees only addresses) or ints."""
    caches = list(caches)
    addresses = []
    for s, c in enumerate(caches):
        name = f"kblock_caches[{s}]"
        if _is_torch(c):
            address, length = args.array(name, c, "uint8")
            if s < batch.num_seqs:
                k_len = batch.cu_seqlens_k[s + 1] - batch.cu_seqlens_k[s]
                need = kblock_cache_size(gate, k_len)
                if length < need:
                    raise ValueError(f"{name} holds {length} bytes; a sequence of {k_len} tokens needs {need}")
            addresses.append(address)
        else:
            addresses.append(int(c))
    array = (ctypes.c_uint64 * len(addresses))(*addresses)
    args.pins.append(array)
    return array


def _mask_params(args, gate, layer, rule, workspace):
    p = _lib.SeerMaskParams()
    call("seer_mask_params_default", gate.handle, _BYREF(p))
    p.layer = layer
    if rule is not None:
        rule.apply(p)
    p.cuda_stream = args.cuda_stream
    p.workspace, p.workspace_bytes = workspace
    return p


def _new_mask(args, batch, num_q_heads):
    sizes = mask_sizes(batch, num_q_heads)
    return BlockMask(
        args.empty("mask", (sizes.rows,), "int32"),
        args.empty("mask", (sizes.indices_len,), "int32"),
        args.empty("mask", (sizes.row_offsets_len,), "int64"),
    )


def _gate_half(args, gate, layer, q_nope, k_nope, batch, rule, workspace_name, workspace, kblock_caches, stream):
    """The gate's half of a call: its batch, mask params and the q_nope and
    k_nope arguments."""
    qn = args.tensor("q_nope", q_nope, _INPUTS)
    kn = None if k_nope is None else args.tensor("k_nope", k_nope, _INPUTS)
    if kn is not None:
        args.same_dtype(["q_nope", "k_nope"], [qn, kn])
    batch = _batch(batch, qn, kn)
    args.use_stream(stream)
    ws_bytes = gate_workspace_size(gate, batch, args.device)
    p = _mask_params(args, gate, layer, rule, _workspace(args, workspace_name, workspace, ws_bytes))
    if kblock_caches is not None:
        caches = _caches(args, gate, batch, kblock_caches)
        p.maybe_kblock_caches, p.num_kblock_caches = caches, len(caches)
    return batch, p, [_BYREF(qn), None if kn is None else _BYREF(kn)]


def block_mask(
    gate, layer, q_nope, k_nope, *, batch=None, rule=None, mask=None, workspace=None, kblock_caches=None, stream=None
):
    """Layer `layer`'s block mask from the pre-RoPE q_nope [total_q,
    num_q_heads, head_dim] and k_nope [total_k, num_kv_heads, head_dim]
    (bf16 or f16). On CUDA tensors the gate must be uploaded; the work is
    enqueued on `stream` (default: PyTorch's current stream) and nothing is
    synchronized. `kblock_caches` (CUDA, one per sequence, brought up to
    this batch by `kblock_cache_update`) replace k_nope, which is then None.
    Returns `mask` (allocated when not given)."""
    args = _Args()
    batch, p, inputs = _gate_half(
        args, gate, layer, q_nope, k_nope, batch, rule, "workspace", workspace, kblock_caches, stream
    )
    if mask is None:
        mask = _new_mask(args, batch, gate.config.num_q_heads)
    m = args.mask("mask", mask)
    call("seer_gate_compute_mask", gate.handle, _BYREF(p), _BYREF(batch._c), *inputs, _BYREF(m))
    return mask


def _prefill_half(args, q, k, v, mask, batch, out, lse, softmax_scale, workspace_name, workspace, stream):
    """The prefill's half of a call: its batch, params, the arguments from
    q to lse_len, and out and lse (allocated when not given; lse=True asks
    for one). A mask not given is allocated (for gate_attention to fill)."""
    qd, kd, vd = (args.tensor(n, t, _INPUTS) for n, t in (("q", q), ("k", k), ("v", v)))
    args.same_dtype(["q", "k", "v"], [qd, kd, vd])
    batch = _batch(batch, qd, kd)
    args.use_stream(stream)
    if out is None:
        out = args.empty("out", tuple(qd.shape), _TORCH_NAMES[qd.dtype])
    od = args.tensor("out", out, _OUTPUTS)
    lse_arg, lse_len = None, 0
    if lse is True:
        lse = args.empty("lse", (qd.shape[1], qd.shape[0]), "float32")
    if lse is not None:
        address, lse_len = args.array("lse", lse, "float32")
        lse_arg = _ptr(address, ctypes.c_float)
    if mask is None:
        mask = _new_mask(args, batch, qd.shape[1])
    m = args.mask("mask", mask)
    p = _lib.SeerPrefillParams()
    call("seer_prefill_params_default", _BYREF(p))
    p.softmax_scale = softmax_scale
    p.cuda_stream = args.cuda_stream
    ws_bytes = 0
    # Without PyTorch to allocate it, a CUDA call runs without split-KV (same results).
    if args.device == Device.CUDA and workspace is None and args.torch_device is not None:
        ws_bytes = prefill_workspace_size(batch, qd.shape[1], qd.shape[2], Device.CUDA)
    p.workspace, p.workspace_bytes = _workspace(args, workspace_name, workspace, ws_bytes)
    tail = [_BYREF(qd), _BYREF(kd), _BYREF(vd), _BYREF(m), _BYREF(od), lse_arg, lse_len]
    return batch, p, tail, out, lse


def sparse_prefill(q, k, v, mask, *, batch=None, out=None, lse=None, softmax_scale=0.0, workspace=None, stream=None):
    """Block-sparse causal attention of the post-RoPE q [total_q,
    num_q_heads, head_dim] over k, v [total_k, num_kv_heads, head_dim]
    (bf16 or f16, one dtype), restricted to the blocks `mask` selects.
    `out` (default: new, like q) may be q's dtype or f32; `lse` a float32
    [num_q_heads, total_q] buffer, or True for a new one. softmax_scale 0
    means 1/sqrt(head_dim). On CUDA the kernel is enqueued on `stream`
    (default: PyTorch's current stream) without synchronizing; a
    split-KV workspace is allocated when PyTorch can. Returns out, or
    (out, lse) when lse was asked for."""
    if mask is None:
        raise TypeError("sparse_prefill needs a mask (block_mask, mask_from_dense, or gate_attention for both)")
    args = _Args()
    batch, p, tail, out, lse = _prefill_half(
        args, q, k, v, mask, batch, out, lse, softmax_scale, "workspace", workspace, stream
    )
    call("seer_sparse_prefill", _BYREF(p), _BYREF(batch._c), *tail)
    return out if lse is None else (out, lse)


def gate_attention(
    gate,
    layer,
    q_nope,
    k_nope,
    q,
    k,
    v,
    *,
    batch=None,
    rule=None,
    mask=None,
    out=None,
    lse=None,
    softmax_scale=0.0,
    gate_workspace=None,
    prefill_workspace=None,
    kblock_caches=None,
    stream=None,
):
    """Gate and sparse prefill of one layer in one call: `block_mask` of
    q_nope / k_nope into `mask`, then `sparse_prefill` of q, k, v over it.
    Arguments as for those two; on CUDA both run on one stream, capturable
    into a CUDA graph (after one eager call has loaded the kernels). Pass
    `mask` to read the mask afterwards. Returns out, or (out, lse)."""
    args = _Args()
    batch, mp, inputs = _gate_half(
        args, gate, layer, q_nope, k_nope, batch, rule, "gate_workspace", gate_workspace, kblock_caches, stream
    )
    batch, pp, tail, out, lse = _prefill_half(
        args, q, k, v, mask, batch, out, lse, softmax_scale, "prefill_workspace", prefill_workspace, stream
    )
    call("seer_gate_attention", gate.handle, _BYREF(mp), _BYREF(pp), _BYREF(batch._c), *inputs, *tail)
    return out if lse is None else (out, lse)


def kblock_cache_update(gate, layer, k_new, kblock_caches, *, batch, workspace=None, stream=None):
    """Pool a chunk's new pre-RoPE keys into each sequence's K-block cache
    of layer `layer` (CUDA): k_new [total_q, num_kv_heads, head_dim] holds
    sequence s's q_len new keys at rows cu_seqlens_q[s].., and each cache
    must hold exactly that sequence's earlier k_len - q_len tokens. Caches
    are torch uint8 CUDA tensors of at least `kblock_cache_size(gate,
    k_len)` bytes (or device addresses), one per sequence in batch order.
    Then `block_mask(..., kblock_caches=...)` with the same batch needs no
    k_nope."""
    args = _Args()
    kd = args.tensor("k_new", k_new, _INPUTS)
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be a seerattn.Batch, got {type(batch).__name__}")
    args.use_stream(stream)
    caches = _caches(args, gate, batch, kblock_caches)
    ws_bytes = gate_workspace_size(gate, batch, args.device)
    p = _mask_params(args, gate, layer, None, _workspace(args, "workspace", workspace, ws_bytes))
    call("seer_kblock_cache_update", gate.handle, _BYREF(p), _BYREF(batch._c), _BYREF(kd), caches, len(caches))


def _dense(args, name, dense, nbytes):
    """(address, length) of a host u8 map: the library reads it on the host,
    so a CUDA tensor (which it would read as host memory) is refused here."""
    if _is_torch(dense) and dense.is_cuda:
        raise ValueError(f"{name} must be in host memory (.cpu()): the library converts masks on the host")
    address, length = args.array(name, dense, "uint8", Device.CPU)
    if length != nbytes:
        raise ValueError(f"{name} holds {length} bytes; the batch's dense map has {nbytes}")
    return address, length


def mask_from_dense(dense, batch, num_q_heads, *, mask=None):
    """The index-list mask of a dense u8 (or bool) block map laid out per
    sequence as [num_q_heads, q_blocks, k_blocks] (non-zero selects; blocks
    above the causal diagonal are dropped). Host memory only; a new mask is
    allocated with PyTorch on the CPU when `mask` is not given."""
    args = _Args()
    sizes = mask_sizes(batch, num_q_heads)
    address, length = _dense(args, "dense", dense, sizes.dense_bytes)
    if mask is None:
        mask = _new_mask(args, batch, num_q_heads)
    m = args.mask("mask", mask)
    dense = _ptr(address, ctypes.c_uint8)
    call("seer_mask_from_dense", _BYREF(batch._c), num_q_heads, _BLOCK, dense, length, _BYREF(m))
    return mask


def mask_to_dense(mask, batch, num_q_heads, *, out=None):
    """The dense u8 map (1 = selected) of a host mask, [dense_bytes] laid out
    per sequence as [num_q_heads, q_blocks, k_blocks]; `out` is allocated
    with PyTorch when not given."""
    args = _Args()
    m = args.mask("mask", mask)
    if args.device == Device.CUDA:
        raise ValueError("mask must be in host memory (its arrays .cpu()): the library converts masks on the host")
    sizes = mask_sizes(batch, num_q_heads)
    if out is None:
        out = args.empty("out", (sizes.dense_bytes,), "uint8")
    address, length = _dense(args, "out", out, sizes.dense_bytes)
    dense = _ptr(address, ctypes.c_uint8)
    call("seer_mask_to_dense", _BYREF(batch._c), num_q_heads, _BLOCK, _BYREF(m), dense, length)
    return out
