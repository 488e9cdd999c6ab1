"""`python -m kronjax.sample --workdir DIR --prompt "..." [--oov WORD] [--top-p 0.9]`.

Greedy or nucleus sampling from a trained run. With a Kronecker arm, `--oov WORD` embeds
WORD from its bytes at one position (where the prompt says `{oov}`, else at its end), so
the model reads a word that has no single token: the forced out-of-vocabulary probe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kronjax import checkpoint as ckpt
from kronjax import data as data_lib
from kronjax import optim
from kronjax.embed import ByteOverride
from kronjax.errors import UserError
from kronjax.model import GPT
from kronjax.step import init_state
from kronjax.data.tokenizers import Tokenizer
from kronjax import run as run_lib
from kronjax.workdir import Workdir

OOV_MARK = "{oov}"


@dataclasses.dataclass
class Loaded:
    """A trained run, ready to generate: model, params, tokenizer and its config."""

    model: GPT
    params: Any
    tokenizer: Tokenizer
    cfg: ml_collections.ConfigDict
    step: int


def load_run(workdir: str | Path | Workdir, step: int | None = None) -> Loaded:
    """Rebuild the model of a run from its saved config and restore its params (a local
    workdir or a gs:// one)."""
    wd = Workdir.at(workdir)
    if not wd.config.is_file():
        raise FileNotFoundError(f"{wd} holds no config.json: is it a kronjax.train workdir?")
    cfg = ml_collections.ConfigDict(json.loads(wd.config.read_text()))
    ddir = run_lib.data_dir_for(cfg)
    tokenizer = data_lib.load_tokenizer_for(run_lib.local_tokenizer_dir(ddir))
    model = run_lib.build_model(cfg, tokenizer.vocab_size, tokenizer.byte_vocab)
    mcfg, vocab = model.config, model.vocab
    checkpointer = ckpt.Checkpointer(wd.checkpoints, save_every=1)
    try:
        meta = checkpointer.read_meta(step)
        if meta is None:
            raise FileNotFoundError(f"no checkpoint in {wd.checkpoints}")
        if vocab is not None and meta.get("vocab_fingerprint") != vocab.fingerprint:
            raise ckpt.IncompatibleCheckpointError(
                f"the tokenizer in {ddir} gives vocabulary {vocab.fingerprint[:12]} but the "
                f"checkpoint was trained on {str(meta.get('vocab_fingerprint'))[:12]}")
        tx, _ = optim.from_config(cfg)
        abstract = jax.eval_shape(lambda: init_state(model, tx, 0, mcfg.block_size))
        state, _ = checkpointer.restore(step, abstract, None)
    finally:
        checkpointer.close()
    return Loaded(model, state["params"], tokenizer, cfg, int(state["step"]))


def _next_token(logits_V: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Greedy when temperature == 0, else nucleus sampling over the top-p mass."""
    if temperature <= 0:
        return jnp.argmax(logits_V)
    logits_V = logits_V / temperature
    order = jnp.argsort(-logits_V)
    probs = jax.nn.softmax(logits_V[order])
    keep = jnp.cumsum(probs) - probs < top_p  # always keeps the top token
    masked = jnp.where(keep, logits_V[order], -jnp.inf)
    return order[jax.random.categorical(rng, masked)]


def generate(run: Loaded, ids: Sequence[int], n_new: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, oov: tuple[int, bytes] | None = None
             ) -> list[int]:
    """Extend ids by n_new tokens; `oov=(position, word_bytes)` overrides one position."""
    block = run.model.config.block_size
    if len(ids) + n_new > block:
        raise UserError(f"prompt ({len(ids)} tokens) + {n_new} new tokens exceeds the "
                        f"model's block_size {block}")
    if oov is not None and not run.model.config.is_kron:
        raise UserError(f"--oov needs a Kronecker arm; this run's arm is {run.model.config.arm}")
    buf = np.zeros((1, block), np.int32)
    buf[0, :len(ids)] = ids
    override = None
    if oov is not None:
        override = ByteOverride.single((1, block), (0, oov[0]), oov[1], run.model.config.pos_dim)

    @jax.jit
    def logits_at(params: Any, buf_1xT: jax.Array, pos: jax.Array) -> jax.Array:
        logits = run.model.apply({"params": params}, buf_1xT, override=override)
        return logits[0, pos]

    rng = jax.random.key(seed)
    out = list(ids)
    for i in range(n_new):
        pos = len(out) - 1
        logits_V = logits_at(run.params, jnp.asarray(buf), jnp.asarray(pos))
        tok = int(_next_token(logits_V, jax.random.fold_in(rng, i), temperature, top_p))
        buf[0, pos + 1] = tok
        out.append(tok)
    return out


def encode_prompt(tokenizer: Tokenizer, prompt: str, oov: str | None
                  ) -> tuple[list[int], tuple[int, bytes] | None]:
    """Token ids of the prompt, with one placeholder id where the OOV word goes."""
    if oov is None:
        return tokenizer.encode(prompt), None
    before, _, after = prompt.partition(OOV_MARK) if OOV_MARK in prompt else (prompt, "", "")
    head = tokenizer.encode(before)
    position = len(head)
    # The OOV word's bytes as given, invalid UTF-8 included: the codec embeds any bytes.
    return head + [0] + (tokenizer.encode(after) if after else []), (position, os.fsencode(oov))


def text_arg(flag: str, value: str) -> str:
    """A command-line text as valid Unicode: bytes that are not UTF-8 reach Python as lone
    surrogates (surrogateescape), which the tokenizers reject with a traceback."""
    raw = os.fsencode(value)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} holds bytes that are not UTF-8 (byte {e.start}: "
                        f"{raw[e.start:e.start + 1]!r}); pass text, or the word as --oov, "
                        "which is embedded from its raw bytes") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--tokens", type=int, default=64, help="new tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oov", default=None, help="a word embedded from its bytes at {oov}")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = p.parse_args(argv)
    if args.tokens < 0:
        p.error(f"--tokens must be >= 0; got {args.tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error(f"--temperature must be >= 0 and --top-p in (0, 1]; got {args.temperature}, "
                f"{args.top_p}")
    try:
        prompt = text_arg("--prompt", args.prompt)
    except UserError as e:
        p.error(str(e))
    run = load_run(args.workdir, args.step)
    ids, oov = encode_prompt(run.tokenizer, prompt, args.oov)
    if not ids:
        ids = [run.tokenizer.eot_id if run.tokenizer.eot_id is not None else 0]
    n_new = min(args.tokens, run.model.config.block_size - len(ids))
    try:
        out = generate(run, ids, n_new, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, oov=oov)
    except UserError as e:
        p.error(str(e))
    text = run.tokenizer.decode(out[len(ids):])
    oov_text = os.fsdecode(oov[1]) if oov else ""
    shown = prompt.replace(OOV_MARK, oov_text) if oov else prompt
    if oov and OOV_MARK not in prompt:
        shown = prompt + oov_text
    shown = shown.encode("utf-8", "replace").decode()  # an --oov of raw bytes shows as such
    print(shown + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
