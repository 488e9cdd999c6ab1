"""Prepared data in a bucket: published by `prepare`, copied to each host's disk to train.

A pod's hosts share no disk, and reading token windows at random offsets from object storage
would cost a request per window, so every host copies the prepared directory into its local
cache once (`fetch`) and trains from that, exactly as from a local directory: every host then
reads identical tokens. `publish` uploads a locally prepared directory: the shards and the
tokenizer first, meta.json last (with every file's size and SHA-256 under "files"), so a
bucket directory with a meta.json is complete. `fetch` verifies each copy against those sizes
and digests, fetches a damaged or partial copy once more and refuses it in one line after
that; copies verified before (same size and mtime) are not hashed again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kronjax import storage
from kronjax.data.store import CACHED_SP, META, DataError, DataMismatchError, split_shards
from kronjax.files import write_atomic

__all__ = ["FILES", "fetch", "mirror_dir", "prepare_in_bucket", "publish", "read_meta"]

log = logging.getLogger("kronjax.data")

FILES = "files"                      # meta.json: {name: {"bytes": n, "sha256": hex}}
VERIFIED = ".kronjax-verified.json"  # a local copy's {name: [bytes, mtime_ns, sha256]}


def mirror_dir(url: Any) -> Path:
    """Where this host keeps its copy of a bucket directory: the data cache (KRONJAX_DATA,
    default ~/.cache/kronjax/data) / gcs / BUCKET / PATH."""
    root = Path(os.environ.get("KRONJAX_DATA", Path.home() / ".cache" / "kronjax" / "data"))
    scheme, _, rest = os.fspath(url).partition("://")
    return root / scheme / rest.strip("/")


def read_meta(url: Any) -> dict[str, Any] | None:
    """The bucket directory's meta.json, None if it has none (not prepared, or not yet
    completely published)."""
    path = storage.as_path(url) / META
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not JSON ({e}); publish the data again "
                        "(python -m kronjax.data prepare ... --out URL --overwrite)") from None


def _files_of(meta: dict[str, Any], local: Path | None = None) -> list[str]:
    names = [s["file"] for split in ("train", "val") for s in split_shards(meta, split)]
    tok = str(meta.get("tokenizer", ""))
    if tok.startswith("sentencepiece:") and Path(tok[14:]).name == CACHED_SP:
        names.append(CACHED_SP)
    elif local is not None and (local / CACHED_SP).exists():
        names.append(CACHED_SP)
    return names


def publish(local: Path, url: Any) -> dict[str, Any]:
    """Upload a prepared local directory to `url`: data files first (an object already there
    with the same MD5 is kept), meta.json last with every file's size and SHA-256."""
    meta = json.loads((local / META).read_text(encoding="utf-8"))
    remote = storage.as_path(url)
    fs = storage.filesystem(remote)
    files: dict[str, dict[str, Any]] = {}
    for name in _files_of(meta, local):
        path = local / name
        files[name] = {"bytes": path.stat().st_size, "sha256": storage.sha256_file(path)}
        target = remote / name
        if target.exists() and fs.info(os.fspath(target)).get("md5Hash") == _md5_b64(path):
            continue
        log.info("uploading %s (%s bytes) to %s", name, f"{files[name]['bytes']:,}", target)
        storage.upload(path, target)
    meta[FILES] = files
    text = json.dumps(meta, indent=2) + "\n"
    write_atomic(local / META, text.encode())  # the local copy says what the bucket holds
    _record_verified(local, {n: (f["bytes"], f["sha256"]) for n, f in files.items()})
    storage.write_bytes(remote / META, text.encode())
    log.info("published %s to %s (%d files)", local, url, len(files))
    return meta


def _md5_b64(path: Path) -> str:
    import base64
    import hashlib

    digest = hashlib.md5()  # noqa: S324 - Cloud Storage's own object checksum, not security
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode()


def _verified(local: Path) -> dict[str, list[Any]]:
    try:
        return json.loads((local / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}


def _record_verified(local: Path, done: dict[str, tuple[int, str]]) -> None:
    record = _verified(local)
    for name, (size, sha) in done.items():
        record[name] = [size, (local / name).stat().st_mtime_ns, sha]
    write_atomic(local / VERIFIED, json.dumps(record, indent=1).encode())


def _is_good(local: Path, name: str, want: dict[str, Any], record: dict[str, list[Any]]) -> bool:
    path = local / name
    if not path.is_file() or path.stat().st_size != want["bytes"]:
        return False
    if want.get("sha256") is None:
        return True
    seen = record.get(name)
    if seen and seen[:2] == [want["bytes"], path.stat().st_mtime_ns] and seen[2] == want["sha256"]:
        return True
    return storage.sha256_file(path) == want["sha256"]


def fetch(url: Any, *, data: bool = True) -> Path:
    """Copy the bucket directory `url` into this host's cache (`mirror_dir`) and return the
    local directory; data=False copies meta.json and the tokenizer only (enough to sample)."""
    meta = read_meta(url)
    if meta is None:
        raise DataError(f"{url} holds no {META}: no prepared data there (prepare it with "
                        f"python -m kronjax.data prepare ... --out {url})")
    local, remote = mirror_dir(url), storage.as_path(url)
    local.mkdir(parents=True, exist_ok=True)
    want = meta.get(FILES)
    if want is None:  # uploaded by hand: sizes from meta.json, nothing to verify contents by
        log.warning("%s/%s lists no checksums (not published by kronjax): copies are checked "
                    "by size only", url, META)
        dtype = 4 if meta.get("dtype") == "uint32" else 2
        want = {s["file"]: {"bytes": int(s["tokens"]) * dtype, "sha256": None}
                for split in ("train", "val") for s in split_shards(meta, split)}
        if str(meta.get("tokenizer", "")).startswith("sentencepiece:"):
            want[CACHED_SP] = {"bytes": (remote / CACHED_SP).stat().st_size, "sha256": None}
    names = [n for n in want if data or n == CACHED_SP]
    record, done = _verified(local), {}
    for name in names:
        if _is_good(local, name, want[name], record):
            done[name] = (want[name]["bytes"], want[name]["sha256"])
            continue
        for attempt in (1, 2):
            log.info("copying %s from %s", name, url)
            storage.download(remote / name, local / name)
            if _is_good(local, name, want[name], {}):
                break
            if attempt == 2:
                got = (local / name).stat().st_size
                raise DataError(f"{remote / name} does not match {url}/{META} after two copies "
                                f"({got} bytes, expected {want[name]['bytes']} with SHA-256 "
                                f"{want[name]['sha256']}): the bucket's copy is damaged; "
                                "publish the data again")
            log.warning("%s: the copy does not match %s; fetching it again", name, META)
        done[name] = (want[name]["bytes"], want[name]["sha256"])
    if done and any(v[1] for v in done.values()):
        _record_verified(local, {k: v for k, v in done.items() if v[1]})
    write_atomic(local / META, (json.dumps(meta, indent=2) + "\n").encode())
    return local


def prepare_in_bucket(url: Any, request: dict[str, Any], overwrite: bool,
                      diffs: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
                      prepare_local: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """`prepare` with a gs:// output: the meta of identical data already published there, or
    prepare into this host's cache directory for url and publish it. Data made from another
    request are refused (DataMismatchError) unless overwrite."""
    existing = read_meta(url)
    if existing is not None and not overwrite:
        if not (found := diffs(existing.get("request", {}), request)):
            return existing
        said = "; ".join(f"{k}: published {a!r}, requested {b!r}" for k, (a, b) in found.items())
        raise DataMismatchError(f"{url} already holds data prepared differently ({said}); "
                                "use another --out, or pass --overwrite to replace them")
    local = mirror_dir(url)
    prepare_local(local)
    return publish(local, url)
