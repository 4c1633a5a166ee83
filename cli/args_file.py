"""A bundle's `.args`: default arguments, merged with what the user types.

One argument per line, taken whole (spaces included, no shell quoting);
lines starting with `#` are comments and blank lines are skipped. A line `...`
marks where the user's arguments go; without one they are appended.
"""

from __future__ import annotations

PLACEHOLDER = "..."


def parse_args_file(text: str) -> list[str]:
    args = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            args.append(line)
    return args


def format_args_file(args: list[str]) -> str:
    for arg in args:
        if "\n" in arg or "\r" in arg:
            raise ValueError(f"an argument in .args cannot contain a line break: {arg!r}")
        if not arg.strip() or arg.lstrip().startswith("#"):
            raise ValueError(f"an argument in .args cannot be blank or start with '#': {arg!r}")
    return "".join(arg + "\n" for arg in args)


def merge_args(defaults: list[str], user: list[str]) -> list[str]:
    if PLACEHOLDER not in defaults:
        return defaults + user
    at = defaults.index(PLACEHOLDER)
    return defaults[:at] + user + [a for a in defaults[at + 1:] if a != PLACEHOLDER]
