"""A one-line progress bar on stderr with the time left, for the builder's long phases."""

from __future__ import annotations

import sys
import time


class Progress:
    """`step(note)` after each of `total` units of work; the line is redrawn in place
    and ends with a newline after the last."""

    def __init__(self, phase: str, total: int, unit: str):
        self.phase, self.total, self.unit = phase, total, unit
        self.done = 0
        self.start = time.monotonic()

    def step(self, note: str = "") -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done)
        width = 24
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        note = f" ({note})" if note else ""
        print(f"\r  {self.phase} [{bar}] {self.done}/{self.total} {self.unit}{note}, {elapsed:.0f} s, "
              f"~{left:.0f} s left   ", end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)
