"""Pure statistics for arm comparisons over seeds: Welch and paired-t intervals, steps-to-match.

Paired comparisons are the sharper test here: every arm is trained with the same seeds, and a
seed fixes the data order and the init of everything but the input side, so the per-seed
difference removes the seed's own effect (kronjax.compare documents the design).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Two-sided 95% Student t quantiles t_{0.975, df}; used only when scipy is missing.
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
           9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
           16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074,
           23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045,
           30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
Z_975 = 1.959964


def t_quantile(df: float, q: float = 0.975) -> tuple[float, str]:
    """Student t quantile and how it was obtained (scipy, else the 95% table)."""
    try:
        from scipy import stats

        return float(stats.t.ppf(q, df)), "scipy.stats.t.ppf"
    except ImportError:
        return t_table(df, q), "t table at floor(df), conservative"


def t_table(df: float, q: float = 0.975) -> float:
    """t_{0.975, df} from T_TABLE at the largest tabled df <= df: the textbook conservative
    rule (a slightly wider interval for fractional Welch df; exact at tabled df)."""
    if q != 0.975:
        raise ValueError("the fallback t table holds only the 0.975 quantile (95% intervals)")
    if not df >= 1:
        raise ValueError(f"degrees of freedom must be >= 1; got {df}")
    if df > 10 * max(T_TABLE):
        return Z_975
    return T_TABLE[max(k for k in T_TABLE if k <= df)]


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()) if v.size else None,
            "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "n": int(v.size), "values": [float(x) for x in v]}


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(b) - mean(a) with a 95% Welch-t interval (None when an arm has < 2 seeds)."""
    a_, b_ = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(b_.mean() - a_.mean())
    if a_.size < 2 or b_.size < 2:
        return {"diff": diff, "ci95": None, "df": None, "method": "none: needs >= 2 seeds per arm"}
    va, vb = a_.var(ddof=1) / a_.size, b_.var(ddof=1) / b_.size
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "ci95": [diff, diff], "df": None,
                "method": "Welch t (zero variance: the interval is the point)"}
    df = (va + vb) ** 2 / (va ** 2 / (a_.size - 1) + vb ** 2 / (b_.size - 1))
    t, how = t_quantile(df)
    return {"diff": diff, "ci95": [diff - t * se, diff + t * se], "df": float(df), "se": se,
            "t": t, "method": f"Welch t, {how}"}


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any]:
    """b - a seed by seed over the seeds both have, with a 95% paired-t interval.

    The interval is mean(d) +- t_{0.975, n-1} * std(d, ddof=1) / sqrt(n); None with < 2 pairs.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(a)} against {sorted(b)}")
    d = np.asarray([b[s] - a[s] for s in seeds], np.float64)
    out: dict[str, Any] = {"diff": float(d.mean()), "n": int(d.size),
                           "per_seed": {str(s): float(x) for s, x in zip(seeds, d)}}
    if d.size < 2:
        return out | {"ci95": None, "df": None, "method": "none: needs >= 2 paired seeds"}
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    if se == 0:
        return out | {"ci95": [out["diff"]] * 2, "df": d.size - 1, "se": 0.0,
                      "method": "paired t (zero variance: the interval is the point)"}
    t, how = t_quantile(d.size - 1)
    return out | {"ci95": [out["diff"] - t * se, out["diff"] + t * se], "df": d.size - 1,
                  "se": se, "t": t, "method": f"paired t, {how}"}


def steps_to_match(curve_b: Sequence[tuple[int, float]], target: float, a_steps: int
                   ) -> dict[str, Any]:
    """When curve_b first reaches `target` (arm A's final val loss), as a ratio of A's steps.

    Validation exists only at eval steps, so the crossing is interpolated linearly between the
    last eval above the target and the first at or below it; reached at the very first eval,
    only an upper bound is known.
    """
    pts = sorted(curve_b)
    for i, (s, v) in enumerate(pts):
        if v <= target:
            if i == 0:
                return {"step": float(s), "ratio": s / a_steps, "first_eval_step": s,
                        "exact": False, "note": "reached at the first evaluation: an upper bound"}
            s0, v0 = pts[i - 1]
            step = s0 + (v0 - target) / (v0 - v) * (s - s0)
            return {"step": step, "ratio": step / a_steps, "first_eval_step": s, "exact": True,
                    "note": "interpolated between evaluations"}
    last = pts[-1][0] if pts else None
    return {"step": None, "ratio": None, "first_eval_step": None, "exact": False,
            "note": f"not reached within {last} steps"}


def curves(records: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) for every metrics record that has `key`."""
    return [(int(r["step"]), float(r[key])) for r in records if r.get(key) is not None]


def mean_curve(per_seed: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean over seeds at the steps every seed has."""
    maps = [dict(c) for c in per_seed]
    common = sorted(set.intersection(*(set(m) for m in maps))) if maps else []
    return [(s, float(np.mean([m[s] for m in maps]))) for s in common]


def paired_curve(a: Mapping[int, Sequence[tuple[int, float]]],
                 b: Mapping[int, Sequence[tuple[int, float]]]) -> list[dict[str, Any]]:
    """`paired` (b - a) at every step all the seeds both arms have were evaluated at.

    {seed: [(step, value)]} per arm; one final value hides whether a gap is closing, opening
    or crossing zero as the data grow, which is what a comparison at a fixed budget is asked.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(a)} against {sorted(b)}")
    ma, mb = {s: dict(a[s]) for s in seeds}, {s: dict(b[s]) for s in seeds}
    steps = sorted(set.intersection(*(set(ma[s]) & set(mb[s]) for s in seeds)))
    return [{"step": t, **paired({s: ma[s][t] for s in seeds}, {s: mb[s][t] for s in seeds})}
            for t in steps]
