"""Parallel slots: several generations at once on one model, decoded together.

One scheduler thread owns the model. Callers (the server's handler threads)
hand it requests through `Engine.generate`, which, with slots attached, queues
the request here and returns an iterator over a queue of chunks that the
scheduler fills. Each slot is one sequence with its own KV cache in the model
(Model's `n_slots`: every slot can hold the whole `-c` context; memory is used
only as positions fill).

The scheduler repeats:
1. Admit waiting requests to free slots, each to the free slot whose cached
   tokens share the longest prefix with its prompt (that prefix is not
   computed again: a chat's next turn finds its own slot); a prompt that shares
   little with every slot takes the one holding the least.
2. Drop requests whose caller left (it closed its iterator, or saw its client
   gone: the handler thread checks its own socket, never the scheduler).
3. Decode one token for every slot past its prompt, all in one
   `Model.forward_batch` (continuous batching: a request joins or leaves at
   any step), and in the same pass the next piece of the oldest prompt not yet
   done: as many rows as keep the pass within PASS_STRETCH times a pass of the
   decoding rows alone, by the times passes took (`PieceSizer`; before it
   knows, PIECE_ROWS_PER_STREAM rows per decoding row and one more), up to
   BATCH_ROWS rows in all (the rows the int8 batched product takes,
   int8_batch.py). Then sample each slot's token with its own sampler, stop
   strings, grammar and limits.
4. With nobody decoding, process PROMPT_BATCH tokens of each prompt not yet
   done, through the float product, as a lone generation does.
A prompt's piece rides in the decode pass rather than in a pass of its own
because the float product dequantizes every weight whatever the number of
tokens: on Qwen2.5 0.5B, 2 tokens cost 8 decode steps, so small pieces
between steps left the prompt crawling and large ones stalled the streams. In
the int8 product a row costs a fraction of a pass, so a piece of 2d + 1 rows
beside d decoding rows made the pass 2.0-2.3x as long as without it (SmolLM2
and Qwen2.5 0.5B, d = 1 and 3); filling all 16 rows, 2.8x with d = 3 and
5-5.7x with d = 1. A fixed count, though, costs more as the prompt goes on
(each of its rows attends to all before it) and as the decoding rows get
cheaper (a float16 cache made them 0.8x): the running streams' worst gap
reached 2.9-3.0x their median. Sized by time, the pass's stretch stays put.
With one slot busy and nobody waiting, the pass also runs the tokens prompt
lookup guesses for it (`--draft`, prompt_lookup.py), as the engine's own loop
does: the same tokens and speed as a lone generation. With several streams
their rows share the pass and nobody drafts: a draft's rows would slow every
stream for tokens that may not be kept (llama.cpp's lookup fell to 0.86x at 4
slots, measured on GPUs).

Exactness: a batched step's row equals the sequence's own step bit for bit
(the int8 matmul of 2-16 rows gives each row its matvec's result; on the float
path the float matmul agrees to float32 rounding). A prompt whose pieces rode
in decode passes has its tokens rounded to int8 as decoded tokens are (as
llama.cpp rounds every prompt token), not multiplied in float32 as a prompt
processed whole is: its keys and values differ by that rounding, so a near-tie
can go the other way later in a greedy answer. Prompts processed whole gave
SmolLM2's greedy answers bit for bit, 4 at once as alone.

Embeddings take a free slot too and run whole between two steps.
"""

from __future__ import annotations

import itertools
import math
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .constrained_decoding import GrammarMatcher
from .engine import AnswerText, Chunk, Engine, GenerationRequest, LoggingSampler, common_prefix
from .generate import PROMPT_BATCH, GenerationStats
from .prompt_lookup import Drafter, draft_room
from .weight_matrix import BATCH_ROWS

DEFAULT_QUEUE_LIMIT = 64  # requests waiting for a slot beyond this are refused (HTTP 503)
PREFIX_SIMILARITY = 0.5  # as llama.cpp's --slot-prompt-similarity: see Slots._fit
PIECE_ROWS_PER_STREAM = 2  # prompt rows a decode pass takes per decoding row, and one more, until timed
PASS_STRETCH = 1.6  # a pass with a prompt's piece takes at most this many times one without (see above)
TIMING_WEIGHT = 0.25  # of the latest pass in PieceSizer's running averages
RETIME_PASSES = 8  # a pass alone at least this often while a prompt rides along, to time it again
_END = None  # put on a job's queue after its last chunk
CANCEL_POLL_SECONDS = 0.5  # how often a caller waiting for chunks checks that its client is still there


class PieceSizer:
    """How many rows of a prompt ride in a decode pass beside `decoding` rows, steered
    by what the passes take, so that one with a piece takes PASS_STRETCH times one
    without: after each, the piece grows or shrinks by the square root of (wanted
    stretch - 1) / (its stretch - 1), at most 2x either way (a model of a row's
    cost left pieces at a row: a piece's fixed costs counted as its rows').
    Starts at PIECE_ROWS_PER_STREAM * d + 1. Every RETIME_PASSES passes one goes
    without a piece (rows() gives 0), timing the streams alone again as their
    contexts grow."""

    def __init__(self) -> None:
        self._alone: dict[int, float] = {}  # decoding rows -> seconds of a pass of them alone
        self._since_alone: dict[int, int] = {}  # decoding rows -> passes since one went alone
        self._piece: dict[int, float] = {}  # decoding rows -> prompt rows to take beside them

    def rows(self, decoding: int, room: int) -> int:
        if decoding in self._alone and self._since_alone.get(decoding, 0) >= RETIME_PASSES:
            return 0
        wanted = self._piece.get(decoding, PIECE_ROWS_PER_STREAM * decoding + 1)
        return max(1, min(room, round(wanted)))

    def timed(self, decoding: int, piece: int, seconds: float) -> None:
        """A pass of `decoding` rows and `piece` prompt rows took `seconds`."""
        alone = self._alone.get(decoding)
        if not piece:
            self._alone[decoding] = _running_average(alone, seconds)
            self._since_alone[decoding] = 0
        elif alone is not None:
            self._since_alone[decoding] = self._since_alone.get(decoding, 0) + 1
            added = max(seconds / alone - 1, 0.01)  # what the piece added, in passes alone
            factor = min(2.0, max(0.5, math.sqrt((PASS_STRETCH - 1) / added)))
            self._piece[decoding] = min(float(BATCH_ROWS), max(1.0, piece * factor))


def _running_average(average: float | None, latest: float) -> float:
    return latest if average is None else average + TIMING_WEIGHT * (latest - average)


class QueueFullError(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


@dataclass
class Metrics:
    """Totals since start, as the server's /metrics reports them."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    tokens_predicted: int = 0
    tokens_predicted_seconds: float = 0.0
    decode_steps: int = 0
    busy_slots_in_steps: int = 0  # summed over decode steps: / decode_steps is the mean batch


@dataclass
class _Job:
    """One generation's state while it waits for or holds a slot."""

    tokens: list[int]  # the prompt, then what has been generated
    request: GenerationRequest
    cancelled: Callable[[], bool]
    sampler: LoggingSampler
    answer: AnswerText
    eog_ids: frozenset[int]
    prompt_len: int = 0
    arrival: int = 0  # prompts are processed in the order their requests came
    processed: int = 0  # leading tokens whose keys and values the slot's cache holds
    stats: GenerationStats = field(default_factory=GenerationStats)
    decode_started: float = 0.0
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    closed: bool = False  # the caller is gone: the scheduler drops the job
    drafter: Drafter | None = None  # prompt lookup, while the job decodes alone (request.draft > 0)


class _ChunkStream:
    """The caller's side of a job: its chunks as they come. Closing it (or the
    caller's `cancelled()` turning true) tells the scheduler to drop the job."""

    def __init__(self, job: _Job):
        self.job = job

    def __iter__(self) -> _ChunkStream:
        return self

    def __next__(self) -> Chunk:
        job = self.job
        while True:
            if job.closed:
                raise StopIteration
            try:
                item = job.out.get(timeout=CANCEL_POLL_SECONDS)
            except queue.Empty:
                if job.cancelled():  # checked here, in the caller's thread: the socket is its own
                    self.close()
                continue
            if item is _END:
                raise StopIteration
            if isinstance(item, BaseException):
                self.close()
                raise item
            if not item.finish_reason and job.cancelled():
                self.close()
            return item

    def close(self) -> None:
        self.job.closed = True


@dataclass
class _EmbeddingJob:
    """Hidden states of tokens, computed whole in a free slot."""

    tokens: list[int]
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


@dataclass
class _Slot:
    id: int
    cached: list[int] = field(default_factory=list)  # tokens the slot's cache holds (while free)
    job: _Job | None = None
    decoded: int = 0  # tokens generated by its current (or last) request

    def n_cached(self) -> int:
        return self.job.processed if self.job is not None else len(self.cached)


class Slots:
    """The scheduler over the engine's model; attaches itself to the engine."""

    def __init__(self, engine: Engine, queue_limit: int = DEFAULT_QUEUE_LIMIT):
        self.engine, self.model, self.queue_limit = engine, engine.model, queue_limit
        self.slots = [_Slot(i) for i in range(self.model.n_slots)]
        self.metrics = Metrics()
        self._waiting: deque[_Job | _EmbeddingJob] = deque()
        self._wake = threading.Condition()
        self._arrivals = itertools.count()
        self._pieces = PieceSizer()
        engine.slots = self
        threading.Thread(target=self._loop, name="llamazip-slots", daemon=True).start()

    # -- what callers use (any thread) --

    def generate(self, prompt: list[int], request: GenerationRequest, cancelled: Callable[[], bool],
                 matcher: GrammarMatcher | None) -> Iterator[Chunk]:
        """Queue a checked request (QueueFullError when the queue is full); iterate its chunks."""
        job = _Job(tokens=prompt, request=request, cancelled=cancelled,
                   sampler=LoggingSampler(request.sampling, request.top_logprobs, matcher),
                   answer=AnswerText(self.engine.tokenizer, request.stop, matcher),
                   eog_ids=frozenset(self.engine.tokenizer.eog_ids), prompt_len=len(prompt),
                   arrival=next(self._arrivals),
                   drafter=Drafter(request.draft, self.engine.row_cost) if request.draft else None)
        self._enqueue(job)
        return _ChunkStream(job)

    def hidden_states(self, tokens: list[int]) -> np.ndarray:
        """The last hidden state of each token (Engine.hidden_states), computed in a free slot."""
        job = _EmbeddingJob(list(tokens))
        self._enqueue(job)
        result = job.out.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def busy(self) -> int:
        return sum(slot.job is not None for slot in self.slots)

    def waiting(self) -> int:
        return max(0, len(self._waiting) - (len(self.slots) - self.busy()))

    def status(self) -> list[dict]:
        """Each slot as /slots reports it."""
        return [{"id": slot.id, "is_processing": slot.job is not None, "n_ctx": self.model.n_ctx,
                 "n_cached": slot.n_cached(), "n_decoded": slot.decoded} for slot in self.slots]

    def _enqueue(self, job: _Job | _EmbeddingJob) -> None:
        with self._wake:
            # Requests not yet admitted to a free slot do not count as waiting.
            waiting = len(self._waiting) - (len(self.slots) - self.busy())
            if waiting >= self.queue_limit:
                raise QueueFullError(f"all {len(self.slots)} slots are busy and {waiting} requests "
                                     f"wait already; try again later")
            self._waiting.append(job)
            self._wake.notify()

    # -- the scheduler thread --

    def _loop(self) -> None:
        while True:
            with self._wake:
                embedding = self._admit()
                while embedding is None and not any(slot.job for slot in self.slots):
                    self._wake.wait()
                    embedding = self._admit()
            try:
                if embedding is not None:
                    self._embed(*embedding)
                else:
                    self._step()
            except Exception as e:  # a bug in a pass: its requests fail, the server goes on
                print("llamazip: a decode step failed:", file=sys.stderr)
                traceback.print_exc()
                for slot in self.slots:
                    if slot.job is not None:
                        self._fail(slot, e)
                        slot.cached = []  # the pass may have stopped halfway through its cache

    def _admit(self) -> tuple[_Slot, _EmbeddingJob] | None:
        """Waiting requests into free slots (called with the lock held). An embedding
        ends the round: it is returned with the slot to compute it in."""
        while self._waiting:
            free = [slot for slot in self.slots if slot.job is None]
            if not free:
                return None
            job = self._waiting.popleft()
            if isinstance(job, _EmbeddingJob):
                return min(free, key=lambda s: len(s.cached)), job
            if job.closed:
                continue
            slot = max(free, key=lambda s: self._fit(s, job.tokens))
            job.processed = common_prefix(slot.cached, job.tokens, len(job.tokens) - 1)
            slot.job, slot.decoded = job, 0
            if job.request.max_tokens == 0:
                self._finish(slot, "length")
        return None

    @staticmethod
    def _fit(slot: _Slot, prompt: list[int]) -> tuple[int, int]:
        """How well a free slot suits a prompt: the longest shared prefix first, then
        the least cached (the least another conversation loses). A prefix under
        PREFIX_SIMILARITY of the prompt counts as none: a shared system prompt or BOS
        alone is not worth another conversation's whole cache."""
        shared = common_prefix(slot.cached, prompt, len(prompt) - 1)
        return (shared if shared >= PREFIX_SIMILARITY * len(prompt) else 0), -len(slot.cached)

    def _embed(self, slot: _Slot, job: _EmbeddingJob) -> None:
        tokens = job.tokens
        try:
            states = [self.model.hidden_states(np.array(tokens[start:start + PROMPT_BATCH]), start, slot=slot.id)
                      for start in range(0, len(tokens), PROMPT_BATCH)]
        except Exception as e:
            slot.cached = []
            job.out.put(e)
            return
        slot.cached = list(tokens)  # the cache holds their keys and values now, as after a prompt
        job.out.put(np.concatenate(states))

    def _step(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.closed:
                self._finish(slot, "cancelled")
        busy = [slot for slot in self.slots if slot.job is not None]
        # Past its prompt, a job's last token (sampled, not yet run) is what it decodes next.
        decoding = [slot for slot in busy if slot.job.processed >= slot.job.prompt_len]
        prompting = [slot for slot in busy if slot.job.processed < slot.job.prompt_len]
        oldest = min(prompting, key=lambda s: s.job.arrival) if prompting else None
        if decoding:
            self._decode(decoding, oldest)
        else:  # prompts that came together are processed whole, before any of them decodes
            for slot in sorted(prompting, key=lambda s: s.job.arrival):
                self._prompt_batch(slot)

    def _decode(self, slots: list[_Slot], prompting: _Slot | None) -> None:
        """One pass: the next token of each slot in `slots`, and the next piece of
        `prompting`'s prompt beside them (PieceSizer's rows); or, for a slot that
        decodes alone, its next token and the tokens its drafter guesses after it."""
        if len(slots) == 1 and prompting is None and slots[0].job.drafter is not None:
            self._decode_alone(slots[0])
            return
        jobs = [slot.job for slot in slots]
        tokens = [job.tokens[-1] for job in jobs]
        positions = [job.processed for job in jobs]
        ids = [slot.id for slot in slots]
        logits_rows = list(range(len(jobs)))
        piece = 0
        if prompting is not None:
            job = prompting.job
            start = job.processed
            piece = min(self._pieces.rows(len(jobs), BATCH_ROWS - len(jobs)), job.prompt_len - start)
            tokens += job.tokens[start:start + piece]
            positions += range(start, start + piece)
            ids += [prompting.id] * piece
            if start + piece == job.prompt_len:  # its last token's logits give the first token
                logits_rows.append(len(tokens) - 1)
        started = time.perf_counter()
        logits = self.model.forward_batch(tokens, positions, ids, logits_rows)
        seconds = time.perf_counter() - started
        self._pieces.timed(len(jobs), piece, seconds)
        self._count_step(len(slots))
        if piece:
            # The piece's share of the pass's time, by rows, counts as prompt time.
            self._prompted(prompting, piece, seconds * piece / len(tokens),
                           logits[-1] if len(logits_rows) > len(jobs) else None)
        for slot, row in zip(slots, logits):
            slot.job.processed += 1
            self._next_token(slot, row)

    def _decode_alone(self, slot: _Slot) -> None:
        """The one decoding slot's next token, with the tokens prompt lookup guesses
        after it as further rows of the same pass, kept while the sampler picks them
        (as generate() does for the terminal chat; prompt_lookup.py). Nobody else
        is busy or waiting: with other streams in the pass a draft's rows would
        slow every one of them for tokens that may not be kept."""
        job = slot.job
        draft: list[int] = []
        if not self._waiting:
            room = draft_room(self.model.n_ctx, len(job.tokens), job.request.max_tokens, job.stats.generated_tokens)
            draft = job.drafter.propose(job.tokens)[:room]
        tokens = [job.tokens[-1]] + draft
        started = time.perf_counter()
        rows = self.model.forward_batch(tokens, list(range(job.processed, job.processed + len(tokens))),
                                        [slot.id] * len(tokens))
        job.drafter.timed(len(tokens), time.perf_counter() - started)
        self._count_step(1)
        for i, row in enumerate(rows):
            job.processed += 1  # row i's token is the one sampled from row i - 1: its keys and values hold
            self._next_token(slot, row)
            if slot.job is not job:
                return  # it ended
            if i == len(draft) or job.tokens[-1] != draft[i]:
                break  # the rows after this one continue a token that was not chosen
        if draft:
            job.drafter.feedback(len(draft), i)
            job.stats.count_draft(len(draft), i)

    def _count_step(self, decoding: int) -> None:
        self.metrics.decode_steps += 1
        self.metrics.busy_slots_in_steps += decoding

    def _prompt_batch(self, slot: _Slot) -> None:
        """PROMPT_BATCH tokens of the slot's prompt (fewer at its end) in one pass of their own."""
        job = slot.job
        start = job.processed
        chunk = job.tokens[start:start + PROMPT_BATCH]
        started = time.perf_counter()
        logits = self.model.forward(np.array(chunk), start, slot=slot.id, prompt=True)
        self._prompted(slot, len(chunk), time.perf_counter() - started, logits)

    def _prompted(self, slot: _Slot, n: int, seconds: float, last_logits: np.ndarray | None) -> None:
        """Count n more prompt tokens done; after the prompt's last, sample the first token."""
        job = slot.job
        job.processed += n
        job.stats.prompt_tokens += n
        job.stats.prompt_seconds += seconds
        self.metrics.prompt_tokens += n
        self.metrics.prompt_seconds += seconds
        if job.processed == job.prompt_len:
            job.decode_started = time.perf_counter()
            self._next_token(slot, last_logits)

    def _next_token(self, slot: _Slot, logits: np.ndarray) -> None:
        """Sample the slot's next token from its logits and send its text (as generate() and Engine do)."""
        job = slot.job
        try:
            token = job.sampler.sample(logits, job.tokens, job.tokens[job.prompt_len:])
        except Exception as e:  # a grammar with no way on: this request's error, not the others'
            self._fail(slot, e)
            return
        if token in job.eog_ids:
            self._finish(slot, "stop")
            return
        job.tokens.append(token)
        job.stats.generated_tokens += 1
        slot.decoded += 1
        text, stopped = job.answer.feed(token)
        logprob, top = job.sampler.last
        if stopped:
            job.out.put(Chunk(text, token, logprob, top, finish_reason="stop"))
            self._finish(slot, "stop", final_chunk=False)
            return
        job.out.put(Chunk(text, token, logprob, top))
        if job.stats.generated_tokens == job.request.max_tokens or len(job.tokens) >= self.model.n_ctx:
            self._finish(slot, "length")

    def _finish(self, slot: _Slot, reason: str, final_chunk: bool = True) -> None:
        job = slot.job
        job.stats.finish_reason = reason
        if job.decode_started:
            job.stats.generate_seconds = time.perf_counter() - job.decode_started
            self.metrics.tokens_predicted += job.stats.generated_tokens
            self.metrics.tokens_predicted_seconds += job.stats.generate_seconds
        if reason != "cancelled" and final_chunk:
            job.out.put(Chunk(job.answer.flush(), finish_reason=reason))
        job.out.put(_END)
        self._free(slot)

    def _fail(self, slot: _Slot, error: Exception) -> None:
        slot.job.out.put(error)
        self._free(slot)

    def _free(self, slot: _Slot) -> None:
        self.engine.last_stats = slot.job.stats
        slot.cached = slot.job.tokens[:slot.job.processed]
        slot.job = None
