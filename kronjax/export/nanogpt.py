"""A run as nanoGPT's `ckpt.pt`: {model, model_args, iter_num, best_val_loss, config}.

`model` is the state dict nanoGPT's GPT (model.py) has: its names, nn.Linear weights as
(out, in), biases only where the run has them (nanoGPT's bias=False drops them too), and
lm_head.weight beside transformer.wte.weight (nanoGPT's state_dict lists the tied pair twice).

Untied heads (every arm but bpe_tied) add `untied_head: True` to model_args: nanoGPT ties
lm_head to wte when it builds the model, which would silently replace the trained head, so
a stock GPTConfig(**model_args) refuses the key instead; a GPT that keeps its own head
loads the state dict as it is. kron_tied's head is its codec table times the logit factor.

Kron arms: `transformer.wte` is the authors' `KroneckerEmbedding`, whose state dict is only
`projection.weight` (its byte and length buffers are non-persistent): the model holds
`transformer.wte.projection.weight`, and the checkpoint's `kronecker` entry holds the
buffers the module is built with (`KroneckerEmbedding(V, d, pos_dim=P,
byte_buffer=ck["kronecker"]["byte_buffer"], length_buffer=ck["kronecker"]["length_buffer"])`),
exactly as kronjax.interop writes them, with its metadata (fingerprint included).

Everything in it is plain tensors, numbers and strings, so `torch.load(weights_only=True)`
(torch's default since 2.6) reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kronjax import interop
from kronjax.export.state import (
    LINEARS,
    ExportError,
    RunInfo,
    gpt2_state,
    kron_projection,
    write_file,
)
from kronjax.run import Loaded

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
KRON_KEY = "kronecker"
WTE_PROJECTION = f"transformer.wte.{interop.WEIGHT}"


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ExportError("the nanogpt export needs torch: pip install -e '.[export]'") from e
    return torch


def model_args(run: Loaded) -> dict[str, Any]:
    """nanoGPT's GPTConfig fields, plus what a stock nanoGPT cannot build (see module doc)."""
    c = run.model.config
    args: dict[str, Any] = {k: getattr(c, k) for k in MODEL_ARGS}
    args["dropout"] = float(args["dropout"])
    if c.arm != "bpe_tied":
        args["untied_head"] = True
    if c.is_kron:
        args.update(wte="KroneckerEmbedding", pos_dim=c.pos_dim)
    return args


def state_dict(run: Loaded) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(nanoGPT's model state dict as torch tensors, the kron arms' `kronecker` entry)."""
    torch = _torch()
    linear = tuple(f"{name}.weight" for name, _ in LINEARS)
    sd = {k: torch.from_numpy(v.T.copy() if k.endswith(linear) else v)
          for k, v in gpt2_state(run).items()}
    if run.model.config.arm == "bpe_tied":
        sd["lm_head.weight"] = sd["transformer.wte.weight"]  # one tensor, as nanoGPT ties
    if not run.model.config.is_kron:
        return sd, None
    del sd["transformer.wte.weight"]
    tensors, meta = interop.projection_tensors(kron_projection(run), run.model.vocab)
    sd[WTE_PROJECTION] = torch.from_numpy(tensors.pop(interop.WEIGHT))
    kron = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}  # vocab is read-only
    kron["metadata"] = meta
    return sd, kron


def checkpoint(run: Loaded, info: RunInfo) -> dict[str, Any]:
    """The dict torch.save writes (see the module docstring)."""
    sd, kron = state_dict(run)
    best = info.best_val_loss if info.best_val_loss is not None else float("inf")
    config = {"kronjax_arm": info.arm, "untied_head": info.arm != "bpe_tied",
              "tokenizer": info.tokenizer, "tokenizer_fingerprint": info.tokenizer_fingerprint,
              "vocab_fingerprint": info.vocab_fingerprint, "val_loss": info.val_loss,
              "val_step": info.val_step,
              "kronjax_config": json.loads(json.dumps(info.config))}
    ck = {"model": sd, "model_args": model_args(run), "iter_num": info.step,
          "best_val_loss": best, "config": config}
    if kron is not None:
        ck[KRON_KEY] = kron
    return ck


def write(run: Loaded, info: RunInfo, out: Path, force: bool) -> list[str]:
    """torch.save the checkpoint to out, whole (see kronjax.export.state.write_file)."""
    torch = _torch()
    ck = checkpoint(run, info)
    write_file(out, force, lambda tmp: torch.save(ck, tmp))
    return []
