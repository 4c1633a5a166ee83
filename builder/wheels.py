"""The runtime's dependencies as wheels, fetched with pip for each target platform.

A bundle carries the exact versions the builder runs with (so what was tested
is what ships), for the host and for any platform named with --platform. The
downloads are kept in the user cache: a second build fetches nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ..errors import UserError

# What the runtime imports (tiktoken needs regex, its other dependencies only
# download encodings, which we never do; jinja2 needs MarkupSafe).
RUNTIME_DEPENDENCIES = ("numpy", "numba", "llvmlite", "tiktoken", "regex", "jinja2", "markupsafe")


class WheelError(UserError, RuntimeError):
    pass


def pinned_versions() -> dict[str, str]:
    pins = {}
    for name in RUNTIME_DEPENDENCIES:
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise WheelError(f"{name} is not installed in the builder's Python, so its wheel cannot be "
                             f"pinned; install llamazip's dependencies or build with --no-deps") from None
    return pins


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def fetch_wheels(cache_dir: Path, pins: dict[str, str], platform: str | None = None,
                 python_version: str | None = None) -> list[Path]:
    """Wheels for `pins` for the host (platform None) or the given platform tag."""
    python_version = python_version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    dest = cache_dir / f"py{python_version}-{platform or 'host'}"
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--no-deps", "--dest", str(dest)]
    if platform:
        abi = "cp" + python_version.replace(".", "")
        command += ["--platform", platform, "--python-version", python_version, "--implementation", "cp",
                    "--abi", abi, "--abi", "abi3", "--abi", "none"]
    command += [f"{name}=={version}" for name, version in pins.items()]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise WheelError(f"cannot fetch the runtime's wheels for {platform or 'this platform'} "
                         f"(Python {python_version}): {last}")
    wheels = []
    for name, version in pins.items():
        prefix = f"{_normalized(name)}-{version}-"
        found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix.lower()))
        if not found:
            raise WheelError(f"pip fetched no wheel of {name} {version} for {platform or 'this platform'}")
        wheels.append(found[-1])  # each target has its own folder: these all suit it
    return wheels


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("LLAMAZIP_CACHE") or os.path.join(base, "llamazip")) / "wheels"
