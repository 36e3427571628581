"""The user API: Store, save, save_async, load, load_into, and a checkpoint opened for reading.

Every storage decision (commit protocol, verification, recovery, retention) is the engine's;
this module converts Python values and calls it.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _cuda, _native, _progress, _tensors, _tree

_log = logging.getLogger("ckptstore")
from ._native import CorruptionError, NotFoundError, StoreError

PathLike = str | os.PathLike


class StrictLoadError(ValueError):
    """A strict load found names that do not line up; nothing was loaded."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected


class LoadResult(NamedTuple):
    """What ``load_into`` did not match (both empty after a strict load)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _Shared:
    """One open engine store, shared by every writer handle on the same directory in this
    process (see ``Store``)."""

    __slots__ = ("native", "refs", "key", "options")

    def __init__(self, native: Any, key: str, options: dict[str, Any]):
        self.native, self.refs, self.key, self.options = native, 1, key, options


# Writer stores open in this process, by canonical directory. The engine's writer lock is an
# flock(2) on the store's LOCK file, per open file: a second engine store on the same directory
# in the same process would conflict with the first, so every Store(d) shares one.
_OPEN: dict[str, _Shared] = {}
# Reentrant: a handle freed by the garbage collector runs _release on whatever thread the
# collection happens, possibly inside Store() of this same thread, holding this lock.
_OPEN_LOCK = threading.RLock()


def _release(shared: _Shared) -> None:
    """Drops one handle's reference; the last one closes the engine store (waiting for its
    background saves) and releases the writer lock."""
    with _OPEN_LOCK:
        shared.refs -= 1
        if shared.refs > 0:
            return
        if _OPEN.get(shared.key) is shared:
            del _OPEN[shared.key]
    shared.native.close()


def _after_fork_in_child() -> None:
    # A forked child inherits the parent's open LOCK file, and with it the parent's flock:
    # the parent could then never take the lock again once it closed its store, and its error
    # would name its own pid. The child drops its copy (the descriptor now points at
    # /dev/null, so the engine's later close of that number closes nothing else) and forgets
    # the parent's stores: a child opens its own.
    if not _OPEN:
        return
    locks = {os.path.join(k, "LOCK") for k in _OPEN}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        fds = []
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in fds:
            try:
                if os.readlink(f"/proc/self/fd/{fd}") in locks and int(fd) != null:
                    os.dup2(null, int(fd))
            except (OSError, ValueError):
                continue
    finally:
        os.close(null)
    import ctypes

    for shared in _OPEN.values():
        # Never closed or freed in the child (an extra reference it never drops, which outlives
        # the interpreter's teardown): its pipeline threads were the parent's, and joining them
        # here would hang.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(shared.native))
        shared.refs = 1 << 30
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_SECRET_OPTIONS = ("encryption_key", "old_encryption_keys")


def _shown(options: dict[str, Any]) -> dict[str, Any]:
    """Options as a message may show them: keys replaced by a placeholder."""
    return {k: ("<redacted>" if k in _SECRET_OPTIONS else v) for k, v in options.items()}


class Store:
    """A checkpoint store in one directory: ``Store(path, **options)`` opens it (creating it if
    needed) and runs recovery.

    One writer per store across processes (a writer in another process gets LockedError
    naming that process; ``read_only=True`` opens coexist with it). Within one process every
    ``Store(path)`` of the same directory shares one open engine store and its lock, so
    several callbacks, a ``save_checkpoint`` during training and a ``load`` in between all
    work; ``close()`` (or the handle being freed) drops this handle, and the last one closes
    the store and releases the lock. Handles sharing a store must ask for the same options.

    Options: ``read_only`` (False), ``chunk_size`` (bytes, 4 MiB; 4 KiB..1 GiB),
    ``segment_max_bytes`` (1 GiB; >= 1 MiB), ``wal_compact_min_bytes`` (8 MiB),
    ``recovery_mode`` ("tolerate_tail_corruption"; or "absolute_consistency", "point_in_time"),
    ``async_budget_bytes`` (256 MiB: the staging pool of ``save_async``'s write pipeline,
    allocated by the first ``save_async``; at least one chunk), ``mode`` (0o600: permission bits
    of the files it creates, directories get the matching x bits; 0o640 shares reading with the
    group), ``allow_unsafe_dir`` (False: a world-writable store directory, or for a writer one
    owned by another user, raises StoreError saying why), ``replica`` (None; a bucket URL,
    ``s3://bucket/prefix``: commits stay local and durable on return, a background thread
    copies them to the bucket, see ``replication()`` and ``wait_replicated()``; an empty
    directory is restored from the bucket's newest state first), ``replica_keep_last`` (None:
    the bucket mirrors the local store; N: it keeps the newest N checkpoints even after the
    local store deleted them), ``encryption_key`` (None: 32 bytes
    or 64 hex digits; every checkpoint saved is then sealed with AES-256-GCM, and a store holding
    sealed checkpoints raises EncryptionKeyError without it or with another key; the key is
    never stored, logged or shown), ``old_encryption_keys`` ([]: keys of checkpoints sealed
    before a rotation, read with, never written with).

    ``path`` may itself be a bucket URL (``s3://bucket/prefix``, ``file:///dir``): the store
    then lives in the bucket, with a local cache, and a save is durable once its commit object
    exists there. Endpoint and credentials come from the AWS environment variables
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
    """

    def __init__(self, path: PathLike, **options: Any) -> None:
        known = {"read_only", "chunk_size", "segment_max_bytes", "wal_compact_min_bytes",
                 "recovery_mode", "async_budget_bytes", "mode", "allow_unsafe_dir",
                 "encryption_key", "old_encryption_keys", "replica", "replica_keep_last"}
        bad = sorted(set(options) - known)
        if bad:
            raise TypeError(f"Store(): unknown option(s) {bad}; known: {sorted(known)}")
        self._path = os.fspath(path)
        self._closed = False
        if options.get("read_only"):
            # takes no lock: a private engine store, never shared
            shared = _Shared(_native.Store(self._path, **options), "", options)
        else:
            is_url = self._path.startswith(("s3://", "file://"))
            key = self._path if is_url else os.path.realpath(self._path)
            with _OPEN_LOCK:
                shared_or_none = _OPEN.get(key)
                if shared_or_none is not None and not shared_or_none.native.closed:
                    if shared_or_none.options != options:
                        raise ValueError(
                            f"store {key} is already open in this process with options "
                            f"{_shown(shared_or_none.options)}; a second handle must ask for "
                            f"the same ones, not {_shown(options)}")
                    shared = shared_or_none
                    shared.refs += 1
                else:
                    shared = _Shared(_native.Store(self._path, **options), key, options)
                    _OPEN[key] = shared
        self._shared = shared
        # Not a method of self (it would keep self alive): releases this handle's reference
        # when close() runs or when the handle is freed, whichever comes first.
        self._finalizer = weakref.finalize(self, _release, shared)

    @property
    def _native(self) -> Any:
        if self._closed:
            raise StoreError(f"store {self._path} is closed")
        return self._shared.native

    @property
    def path(self) -> str:
        return self._path

    @property
    def read_only(self) -> bool:
        return bool(self._shared.native.read_only)

    def list(self) -> builtins.list[dict[str, Any]]:
        """Live checkpoints, oldest first: id, step, epoch, wall_time_unix_ns, tensors, blobs,
        bytes, pinned, metadata."""
        return self._native.list()

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint (not verified), or None if the store is empty."""
        ls = self._native.list()
        return ls[-1] if ls else None

    def info(self, step: int | None = None, *, id: int | None = None) -> dict[str, Any]:
        return self._native.info(id=id, step=step)

    def open(self, step: int | None = None, *, id: int | None = None,
             framework: str = "torch", verify: bool = True) -> Checkpoint:
        """One checkpoint for reading (the newest without ``step``/``id``); a context
        manager."""
        return Checkpoint(self, self._native.info(id=id, step=step), framework, verify)

    def verify(self, id: int) -> None:
        self._native.verify(id)

    def scrub(self) -> dict[str, Any]:
        """Verifies every chunk of every checkpoint, quarantines the bad ones and heals the
        checkpoints a stored copy of the same bytes can heal (``ckptstore scrub``). Returns
        what ``ckptstore scrub --json`` prints: ``ok``, ``checkpoints``, ``bytes_read``,
        ``quarantined`` / ``healed`` / ``unhealed`` chunk locations and ``broken``
        (``[{"id", "error"}]``, the checkpoints that still fail verification). Needs the
        writer (not ``read_only``); runs after any queued background save has committed."""
        return self._native.scrub()

    def verify_chain(self) -> dict[str, Any]:
        """Tamper evidence of a sealed store (one opened with ``encryption_key``): every commit
        MAC checked (a changed, swapped or replayed commit raises CorruptionError) and linked.
        Returns ``verified``/``unauthenticated``/``unchecked`` (checkpoint ids: MAC checked, no
        MAC, key not supplied), ``breaks`` (id pairs with commits gone between them: deleted, or
        dropped by someone who can write the store) and ``head`` (``(id, mac_hex)``: keep it and
        pass it to ``check_head`` later to see a rollback)."""
        return self._native.verify_chain()

    def rekey(self) -> builtins.list[int]:
        """After a key rotation (opened with the new ``encryption_key`` and the old ones in
        ``old_encryption_keys``): reseals every checkpoint not under the new key, crash-safely,
        and frees the old bytes; afterwards the old keys are not needed. Returns the ids
        resealed."""
        return self._native.rekey()

    def check_head(self, id: int, mac_hex: str) -> None:
        """Raises CorruptionError if the store was rolled back past the chain head
        ``(id, mac_hex)`` that ``verify_chain`` returned earlier."""
        self._native.check_head(id, mac_hex)

    def delete(self, id: int) -> int:
        """Deletes checkpoint ``id`` durably; returns the bytes freed."""
        return self._native.delete(id)

    def replication(self) -> dict[int, str]:
        """Where each live checkpoint is: ``{id: "replicated" | "local_only"}``, oldest first.
        Without ``replica=`` every one is ``"local_only"``; in a bucket store (``s3://``)
        every one is ``"replicated"`` (a save returns only then)."""
        return dict(self._native.replication())

    def wait_replicated(self, timeout: float | None = None) -> None:
        """Blocks until the replica holds every checkpoint committed so far (and every
        deletion); raises StoreError after ``timeout`` seconds, with the replicator's last
        failure. Returns at once without ``replica=``."""
        self._native.wait_replicated(timeout)

    def pin(self, id: int) -> bool:
        return self._native.pin(id)

    def unpin(self, id: int) -> bool:
        return self._native.unpin(id)

    def apply_retention(self, *, keep_last: int | None = None,
                        keep_per_minutes: int | None = None,
                        keep_every_steps: int | None = None,
                        keep_best: tuple[int, str, str] | None = None,
                        protect: Iterable[int] = (), dry_run: bool = False) -> builtins.list[int]:
        """The engine's retention policy (rules combine as a union; the newest, pinned and
        ``protect`` ids are always kept). Returns the ids deleted (or, with ``dry_run``, that
        would be)."""
        return self._native.apply_retention(
            keep_last=keep_last, keep_per_minutes=keep_per_minutes,
            keep_every_steps=keep_every_steps, keep_best=keep_best, protect=list(protect),
            dry_run=dry_run)

    def close(self) -> None:
        """Waits for background saves, then drops this handle; the last handle of the store in
        this process closes it and releases its writer lock. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._shared.native.wait_saves()
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed or bool(self._shared.native.closed)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._shared.native) + (" (closed)" if self.closed else "")


class _Slice:
    """``Checkpoint.get_slice(name)``: index it to read part of a tensor (numpy indexing on the
    mapped bytes; only the result is copied)."""

    def __init__(self, ck: Checkpoint, name: str, framework: str | None):
        self._ck, self._name, self._fw = ck, name, framework
        dtype, shape = ck._store._native.tensor_meta(ck.id, name)
        self.dtype: str = dtype
        self.shape: tuple[int, ...] = tuple(shape)

    def __getitem__(self, idx: Any) -> Any:
        storage = self._ck._storage(self._name)[idx]
        fw = self._fw or self._ck.framework or "torch"
        if fw == "numpy":
            return _tensors.to_numpy(storage, self.dtype)
        return _tensors.to_torch(storage, self.dtype)

    def get_shape(self) -> tuple[int, ...]:
        return self.shape


class Checkpoint:
    """A committed checkpoint open for reading (``Store.open``)."""

    def __init__(self, store: Store, info: dict[str, Any], framework: str | None,
                 verify: bool):
        # framework None (from load()): tensors as saved in state(), torch otherwise
        if framework is not None:
            _check_framework(framework)
        self._store = store
        self.info = info
        self.id: int = info["id"]
        self.step: int = info["step"]
        self.epoch: int = info["epoch"]
        self.metadata: dict[str, Any] = info["metadata"]
        self.framework: str | None = framework
        self.verify = verify
        # load(mmap=True): tensors over private copy-on-write maps of the segments
        self.mmap = False
        self._tensor_names: list[str] | None = None
        self._copiers: dict[str, _cuda.DeviceCopier] = {}
        self._progress: _progress.Progress | None = None

    def keys(self) -> list[str]:
        """Tensor names, in the order they were saved."""
        if self._tensor_names is None:
            self._tensor_names = self._store._native.tensor_names(self.id)
        return list(self._tensor_names)

    def _storage(self, name: str) -> np.ndarray:
        mb = self._store._native.tensor(self.id, name, verify=self.verify)
        if self._progress is not None:
            self._progress.add(len(mb))
        return _tensors.storage_array(mb)

    def get_tensor(self, name: str, *, framework: str | None = None,
                   device: Any = "cpu") -> Any:
        """One tensor, verified unless the checkpoint was opened with ``verify=False``. numpy:
        a read-only array over the store's memory map where possible; torch: one copy, read
        straight into the new tensor."""
        fw = framework or self.framework or "torch"
        _check_framework(fw)
        if fw == "torch" and not self.mmap and not _cuda.is_cuda(device):
            t = _tensors.read_torch(self._store._native, self.id, name, self.verify, device)
            if self._progress is not None:
                self._progress.add(t.numel() * t.element_size())
            return t
        mb = self._store._native.tensor(self.id, name, verify=self.verify, mapped=self.mmap)
        if self._progress is not None:
            self._progress.add(len(mb))
        if self.mmap:
            return self._mapped(name, mb, fw)
        storage = _tensors.storage_array(mb)
        if fw == "numpy":
            return _tensors.to_numpy(storage, mb.dtype)
        if _cuda.is_cuda(device):
            return self._copier(device).tensor(storage, _tensors.torch_dtype(mb.dtype),
                                               mb.shape)
        return _tensors.to_torch(storage, mb.dtype, device)

    def _torch_batch(self, fw: str, device: Any) -> _tensors.TorchBatch | None:
        """The batch that reads this load's torch CPU tensors in one engine call, or None
        where tensors are read one by one (numpy, mmap, another device)."""
        if fw != "torch" or self.mmap or str(device) != "cpu":
            return None
        prog = self._progress
        return _tensors.TorchBatch(self._store._native, self.id, self.verify,
                                   None if prog is None else _PROGRESS_STEP_BYTES,
                                   None if prog is None else prog.add)

    def _copier(self, device: Any) -> _cuda.DeviceCopier:
        """The pinned-buffer ring of this checkpoint's loads onto ``device``."""
        c = self._copiers.get(str(device))
        if c is None:
            c = self._copiers[str(device)] = _cuda.DeviceCopier(device)
        return c

    def _mapped(self, name: str, mb: Any, fw: str) -> Any:
        """``load(mmap=True)``: a writable tensor (or array) over a private copy-on-write map of
        the segment, or, where the engine holds the tensor otherwise (compressed, deduplicated
        or split chunks), over one copy."""
        u8 = _tensors.private_map(mb)
        if u8 is None:
            _log.debug("checkpoint %d tensor %r: not one mapped run, copied", self.id, name)
            u8 = np.array(_tensors.storage_array(mb)).reshape(-1).view(np.uint8)
        if fw == "numpy":
            return u8.view(_tensors.numpy_dtype(mb.dtype)).reshape(tuple(mb.shape))
        return _tensors.torch_over(u8, mb.dtype, mb.shape)

    def get_slice(self, name: str, *, framework: str | None = None) -> _Slice:
        return _Slice(self, name, framework)

    def blob_names(self) -> list[str]:
        return self._store._native.blob_names(self.id)

    def get_blob(self, name: str) -> bytes:
        return self._store._native.blob(self.id, name)

    def state(self, *, framework: str | None = None, device: Any = "cpu") -> Any:
        """The whole saved state, rebuilt (see _tree). Tensors come back as ``framework``
        (default: as they were saved, torch tensors as torch, numpy arrays as numpy; a
        ``device`` other than cpu means torch). A checkpoint written without the tree (by the
        CLI or the Rust API) comes back as a flat dict of its tensors (torch by default) and
        blobs."""
        if framework is None and str(device) != "cpu":
            framework = "torch"
        blobs = self.blob_names()
        # torch CPU tensors: allocated as the tree is rebuilt, read together at the end
        batch = self._torch_batch("torch", device)
        if _tree.TREE_BLOB not in blobs:
            fw = framework or "torch"
            out: dict[str, Any] = {n: self._tensor(n, fw, device, batch) for n in self.keys()}
            if batch is not None:
                batch.fill()
            out.update((b, self.get_blob(b)) for b in blobs)
            return out

        def tensor(node: dict[str, Any]) -> Any:
            fw = framework or node.get("fw", "torch")
            _check_framework(fw)
            if "as" in node:
                return _tensors.from_raw(self._storage(node["tensor"]), node["as"],
                                         node["shape"], fw, device)
            return self._tensor(node["tensor"], fw, device, batch)

        state = _tree.decode(self.get_blob(_tree.TREE_BLOB), tensor, self.get_blob)
        if batch is not None:
            batch.fill()
        return state

    def _tensor(self, name: str, fw: str, device: Any, batch: _tensors.TorchBatch | None) -> Any:
        """``get_tensor``, or for a torch CPU tensor with ``batch``, its new tensor to be
        filled by ``batch.fill()``."""
        if batch is not None and fw == "torch":
            return batch.add(name)
        return self.get_tensor(name, framework=fw, device=device)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __repr__(self) -> str:
        return f"Checkpoint(id={self.id}, step={self.step}, epoch={self.epoch})"


# With a progress report, a batched torch load reads this many bytes per engine call, so the
# report moves; without one it reads everything in one call.
_PROGRESS_STEP_BYTES = 256 << 20


def _check_framework(fw: str) -> None:
    if fw not in ("torch", "numpy"):
        raise ValueError(f"framework must be \"torch\" or \"numpy\", not {fw!r}")


def _as_store(store: Store | PathLike, *, read_only: bool = False) -> Store:
    """``store`` itself, or the store at a path opened for this one call (read-only for
    loads, so loading never contends with a writer for the lock)."""
    if isinstance(store, Store):
        return store
    if isinstance(store, (str, os.PathLike)):
        return Store(store, read_only=read_only)
    raise TypeError(f"store must be a ckptstore.Store or a path, not {type(store).__name__}")


def _prepare(state: Mapping[str, Any], metadata: Mapping[str, Any] | None) -> _tree.Encoded:
    enc = _tree.encode(state)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}")
    return enc


def save(store: Store | PathLike, state: Mapping[str, Any], step: int,
         epoch: int | None = None, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Commits ``state`` as one checkpoint; durable when it returns (the commit record is
    fdatasync'ed in the WAL). Returns the commit summary (id, bytes written/deduplicated,
    stall_seconds, ...). Any error leaves nothing behind: the previous checkpoint stays the
    newest. The tensors must not change until it returns."""
    s = _as_store(store)
    enc = _prepare(state, metadata)
    try:
        return s._native.save(step, enc.tensors, enc.blobs, epoch=epoch,
                              metadata=dict(metadata) if metadata else None)
    finally:
        if s is not store:
            s.close()


class SaveHandle:
    """Returned by ``save_async`` once the snapshot is taken: the caller may change its tensors.
    ``wait()`` blocks until the checkpoint is durable (re-raises the save's error),
    ``done()`` never blocks, ``stall_seconds`` is how long ``save_async`` held the caller."""

    def __init__(self, native: Any):
        self._native = native

    def wait(self) -> dict[str, Any]:
        return self._native.wait()

    def done(self) -> bool:
        return self._native.done()

    @property
    def stall_seconds(self) -> float:
        return self._native.stall_seconds


def save_async(store: Store, state: Mapping[str, Any], step: int, epoch: int | None = None,
               metadata: Mapping[str, Any] | None = None) -> SaveHandle:
    """Stages ``state`` into the engine's write pipeline and returns once its bytes are copied
    out of the caller's tensors (the stall; GIL released): the caller may then change them.
    Hashing, writes, fdatasync and the commit record run on the engine's threads; saves commit
    in the order they were handed in, several in flight within the store's
    ``async_budget_bytes``. ``handle.wait()`` returns when the checkpoint is durable."""
    if not isinstance(store, Store):
        raise TypeError("save_async needs an open ckptstore.Store (its write pipeline "
                        "lives as long as the store)")
    enc = _prepare(state, metadata)
    return SaveHandle(store._native.save_async(
        step, enc.tensors, enc.blobs, epoch=epoch,
        metadata=dict(metadata) if metadata else None))


def _as_list(p: str | Iterable[str] | None) -> list[str]:
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


def load(store: Store | PathLike, step: int | None = None, *, id: int | None = None,
         prefix: str | Iterable[str] | None = None,
         filter: str | Iterable[str] | Callable[[str], bool] | None = None,
         strict: bool = True, framework: str | None = None, device: Any = "cpu",
         verify: bool = True, mmap: bool = False,
         progress: _progress.ProgressArg = None) -> Any:
    """Loads a checkpoint: ``step``/``id``, or by default the newest one that verifies
    (walking back past damaged ones, with a warning).

    ``framework``: ``"torch"`` (one copy into new tensors, on ``device``), ``"numpy"``
    (read-only arrays over the store's memory map where possible), or None (default): each
    tensor as it was saved — torch tensors as torch, numpy arrays as numpy (torch for the flat
    results of ``prefix``/``filter`` and for checkpoints written without Python).

    Without ``prefix``/``filter`` the whole saved state comes back, rebuilt. With them, a flat
    dict ``{tensor name: tensor}`` of the selected tensors: ``prefix`` keeps names starting with
    any of the given prefixes (MindSpore's ``specify_prefix``), ``filter`` drops names starting
    with any of them (``filter_prefix``) or, if callable, keeps names for which it returns True.
    With ``strict``, a prefix that matches nothing is a NotFoundError.

    ``mmap=True`` (``torch.load(mmap=True)``'s convention): CPU tensors (or arrays) backed by
    the store's segment files through private copy-on-write maps (MAP_PRIVATE): no copy is
    made and pages are read as they are touched; writing into a tensor changes this process's
    copy of that page only, never the store. Verified as usual first (``verify=False`` leaves
    the pages untouched until used). A tensor the engine does not hold as one mapped run
    (compressed, deduplicated or spread over segments) is copied once instead.

    ``device="cuda:N"``: tensors are copied to the device through a few pinned host buffers
    with asynchronous copies on torch's current stream (never the whole state in host memory).

    ``progress``: a callable ``(done_bytes, total_bytes)`` called as tensors are read, or True
    for a tqdm bar (when tqdm is installed; else a log line of logger "ckptstore" at INFO
    every tenth).
    """
    if framework is not None:
        _check_framework(framework)
    if mmap and str(device) != "cpu":
        raise ValueError(f"mmap=True maps tensors into host memory; device={device!r} needs "
                         f"mmap=False")
    if framework == "numpy" and str(device) != "cpu":
        raise ValueError(f"framework=\"numpy\" loads to host memory; device={device!r} needs "
                         f"framework=\"torch\"")
    s = _as_store(store, read_only=True)
    try:
        if step is not None or id is not None or not verify:
            ck = Checkpoint(s, s._native.info(id=id, step=step), framework, verify)
            ck.mmap = mmap
            return _load_from(ck, prefix, filter, strict, device, progress)
        first: Exception | None = None
        try:
            for info in reversed(s.list()):
                ck = Checkpoint(s, info, framework, verify)
                ck.mmap = mmap
                try:
                    out = _load_from(ck, prefix, filter, strict, device, progress)
                except CorruptionError as e:
                    warnings.warn(f"checkpoint {info['id']} (step {info['step']}) is damaged, "
                                  f"trying the one before: {e}", stacklevel=2)
                    first = first or e
                    continue
                return out
            if first is not None:
                raise first
        finally:
            # `first`'s traceback holds this frame, and this frame holds `first`: a reference
            # cycle that kept the store (and its writer lock) alive after the caller's last
            # reference was gone, until the garbage collector ran.
            first = None
        raise NotFoundError(f"no checkpoint in {s.path} (the store is empty)")
    finally:
        if s is not store:
            s.close()


def _load_from(ck: Checkpoint, prefix: Any, filt: Any, strict: bool, device: Any,
               progress: _progress.ProgressArg = None) -> Any:
    if progress is not None and progress is not False:
        ck._progress = _progress.Progress(f"loading checkpoint {ck.id} (step {ck.step})",
                                          ck.info["bytes"], progress)
    done = False
    try:
        out = _select(ck, prefix, filt, strict, device)
        done = True
        return out
    finally:
        if ck._progress is not None:
            ck._progress.close(complete=done)
            ck._progress = None


def _select(ck: Checkpoint, prefix: Any, filt: Any, strict: bool, device: Any) -> Any:
    if prefix is None and filt is None:
        return ck.state(framework=ck.framework, device=device)
    names = ck.keys()
    keep = _as_list(prefix)
    drop = [] if callable(filt) else _as_list(filt)
    if any(p == "" for p in keep + drop):
        raise ValueError("an empty prefix matches every name; leave it out instead")
    if strict:
        unmatched = [p for p in keep if not any(n.startswith(p) for n in names)]
        if unmatched:
            raise NotFoundError(f"checkpoint {ck.id}: no tensor name starts with {unmatched}")
    picked = [n for n in names
              if (not keep or any(n.startswith(p) for p in keep))
              and not any(n.startswith(p) for p in drop)
              and (not callable(filt) or filt(n))]
    batch = ck._torch_batch(ck.framework or "torch", device)
    out = {n: ck._tensor(n, ck.framework or "torch", device, batch) for n in picked}
    if batch is not None:
        batch.fill()
    return out


def load_into(module: Any, store: Store | PathLike, step: int | None = None, *,
              id: int | None = None, prefix: str = "", strict: bool = True,
              verify: bool = True, progress: _progress.ProgressArg = None) -> LoadResult:
    """Loads a checkpoint's tensors into ``module`` (a ``torch.nn.Module``, or anything with
    ``state_dict()``), MindSpore's ``load_param_into_net``: checkpoint tensor ``prefix + key``
    goes into ``module.state_dict()[key]``, copied straight into its memory.

    Checks first, loading nothing on failure: with ``strict`` any missing key or unexpected
    checkpoint tensor (under ``prefix``) is a StrictLoadError listing both; a dtype or shape
    mismatch is a ValueError naming the tensor (strict or not). Returns the lists.

    Tensors of a module on a GPU are filled through pinned buffers with asynchronous copies;
    ``progress`` as for ``load``.
    """
    s = _as_store(store, read_only=True)
    try:
        ck = s.open(step, id=id, verify=verify) if (step is not None or id is not None) else \
            _newest(s, verify)
        target = module.state_dict()
        have = [n for n in ck.keys() if n.startswith(prefix)]
        have_set = set(have)
        missing = [k for k in target if prefix + k not in have_set]
        expected = {prefix + k for k in target}
        unexpected = [n for n in have if n not in expected]
        if strict and (missing or unexpected):
            raise StrictLoadError(
                f"checkpoint {ck.id}: strict load failed: {len(missing)} missing {missing}, "
                f"{len(unexpected)} unexpected {unexpected}; pass strict=False to load the rest",
                missing, unexpected)
        for k, dst in target.items():
            if prefix + k not in have_set:
                continue
            dt, shape = s._native.tensor_meta(ck.id, prefix + k)
            want = _tensors.torch_engine_dtype(dst)
            if dt != want or tuple(shape) != tuple(dst.shape):
                raise ValueError(f"checkpoint {ck.id} tensor {prefix + k!r}: module expects "
                                 f"{want} {list(dst.shape)}, checkpoint has {dt} {shape}")
        # Every tensor read (and verified) before the first byte goes into the module: a
        # damaged chunk leaves the module as it was.
        if progress is not None and progress is not False:
            ck._progress = _progress.Progress(f"loading checkpoint {ck.id} into the module",
                                              ck.info["bytes"], progress)
        sources = {k: ck._storage(prefix + k) for k in target if prefix + k in have_set}
        for k, src in sources.items():
            if _cuda.is_cuda(target[k].device):
                ck._copier(target[k].device).into(target[k], src)
            else:
                _tensors.copy_into_torch(target[k], src)
        if ck._progress is not None:
            ck._progress.close()
        return LoadResult(missing, unexpected)
    finally:
        if s is not store:
            s.close()


def _newest(s: Store, verify: bool) -> Checkpoint:
    info = s._native.latest_valid() if verify else s.latest()
    if info is None:
        raise NotFoundError(f"no {'valid ' if verify else ''}checkpoint in {s.path}")
    # latest_valid has just hashed every chunk of it (segments are immutable): reading it
    # again unverified avoids hashing everything twice.
    return Checkpoint(s, info, "torch", verify=False)
