"""`python -m kronjax.export {hf,nanogpt} --workdir W --out OUT [--step N] [--force]`.

Takes a trained run anywhere: `hf` writes a Hugging Face `GPT2LMHeadModel` directory
(kronjax.export.hf) that transformers, lm-eval-harness and vLLM load without custom code;
`nanogpt` writes nanoGPT's `ckpt.pt` (kronjax.export.nanogpt).

Every arm becomes a stock GPT-2: the codec is fixed, so at inference a kron model's input
table is K @ W (V x d), materialised once here, and kron_tied's head is that table times
its logit factor (kronjax.model.KRON_TIED_LOGIT_SCALE). The weights are named as both
nanoGPT and transformers name them (`gpt2_state`); each writer only changes the layout.

Nothing already written is lost: an existing output is refused unless --force, and
outputs appear whole (written beside, then renamed). Workdir and output may be gs:// URLs.

  state    the weights by GPT-2 name (the codec table materialised), the run's facts, writing
           outputs whole
  hf       a transformers directory (config, safetensors, tokenizer.json, model card)
  nanogpt  nanoGPT's ckpt.pt
  cli      the command line
"""

from __future__ import annotations

from pathlib import Path

from kronjax import storage
from kronjax.export import hf, nanogpt
from kronjax.export.state import ExportError, check_out, run_info
from kronjax.run import load_run
from kronjax.workdir import Workdir

__all__ = ["ExportError", "export"]


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
    writer = hf if fmt == "hf" else nanogpt
    return writer.write(run, info, out, force)
