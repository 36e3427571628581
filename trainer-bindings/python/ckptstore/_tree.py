"""The pickle-free encoding of a nested state dict.

A state (model + optimizer + scheduler + RNG + plain values) is split in two: every tensor
goes to the engine's tensor path under a readable name (its key path joined by ``/``, e.g.
``model/fc.weight``, ``optimizer/state/0/exp_avg``; a flat model state dict keeps its own
keys), and the structure with the small values goes to one JSON blob, ``__ckptstore__/tree``.
Decoding rebuilds the same structure. Nothing is ever unpickled: loading a checkpoint cannot run
code.

Supported values (anything else is a TypeError naming its key path, raised before anything is
written): ``None``, ``bool``, ``int`` (any size), ``float`` (bit-exact, NaN and infinities
included), ``str``, ``bytes``/``bytearray`` (bytearray comes back as bytes; values over 64 KiB
go to their own blob), ``list``, ``tuple`` (subclasses such as ``torch.Size`` come back as plain
tuples), ``dict`` and its subclasses such as ``OrderedDict`` (keys: str, int, float, bool,
None or tuples of them; order kept; comes back as ``dict``), numpy scalars (dtype kept), numpy
arrays and torch tensors of any numeric dtype (see _tensors; uint16/32/64 and complex ones are
stored as their bytes with the dtype in the tree). Not supported: sets, arbitrary objects,
functions, torch dtypes/devices, Python complex numbers, object/string arrays.

Node encoding (JSON): null/true/false/int/str as themselves; ``{"f": float.hex()}``,
``{"b": base64}``, ``{"blob": name}``, ``{"t": [..]}`` for a tuple, a JSON list for a list,
``{"d": [[key, value], ..]}`` for a dict, ``{"np": dtype, "b": base64}`` for a numpy scalar,
``{"tensor": name, "fw": "torch"|"numpy"}`` for a tensor (plus ``"as": dtype, "shape": [..]``
when it is stored as its bytes, for numeric dtypes the engine lacks).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from . import _tensors

TREE_BLOB = "__ckptstore__/tree"
BLOB_PREFIX = "__ckptstore__/bytes/"
FORMAT = "ckptstore.tree/1"
INLINE_BYTES_MAX = 64 << 10


class Encoded:
    """A state split into engine parts."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, str, list[int], Any]] = []
        self.blobs: list[tuple[str, bytes]] = []
        self._names: set[str] = set()

    def unique(self, name: str) -> str:
        n, i = name, 2
        while n in self._names or (n.startswith("__ckptstore__/") and
                                   not name.startswith(BLOB_PREFIX)):
            n = f"{name}#{i}"
            i += 1
        self._names.add(n)
        return n


def _path(parts: list[str]) -> str:
    return "/".join(parts) if parts else "<root>"


def _key(k: Any, where: list[str]) -> Any:
    if k is None or isinstance(k, (bool, int, str)):
        return k
    if isinstance(k, float):
        return {"f": k.hex()}
    if isinstance(k, tuple):
        return {"t": [_key(x, where) for x in k]}
    raise TypeError(f"{_path(where)}: dict key {k!r} of type {type(k).__name__} cannot be "
                    f"stored (keys: str, int, float, bool, None or tuples of them)")


def encode(state: Mapping[str, Any]) -> Encoded:
    """Splits ``state``; raises TypeError naming the key path of the first unsupported value."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict (a state_dict), not {type(state).__name__}")
    out = Encoded()
    flat = all(isinstance(k, str) for k in state) and all(
        _tensors.is_tensor(v) for v in state.values())

    def enc(v: Any, parts: list[str]) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)  # int subclasses (IntEnum) come back as int
        if isinstance(v, float):
            return {"f": float(v).hex()}
        if isinstance(v, np.generic):
            if v.dtype.kind not in "biuf":
                raise TypeError(f"{_path(parts)}: numpy scalar of dtype {v.dtype} cannot be stored")
            return {"np": v.dtype.str, "b": base64.b64encode(v.tobytes()).decode()}
        if isinstance(v, (bytes, bytearray)):
            if len(v) > INLINE_BYTES_MAX:
                name = out.unique(BLOB_PREFIX + _path(parts))
                out.blobs.append((name, bytes(v)))
                return {"blob": name}
            return {"b": base64.b64encode(bytes(v)).decode()}
        if _tensors.is_tensor(v):
            name = out.unique(parts[-1] if flat else _path(parts))
            dtype, shape, src, raw = _tensors.to_source(_path(parts), v)
            out.tensors.append((name, dtype, shape, src))
            node = {"tensor": name, "fw": _tensors.framework_of(v)}
            if raw is not None:
                node.update(raw)
            return node
        if isinstance(v, Mapping):
            return {"d": [[_key(k, parts), enc(x, parts + [str(k)])] for k, x in v.items()]}
        if isinstance(v, list):
            return [enc(x, parts + [str(i)]) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return {"t": [enc(x, parts + [str(i)]) for i, x in enumerate(v)]}
        raise TypeError(f"{_path(parts)}: {type(v).__module__}.{type(v).__qualname__} cannot be "
                        f"stored (supported: tensors, numpy arrays and scalars, None, bool, int, "
                        f"float, str, bytes, list, tuple, dict)")

    try:
        root = enc(state, [])
    finally:
        # enc refers to itself through its closure cell: without this the cycle would hold
        # `out` (and the caller's tensors) until the garbage collector ran
        del enc
    doc = json.dumps({"format": FORMAT, "root": root}, separators=(",", ":"), allow_nan=False)
    out.blobs.append((TREE_BLOB, doc.encode()))
    return out


def decode(doc: bytes, tensor: Callable[[dict[str, Any]], Any],
           blob: Callable[[str], bytes]) -> Any:
    """Rebuilds a state from its tree blob; ``tensor(node)`` (a tensor node, see above) and
    ``blob(name)`` fetch the parts."""
    d = json.loads(doc)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{TREE_BLOB}: unknown tree format {d.get('format') if isinstance(d, dict) else d!r}")

    return _dec(d["root"], tensor, blob)


# Module-level, not closures inside decode(): a recursive closure refers to itself through its
# cell, a reference cycle that held ``tensor`` (and with it the checkpoint, the store and its
# writer lock) after the load had returned, until the garbage collector ran.
def _dec_key(k: Any) -> Any:
    if isinstance(k, dict):
        if "f" in k:
            return float.fromhex(k["f"])
        if "t" in k:
            return tuple(_dec_key(x) for x in k["t"])
    return k


def _dec(n: Any, tensor: Callable[[dict[str, Any]], Any], blob: Callable[[str], bytes]) -> Any:
    if n is None or isinstance(n, (bool, int, str)):
        return n
    if isinstance(n, list):
        return [_dec(x, tensor, blob) for x in n]
    if "f" in n:
        return float.fromhex(n["f"])
    if "np" in n:
        dt = _tensors.plain_numpy_dtype(n["np"])  # never an object dtype
        return np.frombuffer(base64.b64decode(n["b"]), dtype=dt)[0]
    if "b" in n:
        return base64.b64decode(n["b"])
    if "blob" in n:
        return blob(n["blob"])
    if "tensor" in n:
        return tensor(n)
    if "t" in n:
        return tuple(_dec(x, tensor, blob) for x in n["t"])
    if "d" in n:
        return {_dec_key(k): _dec(v, tensor, blob) for k, v in n["d"]}
    raise ValueError(f"{TREE_BLOB}: unknown node {n!r}")

