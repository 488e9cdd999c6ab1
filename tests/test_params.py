"""kronjax.params: the paper's input-side parameter counts, exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kronjax.params import input_side_accounting, main


@pytest.mark.parametrize("vocab, d, pos_dim, table, projection, saving", [
    (50257, 768, 16, 38_597_376, 3_145_728, 91.85),     # GPT-2 124M, the paper's setting
    (131072, 4096, 32, 536_870_912, 33_554_432, 93.75),  # large-vocabulary setting
])
def test_paper_numbers(vocab, d, pos_dim, table, projection, saving):
    a = input_side_accounting(vocab, d, pos_dim)
    assert a["table_params"] == table and a["projection_params"] == projection
    assert round(a["saving_pct"], 2) == saving
    assert a["saving_params"] == table - projection
    assert a["byte_buffer_bytes"] == vocab * (pos_dim + 2)
    assert a["dense_codec_bytes_f32"] == vocab * 256 * pos_dim * 4
    assert a["table_bytes_f32"] == 4 * table and a["projection_bytes_f32"] == 4 * projection


def test_small_vocab_reports_a_negative_saving():
    a = input_side_accounting(1000, 64, 16)  # 256 * 16 = 4096 rows > 1000 ids
    assert a["saving_pct"] < 0 and a["saving_params"] == (1000 - 4096) * 64


@pytest.mark.parametrize("bad", [dict(vocab=0), dict(d_model=-1), dict(pos_dim=1.5)])
def test_bad_input_is_named(bad):
    args = {"vocab": 100, "d_model": 8, "pos_dim": 4, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        input_side_accounting(**args)


def test_cli_human_table(capsys):
    assert main(["--vocab", "50257", "--d-model", "768", "--pos-dim", "16"]) == 0
    out = capsys.readouterr().out
    for text in ("38,597,376", "3,145,728", "91.85%", "904,626", "823,410,688"):
        assert text in out, text


def test_cli_json_via_subprocess():
    cmd = [sys.executable, "-m", "kronjax.params", "--vocab", "131072", "--d-model", "4096",
           "--pos-dim", "32", "--json"]
    a = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    assert a == input_side_accounting(131072, 4096, 32)
    assert a["table_params"] == 536_870_912 and a["projection_params"] == 33_554_432


def test_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        main(["--vocab", "0", "--d-model", "8"])
    assert "vocab must be a positive integer" in capsys.readouterr().err
