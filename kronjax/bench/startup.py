"""`startup`: what the persistent compilation cache buys, in fresh processes side by side.

    python -m kronjax.bench startup [--config configs/tiny.py] [--reps 3] [--compare]
                                    [--config.a.b=value ...]

Each round starts `python -m kronjax.train` three times into fresh workdirs: with the cache
off, with a new empty cache (cold: it compiles and writes the entries), and with a cache an
identical untimed run filled before the rounds (warm). The time to the first step is from
the process start to the trainer's `step 1/N` line on stderr; the run is then stopped with
SIGTERM (it saves and exits). `--compare` also times a whole `python -m kronjax.compare`
(`--compare-arms`, `--compare-seeds`) in the same three states: there the cold cache already
helps, since every seed after an arm's first compiles the same programs.
Data are prepared (or found) by the untimed priming run, so no round prepares any.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kronjax.bench.timing import machine_info, machine_line

MODES = ("off", "cold", "warm")
FIRST_STEP = re.compile(r"\bstep 1/\d+ \|")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # each run names its cache explicitly
    return env


def _train_cmd(config: str, workdir: Path, cache: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "kronjax.train", "--config", config, "--workdir",
            str(workdir), f"--config.train.compile_cache={cache}",
            "--config.train.progress=False", *overrides]


def time_to_first_step(cmd: list[str], timeout_s: float = 3600.0) -> float:
    """Seconds from starting cmd to its first `step 1/N` line; then SIGTERM, wait."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_child_env())
    seen: float | None = None
    tail: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        tail = (tail + [line])[-20:]
        if seen is None and FIRST_STEP.search(line):
            seen = time.perf_counter() - t0
            proc.send_signal(signal.SIGTERM)  # saves at the next step boundary, exits 0
        if time.perf_counter() - t0 > timeout_s:
            proc.kill()
            break
    proc.wait()
    if seen is None:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} before its first step:\n"
                           + "".join(tail))
    return seen


def wall_time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=_child_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def _cache_size(directory: Path) -> dict[str, int]:
    files = list(directory.glob("*-cache"))
    return {"entries": len(files), "bytes": sum(f.stat().st_size for f in files)}


def _stats(times: list[float]) -> dict[str, Any]:
    t = np.asarray(times, np.float64)
    q25, med, q75 = np.percentile(t, [25, 50, 75])
    return {"median_s": float(med), "iqr_s": float(q75 - q25), "min_s": float(t.min()),
            "times_s": [round(float(x), 2) for x in t]}


def run_startup(config: str, overrides: list[str], reps: int, compare: bool,
                compare_arms: str, compare_seeds: int, compare_reps: int,
                root: Path) -> dict[str, Any]:
    warm = root / "warm_cache"
    n = 0

    def fresh(kind: str) -> Path:
        nonlocal n
        n += 1
        return root / f"{kind}{n}"

    # Untimed: prepares the data and fills the warm cache.
    time_to_first_step(_train_cmd(config, fresh("prime"), str(warm), overrides))
    result: dict[str, Any] = {"machine": machine_info(), "config": config,
                              "overrides": overrides, "train_cache": _cache_size(warm)}
    first: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(reps):
        for mode in MODES:
            cache = {"off": "off", "cold": str(fresh("cache")), "warm": str(warm)}[mode]
            first[mode].append(time_to_first_step(
                _train_cmd(config, fresh("run"), cache, overrides)))
    result["first_step"] = {m: _stats(first[m]) for m in MODES}
    if compare:
        def compare_cmd(cache: str) -> list[str]:
            return [sys.executable, "-m", "kronjax.compare", "--config", config, "--arms",
                    compare_arms, "--seeds", str(compare_seeds), "--out", str(fresh("cmp")),
                    f"--config.train.compile_cache={cache}", "--config.train.progress=False",
                    *overrides]

        wall_time(compare_cmd(str(warm)))  # untimed: the compare's programs into the cache
        walls: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(compare_reps):
            for mode in MODES:
                cache = {"off": "off", "cold": str(fresh("cache")), "warm": str(warm)}[mode]
                walls[mode].append(wall_time(compare_cmd(cache)))
        result["compare"] = {"arms": compare_arms, "seeds": compare_seeds,
                             **{m: _stats(walls[m]) for m in MODES}}
    result["warm_cache"] = _cache_size(warm)
    return result


def format_startup(result: dict[str, Any]) -> str:
    lines = [machine_line(result["machine"]),
             f"config {result['config']} {' '.join(result['overrides'])}".rstrip(),
             f"cache after one run: {result['train_cache']['entries']} entries, "
             f"{result['train_cache']['bytes'] / 2**20:.2f} MiB", "",
             "| compile cache | time to first step, median s | IQR s | min s | x off |",
             "|---|---|---|---|---|"]
    off = result["first_step"]["off"]["median_s"]
    for m in MODES:
        s = result["first_step"][m]
        lines.append(f"| {m} | {s['median_s']:.2f} | {s['iqr_s']:.2f} | {s['min_s']:.2f} | "
                     f"{s['median_s'] / off:.3f} |")
    if "compare" in result:
        c = result["compare"]
        lines += ["", f"compare --arms {c['arms']} --seeds {c['seeds']}:", "",
                  "| compile cache | wall s (median) | runs s | x off |", "|---|---|---|---|"]
        for m in MODES:
            lines.append(f"| {m} | {c[m]['median_s']:.1f} | "
                         f"{', '.join(f'{t:.1f}' for t in c[m]['times_s'])} | "
                         f"{c[m]['median_s'] / c['off']['median_s']:.3f} |")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    st = sub.add_parser("startup", help="time to the first step and a compare's wall time "
                        "with the compilation cache off, cold and warm", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("--config", default="configs/tiny.py")
    st.add_argument("--reps", type=int, default=3, help="rounds of off / cold / warm")
    st.add_argument("--compare", action="store_true", help="also time a compare")
    st.add_argument("--compare-arms", default="bpe_tied,kron")
    st.add_argument("--compare-seeds", type=int, default=2)
    st.add_argument("--compare-reps", type=int, default=1)
    st.add_argument("--keep", default=None, help="keep the runs and caches in this directory")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_startup)


def cmd_startup(args: argparse.Namespace) -> int:
    overrides = [f"--config.{k}={v}" for k, v in args.overrides]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kronjax-startup-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = run_startup(args.config, overrides, args.reps, args.compare, args.compare_arms,
                             args.compare_seeds, args.compare_reps, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result) if args.json else format_startup(result))
    return 0
