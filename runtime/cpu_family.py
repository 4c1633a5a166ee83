"""CPU families: the targets the kernels are compiled for, so that compiled kernels can ship.

numba keys its on-disk cache by the CPU name and features it compiles for, and
by default that is the host's own model ("emeraldrapids", "znver3"): a cache
filled on one machine serves only CPUs of the very same model. A family is a
generic LLVM CPU level plus the few features the kernels choose their
instructions by (simd.py reads them back from NUMBA_CPU_FEATURES): every CPU
that has them runs its code, so a bundle can carry its model's kernels compiled
for each family and a first run loads them instead of compiling.

The runtime compiles for the best family the host has, bundled or not (so
`llamazip run` and a bundle run the same code: compiled for the host's own
model, SmolLM2 answered a test prompt differently), or for the host itself when
none fits (or LLAMAZIP_CPU_FAMILY=host, or the user set NUMBA_CPU_NAME).
Decode cost of the generic target against the host's own model, SmolLM2 on an
Emerald Rapids Xeon: 1.17x the CPU time per token, nearly all of it in the Q4
and Q8_0 matvecs' scalar float16 conversions (the host has AVX-512 FP16, the
family does not; see simd.f16_two_pairs); with those converted as vectors,
1.03x (same minute, alternating processes). A family's target exported by
apply() and inherited by a child process counts as that family, not as a
user's target.
Must run before numba is imported: numba reads its target from the environment
once.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass

# x86-64 levels as LLVM implies them (psABI's x86-64-v2/v3/v4), in LLVM's feature names.
X86_64_V3 = ("sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "cx16", "sahf", "avx", "avx2", "bmi", "bmi2", "f16c",
       "fma", "lzcnt", "movbe", "xsave")
X86_64_V4 = X86_64_V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")


@dataclass(frozen=True)
class Family:
    name: str
    cpu: str  # an LLVM CPU name that implies no feature beyond `features`
    features: tuple[str, ...]  # every feature the family's code may use; the host needs them all
    tuning: tuple[str, ...] = ()  # LLVM tuning switches ("+name"/"-name"), not CPU features

    def environment(self) -> dict[str, str]:
        switches = [f"+{f}" for f in self.features] + list(self.tuning)
        return {"NUMBA_CPU_NAME": self.cpu, "NUMBA_CPU_FEATURES": ",".join(switches)}


# Best first. AVX-512 with VNNI (512-bit int8 dot products) and VBMI (AQLM's byte
# tables): Ice Lake server and later Xeons, Zen 4 and later. AVX2 with FMA: every
# x86-64 CPU since Haswell (2013) and Zen 1.
# The AVX-512 family vectorises numba's own loops 512 bits wide: LLVM's x86-64-v4
# tuning prefers 256 (for the clock drops of 2017's Skylake-X, a CPU this family
# leaves out), which held the prompt kernel's float tiles (matmul.tiles_4x4) to
# 41 GFLOP/s on one Emerald Rapids thread against 95 at 512 bits.
FAMILIES: dict[str, tuple[Family, ...]] = {
    "x86_64": (Family("x86-64-avx512-vnni-vbmi", "x86-64-v4", X86_64_V4 + ("avx512vnni", "avx512vbmi"),
                      tuning=("-prefer-256-bit",)),
               Family("x86-64-avx2-fma", "x86-64-v3", X86_64_V3)),
    "aarch64": (Family("aarch64-neon", "generic", ("neon",)),),
}

HOST = "host"  # LLAMAZIP_CPU_FAMILY=host: compile for this very CPU (numba's default)


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_features() -> set[str]:
    import llvmlite.binding as llvm
    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def fitting(features: set[str], arch: str | None = None) -> list[Family]:
    """The families a CPU with these features runs, best first."""
    return [f for f in FAMILIES.get(arch or machine(), ()) if set(f.features) <= features]


def by_name(name: str) -> Family | None:
    return next((f for families in FAMILIES.values() for f in families if f.name == name), None)


def chosen() -> Family | None:
    """The family this process compiles for, or None for the host's own model."""
    wanted = os.environ.get("LLAMAZIP_CPU_FAMILY", "")
    if wanted == HOST:
        return None
    try:
        fits = fitting(host_features())
    except Exception:  # no llvmlite: the numpy kernels, nothing is compiled
        return None
    if wanted:
        # A family asked for by name (the builder compiles each): only one this CPU runs.
        # A known family this CPU cannot run stands for a CPU no family fits (compiled here).
        if by_name(wanted) is None:
            known = ", ".join([f.name for families in FAMILIES.values() for f in families] + [HOST])
            print(f"llamazip: LLAMAZIP_CPU_FAMILY={wanted} names no CPU family (known: {known}); ignored",
                  file=sys.stderr)
        else:
            return next((f for f in fits if f.name == wanted), None)
    target = {key: os.environ.get(key, "") for key in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    if any(target.values()):
        # A family's target exported by apply() in a parent llamazip process (a test run,
        # a server's helper) is that family; any other target is the user's own, and wins.
        return next((f for f in fits if f.environment() == target), None)
    return fits[0] if fits else None


def apply() -> Family | None:
    """Point numba at the chosen family (before numba is imported); returns it."""
    family = chosen()
    if family is not None:
        os.environ.update(family.environment())
    return family
