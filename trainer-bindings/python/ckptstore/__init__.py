"""ckptstore: a crash-consistent checkpoint store for ML training.

    import ckptstore as cs
    store = cs.Store("ckpts")                                   # opens and recovers
    cs.save(store, {"model": model.state_dict(), "step": 10}, step=10)   # durable on return
    state = cs.load(store)                                      # newest valid checkpoint

``import ckptstore`` needs only numpy; torch is imported where a torch tensor is made or read
(``pip install 'ckptstore[torch]'``). The storage engine is Rust (``ckptstore._native``); this
package converts values and calls it.
"""

from ._native import (
    CorruptionError,
    EncryptionKeyError,
    LockedError,
    NotFoundError,
    PinnedError,
    PoisonedError,
    ReadOnlyError,
    StoreError,
    __version__,
)
from ._store import (
    Checkpoint,
    LoadResult,
    SaveHandle,
    Store,
    StrictLoadError,
    load,
    load_into,
    save,
    save_async,
)
from ._callback import CheckpointConfig, ModelCheckpoint

__all__ = [
    "Checkpoint",
    "CheckpointConfig",
    "CorruptionError",
    "EncryptionKeyError",
    "LoadResult",
    "LockedError",
    "ModelCheckpoint",
    "NotFoundError",
    "PinnedError",
    "PoisonedError",
    "ReadOnlyError",
    "SaveHandle",
    "Store",
    "StoreError",
    "StrictLoadError",
    "__version__",
    "load",
    "load_into",
    "save",
    "save_async",
]


def __getattr__(name: str):
    # ckptstore.dcp / .lightning / .mindspore need torch / lightning / mindspore: imported on
    # first use, so `import ckptstore` stays light
    if name in ("dcp", "lightning", "mindspore"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ckptstore' has no attribute {name!r}")
