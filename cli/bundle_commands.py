"""`llamazip build`, `llamazip info` and `llamazip verify`."""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import signal
import sys
import zipfile
from pathlib import Path

from .args_file import parse_args_file
from .errors import UserError


def add_parsers(commands) -> None:
    build = commands.add_parser("build", help="build a model into one executable bundle",
                                description="Write OUT: a launcher plus a zip holding the model, "
                                            "the runtime and its dependencies.")
    build.add_argument("-m", "--model", required=True, help="a .gguf model")
    build.add_argument("-o", "--output", required=True, help="the bundle to write (e.g. model.llamazip)")
    defaults = build.add_mutually_exclusive_group()
    defaults.add_argument("--args", help='default arguments, as a shell would split them; "..." marks '
                                         "where the user's arguments go (default: appended)")
    defaults.add_argument("--args-file", help="a .args file: one argument per line, # comments")
    build.add_argument("--name", default="", help="the bundle's name (default: the model file's)")
    build.add_argument("--platform", action="append", default=[], metavar="TAG",
                       help="also carry wheels for this pip platform tag (e.g. manylinux_2_28_aarch64, "
                            "macosx_11_0_arm64); repeatable")
    build.add_argument("--python", action="append", default=[], metavar="X.Y",
                       help="Python versions to fetch --platform wheels for (default: this one); repeatable")
    build.add_argument("--no-deps", action="store_true",
                       help="carry no wheels: the target python must have numpy, numba and tiktoken")
    build.add_argument("-a", "--align", type=int, default=4096, help="weights alignment in bytes (power of two)")
    build.set_defaults(handler=_build)

    info = commands.add_parser("info", help="show a bundle's members, model and default arguments")
    info.add_argument("bundle")
    info.set_defaults(handler=_info)

    verify = commands.add_parser("verify", help="check every member of a bundle against its MANIFEST.json")
    verify.add_argument("bundle")
    verify.set_defaults(handler=_verify)


def _build(args: argparse.Namespace) -> int:
    from llamazip.builder.bundle import BuildOptions, build_bundle
    from llamazip.builder.wheels import WheelError
    from llamazip.runtime.model import Model
    from llamazip.runtime.model_file import open_model
    from llamazip.runtime.tokenizer import Tokenizer
    from llamazip.zipalign.writer import check_alignment

    model = Path(args.model)
    output = Path(args.output)
    if output.resolve() == model.resolve():
        raise UserError("the output would overwrite the model")
    if not output.parent.is_dir():
        raise UserError(f"cannot write {output}: no directory {output.parent}")
    check_alignment(args.align)
    # Refuse a model this runtime cannot run before writing anything.
    gguf = open_model(model)
    Tokenizer.from_metadata(gguf.metadata)
    Model(gguf, n_ctx=8)
    if args.args_file:
        try:
            default_args = parse_args_file(Path(args.args_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {args.args_file}: {getattr(e, 'strerror', None) or e}") from None
    else:
        try:
            default_args = shlex.split(args.args or "")
        except ValueError as e:
            raise UserError(f"--args: {e}") from None

    # `kill` (SIGTERM) unwinds like Ctrl-C, so the partial output is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    options = BuildOptions(model=model, output=output, args=default_args, name=args.name,
                           platforms=args.platform, python_versions=args.python,
                           with_deps=not args.no_deps, alignment=args.align)
    try:
        build_bundle(options)
    except WheelError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    print(f"built {output} ({output.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def _read_manifest(bundle: str) -> tuple[dict, list]:
    from llamazip.zipalign.reader import BundleFormatError, read_members

    try:
        members = read_members(bundle)
        with zipfile.ZipFile(bundle) as zf:
            manifest = json.loads(zf.read("MANIFEST.json"))
    except BundleFormatError as e:
        raise UserError(str(e)) from None
    except (KeyError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{bundle}: not a llamazip bundle (MANIFEST.json: {e})") from None
    return manifest, members


def _info(args: argparse.Namespace) -> int:
    from llamazip.runtime.model_file import open_model
    from llamazip.zipalign.writer import STORED

    manifest, members = _read_manifest(args.bundle)
    print(f"bundle: {args.bundle}\nname: {manifest.get('name')}\nllamazip: {manifest.get('llamazip')}")
    print(f"dependencies: {', '.join(f'{k} {v}' for k, v in manifest.get('dependencies', {}).items()) or 'none'}")
    print(f"\n{'offset':>12} {'align':>7} {'method':>8} {'size':>12}  name")
    for m in members:
        method = "stored" if m.compress_type == STORED else "deflated"
        print(f"{m.data_offset:>12} {m.alignment:>7} {method:>8} {m.size:>12}  {m.name}")
    gguf = open_model(args.bundle)
    print(f"\nmodel: {manifest.get('model')}")
    for key in ("general.architecture", "general.name", "general.size_label", "general.file_type"):
        if key in gguf.metadata:
            print(f"  {key} = {gguf.metadata[key]}")
    print(f"  tensors = {len(gguf.tensors)}")
    with zipfile.ZipFile(args.bundle) as zf:
        args_text = zf.read(".args").decode("utf-8") if ".args" in zf.namelist() else ""
    print("\n.args:" + ("".join(f"\n  {a}" for a in parse_args_file(args_text)) or " (none)"))
    return 0


def _verify(args: argparse.Namespace) -> int:
    manifest, members = _read_manifest(args.bundle)
    expected = manifest.get("members", {})
    present = {m.name for m in members} - {"MANIFEST.json"}
    bad = sorted(present - set(expected))
    for name in bad:
        print(f"FAILED {name}: not listed in MANIFEST.json")
    with zipfile.ZipFile(args.bundle) as zf:
        for name, entry in sorted(expected.items()):
            if name not in present:
                print(f"FAILED {name}: missing")
                bad.append(name)
                continue
            digest = hashlib.sha256()
            try:
                with zf.open(name) as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
            except (zipfile.BadZipFile, OSError, EOFError) as e:  # a CRC mismatch, a short read
                print(f"FAILED {name}: {e}")
                bad.append(name)
                continue
            if digest.hexdigest() != entry.get("sha256"):
                print(f"FAILED {name}: sha256 differs from MANIFEST.json")
                bad.append(name)
            else:
                print(f"ok {name}")
    if bad:
        raise UserError(f"{args.bundle}: {len(bad)} member(s) failed verification: {', '.join(bad)}")
    return 0
