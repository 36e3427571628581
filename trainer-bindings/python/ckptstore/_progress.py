"""Progress of long operations (a large load): a callback ``progress(done_bytes,
total_bytes)``, or ``progress=True`` for a tqdm bar when tqdm is installed, else a ``logging``
line (logger "ckptstore", INFO) at every tenth."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Union

_log = logging.getLogger("ckptstore")

ProgressArg = Union[bool, Callable[[int, int], Any], None]


class Progress:
    def __init__(self, what: str, total: int, how: ProgressArg):
        self.what, self.total, self.done = what, max(int(total), 0), 0
        self._cb: Callable[[int, int], Any] | None = None
        self._bar: Any = None
        self._tenth = 0
        if callable(how):
            self._cb = how
        elif how is True:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                _log.info("%s: %d bytes", what, self.total)
            else:
                self._bar = tqdm(total=self.total, desc=what, unit="B", unit_scale=True)
        elif how not in (None, False):
            raise TypeError(f"progress must be True, a callable (done, total) or None, not "
                            f"{type(how).__name__}")

    def add(self, n: int) -> None:
        self.done = min(self.done + int(n), self.total) if self.total else self.done + int(n)
        if self._cb is not None:
            self._cb(self.done, self.total)
        elif self._bar is not None:
            self._bar.update(int(n))
        elif self.total:
            tenth = self.done * 10 // self.total
            if tenth > self._tenth:
                self._tenth = tenth
                _log.info("%s: %d%% (%d of %d bytes)", self.what, tenth * 10, self.done,
                          self.total)

    def close(self, complete: bool = True) -> None:
        """Ends it; ``complete``: the operation finished (the count goes to the total, which
        counts blobs and, with a filter, what was not read)."""
        if complete and self.done < self.total:
            self.add(self.total - self.done)
        if self._bar is not None:
            self._bar.close()
