"""Lightning ``CheckpointIO`` over a ckptstore store.

    import lightning as L
    from ckptstore.lightning import StoreCheckpointIO
    trainer = L.Trainer(plugins=[StoreCheckpointIO("ckpts")],
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath="runs/a", save_top_k=2)])
    trainer.fit(model, ckpt_path="runs/a/epoch=1-step=40.ckpt")   # resumes from the store

Paths: Lightning names checkpoints by file path (``dirpath/epoch=1-step=40.ckpt``). Here a path
is a *name*: each save commits one checkpoint of the store at Lightning's ``global_step`` and
``epoch``, tagged with the metadata ``lightning.path`` = the path made absolute (so two
``ModelCheckpoint`` callbacks with different ``dirpath`` never collide). Nothing is written at
the path itself. Saving a path again (``last.ckpt``) replaces it: the older checkpoints of
that path are deleted once the new one is durable. ``load_checkpoint(path)`` loads the newest
checkpoint of that path; ``remove_checkpoint(path)`` deletes every checkpoint of that path.

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

import os
from typing import Any

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

    @property
    def store(self) -> Store:
        """The store, opened (as its writer) on first use."""
        if self._store is None or self._store.closed:
            self._store = Store(self.path, **self._options)
        return self._store

    @staticmethod
    def key(path: Any) -> str:
        """The name a Lightning path is stored under."""
        return os.path.abspath(os.fspath(path))

    def _ids_of(self, key: str) -> list[int]:
        return [c["id"] for c in self.store.list() if c["metadata"].get(PATH_KEY) == key]

    def _replace_older(self, key: str, new_id: int) -> None:
        for i in self._ids_of(key):
            if i < new_id:
                self.store.delete(i)

    def _settle(self, block: bool = True) -> None:
        """Finishes queued saves in order (all, or with ``block=False`` those already done)
        and deletes what each replaced; re-raises the first failed save's error."""
        while self._pending and (block or self._pending[0][0].done()):
            handle, key = self._pending.pop(0)
            info = handle.wait()
            self._replace_older(key, info["id"])

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"StoreCheckpointIO.save_checkpoint takes no storage_options "
                            f"(got {storage_options!r})")
        key = self.key(path)
        step = int(checkpoint.get("global_step", 0))
        epoch = int(checkpoint.get("epoch", 0))
        meta = {PATH_KEY: key}
        self._settle(block=False)
        if self.async_save:
            self._pending.append((save_async(self.store, checkpoint, step, epoch=epoch,
                                             metadata=meta), key))
            return
        info = save(self.store, checkpoint, step, epoch=epoch, metadata=meta)
        self._replace_older(key, info["id"])

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        self._settle()
        key = self.key(path)
        device = map_location if isinstance(map_location, str) or (
            map_location is not None and type(map_location).__name__ == "device") else "cpu"
        # Loading takes no lock: a store this IO has not opened for saving is read read-only.
        own = self._store is None or self._store.closed
        s = Store(self.path, read_only=True) if own else self.store
        try:
            ids = [c["id"] for c in s.list() if c["metadata"].get(PATH_KEY) == key]
            if not ids:
                raise FileNotFoundError(f"no checkpoint saved as {key} in the store {self.path}")
            return load(s, id=ids[-1], device=device)
        finally:
            if own:
                s.close()

    def remove_checkpoint(self, path: Any) -> None:
        self._settle()  # removal only after every queued save is durable
        for i in self._ids_of(self.key(path)):
            self.store.delete(i)

    def teardown(self) -> None:
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
        return d
