"""kronjax.export: every arm of a tiny trained run as a transformers GPT2LMHeadModel and as a
nanoGPT checkpoint gives kronjax's logits; tokenizers round-trip; outputs are never clobbered.

Needs torch and transformers (the `export` extra); skipped without them. Runs: tiny_runs'
bpe_tied and kron (bias=False, V=512 unpadded) plus bpe_untied and kron_tied
(tiny_runs.four_arms, shared with test_evaluate) trained on the same data with bias=True and
the vocabulary padded to 576.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_runs  # noqa: E402
from torch_ref import HAS_TORCH_REF  # noqa: E402

from kronjax.export import cli as export_cli  # noqa: E402
from kronjax.export import hf as export_hf  # noqa: E402
from kronjax.export import nanogpt as export_nanogpt  # noqa: E402
from kronjax.generate import generate  # noqa: E402
from kronjax.probes.generation import SLOT, load_prompts  # noqa: E402
from kronjax.run import Loaded, load_run  # noqa: E402

nn, F = torch.nn, torch.nn.functional
ARMS = tiny_runs.ARMS
PADDED = tiny_runs.PADDED  # vocab_multiple of tiny_runs.four_arms' extra runs: 512 -> 576 rows
RTOL = 1e-4


@dataclasses.dataclass
class Exported:
    workdir: Path
    run: Loaded
    hf_dir: Path
    ckpt: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    workdirs = tiny_runs.four_arms(tmp_path_factory)  # shared with test_evaluate
    hf_dirs = tiny_runs.hf_exports(tmp_path_factory)
    out = tmp_path_factory.mktemp("exported")
    result = {}
    for arm, workdir in workdirs.items():
        ckpt = out / f"{arm}.pt"
        assert export_cli.main(["nanogpt", "--workdir", str(workdir), "--out", str(ckpt)]) == 0
        result[arm] = Exported(workdir, load_run(workdir), hf_dirs[arm], ckpt)
    return result


def _ids(run: Loaded, batch: int = 2) -> np.ndarray:
    """Random ids over the padded vocabulary (padded rows included), one full context."""
    c = run.model.config
    return np.random.default_rng(0).integers(0, c.vocab_size, (batch, c.block_size))


def _kronjax_logits(run: Loaded, ids: np.ndarray) -> np.ndarray:
    return np.asarray(run.model.apply({"params": run.params}, jnp.asarray(ids)))


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _prompt_texts() -> list[str]:
    return [p["template"].replace(SLOT, p[k]) for p in load_prompts()
            for k in ("word", "typo", "novel")]


# -- Hugging Face ---------------------------------------------------------------------------

@pytest.mark.parametrize("arm", ARMS)
def test_hf_loads_as_stock_gpt2_with_kronjax_logits(exported: dict[str, Exported],
                                                     arm: str) -> None:
    e = exported[arm]
    c = e.run.model.config
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        e.hf_dir, output_loading_info=True)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.tie_word_embeddings == (arm == "bpe_tied")
    assert model.config.vocab_size == c.vocab_size == (576 if arm in ("bpe_untied", "kron_tied")
                                                       else 512)
    assert model.config.n_positions == c.block_size
    ids = _ids(e.run)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.numpy()
    err = _rel_err(logits, _kronjax_logits(e.run, ids))
    print(f"{arm}: max relative logit difference {err:.2e}")
    assert err <= RTOL


def test_hf_config_computes_kronjax_functions(exported: dict[str, Exported]) -> None:
    """What a 10-step model's logits barely show (GPT-2's tanh GELU moves them by 8e-6
    relative, a LayerNorm eps of 1e-6 by 4e-6): the config's functions are kronjax's."""
    from transformers.activations import ACT2FN

    from kronjax.layers import LN_EPS, gelu

    config = transformers.AutoConfig.from_pretrained(exported["kron"].hf_dir)
    x = np.linspace(-6, 6, 1201, dtype=np.float32)
    theirs = ACT2FN[config.activation_function](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, np.asarray(gelu(jnp.asarray(x))), rtol=0, atol=1e-6)
    assert config.layer_norm_epsilon == LN_EPS
    assert config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx
    assert config.n_inner == 4 * config.n_embd and not config.reorder_and_upcast_attn


@pytest.mark.parametrize("arm", ARMS)
def test_hf_greedy_generate_matches_kronjax_sample(exported: dict[str, Exported],
                                                   arm: str) -> None:
    e = exported[arm]
    model = transformers.AutoModelForCausalLM.from_pretrained(e.hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(e.hf_dir)
    prompt = _prompt_texts()[0]
    ids = e.run.tokenizer.encode(prompt)
    n_new = e.run.model.config.block_size - len(ids)
    want = generate(e.run, ids, n_new, temperature=0.0)
    got = model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                         pad_token_id=model.config.eos_token_id)[0].tolist()
    assert got == want
    assert tok.decode(got[len(ids):]) == e.run.tokenizer.decode(want[len(ids):])


def test_hf_tokenizer_round_trips_the_probe_prompts(exported: dict[str, Exported]) -> None:
    e = exported["kron"]
    tok = transformers.AutoTokenizer.from_pretrained(e.hf_dir)
    assert tok.eos_token_id == e.run.tokenizer.eot_id
    for text in _prompt_texts():
        ids = e.run.tokenizer.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok.decode(ids) == text


def test_tiktoken_tokenizer_json_round_trips(cl100k: Any, tmp_path: Path) -> None:
    fast, _ = export_hf.hf_tokenizer(cl100k, 1024)
    assert fast is not None and export_hf.tokenizer_mismatches(fast, cl100k) == []
    fast.save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_id == cl100k.eot_id  # special ids keep their place past cl100k's gap
    for text in _prompt_texts() + ["text <|endoftext|> as text"]:
        ids = cl100k.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok.decode(ids) == text


def test_hf_card_and_kronecker_file(exported: dict[str, Exported]) -> None:
    from kronjax.interop import import_safetensors

    e = exported["kron_tied"]
    card = (e.hf_dir / "README.md").read_text()
    records = [json.loads(line) for line in (e.workdir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    for fact in ("kron_tied", f"| step | {e.run.step} |", f"{val:.4f}",
                 e.run.model.vocab.fingerprint, e.run.tokenizer.fingerprint,
                 "same ids as kronjax"):
        assert fact in card
    w, vocab, meta = import_safetensors(e.hf_dir / export_hf.KRON_FILE)
    np.testing.assert_array_equal(w, np.asarray(e.run.params["kron"]["projection"]))
    assert vocab == e.run.model.vocab and meta["arm"] == "kron_tied"
    assert not (exported["bpe_tied"].hf_dir / export_hf.KRON_FILE).exists()


# -- nanoGPT --------------------------------------------------------------------------------
# nanoGPT's model.py (Karpathy), written from its published architecture.

@dataclasses.dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: Any) -> Any:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.n_embd = config.n_head, config.n_embd

    def forward(self, x: Any) -> Any:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (a.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Any) -> Any:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(config.n_embd, config.bias), CausalSelfAttention(config)
        self.ln_2, self.mlp = LayerNorm(config.n_embd, config.bias), MLP(config)

    def forward(self, x: Any) -> Any:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: Any, targets: Any = None) -> tuple[Any, Any]:
        pos = torch.arange(0, idx.size(1), dtype=torch.long)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                       ignore_index=-1)


class KroneckerEmbedding(nn.Module):
    """The authors' module as DESIGN.md section 1 states its maths (the package itself is
    used instead where it is installed): non-persistent byte and length buffers, and
    `projection`, an nn.Linear(256 * pos_dim, d, bias=False)."""

    def __init__(self, vocab_size: int, d_model: int, pos_dim: int, byte_buffer: Any,
                 length_buffer: Any) -> None:
        super().__init__()
        assert byte_buffer.shape == (vocab_size, pos_dim)
        self.pos_dim = pos_dim
        self.register_buffer("_byte_buffer", byte_buffer, persistent=False)
        self.register_buffer("_length_buffer", length_buffer, persistent=False)
        self.projection = nn.Linear(256 * pos_dim, d_model, bias=False)

    def forward(self, ids: Any) -> Any:
        p = self.pos_dim
        rows, n = self._byte_buffer[ids].long(), self._length_buffer[ids].long()
        present = (torch.arange(p) < n[..., None]).float()
        x = torch.zeros(ids.shape + (256 * p,))
        x.scatter_(-1, rows * p + torch.arange(p), present / n.clamp(min=1).sqrt()[..., None])
        z = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)
        return self.projection(z)


def _load_nanogpt(path: Path) -> tuple[GPT, dict[str, Any]]:
    """As nanoGPT's sample.py resumes (torch.load, GPT(GPTConfig(**model_args)), strict
    load_state_dict), building the Kronecker wte and the untied head the checkpoint asks for."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    args = dict(ck["model_args"])
    untied, wte, pos_dim = (args.pop(k, None) for k in ("untied_head", "wte", "pos_dim"))
    model = GPT(GPTConfig(**args))
    if untied:
        model.lm_head = nn.Linear(args["n_embd"], args["vocab_size"], bias=False)
    if wte == "KroneckerEmbedding":
        buffers = ck[export_nanogpt.KRON_KEY]
        kw = dict(pos_dim=pos_dim, byte_buffer=buffers["byte_buffer"],
                  length_buffer=buffers["length_buffer"])
        if HAS_TORCH_REF:
            from kronecker_embeddings import KroneckerEmbedding as Authors

            model.transformer.wte = Authors(args["vocab_size"], args["n_embd"], **kw)
        else:
            model.transformer.wte = KroneckerEmbedding(args["vocab_size"], args["n_embd"], **kw)
    model.load_state_dict(ck["model"], strict=True)
    return model.eval(), ck


@pytest.mark.parametrize("arm", ARMS)
def test_nanogpt_checkpoint_loads_strictly_with_kronjax_logits(exported: dict[str, Exported],
                                                               arm: str) -> None:
    e = exported[arm]
    model, ck = _load_nanogpt(e.ckpt)
    ids = _ids(e.run)
    with torch.no_grad():
        logits, loss = model(torch.from_numpy(ids), torch.from_numpy(ids))
    want = _kronjax_logits(e.run, ids)
    err = _rel_err(logits.numpy(), want)
    print(f"{arm}: nanoGPT max relative logit difference {err:.2e}")
    assert err <= RTOL
    assert ck["iter_num"] == e.run.step and math.isfinite(ck["best_val_loss"])
    assert ck["config"]["kronjax_arm"] == arm
    stock = {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}
    if arm == "bpe_tied":  # stock nanoGPT builds it as it is
        assert set(ck["model_args"]) == stock
        assert model.lm_head.weight is model.transformer.wte.weight
    else:  # and refuses what it would silently tie
        with pytest.raises(TypeError, match="untied_head"):
            GPTConfig(**ck["model_args"])
    if arm.startswith("kron"):
        assert ck["kronecker"]["metadata"]["vocab_fingerprint"] == e.run.model.vocab.fingerprint


# -- the command line -----------------------------------------------------------------------

def test_cli_refuses_to_overwrite_and_reports_bad_input(exported: dict[str, Exported],
                                                        tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    e = exported["bpe_tied"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    (out / "config.json").write_text("{}")

    def run(*argv: str) -> tuple[int, str]:
        code = export_cli.main(list(argv))
        return code, capsys.readouterr().err

    code, err = run("hf", "--workdir", str(e.workdir), "--out", str(out))
    assert code == 2 and "not empty" in err and "--force" in err and len(err.splitlines()) == 1
    assert (out / "config.json").read_text() == "{}"
    code, err = run("hf", "--workdir", str(e.workdir), "--out", str(out), "--force")
    assert code == 0 and "mine.txt" in err
    assert (out / "mine.txt").read_text() == "keep me"
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"

    code, err = run("nanogpt", "--workdir", str(e.workdir), "--out", str(e.ckpt))
    assert code == 2 and "already exists" in err
    code, err = run("hf", "--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "a"))
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1
    code, err = run("nanogpt", "--workdir", str(e.workdir), "--out", str(tmp_path / "b.pt"),
                    "--step", "3")
    assert code == 2 and "no checkpoint for step 3" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b.pt").exists()


def test_hf_says_plainly_when_no_tokenizer_can_be_written(
        exported: dict[str, Exported], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    def missing(_: Any) -> Any:
        raise AttributeError("no build_tokenizer_from_spm_proto")

    monkeypatch.setattr(export_hf, "_sentencepiece_backend", missing)
    out = tmp_path / "hf"
    assert export_cli.main(["hf", "--workdir", str(exported["bpe_tied"].workdir),
                        "--out", str(out)]) == 0
    assert "no tokenizer written" in capsys.readouterr().err
    assert "| exported tokenizer | none: transformers" in (out / "README.md").read_text()
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
