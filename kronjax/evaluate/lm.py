"""KronjaxLM: lm-evaluation-harness's LM interface over a trained run's own GPT.

No export: the run's params, its tokenizer and its context (`block_size`) are used as they
are. Requests are handled the way lm-eval's `hf` model (HFLM) handles them, so the numbers
match an `hf` evaluation of `python -m kronjax.export hf` (tests/test_evaluate.py, 1e-4):

- loglikelihood: lm-eval's TemplateLM encodes (context, continuation) (trailing context
  whitespace moves to the continuation; an empty context becomes the prefix token); the
  input is (context + continuation)[-(T + 1):][:-1] (left-truncated to the context T), and
  the continuation's tokens are scored from a log-softmax over the model's whole (padded)
  vocabulary, with `is_greedy` when each is the argmax. A continuation longer than T (which
  HFLM refuses) is scored in pieces of T tokens, each after the T tokens before it.
- loglikelihood_rolling: lm-eval's own disjoint rolling windows of T tokens
  (utils.get_rolling_token_windows, context_len 1), their log-likelihoods summed.
- generate_until: greedy (or temperature sampling with do_sample), the context
  left-truncated to T - max_gen_toks, stopping at an `until` string or the eot id; the text
  is cut at the first stop string (lm-eval's postprocess_generated_text).

The prefix token is the tokenizer's eot id, the document separator the model was trained
with (HFLM would take the exported tokenizer's bos, `<s>` for a sentencepiece run, which
kronjax never trains on; pass HFLM prefix_token_id=EOT to compare).

Batches have a fixed shape: B rows (the last batch padded with empty rows) of a length
bucket L, the smallest power of two >= 16 holding the batch's longest row, at most T. Each
(B, L) compiles once (and lands in the persistent compilation cache).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

log = logging.getLogger("kronjax.evaluate")

MIN_BUCKET = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default; capped at T - 1 here


def bucket_length(n: int, block_size: int) -> int:
    """The smallest power of two >= max(n, MIN_BUCKET), at most block_size."""
    length = MIN_BUCKET
    while length < n:
        length *= 2
    return min(length, block_size)


def _batches(order: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


class KronjaxLM(TemplateLM):
    """lm-eval's LM for a loaded run (`kronjax.run.load_run`): model, params, tokenizer."""

    def __init__(self, run: Any, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.run = run
        self.model, self.params, self.tok = run.model, run.params, run.tokenizer
        self.block_size = int(run.model.config.block_size)
        self.batch_size = batch_size
        self.seed = seed
        if self.tok.eot_id is None:
            log.warning("the tokenizer has no end-of-text id: id 0 is the prefix token")
        model = self.model

        @jax.jit
        def score(params: Any, ids_BxL: jax.Array, targets_BxL: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
            logits_BxLxV = model.apply({"params": params}, ids_BxL).astype(jnp.float32)
            logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
            logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
            return logp_BxL, jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL

        @jax.jit
        def next_logits(params: Any, ids_BxL: jax.Array, pos_B: jax.Array) -> jax.Array:
            logits_BxLxV = model.apply({"params": params}, ids_BxL).astype(jnp.float32)
            return jnp.take_along_axis(logits_BxLxV, pos_B[:, None, None], axis=1)[:, 0]

        self._score, self._next_logits = score, next_logits

    # -- what TemplateLM needs -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id if self.tok.eot_id is not None else 0

    @property
    def max_length(self) -> int:
        return self.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """kronjax's ids: its tokenizers add no special tokens."""
        return self.tok.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    def get_model_info(self) -> dict[str, Any]:
        c = self.model.config
        return {"model_name": f"kronjax {c.arm}", "kronjax_step": int(self.run.step),
                "kronjax_arm": c.arm, "block_size": c.block_size}

    # -- scoring -------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether each token was the argmax)."""
        T = self.block_size
        rows, owner = [], []
        for r, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("lm-eval gave an empty context or continuation")
            # A continuation longer than the context T (HFLM refuses one) is scored in
            # pieces of T tokens, each conditioned on the T tokens before it.
            for s in range(0, len(continuation), T):
                piece = list(continuation[s:s + T])
                whole = (list(context) + list(continuation[:s]) + piece)[-(T + 1):]
                rows.append((whole[:-1], whole[1:], len(piece)))
                owner.append(r)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first
        logps, greedy = np.zeros(len(requests), np.float64), np.ones(len(requests), bool)
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="kronjax loglikelihood")
        for batch in _batches(order, self.batch_size):
            L = bucket_length(len(rows[batch[0]][0]), T)
            ids = np.zeros((self.batch_size, L), np.int32)
            targets = np.zeros((self.batch_size, L), np.int32)
            for j, i in enumerate(batch):
                inp, tgt, _ = rows[i]
                ids[j, :len(inp)], targets[j, :len(tgt)] = inp, tgt
            logp_BxL, greedy_BxL = jax.device_get(self._score(self.params, ids, targets))
            for j, i in enumerate(batch):
                n, k = len(rows[i][0]), rows[i][2]
                logps[owner[i]] += logp_BxL[j, n - k:n].astype(np.float64).sum()
                greedy[owner[i]] &= bool(greedy_BxL[j, n - k:n].all())
            bar.update(len(batch))
        bar.close()
        answers = [(float(lp), bool(g)) for lp, g in zip(logps, greedy)]
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:  # (context, continuation); rolling windows have none
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        windows, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            for context, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, pred))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, scores):
            totals[r] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="kronjax generate_until")
        eot = self.tok.eot_id
        # Requests with equal generation settings are batched together, in order.
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(i)
        results: dict[int, str] = {}
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_gen = max(1, min(int(kwargs.pop("max_gen_toks")), self.block_size - 1))
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            sample = bool(kwargs.get("do_sample", False)) and temperature > 0
            for batch in _batches(indices, self.batch_size):
                contexts = [self.tok_encode(requests[i].args[0])[-(self.block_size - max_gen):]
                            or [self.prefix_token_id] for i in batch]
                texts = self._generate(contexts, max_gen, until, eot,
                                       temperature if sample else 0.0)
                for i, text in zip(batch, texts):
                    results[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(batch))
        bar.close()
        return [results[i] for i in range(len(requests))]

    def _generate(self, contexts: list[list[int]], max_gen: int, until: list[str],
                  eot: int | None, temperature: float) -> list[str]:
        """Extend each context by up to max_gen tokens in one (B, T) buffer."""
        T, B = self.block_size, self.batch_size
        buf = np.zeros((B, T), np.int32)
        lengths = np.ones(B, np.int64)
        for j, ctx in enumerate(contexts):
            buf[j, :len(ctx)] = ctx
            lengths[j] = len(ctx)
        new: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        rng = np.random.default_rng(self.seed)
        for _ in range(max_gen):
            logits_BxV = np.asarray(jax.device_get(self._next_logits(
                self.params, buf, jnp.asarray(lengths - 1, jnp.int32))), np.float64)
            for j in range(len(contexts)):
                if done[j]:
                    continue
                if temperature > 0:
                    z = logits_BxV[j] / temperature
                    p = np.exp(z - z.max())
                    tok = int(rng.choice(len(p), p=p / p.sum()))
                else:
                    tok = int(np.argmax(logits_BxV[j]))
                if eot is not None and tok == eot:
                    done[j] = True
                    continue
                new[j].append(tok)
                buf[j, lengths[j]] = tok
                lengths[j] += 1
                text = self.tok_decode(new[j])
                done[j] = lengths[j] >= T or any(s and s in text for s in until)
            if all(done):
                break
        return [self.tok_decode(ids) for ids in new]
