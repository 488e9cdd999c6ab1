"""Decoding from a trained run: greedy or nucleus sampling, with byte overrides.

With a Kronecker arm, a word with no single token can sit at one position of the prompt,
embedded from its bytes (`oov`): the forced out-of-vocabulary probe. `python -m
kronjax.sample` is the command line; kronjax.probes.generation decodes many prompts at once
and must give exactly `generate`'s tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kronjax.data.tokenizers import Tokenizer
from kronjax.embed import ByteOverride
from kronjax.errors import UserError
from kronjax.run import Loaded

__all__ = ["OOV_MARK", "encode_prompt", "generate", "text_arg"]

OOV_MARK = "{oov}"


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
    if oov is not None:
        run.model.config.require_kron("--oov")
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
