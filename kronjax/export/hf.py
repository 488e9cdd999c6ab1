"""A run as a Hugging Face `GPT2LMHeadModel` directory: config.json, model.safetensors, the
tokenizer (tokenizer.json) and a README.md model card. No custom code is needed to load it.

kronjax's GPT is GPT-2 exactly as transformers computes it (exact erf GELU: "gelu", not
GPT-2's tanh "gelu_new"; LayerNorm eps 1e-5; attention scaled by 1/sqrt(head dim); learned
positions), so the config below reproduces its logits. bias=False layers become zero biases
(GPT-2 always has them); untied heads set tie_word_embeddings=False.

Tokenizers: sentencepiece models go through transformers' own converter, which follows the
model's normaliser settings; tiktoken BPEs become a byte-level BPE with tiktoken's split
regex. Special-token text is split like ordinary text (split_special_tokens), as kronjax
encodes it. Each export re-encodes CHECK_TEXTS both ways and says plainly, on stderr and
in the card, where the two disagree or where no tokenizer could be written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from kronjax import interop
from kronjax.data.tokenizers import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer
from kronjax.export.state import ExportError, RunInfo, gpt2_state, kron_projection, write_dir
from kronjax.layers import INIT_STD, LN_EPS
from kronjax.run import Loaded

KRON_FILE = "kronecker_embedding.safetensors"
CHECK_TEXTS = ("Hello, world! The quick brown fox jumps over the lazy dog.",
               "  two  spaces,\ttabs\nand newlines\n\n", "digits 1234567890 and 3.14159",
               "ünïcödé, 漢字, emoji 🙂 and a U+2581 ▁ mark",
               "def f(x):\n    return x ** 2  # code", "It's, we'LL see; don't\r\n\r\n  end   ",
               "special text </s> <s> <|endoftext|>")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ExportError("the hf export needs transformers: pip install -e '.[export]'") from e
    return transformers


def hf_config(run: Loaded, eos_id: int | None) -> Any:
    """GPT2Config computing exactly what kronjax's GPT computes."""
    c = run.model.config
    return _transformers().GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
        n_layer=c.n_layer, n_head=c.n_head, n_inner=4 * c.n_embd,
        activation_function="gelu", layer_norm_epsilon=LN_EPS, initializer_range=INIT_STD,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, tie_word_embeddings=c.arm == "bpe_tied",
        bos_token_id=eos_id, eos_token_id=eos_id, architectures=["GPT2LMHeadModel"],
        dtype="float32")


def hf_tensors(run: Loaded) -> dict[str, np.ndarray]:
    """GPT-2's state dict (Conv1D weights are (in, out), as gpt2_state gives them), with
    zero biases where kronjax has none and no lm_head.weight when it is tied."""
    c = run.model.config
    state = gpt2_state(run)
    d = c.n_embd
    widths = {"attn.c_attn": 3 * d, "attn.c_proj": d, "mlp.c_fc": 4 * d, "mlp.c_proj": d}
    zero_bias = {f"{p}.bias": d for p in ["transformer.ln_f"] + [
        f"transformer.h.{i}.{n}" for i in range(c.n_layer) for n in ("ln_1", "ln_2")]}
    zero_bias.update({f"transformer.h.{i}.{n}.bias": w
                      for i in range(c.n_layer) for n, w in widths.items()})
    for name, width in zero_bias.items():
        state.setdefault(name, np.zeros((width,), np.float32))
    return state


# -- tokenizer ------------------------------------------------------------------------------

def hf_tokenizer(tokenizer: Tokenizer, max_length: int) -> tuple[Any | None, str]:
    """(a transformers fast tokenizer equal to `tokenizer`, or None; a note for the card).

    The converters are transformers' own; an older transformers that lacks one gives None
    and says so, rather than a tokenizer that might encode differently.
    """
    transformers = _transformers()
    kw = dict(split_special_tokens=True, model_max_length=max_length,
              clean_up_tokenization_spaces=False)
    try:
        if isinstance(tokenizer, SentencePieceTokenizer):
            backend = _sentencepiece_backend(tokenizer.processor)
            sp = tokenizer.processor
            names = {"eos_token": sp.eos_id(), "bos_token": sp.bos_id(), "unk_token": sp.unk_id()}
            kw.update({k: sp.id_to_piece(i) for k, i in names.items() if i >= 0})
            note = "sentencepiece model converted by transformers' SpmConverter"
        elif isinstance(tokenizer, TiktokenTokenizer):
            backend = _tiktoken_backend(tokenizer.encoding)
            if tokenizer.eot_id is not None:
                kw["eos_token"] = kw["bos_token"] = "<|endoftext|>"
            note = f"tiktoken {tokenizer.encoding.name!r} as a byte-level BPE"
        else:
            return None, f"no converter for {type(tokenizer).__name__}"
    except (ImportError, AttributeError) as e:
        return None, (f"transformers {transformers.__version__} lacks the converter this "
                      f"needs ({e}); a newer transformers writes it")
    if backend is None:
        return None, "this sentencepiece model type has no tokenizers equivalent"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kw), note


def _sentencepiece_backend(processor: Any) -> Any:
    """tokenizers.Tokenizer following the sentencepiece model's own normaliser settings."""
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)


def _tiktoken_backend(encoding: Any) -> Any:
    """tokenizers.Tokenizer for a tiktoken Encoding: transformers' TikTokenConverter fed
    the encoding's ranks, with special tokens at their own ids (cl100k_base has gaps)."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class FromEncoding(TikTokenConverter):
        def load_tiktoken_bpe(self, _: Any) -> dict[bytes, int]:
            return encoding._mergeable_ranks

        def extract_vocab_merges_from_model(self, url: Any) -> tuple[dict[str, int], list]:
            vocab, merges = super().extract_vocab_merges_from_model(url)
            vocab.update(encoding._special_tokens)
            return vocab, merges

    backend = FromEncoding(vocab_file=None, pattern=_oniguruma(encoding._pat_str)).converted()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in encoding._special_tokens])
    return backend


_ATOM = re.compile(r"\\[pP]\{[^}]*\}|\\.|\[(?:\\.|[^\]\\])*\]|[^\\]")


def _oniguruma(pattern: str) -> str:
    """tiktoken's split regex for tokenizers' Oniguruma engine, which reads a possessive
    counted repeat `X{1,3}+` (cl100k_base's digits) as a repeat of a repeat, `(X{1,3})+`,
    splitting "1234" as one piece: the atomic group (?>X{1,3}) means what tiktoken means.
    `?+`, `*+` and `++` are possessive in Oniguruma already."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "(":
            out.append("(")
            i += 1
            continue
        atom = _ATOM.match(pattern, i)
        assert atom is not None  # _ATOM matches any single character
        end = atom.end()
        counted = re.match(r"\{\d*(?:,\d*)?\}\+", pattern[end:])
        if counted:
            out.append(f"(?>{atom.group()}{counted.group()[:-1]})")
            end += counted.end()
        else:
            out.append(atom.group())
        i = end
    return "".join(out)


def tokenizer_mismatches(fast: Any, tokenizer: Tokenizer) -> list[str]:
    """CHECK_TEXTS that the two tokenizers encode or decode differently."""
    bad = []
    for text in CHECK_TEXTS:
        ids = tokenizer.encode(text)
        if (fast(text, add_special_tokens=False, verbose=False)["input_ids"] != ids
                or fast.decode(ids) != tokenizer.decode(ids)):
            bad.append(text)
    return bad


def _portable_tokenizer_class(path: Path) -> None:
    """transformers 5 records its own class name, which transformers 4 (vLLM, many
    lm-eval installs) cannot resolve; PreTrainedTokenizerFast loads in both."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# -- model card -----------------------------------------------------------------------------

def _portable_spec(spec: str) -> str:
    """A sentencepiece spec names a file on the training machine: keep its name only."""
    scheme, _, arg = spec.partition(":")
    return f"{scheme}:{Path(arg).name}" if scheme == "sentencepiece" else spec


def model_card(run: Loaded, info: RunInfo, tokenizer_note: str) -> str:
    """README.md: where the model came from and what it is, for a reader of the directory."""
    c = run.model.config
    input_side = {"bpe_tied": "the learned table (wte), tied to the head",
                  "bpe_untied": "the learned table (wte); a separate head",
                  "kron": "K @ W, the fixed byte codec times the learned projection, "
                          "materialised once (V x d); a separate head",
                  "kron_tied": "K @ W materialised once (V x d); the head is that table "
                               "times the arm's fixed logit factor"}[c.arm]
    rows = [("arm", c.arm), ("input table", input_side), ("step", info.step),
            ("val loss", "not evaluated" if info.val_loss is None
             else f"{info.val_loss:.4f} nats (evaluated at step {info.val_step})"),
            ("best val loss up to this step", "not evaluated" if info.best_val_loss is None
             else f"{info.best_val_loss:.4f} nats"),
            ("shape", f"{c.n_layer} layers, {c.n_head} heads, d={c.n_embd}, "
                      f"context {c.block_size}, bias={c.bias}"),
            ("vocabulary", f"{info.tokenizer_vocab_size} tokenizer ids, padded to "
                           f"{c.vocab_size} rows"),
            ("tokenizer", _portable_spec(info.tokenizer)),
            ("tokenizer fingerprint", info.tokenizer_fingerprint),
            ("codec vocabulary fingerprint", info.vocab_fingerprint or "(no codec: bpe arm)"),
            ("exported tokenizer", tokenizer_note),
            ("training compute dtype", f"{c.dtype.name} (weights exported as float32)")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    kron = (f"\n`{KRON_FILE}` holds W and the byte vocabulary (kronjax.interop's format, "
            f"`projection.weight` for the authors' `KroneckerEmbedding`): what reads a word "
            f"from its bytes (the forced out-of-vocabulary probe), which the materialised "
            f"table cannot.\n" if c.is_kron else "")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [kronjax, gpt2, kronecker-embeddings, {c.arm}]
---
# kronjax {c.arm} run, step {info.step}, as GPT-2

Exported by `python -m kronjax.export hf` from `{Path(info.workdir).name}`. A stock
`GPT2LMHeadModel`: it loads without custom code and gives kronjax's logits.

| | |
|---|---|
{table}
{kron}
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("DIR")
tok = AutoTokenizer.from_pretrained("DIR")
ids = tok("The meaning of", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))
```

lm-eval-harness: `lm_eval --model hf --model_args pretrained=DIR --tasks hellaswag,lambada_openai`.
The context is {c.block_size} tokens: tasks with longer inputs are truncated.

## Run config

```json
{json.dumps(info.config, indent=1, sort_keys=True)}
```
"""


# -- the directory --------------------------------------------------------------------------

def write(run: Loaded, info: RunInfo, out: Path, force: bool) -> list[str]:
    """Write the directory (see the module docstring); returns warnings for stderr."""
    from safetensors.numpy import save_file

    warnings: list[str] = []
    fast, note = hf_tokenizer(run.tokenizer, run.model.config.block_size)
    if fast is None:
        warnings.append(f"no tokenizer written: {note}; tokenize with kronjax "
                        f"({info.tokenizer})")
        note = f"none: {note}"
    elif bad := tokenizer_mismatches(fast, run.tokenizer):
        warnings.append(f"the exported tokenizer differs from kronjax's on {len(bad)} of "
                        f"{len(CHECK_TEXTS)} check texts, e.g. {bad[0]!r}")
        note += f"; differs from kronjax's on {len(bad)} of {len(CHECK_TEXTS)} check texts"
    else:
        note += "; same ids as kronjax on the check texts"

    def fill(tmp: Path) -> None:
        hf_config(run, run.tokenizer.eot_id).save_pretrained(tmp)
        save_file(hf_tensors(run), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if fast is not None:
            fast.save_pretrained(tmp)
            _portable_tokenizer_class(tmp / "tokenizer_config.json")
        if isinstance(run.tokenizer, SentencePieceTokenizer):  # for sentencepiece users
            (tmp / "tokenizer.model").write_bytes(
                run.tokenizer.processor.serialized_model_proto())
        if run.model.config.is_kron:
            interop.export_safetensors(tmp / KRON_FILE, kron_projection(run), run.model.vocab,
                                       {"arm": info.arm, "step": info.step})
        (tmp / "README.md").write_text(model_card(run, info, note), encoding="utf-8")

    kept = write_dir(out, force, fill)
    if kept:
        warnings.append(f"kept {len(kept)} other entries already in {out}: {', '.join(kept)}")
    return warnings
