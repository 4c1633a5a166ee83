"""Open a model given as a bare .gguf or as a llamazip bundle.

In a bundle the GGUF is a zip member stored uncompressed at an aligned offset,
so the reader maps it straight out of the bundle file: no copy, no extraction.
"""

from __future__ import annotations

import json
import os
import zipfile

from ..zipalign.reader import BundleFormatError, read_members, weights_problem
from .gguf import GGUF_MAGIC, GGUFError, GGUFFile

REBUILD_HINT = "rebuild it with `llamazip build` (weights must be stored uncompressed, aligned to 4096 bytes)"


def open_model(path: str | os.PathLike) -> GGUFFile:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from None
    if magic == GGUF_MAGIC:
        return GGUFFile(path)
    if zipfile.is_zipfile(path):
        return open_bundle_model(path)
    if magic[:2] == b"#!":
        raise GGUFError(f"{path}: not a readable bundle: its zip archive is truncated or damaged")
    return GGUFFile(path)  # reports what is wrong with it


def open_bundle_model(path: str) -> GGUFFile:
    try:
        members = {m.name: m for m in read_members(path)}
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read("MANIFEST.json")) if "MANIFEST.json" in members else {}
    except (BundleFormatError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise GGUFError(f"{path}: not a readable bundle: {e}") from None
    name = manifest.get("model")
    if name is None:
        candidates = [n for n in members if n.endswith(".gguf")]
        if len(candidates) != 1:
            raise GGUFError(f"{path}: a bundle must hold exactly one .gguf model, found {len(candidates)}")
        name = candidates[0]
    member = members.get(name)
    if member is None:
        raise GGUFError(f"{path}: the model member {name!r} named in MANIFEST.json is missing")
    problem = weights_problem(member)
    if problem:
        raise GGUFError(f"{path}: {problem}; {REBUILD_HINT}")
    return GGUFFile(path, offset=member.data_offset, length=member.size)
