"""The runtime's dependencies as wheels, per platform and CPython version, fetched with pip.

A bundle carries the exact versions the builder runs with (so what was tested
is what ships), for every CPython version they publish wheels for on each
platform it targets. Where a pinned version has no wheel for some Python (numpy
2.4 dropped 3.10), that Python gets the newest earlier release that has one and
that the other pins accept (numba's numpy range); the build log and the
manifest say so.

Platforms have plain names (`linux-x86_64`, `macos-arm64`...), each meaning the
pip platform tags of that system from the most portable up: pip takes, per
dependency, the wheel that dependency actually publishes (manylinux2014 for one,
manylinux_2_28 for another). A pip tag is accepted as a platform of its own.

Downloads and what was resolved are kept in the user cache: a second build
with the same pins asks no index anything.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import UserError

# What the runtime imports (tiktoken needs regex, its other dependencies only
# download encodings, which we never do; jinja2 needs MarkupSafe).
RUNTIME_DEPENDENCIES = ("numpy", "numba", "llvmlite", "tiktoken", "regex", "jinja2", "markupsafe", "llguidance")

# What the bootstrap decompresses the wheels' large files with (wheel_pack.ZSTD), on the
# CPythons whose standard library has no `compression.zstd` (before 3.14). Stored deflated.
ZSTD_BACKPORT = "backports.zstd"
ZSTD_BACKPORT_FALLBACK = "1.8.0"  # pinned when the builder's own Python (3.14+) needs no backport
ZSTD_IN_STDLIB = (3, 14)

# The CPython versions a default build tries; each one any dependency lacks a wheel for is left out.
CANDIDATE_PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")


def _manylinux(arch: str) -> tuple[str, ...]:
    return (f"manylinux2014_{arch}",) + tuple(f"manylinux_2_{minor}_{arch}" for minor in range(17, 36))


def _macos(arch: str, first: tuple[int, int]) -> tuple[str, ...]:
    versions = [(10, minor) for minor in range(9, 16)] + [(major, 0) for major in range(11, 16)]
    return tuple(f"macosx_{major}_{minor}_{arch}" for major, minor in versions if (major, minor) >= first)


# Plain platform name -> pip platform tags, the most portable first (pip prefers earlier tags).
PLATFORMS: dict[str, tuple[str, ...]] = {
    "linux-x86_64": _manylinux("x86_64"),
    "linux-aarch64": _manylinux("aarch64"),
    "macos-arm64": _macos("arm64", (11, 0)),
    "macos-x86_64": _macos("x86_64", (10, 9)),
    "windows-x86_64": ("win_amd64",),
}
_PIP_TAG = re.compile(r"(manylinux\w*|musllinux_\d+_\d+_\w+|macosx_\d+_\d+_\w+|win_\w+|win32|linux_\w+)")
_PYTHON = re.compile(r"3\.(\d+)")


class WheelError(UserError, RuntimeError):
    pass


def host_platform() -> str | None:
    """This machine's plain platform name, or None for one not in PLATFORMS."""
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64" if not sys.platform == "darwin" else "arm64"}.get(machine, machine)
    system = {"linux": "linux", "darwin": "macos", "win32": "windows"}.get(sys.platform)
    name = f"{system}-{arch}"
    return name if name in PLATFORMS else None


def platform_tags(name: str) -> tuple[str, ...]:
    """The pip tags of a plain platform name, or the pip tag itself; WheelError for anything else."""
    if name in PLATFORMS:
        return PLATFORMS[name]
    if _PIP_TAG.fullmatch(name):
        return (name,)
    raise WheelError(f"unknown platform {name!r}: use one of {', '.join(PLATFORMS)} (or a pip platform tag "
                     f"such as manylinux_2_28_aarch64)")


def check_python(version: str) -> str:
    """`version` if it names a CPython 3 minor version (3.10, 3.13...); WheelError otherwise."""
    m = _PYTHON.fullmatch(version)
    if not m or int(m.group(1)) < 10:
        raise WheelError(f"--python {version}: give a CPython version as X.Y, 3.10 or newer (e.g. 3.13)")
    return version


def pinned_versions() -> dict[str, str]:
    pins = {}
    for name in RUNTIME_DEPENDENCIES:
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise WheelError(f"{name} is not installed in the builder's Python, so its wheel cannot be "
                             f"pinned; install llamazip's dependencies or build with --no-deps") from None
    return pins


def zstd_backport_pin() -> dict[str, str]:
    """The decompressor a zstd bundle carries for Pythons before 3.14: the builder's own
    version of it, or ZSTD_BACKPORT_FALLBACK on a builder whose standard library has zstd."""
    try:
        return {ZSTD_BACKPORT: metadata.version(ZSTD_BACKPORT)}
    except metadata.PackageNotFoundError:
        return {ZSTD_BACKPORT: ZSTD_BACKPORT_FALLBACK}


def pins_for(pins: dict[str, str], python: str) -> dict[str, str]:
    """The pins one CPython needs: the zstd backport only where the standard library lacks it."""
    minor = int(_PYTHON.fullmatch(python).group(1))
    return {n: v for n, v in pins.items() if n != ZSTD_BACKPORT or (3, minor) < ZSTD_IN_STDLIB}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_project_version(filename: str) -> tuple[str, str]:
    """(normalized project, version) from a wheel's file name."""
    parts = filename.split("-")
    return _normalized(parts[0]), parts[1]


def _accepted_ranges(pins: dict[str, str]) -> dict[str, list[str]]:
    """For each pinned project, the version specifiers the other pins require of it
    (numba: 'numpy<2.6,>=1.22'), from their installed metadata; marked requirements
    (extras, other Pythons) are left out."""
    ranges: dict[str, list[str]] = {}
    wanted = {_normalized(n): n for n in pins}
    for name in pins:
        for requirement in metadata.requires(name) or ():
            if ";" in requirement:
                continue
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^)]*)\)?\s*$", requirement)
            if m and _normalized(m.group(1)) in wanted and m.group(2).strip():
                ranges.setdefault(wanted[_normalized(m.group(1))], []).append(m.group(2).replace(" ", ""))
    return ranges


@dataclass
class Resolved:
    """The wheels of one (platform, Python): path per dependency, and the dependencies that have none."""
    platform: str
    python: str
    wheels: dict[str, Path]
    missing: list[str]

    @property
    def complete(self) -> bool:
        return not self.missing

    def versions(self) -> dict[str, str]:
        return {name: wheel_project_version(path.name)[1] for name, path in self.wheels.items()}


def _pip_download(dest: Path, requirements: list[str], tags: tuple[str, ...] | None, python: str) -> str | None:
    """Run pip download; None on success, else pip's last line of error."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--no-deps", "--dest", str(dest)]
    if tags is not None:
        abi = "cp" + python.replace(".", "")
        command += [a for tag in tags for a in ("--platform", tag)]
        command += ["--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
                    "--abi", "none"]
    result = subprocess.run(command + requirements, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode == 0:
        return None
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("ERROR")]
    return (errors or result.stderr.strip().splitlines() or ["pip failed"])[-1]


def _find(dest: Path, name: str, version: str | None = None) -> Path | None:
    found = sorted(p for p in dest.glob("*.whl") if wheel_project_version(p.name)[0] == _normalized(name)
                   and (version is None or wheel_project_version(p.name)[1] == version))
    return found[-1] if found else None


def resolve(cache_dir: Path, pins: dict[str, str], platform_name: str, python: str,
            host_tags: bool = False) -> Resolved:
    """The wheels of `pins` for one platform and Python: the pinned versions where they
    have a wheel, else the newest earlier one the other pins accept. `host_tags`:
    let pip use this machine's own tags (a host with no plain platform name)."""
    tags = None if host_tags else platform_tags(platform_name)
    dest = cache_dir / f"{platform_name}-py{python}"
    record = dest / "resolved.json"
    try:
        saved = json.loads(record.read_text())
        if saved.get("pins") == pins and all((dest / f).is_file() for f in saved["wheels"].values()):
            return Resolved(platform_name, python, {n: dest / f for n, f in saved["wheels"].items()},
                            saved["missing"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    dest.mkdir(parents=True, exist_ok=True)
    # One pip call for all of them when every pin has its wheel (the usual case)...
    if _pip_download(dest, [f"{n}=={v}" for n, v in pins.items()], tags, python) is None:
        wheels = {n: _find(dest, n, v) for n, v in pins.items()}
        missing = []
    else:  # ...else one per dependency, to learn which lack one, and look for an earlier release.
        ranges = _accepted_ranges(pins)
        wheels, missing = {}, []
        for name, version in pins.items():
            if _find(dest, name, version) or _pip_download(dest, [f"{name}=={version}"], tags, python) is None:
                wheels[name] = _find(dest, name, version)
                continue
            with tempfile.TemporaryDirectory(dir=dest) as scratch:
                spec = ",".join([f"<={version}"] + ranges.get(name, []))
                if _pip_download(Path(scratch), [name + spec], tags, python) is None and _find(Path(scratch), name):
                    earlier = _find(Path(scratch), name)
                    os.replace(earlier, dest / earlier.name)
                    wheels[name] = dest / earlier.name
                else:
                    missing.append(name)
    if any(path is None for path in wheels.values()):
        raise WheelError(f"pip fetched no wheel of {', '.join(n for n, p in wheels.items() if p is None)} "
                         f"for {platform_name} (Python {python})")
    temp = record.with_suffix(f".{os.getpid()}.partial")
    temp.write_text(json.dumps({"pins": pins, "wheels": {n: p.name for n, p in wheels.items()},
                                "missing": missing}, indent=1))
    os.replace(temp, record)
    return Resolved(platform_name, python, wheels, missing)


def resolve_all(cache_dir: Path, pins: dict[str, str], platforms: list[str], pythons: list[str],
                log=lambda msg: None) -> list[Resolved]:
    """Every (platform, Python) a bundle carries. Without `pythons`, every candidate
    CPython is tried and those some dependency lacks are left out (logged); a Python
    asked for by name must be complete on every platform (WheelError naming what lacks
    a wheel). `platforms` holds plain names or pip tags; the host's comes first."""
    host = host_platform()
    targets = list(dict.fromkeys([host or "host"] + [p for p in platforms]))
    for name in targets:
        if name != "host":
            platform_tags(name)  # an unknown name is an error before anything is fetched
    asked = [check_python(v) for v in dict.fromkeys(pythons)]
    builder_python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    chosen = []
    for name in targets:
        if name == "host":  # a machine with no plain name: its own tags, the builder's Python
            candidates = asked or [builder_python]
        else:
            candidates = asked or list(CANDIDATE_PYTHONS)
        covered = []
        for python in candidates:
            resolved = resolve(cache_dir, pins_for(pins, python), name, python, host_tags=name == "host")
            if resolved.complete:
                chosen.append(resolved)
                covered.append(python)
                earlier = {n: v for n, v in resolved.versions().items() if v != pins[n]}
                if earlier:
                    log(f"  {name}, Python {python}: " + ", ".join(f"{n} {v}" for n, v in earlier.items())
                        + " (the pinned versions publish no wheel for it)")
            elif asked:
                raise WheelError(f"no wheel of {', '.join(f'{n} {pins[n]}' for n in resolved.missing)} "
                                 f"(nor an earlier release) for Python {python} on {name}")
            else:
                log(f"  {name}, Python {python}: left out (no wheel of {', '.join(resolved.missing)})")
        if not covered:
            raise WheelError(f"{name}: no CPython version has wheels of every runtime dependency there")
        log(f"wheels for {name}: Python {', '.join(covered)}")
    return chosen


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("LLAMAZIP_CACHE") or os.path.join(base, "llamazip")) / "wheels"
