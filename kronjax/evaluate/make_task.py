"""`python -m kronjax.evaluate.make_task [--out DIR]`: the shipped lm-eval tasks' data.

Built from the held-out split of the embedded Shakespeare corpus: the documents
`python -m kronjax.data prepare` puts in val (every 20th play at its default val_fraction of
0.05: All's Well That Ends Well), so a model trained on `shakespeare` never saw them.
Deterministic: the same three JSONL files every time (tests/test_evaluate.py checks that the
shipped ones are what this writes).

- shakespeare_nextline.jsonl (multiple choice, lm-eval `loglikelihood`): four lines of the
  play, then which of four candidates is the next line (a line of 16-36 characters); the
  three distractors are lines of similar length from elsewhere in the play.
- shakespeare_speaker.jsonl (`generate_until`): a speech, then `**`: generate the name of
  the next speaker (exact match).
- shakespeare_passages.jsonl (`loglikelihood_rolling`): passages of about 1,200 characters,
  scored whole: bits per byte, comparable with the trainer's val_bpb.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK_DIR = Path(__file__).resolve().parent / "tasks"
SOURCE = "shakespeare"
VAL_FRACTION = 0.05          # kronjax.data.prepare's default
N_NEXTLINE, N_SPEAKER, N_PASSAGES = 100, 50, 16
CONTEXT_LINES = 4
# Candidate lines of 16-36 characters: with a context window of 32 tokens (configs/tiny.py's)
# and its 512-piece pydoc tokenizer, every candidate still fits, as lm-eval's hf model needs.
LINE_CHARS = (16, 36)
PASSAGE_CHARS = 1200
SEED = 0


def held_out_text(source: str = SOURCE) -> str:
    """The val documents of `source` as `prepare` splits it, joined by blank lines."""
    from kronjax.data.corpora import iter_documents
    from kronjax.data.prepare import assign_splits  # the split prepare makes, reused exactly

    docs = [text for split, text in assign_splits(iter_documents(source), VAL_FRACTION)
            if split == "val"]
    if not docs:
        raise ValueError(f"{source!r} has no held-out documents")
    return "\n\n".join(docs)


def _kind(line: str) -> str:
    s = line.strip()
    if not s:
        return "blank"
    if s.startswith("#"):
        return "heading"
    if s.startswith("**") and s.rstrip("*").strip("*").strip():
        return "speaker"
    if s.startswith("_"):
        return "direction"
    return "text"


def _spread(candidates: list[Any], n: int) -> list[Any]:
    """n items evenly spread over candidates (all of them when there are fewer)."""
    if len(candidates) <= n:
        return list(candidates)
    step = len(candidates) / n
    return [candidates[int(i * step)] for i in range(n)]


def nextline_items(lines: list[str], n: int = N_NEXTLINE, seed: int = SEED
                   ) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    lo, hi = LINE_CHARS

    def fits(line: str) -> bool:
        return _kind(line) == "text" and lo <= len(line.strip()) <= hi

    pool = sorted({line.strip() for line in lines if fits(line)})
    eligible = [i for i in range(CONTEXT_LINES, len(lines)) if fits(lines[i])]
    items = []
    for i in _spread(eligible, n):
        answer = lines[i].strip()
        similar = [p for p in pool if p != answer and 0.8 <= len(p) / len(answer) <= 1.25]
        choices = rng.sample(similar, 3) + [answer]
        rng.shuffle(choices)
        items.append({"context": "\n".join(lines[i - CONTEXT_LINES:i]) + "\n",
                      "choices": choices, "label": choices.index(answer)})
    return items


def _speeches(lines: list[str]) -> list[tuple[str, int, int]]:
    """(speaker, first line index, end index) of every speech: its tag line to the blank."""
    out = []
    for i, line in enumerate(lines):
        if _kind(line) == "speaker":
            end = i + 1
            while end < len(lines) and _kind(lines[end]) != "blank":
                end += 1
            out.append((line.strip().strip("*").strip(), i, end))
    return out


def speaker_items(lines: list[str], n: int = N_SPEAKER) -> list[dict[str, Any]]:
    speeches = _speeches(lines)
    pairs = [(a, b) for a, b in zip(speeches, speeches[1:])
             if all(_kind(line) == "blank" for line in lines[a[2]:b[1]])]  # nothing between
    items = []
    for (_, start, end), (speaker, _, _) in _spread(pairs, n):
        items.append({"context": "\n".join(lines[start:end]) + "\n\n**", "speaker": speaker})
    return items


def passage_items(lines: list[str], n: int = N_PASSAGES) -> list[dict[str, Any]]:
    """Passages that start at a speech and end at a line end after PASSAGE_CHARS."""
    items = []
    for _, start, _ in _spread(_speeches(lines), n):
        end, size = start, 0
        while end < len(lines) and size < PASSAGE_CHARS:
            size += len(lines[end]) + 1
            end += 1
        items.append({"text": "\n".join(lines[start:end]) + "\n"})
    return items


def build(source: str = SOURCE) -> dict[str, list[dict[str, Any]]]:
    lines = held_out_text(source).split("\n")
    return {"shakespeare_nextline.jsonl": nextline_items(lines),
            "shakespeare_speaker.jsonl": speaker_items(lines),
            "shakespeare_passages.jsonl": passage_items(lines)}


def to_jsonl(items: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.evaluate.make_task", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(TASK_DIR), help="directory for the JSONL files "
                   "(default: the package's tasks directory)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in build().items():
        (out / name).write_text(to_jsonl(items), encoding="utf-8")
        print(f"{out / name}: {len(items)} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
