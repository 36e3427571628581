"""MindSpore on ckptstore: the ``CheckpointConfig`` + ``ModelCheckpoint`` + ``load_checkpoint`` +
``load_param_into_net`` code of a MindSpore training script runs on a crash-consistent store with
one import changed::

    from ckptstore.mindspore import (CheckpointConfig, ModelCheckpoint, load_checkpoint,
                                     load_param_into_net)

The ``directory`` of ``ModelCheckpoint`` is a store; a checkpoint is named as MindSpore names its
file, ``{prefix}-{epoch}_{step}`` (``..._breakpoint`` for an exception save), and
``load_checkpoint("DIR/{prefix}-{epoch}_{step}.ckpt")`` finds it in the store DIR, so paths
written for MindSpore's files keep working. Every save is durable when it is reported (the store's
commit protocol), every byte is checksummed, and a crash never leaves a torn checkpoint.

Differences from MindSpore, on purpose (docs/DECISIONS.md):

- Retention (``keep_checkpoint_max`` / ``keep_checkpoint_per_n_minutes``) runs *after* the new
  checkpoint is committed; MindSpore deletes the oldest file first, so a crash in between leaves
  one checkpoint fewer than asked for.
- A checkpoint's name is not made unique with MindSpore's ``prefix_1`` renaming: the store never
  overwrites, and a name that was saved twice (a resumed run) resolves to the newest.
- ``keep_checkpoint_per_n_minutes=M`` keeps the newest checkpoint of each M-minute window of
  wall-clock time (and the newest overall), as the engine's retention policy does.
- The step (the checkpoint's step and the ``step_num`` of ``append_info``) counts on across
  ``model.train(..., initial_epoch=E)`` resumes; MindSpore's ``step_num`` starts over at 0.
- ``crc_check`` changes nothing: every chunk is BLAKE3-checked on every load anyway.
- ``enc_key``/``dec_key`` with ``enc_mode``/``dec_mode="AES-GCM"`` (MindSpore's default) become
  the store's ``encryption_key``: every chunk sealed with AES-256-GCM, which takes a 32-byte key
  (MindSpore also allows 16/24 bytes: refused here with a ValueError). ``"AES-CBC"`` and
  ``"SM4-CBC"`` are refused by name (NotImplementedError): CBC authenticates nothing, so a
  changed file decrypts to other weights silently, and SM4 is not implemented by the crates this
  store relies on.
- ``uint16``/``uint32``/``uint64``/``qint4x2`` parameters are kept as their bytes (the engine
  has no such dtypes) with their MindSpore dtype and shape in the checkpoint's metadata
  (``ckptstore.ms_dtypes``): ``load_checkpoint`` gives them back exactly, while other readers
  (``ckptstore export``, ``ckptstore.load``) see uint8 byte tensors.
- A missing checkpoint raises ``CheckpointNotFoundError``, both a ``ValueError`` (as MindSpore)
  and a ``ckptstore.NotFoundError``.
- ``DIR/NAME.ckpt`` in a store DIR is the store's checkpoint NAME if it has one, else the
  MindSpore file at that path (one written before DIR became a store).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

try:
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn
    from mindspore.train import Callback
    from mindspore.train import CheckpointConfig as _MsCheckpointConfig
except ImportError as e:  # pragma: no cover - exercised only without MindSpore
    raise ImportError("ckptstore.mindspore needs MindSpore, which is not installed: "
                      "pip install mindspore") from e

from . import _tensors
from ._native import CorruptionError, NotFoundError
from ._store import Store


class CheckpointNotFoundError(NotFoundError, ValueError):
    """No such checkpoint: a ``ValueError`` as MindSpore raises it, and a
    ``ckptstore.NotFoundError``."""

__all__ = [
    "CheckpointConfig",
    "CheckpointNotFoundError",
    "ModelCheckpoint",
    "is_store",
    "load_checkpoint",
    "load_param_into_net",
    "save_checkpoint",
]

# MindSpore dtype name <-> engine dtype name (the same table as engine/src/interop/mindspore.rs)
_MS_TO_ENGINE = {
    "Float64": "f64", "Float32": "f32", "Float16": "f16", "BFloat16": "bf16",
    "Int64": "i64", "Int32": "i32", "Int16": "i16", "Int8": "i8", "UInt8": "u8", "Bool": "bool",
}
_ENGINE_TO_MS = {v: k for k, v in _MS_TO_ENGINE.items()}
# MindSpore dtypes the engine lacks, kept as their bytes (a u8 tensor) with the MindSpore dtype
# and shape in the metadata key MS_DTYPES_KEY (a JSON object, name -> [dtype, shape]): lossless,
# and load_checkpoint rebuilds the same dtype. (qint4x2 packs two 4-bit values a byte: its
# bytes are what MindSpore itself writes.)
_MS_AS_BYTES = {"UInt16": np.uint16, "UInt32": np.uint32, "UInt64": np.uint64, "Int4": np.int8}
MS_DTYPES_KEY = "ckptstore.ms_dtypes"

# Metadata: which values append_info put into a checkpoint, and how to rebuild them on load
# (a JSON object, key -> "epoch_num" | "step_num" | "int" | "float" | "bool" | "str" | "tensor").
APPEND_KEY = "ckptstore.append_info"
_RESERVED_META = ("name", "prefix", "breakpoint", APPEND_KEY, MS_DTYPES_KEY)
_EXTENSIONS = (".ckpt", ".safetensors")


def is_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ckptstore store directory."""
    return os.path.isfile(os.path.join(os.fspath(path), "CURRENT"))


# -- configuration -----------------------------------------------------------------------------

class CheckpointConfig(_MsCheckpointConfig):
    """MindSpore 2.10's ``CheckpointConfig``, same parameters, validation and precedence (it *is*
    one: this class subclasses MindSpore's): ``save_checkpoint_steps`` (default 1) wins over
    ``save_checkpoint_seconds``; ``keep_checkpoint_max`` (default 5) wins over
    ``keep_checkpoint_per_n_minutes``; ``append_info`` is a list of ``"epoch_num"``,
    ``"step_num"`` and at most one dict of int/float/bool/str/Tensor/Parameter values.

    On the store: ``async_save`` (True, "thread" or "process") saves through the engine's write
    pipeline (the step stalls only for the copy); ``crc_check`` is always on in effect (BLAKE3 of
    every chunk); ``format`` ("ckpt"/"safetensors") is the extension the checkpoint's path may
    carry; ``integrated_save`` only matters in auto-parallel mode, which this module refuses;
    ``enc_key`` with ``enc_mode="AES-GCM"`` seals the store's checkpoints with that 32-byte key
    (see the module documentation); ``remove_redundancy`` raises NotImplementedError.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _check_config(self)


def _store_key(key: Any, mode: Any, what: str) -> bytes | None:
    """MindSpore's ``enc_key``/``dec_key`` and ``enc_mode``/``dec_mode`` as the store's
    ``encryption_key`` (None: a plain store). Messages never show the key."""
    if key is None:
        return None
    if mode in ("AES-CBC", "SM4-CBC"):
        raise NotImplementedError(
            f"{what}: mode {mode!r} is refused by ckptstore: CBC authenticates nothing (a changed "
            f"file decrypts to other weights without an error) and SM4 is not implemented; use "
            f"\"AES-GCM\" (the default)")
    if mode != "AES-GCM":
        raise ValueError(f"{what}: unknown mode {mode!r}; ckptstore supports \"AES-GCM\"")
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        n = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"{what}: ckptstore seals with AES-256-GCM and takes a 32-byte key "
                         f"(got {n}); MindSpore's 16- and 24-byte AES keys are not accepted")
    return bytes(key)


def _check_config(c: _MsCheckpointConfig) -> None:
    _store_key(c.enc_key, c.enc_mode, "CheckpointConfig(enc_key=...)")
    if getattr(c, "remove_redundancy", False):
        raise NotImplementedError(
            "CheckpointConfig(remove_redundancy=True): redundancy-free parallel saving is not "
            "implemented in ckptstore")
    if c.format not in ("ckpt", "safetensors"):
        raise ValueError(f"CheckpointConfig(format={c.format!r}): use \"ckpt\" or \"safetensors\"")
    for k, v in (c.append_dict or {}).items():
        if k in _RESERVED_META:
            raise ValueError(f"append_info key {k!r} is reserved by ckptstore "
                             f"({', '.join(_RESERVED_META)}); rename it")
        if not isinstance(v, (int, float, bool, str, Tensor)) and k not in ("epoch_num",
                                                                             "step_num"):
            raise NotImplementedError(f"append_info {k!r}: {type(v).__name__} values are not "
                                      f"supported by ckptstore (int, float, bool, str, Tensor)")


def _check_stand_alone(what: str) -> None:
    mode = ms.get_auto_parallel_context("parallel_mode")
    if mode not in ("stand_alone", "data_parallel"):
        raise NotImplementedError(
            f"{what}: parallel_mode {mode!r} (sliced parameters, integrated_save) is not "
            f"implemented in ckptstore.mindspore; stand_alone and data_parallel are")


# -- turning MindSpore values into the engine's tensors ---------------------------------------

def _tensor_arg(name: str, value: Any, as_bytes: dict[str, Any] | None = None
                ) -> tuple[str, str, list[int], Any]:
    """``(name, engine dtype, shape, uint8 bytes)`` of a MindSpore Tensor/Parameter (a view of
    its memory where MindSpore gives one: the save copies or writes it before returning). A
    dtype the engine lacks (``_MS_AS_BYTES``) goes as its bytes, noted in ``as_bytes``."""
    dt = str(value.dtype)
    engine = _MS_TO_ENGINE.get(dt)
    if engine is None and (dt not in _MS_AS_BYTES or as_bytes is None):
        raise TypeError(f"{name}: MindSpore dtype {dt} is not storable in ckptstore "
                        f"(supported: {sorted(_MS_TO_ENGINE) + sorted(_MS_AS_BYTES)})")
    arr = value.asnumpy()
    if not arr.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
        arr = arr.copy(order="C")
    if engine is None:
        assert as_bytes is not None
        as_bytes[name] = [dt, list(value.shape)]
        return name, "u8", [arr.nbytes], arr.reshape(-1).view(np.uint8)
    return name, engine, list(arr.shape), arr.reshape(-1).view(np.uint8)


def _choose(choice_func: Callable[[str], bool] | None, name: str) -> bool:
    """``choice_func(name)``; its exception becomes a ValueError, as in MindSpore."""
    if choice_func is None:
        return True
    try:
        return bool(choice_func(name))
    except Exception as e:
        raise ValueError(f"choice_func raised on the parameter {name!r}: "
                         f"{type(e).__name__}: {e}") from e


def _named_params(save_obj: Any, choice_func: Callable[[str], bool] | None
                  ) -> list[tuple[str, Any]]:
    """The ``(name, value)`` pairs MindSpore's ``save_checkpoint`` would save from ``save_obj``
    (a Cell, a list of Parameters or of ``{"name", "data"}`` dicts, or a dict such as
    ``load_checkpoint`` returns)."""
    out: dict[str, Any] = {}
    if isinstance(save_obj, nn.Cell):
        if hasattr(save_obj, "init_parameters_data"):
            save_obj.init_parameters_data()
        for _, p in save_obj.parameters_and_names():
            if getattr(p.param_info, "is_pipeline_shared_param", False):
                continue
            out.setdefault(p.name, p)
    elif isinstance(save_obj, Mapping):
        for k, v in save_obj.items():
            out[k] = v
    elif isinstance(save_obj, list):
        for i, x in enumerate(save_obj):
            if isinstance(x, Parameter):
                out[x.name] = x
            elif isinstance(x, Mapping) and "name" in x and "data" in x:
                out[x["name"]] = x["data"]
            else:
                raise TypeError(f"save_obj[{i}]: a list holds Parameters or "
                                f"{{'name': ..., 'data': ...}} dicts, not {type(x).__name__}")
    else:
        raise TypeError(f"save_obj must be a Cell, list or dict, not {type(save_obj).__name__}")
    return [(k, v) for k, v in out.items() if _choose(choice_func, k)]


def _commit(store: Store, params: list[tuple[str, Any]], append: Mapping[str, Any] | None,
            step: int, epoch: int, name: str, prefix: str | None, *, breakpoint: bool = False,
            async_save: bool = False) -> Any:
    """Saves one checkpoint: the parameters as tensors, ``append`` as MindSpore's
    ``append_dict`` (epoch_num/step_num become the checkpoint's epoch and step; ints, floats,
    bools and strs metadata; tensors tensors), ``name`` as its name. Returns the commit summary,
    or the handle of an async save."""
    tensors = []
    strs: dict[str, str] = {}
    as_bytes: dict[str, Any] = {}
    for k, v in params:
        if isinstance(v, str):  # a str value of a load_checkpoint dict
            strs[k] = v
        elif isinstance(v, Tensor):
            tensors.append(_tensor_arg(k, v, as_bytes))
        else:
            raise TypeError(f"{k}: {type(v).__name__} is not a MindSpore Tensor or Parameter")
    md: dict[str, Any] = {"name": name}
    if prefix is not None:
        md["prefix"] = prefix
    if breakpoint:
        md["breakpoint"] = 1
    kinds: dict[str, str] = {}
    for k, v in (append or {}).items():
        if k in _RESERVED_META:
            raise ValueError(f"append_info key {k!r} is reserved by ckptstore; rename it")
        if k in ("epoch_num", "step_num"):
            kinds[k] = k
        elif isinstance(v, bool):
            kinds[k], md[k] = "bool", int(v)
        elif isinstance(v, int):
            kinds[k], md[k] = "int", v
        elif isinstance(v, float):
            kinds[k], md[k] = "float", v
        elif isinstance(v, str):
            kinds[k], md[k] = "str", v
        elif isinstance(v, Tensor):
            kinds[k] = "tensor"
            tensors.append(_tensor_arg(k, v, as_bytes))
        else:
            raise TypeError(f"append_info {k!r}: {type(v).__name__} is not int, float, bool, "
                            f"str or Tensor")
    for k, v in strs.items():
        if k in md:
            raise ValueError(f"{k!r} is reserved by ckptstore; rename it")
        md[k] = v
        kinds.setdefault(k, "str")
    md[APPEND_KEY] = json.dumps(kinds)
    if as_bytes:
        md[MS_DTYPES_KEY] = json.dumps(as_bytes)
    if step < 0 or epoch < 0:
        raise ValueError(f"step and epoch must be >= 0, not {step}, {epoch}")
    native = store._native
    if async_save:
        return native.save_async(step, tensors, [], epoch=epoch, metadata=md)
    return native.save(step, tensors, [], epoch=epoch, metadata=md)


# -- the callback -------------------------------------------------------------------------------

class ModelCheckpoint(Callback):
    """MindSpore's ``ModelCheckpoint`` callback, saving into the store at ``directory``: pass it
    to ``model.train(..., callbacks=[cb])`` (sink mode on or off). It saves the train network's
    parameters (optimizer state included) or ``config.saved_network``'s, as
    ``{prefix}-{epoch}_{step}``, when ``save_checkpoint_steps`` steps (or
    ``save_checkpoint_seconds`` seconds) passed since its last save and once more at the end of
    training; retention follows each commit. With ``exception_save``, an exception inside
    ``model.train`` leaves a committed ``{prefix}-{epoch}_{step}_breakpoint`` checkpoint of the
    parameters as they were when it was raised (the last completed step), then propagates; and
    a SIGTERM (a preempted node) lets the running step finish, commits its ``_breakpoint``
    checkpoint, and then ends the process by SIGTERM as before (MindSpore has no such hook).

    ``directory`` (default: the current directory; created when the callback is built, as
    MindSpore does) is opened as a store for the duration of each ``model.train``; another
    process or ``load_checkpoint`` may read it meanwhile, and other writers in this process
    (another callback, ``save_checkpoint``) share it. A callable ``directory`` is called with
    the run context at every step end, as in MindSpore; each directory it names is a store of
    its own. ``store=`` hands it an open ``ckptstore.Store`` instead (then it is not closed).
    """

    def __init__(self, prefix: str | Callable[[Any], str] = "CKP",
                 directory: str | os.PathLike[str] | None = None,
                 config: _MsCheckpointConfig | None = None, *, store: Store | None = None) -> None:
        super().__init__()
        if not callable(prefix) and (not isinstance(prefix, str) or not prefix
                                     or "/" in prefix):
            raise ValueError(f"ModelCheckpoint: prefix must be a callable or a non-empty string "
                             f"without '/', not {prefix!r}")
        self._directory_func: Callable[[Any], Any] | None = None
        if callable(directory):
            if store is not None:
                raise ValueError("ModelCheckpoint: give a callable directory or store=, not "
                                 "both")
            # as MindSpore: called at every step_end, its directory created then; each
            # directory is a store of its own
            self._directory_func = directory
            directory = None
        if config is None:
            config = CheckpointConfig()
        elif not isinstance(config, _MsCheckpointConfig):
            raise TypeError(f"ModelCheckpoint: config must be a CheckpointConfig, not "
                            f"{type(config).__name__}")
        else:
            _check_config(config)
        self._config = config
        self._prefix_func = prefix if callable(prefix) else None
        self._prefix = prefix if isinstance(prefix, str) else "CKP"
        self._directory = os.fspath(store.path if store is not None else (directory or os.getcwd()))
        if self._directory_func is None:
            os.makedirs(self._directory, exist_ok=True)  # as MindSpore: when the callback is built
        self._store = store
        self._owns_store = store is None
        append = dict(config.append_dict or {})
        self._append = append
        self._append_epoch_num = int(append.get("epoch_num", 0) or 0)
        self._append_step_num = int(append.get("step_num", 0) or 0)
        self._last_triggered_step = 0
        self._last_time = time.time()
        self._pending: Any = None
        self._latest_name = ""
        self._network: Any = None
        self._cb_params: Any = None
        self._begun = (0, 0)  # (epoch, global step) of the step running now
        self._outputs_at_begin: Any = None
        self._completed_step = 0
        self._step_offset: int | None = None  # see _offset
        self._sigterm = False  # a SIGTERM arrived (see _catch_sigterm)
        self._sigterm_installed = False
        self._old_sigterm: Any = None
        self.saved: list[dict[str, Any]] = []  # commit summaries of this callback, in order

    # -- the store ------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None or self._store.closed:
            os.makedirs(self._directory, exist_ok=True)
            key = _store_key(self._config.enc_key, self._config.enc_mode,
                             "CheckpointConfig(enc_key=...)")
            self._store = Store(self._directory, **({} if key is None else
                                                    {"encryption_key": key}))
        return self._store

    def _switch_directory(self, d: str) -> None:
        """A callable ``directory`` named ``d``: later saves go to the store there (created if
        needed); the previous store is finished and closed first."""
        os.makedirs(d, exist_ok=True)
        if d != self._directory:
            self._close()
            self._store = None
            self._directory = d

    def _close(self) -> None:
        try:
            self._finish_pending()
        finally:
            if self._owns_store and self._store is not None and not self._store.closed:
                self._store.close()

    # -- MindSpore's callback protocol ----------------------------------------------------
    def __enter__(self) -> ModelCheckpoint:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._restore_sigterm()
        try:
            if exc_type is not None and self._config.exception_save:
                self._save_breakpoint()
        finally:
            self._close()

    def begin(self, run_context: Any) -> None:
        _check_stand_alone("ModelCheckpoint")
        cb = run_context.original_args()
        self._cb_params = cb
        self._completed_step = int(cb.get("cur_step_num", 0) or 0)
        self._step_offset = None
        self._catch_sigterm()

    # -- SIGTERM (preemption) with exception_save ------------------------------------------
    def _catch_sigterm(self) -> None:
        """With ``exception_save``, a SIGTERM during training (a preempted node) is noted, not
        acted on at once: the step running finishes, its ``_breakpoint`` checkpoint is
        committed, then the previous handler is put back and SIGTERM sent again, so the process
        ends as it would have, with its state saved. Only the main thread can set handlers."""
        if (not self._config.exception_save or self._sigterm_installed
                or threading.current_thread() is not threading.main_thread()):
            return
        self._sigterm = False

        def noted(signum: int, frame: Any) -> None:
            self._sigterm = True

        self._old_sigterm = signal.signal(signal.SIGTERM, noted)
        self._sigterm_installed = True

    def _restore_sigterm(self) -> None:
        if self._sigterm_installed:  # (None: the old one was set outside Python)
            signal.signal(signal.SIGTERM, self._old_sigterm if self._old_sigterm is not None
                          else signal.SIG_DFL)
            self._sigterm_installed = False

    def _on_sigterm(self) -> None:
        self._sigterm = False
        try:
            self._save_breakpoint()
            self._close()
        finally:
            self._restore_sigterm()
            os.kill(os.getpid(), signal.SIGTERM)

    def step_begin(self, run_context: Any) -> None:
        cb = run_context.original_args()
        self._cb_params = cb
        self._begun = (int(cb.cur_epoch_num), int(cb.cur_step_num))
        self._outputs_at_begin = cb.get("net_outputs")
        self._offset(cb)

    def step_end(self, run_context: Any) -> None:
        cb = run_context.original_args()
        self._cb_params = cb
        self._completed_step = int(cb.cur_step_num)
        if self._directory_func is not None:
            self._switch_directory(os.fspath(self._directory_func(cb)))
        if self._prefix_func is not None:
            p = self._prefix_func(cb)
            if not isinstance(p, str) or not p or "/" in p:
                raise ValueError(f"ModelCheckpoint: the prefix callable must return a non-empty "
                                 f"string without '/', not {p!r}")
            self._prefix = p
        self._save_ckpt(cb)
        if self._sigterm:
            self._on_sigterm()

    def end(self, run_context: Any) -> None:
        cb = run_context.original_args()
        self._save_ckpt(cb, force=True)
        self._finish_pending()

    # -- saving ---------------------------------------------------------------------------
    def _due(self, cb: Any, force: bool) -> bool:
        c = self._config
        if c.save_checkpoint_steps and c.save_checkpoint_steps > 0:
            return force or cb.cur_step_num >= self._last_triggered_step + c.save_checkpoint_steps
        if c.save_checkpoint_seconds and c.save_checkpoint_seconds > 0:
            now = time.time()
            if now - self._last_time > c.save_checkpoint_seconds or force:
                self._last_time = now
                return True
        return False

    def _name(self, epoch: int, step_in_epoch: int, suffix: str = "") -> str:
        if self._prefix_func is not None and not suffix:
            return self._prefix
        return f"{self._prefix}-{epoch}_{step_in_epoch}{suffix}"

    def _network_of(self, cb: Any) -> Any:
        net = self._config.saved_network
        for key in ("train_network", "network"):  # (a Cell's truth is its length: no `or`)
            if net is None:
                net = cb.get(key)
        if net is None:
            raise ValueError("ModelCheckpoint: the run context holds no network to save")
        return net

    def _offset(self, cb: Any) -> int:
        """What to add to ``cb_params.cur_step_num`` for the global step. ``model.train(...,
        initial_epoch=E)`` restarts that counter at 0 (while ``cur_epoch_num`` goes on from E):
        MindSpore's own ``step_num`` then starts over after every resume. Here the step counts
        on: fixed on the first step of a ``model.train``, as the steps of the epochs before it."""
        if self._step_offset is None:
            done_before = (int(cb.cur_epoch_num) - 1) * int(cb.batch_num)
            self._step_offset = max(0, done_before - (int(cb.cur_step_num) - 1))
        return self._step_offset

    def _append_values(self, epoch: int, step: int) -> dict[str, Any]:
        out = dict(self._append)
        if "epoch_num" in out:
            out["epoch_num"] = self._append_epoch_num + epoch
        if "step_num" in out:
            out["step_num"] = self._append_step_num + step
        return out

    def _save_ckpt(self, cb: Any, force: bool = False) -> None:
        step = int(cb.cur_step_num)
        if step == self._last_triggered_step or not self._due(cb, force):
            return
        self._finish_pending()
        epoch = int(cb.cur_epoch_num)
        step_in_epoch = (step - 1) % int(cb.batch_num) + 1
        name = self._name(epoch, step_in_epoch)
        self._last_triggered_step = step
        net = self._network_of(cb)
        params = _named_params(net, None)
        step += self._offset(cb)
        result = _commit(self.store, params, self._append_values(epoch, step),
                         self._append_step_num + step, self._append_epoch_num + epoch, name,
                         self._prefix, async_save=bool(self._config.async_save))
        self._latest_name = name
        if self._config.async_save:
            self._pending = result
        else:
            self.saved.append(result)
            self._retain()

    def _finish_pending(self) -> None:
        """Waits for the async save in flight (re-raising its error), then retention: retention
        only ever follows a commit."""
        if self._pending is not None:
            h, self._pending = self._pending, None
            self.saved.append(h.wait())
            self._retain()

    def _save_breakpoint(self) -> None:
        cb = self._cb_params
        if cb is None or (cb.get("train_network") is None and self._config.saved_network is None):
            return  # raised before training began: nothing trained to save
        try:
            self._finish_pending()
        except Exception as e:  # the breakpoint save goes on: it is the state that matters now
            warnings.warn(f"ModelCheckpoint: the save in flight failed ({e}); saving the "
                          f"exception checkpoint anyway", stacklevel=2)
        epoch, begun = self._begun
        if begun == 0:
            epoch, begun = int(cb.get("cur_epoch_num", 0) or 0), int(cb.get("cur_step_num", 0))
        # The step whose network call returned is complete even if a later callback raised.
        done = begun if cb.get("net_outputs") is not self._outputs_at_begin else begun - 1
        done = max(done, self._completed_step, 0)
        batch_num = int(cb.get("batch_num", 0) or 0) or 1
        step_in_epoch = (begun - 1) % batch_num + 1 if begun else 0
        name = self._name(epoch, step_in_epoch, "_breakpoint")
        params = _named_params(self._network_of(cb), None)
        done += self._step_offset or 0
        self.saved.append(_commit(self.store, params, self._append_values(epoch, done),
                                  self._append_step_num + done, self._append_epoch_num + epoch,
                                  name, self._prefix, breakpoint=True))
        self._latest_name = name

    def _own(self) -> list[dict[str, Any]]:
        """This prefix's regular checkpoints (not breakpoints, not pinned), oldest first:
        the ones retention may delete (MindSpore counts the files of its prefix)."""
        return [c for c in self.store.list()
                if c["metadata"].get("prefix") == self._prefix
                and not c["metadata"].get("breakpoint") and not c["pinned"]]

    def _retain(self) -> None:
        c = self._config
        own = self._own()
        if not own:
            return
        if c.keep_checkpoint_max and c.keep_checkpoint_max > 0:
            doomed = own[:-int(c.keep_checkpoint_max)]
        elif c.keep_checkpoint_per_n_minutes and c.keep_checkpoint_per_n_minutes > 0:
            doomed = per_minutes_doomed(own, int(c.keep_checkpoint_per_n_minutes))
        else:
            return
        for ck in doomed:
            self.store.delete(ck["id"])

    @property
    def latest_ckpt_file_name(self) -> str:
        """The path of the newest checkpoint this callback saved, ``DIR/NAME.ckpt`` (what
        ``load_checkpoint`` resolves in the store), or "" before the first save."""
        if not self._latest_name:
            return ""
        return os.path.join(self._directory, self._latest_name + "." + self._config.format)


def per_minutes_doomed(checkpoints: list[dict[str, Any]], minutes: int) -> list[dict[str, Any]]:
    """Of ``checkpoints`` (oldest first), those that keeping the newest of each ``minutes``-minute
    window of commit wall time (and the newest overall) deletes."""
    window = minutes * 60 * 1_000_000_000
    newest_of: dict[int, int] = {}
    for ck in checkpoints:
        newest_of[ck["wall_time_unix_ns"] // window] = ck["id"]
    keep = set(newest_of.values()) | {checkpoints[-1]["id"]}
    return [ck for ck in checkpoints if ck["id"] not in keep]


# -- saving and loading by name -----------------------------------------------------------------

def _split_path(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(store dir, checkpoint name)`` of ``DIR/NAME[.ckpt]``; name "latest" for the store
    directory itself."""
    p = os.fspath(path)
    if os.path.isdir(p) and is_store(p):
        return p, "latest"
    d, base = os.path.split(p.rstrip("/"))
    for ext in _EXTENSIONS:
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return d or ".", base


def save_checkpoint(save_obj: Any, ckpt_file_name: str | os.PathLike[str],
                    integrated_save: bool = True, async_save: bool | str = False,
                    append_dict: Mapping[str, Any] | None = None, enc_key: bytes | None = None,
                    enc_mode: str = "AES-GCM", choice_func: Callable[[str], bool] | None = None,
                    crc_check: bool = False, format: str = "ckpt", *,
                    store: Store | None = None, **kwargs: Any) -> None:
    """MindSpore's ``save_checkpoint`` into a store: ``ckpt_file_name`` is ``DIR/NAME.ckpt``,
    DIR the store (created if needed), NAME the checkpoint's name. The step and epoch are
    ``append_dict``'s ``step_num``/``epoch_num`` (0 without). Durable when it returns, also with
    ``async_save`` (for background saves during training use ``ModelCheckpoint``'s
    ``async_save``). ``store=`` saves into an open Store (DIR is then ignored). ``enc_key`` (32
    bytes, ``enc_mode="AES-GCM"``) seals the checkpoint: the store's ``encryption_key``."""
    key = _store_key(enc_key, enc_mode, "save_checkpoint(enc_key=...)")
    if key is not None and store is not None:
        raise ValueError("save_checkpoint: pass the key to Store(..., encryption_key=...) when "
                         "saving into an open store, not enc_key")
    if format not in ("ckpt", "safetensors"):
        raise ValueError(f"save_checkpoint(format={format!r}): use \"ckpt\" or \"safetensors\"")
    if kwargs.get("remove_redundancy"):
        raise NotImplementedError("save_checkpoint(remove_redundancy=True) is not implemented")
    if isinstance(save_obj, nn.Cell):
        _check_stand_alone("save_checkpoint")
    d, name = _split_path(ckpt_file_name)
    if not name or name == "latest":
        raise ValueError(f"save_checkpoint: {os.fspath(ckpt_file_name)!r} names no checkpoint; "
                         f"give DIR/NAME.ckpt")
    append = dict(append_dict or {})
    for k, v in append.items():
        if not isinstance(k, str) or not isinstance(v, (int, float, bool, str, Tensor)):
            raise TypeError(f"append_dict {k!r}: {type(v).__name__} is not int, float, bool, str "
                            f"or Tensor")
    step, epoch = append.get("step_num", 0), append.get("epoch_num", 0)
    for k, v in (("step_num", step), ("epoch_num", epoch)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"append_dict {k!r} must be an int, not {type(v).__name__}")
    s = store if store is not None else Store(d, **_key_opts(key))
    try:
        _commit(s, _named_params(save_obj, choice_func), append, step, epoch, name, None)
    finally:
        if store is None:
            s.close()


def _as_prefixes(p: str | Iterable[str] | None, what: str) -> tuple[str, ...] | None:
    if p is None:
        return None
    t = (p,) if isinstance(p, str) else tuple(p)
    if not t or any(not isinstance(x, str) or not x for x in t):
        raise ValueError(f"load_checkpoint: {what} must be a non-empty string or a list of them, "
                         f"not {p!r}")
    return t


def _key_opts(key: bytes | None) -> dict[str, Any]:
    """Store options for an optional encryption key."""
    return {} if key is None else {"encryption_key": key}


def _has_name(d: str, name: str, key: bytes | None = None) -> bool:
    """Whether the store ``d`` holds a checkpoint called ``name``."""
    with Store(d, read_only=True, **_key_opts(key)) as s:
        return any(c["metadata"].get("name") == name for c in s.list())


def _find(s: Store, name: str) -> tuple[dict[str, Any], bool]:
    """The checkpoint called ``name`` (the newest of that name), or for "latest" the newest one
    that verifies; and whether it was verified already."""
    if name == "latest":
        info = s._native.latest_valid()
        if info is None:
            if s.list():
                raise CorruptionError(f"no checkpoint in {s.path} verifies")
            raise CheckpointNotFoundError(f"no checkpoint in {s.path} (the store is empty)")
        return info, True
    live = s.list()
    for ck in reversed(live):
        if ck["metadata"].get("name") == name:
            return ck, False
    names = [c["metadata"]["name"] for c in live if "name" in c["metadata"]]
    raise CheckpointNotFoundError(f"no checkpoint named {name!r} in {s.path}; it holds "
                        f"{names[-8:] if names else 'no named checkpoints'}"
                        f"{' (newest 8)' if len(names) > 8 else ''}, or ask for \"latest\"")


def _ms_parameter(s: Store, ck_id: int, name: str, verify: bool,
                  as_bytes: list[Any] | None = None) -> Any:
    """Tensor ``name`` of checkpoint ``ck_id`` as a ``mindspore.Parameter`` of its own memory:
    one copy out of the store's read-only map (Parameter copies a numpy array; never a view of
    the map, which an in-place update would fault on). ``as_bytes``: ``[MindSpore dtype,
    shape]`` of a tensor kept as its bytes (see ``_MS_AS_BYTES``)."""
    mb = s._native.tensor(ck_id, name, verify=verify)
    if as_bytes is not None and mb.dtype == "u8":
        dt, shape = as_bytes
        raw = _tensors.storage_array(mb)
        if dt == "Int4":
            from mindspore._c_expression import TensorPy

            return Parameter(Tensor(TensorPy.convert_bytes_to_tensor(
                raw.tobytes(), tuple(shape), ms.qint4x2)), name=name)
        return Parameter(raw.view(_MS_AS_BYTES[dt]).reshape(shape).copy(), name=name)
    if _ENGINE_TO_MS.get(mb.dtype) is None:
        raise TypeError(f"checkpoint {ck_id} tensor {name!r} is {mb.dtype}, which MindSpore "
                        f"cannot hold")
    storage = _tensors.storage_array(mb)  # bf16 as uint16: numpy has no bfloat16
    if mb.dtype == "bf16":
        return Parameter(Tensor(storage).view(ms.bfloat16), name=name)
    return Parameter(storage, name=name)


def load_checkpoint(ckpt_file_name: Any, net: Any = None, strict_load: bool = False,
                    filter_prefix: str | Iterable[str] | None = None, dec_key: bytes | None = None,
                    dec_mode: str = "AES-GCM", specify_prefix: str | Iterable[str] | None = None,
                    choice_func: Callable[[str], bool] | None = None, crc_check: bool = False,
                    remove_redundancy: bool = False, format: str = "ckpt", *,
                    verify: bool = True) -> dict[str, Any]:
    """MindSpore's ``load_checkpoint`` on a store: returns ``{name: mindspore.Parameter}`` (and
    str values as str), and with ``net`` also loads it (``load_param_into_net``).

    ``ckpt_file_name``: ``DIR/NAME.ckpt`` (or ``.safetensors``, or no extension), DIR a store and
    NAME a checkpoint's name (the newest of that name); ``DIR/latest`` or DIR itself for the
    newest checkpoint that verifies (walking back past damaged ones); or an open
    ``ckptstore.Store`` (its newest valid checkpoint). A path to a MindSpore file that is not in
    a store is loaded by MindSpore's own ``load_checkpoint``.

    The dict holds the checkpoint's tensors and, as MindSpore's own file would, its
    ``append_info`` values (``epoch_num``/``step_num`` as Int64, ints Int64, floats Float32,
    bools Bool, strs str); a checkpoint not written by this module (e.g. ``ckptstore import``ed)
    gives ``epoch_num``/``step_num`` from its epoch and step and its str metadata, as the
    ``ckptstore export --format mindspore`` of it would. ``specify_prefix`` keeps names starting
    with one of the prefixes, ``filter_prefix`` drops them; either overrides ``choice_func``
    (keep a name when it returns True), as in MindSpore. Every tensor is verified against its
    BLAKE3 checksum (``verify=False`` skips that); a damaged named checkpoint is a
    CorruptionError. ``dec_key`` (32 bytes, ``dec_mode="AES-GCM"``) is the key of a sealed
    store (EncryptionKeyError without it or with another); a MindSpore file gets it as
    MindSpore's own ``load_checkpoint`` would."""

    def key() -> bytes | None:
        return _store_key(dec_key, dec_mode, "load_checkpoint(dec_key=...)")
    if remove_redundancy:
        raise NotImplementedError("load_checkpoint(remove_redundancy=True) is not implemented")
    specify = _as_prefixes(specify_prefix, "specify_prefix")
    filt = _as_prefixes(filter_prefix, "filter_prefix")
    use_choice = specify is None and filt is None and choice_func is not None

    def wanted(k: str) -> bool:
        if specify is not None and not any(k.startswith(p) for p in specify):
            return False
        if filt is not None and any(k.startswith(p) for p in filt):
            return False
        return not use_choice or _choose(choice_func, k)

    if isinstance(ckpt_file_name, Store):
        key()  # checked (an open store has its key already)
        s, name, owned = ckpt_file_name, "latest", False
    elif isinstance(ckpt_file_name, (str, os.PathLike)):
        d, name = _split_path(ckpt_file_name)
        p = os.fspath(ckpt_file_name)
        if not is_store(d) or (os.path.isfile(p) and not _has_name(d, name, key())):
            # a MindSpore file (also one written before its directory became a store):
            # MindSpore reads it
            if os.path.isfile(p):
                return ms.load_checkpoint(p, net, strict_load, filter_prefix, dec_key, dec_mode,
                                          specify_prefix, choice_func, crc_check, False, format)
            raise CheckpointNotFoundError(f"load_checkpoint: {p!r}: {d!r} is not a ckptstore "
                                          f"store and no such file exists")
        s, owned = Store(d, read_only=True, **_key_opts(key())), True
    else:
        raise TypeError(f"load_checkpoint: ckpt_file_name must be a path or a ckptstore.Store, "
                        f"not {type(ckpt_file_name).__name__}")
    try:
        info, verified = _find(s, name)
        out: dict[str, Any] = {}
        ck_id = info["id"]
        check = verify and not verified
        md = info["metadata"]
        as_bytes = json.loads(md[MS_DTYPES_KEY]) if MS_DTYPES_KEY in md else {}
        for k in s._native.tensor_names(ck_id):
            if wanted(k):
                out[k] = _ms_parameter(s, ck_id, k, check, as_bytes.get(k))
        kinds = json.loads(md[APPEND_KEY]) if APPEND_KEY in md else None
        if kinds is None:  # not written by this module: as its MindSpore export reads
            kinds = {k: "str" for k, v in md.items() if isinstance(v, str)}
            kinds.update({"epoch_num": "epoch_num", "step_num": "step_num"})
        for k, kind in kinds.items():
            if not wanted(k) or kind == "tensor":
                continue
            if kind in ("epoch_num", "step_num"):
                v = info["epoch"] if kind == "epoch_num" else info["step"]
                out[k] = Parameter(Tensor(np.array(v, dtype=np.int64)), name=k)
            elif kind == "str":
                out[k] = md[k]
            else:
                # The kinds come from the store: anything but these is refused by name.
                np_type = {"int": np.int64, "float": np.float32, "bool": np.bool_}.get(kind)
                if np_type is None or k not in md:
                    raise ValueError(f"checkpoint {ck_id}: append_info value {k!r} of kind "
                                     f"{kind!r} is not one ckptstore.mindspore writes")
                out[k] = Parameter(Tensor(np.array(md[k], dtype=np_type)), name=k)
    finally:
        if owned:
            s.close()
    if not out:
        raise ValueError("The loaded parameter dict is empty after filter or specify, please check "
                         "whether 'filter_prefix' or 'specify_prefix' are set correctly.")
    if net is not None:
        load_param_into_net(net, out, strict_load)
    return out


def load_param_into_net(net: Any, parameter_dict: Mapping[str, Any], strict_load: bool = False,
                        remove_redundancy: bool = False) -> tuple[list[str], list[str]]:
    """MindSpore's own ``load_param_into_net`` (this is it, re-exported, so name matching, dtype
    conversion and the returned ``(param_not_load, ckpt_not_load)`` are exactly MindSpore's)."""
    return ms.load_param_into_net(net, parameter_dict, strict_load, remove_redundancy)
