"""Prompt-lookup decoding (--draft) against plain decoding, on work whose answer
repeats its context and on open-ended work.

For each real model present and each task: the chat prompt's greedy answer
(up to --gen-tokens) with drafting off and with --draft N, alternating, best
of --rounds each, in this process. Prints decode tok/s of both, their ratio,
whether the two texts are the same tokens (they must be), the acceptance rate
(drafted tokens kept / drafted) and the mean accepted length (kept per draft
pass). The tasks:
- code: reproduce bench/lookup/inventory.py (64 lines) with a docstring added;
- rename: the same file with a function renamed (SmolLM2 135M rewrites the
  file rather than copy it: little to guess);
- quotes: quote the sentences of the opening of bench/heldout/prose_story.txt
  that describe one thing;
- summary: summarize it, quoting (SmolLM2 paraphrases instead);
- revise: a chat turn that repeats the assistant's earlier answer with one edit;
- open: a poem, where nothing in the context predicts the answer.
Results go to bench/results_lookup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numba owns the cores (see llamazip/main.py)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from models import REAL_MODELS  # noqa: E402

from llamazip.runtime import jit  # noqa: E402
from llamazip.runtime.chat_template import chat_template_for  # noqa: E402
from llamazip.runtime.engine import Engine  # noqa: E402
from llamazip.runtime.generate import GenerationStats, generate  # noqa: E402
from llamazip.runtime.gguf import GGUFFile  # noqa: E402
from llamazip.runtime.model import Model  # noqa: E402
from llamazip.runtime.prompt_lookup import Drafter  # noqa: E402
from llamazip.runtime.sampling import Sampler, SamplingParams  # noqa: E402
from llamazip.runtime.tokenizer_cache import load_tokenizer  # noqa: E402

CHECKLIST = """Here is a checklist for closing the shop at night:

1. Bring in the sign and the flower stands from the pavement.
2. Count the till and put the cash in the safe.
3. Switch off the coffee machine and empty the drip tray.
4. Wipe down the counter and the card reader.
5. Take the rubbish out to the bins behind the shop.
6. Check that the back door is locked and bolted.
7. Turn off the lights, except the one above the till.
8. Set the alarm and lock the front door behind you."""


def tasks() -> dict[str, list[dict]]:
    code = (HERE / "lookup" / "inventory.py").read_text()
    story = (HERE / "heldout" / "prose_story.txt").read_text().split("\n\n")
    return {
        "code": [{"role": "user", "content":
                  f"```python\n{code}```\n\nAdd a docstring to the function `needs_reorder` and show the whole file."}],
        "rename": [{"role": "user", "content":
                    f"Here is a Python file:\n\n```python\n{code}```\n\nRename the function `parse_line` to "
                    "`parse_row` everywhere. Reply with the whole updated file in one code block, nothing else."}],
        "quotes": [{"role": "user", "content":
                    "\n\n".join(story[:4]) + "\n\nWhich sentences of this text describe the village? "
                    "Quote them exactly."}],
        "summary": [{"role": "user", "content":
                     "\n\n".join(story[:4]) + "\n\nSummarize this story in a few sentences, quoting its most "
                     "important sentences word for word."}],
        "revise": [{"role": "user", "content": "Give me a checklist for closing a small shop at night."},
                   {"role": "assistant", "content": CHECKLIST},
                   {"role": "user", "content": "Repeat the checklist exactly as you wrote it, but make step 3 "
                    "about the espresso machine instead of the coffee machine."}],
        "open": [{"role": "user", "content": "Write a short poem about autumn in a big city."}],
    }


def answer(engine: Engine, prompt: list[int], n_gen: int, draft: int) -> tuple[list[int], GenerationStats]:
    tokens = list(prompt)
    stats = GenerationStats()
    sampler = Sampler(SamplingParams(temperature=0))
    out = list(generate(engine.model, tokens, sampler, n_gen, engine.tokenizer.eog_ids, stats=stats,
                        drafter=Drafter(draft, engine.row_cost) if draft else None))
    return out, stats


def measure(engine: Engine, messages: list[dict], n_gen: int, draft: int, rounds: int) -> dict:
    prompt = engine.chat_tokens(messages)
    answer(engine, prompt[:8], 2, draft)  # every kernel loaded, both paths
    best = {0: None, draft: None}
    texts = {}
    for _ in range(rounds):
        for d in (0, draft):
            started = time.perf_counter()
            out, stats = answer(engine, prompt, n_gen, d)
            seconds = stats.generate_seconds or time.perf_counter() - started
            rate = len(out) / seconds
            if best[d] is None or rate > best[d][0]:
                best[d] = (rate, stats)
            texts[d] = out
    plain, drafted = best[0][0], best[draft][0]
    stats = best[draft][1]
    return {"prompt_tokens": len(prompt), "tokens": len(texts[draft]), "plain_tok_s": plain,
            "draft_tok_s": drafted, "ratio": drafted / plain, "same_tokens": texts[0] == texts[draft],
            "drafted": stats.drafted_tokens, "accepted": stats.accepted_tokens, "passes": stats.draft_passes,
            "acceptance": stats.accepted_tokens / stats.drafted_tokens if stats.drafted_tokens else 0.0,
            "mean_accepted": stats.accepted_tokens / stats.draft_passes if stats.draft_passes else 0.0,
            "text": engine.tokenizer.decode(texts[draft])[:120]}


def load(path: Path) -> Engine:
    gguf = GGUFFile(path)
    tokenizer = load_tokenizer(gguf.metadata)
    return Engine(Model(gguf, n_ctx=2048), tokenizer, chat_template_for(gguf.metadata, tokenizer, None), path.stem)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,qwen2.5", help="comma-separated: " + ", ".join(REAL_MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results_lookup.json")
    args = parser.parse_args()
    jit.set_threads(args.threads)
    chosen = tasks()
    if args.tasks:
        chosen = {name: chosen[name] for name in args.tasks.split(",")}
    results = {}
    for name in args.models.split(","):
        path = REAL_MODELS[name].path
        if not path.exists():
            print(f"{name}: {path} missing (make models-all)", file=sys.stderr)
            continue
        engine = load(path)
        for task, messages in chosen.items():
            r = measure(engine, messages, args.gen_tokens, args.draft, args.rounds)
            results[f"{name}/{task}"] = r
            print(f"{name:8} {task:7} {r['tokens']:4} tok  plain {r['plain_tok_s']:6.1f}  draft {r['draft_tok_s']:6.1f} "
                  f"tok/s  {r['ratio']:.2f}x  same={r['same_tokens']}  accepted {r['accepted']}/{r['drafted']} "
                  f"in {r['passes']} passes ({r['mean_accepted']:.1f} each)", flush=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"threads": args.threads, "draft": args.draft, "results": results}, indent=1))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
