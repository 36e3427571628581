"""CUDA tensors in and out.

Saves: a CUDA tensor goes to the engine as ``("cuda", tensor, device, data_ptr, nbytes,
stream)``; the engine's ``CudaStager`` copies it into its pinned staging pool on its own copy
stream, ordered after torch's current stream of the tensor's device, so ``save_async`` returns
once those copies are issued and fenced. Where the wheel has no CUDA support or no driver
loads, CUDA tensors are copied to host memory by torch instead; that is logged once.

Loads: ``DeviceCopier`` moves stored bytes to a device through a small ring of pinned host
buffers with asynchronous host-to-device copies on torch's current stream: the copy of one
piece overlaps the read (and verification) of the next, and the whole state is never
materialised in host memory.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import _native
from ._optional import require_torch

_log = logging.getLogger("ckptstore")
_staging: bool | None = None


def staging_available() -> bool:
    """Whether the engine stages CUDA tensors (checked once; the answer is logged once)."""
    global _staging
    if _staging is None:
        ok, why = _native.cuda_staging()
        _staging = bool(ok)
        if ok:
            _log.info("ckptstore: CUDA tensors are staged by the engine: %s", why)
        else:
            _log.info("ckptstore: CUDA tensors are copied to host memory by torch before "
                      "saving (%s)", why)
    return _staging


def device_source(t: Any) -> tuple[str, Any, int, int, int, int]:
    """The engine's source tuple of a contiguous CUDA tensor."""
    torch = require_torch("CUDA tensors")
    stream = torch.cuda.current_stream(t.device).cuda_stream
    return ("cuda", t, int(t.device.index or 0), int(t.data_ptr()),
            int(t.numel() * t.element_size()), int(stream))


class DeviceCopier:
    """Host bytes to a device through ``nbuf`` pinned buffers of ``piece`` bytes each."""

    def __init__(self, device: Any, piece: int = 32 << 20, nbuf: int = 3):
        torch = require_torch("device=")
        self.torch = torch
        self.device = torch.device(device)
        self.piece = piece
        self.stream = torch.cuda.current_stream(self.device)
        self._bufs: list[Any] = []
        self._events: list[Any] = []
        self._nbuf = nbuf
        self._next = 0

    def _buffer(self, n: int) -> tuple[Any, np.ndarray]:
        torch = self.torch
        i = self._next
        self._next = (i + 1) % self._nbuf
        if i == len(self._bufs):
            self._bufs.append(torch.empty(self.piece, dtype=torch.uint8, pin_memory=True))
            self._events.append(torch.cuda.Event())
        else:
            self._events[i].synchronize()  # its previous copy has left it
        buf = self._bufs[i]
        self._cur = i
        return buf[:n], buf.numpy()[:n]

    def copy_into(self, dst_u8: Any, src: np.ndarray) -> None:
        """Copies the uint8 array ``src`` into the device uint8 tensor ``dst_u8`` (same
        length), piece by piece, asynchronously."""
        n = src.nbytes
        with self.torch.cuda.stream(self.stream):
            for off in range(0, n, self.piece):
                m = min(self.piece, n - off)
                pinned, host = self._buffer(m)
                np.copyto(host, src[off:off + m])
                dst_u8[off:off + m].copy_(pinned, non_blocking=True)
                self._events[self._cur].record(self.stream)

    def tensor(self, storage: np.ndarray, torch_dtype: Any, shape: Any) -> Any:
        """A new device tensor of ``torch_dtype`` and ``shape`` holding ``storage``'s bytes."""
        torch = self.torch
        t = torch.empty(tuple(shape), dtype=torch_dtype, device=self.device)
        if t.numel():
            src = np.ascontiguousarray(storage).reshape(-1).view(np.uint8)
            self.copy_into(t.view(-1).view(torch.uint8), src)
        return t

    def into(self, dst: Any, storage: np.ndarray) -> None:
        """Copies stored bytes into the existing device tensor ``dst`` (same dtype and shape):
        straight in when it is contiguous, else through a contiguous device tensor."""
        torch = self.torch
        if not dst.numel():
            return
        src = np.ascontiguousarray(storage).reshape(-1).view(np.uint8)
        with torch.no_grad():
            if dst.is_contiguous():
                self.copy_into(dst.detach().view(-1).view(torch.uint8), src)
            else:
                dst.copy_(self.tensor(src, dst.dtype, dst.shape))


def is_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")
