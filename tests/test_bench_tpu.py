"""bench tpu: the fit arithmetic, and the table compiled for a small slice with the tiny model."""

from __future__ import annotations

import json

import pytest

from kronjax import bench, topology
from kronjax.bench import tpu


def test_candidates_are_powers_of_two_dividing_the_batch() -> None:
    assert tpu.candidates(512, 4) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert tpu.candidates(512, 16) == [1, 2, 4, 8, 16, 32]
    assert tpu.candidates(8, 8) == [1]
    assert tpu.candidates(24, 4) == [1, 2]  # 4 x 4 = 16 does not divide 24


def test_predict_largest_on_the_line_through_two_points() -> None:
    gib = 2 ** 30
    # 10 GiB at 16, 18 GiB at 32: 0.5 GiB per sequence; 64 would need 34 GiB
    points = [(16, 10 * gib), (32, 18 * gib)]
    assert tpu.predict_largest(points, 32 * gib, [1, 2, 4, 8, 16, 32, 64, 128]) == 32
    assert tpu.predict_largest(points, 34 * gib, [16, 32, 64]) == 64
    assert tpu.predict_largest(points, 1 * gib, [8, 16, 32]) is None  # 8 needs 6 GiB


def test_cost_ratios_pair_the_arms_per_slice() -> None:
    rows = [{"type": "v4-8", "arm": a, "cost": {"flops": f, "bytes accessed": b}}
            for a, f, b in [("bpe_untied", 100.0, 50.0), ("kron", 101.0, 49.0),
                            ("bpe_tied", 90.0, 40.0), ("kron_tied", 99.0, 44.0)]]
    got = {r["pair"]: r for r in tpu.cost_ratios(rows)}
    assert got["kron / bpe_untied"]["flops"] == pytest.approx(1.01)
    assert got["kron / bpe_untied"]["bytes accessed"] == pytest.approx(0.98)
    assert got["kron_tied / bpe_tied"]["bytes accessed"] == pytest.approx(1.1)
    assert tpu.cost_ratios(rows[:1]) == []  # no pair without both arms


def test_unknown_slice_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["tpu", "--types", "v5litepod-3"])
    assert "v5litepod-1, v5litepod-4" in capsys.readouterr().err


@pytest.mark.skipif(not topology.libtpu_available(),
                    reason="libtpu absent: pip install -e '.[tpu]'")
def test_tiny_table_for_a_v5e_slice(capsys: pytest.CaptureFixture[str]) -> None:
    from kronjax.config import REPO_CONFIGS

    argv = ["tpu", "--config", str(REPO_CONFIGS / "tiny.py"), "--types", "v5litepod-4",
            "--arms", "kron,bpe_untied", "--json"]
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"kron", "bpe_untied"}
    for r in rows.values():
        assert r["devices"] == 4 and r["hbm_gib"] == 16 and r["fits"]
        assert 0 < r["memory_gib"] < 1 and r["largest_per_chip"] == 2  # 8 sequences / 4 chips
        assert r["cost"]["flops"] > 0
    (ratio,) = result["ratios"]
    assert ratio["pair"] == "kron / bpe_untied" and ratio["flops"] > 0
