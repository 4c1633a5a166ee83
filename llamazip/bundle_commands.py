"""`llamazip build`, `llamazip info` and `llamazip verify`."""

from __future__ import annotations

import argparse
import hashlib
import shlex
import signal
import sys
import zipfile
from pathlib import Path

from .bundle_format import MANIFEST, Bundle, parse_args_file
from .errors import UserError

# --quantize schemes: builder/quantize.py's (its docstring states which tensors keep more precision), and AQLM's 2 bits
# SmolLM2: 19 min on 2 cores with bfloat16 products (AMX), 26 with everything else; ~37 with float32 ones.
DEFAULT_FINETUNE_STEPS = 800
QUANTIZE_CHOICES = ("keep", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q6_k", "aqlm-2x8")


def add_parsers(commands) -> None:
    build = commands.add_parser("build", help="build a model into one executable bundle",
                                description="Write OUT: a launcher plus a zip holding the model, "
                                            "the runtime and its dependencies.")
    build.add_argument("-m", "--model", required=True,
                       help="a .gguf model, a bundle, a Hugging Face model folder (config.json, tokenizer.json, "
                            "*.safetensors) or a zip of one")
    build.add_argument("-q", "--quantize", default="keep", choices=QUANTIZE_CHOICES, metavar="SCHEME",
                       help="store the weights as SCHEME: " + ", ".join(QUANTIZE_CHOICES) + " (default: keep, "
                            "the input's types); norms and biases stay F32, low-bit schemes keep the embedding "
                            "and output head at Q6_K")
    build.add_argument("--calibration", metavar="FILE", help="text to calibrate --quantize aqlm-2x8 on")
    build.add_argument("--seed", type=int, default=0, help="random seed of --quantize aqlm-2x8 (default: 0)")
    build.add_argument("--finetune", type=int, nargs="?", default=0, const=DEFAULT_FINETUNE_STEPS, metavar="STEPS",
                       help="after --quantize aqlm-2x8, distil the original model into the quantized one in "
                            f"STEPS steps of 512 calibration tokens (default without STEPS: {DEFAULT_FINETUNE_STEPS}; "
                            "a 135M model on 2 cores: ~1.5 s a step with AMX, ~2.3 s without; needs torch: pip install "
                            "'llamazip[finetune]')")
    build.add_argument("-o", "--output", required=True, help="the bundle to write (e.g. model.llamazip)")
    defaults = build.add_mutually_exclusive_group()
    defaults.add_argument("--args", help='default arguments, as a shell would split them; "..." marks '
                                         "where the user's arguments go (default: appended)")
    defaults.add_argument("--args-file", help="a .args file: one argument per line, # comments")
    build.add_argument("--name", default="", help="the bundle's name (default: the model file's)")
    build.add_argument("--platform", action="append", default=[], metavar="NAME",
                       help="also carry the runtime's wheels for this platform: linux-x86_64, linux-aarch64, "
                            "macos-arm64, macos-x86_64, windows-x86_64 (or a pip platform tag); repeatable")
    build.add_argument("--python", action="append", default=[], metavar="X.Y",
                       help="carry wheels for this CPython version, on every platform (default: every "
                            "version the runtime's dependencies publish wheels for); repeatable")
    build.add_argument("--no-deps", action="store_true",
                       help="carry no wheels: the target python must have numpy, numba and tiktoken")
    build.add_argument("--wheel-compression", choices=("zstd", "deflate"), default="zstd",
                       help="how the wheels' large files are stored: zstd (default: about 30%% smaller; "
                            "decompressed by Python 3.14's compression.zstd or the backports.zstd wheel the "
                            "bundle carries) or deflate (as the wheels hold them: a bundle that needs nothing "
                            "but zlib)")
    build.add_argument("--no-kernels", action="store_true",
                       help="ship no compiled kernels (by default the model's kernels are compiled for the CPU "
                            "families this machine runs, for the builder's Python, so a first run starts at "
                            "once); a first run then compiles them on its host")
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
    from llamazip.builder.model_input import ZIP_READ_ERRORS, prepared_model
    from llamazip.builder.wheels import check_python, platform_tags
    from llamazip.runtime.model import Model
    from llamazip.runtime.model_file import open_model
    from llamazip.runtime.tokenizer import Tokenizer
    from llamazip.zipalign.writer import check_alignment

    model = Path(args.model)
    output = Path(args.output)
    if not model.exists():
        raise UserError(f"{model}: no such file or directory")
    if output.resolve() == model.resolve():
        raise UserError("the output would overwrite the model")
    if not output.parent.is_dir():
        raise UserError(f"cannot write {output}: no directory {output.parent}")
    check_alignment(args.align)
    for name in args.platform:  # before any model is converted
        platform_tags(name)
    for version in args.python:
        check_python(version)
    if args.no_deps and (args.platform or args.python):
        raise UserError("--no-deps carries no wheels: it cannot take --platform or --python")
    if (args.calibration or args.seed or args.finetune) and args.quantize != "aqlm-2x8":
        raise UserError("--calibration, --seed and --finetune apply only to --quantize aqlm-2x8")
    if args.finetune < 0:
        raise UserError("--finetune takes a number of steps, 0 or more")
    calibration_text = None
    if args.calibration:
        try:
            calibration_text = Path(args.calibration).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {args.calibration}: {getattr(e, 'strerror', None) or e}") from None
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

    # `kill` (SIGTERM) unwinds like Ctrl-C, so the partial output and temporary files are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        with prepared_model(model, output, args.quantize, calibration_text=calibration_text,
                            seed=args.seed, finetune_steps=args.finetune, log=log) as gguf_path:
            # Refuse a model this runtime cannot run before writing anything.
            gguf = open_model(gguf_path)
            Tokenizer.from_metadata(gguf.metadata)
            Model(gguf, n_ctx=8)
            options = BuildOptions(model=gguf_path, output=output, args=default_args, name=args.name,
                                   platforms=args.platform, python_versions=args.python,
                                   with_deps=not args.no_deps, kernels=not args.no_kernels,
                                   wheel_compression=args.wheel_compression,
                                   alignment=args.align)
            build_bundle(options, log=log)
    except UserError:
        raise
    # What the standard library raises on a damaged input zip or a failed write.
    except ZIP_READ_ERRORS as e:
        raise UserError(f"{model}: cannot read the zip: {e}") from None
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    print(f"built {output} ({output.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from llamazip.runtime.model_file import open_model

    bundle = Bundle(args.bundle)
    manifest = bundle.require_manifest()
    print(f"bundle: {args.bundle}\nname: {manifest.get('name')}\nllamazip: {manifest.get('llamazip')}")
    print(f"dependencies: {', '.join(f'{k} {v}' for k, v in manifest.get('dependencies', {}).items()) or 'none'}")
    print(f"runs on: {covered_platforms(manifest) or 'a python3 that has the dependencies (no wheels carried)'}")
    print(f"\n{'offset':>12} {'align':>7} {'method':>8} {'size':>12}  name")
    for m in bundle.members.values():
        print(f"{m.data_offset:>12} {m.alignment:>7} {'stored' if m.stored else 'deflated':>8} {m.size:>12}  {m.name}")
    gguf = open_model(args.bundle)
    print(f"\nmodel: {manifest.get('model')}")
    for key in ("general.architecture", "general.name", "general.size_label", "general.file_type"):
        if key in gguf.metadata:
            print(f"  {key} = {gguf.metadata[key]}")
    print(f"  tensors = {len(gguf.tensors)}")
    defaults = bundle.default_args()
    print("\n.args:" + ("".join(f"\n  {a}" for a in defaults) or " (none)"))
    return 0


def covered_platforms(manifest: dict) -> str:
    """"linux-x86_64 (Python 3.10, 3.11), macos-arm64 (Python 3.13)" from the manifest's `covers`,
    with each Python whose dependency versions differ from the pins noted."""
    covers = manifest.get("covers")
    pins = manifest.get("dependencies") or {}
    if not isinstance(covers, dict):
        return ""
    described = []
    for name, pythons in covers.items():
        versions = []
        for python in sorted(pythons, key=lambda v: tuple(int(p) for p in v.split(".") if p.isdigit())):
            earlier = {dep: v for dep, v in (pythons[python] or {}).items() if pins.get(dep) not in (None, v)}
            versions.append(python + (f" [{', '.join(f'{d} {v}' for d, v in earlier.items())}]" if earlier else ""))
        described.append(f"{name} (Python {', '.join(versions)})")
    return ", ".join(described)


def _verify(args: argparse.Namespace) -> int:
    bundle = Bundle(args.bundle)
    expected = bundle.require_manifest().get("members", {})
    present = set(bundle.members) - {MANIFEST}
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
