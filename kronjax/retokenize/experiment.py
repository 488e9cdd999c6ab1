"""`python -m kronjax.retokenize.experiment --runs4k DIR --runs16k DIR --out DIR`: the
tokenizer-freedom experiment of docs/results.md, over compare's runs DIR/<arm>_s<seed>.

Scenarios (each arm x seed, zero-shot, then `--finetune` steps of train from W2):
  self     the 4k runs' own tokenizer: the control (zero-shot = the source exactly; its
           fine-tune is what any other fine-tune is compared with: the same extra steps)
  extend   the 4k tokenizer plus the --extend most frequent words it splits into pieces
  to16k    4k runs -> the 16,384-piece tokenizer of the 16k runs (same corpus)
  pydoc    4k runs -> a 4096-piece BPE trained on Python's pydoc topics (other text)
  self16k / to4k   the same control and the reverse swap for the 16k runs
Resumable: finished items are read back from OUT/results.jsonl (a zero-shot pass, then a
second with --finetune N, fine-tunes the items the first built); the report is
OUT/summary.{md,json} (kronjax.retokenize.report).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kronjax import config as config_lib
from kronjax import console
from kronjax.data import load_split
from kronjax.data.cache import data_dir_for
from kronjax.data.tokenizers import Tokenizer, train_sentencepiece
from kronjax.retokenize import build, evaluate, report
from kronjax.run import load_run

log = logging.getLogger("kronjax.retokenize")
SCENARIOS = ("self", "extend", "to16k", "pydoc", "self16k", "to4k")
ON_16K = ("self16k", "to4k")
EVAL_BYTES = 100_000  # of Shakespeare's 141 kB held-out split: CPU-sized, the same text
WORD = re.compile(r" ?[A-Za-z][a-z']+")


def frequent_split_words(tok: Tokenizer, text: str, n: int, max_bytes: int) -> list[str]:
    """The n most frequent words of text (with their leading space) that tok splits into
    two or more pieces and that fit max_bytes (the codec holds them whole)."""
    counts = Counter(WORD.findall(text))
    words = [w for w, _ in counts.most_common() if len(w.encode()) <= max_bytes]
    out = []
    for w, ids in zip(words, tok.encode_batch(words)):
        if len(ids) > 1:
            out.append(w)
        if len(out) == n:
            break
    return out


def run_config(workdir: Path) -> Any:
    """A compare run's recorded config (written when it starts, before it finishes)."""
    return config_lib.build_config(workdir / "config.json", [])


def finished(workdir: Path) -> bool:
    from kronjax.compare import is_finished

    return (workdir / "config.json").exists() and is_finished(
        workdir, int(run_config(workdir).train.steps))


def tokenizers(out: Path, src4k: Path, runs16k: Path, n_extend: int) -> dict[str, str]:
    """SPEC per scenario, making the extension list and the pydoc BPE once (the 16k runs'
    tokenizer: once their data are prepared)."""
    from kronjax.data import load_tokenizer_for

    tdir = out / "tokenizers"
    tdir.mkdir(parents=True, exist_ok=True)
    cfg4 = run_config(src4k)
    d4 = data_dir_for(cfg4)
    words = tdir / "extend.txt"
    if not words.exists():
        tok = load_tokenizer_for(d4)
        text = tok.decode(np.asarray(load_split(d4, "train")).tolist())
        chosen = frequent_split_words(tok, text, n_extend, int(cfg4.model.pos_dim))
        words.write_text("".join(w + "\n" for w in chosen))
    pydoc = tdir / "pydoc4096.model"
    if not pydoc.exists():
        from pydoc_data.topics import topics

        train_sentencepiece((topics[k] for k in sorted(topics)), 4096, tdir / "pydoc4096")
    specs = {"self": str(d4 / "tokenizer.model"), "extend": f"extend:{words}",
             "pydoc": str(pydoc)}
    made16 = sorted(runs16k.glob("*/config.json"))  # any 16k run that has started
    if made16:
        d16 = data_dir_for(run_config(made16[0].parent))
        if (d16 / "meta.json").exists():
            specs.update(to16k=str(d16 / "tokenizer.model"),
                         self16k=str(d16 / "tokenizer.model"), to4k=str(d4 / "tokenizer.model"))
    return specs


def finetune(w2: Path, steps: int) -> None:
    """`train --config W2/config.json --workdir W2` for `steps` steps (warmup a fifth)."""
    from kronjax.loop import train

    cfg = config_lib.build_config(w2 / "config.json", [
        ("train.steps", str(steps)), ("train.eval_every", str(steps)),
        ("train.checkpoint_every", str(steps)), ("train.progress", "False"),
        ("optim.warmup_steps", str(max(1, steps // 5)))])
    train(cfg, w2)


def zero_shot_item(out: Path, scenario: str, spec: str, src: Path, init: str,
                   source_bpb: dict[str, float]) -> dict[str, Any]:
    """Build W2 = OUT/<scenario>/<run> and score it and its source."""
    w2 = out / scenario / src.name
    if w2.exists():  # a half-built item of ours (the process was stopped): built again
        log.warning("rebuilding %s", w2)
        shutil.rmtree(w2)
    built = build.retokenize(src.resolve(), spec, w2, init=init, evaluate_bpb=False)
    if str(src) not in source_bpb:
        source_bpb[str(src)] = evaluate.held_out_bpb(load_run(src), max_bytes=EVAL_BYTES)["bpb"]
    zero = evaluate.held_out_bpb(load_run(w2), max_bytes=EVAL_BYTES)
    return {**built.record, "scenario": scenario, "run": src.name, "w2": str(w2),
            "val_bpb_source": source_bpb[str(src)], "val_bpb_zero_shot": zero["bpb"],
            "val_tokens_new": zero["tokens"], "val_bytes": zero["bytes"]}


def finetune_item(record: dict[str, Any], steps: int) -> dict[str, Any]:
    """Fine-tune a zero-shot item's W2 (resumed if a fine-tune was stopped) and score it."""
    w2 = Path(record["w2"])
    finetune(w2, steps)
    return {**record, "finetune_steps": steps,
            "val_bpb_finetuned": evaluate.held_out_bpb(load_run(w2), max_bytes=EVAL_BYTES)["bpb"]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.retokenize.experiment",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs4k", required=True, type=Path)
    p.add_argument("--runs16k", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--arms", default="bpe_untied,bpe_tied,kron,kron_tied")
    p.add_argument("--arms16k", default=None, help="arms of the 16k runs (default: --arms)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--init", default="fvt")
    p.add_argument("--finetune", type=int, default=50, help="steps; 0 = zero-shot only")
    p.add_argument("--extend", type=int, default=300, help="words added in `extend`")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    console.setup_logging("warning")
    from kronjax import compile_cache

    compile_cache.configure(str(compile_cache.default_dir()))  # one compile per shape, not item
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    arms16 = (args.arms16k or args.arms).split(",")
    scenarios = args.scenarios.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = report.read_results(results)
    if not args.report_only:
        specs = tokenizers(args.out, args.runs4k / f"{arms[0]}_s{seeds[0]}", args.runs16k,
                           args.extend)
        cache_path = args.out / "source_bpb.json"
        source_bpb = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        for seed in seeds:  # seed-major: a stopped experiment has whole seeds of every arm
            for scenario in scenarios:
                if scenario not in specs:
                    log.warning("no 16k runs in %s: %s skipped", args.runs16k, scenario)
                    continue
                on16 = scenario in ON_16K
                for arm in (arms16 if on16 else arms):
                    src = (args.runs16k if on16 else args.runs4k) / f"{arm}_s{seed}"
                    rec = done.get((scenario, src.name))
                    if rec is None and not finished(src):
                        log.warning("%s has not finished: %s skipped", src, scenario)
                        continue
                    if rec is not None and (not args.finetune or "val_bpb_finetuned" in rec):
                        continue
                    began = time.perf_counter()
                    if rec is None:
                        rec = zero_shot_item(args.out, scenario, specs[scenario], src,
                                             args.init, source_bpb)
                        cache_path.write_text(json.dumps(source_bpb, indent=1))
                    if args.finetune:
                        rec = finetune_item(rec, args.finetune)
                    rec = {**rec, "seconds": rec.get("seconds", 0) + time.perf_counter() - began}
                    with results.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    done[(scenario, src.name)] = rec
                    print(json.dumps({k: rec.get(k) for k in (
                        "scenario", "run", "val_bpb_source", "val_bpb_zero_shot",
                        "val_bpb_finetuned")}), flush=True)
    summary = report.summarise(list(done.values()))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(report.to_markdown(summary))
    print(report.to_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
