"""A trained run's weights as GPT-2 names them, and outputs written whole.

The codec is fixed, so at inference a kron model's input table is K @ W (V x d),
materialised once here, and kron_tied's head is that table times its logit factor
(kronjax.model.KRON_TIED_LOGIT_SCALE). `gpt2_state` names the weights as both nanoGPT and
transformers do; kronjax.export.hf and kronjax.export.nanogpt only change the layout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kronjax import storage
from kronjax.metrics import read_metrics
from kronjax.model import GPT, KRON_TIED_LOGIT_SCALE
from kronjax.run import Loaded
from kronjax.workdir import Workdir

log = logging.getLogger("kronjax.export")

# (module, input width in units of n_embd) of each Linear, as nanoGPT and GPT-2 name them
LINEARS = (("attn.c_attn", 1), ("attn.c_proj", 1), ("mlp.c_fc", 1), ("mlp.c_proj", 4))
NORMS = ("ln_1", "ln_2")


class ExportError(ValueError):
    """A run or an output path that cannot be exported as asked."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a model card or a nanoGPT checkpoint says about the run it came from."""

    workdir: str
    arm: str
    step: int
    val_loss: float | None       # the last evaluation at or before `step`, nats
    val_step: int | None         # the step of that evaluation
    best_val_loss: float | None  # the lowest evaluation up to `step`
    tokenizer: str
    tokenizer_fingerprint: str
    vocab_fingerprint: str | None  # the codec's byte vocabulary (kron arms)
    tokenizer_vocab_size: int
    config: dict[str, Any]


def run_info(run: Loaded, workdir: str | Path | Workdir) -> RunInfo:
    """The run's arm, step, validation losses (from metrics.jsonl) and fingerprints."""
    evals = [(r["step"], float(r["val_loss"]))
             for r in read_metrics(Workdir.at(workdir).metrics)
             if r["step"] <= run.step and isinstance(r.get("val_loss"), (int, float))
             and math.isfinite(r["val_loss"])]
    last = evals[-1] if evals else (None, None)
    vocab = run.model.vocab
    return RunInfo(str(workdir), run.model.config.arm, run.step, last[1], last[0],
                   min(v for _, v in evals) if evals else None,
                   run.tokenizer.spec, run.tokenizer.fingerprint,
                   vocab.fingerprint if vocab is not None else None,
                   run.tokenizer.vocab_size, run.cfg.to_dict())


def _codec_table(module: GPT) -> jax.Array:
    return module.kron.table()


def input_table(run: Loaded) -> np.ndarray:
    """The V x d input table: wte, or for the kron arms K @ W by the closed form (the same
    rows the model looks up; padded ids have no bytes and embed to zero)."""
    if not run.model.config.is_kron:
        return np.asarray(run.params["wte"]["embedding"], np.float32)
    table = run.model.apply({"params": run.params}, method=_codec_table)
    return np.asarray(table, np.float32)


def gpt2_state(run: Loaded) -> dict[str, np.ndarray]:
    """float32 weights under nanoGPT's / GPT-2's names, Linear weights as (in, out).

    Biases only where the run has them (config bias=True); lm_head.weight only for untied
    heads (kron_tied's is its table times KRON_TIED_LOGIT_SCALE).
    """
    c = run.model.config
    p = jax.device_get(run.params)
    table = input_table(run)
    out = {"transformer.wte.weight": table, "transformer.wpe.weight": p["wpe"]["embedding"]}
    for i in range(c.n_layer):
        block, prefix = p[f"h_{i}"], f"transformer.h.{i}."
        for norm in NORMS:
            _norm(out, prefix + norm, block[norm])
        for name, width in LINEARS:
            group, leaf = name.split(".")
            params = block[group][leaf]
            out[f"{prefix}{name}.weight"] = np.reshape(params["kernel"], (width * c.n_embd, -1))
            if "bias" in params:
                out[f"{prefix}{name}.bias"] = np.reshape(params["bias"], (-1,))
    _norm(out, "transformer.ln_f", p["ln_f"])
    if c.arm == "kron_tied":
        out["lm_head.weight"] = table * np.float32(KRON_TIED_LOGIT_SCALE)
    elif not c.is_tied:
        out["lm_head.weight"] = np.asarray(p["lm_head"]["kernel"]).T
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}  # writable copies


def _norm(out: dict[str, np.ndarray], name: str, params: dict[str, Any]) -> None:
    out[f"{name}.weight"] = params["scale"]
    if "bias" in params:
        out[f"{name}.bias"] = params["bias"]


def kron_projection(run: Loaded) -> np.ndarray:
    """W (C x d) of a kron arm: what the authors' KroneckerEmbedding learns."""
    if not run.model.config.is_kron:
        raise ExportError(f"arm {run.model.config.arm!r} has no Kronecker projection")
    return np.asarray(run.params["kron"]["projection"], np.float32)


# -- writing outputs whole ------------------------------------------------------------------

def check_out(out: Path | Any, force: bool, directory: bool) -> list[str]:
    """Refuse an output of the wrong kind, or one already taken unless force; returns the
    entries of an existing output directory."""
    if directory and out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; hf exports to a directory")
    if not directory and out.is_dir():
        raise ExportError(f"--out {out} is a directory; nanogpt exports to a file (ckpt.pt)")
    existing = sorted(p.name for p in out.iterdir()) if directory and out.is_dir() else []
    if existing and not force:
        raise ExportError(f"--out {out} is not empty ({len(existing)} entries); pass --force "
                          f"to replace the files this export writes, or choose another directory")
    if not directory and out.exists() and not force:
        raise ExportError(f"--out {out} already exists; pass --force to replace it")
    return existing


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give path (and what it holds) the modes of a plain write under the umask: mkdtemp and
    mkstemp make 0700 and 0600, which would leave an export private to its writer."""
    mask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def clear_stale(out: Path) -> None:
    """Remove what a killed export to `out` left beside it (`.OUT.tmp-*/`, `.OUT.*.tmp`),
    named in a warning: the next export to the same place cleans up after the killed one."""
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        stale = (p.name.startswith(f".{out.name}.tmp-") or
                 (p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp")))
        if stale and not p.is_symlink():
            log.warning("removing %s, left by an export to %s that did not finish", p, out)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def write_dir(out: Path | Any, force: bool, fill: Callable[[Path], None]) -> list[str]:
    """Let `fill` write into a fresh directory beside `out`, then move it into place.

    A non-empty `out` is refused unless force; with force the new files replace their
    namesakes and other files are kept (returned, so the caller can say so). An export that
    fails leaves `out` as it was. A gs:// `out` gets the files uploaded one by one once all
    are written, config.json last (what loaders open first).
    """
    existing = check_out(out, force, directory=True)
    if not isinstance(out, Path):
        with tempfile.TemporaryDirectory(prefix="kronjax-export-") as tmp:
            fill(Path(tmp))
            written = sorted(p.name for p in Path(tmp).iterdir())
            for name in sorted(written, key=lambda n: n == "config.json"):
                storage.upload(Path(tmp) / name, out / name)
        return [name for name in existing if name not in written]
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        fill(tmp)
        follow_umask(tmp)
        written = sorted(p.name for p in tmp.iterdir())
        if not existing:
            if out.is_dir():
                out.rmdir()
            os.replace(tmp, out)
        else:
            for name in written:
                target = out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(tmp / name, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return [name for name in existing if name not in written]


def write_file(out: Path | Any, force: bool, fill: Callable[[Path], None]) -> None:
    """`fill` writes a temporary file beside `out`, renamed over it (refused if out exists
    unless force); a gs:// `out` is uploaded once written."""
    check_out(out, force, directory=False)
    if not isinstance(out, Path):
        with tempfile.TemporaryDirectory(prefix="kronjax-export-") as tmp:
            fill(Path(tmp) / out.name)
            storage.upload(Path(tmp) / out.name, out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(Path(tmp))
        follow_umask(Path(tmp))
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
