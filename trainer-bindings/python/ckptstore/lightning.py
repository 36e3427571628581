"""Lightning ``CheckpointIO`` over a ckptstore store.

    import lightning as L
    from ckptstore.lightning import StoreCheckpointIO
    trainer = L.Trainer(plugins=[StoreCheckpointIO("ckpts")],
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath="runs/a", save_top_k=2)])
    trainer.fit(model, ckpt_path="runs/a/epoch=1-step=40.ckpt")   # resumes from the store

Paths: Lightning names checkpoints by file path (``dirpath/epoch=1-step=40.ckpt``). Here a path
is a *name*: each save commits one checkpoint of the store at Lightning's ``global_step`` and
``epoch``, tagged with the metadata ``lightning.path`` = the path made absolute (so two
``ModelCheckpoint`` callbacks with different ``dirpath`` never collide). Once that checkpoint
is durable a small pointer file (JSON, a few hundred bytes; ``POINTER_FORMAT``) is written at
the path itself, because Lightning looks at its filesystem: ``ModelCheckpoint`` adds its
``-v1`` suffix only for a name that exists (so a second run into the same ``dirpath`` never
replaces the first run's checkpoints), and ``fit(ckpt_path="last")`` finds ``last*.ckpt`` by
listing ``dirpath``. Saving a path again (``last.ckpt``) replaces it: the older checkpoints of
that path are deleted once the new one is durable. ``load_checkpoint(path)`` loads the newest
checkpoint of that path (a regular Lightning checkpoint file at a path the store does not
know, from before the directory was used with this IO, is loaded as Lightning would);
``remove_checkpoint(path)`` removes the pointer file, then every checkpoint of that path.

Threads: one IO may be called from several threads (Lightning's ``AsyncCheckpointIO`` saves
on a worker thread and removes on the main one): calls take turns, and every ``Store`` of the
same directory in a process shares one open store, so they never contend for its lock. Note
that ``AsyncCheckpointIO.teardown`` does not call the wrapped IO's ``teardown``: the store
stays open after ``fit`` until this IO's ``teardown()`` is called or the IO is freed (every
save is durable when ``fit`` returns either way). And as with Lightning's own files under
``AsyncCheckpointIO``, a ``remove_checkpoint`` on the main thread can overtake the save of the
same path still queued on its worker, which then lands after the removal and stays;
``async_save=True`` here has no such race (removals wait for every queued save).

``async_save=True`` saves through ``ckptstore.save_async``: ``save_checkpoint`` returns once the
tensors are copied into the engine's staging buffers, hashing/writes/fsync run in the
background. Unlike Lightning's ``AsyncCheckpointIO`` (whose ``remove_checkpoint`` may run while
the save that supersedes the removed file is still queued), every removal here first waits for
every queued save to be durable: a crash can never leave neither the old checkpoint nor the new
one. ``teardown`` waits for queued saves and closes the store.

The checkpoint dict is stored with ckptstore's pickle-free encoding (tensors by name, plain
values as JSON, see ``ckptstore._tree``); a value it cannot represent (an arbitrary object in
``hyper_parameters``, say) is a TypeError naming its key, raised before anything is written.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from ._native import NotFoundError
from ._store import SaveHandle, Store, load, save, save_async

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore
    except ImportError as e:
        raise ImportError("ckptstore.lightning needs Lightning, which is not installed: "
                          "pip install 'ckptstore[lightning]' (or pip install lightning)") from e

__all__ = ["StoreCheckpointIO"]

PATH_KEY = "lightning.path"
# The pointer file written at a Lightning path: {"format": POINTER_FORMAT, "store": the store's
# absolute path, "path": the key, "id": checkpoint id, "step": global step}.
POINTER_FORMAT = "ckptstore-lightning-pointer-v1"


def _read_pointer(path: str) -> dict[str, Any] | None:
    """The pointer at ``path``, or None when the file is missing or is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        d = json.loads(head)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == POINTER_FORMAT else None


class StoreCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that saves into the store at ``path`` (options as for
    ``ckptstore.Store``). See the module docstring for how paths map to checkpoints."""

    def __init__(self, path: str | os.PathLike, *, async_save: bool = False,
                 **store_options: Any) -> None:
        self.path = os.fspath(path)
        self.async_save = async_save
        self._options = store_options
        self._store: Store | None = None
        self._pending: list[tuple[SaveHandle, str]] = []
        # Lightning's AsyncCheckpointIO saves on a worker thread while the main thread removes:
        # the lazy open, the queue and the pointer files take turns.
        self._lock = threading.RLock()

    @property
    def store(self) -> Store:
        """The store, opened (as its writer) on first use."""
        with self._lock:
            if self._store is None or self._store.closed:
                self._store = Store(self.path, **self._options)
            return self._store

    @staticmethod
    def key(path: Any) -> str:
        """The name a Lightning path is stored under."""
        return os.path.abspath(os.fspath(path))

    def _ids_of(self, key: str) -> list[int]:
        return [c["id"] for c in self.store.list() if c["metadata"].get(PATH_KEY) == key]

    def _committed(self, key: str, info: dict[str, Any]) -> None:
        """A save of ``key`` is durable: the pointer file goes to the Lightning path, then the
        older checkpoints of that path are deleted."""
        self._write_pointer(key, info)
        for i in self._ids_of(key):
            if i < info["id"]:
                self.store.delete(i)

    def _write_pointer(self, key: str, info: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(key), exist_ok=True)
        body = json.dumps({"format": POINTER_FORMAT, "store": os.path.abspath(self.path),
                           "path": key, "id": info["id"], "step": info.get("step")})
        tmp = f"{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body + "\n")
        os.replace(tmp, key)

    def _settle(self, block: bool = True) -> None:
        """Finishes queued saves in order (all, or with ``block=False`` those already done)
        and deletes what each replaced; re-raises the first failed save's error."""
        while self._pending and (block or self._pending[0][0].done()):
            handle, key = self._pending.pop(0)
            info = handle.wait()
            self._committed(key, info)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"StoreCheckpointIO.save_checkpoint takes no storage_options "
                            f"(got {storage_options!r})")
        key = self.key(path)
        step = int(checkpoint.get("global_step", 0))
        epoch = int(checkpoint.get("epoch", 0))
        meta = {PATH_KEY: key}
        with self._lock:
            self._settle(block=False)
            if self.async_save:
                self._pending.append((save_async(self.store, checkpoint, step, epoch=epoch,
                                                 metadata=meta), key))
                return
            info = save(self.store, checkpoint, step, epoch=epoch, metadata=meta)
            self._committed(key, info)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        with self._lock:
            self._settle()
            key = self.key(path)
            device = map_location if isinstance(map_location, str) or (
                map_location is not None and type(map_location).__name__ == "device") else "cpu"
            # Loading takes no lock: a store this IO has not opened for saving is read
            # read-only.
            own = self._store is None or self._store.closed
            s = None
            try:
                s = Store(self.path, read_only=True) if own else self.store
            except NotFoundError:  # no store yet: only a Lightning file can be at the path
                pass
            if s is not None:
                try:
                    ids = [c["id"] for c in s.list() if c["metadata"].get(PATH_KEY) == key]
                    if ids:
                        return load(s, id=ids[-1], device=device)
                finally:
                    if own:
                        s.close()
        if os.path.isfile(key) and _read_pointer(key) is None:
            # a regular Lightning checkpoint, written before this directory was ours
            from lightning.fabric.utilities.cloud_io import _load as pl_load

            return pl_load(key, map_location=map_location)
        raise FileNotFoundError(f"no checkpoint saved as {key} in the store {self.path}")

    def remove_checkpoint(self, path: Any) -> None:
        key = self.key(path)
        with self._lock:
            self._settle()  # removal only after every queued save is durable
            # the pointer first: a crash in between leaves a checkpoint no path names (freed
            # by the next save of that path), never a path that names nothing
            if _read_pointer(key) is not None:
                os.remove(key)
            for i in self._ids_of(key):
                self.store.delete(i)

    def teardown(self) -> None:
        with self._lock:
            try:
                self._settle()
            finally:
                if self._store is not None:
                    self._store.close()
                    self._store = None

    def __getstate__(self) -> dict[str, Any]:
        if self._pending:
            raise RuntimeError("StoreCheckpointIO with saves in flight cannot be pickled")
        d = self.__dict__.copy()
        d["_store"] = None
        del d["_lock"]
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._lock = threading.RLock()
