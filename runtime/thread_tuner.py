"""How many threads decode with, chosen by timing tokens: fewer win while
other programs keep cores busy.

The kernels split their rows evenly and every thread waits for the slowest,
so a thread sharing its core with another program holds all of them back:
with one of two cores busy, Qwen2.5 decoded at 12 tok/s on 2 threads and at
24 on 1 (llama.cpp falls the same way). The tuner times each decoded token;
every so often it decodes PROBE_TOKENS at a neighbouring thread count (one
fewer, or one more once below the most it may use) and keeps whichever count
was faster, so it also climbs back when the cores free up. A probe that loses
doubles the wait before the next (PROBE_EVERY up to PROBE_EVERY_MOST tokens):
probing at a bad count costs time, little once conditions are steady.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Callable, TypeVar

from .jit import set_threads as _set_kernel_threads

PROBE_EVERY = 32  # tokens between probes at first and after a probe wins
PROBE_EVERY_MOST = 256
PROBE_TOKENS = 4  # tokens timed at the other count
WIN = 0.9  # a probe must take at most this fraction of the current count's time

T = TypeVar("T")


class ThreadTuner:
    """Picks the decoding thread count between 1 and `most`."""

    def __init__(self, most: int, set_threads: Callable[[int], None] = _set_kernel_threads,
                 clock: Callable[[], float] = time.perf_counter):
        self.most = max(1, most)
        self.threads = self.most
        self._set_threads, self._clock = set_threads, clock
        self._recent: list[float] = []  # seconds per token at self.threads, newest last
        self._probe: int | None = None  # the count being tried
        self._probe_times: list[float] = []
        self._since_probe = 0
        self._interval = PROBE_EVERY
        self._next_down = True  # alternate the direction when both are possible
        set_threads(self.threads)

    def run(self, decode_one: Callable[[], T]) -> T:
        """decode_one() (one token), timed, at the thread count the tuner picks."""
        threads = self._probe or self.threads
        self._set_threads(threads)
        started = self._clock()
        result = decode_one()
        self._record(self._clock() - started)
        return result

    def _record(self, seconds: float) -> None:
        if self._probe is not None:
            self._probe_times.append(seconds)
            if len(self._probe_times) == PROBE_TOKENS:
                self._finish_probe()
            return
        self._recent = (self._recent + [seconds])[-PROBE_TOKENS:]
        self._since_probe += 1
        if self._since_probe >= self._interval and len(self._recent) == PROBE_TOKENS and self.most > 1:
            self._start_probe()

    def _start_probe(self) -> None:
        down, up = self.threads - 1, self.threads + 1
        if down >= 1 and (self._next_down or up > self.most):
            self._probe = down
        else:
            self._probe = up
        self._next_down = not self._next_down
        self._probe_times = []

    def _finish_probe(self) -> None:
        if median(self._probe_times) <= WIN * median(self._recent):
            self.threads = self._probe
            self._recent = self._probe_times
            self._interval = PROBE_EVERY
        else:
            self._interval = min(2 * self._interval, PROBE_EVERY_MOST)
        self._probe, self._probe_times, self._since_probe = None, [], 0

