"""The interleaved layout (runtime/interleaved.py) beside GGML's row layout.

For each shape, one row of x and four, the GGML-layout int8 kernels
(int8_matvec, int8_batch) beside the interleaved ones: in the cache (one
matrix again and again, as a small model sits in a large L3) and from memory
(matrices cycled past the L3's size). The runtime interleaves only small
models (interleaved.repacked_types); this measures both layouts anywhere.

    .venv/bin/python bench/interleaved_layout.py [--type Q8_0]

Needs 512-bit VNNI. Both layouts' results match the dequantized float product
to x's int8 rounding (printed: the largest error over the largest value), not
each other bit for bit: their sums are ordered differently.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numba owns the cores

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
from ggml_weights import quantized  # noqa: E402

from llamazip.runtime import interleaved, jit  # noqa: E402
from llamazip.runtime.ggml_types import BLOCK_GEOMETRY, GGMLType  # noqa: E402
from llamazip.runtime.weight_matrix import InterleavedMatrix, QuantMatrix  # noqa: E402
from llamazip.runtime.weight_types import dequantize  # noqa: E402

WEIGHT_TYPE = GGMLType.Q4_1


class Case:
    """One matrix in both layouts."""

    def __init__(self, rows: int, cols: int, seed: int):
        self.raw = quantized(WEIGHT_TYPE, rows, cols, seed=seed)
        self.rows, self.cols = rows, cols
        self.ggml = QuantMatrix(self.raw, WEIGHT_TYPE, cols)
        self.interleaved = InterleavedMatrix(self.raw, WEIGHT_TYPE, cols)
        self.interleaved.packed  # repacked before the clock starts

    def today(self, x: np.ndarray, out: np.ndarray) -> None:
        out[:] = self.ggml.matmul(x)

    def proposed(self, x: np.ndarray, out: np.ndarray) -> None:
        out[:] = self.interleaved.matmul(x)


def in_cache(rows: int, cols: int, reps: int) -> None:
    rng = np.random.default_rng(0)
    case = Case(rows, cols, 0)
    reference = dequantize(case.raw, WEIGHT_TYPE, cols)
    times = {}
    for n in (1, 4):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        out_today, out_proposed = np.empty((n, rows), np.float32), np.zeros((n, rows), np.float32)
        case.today(x, out_today)
        case.proposed(x, out_proposed)
        exact = x @ reference.T
        error = [np.abs(out - exact).max() / np.abs(exact).max() for out in (out_today, out_proposed)]
        spent = {"today": [], "interleaved": []}
        for _ in range(reps):
            for name, run in (("today", lambda: case.today(x, out_today)),
                              ("interleaved", lambda: case.proposed(x, out_proposed))):
                started = time.perf_counter()
                run()
                spent[name].append(time.perf_counter() - started)
        times[n] = {name: float(np.median(v)) for name, v in spent.items()} | {"error": error}
    one, four = times[1], times[4]
    print(f"{rows}x{cols} in cache: 1 row {1e6 * one['today']:.1f} us today, {1e6 * one['interleaved']:.1f} "
          f"interleaved; 4 rows {1e6 * four['today']:.1f} / {1e6 * four['interleaved']:.1f} us "
          f"(4 rows / 1: {four['today'] / one['today']:.2f} today, {four['interleaved'] / one['interleaved']:.2f} "
          f"interleaved; interleaved 4 rows / today's 1: {four['interleaved'] / one['today']:.2f}; "
          f"error {max(one['error'][0], four['error'][0]):.1e} today, "
          f"{max(one['error'][1], four['error'][1]):.1e} interleaved)")


def from_memory(rows: int, cols: int, count: int, reps: int) -> None:
    rng = np.random.default_rng(1)
    cases = [Case(rows, cols, seed) for seed in range(count)]
    total = sum(c.raw.nbytes for c in cases)
    speeds = {}
    for n in (1, 4):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        out = np.empty((n, rows), np.float32)
        for case in cases[:1]:  # compiled before the clock starts
            case.today(x, out)
            case.proposed(x, out)
        for name, run in (("today", lambda c: c.today(x, out)), ("interleaved", lambda c: c.proposed(x, out))):
            started = time.perf_counter()
            for _ in range(reps):
                for case in cases:
                    run(case)
            speeds[n, name] = total * reps / (time.perf_counter() - started) / 1e9
    print(f"{count} x {rows}x{cols} from memory ({total / 1e6:.0f} MB): 1 row {speeds[1, 'today']:.1f} GB/s today, "
          f"{speeds[1, 'interleaved']:.1f} interleaved; 4 rows {speeds[4, 'today']:.1f} / "
          f"{speeds[4, 'interleaved']:.1f} GB/s")


def main() -> int:
    global WEIGHT_TYPE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", default="Q4_1", choices=[t.name for t in interleaved.TYPES])
    WEIGHT_TYPE = GGMLType[parser.parse_args().type]
    if not interleaved.AVAILABLE:
        print("error: this CPU has no 512-bit VNNI, which the interleaved kernels use", file=sys.stderr)
        return 1
    jit.set_threads(2)
    block_size = BLOCK_GEOMETRY[WEIGHT_TYPE][0]
    for rows, cols in ((1536, 576), (576, 1536), (4864, 896), (4096, 4096), (14336, 4096)):
        if cols % block_size == 0:  # K-quants: rows of whole super-blocks of 256
            in_cache(rows, cols, 200 if rows * cols < 4e6 else 30)
    from_memory(14336, 4096, 40, 3)  # 1.2-1.4 GB of 4-5-bit weights: well past any L3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
