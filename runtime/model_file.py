"""Open a model given as a bare .gguf or as a llamazip bundle.

In a bundle the GGUF is a zip member stored uncompressed at an aligned offset,
so the reader maps it straight out of the bundle file: no copy, no extraction.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

from ..bundle_format import Bundle
from .gguf import GGUF_MAGIC, GGUFError, GGUFFile


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
        member = Bundle(path).weights()
        return GGUFFile(path, offset=member.data_offset, length=member.size)
    if magic[:2] == b"#!":
        raise GGUFError(f"{path}: not a readable bundle: its zip archive is truncated or damaged")
    return GGUFFile(path)  # reports what is wrong with it


def verify_weights(path: str | os.PathLike) -> None:
    """Check a bundle's weights member against the sha256 its MANIFEST.json lists;
    raises GGUFError when they differ (or when there is nothing to check against)."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise GGUFError(f"{path}: --verify checks a bundle's weights against its MANIFEST.json; "
                        f"this is not a bundle")
    bundle = Bundle(path)
    member = bundle.weights()  # the same checks, and errors, as loading it
    expected = bundle.listed_sha256(member.name)
    if expected is None:
        raise GGUFError(f"{path}: cannot verify: MANIFEST.json lists no sha256 for the weights")
    # The member is stored (weights() checked): hash its bytes straight from the file.
    digest, remaining = hashlib.sha256(), member.size
    with open(path, "rb") as f:
        f.seek(member.data_offset)
        while remaining and (chunk := f.read(min(remaining, 1 << 22))):
            digest.update(chunk)
            remaining -= len(chunk)
    if remaining or digest.hexdigest() != expected:
        raise GGUFError(f"{path}: the weights {member.name!r} do not match the sha256 in MANIFEST.json: "
                        f"the bundle is damaged or was altered")
