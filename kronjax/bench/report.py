"""`python -m kronjax.bench report OUT`: every GPU measurement in one go, within a time budget.

Runs the benchmarks as separate processes, one per part, in this order (each part has a cap
of its own and gets at most what is left of --budget-s; a part that fails or overruns is
recorded and the next one runs):

  env            versions, devices, which attention kernels import (into summary.json)
  tests          pytest tests/test_gpu.py: the GPU paths against their references
  step           the 124M train step of the four arms (launch/gpu_bench.sh's settings)
  embed          the embedding layer: nn.Embed and the codec in each GPU form
  attention      every attention kernel against the reference, forward + backward
  embed_ftz      `embed` again with XLA_FLAGS=--xla_backend_extra_options=-nvptx-allow-
                 ftz-atomics (native f32 atomics where jaxlib 0.10.2-0.11.0 emit a CAS loop)
  step_variants  bpe_untied and kron, kron with the other GPU forms, bpe_untied with Pallas'
                 Triton attention

The parts share a JAX compilation cache (JAX_COMPILATION_CACHE_DIR, default a folder in the
temporary directory: not in OUT, whose files the device tool returns, 8 at most). Each JSON
part writes OUT/<part>.json: the benchmark's own JSON, or {"part", "ok": false,
"error", ...} when it failed. OUT/summary.json (rewritten after every part) holds each part's
status and time, the test counts, and the issue's targets computed from what came back.
Part stderr goes to OUT/log.txt. --cpu-smoke runs every part at tiny shapes on the CPU: a
check of this script itself, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FTZ_OPTION = "-nvptx-allow-ftz-atomics"
PART_NAMES = ("env", "tests", "step", "embed", "attention", "embed_ftz", "step_variants")
MIN_PART_S = 20  # a part is skipped when less than this is left of the budget

# launch/gpu_bench.sh's settings: GPT-2 124M, one micro-batch of 16 x 1024, bf16
STEP_124M = ["--config", "configs/gpt2_124m.py", "--config.train.batch_size=16",
             "--config.train.grad_accum=1", "--config.model.dtype=bfloat16", "--reps", "10",
             "--warmup", "3"]
STEP_SMOKE = ["--config", "configs/gpt2_124m.py", "--config.train.batch_size=2",
              "--config.train.grad_accum=1", "--config.model.n_layer=1",
              "--config.model.n_head=1", "--config.model.n_embd=16",
              "--config.model.block_size=8", "--config.model.pos_dim=4", "--vocab-source",
              "synthetic", "--reps", "1", "--warmup", "1"]
VARIANTS = ["--variant", "kron:model.codec_gpu=gather-scatter",
            "--variant", "kron:model.codec_gpu=gather-onehot",
            "--variant", "bpe_untied:model.attention=pallas_triton"]
EMBED_SMOKE = ["--vocab", "300", "--d-model", "8", "--tokens", "256", "--pos-dim", "4",
               "--reps", "2"]
ATTENTION_SMOKE = ["--batch", "1", "--seq", "128", "--heads", "2", "--head-dim", "64",
                   "--reps", "2", "--warmup", "1"]
ENV_SCRIPT = """
import importlib, json, jax
info = {"jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind}
for mod in ("jax.experimental.pallas.ops.gpu.attention",
            "jax.experimental.pallas.ops.gpu.attention_mgpu",
            "jax._src.cudnn.fused_attention_stablehlo"):
    try:
        importlib.import_module(mod)
        info[mod] = "importable"
    except Exception as e:
        info[mod] = f"{type(e).__name__}: {e}"[:200]
try:
    from jax._src.lib import cuda_versions
    info["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
except Exception as e:
    info["cudnn"] = f"{type(e).__name__}: {e}"[:200]
print(json.dumps(info))
"""


@dataclasses.dataclass
class Part:
    name: str
    argv: list[str]
    cap_s: float
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def with_backend_option(xla_flags: str, option: str) -> str:
    """xla_flags with `option` added to --xla_backend_extra_options (one flag, comma list)."""
    prefix = "--xla_backend_extra_options="
    tokens = xla_flags.split()
    for i, token in enumerate(tokens):
        if token.startswith(prefix):
            value = token[len(prefix):]
            tokens[i] = prefix + (f"{value},{option}" if value else option)
            return " ".join(tokens)
    return " ".join(tokens + [prefix + option])


def plan(smoke: bool) -> list[Part]:
    """The parts, in running order, with their commands and caps (seconds)."""
    bench = [sys.executable, "-m", "kronjax.bench"]
    step = STEP_SMOKE if smoke else STEP_124M
    embed = ["embed", "--modes", "sparse", "--gpu-forms", "all", "--no-reference", "--json"]
    embed += EMBED_SMOKE if smoke else ["--tokens", "65536", "--reps", "10"]
    ftz = {"XLA_FLAGS": with_backend_option(os.environ.get("XLA_FLAGS", ""), FTZ_OPTION)}
    return [
        Part("env", [sys.executable, "-c", ENV_SCRIPT], 45),
        Part("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       "tests/test_gpu.py"], 90),
        Part("step", [*bench, "step", *step, "--arms", "bpe_untied,kron,bpe_tied,kron_tied",
                      "--json"], 210),
        Part("embed", [*bench, *embed], 60),
        Part("attention", [*bench, "attention", "--kernels", "all", "--json",
                           *(ATTENTION_SMOKE if smoke else [])], 60),
        Part("embed_ftz", [*bench, *embed], 60, env=ftz),
        Part("step_variants", [*bench, "step", *step, "--arms", "bpe_untied,kron", *VARIANTS,
                               "--json"], 150),
    ]


def run_part(part: Part, timeout_s: float, log: Any, env: dict[str, str]
             ) -> tuple[dict[str, Any], str]:
    """Run one part (its own process group, killed at timeout_s): (status, stdout)."""
    t0 = time.monotonic()
    shown = " ".join(a if len(a) < 60 else a[:24].strip() + "..." for a in part.argv)
    log.write(f"\n[report] === {part.name} (at most {timeout_s:.0f} s): {shown}\n")
    log.flush()
    proc = subprocess.Popen(part.argv, cwd=REPO, env={**env, **part.env}, text=True,
                            stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    timed_out, stdout = False, ""
    try:
        stdout, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group: any child processes too
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                stdout, _ = proc.communicate(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
    seconds = round(time.monotonic() - t0, 1)
    status = {"ok": proc.returncode == 0 and not timed_out, "rc": proc.returncode,
              "timed_out": timed_out, "seconds": seconds}
    if timed_out:
        status["error"] = f"timed out after {seconds} s (cap {timeout_s:.0f} s)"
    elif proc.returncode != 0:
        status["error"] = f"exit status {proc.returncode} (stderr in log.txt)"
    return status, stdout or ""


def _load(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _arms(result: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {a["arm"]: a for a in (result or {}).get("arms", []) if "arm" in a}


def _target(value: float | None, limit: float, op: str) -> dict[str, Any] | None:
    if value is None:
        return None
    met = value <= limit if op == "<=" else value >= limit
    return {"value": value, "target": f"{op} {limit}", "met": met}


def targets(results: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Issue 25's targets from what came back; a target whose inputs are missing is absent."""
    step, embed = _arms(results.get("step")), _arms(results.get("embed"))

    def ratio(arms: dict[str, dict[str, Any]], a: str, b: str, key: str = "median_ms"
              ) -> float | None:
        x, y = arms.get(a, {}), arms.get(b, {})
        if key == "peak":
            x, y = x.get("memory") or {}, y.get("memory") or {}
        return x[key] / y[key] if x.get(key) and y.get(key) else None

    out = {
        "kron_vs_bpe_untied_step": _target(ratio(step, "kron", "bpe_untied"), 1.003, "<="),
        "kron_tied_vs_bpe_tied_step": ratio(step, "kron_tied", "bpe_tied"),
        "kron_embed_vs_nn_embed": _target(ratio(embed, "kron sparse", "nn.Embed"), 1.5, "<="),
        "bpe_tied_mfu": _target(step.get("bpe_tied", {}).get("mfu"), 0.50, ">="),
        "kron_vs_bpe_untied_peak_memory": _target(ratio(step, "kron", "bpe_untied", "peak"),
                                                  1.0, "<="),
    }
    forms = {name: a["median_ms"] for name, a in embed.items() if name.startswith("kron sparse")}
    if forms and "nn.Embed" in embed:
        best = min(forms, key=forms.__getitem__)
        out["best_embed_form"] = {"arm": best,
                                  "vs_nn_embed": forms[best] / embed["nn.Embed"]["median_ms"]}
    return {k: v for k, v in out.items() if v is not None}


def _test_counts(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", last)}
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20]
    return {"summary": last, **counts, "failures": failures}


def run_report(out: Path, budget_s: float, smoke: bool, only: list[str] | None = None,
               clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    start = clock()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    # one compilation cache for all parts: step_variants' bpe_untied and kron steps are
    # step's, compiled once (a cache changes compile time only, not what runs)
    env.setdefault("JAX_COMPILATION_CACHE_DIR",
                   str(Path(tempfile.gettempdir()) / "kronjax-report-jax-cache"))
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
    summary: dict[str, Any] = {"report": "gpu", "cpu_smoke": smoke, "budget_s": budget_s,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "parts": {}, "env": None, "tests": None, "targets": {}}
    results: dict[str, dict[str, Any] | None] = {}
    with open(out / "log.txt", "a", encoding="utf-8") as log:
        for part in plan(smoke):
            if only and part.name not in only:
                continue
            left = budget_s - (clock() - start)
            if left < MIN_PART_S:
                summary["parts"][part.name] = {"ok": False, "skipped": True,
                                               "error": f"budget: {left:.0f} s left"}
            else:
                print(f"[report] {part.name} (at most {min(part.cap_s, left):.0f} s)",
                      file=sys.stderr, flush=True)
                status, stdout = run_part(part, min(part.cap_s, left), log, env)
                summary["parts"][part.name] = status
                _record(part, status, stdout, out, summary, results)
                print(f"[report] {part.name}: {'ok' if status['ok'] else status['error']} "
                      f"({status['seconds']} s)", file=sys.stderr, flush=True)
            summary["elapsed_s"] = round(clock() - start, 1)
            try:
                summary["targets"] = targets(results)
            except Exception as e:  # noqa: BLE001 - the summary is written whatever happens
                summary["targets"] = {"error": f"{type(e).__name__}: {e}"}
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _record(part: Part, status: dict[str, Any], stdout: str, out: Path,
            summary: dict[str, Any], results: dict[str, dict[str, Any] | None]) -> None:
    """Write what the part gave: its JSON file (or an error object), or its summary entry."""
    if part.name == "tests":
        summary["tests"] = _test_counts(stdout)
        return
    result = _load(stdout)
    if part.name == "env":
        summary["env"] = result or {"error": status.get("error"), "stdout": stdout[-500:]}
        return
    if result is None or not status["ok"]:
        if result is None:
            status["ok"] = False
            status.setdefault("error", "no JSON on stdout (stderr in log.txt)")
        result = {"part": part.name, **status, "result": result, "stdout_tail": stdout[-2000:]}
    results[part.name] = result if status["ok"] else None
    (out / f"{part.name}.json").write_text(json.dumps(result) + "\n")


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"[report] {'CPU SMOKE (not a measurement)' if summary['cpu_smoke'] else 'GPU'}: "
             f"{summary.get('elapsed_s', 0)} s of {summary['budget_s']:.0f} s"]
    for name, s in summary["parts"].items():
        lines.append(f"  {name:<14} {'ok' if s['ok'] else 'FAILED'} "
                     f"{s.get('seconds', '-')} s {s.get('error', '')}".rstrip())
    if summary.get("tests"):
        lines.append(f"  tests: {summary['tests']['summary']}")
    for key, t in summary["targets"].items():
        lines.append(f"  target {key}: {json.dumps(t)}")
    return "\n".join(lines)


def part_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in PART_NAMES for n in names):
        raise argparse.ArgumentTypeError(f"parts must be a comma-separated list of "
                                         f"{', '.join(PART_NAMES)}; got {text!r}")
    return names


def cmd_report(args: argparse.Namespace) -> int:
    summary = run_report(Path(args.out), args.budget_s, args.cpu_smoke, args.parts)
    print(format_summary(summary))
    return sum(not s["ok"] for s in summary["parts"].values())
