"""launch/gpu_report.sh and the bench options it uses, on CPU: every outcome of a part is
recorded (JSON, failure, overrun, garbage, budget), the targets are computed from what came
back, and the new bench arms (codec GPU forms, step variants, attention kernels) run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kronjax import bench
from kronjax.bench import report

REPO = Path(__file__).resolve().parent.parent


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


STEP = {"arms": [
    {"arm": "bpe_untied", "median_ms": 36.0, "mfu": 0.40, "memory": {"peak": 100}},
    {"arm": "kron", "median_ms": 36.09, "mfu": 0.39, "memory": {"peak": 95}},
    {"arm": "bpe_tied", "median_ms": 36.5, "mfu": 0.51, "memory": {"peak": 90}},
    {"arm": "kron_tied", "median_ms": 37.0, "mfu": 0.38, "memory": {"peak": 85}}]}
EMBED = {"arms": [{"arm": "nn.Embed", "median_ms": 1.0}, {"arm": "kron sparse", "median_ms": 1.6},
                  {"arm": "kron sparse gather-onehot", "median_ms": 1.2}]}


def test_targets_from_results() -> None:
    t = report.targets({"step": STEP, "embed": EMBED, "attention": None})
    assert t["kron_vs_bpe_untied_step"] == {"value": pytest.approx(1.0025), "target": "<= 1.003",
                                            "met": True}
    assert t["kron_tied_vs_bpe_tied_step"] == pytest.approx(37.0 / 36.5)
    assert t["kron_embed_vs_nn_embed"]["value"] == pytest.approx(1.6)
    assert not t["kron_embed_vs_nn_embed"]["met"]
    assert t["bpe_tied_mfu"] == {"value": 0.51, "target": ">= 0.5", "met": True}
    assert t["kron_vs_bpe_untied_peak_memory"]["value"] == pytest.approx(0.95)
    assert t["best_embed_form"] == {"arm": "kron sparse gather-onehot",
                                    "vs_nn_embed": pytest.approx(1.2)}
    assert report.targets({"step": None, "embed": None}) == {}  # nothing came back: no claims


def test_xla_backend_option_is_merged() -> None:
    opt = report.FTZ_OPTION
    assert report.with_backend_option("", opt) == f"--xla_backend_extra_options={opt}"
    assert (report.with_backend_option("--xla_dump_to=/x --xla_backend_extra_options=-a=1", opt)
            == f"--xla_dump_to=/x --xla_backend_extra_options=-a=1,{opt}")


def test_report_records_every_outcome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One part per outcome; the run goes on after each, and the budget skips the last."""
    out = tmp_path / "out"
    parts = [
        report.Part("env", _py("import json; print(json.dumps({'jax': 'x'}))"), 30),
        report.Part("tests", _py("print('..s'); print('2 passed, 1 skipped in 0.1s')"), 30),
        report.Part("step", _py(f"print({json.dumps(json.dumps(STEP))})"), 30),
        report.Part("embed", _py("import sys; sys.stderr.write('boom\\n'); sys.exit(3)"), 30),
        report.Part("attention", _py("import time; time.sleep(60)"), 1),
        report.Part("embed_ftz", _py("import os; print(os.environ['XLA_FLAGS'])"), 30,
                    env={"XLA_FLAGS": "not json"}),
        report.Part("step_variants", _py("print('{}')"), 30),
    ]
    monkeypatch.setattr(report, "plan", lambda smoke: parts)

    def clock() -> float:  # the budget runs out once embed_ftz has written its file
        return 1000.0 if (out / "embed_ftz.json").exists() else 0.0

    summary = report.run_report(out, 1010.0, smoke=True, clock=clock)
    s = summary["parts"]
    assert s["env"]["ok"] and summary["env"] == {"jax": "x"}
    assert summary["tests"] == {"summary": "2 passed, 1 skipped in 0.1s", "passed": 2,
                                "skipped": 1, "failures": []}
    assert s["step"]["ok"] and json.loads((out / "step.json").read_text()) == STEP
    assert s["embed"]["rc"] == 3 and not s["embed"]["ok"]
    embed = json.loads((out / "embed.json").read_text())
    assert embed["part"] == "embed" and "exit status 3" in embed["error"]
    assert s["attention"]["timed_out"] and "timed out" in s["attention"]["error"]
    assert json.loads((out / "attention.json").read_text())["timed_out"]
    assert not s["embed_ftz"]["ok"] and "no JSON" in s["embed_ftz"]["error"]
    assert json.loads((out / "embed_ftz.json").read_text())["stdout_tail"] == "not json\n"
    assert s["step_variants"]["skipped"] and not (out / "step_variants.json").exists()
    assert "boom" in (out / "log.txt").read_text()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["parts"] == s and on_disk["targets"]["kron_vs_bpe_untied_step"]["met"]
    assert sum(not p["ok"] for p in s.values()) == 4


def test_plan_runs_the_issue_parts() -> None:
    plan = {p.name: p for p in report.plan(smoke=False)}
    assert tuple(plan) == report.PART_NAMES
    assert "configs/gpt2_124m.py" in plan["step"].argv and "bfloat16" in " ".join(
        plan["step"].argv)
    assert plan["embed"].argv == plan["embed_ftz"].argv
    assert report.FTZ_OPTION in plan["embed_ftz"].env["XLA_FLAGS"]
    assert "--gpu-forms" in plan["embed"].argv and "all" in plan["attention"].argv
    assert sum(p.cap_s for p in plan.values()) >= 420  # the budget, not the caps, binds


def test_bench_arms_for_gpu_forms_variants_and_kernels(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """The new arms at tiny shapes on CPU, where every GPU form runs the CPU kernel (same
    loss) and every GPU attention kernel is the reference (zero difference)."""
    assert bench.main(["embed", "--vocab", "300", "--d-model", "8", "--tokens", "64",
                       "--pos-dim", "4", "--reps", "1", "--modes", "sparse", "--gpu-forms",
                       "gather-sorted,onehot-onehot", "--no-reference", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    kron = [a for a in result["arms"] if a["arm"].startswith("kron")]
    # gather-sorted is the default form: the "kron sparse" arm already
    assert [a["arm"] for a in kron] == ["kron sparse", "kron sparse onehot-onehot"]
    assert len({a["loss"] for a in kron}) == 1

    from kronjax.bench.attention import run_attention

    att = run_attention(1, 16, 1, 8, "float32", reps=1, warmup=1,
                        kernels=("pallas_triton", "mgpu"))
    names = [a["arm"] for a in att["arms"]]
    assert names == ["pallas_triton (reference)", "reference", "auto fwd", "reference fwd"]
    assert att["max_rel_diff"]["pallas_triton (reference)"]["dq"] == 0.0
    assert "mgpu" in att["errors"]  # no GPU here: recorded, the other arms ran


def test_step_variant_arm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A --variant arm builds its model from the config with its own settings, under its own
    name (the model build is stopped there: compiling steps is what test_bench does)."""
    from kronjax import run as run_lib

    built = []

    class Built(Exception):
        pass

    def build_model(cfg, n_tok, vocab_fn):  # noqa: ANN001, ANN202
        built.append((cfg.model.arm, cfg.model.codec_gpu, cfg.model.attention))
        raise Built

    monkeypatch.setattr(run_lib, "build_model", build_model)
    args = bench.build_parser().parse_args(
        ["step", "--config", str(REPO / "configs" / "tiny.py"), "--vocab-source", "synthetic",
         "--arms", "kron", "--variant", "kron:model.codec_gpu=gather-onehot",
         "--variant", "bpe_untied:model.attention=pallas_triton,model.codec_gpu=onehot-onehot"])
    assert [label for label, _, _ in args.variants] == [
        "kron:model.codec_gpu=gather-onehot",
        "bpe_untied:model.attention=pallas_triton,model.codec_gpu=onehot-onehot"]
    from kronjax.config import build_config

    base = build_config(REPO / "configs" / "tiny.py", [])
    for label, arm, settings in [("kron", "kron", []), *args.variants]:
        with pytest.raises(Built):
            bench.jax_step_arm(base, arm, 8, lambda p: None, np.zeros((1, 8), np.int32),
                               np.zeros((1, 8), np.int32), settings, label)
    assert built == [("kron", "auto", "auto"), ("kron", "gather-onehot", "auto"),
                     ("bpe_untied", "onehot-onehot", "pallas_triton")]
    assert base.model.codec_gpu == "auto"  # the variants changed copies only
    for bad in ("kron", "nope:model.arm=kron", "kron:model.codec_gpu"):
        with pytest.raises(SystemExit):
            bench.main(["step", "--variant", bad])


@pytest.mark.slow
def test_gpu_report_script_cpu_smoke(tmp_path: Path) -> None:
    """launch/gpu_report.sh --cpu-smoke end to end (a subset of parts: about a minute)."""
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "launch" / "gpu_report.sh"), "--cpu-smoke",
                          "--parts", "env,tests,embed,attention", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cpu_smoke"] and all(p["ok"] for p in summary["parts"].values())
    assert {"gpu.txt", "log.txt", "summary.json", "embed.json", "attention.json"} <= {
        p.name for p in tmp_path.iterdir()}
    assert "kron_embed_vs_nn_embed" in summary["targets"]
