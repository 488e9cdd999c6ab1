"""A trained run W with another tokenizer: W2, a normal run directory, without retraining.

W2 holds the tokenizer (W2/tokenizer/*.model), the run's corpus re-tokenized with it
(W2/data, prepared by kronjax.data exactly as train prepares, so the held-out split is the
same text), config.json (W's, with the new data; `train --config W2/config.json --workdir W2`
fine-tunes from W2's weights) and a checkpoint at step 0 with a fresh optimizer state:

  kron       the same W (the codec embeds any token from its bytes); a new head, rows by init
  kron_tied  nothing new: input and head both come from the codec table K @ W
  bpe_*      the input table (and bpe_untied's head) by init

Every other parameter is W's. `sample`, the probes and `export` read W2 like any run.
W2/retokenize.json records where it came from. A kron target whose tokens exceed pos_dim
bytes is refused past `max_truncated` (a fraction of its tokens), with how many collide.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from kronjax import run as run_lib
from kronjax.data import cache as data_cache
from kronjax.data import load_meta
from kronjax.data.tokenizers import Tokenizer
from kronjax.errors import UserError
from kronjax.files import write_atomic
from kronjax.retokenize import evaluate, specs
from kronjax.retokenize.mapping import TokenMap, map_tokens
from kronjax.retokenize.rows import INITS, new_matrix
from kronjax.workdir import Workdir

log = logging.getLogger("kronjax.retokenize")

RECORD = "retokenize.json"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
MAX_TRUNCATED = 0.05


class RetokenizeError(UserError):
    """A retokenization that cannot be done as asked; the message says why."""


def truncation_report(tok: Tokenizer, pos_dim: int) -> dict[str, int]:
    """How many of tok's tokens exceed pos_dim bytes (cut by the codec), and how many of
    those share a codec row with another token (indistinguishable on the codec's side)."""
    vocab = tok.byte_vocab(pos_dim)
    return {"tokens": int(vocab.coverage()["assigned"]),
            "truncated": int(vocab.coverage()["truncated"]),
            "truncated_colliding": int(vocab.collisions()["tokens_truncated_in_groups"])}


def check_truncation(report: dict[str, int], pos_dim: int, max_truncated: float,
                     spec: str) -> None:
    share = report["truncated"] / max(report["tokens"], 1)
    if share > max_truncated:
        raise RetokenizeError(
            f"{spec!r}: {report['truncated']} of {report['tokens']} tokens exceed pos_dim "
            f"{pos_dim} bytes and are truncated by the codec ({report['truncated_colliding']} "
            f"of them share a codec row with another token); at most {max_truncated:.0%} may "
            "be (--max-truncated), or use a run with a larger pos_dim")
    if report["truncated"]:
        log.warning("%d of %d tokens exceed pos_dim %d bytes and are truncated (%d collide)",
                    report["truncated"], report["tokens"], pos_dim,
                    report["truncated_colliding"])


def transplant(src_params: Any, tmap: TokenMap, n_src: int, init: str,
               n_padded: int) -> dict[str, Any]:
    """W's params as NumPy with the table and head rows for the new vocabulary
    (module docstring); everything else is the same arrays."""
    params = jax.tree.map(np.asarray, jax.device_get(src_params))
    out = dict(params)
    if "lm_head" in params:
        kernel_DxV = params["lm_head"]["kernel"]
        out["lm_head"] = {**params["lm_head"],
                          "kernel": new_matrix(kernel_DxV.T, n_src, tmap, init, n_padded).T}
    if "wte" in params:
        out["wte"] = {**params["wte"], "embedding": new_matrix(
            params["wte"]["embedding"], n_src, tmap, init, n_padded)}
    return out


def new_config(cfg: ml_collections.ConfigDict, out: Path, made: specs.Materialised,
               name: str) -> ml_collections.ConfigDict:
    """W's config with W2's data: its own data directory and tokenizer file."""
    cfg2 = ml_collections.ConfigDict(cfg.to_dict())
    cfg2.data.dir = str(out / DATA_DIR)
    if made.tiktoken_spec is not None:
        cfg2.data.tokenizer = made.tiktoken_spec
    else:
        cfg2.data.tokenizer = f"sentencepiece:{out / TOKENIZER_DIR / name}"
        cfg2.data.sp_vocab_size = made.tokenizer.vocab_size
    return cfg2


@dataclasses.dataclass
class Built:
    out: Path
    record: dict[str, Any]


def retokenize(workdir: str | Path, spec: str, out: str | Path, *, init: str = "fvt",
               max_truncated: float = MAX_TRUNCATED, step: int | None = None,
               evaluate_bpb: bool = True) -> Built:
    """Build W2 at `out` from the run in `workdir` (module docstring); with evaluate_bpb,
    score W and W2 on their held-out splits (bits per UTF-8 byte)."""
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise RetokenizeError(f"--out {out} already exists; name a new directory (nothing "
                              "there is replaced)")
    if init not in INITS:
        raise RetokenizeError(f"--init must be one of {', '.join(INITS)}; got {init!r}")
    target = specs.parse_spec(spec)
    src = run_lib.load_run(workdir, step)
    cfg = src.cfg
    mcfg = src.model.config
    if int(float(cfg.data.get("max_tokens", 0) or 0)):
        log.warning("data.max_tokens counts tokens: under another tokenizer the held-out "
                    "split may hold other documents")
    request = load_meta(data_cache.data_dir_for(cfg)).get("request", {})
    made = specs.materialise(target, src.tokenizer, str(cfg.data.source), request)
    report = truncation_report(made.tokenizer, mcfg.pos_dim) if mcfg.is_kron else {}
    if mcfg.is_kron:
        check_truncation(report, mcfg.pos_dim, max_truncated, spec)
    tmap = map_tokens(src.tokenizer, made.tokenizer)
    name = f"{target.kind}.model"
    cfg2 = new_config(cfg, out, made, name)
    out.mkdir(parents=True)
    try:
        if made.model_bytes is not None:
            (out / TOKENIZER_DIR).mkdir()
            write_atomic(out / TOKENIZER_DIR / name, made.model_bytes)
        new = _write_run(cfg2, out, src, tmap, init)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # ours, half made: never a run to resume
        raise
    record = {"source": str(Path(workdir).expanduser().resolve()), "source_step": src.step,
              "tokenizer": spec, "target": made.note, "arm": mcfg.arm, "init": init,
              "vocab_source": src.tokenizer.vocab_size, "vocab_new": new.tokenizer.vocab_size,
              "new_tokens": tmap.n_new, "kept_tokens": int((tmap.exact >= 0).sum()),
              **{f"codec_{k}": v for k, v in report.items()}}
    if evaluate_bpb:
        before, after = evaluate.held_out_bpb(src), evaluate.held_out_bpb(new)
        record.update(val_bpb_source=before["bpb"], val_bpb_zero_shot=after["bpb"],
                      val_bytes_source=before["bytes"], val_bytes_new=after["bytes"],
                      val_tokens_source=before["tokens"], val_tokens_new=after["tokens"])
    write_atomic(out / RECORD, (json.dumps(record, indent=1) + "\n").encode())
    return Built(out, record)


def _write_run(cfg2: ml_collections.ConfigDict, out: Path, src: run_lib.Loaded,
               tmap: TokenMap, init: str) -> run_lib.Loaded:
    """Prepare W2's data, save the transplanted params at step 0, read W2 back."""
    run = run_lib.assemble(cfg2, Workdir.at(out))  # data prepared, config recorded
    try:
        n_padded = run.model.config.vocab_size
        params = transplant(src.params, tmap, src.tokenizer.vocab_size, init, n_padded)
        want = jax.tree.map(lambda a: (a.shape, a.dtype), run.state["params"])
        have = jax.tree.map(lambda a: (a.shape, a.dtype), params)
        if jax.tree.structure(want) != jax.tree.structure(have) or want != have:
            raise RetokenizeError(f"the new model's parameters do not match W's: {want} vs "
                                  f"{have}")
        sh = run.plan.state_sh
        placed = jax.device_put(params, sh["params"])
        state = {"step": jax.device_put(np.zeros((), np.int32), sh["step"]), "params": placed,
                 "opt_state": jax.jit(run.tx.init, out_shardings=sh["opt_state"])(placed)}
        run.checkpointer.save(0, state, run.data_iter, run.meta, force=True)
    finally:
        run.checkpointer.close()
    return run_lib.load_run(out)
