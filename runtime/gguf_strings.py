"""Stepping over a GGUF's large string arrays in compiled code.

A vocabulary's strings are stepped over when the file is opened (their
lengths lead to what follows them in the metadata), though decoded only when
read (gguf.LazyStrings). In Python that loop took ~30 ms of a 0.5 s start for
Qwen2.5 (151k tokens and 151k merges); compiled, under 1 ms. gguf.py uses it
only when the runtime's kernels are loaded already (a run): reading a GGUF
alone (`llamazip info`, the builder) does not start numba for it.
"""

from __future__ import annotations

import numpy as np

from .jit import jit


@jit()
def end_of_strings(data, pos, end, count):
    """Where `count` GGUF strings (u64 length, then the bytes) starting at data[pos]
    end; -1 if one runs past `end` (the caller's Python loop then names where)."""
    for _ in range(count):
        if pos + 8 > end:
            return -1
        n = np.int64(0)
        for k in range(8):
            n |= np.int64(data[pos + k]) << (8 * k)
        pos += 8
        if n < 0 or n > end - pos:  # a length of 2^63 or more is negative here
            return -1
        pos += n
    return pos
