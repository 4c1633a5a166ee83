"""The `llamazip` command: run a model, build and inspect bundles, align zips.

A bundle starts here too, through `bundle_main`: its `.args` merged with the
user's arguments become the arguments of `run`, with the bundle as the model.

Errors a user can cause print one `error: ...` line on stderr and exit 1;
stdout carries only generated text.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from typing import TYPE_CHECKING, NoReturn

# One thread pool per phase: numba's kernels own the cores, so BLAS (used only for
# small attention products) stays single-threaded. Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from .errors import UserError

DEFAULT_DRAFT = 8  # tokens guessed from the context per pass (runtime/prompt_lookup.py)

if TYPE_CHECKING:  # the runtime loads numpy and numba: imported only by the commands that run a model
    from llamazip.runtime.engine import Engine
    from llamazip.runtime.options import RunOptions


def _add_run_parser(commands) -> None:
    run = commands.add_parser(
        "run", help="run a model: one prompt, a terminal chat, or an HTTP server",
        description="With -p or -f, continue that text (the generated text goes to stdout); with --server, "
                    "serve an OpenAI-compatible API and a chat page; otherwise chat in the terminal "
                    "(or continue what stdin holds when it is not a terminal).")
    run.add_argument("-m", "--model", required=True, help="a .gguf file or a llamazip bundle")
    prompt = run.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt", help="the text to continue")
    prompt.add_argument("-f", "--file", help="read the prompt from this file")
    run.add_argument("-n", "--n-predict", type=int, default=-1, metavar="N",
                     help="tokens to generate (-1: until the model stops or the context is full)")
    run.add_argument("-c", "--ctx-size", type=int, default=0, metavar="N",
                     help="context size in tokens (0: the model's, at most 4096)")
    run.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                     help="CPU threads (default: all cores, fewer while other programs keep them busy)")
    run.add_argument("--temp", type=float, default=0.8, help="temperature; 0 picks the likeliest token")
    run.add_argument("--top-k", type=int, default=40, help="keep the K likeliest tokens (0: off)")
    run.add_argument("--top-p", type=float, default=0.95, help="keep the likeliest tokens that sum to P (1: off)")
    run.add_argument("--min-p", type=float, default=0.05, help="drop tokens below P times the likeliest (0: off)")
    run.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty for recent tokens (1: off)")
    run.add_argument("--repeat-last-n", type=int, default=64, help="how many recent tokens to penalize")
    run.add_argument("--seed", type=int, default=None, help="random seed (same seed, same text)")
    run.add_argument("-s", "--system-prompt", default=None, help="the system message of chats")
    run.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use instead of the model's")
    constraint = run.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="FILE|JSON",
                            help="answers must be JSON valid against this schema (a file, or the schema itself)")
    constraint.add_argument("--grammar-file", metavar="FILE",
                            help="answers must follow this grammar (llama.cpp's GBNF, or Lark)")
    run.add_argument("--server", action="store_true", help="serve the OpenAI-compatible HTTP API and chat page")
    run.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    run.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer KEY) on the API")
    run.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                     help="largest request body the server takes, in bytes (default 1 MiB)")
    run.add_argument("--max-tokens-limit", type=int, default=0, metavar="N",
                     help="most tokens one server request may generate (default 0: up to the context size)")
    run.add_argument("--pooling", choices=("mean", "cls", "last"), default="mean",
                     help="how /v1/embeddings pools a text's last hidden states (default mean)")
    run.add_argument("--verify", action="store_true",
                     help="check the bundle's weights against the sha256 in its MANIFEST.json before loading")
    run.add_argument("-np", "--parallel", type=int, default=None, metavar="N",
                     help="requests the server generates at once, each in its own slot of the context "
                          "(default 4; the terminal chat and -p use 1)")
    run.add_argument("--draft", type=int, default=DEFAULT_DRAFT, metavar="N",
                     help="guess up to N tokens from the context and check them in one pass (prompt lookup: "
                          "same text, fewer passes where the answer repeats its context); the server's slots "
                          f"guess only while one request decodes alone (default {DEFAULT_DRAFT}; 0: off)")
    run.add_argument("--queue-limit", type=int, default=64, metavar="N",
                     help="requests that may wait for a free slot; more are refused with 503 (default 64)")
    run.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    run.add_argument("--nobrowser", action="store_true", help="do not open the chat page in a browser")
    run.add_argument("--verbose", action="store_true", help="print timings to stderr")
    run.set_defaults(handler=_run)


def _run_options(args: argparse.Namespace) -> RunOptions:
    """The one options object the chat, -p and the server read, checked."""
    from llamazip.runtime.engine import GenerationRequest
    from llamazip.runtime.options import RunOptions, ServerOptions
    from llamazip.runtime.prompt_lookup import MAX_DRAFT
    from llamazip.runtime.sampling import SamplingParams

    if args.threads is not None and args.threads < 1:
        raise UserError("-t/--threads must be at least 1")
    if args.ctx_size < 0:
        raise UserError("-c/--ctx-size must be >= 0")
    if args.n_predict < -1:
        raise UserError("-n/--n-predict must be -1 (no limit) or >= 0")
    if not 0 <= args.port <= 65535:
        raise UserError("--port must be in 0..65535")
    if args.max_body_bytes < 1:
        raise UserError("--max-body-bytes must be at least 1")
    if args.max_tokens_limit < 0:
        raise UserError("--max-tokens-limit must be >= 0 (0: no limit but the context)")
    if args.parallel is not None and args.parallel < 1:
        raise UserError("-np/--parallel must be at least 1")
    if args.queue_limit < 0:
        raise UserError("--queue-limit must be >= 0")
    if not 0 <= args.draft <= MAX_DRAFT:
        raise UserError(f"--draft must be in 0..{MAX_DRAFT}")
    sampling = SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)
    try:
        sampling.check()
    except ValueError as e:
        raise UserError(str(e)) from None
    server = ServerOptions(host=args.host, port=args.port, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                           max_tokens_limit=args.max_tokens_limit, pooling=args.pooling,
                           open_browser=not args.nobrowser, parallel=args.parallel or 4,
                           queue_limit=args.queue_limit, metrics=args.metrics)
    request = GenerationRequest(sampling=sampling, max_tokens=args.n_predict, grammar=_grammar(args),
                                draft=args.draft)
    return RunOptions(request=request,
                      system_prompt=args.system_prompt, server=server, verbose=args.verbose)


def _grammar(args: argparse.Namespace):
    """The --json-schema or --grammar-file constraint, compiled (None without one)."""
    from llamazip.runtime import constrained_decoding

    if args.grammar_file:
        return constrained_decoding.text_grammar(_read_text(args.grammar_file, "grammar file"))
    if args.json_schema:
        given = args.json_schema
        # A schema is a JSON object; anything else names the file that holds it.
        text = given if given.lstrip().startswith("{") else _read_text(given, "JSON schema file")
        return constrained_decoding.json_schema_grammar(text)
    return None


def _load_engine(args: argparse.Namespace, n_slots: int = 1, chats: bool = True) -> Engine:
    """The model, tokenizer and chat template `args` name. A run that `chats` (the
    terminal chat, the server) or was given --chat-template has its template
    parsed now, so a broken one stops it at the start; one that continues raw
    text with the model's own template never parses it."""
    from llamazip.runtime import jit
    from llamazip.runtime.chat_template import chat_template_for
    from llamazip.runtime.engine import Engine
    from llamazip.runtime.model import Model
    from llamazip.runtime.model_file import open_model, verify_weights
    from llamazip.runtime.tokenizer_cache import load_tokenizer

    jit.set_threads(args.threads or os.cpu_count() or 1)
    if args.verify:
        verify_weights(args.model)
    gguf = open_model(args.model)
    tokenizer = load_tokenizer(gguf.metadata)
    template = chat_template_for(gguf.metadata, tokenizer, args.chat_template)
    if template is not None and (chats or args.chat_template):
        template.check()
    model = Model(gguf, n_ctx=args.ctx_size or None, n_slots=n_slots)
    if args.threads is None:
        from llamazip.runtime.thread_tuner import ThreadTuner

        model.thread_tuner = ThreadTuner(os.cpu_count() or 1)
    name = gguf.metadata.get("general.name") or os.path.splitext(os.path.basename(args.model))[0]
    return Engine(model, tokenizer, template, str(name))


def _run(args: argparse.Namespace) -> int:
    options = _run_options(args)
    prompt = args.prompt if args.prompt is not None else _read_prompt_file(args.file) if args.file else None
    if prompt is None and not args.server and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if args.server:
        from llamazip.runtime import server

        # The server listens first and loads the model behind it (/health answers 503 meanwhile).
        return server.serve(lambda: _load_engine(args, options.server.parallel), options)
    engine = _load_engine(args, chats=prompt is None)
    if prompt is None:
        from llamazip.runtime import terminal_chat

        return terminal_chat.chat(engine, options)
    return _complete(engine, prompt, options)


def _complete(engine: Engine, prompt: str, options: RunOptions) -> int:
    """Continue `prompt`, streaming the new text to stdout."""
    tokens = engine.tokenize(prompt)
    out = sys.stdout
    wrote = False
    for chunk in engine.generate(tokens, options.request):
        if chunk.text:
            out.write(chunk.text)
            out.flush()
            wrote = True
    if wrote:
        out.write("\n")
        out.flush()
    if options.verbose:
        stats = engine.last_stats
        print(f"{stats.summary()}; stopped by {stats.finish_reason}", file=sys.stderr)
    return 0


def _add_perplexity_parser(commands) -> None:
    ppl = commands.add_parser(
        "perplexity", help="measure a model's perplexity on a text (as llama.cpp's llama-perplexity)",
        description="Cut the text's tokens into chunks of -c tokens, run each from an empty context and "
                    "score the second half of each. The running estimate goes to stderr, the final "
                    "'Final estimate: PPL = x +/- y' line to stdout.")
    ppl.add_argument("-m", "--model", required=True, help="a .gguf file or a llamazip bundle")
    ppl.add_argument("-f", "--file", required=True, help="the text file to score")
    ppl.add_argument("-c", "--ctx-size", type=int, default=512, metavar="N", help="tokens per chunk (default 512)")
    ppl.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1, metavar="N",
                     help="CPU threads (default: all cores)")
    ppl.add_argument("--chunks", type=int, default=-1, metavar="N", help="score at most N chunks (-1: all)")
    ppl.set_defaults(handler=_perplexity)


def _perplexity(args: argparse.Namespace) -> int:
    from llamazip.runtime import jit
    from llamazip.runtime.model import Model
    from llamazip.runtime.model_file import open_model
    from llamazip.runtime.perplexity import perplexity
    from llamazip.runtime.tokenizer import Tokenizer

    if args.threads < 1:
        raise UserError("-t/--threads must be at least 1")
    text = _read_prompt_file(args.file)
    jit.set_threads(args.threads)
    gguf = open_model(args.model)
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    tokens = tokenizer.encode(text)
    print(f"perplexity: {len(tokens)} tokens, chunks of {args.ctx_size}", file=sys.stderr)

    def on_chunk(i: int, ppl: float) -> None:
        print(f"[{i}]{ppl:.4f},", end="", file=sys.stderr, flush=True)

    model = Model(gguf, n_ctx=max(args.ctx_size, 4))
    result = perplexity(model, tokens, args.ctx_size, tokenizer.bos_id if tokenizer.add_bos else None,
                        args.chunks, on_chunk)
    print(file=sys.stderr)
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}")
    return 0


def _read_prompt_file(path: str) -> str:
    return _read_text(path, "prompt file")


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def _parser() -> argparse.ArgumentParser:
    from llamazip import __version__

    parser = argparse.ArgumentParser(prog="llamazip", description="A language model as one executable file.")
    parser.add_argument("--version", action="version", version=f"llamazip {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(commands)
    _add_perplexity_parser(commands)
    from llamazip import bundle_commands
    from llamazip.zipalign import cli as zipalign_cli

    bundle_commands.add_parsers(commands)
    zipalign_cli.add_parser(commands)
    return parser


def bundle_main(bundle: str, argv: list[str]) -> int:
    """A bundle's entry point: `run` on its own model, with its .args merged in."""
    from .bundle_format import Bundle, merge_args

    try:
        defaults = Bundle(bundle).default_args()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # The bundle's model comes first so that a -m among the arguments overrides it.
    return main(["run", "-m", bundle] + merge_args(defaults, argv), prog=os.path.basename(bundle))


def exit_now(code: int | None) -> NoReturn:
    """End the process with `code`, skipping the interpreter's teardown: freeing
    every module and numba's and LLVM's state took ~60 ms of a 0.45 s run to the
    first token. atexit handlers run and output is flushed first, as at a normal
    exit. With another non-daemon thread still running, the normal exit waits
    for it instead."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if others or threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more can be said
            pass
    os._exit(code or 0)


def entry() -> NoReturn:
    """The `llamazip` command (and `python -m llamazip`)."""
    exit_now(main())


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = _parser()
    if prog:
        parser.prog = prog
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); exit quietly without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
