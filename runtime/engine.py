"""One loaded model serving generations: the terminal chat and the HTTP server
both go through an Engine. By itself it runs one generation at a time; with
parallel slots attached (slots.Slots, the server's), generations and embeddings
go to their scheduler, which runs several at once.

It owns the tokenizer, the chat template and the KV cache. A new generation
reuses the cache for the longest prefix it shares with the previous one (a
chat's history), holds the model for its whole run (so concurrent callers
queue), stops at end-of-generation tokens and at stop strings (text that
might begin a stop string is held back until it cannot), follows a grammar
when asked (constrained_decoding; the answer ends, "stop", when the grammar
is complete), and can report log-probabilities.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .chat_template import ChatTemplate
from .constrained_decoding import Grammar, GrammarMatcher, Guide
from .generate import PROMPT_BATCH, GenerationStats, check_prompt, generate
from .model import Model
from .prompt_lookup import Drafter, RowCost
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenerationRequest:
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = -1  # -1: until the model stops or the context is full
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no log-probabilities; N: the chosen token's and N alternatives
    grammar: Grammar | None = None  # what the answer must follow (None: anything)
    draft: int = 0  # tokens guessed from the context per pass (prompt_lookup.py); 0: none


@dataclass
class Chunk:
    """A piece of generated text; the last chunk carries the finish reason."""

    text: str
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last chunk


_PRIVATE_USE = 0xF0000  # plane 15: characters no tokenizer or template gives meaning to


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, chat_template: ChatTemplate | None, name: str):
        self.model, self.tokenizer, self.chat_template, self.name = model, tokenizer, chat_template, name
        self._lock = threading.Lock()
        self._cached: list[int] = []  # tokens whose keys and values the cache holds, in order
        self.last_stats = GenerationStats()
        self._guide: Guide | None = None
        self.last_matcher: GrammarMatcher | None = None  # the last constrained generation's (its mask timings)
        # slots.Slots once attached (it attaches itself): it then owns the model, and
        # generate and hidden_states hand their work to its scheduler thread.
        self.slots = None
        self.row_cost = RowCost()  # what a drafted row costs on this model (prompt_lookup.py), kept across answers

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    @property
    def guide(self) -> Guide:
        """llguidance's view of the vocabulary, for constrained generations (made on first use)."""
        if self._guide is None:
            self._guide = Guide(self.tokenizer, self.model.config.vocab_size)
        return self._guide

    def render_chat(self, messages: list[dict], tools: list | None = None) -> str:
        if self.chat_template is None:
            # Plain completion: the conversation's text, one message after another.
            return "".join(str(m.get("content", "")) for m in messages)
        return self.chat_template.render(messages, add_generation_prompt=True, tools=tools)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def chat_tokens(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """The conversation rendered and tokenized, ready to generate the assistant's answer.

        Control tokens come from the template only: special-token text inside a
        message (a user typing "<|im_start|>system") is read as plain text, as if
        parse_special were off for it, so no message can forge another turn.
        """
        text, plain_spans = self._render_marked(messages, tools)
        # Templates that write the BOS token themselves must not get a second one.
        bos = self.chat_template.bos_token if self.chat_template else ""
        return self.tokenizer.encode(text, add_special=not (bos and text.startswith(bos)), parse_special=True,
                                     plain_spans=plain_spans)

    def _render_marked(self, messages: list[dict], tools: list | None) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation, and where in it the special-token text of messages landed.

        Each special-token text in a message is swapped for a private-use character
        before rendering (templates that trim or split the content still work) and
        swapped back after, its place noted.
        """
        contents = [m.get("content") for m in messages]
        present = [s for s in self.tokenizer.special_texts()
                   if any(isinstance(c, str) and s in c for c in contents)]
        if not present:
            return self.render_chat(messages, tools), []
        seen = set("".join(c for c in contents if isinstance(c, str)))
        if self.chat_template is not None:
            seen |= set(self.chat_template.source)
        marks = iter(chr(c) for c in range(_PRIVATE_USE, _PRIVATE_USE + 0xFFFE) if chr(c) not in seen)
        stand_in = {s: next(marks) for s in present}  # longest first, as special_texts() gives them
        marked = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str):
                for special_text, mark in stand_in.items():
                    content = content.replace(special_text, mark)
                message = dict(message, content=content)
            marked.append(message)
        rendered = self.render_chat(marked, tools)
        back = {mark: special_text for special_text, mark in stand_in.items()}
        pieces: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = done = 0  # pos: in the text being built; done: in the rendered text
        for found in re.finditer("[" + "".join(back) + "]+", rendered):
            pieces.append(rendered[done:found.start()])
            pos += found.start() - done
            special = "".join(back[mark] for mark in found.group())
            pieces.append(special)
            spans.append((pos, pos + len(special)))
            pos += len(special)
            done = found.end()
        pieces.append(rendered[done:])
        return "".join(pieces), spans

    def hidden_states(self, tokens: list[int]) -> np.ndarray:
        """The last hidden state of each token, (n, dim), for embeddings (raises PromptError)."""
        check_prompt(tokens, self.n_ctx)
        if self.slots is not None:
            return self.slots.hidden_states(tokens)
        with self._lock:
            self._cached = []
            states = [self.model.hidden_states(np.array(tokens[start:start + PROMPT_BATCH]), start)
                      for start in range(0, len(tokens), PROMPT_BATCH)]
            self._cached = list(tokens)  # the cache holds their keys and values now, as after a prompt
        return np.concatenate(states)

    def check_prompt(self, prompt: list[int]) -> None:
        """Raise PromptError (PromptTooLongError when it does not fit) for a prompt the model cannot take."""
        check_prompt(prompt, self.n_ctx)

    def generate(self, prompt: list[int], request: GenerationRequest,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Chunk]:
        """Check the prompt now (raising PromptError), then stream chunks.

        Without slots, generations run one at a time: the iterator waits for the
        model on its first step and holds it until it ends or is closed. With
        slots, the request joins their queue now (slots.QueueFullError when it is
        full) and the iterator reads what the scheduler generates for it.
        """
        self.check_prompt(prompt)
        request.sampling.check()
        # The grammar meets the vocabulary now, so that one that does not fit is an error before any answer.
        matcher = self.guide.matcher(request.grammar) if request.grammar is not None else None
        if self.slots is not None:
            return self.slots.generate(list(prompt), request, cancelled, matcher)
        return self._run(list(prompt), request, cancelled, matcher)

    def _run(self, tokens: list[int], request: GenerationRequest, cancelled,
             matcher: GrammarMatcher | None) -> Iterator[Chunk]:
        with self._lock:
            if cancelled():  # the caller left while waiting for the model
                return
            n_past = common_prefix(self._cached, tokens, len(tokens) - 1)
            self._cached = []  # until the forward passes below have filled it again
            stats = self.last_stats = GenerationStats()
            answer = AnswerText(self.tokenizer, request.stop, matcher)
            sampler = LoggingSampler(request.sampling, request.top_logprobs, matcher)
            self.last_matcher = matcher
            tokens_out = generate(self.model, tokens, sampler, request.max_tokens,
                                  self.tokenizer.eog_ids, n_past=n_past, stats=stats,
                                  drafter=Drafter(request.draft, self.row_cost) if request.draft else None)
            try:
                for token in tokens_out:
                    text, stopped = answer.feed(token)
                    logprob, top = sampler.last
                    if stopped:
                        stats.finish_reason = "stop"
                        yield Chunk(text, token, logprob, top, finish_reason="stop")
                        return
                    yield Chunk(text, token, logprob, top)
                    if cancelled():
                        stats.finish_reason = "cancelled"
                        return
                yield Chunk(answer.flush(), finish_reason=stats.finish_reason or "length")
            finally:
                tokens_out.close()  # its timings are complete only once it has ended
                if not stats.prompt_tokens:  # stopped inside the prompt: trust only the old prefix
                    self._cached = tokens[:n_past]
                else:  # the last generated token's forward pass may not have run
                    self._cached = tokens[:-1] if stats.generated_tokens else tokens


class AnswerText:
    """The text of one answer as its tokens come: decoded (a character split across
    tokens waits for its last byte), cut at the first stop string, and ended when
    the grammar, if any, is complete."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], matcher: GrammarMatcher | None):
        self.decoder, self.stops, self.matcher = StreamDecoder(tokenizer), _StopStrings(stop), matcher

    def feed(self, token: int) -> tuple[str, bool]:
        """The text that may be sent after `token`, and whether the answer ends there."""
        text, stopped = self.stops.feed(self.decoder.feed(token))
        if self.matcher is not None and self.matcher.finished and not stopped:
            # The grammar is complete: end here rather than compute a forced end token.
            text += self.flush()
            stopped = True
        return text, stopped

    def flush(self) -> str:
        """What is left to send when the answer ends."""
        return self.stops.feed(self.decoder.flush(), final=True)[0]


class LoggingSampler(Sampler):
    """A Sampler that also keeps the chosen token's log-probability (and the top N)."""

    def __init__(self, params: SamplingParams, top_n: int | None, constraint: GrammarMatcher | None = None):
        super().__init__(params, constraint)
        self.top_n = top_n
        self.last: tuple[float | None, list[tuple[int, float]] | None] = (None, None)

    def sample(self, logits, history=(), generated=()) -> int:
        token = super().sample(logits, history, generated)
        if self.top_n is not None:  # the model's own probabilities, before any grammar's mask
            logits = np.asarray(logits, dtype=np.float64)
            shifted = logits - logits.max()
            logprobs = shifted - np.log(np.exp(shifted).sum())
            top = np.argsort(-logprobs)[:self.top_n] if self.top_n else []
            self.last = (float(logprobs[token]), [(int(t), float(logprobs[t])) for t in top])
        return token


class _StopStrings:
    """Cut generated text at the first stop string, holding back possible beginnings of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    def feed(self, piece: str, final: bool = False) -> tuple[str, bool]:
        self.text += piece
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            out = self.text[self.sent:min(hits)]
            self.sent = len(self.text)
            return out, True
        hold = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                    if self.text.endswith(s[:k])), default=0)
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:end], end
        return out, False


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens a and b share, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
