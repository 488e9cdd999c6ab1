"""`python -m kronjax.export {hf,nanogpt} --workdir W --out OUT [--step N] [--force]`.

Takes a trained run anywhere: `hf` writes a Hugging Face `GPT2LMHeadModel` directory
(kronjax.export_hf) that transformers, lm-eval-harness and vLLM load without custom code;
`nanogpt` writes nanoGPT's `ckpt.pt` (kronjax.export_nanogpt).

Every arm becomes a stock GPT-2: the codec is fixed, so at inference a kron model's input
table is K @ W (V x d), materialised once here, and kron_tied's head is that table times
its logit factor (kronjax.model.KRON_TIED_LOGIT_SCALE). The weights are named as both
nanoGPT and transformers name them (`gpt2_state`); each writer only changes the layout.

Nothing already written is lost: an existing output is refused unless --force, and
outputs appear whole (written beside, then renamed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from kronjax import export_hf, export_nanogpt, storage
from kronjax.export_state import ExportError, check_out, run_info
from kronjax.sample import load_run
from kronjax.workdir import Workdir


# -- command line -----------------------------------------------------------------------------

def export(fmt: str, workdir: str | Path, out: str | Path, step: int | None = None,
           force: bool = False) -> list[str]:
    """Export a run's checkpoint (latest, or `step`) as `fmt` ("hf" or "nanogpt") to out.

    Returns warnings worth showing (a tokenizer transformers cannot read, kept files).
    """
    workdir, out = Workdir.at(workdir), storage.as_path(out)
    if not workdir.root.is_dir():
        raise ExportError(f"--workdir {workdir} does not exist; expected a kronjax.train workdir")
    if fmt not in ("hf", "nanogpt"):
        raise ExportError(f"unknown format {fmt!r}; expected 'hf' or 'nanogpt'")
    check_out(out, force, directory=fmt == "hf")  # before the (slower) restore
    run = load_run(workdir, step)
    info = run_info(run, workdir)
    writer = export_hf if fmt == "hf" else export_nanogpt
    return writer.write(run, info, out, force)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=("hf", "nanogpt"),
                   help="hf: a transformers GPT2LMHeadModel directory; nanogpt: a ckpt.pt file")
    p.add_argument("--workdir", required=True, help="a kronjax.train workdir")
    p.add_argument("--out", required=True, help="hf: a directory; nanogpt: a file (ckpt.pt)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--force", action="store_true",
                   help="replace what this export writes in an existing --out")
    args = p.parse_args(argv)
    try:
        warnings = export(args.format, args.workdir, args.out, args.step, args.force)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
