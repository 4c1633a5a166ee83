"""What `llamazip build -m` accepts, made into one GGUF file to bundle:

- a .gguf file (used as it is, or re-quantized);
- a llamazip bundle (its GGUF member is copied out);
- a Hugging Face model folder (config.json, tokenizer.json, *.safetensors);
- a zip of such a folder (any compression zipfile reads, Deflate64 too), read
  member by member without unpacking it to disk.

Files made on the way live in a temporary directory beside the output and are
removed when the build ends, whether it succeeds or not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import zipfile_deflate64  # noqa: F401  (teaches zipfile to read Deflate64 members)

from ..errors import UserError
from ..runtime.gguf import GGUF_MAGIC
from .hf_convert import ConvertError, Shard, StderrProgress, convert_checkpoint
from .safetensors_reader import SafetensorsFile, SafetensorsStream

INDEX_FILE = "model.safetensors.index.json"
AQLM_SCHEMES = ("aqlm-2x8",)
# Errors from reading a damaged zip member (bad CRC, truncated or corrupt data).
ZIP_READ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError)


class InputError(UserError, ValueError):
    """A -m that is not a model we can build; the message is one line."""


def _json(text: str | None, name: str, where: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConvertError(f"{where}: {name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{where}: {name} is not a JSON object")
    return value


def _shard_order(names: list[str], index: dict | None, where: str) -> list[str]:
    """The shards to read: those the index names, else every *.safetensors, sorted."""
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{where}: {INDEX_FILE} has no weight_map")
        wanted = sorted(set(map(str, weight_map.values())))
        missing = [n for n in wanted if n not in names]
        if missing:
            raise ConvertError(f"{where}: shard {missing[0]} named in {INDEX_FILE} is missing")
        return wanted
    return sorted(n for n in names if n.endswith(".safetensors"))


class FolderSource:
    """A Hugging Face model folder on disk; shards are memory-mapped."""

    def __init__(self, path: Path):
        self.path, self.name, self.stem = path, str(path), path.name

    def read_text(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise ConvertError(f"{self.path / name}: cannot read: {getattr(e, 'strerror', None) or e}") from None

    def read_json(self, name: str) -> dict | None:
        return _json(self.read_text(name), name, self.name)

    def shard_names(self) -> list[str]:
        return _shard_order([p.name for p in self.path.iterdir() if p.is_file()],
                            self.read_json(INDEX_FILE), self.name)

    def open_shard(self, name: str) -> Shard:
        return SafetensorsFile(self.path / name)


class ZipSource:
    """A zip holding a Hugging Face model folder (at its root or in one folder);
    shards are streamed from their members one tensor at a time."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, folder: str):
        self.path, self.zf, self.folder = path, zf, folder
        self.name, self.stem = str(path), path.stem

    def _member(self, name: str) -> str:
        return f"{self.folder}{name}"

    def read_text(self, name: str) -> str | None:
        member = self._member(name)
        if member not in self.zf.NameToInfo:
            return None
        try:
            return self.zf.read(member).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConvertError(f"{self.name}: {member} is not UTF-8 text ({e.reason})") from None

    def read_json(self, name: str) -> dict | None:
        return _json(self.read_text(name), name, self.name)

    def shard_names(self) -> list[str]:
        names = [n[len(self.folder):] for n in self.zf.namelist()
                 if n.startswith(self.folder) and "/" not in n[len(self.folder):]]
        return _shard_order(names, self.read_json(INDEX_FILE), self.name)

    def open_shard(self, name: str) -> Shard:
        info = self.zf.getinfo(self._member(name))
        return SafetensorsStream(self.zf.open(info), info.file_size, f"{self.name}:{info.filename}")


def _model_folder(zf: zipfile.ZipFile, path: Path) -> str | None:
    """The folder (with its trailing /) inside the zip that holds config.json; None if none."""
    folders = sorted({str(PurePosixPath(n).parent) for n in zf.namelist()
                      if PurePosixPath(n).name == "config.json" and not n.startswith("__MACOSX/")},
                     key=lambda f: (f.count("/"), f))
    if not folders:
        return None
    if len(folders) > 1 and folders[0].count("/") == folders[1].count("/") and folders[0] != ".":
        raise InputError(f"{path}: the zip holds several model folders ({folders[0]}, {folders[1]})")
    return "" if folders[0] == "." else folders[0] + "/"


def _copy_member(zf: zipfile.ZipFile, name: str, dst: Path) -> None:
    with zf.open(name) as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 22)


class _WorkDir:
    """A temporary directory beside the output (the same file system, so no copy
    across disks), made on first use: a .gguf built as it is needs none."""

    def __init__(self, near: Path):
        self._near, self._path = near, None

    def __call__(self) -> Path:
        if self._path is None:
            # `.OUT.PID.*.work`: the name builder/bundle.py's remove_stale_partials looks for after a killed build
            self._path = Path(tempfile.mkdtemp(prefix=f".{self._near.name}.{os.getpid()}.", suffix=".work",
                                               dir=self._near.parent))
        return self._path

    def remove(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _convert(source, dst: Path, scheme: str, log: Callable[[str], None]) -> None:
    """Convert a checkpoint; a published AQLM one keeps its codes (aqlm_import)."""
    from .aqlm_import import import_checkpoint, is_aqlm_checkpoint

    log(f"converting {source.name}")
    with StderrProgress("converting") as progress:
        if is_aqlm_checkpoint(source.read_json("config.json") or {}):
            import_checkpoint(source, dst, lambda without, path: convert_checkpoint(without, path, scheme, progress))
        else:
            convert_checkpoint(source, dst, scheme, progress)


def _to_gguf(model: Path, work: _WorkDir, scheme: str, log: Callable[[str], None]) -> tuple[Path, bool]:
    """A GGUF for `model`: (path, already quantized under `scheme`)."""
    convert_scheme = "keep" if scheme in AQLM_SCHEMES else scheme
    if model.is_dir():
        if not (model / "config.json").is_file():
            raise InputError(f"{model}: no config.json: not a Hugging Face model folder")
        dst = work() / f"{model.name}.gguf"
        _convert(FolderSource(model), dst, convert_scheme, log)
        return dst, True
    try:
        if _is_gguf(model):
            return model, False
        if not zipfile.is_zipfile(model):
            raise InputError(f"{model}: not a GGUF file, a model folder or a zip of one")
    except OSError as e:
        raise InputError(f"{model}: cannot read: {e.strerror or e}") from None
    try:
        with zipfile.ZipFile(model) as zf:
            folder = _model_folder(zf, model)
            if folder is None:
                ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
                if len(ggufs) != 1:
                    raise InputError(f"{model}: the zip holds no model (no config.json and "
                                     f"{'no' if not ggufs else 'several'} .gguf files)")
                dst = work() / PurePosixPath(ggufs[0]).name
                log(f"copying {ggufs[0]} out of {model}")
                _copy_member(zf, ggufs[0], dst)
                return dst, False
            dst = work() / f"{model.stem}.gguf"
            _convert(ZipSource(model, zf, folder), dst, convert_scheme, log)
            return dst, True
    except ZIP_READ_ERRORS as e:
        raise InputError(f"{model}: cannot read the zip: {e}") from None


@contextmanager
def prepared_model(model: Path, output: Path, scheme: str = "keep", *, calibration_text: str | None = None,
                   seed: int = 0, finetune_steps: int = 0, log: Callable[[str], None] = print) -> Iterator[Path]:
    """Yield a GGUF of `model` quantized under `scheme`; any file made for it is
    removed when the block ends."""
    work = _WorkDir(output)
    try:
        gguf_path, quantized = _to_gguf(model, work, scheme, log)
        if scheme in AQLM_SCHEMES:
            from .aqlm_quantize import quantize_gguf_aqlm

            dst = work() / "aqlm" / f"{gguf_path.stem}.gguf"  # the same file name, for the bundle's member name
            dst.parent.mkdir()
            log(f"quantizing to {scheme}" + ("" if finetune_steps else
                " (without --finetune: perplexity ~2x higher than with it; it needs torch, "
                "pip install 'llamazip[finetune]')"))
            quantize_gguf_aqlm(gguf_path, dst, calibration_text=calibration_text, seed=seed,
                               finetune_steps=finetune_steps)
            gguf_path = dst
        elif scheme != "keep" and not quantized:
            from .requantize import requantize_gguf

            dst = work() / "requantized" / f"{gguf_path.stem}.gguf"
            dst.parent.mkdir()
            log(f"quantizing to {scheme}")
            with StderrProgress("quantizing") as progress:
                requantize_gguf(gguf_path, dst, scheme, progress)
            gguf_path = dst
        yield gguf_path
    finally:
        work.remove()
