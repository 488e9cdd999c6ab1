"""The PNG plots of `python -m kronjax.compare`: loss curves, norm drift, the paired gap curve.

matplotlib's Figure API, no pyplot: no GUI backend and no global state, so a report can be
written from a test or a headless job.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kronjax import storage
from kronjax.stats import curves, mean_curve

Runs = Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]]  # {arm: {seed: records}}


def _panels(path: Any, titles: Sequence[str], xlabel: str, ylabel: str, draw: Any) -> None:
    """A 1 x len(titles) figure saved as PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(titles), 4))
    axes = np.atleast_1d(fig.subplots(1, len(titles)))
    draw(axes)
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    storage.write_bytes(path, png.getvalue())  # a local file or a gs:// object


def plot_curves(runs: Runs, path: Any) -> None:
    """Train and validation loss per arm: thin lines per seed, thick the seed mean."""
    def draw(axes: Any) -> None:
        for i, (arm, seeds) in enumerate(runs.items()):
            for key, ax in (("loss", axes[0]), ("val_loss", axes[1])):
                per_seed = [c for c in (curves(r, key) for r in seeds.values()) if c]
                for c in per_seed:
                    ax.plot(*zip(*c), color=f"C{i}", alpha=0.3, lw=0.8)
                if m := mean_curve(per_seed):
                    ax.plot(*zip(*m), color=f"C{i}", lw=2, label=arm,
                            marker="o" if key == "val_loss" else None)
    _panels(path, ("train loss", "validation loss"), "step", "nats / token", draw)


def plot_norms(runs: Runs, path: Any) -> None:
    """Input-side matrix norm over steps: absolute, and relative to its first logged value."""
    def draw(axes: Any) -> None:
        for i, (arm, seeds) in enumerate(runs.items()):
            for j, recs in enumerate(seeds.values()):
                if c := curves(recs, "input_norm"):
                    s, v = zip(*c)
                    label = arm if j == 0 else None
                    axes[0].plot(s, v, color=f"C{i}", label=label)
                    axes[1].plot(s, np.asarray(v) / v[0], color=f"C{i}", label=label)
    _panels(path, ("input-side norm (table V×d or projection C×d)",
                   "norm drift (÷ first logged step)"), "step", "Frobenius norm", draw)


def _tokens(x: float, _pos: Any = None) -> str:
    """Tick label for a token count: 0, 50k, 1.2M."""
    return f"{x / 1e6:g}M" if abs(x) >= 1e6 else f"{x / 1e3:g}k" if abs(x) >= 1e3 else f"{x:g}"


def plot_gap_curves(gap_curves: Sequence[Mapping[str, Any]], path: Any,
                    metric: str = "val_loss") -> None:
    """Paired gap (arm - reference) at every evaluation against tokens seen, one panel per
    reference: the seed mean with its 95% paired-t band, thin lines per seed, and zero."""
    from matplotlib.ticker import FuncFormatter

    chosen = [g for g in gap_curves if g["metric"] == metric]
    refs = list(dict.fromkeys(g["reference"] for g in chosen))
    arms = list(dict.fromkeys(g["arm"] for g in chosen))

    def draw(axes: Any) -> None:
        for ax, ref in zip(axes, refs):
            ax.axhline(0.0, color="black", lw=0.8)
            for g in (g for g in chosen if g["reference"] == ref):
                color = f"C{arms.index(g['arm'])}"
                pts = g["points"]
                x = [p["tokens"] for p in pts]
                ax.plot(x, [p["diff"] for p in pts], color=color, lw=2, marker="o",
                        label=f"{g['arm']} − {ref}")
                if all(p["ci95"] for p in pts):
                    ax.fill_between(x, [p["ci95"][0] for p in pts], [p["ci95"][1] for p in pts],
                                    color=color, alpha=0.2)
                for seed in pts[0]["per_seed"] if pts else ():
                    ax.plot(x, [p["per_seed"][seed] for p in pts], color=color, lw=0.8,
                            alpha=0.4)
            ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
    unit = "nats / token" if metric == "val_loss" else "bits / byte"
    _panels(path, [f"paired gap to {r} (band: 95% paired t)" for r in refs],
            "tokens seen", f"{metric} gap, {unit}", draw)
