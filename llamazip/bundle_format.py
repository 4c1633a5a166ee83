"""The bundle format, read and written by the builder, the commands and the runtime.

A bundle is a launcher followed by a zip holding `__main__.py` (for `python3
BUNDLE`), `bootstrap.py`, `.args`, `lib/llamazip/...`, the runtime's wheels as
`wheels/index.json` + `wheels/files.pack` (builder/wheel_pack.py), one `*.gguf`
stored uncompressed at an aligned offset, and `MANIFEST.json` (format, name,
versions, build options, `covers`: platform -> CPython -> the dependency
versions it gets, and the size and sha256 of every other member). This module owns what those
members mean: `.args` parsing and merging, the manifest, and where the weights
lie. (`templates/bootstrap.py` reads MANIFEST.json on its own: it runs before
anything but the standard library can be imported.)

`.args`: one argument per line, taken whole (spaces included, no shell
quoting); lines starting with `#` are comments and blank lines are skipped. A
line `...` marks where the user's arguments go; without one they are appended.
Lines end at "\\n" only (a "\\r" before it is dropped), so what
`format_args_file` writes reads back as the same arguments, whatever other
line-break characters (U+2028, form feed...) an argument holds.
"""

from __future__ import annotations

import json
import os
import zipfile

from .errors import UserError
from .zipalign.reader import ZIP_DAMAGE, BundleFormatError, MemberInfo, read_member, read_members, weights_problem

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "llamazip-bundle/1"
ARGS = ".args"
PLACEHOLDER = "..."
REBUILD_HINT = "rebuild it with `llamazip build` (weights must be stored uncompressed, aligned to 4096 bytes)"


class ArgsFileError(UserError, ValueError):
    """A .args file, or arguments for one, that cannot be used."""


# --- .args -------------------------------------------------------------------------------------

def parse_args_file(text: str) -> list[str]:
    args = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if line.strip() and not line.lstrip().startswith("#"):
            args.append(line)
    return args


def read_args_file(data: bytes, origin: str = ARGS) -> list[str]:
    """Parse the bytes of a .args file; raises ArgsFileError for text that is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArgsFileError(f"{origin} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if "\0" in text:
        raise ArgsFileError(f"{origin} holds a NUL character: an argument cannot")
    return parse_args_file(text)


def format_args_file(args: list[str]) -> str:
    for arg in args:
        if "\n" in arg or "\r" in arg or "\0" in arg:
            raise ArgsFileError(f"an argument in .args cannot contain a line break or NUL: {arg!r}")
        if not arg.strip() or arg.lstrip().startswith("#"):
            raise ArgsFileError(f"an argument in .args cannot be blank or start with '#': {arg!r}")
    return "".join(arg + "\n" for arg in args)


def merge_args(defaults: list[str], user: list[str]) -> list[str]:
    if PLACEHOLDER not in defaults:
        return defaults + user
    at = defaults.index(PLACEHOLDER)
    return defaults[:at] + user + [a for a in defaults[at + 1:] if a != PLACEHOLDER]


# --- a bundle on disk ---------------------------------------------------------------------------

class Bundle:
    """A bundle's members (where each one's data lies), its manifest and its `.args`.

    Every problem is a BundleFormatError whose message starts with the path: a
    damaged zip, a manifest that is not a JSON object, a missing weights member.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.members: dict[str, MemberInfo] = {m.name: m for m in read_members(self.path)}
        self.manifest = self._read_manifest()

    def _read_small(self, name: str) -> bytes:
        try:
            with zipfile.ZipFile(self.path) as zf:
                return read_member(zf, name)
        except BundleFormatError as e:
            raise BundleFormatError(f"{self.path}: {e}") from None
        except (KeyError, OSError, *ZIP_DAMAGE) as e:
            raise BundleFormatError(f"{self.path}: not a readable bundle: {name}: {type(e).__name__}: {e}") from None

    def _read_manifest(self) -> dict:
        """The manifest, or {} for a zip without one (a bare zip of a model still opens)."""
        if MANIFEST not in self.members:
            return {}
        data = self._read_small(MANIFEST)
        try:
            manifest = json.loads(data)
        except ValueError as e:
            raise BundleFormatError(f"{self.path}: not a readable bundle: {MANIFEST}: "
                                    f"{type(e).__name__}: {e}") from None
        if not isinstance(manifest, dict):
            raise BundleFormatError(f"{self.path}: not a readable bundle: {MANIFEST} is not a JSON object")
        return manifest

    def require_manifest(self) -> dict:
        if MANIFEST not in self.members:
            raise BundleFormatError(f"{self.path}: not a llamazip bundle (no {MANIFEST})")
        return self.manifest

    def default_args(self) -> list[str]:
        """The arguments of `.args` (none when the bundle has no .args)."""
        if ARGS not in self.members:
            return []
        return read_args_file(self._read_small(ARGS), f"{self.path}: {ARGS}")

    def weights(self) -> MemberInfo:
        """The model member, checked to be stored and aligned so that it can be mapped."""
        name = self.manifest.get("model")
        if name is not None and not isinstance(name, str):
            raise BundleFormatError(f"{self.path}: not a readable bundle: {MANIFEST} names the model {name!r}, "
                                    f"not a file name")
        if name is None:
            candidates = [n for n in self.members if n.endswith(".gguf")]
            if len(candidates) != 1:
                raise BundleFormatError(f"{self.path}: a bundle must hold exactly one .gguf model, "
                                        f"found {len(candidates)}")
            name = candidates[0]
        member = self.members.get(name)
        if member is None:
            raise BundleFormatError(f"{self.path}: the model member {name!r} named in {MANIFEST} is missing")
        problem = weights_problem(member)
        if problem:
            raise BundleFormatError(f"{self.path}: {problem}; {REBUILD_HINT}")
        return member

    def listed_sha256(self, name: str) -> str | None:
        """The sha256 the manifest lists for member `name`, if any."""
        listed = self.manifest.get("members")
        entry = listed.get(name) if isinstance(listed, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        return digest if isinstance(digest, str) else None
