"""A GGUF's built tokenizer, kept between runs.

Building a tokenizer from a large vocabulary is most of a warm start: Qwen2.5's
151k tokens and merges took 0.6 s to decode from the GGUF and 0.9 s to build
into tiktoken's ranks; the pickled result loads in 0.25 s. The cache is keyed
by the vocabulary's bytes as stored (gguf.LazyStrings.raw, never decoded on a
hit), the rest of the tokenizer metadata, the tokenizer's own source and the
Python and tiktoken versions, so any change builds it again. Vocabularies
small enough to be decoded eagerly are built every time (fast already).

Files go to LLAMAZIP_CACHE, else $XDG_CACHE_HOME/llamazip, else
~/.cache/llamazip (where a bundle unpacks, by the same rule as its bootstrap),
under tokenizers/; written through a temporary file and a rename. A cache that
cannot be read or written is built around, never an error.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import tiktoken

from . import bpe, spm, tokenizer
from .gguf import LazyStrings
from .tokenizer import Tokenizer

FOLDER = "tokenizers"  # under the cache root, beside the bundles' unpacked trees


def cache_root() -> Path:
    """The user's llamazip cache folder (templates/bootstrap.py's rule: a bundle cannot import this before unpacking)."""
    if os.environ.get("LLAMAZIP_CACHE"):
        return Path(os.environ["LLAMAZIP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamazip"


def load_tokenizer(metadata: dict) -> Tokenizer:
    """Tokenizer.from_metadata(metadata), from the cache when a run has built it before."""
    key = cache_key(metadata)
    if key is None:
        return Tokenizer.from_metadata(metadata)
    path = cache_root() / FOLDER / f"{key}.pickle"
    try:
        with open(path, "rb") as f:
            cached = pickle.load(f)
        if isinstance(cached, Tokenizer):
            return cached
    except Exception:  # absent, cut short, or written by something else: build it
        pass
    built = Tokenizer.from_metadata(metadata)
    _store(path, built)
    return built


def cache_key(metadata: dict) -> str | None:
    """The cache key of the tokenizer metadata, or None when no part of it is lazily decoded."""
    digest = hashlib.sha256()
    lazy = False
    for key in sorted(k for k in metadata if k.startswith("tokenizer.")):
        value = metadata[key]
        digest.update(key.encode() + b"\0")
        if isinstance(value, LazyStrings):
            digest.update(b"strings" + len(value).to_bytes(8, "little") + value.raw)
            lazy = True
        elif isinstance(value, np.ndarray):
            digest.update(value.dtype.str.encode() + value.tobytes())
        else:
            digest.update(repr(value).encode())
        digest.update(b"\0")
    if not lazy:
        return None
    for module in (tokenizer, bpe, spm, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(f"{sys.version}\0{tiktoken.__version__}\0{pickle.HIGHEST_PROTOCOL}".encode())
    return digest.hexdigest()[:32]


def _store(path: Path, built: Tokenizer) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(built, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError:  # a read-only or full cache: the next run builds it again
        pass
