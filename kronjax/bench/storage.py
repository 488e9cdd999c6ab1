"""`python -m kronjax.bench storage --url gs://BUCKET/PREFIX [--config FILE] [--reps 3]`

A run's checkpoint and prepared data on local disk and in a bucket, side by side in one run:
the config's train state (params and AdamW moments, freshly initialised) saved and restored
by kronjax's own Checkpointer into a temporary local directory and under --url (alternating,
--reps times each), the objects and bytes one checkpoint writes, and the prepared data
published to the bucket and copied back into an empty host cache (what every host of a pod
does before its first step). Ratios are bucket / local. Everything written under --url is
deleted afterwards. Point it at an emulator with STORAGE_EMULATOR_HOST
(`python -m kronjax.emulator`) or at a real bucket with credentials.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kronjax.bench.timing import machine_info, machine_line


def _tree_size(root: Any) -> tuple[int, int]:
    """(objects or files, bytes) under a local directory or a bucket prefix."""
    from kronjax import storage

    if not storage.is_url(root):
        files = [p for p in Path(root).rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)
    found = storage.filesystem(root).find(os.fspath(root).split("://", 1)[1], detail=True)
    return len(found), sum(int(v.get("size", 0)) for v in found.values())


def _timed_checkpoint(directory: Any, state: Any, abstract: Any) -> dict[str, float]:
    from kronjax.checkpoint import Checkpointer

    ckpt = Checkpointer(directory, save_every=1, max_to_keep=1)
    try:
        t0 = time.perf_counter()
        ckpt.save(1, state, None, {"bench": True}, force=True)
        ckpt.wait()
        saved = time.perf_counter() - t0
        t0 = time.perf_counter()
        ckpt.restore(1, abstract, None)
        restored = time.perf_counter() - t0
    finally:
        ckpt.close()
    objects, size = _tree_size(directory)
    return {"save_s": saved, "restore_s": restored, "objects": objects, "bytes": size}


def run_storage(cfg: Any, url: str, reps: int) -> dict[str, Any]:
    import jax

    from kronjax import data as data_lib
    from kronjax import optim, storage
    from kronjax import run as run_lib
    from kronjax.data import cache as data_cache
    from kronjax.data import remote
    from kronjax.step import init_state

    info = machine_info()  # its load average: before anything of ours runs
    root = storage.as_path(url.rstrip("/")) / f"kronjax-bench-{uuid.uuid4().hex[:8]}"
    ddir = data_cache.ensure_data(cfg, progress=False)
    tok = data_lib.load_tokenizer_for(ddir)
    model = run_lib.build_model(cfg, tok.vocab_size, tok.byte_vocab)
    tx, _ = optim.from_config(cfg)
    state = jax.jit(lambda: init_state(model, tx, 0, model.config.block_size))()
    abstract = jax.eval_shape(lambda: state)
    rows: dict[str, list[dict[str, float]]] = {"local": [], "bucket": []}
    try:
        with tempfile.TemporaryDirectory(prefix="kronjax-bench-storage-") as tmp:
            for rep in range(reps):  # alternating, so load on the machine falls on both
                rows["local"].append(_timed_checkpoint(Path(tmp) / f"c{rep}", state, abstract))
                rows["bucket"].append(_timed_checkpoint(root / f"c{rep}", state, abstract))
            cache = Path(tmp) / "host_cache"
            t0 = time.perf_counter()
            remote.publish(ddir, root / "data")
            published = time.perf_counter() - t0
            os.environ["KRONJAX_DATA"], old = str(cache), os.environ.get("KRONJAX_DATA")
            try:
                t0 = time.perf_counter()
                remote.fetch(root / "data")
                fetched = time.perf_counter() - t0
            finally:
                if old is None:
                    os.environ.pop("KRONJAX_DATA")
                else:
                    os.environ["KRONJAX_DATA"] = old
            data_objects, data_bytes = _tree_size(root / "data")
    finally:
        if storage.filesystem(root).exists(os.fspath(root)):
            storage.filesystem(root).rm(os.fspath(root), recursive=True)
    med = {where: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for where, rs in rows.items()}
    return {"machine": machine_line(info), "url": url, "reps": reps, "median": med,
            "ratio": {k: med["bucket"][k] / med["local"][k] for k in ("save_s", "restore_s")},
            "data": {"publish_s": published, "fetch_s": fetched, "objects": data_objects,
                     "bytes": data_bytes},
            "params": int(sum(x.size for x in jax.tree.leaves(state["params"])))}


def format_storage(r: dict[str, Any]) -> str:
    lines = [f"# {r['machine']}", f"# {r['params']:,} params; state = params + AdamW moments; "
             f"median of {r['reps']} alternating rounds; bucket: {r['url']}", "",
             "| where | save s | restore s | objects | MiB |", "|---|---|---|---|---|"]
    for where in ("local", "bucket"):
        m = r["median"][where]
        lines.append(f"| {where} | {m['save_s']:.3f} | {m['restore_s']:.3f} | "
                     f"{m['objects']:.0f} | {m['bytes'] / 2**20:.2f} |")
    lines.append(f"| bucket / local | {r['ratio']['save_s']:.2f}x | {r['ratio']['restore_s']:.2f}x"
                 " | | |")
    d = r["data"]
    lines += ["", f"prepared data: {d['objects']} objects, {d['bytes'] / 2**20:.2f} MiB; "
                  f"published in {d['publish_s']:.2f} s; copied to an empty host cache "
                  f"(verified) in {d['fetch_s']:.2f} s"]
    return "\n".join(lines)


def cmd_storage(args: argparse.Namespace) -> int:
    from kronjax import config as config_lib

    cfg = config_lib.build_config(args.config, args.overrides)
    result = run_storage(cfg, args.url, args.reps)
    print(json.dumps(result) if args.json else format_storage(result))
    return 0
