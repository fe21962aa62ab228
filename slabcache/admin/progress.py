"""One progress bar for long commands: fsck --deep, rebuild, compact, bench,
the reliability tools.  It draws on stderr only when that is a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    """``add(n)`` counts bytes (shows GB/s); ``step(label)`` counts steps
    (shows elapsed seconds and the step's label)."""

    def __init__(self, total: int, label: str = "", enabled: bool = True):
        self.total, self.label, self.done = max(1, total), label, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def _draw(self, text: str) -> None:
        if not self.enabled:
            return
        frac = min(1.0, self.done / self.total)
        sys.stderr.write(f"\r{self.label}[{'#' * int(30 * frac):<30}] {100 * frac:3.0f}% {text}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        dt = time.perf_counter() - self.t0
        self._draw(f"{self.done / dt / 1e9 if dt else 0:.2f} GB/s")

    def step(self, label: str = "") -> None:
        self.done += 1
        self._draw(f"{self.done}/{self.total} {time.perf_counter() - self.t0:5.0f}s {label[:40]:<40}")
