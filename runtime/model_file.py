"""Open a model given as a bare .gguf or as a llamazip bundle.

In a bundle the GGUF is a zip member stored uncompressed at an aligned offset,
so the reader maps it straight out of the bundle file: no copy, no extraction.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

from ..zipalign.reader import ZIP_DAMAGE, BundleFormatError, read_member, read_members, weights_problem
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
            manifest = json.loads(read_member(zf, "MANIFEST.json")) if "MANIFEST.json" in members else {}
    except BundleFormatError as e:
        raise GGUFError(f"{path}: not a readable bundle: {e}") from None
    except (KeyError, OSError, *ZIP_DAMAGE) as e:  # a damaged or non-JSON MANIFEST.json
        raise GGUFError(f"{path}: not a readable bundle: MANIFEST.json: {type(e).__name__}: {e}") from None
    if not isinstance(manifest, dict):
        raise GGUFError(f"{path}: not a readable bundle: MANIFEST.json is not a JSON object")
    name = manifest.get("model")
    if name is not None and not isinstance(name, str):
        raise GGUFError(f"{path}: not a readable bundle: MANIFEST.json names the model {name!r}, not a file name")
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


def verify_weights(path: str | os.PathLike) -> None:
    """Check a bundle's weights member against the sha256 its MANIFEST.json lists;
    raises GGUFError when they differ (or when there is nothing to check against)."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise GGUFError(f"{path}: --verify checks a bundle's weights against its MANIFEST.json; "
                        f"this is not a bundle")
    open_bundle_model(path)  # the same checks, and errors, as loading it
    try:
        members = {m.name: m for m in read_members(path)}
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(read_member(zf, "MANIFEST.json"))
    except BundleFormatError as e:
        raise GGUFError(str(e)) from None
    except (KeyError, OSError, *ZIP_DAMAGE) as e:
        raise GGUFError(f"{path}: cannot verify: MANIFEST.json: {type(e).__name__}: {e}") from None
    name = manifest.get("model") if isinstance(manifest, dict) else None
    listed = manifest.get("members") if isinstance(manifest, dict) else None
    entry = listed.get(name) if isinstance(listed, dict) and isinstance(name, str) else None
    expected = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(expected, str) or name not in members:
        raise GGUFError(f"{path}: cannot verify: MANIFEST.json lists no sha256 for the weights")
    member = members[name]
    # The member is stored (open_bundle_model checked): hash its bytes straight from the file.
    digest, remaining = hashlib.sha256(), member.size
    with open(path, "rb") as f:
        f.seek(member.data_offset)
        while remaining and (chunk := f.read(min(remaining, 1 << 22))):
            digest.update(chunk)
            remaining -= len(chunk)
    if remaining or digest.hexdigest() != expected:
        raise GGUFError(f"{path}: the weights {name!r} do not match the sha256 in MANIFEST.json: "
                        f"the bundle is damaged or was altered")
