"""The interactive chat in a terminal.

Each turn renders the whole conversation through the model's chat template;
the engine reuses the KV cache for the part it has seen, so a turn costs only
its new tokens. Ctrl-C stops the answer being written (the chat goes on);
Ctrl-D or /exit leaves. When the conversation outgrows the context, its oldest
turns are dropped (the system message stays).
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import replace

from .chat_template import ChatTemplateError
from .engine import Engine, GenerationRequest
from .options import RunOptions

HELP = """commands:
  /help   this help
  /clear  forget the conversation (the system prompt stays)
  /undo   take back your last message and its answer
  /stats  speed of the last answer and how full the context is
  /exit   leave (Ctrl-D too); Ctrl-C stops an answer"""


class Conversation:
    def __init__(self, engine: Engine, system_prompt: str | None):
        self.engine = engine
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.turns: list[dict] = []

    def prompt_tokens(self, reserve: int) -> list[int]:
        """The conversation as tokens, dropping the oldest turns until `reserve` tokens fit after it."""
        while True:
            tokens = self.engine.chat_tokens(self.system + self.turns)
            if len(tokens) + reserve <= self.engine.n_ctx or len(self.turns) <= 1:
                return tokens
            # Drop the oldest user message and the answer after it.
            del self.turns[:2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1]

    def undo(self) -> bool:
        while self.turns and self.turns[-1]["role"] == "assistant":
            self.turns.pop()
        if not self.turns:
            return False
        self.turns.pop()
        return True


def chat(engine: Engine, options: RunOptions) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    request = options.request
    conversation = Conversation(engine, options.system_prompt)
    mode = "chat" if engine.chat_template else "plain completion (the model has no chat template)"
    print(f"{engine.name}: {mode}. /help for commands, Ctrl-D to leave.", file=sys.stderr)
    # Leave room for an answer: the -n limit, or a quarter of the context.
    reserve = request.max_tokens if request.max_tokens > 0 else engine.n_ctx // 4
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit leaves)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if _command(line.strip(), conversation, engine):
                return 0
            continue
        conversation.turns.append({"role": "user", "content": line})
        try:
            tokens = conversation.prompt_tokens(reserve)
            engine.check_prompt(tokens)
        except (ChatTemplateError, ValueError) as e:
            conversation.turns.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        answer = _answer(engine, tokens, replace(request, max_tokens=_room(engine, tokens, request)))
        conversation.turns.append({"role": "assistant", "content": answer})
        if options.verbose:
            print(engine.last_stats.summary(), file=sys.stderr)


def _room(engine: Engine, tokens: list[int], request: GenerationRequest) -> int:
    room = engine.n_ctx - len(tokens)
    return min(room, request.max_tokens) if request.max_tokens >= 0 else room


def _answer(engine: Engine, tokens: list[int], request: GenerationRequest) -> str:
    """Stream the answer to stdout; Ctrl-C ends it early. Returns its text."""
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    pieces = []
    try:
        for chunk in engine.generate(tokens, request, cancelled=interrupted.is_set):
            if chunk.text:
                pieces.append(chunk.text)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    print()
    if interrupted.is_set():
        print("(stopped)", file=sys.stderr)
    return "".join(pieces)


def _command(line: str, conversation: Conversation, engine: Engine) -> bool:
    """Run a /command; True means leave."""
    name = line.split()[0]
    if name in ("/exit", "/quit"):
        return True
    if name == "/help":
        print(HELP, file=sys.stderr)
    elif name == "/clear":
        conversation.turns.clear()
        print("(conversation cleared)", file=sys.stderr)
    elif name == "/undo":
        print("(took back your last message)" if conversation.undo() else "(nothing to undo)", file=sys.stderr)
    elif name == "/stats":
        used = len(engine.chat_tokens(conversation.system + conversation.turns))
        print(f"{engine.last_stats.summary()}\ncontext: {used} of {engine.n_ctx} tokens", file=sys.stderr)
    else:
        print(f"unknown command {name}; /help lists them", file=sys.stderr)
    return False
