"""Tensors across the boundary: torch and numpy in (without a Python-side copy), engine bytes
out (a numpy view of the segment's map, or one copy into a torch tensor).

In: a contiguous CPU torch tensor is passed as ``(tensor, tensor.data_ptr(), tensor.nbytes)``
(any dtype, bfloat16 and float8 included: the engine takes bytes, and the tuple keeps the
tensor alive); a C-contiguous numpy array through the buffer protocol as a uint8 view of the
same memory. A non-contiguous tensor or array is made contiguous explicitly (a copy); a CUDA
tensor goes to the engine's CUDA stager by its device pointer (``_cuda``), or where the
engine cannot stage it (no CUDA support in the build, no driver) is staged to host memory by
torch (a copy): never silently wrong, never a silent reinterpretation.

Out: ``framework="numpy"`` gives read-only arrays over the engine's memory map when the engine
serves the tensor zero-copy (writing raises), else over its one owned copy;
``framework="torch"`` copies once into a fresh tensor, because torch has no read-only tensors
and an in-place write into the read-only map would crash the process.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._optional import require_torch, torch_if_loaded

# engine dtype name -> numpy dtype with the same bytes (bf16/f8 have none in numpy: their bytes
# travel as unsigned integers of the same width and are reinterpreted by torch).
_STORAGE_NP: dict[str, np.dtype[Any]] = {
    "f64": np.dtype("<f8"),
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "f8e4m3": np.dtype("u1"),
    "f8e5m2": np.dtype("u1"),
    "i64": np.dtype("<i8"),
    "i32": np.dtype("<i4"),
    "i16": np.dtype("<i2"),
    "i8": np.dtype("i1"),
    "u8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
_NP_TO_ENGINE = {v: k for k, v in _STORAGE_NP.items() if k not in ("bf16", "f8e4m3", "f8e5m2")}

_TORCH_NAMES = {
    "float64": "f64",
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "float8_e4m3fn": "f8e4m3",
    "float8_e5m2": "f8e5m2",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "bool",
}
_ENGINE_TO_TORCH = {v: k for k, v in _TORCH_NAMES.items()}
# torch dtypes the engine has no dtype for, stored as their bytes; their numpy equivalents
_TORCH_RAW = {"uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "complex64": "<c8",
              "complex128": "<c16", "complex32": None}


# DCP's TensorProperties: the layouts and memory formats a stored one may name.
_TORCH_LAYOUTS = frozenset({"strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr",
                            "sparse_bsc", "jagged"})
_TORCH_MEMORY_FORMATS = frozenset({"contiguous_format", "preserve_format", "channels_last",
                                   "channels_last_3d"})


def torch_attr(kind: str, name: Any) -> Any:
    """``getattr(torch, name)`` for a name read from a store, only if it is a ``kind``
    ("dtype", "layout" or "memory_format") ckptstore writes: a stored string never picks an
    arbitrary attribute of torch (a function, a module). ValueError otherwise."""
    allowed = {"dtype": _TORCH_NAMES.keys() | _TORCH_RAW.keys(), "layout": _TORCH_LAYOUTS,
               "memory_format": _TORCH_MEMORY_FORMATS}[kind]
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"stored torch {kind} {name!r} is not one ckptstore reads "
                         f"(one of {sorted(allowed)})")
    torch = require_torch(f"torch {kind} {name}")
    value = getattr(torch, name, None)
    if value is None:
        raise ValueError(f"stored torch {kind} {name!r}: this torch has none")
    return value


def plain_numpy_dtype(s: Any) -> np.dtype[Any]:
    """The numpy dtype a store names in a tree (``np.dtype(s)``), only if it is a plain number
    or bool: never an object, structured, sub-array or void dtype (their bytes could not be
    reinterpreted safely). ValueError otherwise."""
    try:
        dt = np.dtype(s) if isinstance(s, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in "biufc" or dt.hasobject or dt.fields is not None \
            or dt.subdtype is not None:
        raise ValueError(f"stored numpy dtype {s!r} is not a plain numeric dtype")
    return dt


def is_torch_tensor(x: Any) -> bool:
    torch = torch_if_loaded()
    return torch is not None and isinstance(x, torch.Tensor)


def is_tensor(x: Any) -> bool:
    return isinstance(x, np.ndarray) or is_torch_tensor(x)


def framework_of(x: Any) -> str:
    return "torch" if is_torch_tensor(x) else "numpy"


def to_source(key: str, x: Any) -> tuple[str, list[int], Any, dict[str, Any] | None]:
    """``(engine dtype, shape, source, raw)`` of a tensor or array; TypeError naming ``key``
    for what the store cannot hold. ``raw`` is set for a numeric dtype the engine lacks: the
    bytes are stored as a u8 tensor and ``raw`` (``{"as": dtype, "shape": shape}``) goes into
    the tree so the load can reinterpret them."""
    if isinstance(x, np.ndarray):
        dt = x.dtype
        if dt.byteorder == ">" or (dt.byteorder == "=" and not np.little_endian):
            raise TypeError(f"{key}: big-endian array ({dt}); convert it to little-endian first")
        name = _NP_TO_ENGINE.get(dt.newbyteorder("<") if dt.byteorder != "|" else dt)
        # (not np.ascontiguousarray for a contiguous one: it would make a 0-d array 1-d)
        arr = x if x.flags.c_contiguous else np.ascontiguousarray(x)
        if name is not None:
            return name, list(arr.shape), arr.reshape(-1).view(np.uint8), None
        if dt.kind not in "uifc" or dt.hasobject:
            raise TypeError(f"{key}: numpy dtype {dt} is not storable (numbers and bools only)")
        # a numeric dtype the engine lacks (uint16/32/64, complex, longdouble): its bytes as
        # u8, the real dtype in the tree
        raw = {"as": dt.str, "shape": list(arr.shape)}
        return "u8", [arr.nbytes], arr.reshape(-1).view(np.uint8), raw
    torch = torch_if_loaded()
    if torch is None or not isinstance(x, torch.Tensor):
        raise TypeError(f"{key}: {type(x).__name__} is not a tensor")
    if x.layout != torch.strided:
        raise TypeError(f"{key}: {x.layout} tensors are not storable; convert with .to_dense()")
    if x.is_quantized:
        raise TypeError(f"{key}: quantized tensors are not storable; dequantize first")
    tname = str(x.dtype).removeprefix("torch.")
    name = _TORCH_NAMES.get(tname)
    if name is None and tname not in _TORCH_RAW:
        raise TypeError(f"{key}: torch dtype {x.dtype} is not storable (supported: "
                        f"{sorted(_TORCH_NAMES) + sorted(_TORCH_RAW)})")
    t = x.detach()
    on_device = False
    if t.device.type == "cuda":
        from . import _cuda

        on_device = _cuda.staging_available()  # else staged by torch, below (said once)
    if t.device.type != "cpu" and not on_device:
        t = t.to("cpu")  # staged to host memory by torch (one copy); documented
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()  # explicit copy: the store holds row-major bytes
    if name is None:
        # a dtype the engine lacks (uint16/32/64, complex): its bytes as u8, the real dtype in
        # the tree
        u8 = t.reshape(-1).view(torch.uint8)
        raw = {"as": "torch." + tname, "shape": list(t.shape)}
        if on_device:
            return "u8", [u8.numel()], _device_source(u8), raw
        return "u8", [u8.numel()], (u8, u8.data_ptr(), u8.numel()), raw
    if on_device:
        return name, list(t.shape), _device_source(t), None
    return name, list(t.shape), (t, t.data_ptr(), t.numel() * t.element_size()), None


def _device_source(t: Any) -> Any:
    from . import _cuda

    return _cuda.device_source(t)


def storage_array(mb: Any) -> np.ndarray:
    """A read-only numpy array over the engine's bytes (zero-copy), in a dtype with the same
    bytes as the stored one (bf16 as uint16, float8 as uint8)."""
    arr = np.frombuffer(mb, dtype=_STORAGE_NP[mb.dtype])
    return arr.reshape(tuple(mb.shape))


def numpy_dtype(engine_dtype: str) -> np.dtype[Any]:
    if engine_dtype in ("bf16", "f8e4m3", "f8e5m2"):
        try:
            import ml_dtypes  # optional: gives numpy bfloat16/float8
        except ImportError:
            raise TypeError(
                f"numpy has no {engine_dtype} dtype: load it with framework=\"torch\", or "
                f"install ml_dtypes") from None
        return np.dtype({"bf16": ml_dtypes.bfloat16, "f8e4m3": ml_dtypes.float8_e4m3fn,
                         "f8e5m2": ml_dtypes.float8_e5m2}[engine_dtype])
    return _STORAGE_NP[engine_dtype]


def to_numpy(storage: np.ndarray, engine_dtype: str) -> np.ndarray:
    return storage.view(numpy_dtype(engine_dtype))


def to_torch(storage: np.ndarray, engine_dtype: str, device: Any = "cpu") -> Any:
    """One copy of ``storage`` into a new torch tensor of the stored dtype."""
    torch = require_torch("framework=\"torch\"")
    t = torch.empty(storage.shape, dtype=getattr(torch, _ENGINE_TO_TORCH[engine_dtype]))
    if t.numel():
        dst = t.view(-1).view(torch.uint8).numpy()
        np.copyto(dst, np.ascontiguousarray(storage).reshape(-1).view(np.uint8))
    if str(device) != "cpu":
        t = t.to(device)
    return t


def read_torch(native: Any, id: int, name: str, verify: bool, device: Any = "cpu") -> Any:
    """A stored tensor read into a new torch tensor (see ``TorchBatch``: read in place where
    the bytes are cold, else one copy)."""
    batch = TorchBatch(native, id, verify)
    t = batch.add(name)
    batch.fill()
    return t if str(device) == "cpu" else t.to(device)


def _over_bytes(buf: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
    """A torch tensor of ``dtype`` and ``shape`` whose storage is the writable buffer ``buf``
    (no copy; the tensor keeps ``buf`` alive)."""
    torch = require_torch("framework=\"torch\"")
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


class TorchBatch:
    """Torch tensors of one checkpoint, handed out as they are asked for and read all together
    by ``fill()``: one engine call (``load_many``, GIL released) reads the chunks of every
    tensor on one set of threads, so the disk is never idle at a tensor's end. Each tensor's
    storage is memory of its own that the engine filled: for a cold uncompressed tensor of a
    MiB or more, the memory the disk read it into (O_DIRECT, in place: no bounce copy, each
    byte touched by the disk's DMA and BLAKE3 only); for the rest, the engine's one copy
    (docs/DECISIONS.md, "Torch loads keep the memory the disk read into").

    ``add`` returns an empty placeholder of the right dtype; ``fill`` points it at the loaded
    storage (``Tensor.set_``), so a tensor placed in a tree before the fill is the one the
    caller gets. ``flush_bytes``: fill whenever this many bytes are pending (for a progress bar
    that moves); None fills once, at the end."""

    def __init__(self, native: Any, id: int, verify: bool, flush_bytes: int | None = None,
                 on_filled: Any = None):
        self._native, self._id, self._verify = native, id, verify
        self._flush, self._on_filled = flush_bytes, on_filled
        self._targets: list[tuple[str, Any, tuple[int, ...], int]] = []
        self._pending = 0

    def add(self, name: str) -> Any:
        """A torch tensor for stored tensor ``name``; its shape and bytes arrive by ``fill()``."""
        torch = require_torch("framework=\"torch\"")
        engine_dtype, stored_shape = self._native.tensor_meta(self._id, name)
        dtype = getattr(torch, _ENGINE_TO_TORCH[engine_dtype])
        shape = tuple(stored_shape)
        t = torch.empty(0, dtype=dtype)
        n = t.element_size()
        for d in shape:
            n *= d
        if n == 0:
            t = torch.empty(shape, dtype=dtype)  # nothing to read, nothing allocated
        else:
            self._targets.append((name, t, shape, n))
            self._pending += n
        if self._flush is not None and self._pending >= self._flush:
            self.fill()
        return t

    def fill(self) -> None:
        """Reads (verified unless the batch was made with ``verify=False``) every tensor
        added since the last fill."""
        if not self._targets:
            return
        targets, n = self._targets, self._pending
        self._targets, self._pending = [], 0
        bufs = self._native.load_many(self._id, [name for name, _, _, _ in targets],
                                      verify=self._verify)
        for (_, t, shape, _), buf in zip(targets, bufs):
            t.set_(_over_bytes(buf, t.dtype, shape))
        if self._on_filled is not None:
            self._on_filled(n)


def torch_engine_dtype(t: Any) -> str | None:
    return _TORCH_NAMES.get(str(t.dtype).removeprefix("torch."))


def copy_into_torch(dst: Any, storage: np.ndarray) -> None:
    """Copies stored bytes into an existing torch tensor of the same dtype and shape: straight
    into its memory when it is a contiguous CPU tensor (one copy), else through a staging
    tensor."""
    torch = require_torch("load_into")
    src = np.ascontiguousarray(storage).reshape(-1).view(np.uint8)
    with torch.no_grad():
        if dst.device.type == "cpu" and dst.is_contiguous() and dst.numel():
            np.copyto(dst.detach().view(-1).view(torch.uint8).numpy(), src)
        elif dst.numel():
            staged = torch.from_numpy(src.copy()).view(dst.dtype).reshape(dst.shape)
            dst.copy_(staged)


def from_raw(storage: np.ndarray, as_: str, shape: list[int], framework: str,
             device: Any = "cpu") -> Any:
    """A tensor stored as its bytes (see ``to_source``), reinterpreted as ``as_`` (a numpy
    dtype string, or ``torch.NAME``): numpy zero-copy read-only, torch one copy."""
    u8 = np.ascontiguousarray(storage).reshape(-1)
    if as_.startswith("torch."):
        tname = as_.removeprefix("torch.")
        if framework == "numpy":
            npd = _TORCH_RAW.get(tname)
            if npd is None:
                raise TypeError(f"numpy has no {as_} dtype: load it with framework=\"torch\"")
            return u8.view(np.dtype(npd)).reshape(shape)
        dtype = torch_attr("dtype", tname)
        torch = require_torch("framework=\"torch\"")
        t = torch.empty(u8.nbytes, dtype=torch.uint8)
        if u8.nbytes:
            np.copyto(t.numpy(), u8)
        out = t.view(dtype).reshape(shape)
    else:
        arr = u8.view(plain_numpy_dtype(as_)).reshape(shape)
        if framework == "numpy":
            return arr
        torch = require_torch("framework=\"torch\"")
        out = torch.from_numpy(arr.copy())
    return out if str(device) == "cpu" else out.to(device)


def _mapping_of(addr: int, nbytes: int) -> tuple[str, int] | None:
    """``(file, file offset)`` of the bytes at ``addr`` when this process maps them from a
    file, one mapping covering all ``nbytes`` (Linux /proc/self/maps); else None."""
    try:
        with open("/proc/self/maps", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(maxsplit=5)
        start, _, end = parts[0].partition(b"-")
        lo, hi = int(start, 16), int(end, 16)
        if lo <= addr < hi:
            if addr + nbytes > hi or len(parts) < 6:
                return None
            path = parts[5].decode(errors="surrogateescape")
            if not path.startswith("/") or path.endswith(" (deleted)"):
                return None
            return path, int(parts[2], 16) + (addr - lo)
    return None


def private_map(mb: Any) -> np.ndarray | None:
    """The stored bytes of ``mb`` as a writable uint8 array over a private copy-on-write map
    (MAP_PRIVATE) of the same segment file: no copy, and a write touches only this process's
    copy of that page, never the store. None when the engine did not serve ``mb`` from a
    segment's map (compressed, deduplicated or split chunks) or the map is not found."""
    import mmap as _mmap

    if not mb.zero_copy or len(mb) == 0:
        return None
    view = np.frombuffer(mb, dtype=np.uint8)
    where = _mapping_of(view.ctypes.data, view.nbytes)
    if where is None:
        return None
    path, off = where
    aligned = off - off % _mmap.ALLOCATIONGRANULARITY
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        m = _mmap.mmap(fd, off - aligned + view.nbytes, flags=_mmap.MAP_PRIVATE,
                       prot=_mmap.PROT_READ | _mmap.PROT_WRITE, offset=aligned)
    finally:
        os.close(fd)
    out = np.frombuffer(m, dtype=np.uint8, count=view.nbytes, offset=off - aligned)
    # Same file, same offsets: the bytes the engine just served (and verified). Segments are
    # immutable once written, so a mismatch means the lookup went wrong: refuse, never guess.
    if out[:64].tobytes() != view[:64].tobytes() or out[-64:].tobytes() != view[-64:].tobytes():
        return None
    return out


def torch_over(u8: np.ndarray, engine_dtype: str, shape: list[int] | tuple[int, ...]) -> Any:
    """A torch tensor of ``engine_dtype`` and ``shape`` over the bytes of ``u8`` (no copy)."""
    torch = require_torch("mmap=True")
    t = torch.from_numpy(u8)
    return t.view(getattr(torch, _ENGINE_TO_TORCH[engine_dtype])).reshape(tuple(shape))


def torch_dtype(engine_dtype: str) -> Any:
    """The torch dtype of an engine dtype name."""
    torch = require_torch("framework=\"torch\"")
    return getattr(torch, _ENGINE_TO_TORCH[engine_dtype])
