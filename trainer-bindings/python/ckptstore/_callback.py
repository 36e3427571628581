"""MindSpore-style checkpointing during training: ``CheckpointConfig`` + ``ModelCheckpoint``.

Differences from MindSpore, on purpose: retention (``keep_checkpoint_max`` /
``keep_checkpoint_per_n_minutes``) runs through the engine's retention policy *after* the new
checkpoint is committed, never before, so a crash can never leave fewer checkpoints than asked
for; and the checkpoint a run resumed from (``ModelCheckpoint.resume``) is never deleted by it.
Checkpoints are named ``{prefix}-{epoch}_{step}`` (metadata ``name``, which ``ckptstore ls``
shows); an exception save is ``{prefix}-{epoch}_{step}_breakpoint``.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._store import SaveHandle, Store, load, save, save_async

StateOrCallable = Mapping[str, Any] | Callable[[], Mapping[str, Any]]

_APPEND_INFO_NAMES = ("epoch_num", "step_num")


def _nonneg(name: str, v: float | None) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                          or (isinstance(v, float) and not math.isfinite(v))):
        raise ValueError(f"{name} must be a non-negative number or None, not {v!r}")


@dataclass
class CheckpointConfig:
    """When to save and what to keep (MindSpore's ``CheckpointConfig``).

    - ``save_checkpoint_steps`` (default 1): save when ``step % N == 0``.
    - ``save_checkpoint_seconds`` (default 0 = off): save when N seconds passed since the last
      save returned (or since the callback was made). Ignored when ``save_checkpoint_steps`` is set (MindSpore: steps take precedence).
    - ``keep_checkpoint_max`` (default 5): keep the N newest.
    - ``keep_checkpoint_per_n_minutes`` (default 0 = off): keep the newest of each N-minute
      window (whole minutes). Ignored when ``keep_checkpoint_max`` is set (MindSpore).
    - ``async_save`` (False): save with ``save_async`` (the step stalls for the snapshot only).
    - ``append_info``: list of ``"epoch_num"``/``"step_num"`` and/or one dict of
      ``{str: int | float | str | bytes}``, stored as checkpoint metadata.
    - ``exception_save`` (False): on an exception or SIGTERM inside ``with ModelCheckpoint``,
      save the last state as ``{prefix}-{epoch}_{step}_breakpoint``.

    Both triggers off, or both retention rules off, is a ValueError (as in MindSpore; keep
    everything with a large ``keep_checkpoint_max``).
    """

    save_checkpoint_steps: int | None = 1
    save_checkpoint_seconds: float | None = 0
    keep_checkpoint_max: int | None = 5
    keep_checkpoint_per_n_minutes: float | None = 0
    async_save: bool = False
    append_info: list[Any] | None = None
    exception_save: bool = False

    def __post_init__(self) -> None:
        for name in ("save_checkpoint_steps", "save_checkpoint_seconds", "keep_checkpoint_max",
                     "keep_checkpoint_per_n_minutes"):
            _nonneg(name, getattr(self, name))
        for name in ("save_checkpoint_steps", "keep_checkpoint_max"):
            v = getattr(self, name)
            if v is not None and not float(v).is_integer():
                raise ValueError(f"{name} must be a whole number, not {v!r}")
        if not self.save_checkpoint_steps and not self.save_checkpoint_seconds:
            raise ValueError("save_checkpoint_steps and save_checkpoint_seconds are both 0/None: "
                             "nothing would ever be saved")
        if self.save_checkpoint_steps:
            self.save_checkpoint_seconds = None
        if not self.keep_checkpoint_max and not self.keep_checkpoint_per_n_minutes:
            raise ValueError("keep_checkpoint_max and keep_checkpoint_per_n_minutes are both "
                             "0/None; set keep_checkpoint_max to keep checkpoints")
        if self.keep_checkpoint_max:
            self.keep_checkpoint_per_n_minutes = None
        elif not float(self.keep_checkpoint_per_n_minutes or 0).is_integer():
            raise ValueError("keep_checkpoint_per_n_minutes must be whole minutes (the engine "
                             "keeps one checkpoint per whole-minute window)")
        info = self.append_info or []
        if not isinstance(info, list):
            raise TypeError("append_info must be a list")
        dicts = [x for x in info if isinstance(x, dict)]
        if len(dicts) > 1:
            raise ValueError("append_info may hold at most one dict")
        for x in info:
            if isinstance(x, str):
                if x not in _APPEND_INFO_NAMES:
                    raise ValueError(f"append_info: {x!r} is not one of {_APPEND_INFO_NAMES}")
            elif isinstance(x, dict):
                for k, v in x.items():
                    if not isinstance(k, str):
                        raise TypeError(f"append_info key {k!r} must be str")
                    if isinstance(v, bool) or not isinstance(v, (int, float, str, bytes)):
                        raise TypeError(f"append_info {k!r}: {type(v).__name__} is not int, "
                                        f"float, str or bytes")
            else:
                raise TypeError(f"append_info holds {type(x).__name__}; use \"epoch_num\", "
                                f"\"step_num\" or a dict")


class ModelCheckpoint:
    """Saves during training (MindSpore's ``ModelCheckpoint``): call ``step_end`` after every
    step; wrap the loop in ``with cb:`` for exception/SIGTERM saves and a clean end.

        cb = ModelCheckpoint(prefix="lenet", directory="ckpts", config=CheckpointConfig(...))
        state = cb.resume()                       # newest valid checkpoint, or None
        with cb:
            for step in ...:
                ...
                cb.step_end(step, epoch, lambda: {"model": model.state_dict(), ...})
    """

    def __init__(self, prefix: str = "CKP", directory: str | os.PathLike | None = None,
                 config: CheckpointConfig | None = None, *, store: Store | None = None) -> None:
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty name without '/', not {prefix!r}")
        self.prefix = prefix
        self.config = config or CheckpointConfig()
        self._owns_store = store is None
        self.store = store if store is not None else Store(directory or os.getcwd())
        self._last_save_time = time.monotonic()
        self._last: tuple[int, int, StateOrCallable] | None = None
        self._pending: SaveHandle | None = None
        self._protect: list[int] = []
        self._old_sigterm: Any = None
        self.latest_commit: dict[str, Any] | None = None

    # -- resuming -------------------------------------------------------------------------
    def resume(self, *, framework: str | None = None) -> Any | None:
        """The state of the newest valid checkpoint (or None for a fresh store); that
        checkpoint is then protected from this callback's retention."""
        if not self.store.list():
            return None
        info = self.store._native.latest_valid()
        if info is None:
            return None
        self._protect.append(info["id"])
        return load(self.store, id=info["id"], framework=framework, verify=False)

    # -- saving ---------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        c = self.config
        if c.save_checkpoint_steps:
            return step % int(c.save_checkpoint_steps) == 0
        return time.monotonic() - self._last_save_time >= float(c.save_checkpoint_seconds or 0)

    def _metadata(self, name: str, step: int, epoch: int) -> dict[str, Any]:
        md: dict[str, Any] = {"name": name, "prefix": self.prefix}
        for x in self.config.append_info or []:
            if x == "epoch_num":
                md["epoch_num"] = epoch
            elif x == "step_num":
                md["step_num"] = step
            elif isinstance(x, dict):
                md.update(x)
        return md

    def step_end(self, step: int, epoch: int, state: StateOrCallable,
                 metrics: Mapping[str, float] | None = None) -> bool:
        """Records the step; saves if a trigger is due (then applies retention). ``state`` may
        be a callable, called only when a save is due. Returns whether it saved."""
        self._last = (step, epoch, state)
        if not self._due(step):
            return False
        self.save_now(step, epoch, state, metrics=metrics)
        return True

    def save_now(self, step: int, epoch: int, state: StateOrCallable, *,
                 metrics: Mapping[str, float] | None = None, suffix: str = "") -> None:
        """Saves now, whatever the triggers say, then applies retention."""
        self._finish_pending()
        st = state() if callable(state) else state
        md = self._metadata(f"{self.prefix}-{epoch}_{step}{suffix}", step, epoch)
        if metrics:
            md.update(metrics)
        if suffix:
            md["breakpoint"] = 1
        if self.config.async_save and not suffix:
            self._pending = save_async(self.store, st, step, epoch, metadata=md)
        else:
            self.latest_commit = save(self.store, st, step, epoch, metadata=md)
            self._retain()
        # save_checkpoint_seconds counts from the end of the last save (its stall, for async)
        self._last_save_time = time.monotonic()

    def _finish_pending(self) -> None:
        """Waits for the async save in flight (re-raising its error), then applies retention:
        retention only ever follows a commit."""
        if self._pending is not None:
            h, self._pending = self._pending, None
            self.latest_commit = h.wait()
            self._retain()

    def _retain(self) -> None:
        c = self.config
        if c.keep_checkpoint_max:
            self.store.apply_retention(keep_last=int(c.keep_checkpoint_max),
                                       protect=self._protect)
        elif c.keep_checkpoint_per_n_minutes:
            self.store.apply_retention(keep_per_minutes=int(c.keep_checkpoint_per_n_minutes),
                                       protect=self._protect)

    def on_exception(self) -> None:
        """The exception save: the last state given to ``step_end`` (a callable is called now)
        as ``{prefix}-{epoch}_{step}_breakpoint``. Waits for any save in flight first."""
        if self._last is None:
            return
        step, epoch, state = self._last
        self.save_now(step, epoch, state, suffix="_breakpoint")

    def end(self) -> None:
        """Waits for the save in flight and its retention; closes a store it opened."""
        try:
            self._finish_pending()
        finally:
            if self._owns_store:
                self.store.close()

    # -- context manager: exception and SIGTERM saves ---------------------------------------
    def __enter__(self) -> ModelCheckpoint:
        if self.config.exception_save and threading.current_thread() is threading.main_thread():
            def on_sigterm(signum: int, frame: Any) -> None:
                raise SystemExit(128 + signum)
            self._old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        try:
            if exc_type is not None and self.config.exception_save:
                self.on_exception()
        finally:
            self.end()
