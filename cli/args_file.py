"""A bundle's `.args`: default arguments, merged with what the user types.

One argument per line, taken whole (spaces included, no shell quoting);
lines starting with `#` are comments and blank lines are skipped. A line `...`
marks where the user's arguments go; without one they are appended. Lines end
at "\n" only (a "\r" before it is dropped), so what `format_args_file` writes
reads back as the same arguments, whatever other line-break characters
(U+2028, form feed...) an argument holds.
"""

from __future__ import annotations

from .errors import UserError

PLACEHOLDER = "..."


class ArgsFileError(UserError, ValueError):
    """A .args file, or arguments for one, that cannot be used."""


def parse_args_file(text: str) -> list[str]:
    args = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if line.strip() and not line.lstrip().startswith("#"):
            args.append(line)
    return args


def read_args_file(data: bytes, origin: str = ".args") -> list[str]:
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
