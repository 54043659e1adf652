"""Progress on stderr: a live bar on a terminal, one line per stage anywhere else.

A `\\r`-redrawn bar is for a person watching; in a log file (stderr redirected, a CI job,
a service) it is hundreds of overwritten lines. So the bar is drawn only when stderr is a
terminal; otherwise each stage prints one line when it ends: what it did, how long it
took and its rate. Rates are in items per second, never inverted into "13.40s/img"; a
stage whose first item comes late (a Ray cluster starting its actors) says how late, so
the rate is read knowing what it includes.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

# tqdm's default turns a rate below 1/s into "s/img"; items per second always reads the same way.
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"


class Progress:
    """Counts the items of one stage (`update`), shown as said above; `close` ends it.

    `enabled=False` shows nothing (`--quiet`). Use as a context manager or call `close()`.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "img", *, enabled: bool = True) -> None:
        self.desc, self.unit, self.total = desc, unit, total
        self.n = 0
        self._start = time.perf_counter()
        self._first: float | None = None
        self._line = enabled and not sys.stderr.isatty()
        self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, bar_format=_BAR_FORMAT) \
            if enabled and not self._line else None

    def update(self, n: int = 1) -> None:
        if self._first is None:
            self._first = time.perf_counter()
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._line and self.n:
            self._line = False
            print(self.summary(), file=sys.stderr, flush=True)

    def summary(self) -> str:
        """`desc: N unit in S s (R unit/s[; the first after W s])`."""
        now = time.perf_counter()
        seconds = now - self._start
        text = f"{self.desc}: {self.n} {self.unit} in {seconds:.1f} s"
        if seconds > 0:
            text += f" ({self.n / seconds:.2f} {self.unit}/s"
            wait = (self._first if self._first is not None else now) - self._start
            text += f"; the first after {wait:.1f} s)" if wait >= 1.0 else ")"
        return text

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
