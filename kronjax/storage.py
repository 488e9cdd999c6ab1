"""Where a run's bytes live: local paths and Cloud Storage URLs through one path type.

A pod's hosts share no disk, so a pod run keeps its work in a `gs://` bucket. Local paths
stay `pathlib.Path` (every local behaviour as before); URLs become `etils.epath.Path`, the
path type orbax already writes checkpoints through (gcsfs underneath, tensorstore for the
arrays). `as_path` is the one door: a URL never reaches `pathlib.Path`, which would turn
`gs://b/run` into a local folder named `gs:`.

Object stores have no rename, no append and no flock. What kronjax needs of them, beyond
whole-object reads and writes, is here: copying files in and out (`upload`, `download`) and
the generation preconditions a lock is built on (`create_object`, `replace_object`,
`delete_object`, Cloud Storage's `ifGenerationMatch`).

`STORAGE_EMULATOR_HOST` (what Google's clients and gcsfs honour) points every client kronjax
uses at an emulator: tensorstore through `TENSORSTORE_GCS_HTTP_URL`, credential discovery at
the emulator's own loopback address (no metadata-server lookup leaves the machine), gcsfs
anonymous and without its bucket-layout lookup, a gRPC call an emulator cannot answer that
gcsfs retries for 60 s on every operation (what made orbax's finalize hang in `exists`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from kronjax.errors import UserError

__all__ = ["AnyPath", "StorageError", "as_path", "configure_emulator", "create_object",
           "delete_object", "download", "is_url", "move", "read_object", "replace_object",
           "sha256_file", "upload", "write_bytes"]

log = logging.getLogger(__name__)

AnyPath = Path | Any   # pathlib.Path, or etils.epath.Path for a URL
SUPPORTED = {"gs": "gcs"}    # URL scheme -> the extra that brings its client
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


class StorageError(UserError):
    """A storage URL kronjax cannot use (unknown scheme, missing extra, no bucket)."""


def is_url(path: str | os.PathLike[str] | Any) -> bool:
    return "://" in os.fspath(path)


def _check_url(text: str) -> None:
    scheme, _, rest = text.partition("://")
    if scheme not in SUPPORTED:
        raise StorageError(f"{text}: kronjax reads and writes local paths and gs:// (Cloud "
                           f"Storage) URLs, not {scheme}://")
    if not rest.split("/", 1)[0]:
        raise StorageError(f"{text}: no bucket name (expected gs://BUCKET/PATH)")
    if importlib.util.find_spec("gcsfs") is None:
        raise StorageError(f"{text}: gs:// paths need the '{SUPPORTED[scheme]}' extra: "
                           f"pip install 'kronjax[{SUPPORTED[scheme]}]'")


def as_path(path: str | os.PathLike[str] | Any) -> AnyPath:
    """A local path as `pathlib.Path`, a gs:// URL as `epath.Path` (checked, and pointed at
    the emulator when one is set). Everything that takes a workdir or an output goes here."""
    if not isinstance(path, Path) and is_url(path):
        text = os.fspath(path)
        _check_url(text)
        configure_emulator()
        from etils import epath

        return epath.Path(text)
    return path if isinstance(path, Path) else Path(path)


def _loopback(host: str) -> str:
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


_CONFIGURED: list[str] = []


def configure_emulator() -> None:
    """With STORAGE_EMULATOR_HOST set, point every storage client at it, once per process
    (before gcsfs is first imported; it reads one of these variables at import)."""
    host = os.environ.get(EMULATOR_ENV, "")
    if not host or _CONFIGURED == [host]:
        return
    url = _loopback(host)
    hostport = url.split("://", 1)[1].rstrip("/")
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    # Credential discovery asks the GCE metadata server (metadata.google.internal): send
    # tensorstore's and google-auth's lookups to the emulator, which answers them "not here".
    for var in ("GCE_METADATA_HOST", "GCE_METADATA_ROOT", "GCE_METADATA_IP"):
        os.environ.setdefault(var, hostport)
    os.environ.setdefault("NO_GCE_CHECK", "true")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec

    for proto in ("gs", "gcs"):
        fsspec.config.conf.setdefault(proto, {}).setdefault("token", "anon")
    if "gcsfs" in sys.modules:  # imported before us: make sure the plain filesystem serves
        import gcsfs.core

        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
    _CONFIGURED[:] = [host]
    log.debug("storage emulator at %s (tensorstore, gcsfs, credential lookups)", url)


# -- whole files ----------------------------------------------------------------------------
def write_bytes(path: AnyPath, data: bytes) -> None:
    """Write a file whole: atomically on local disk (temp file + rename); one object upload
    on a bucket, which is atomic there (readers see the old object or the new one)."""
    if not is_url(path):
        from kronjax.files import write_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    else:
        path.write_bytes(data)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def upload(local: Path, remote: AnyPath) -> None:
    """Copy a local file to `remote` (a bucket object or a local path), whole."""
    if not is_url(remote):
        with open(local, "rb") as f:
            write_bytes(remote, f.read())
        return
    filesystem(remote).put_file(str(local), os.fspath(remote))


def download(remote: AnyPath, local: Path) -> None:
    """Copy `remote` to the local file `local`, appearing whole (temp file + rename)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".part")
    os.close(fd)
    try:
        if not is_url(remote):
            shutil.copyfile(remote, tmp)
        else:
            filesystem(remote).get_file(os.fspath(remote), tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, local)
    finally:
        Path(tmp).unlink(missing_ok=True)


def move(src: AnyPath, dst: AnyPath) -> None:
    """Move a file or a directory tree (a bucket has no rename: its objects are copied,
    then deleted)."""
    if not is_url(src) and not is_url(dst):
        Path(src).rename(dst)
    else:
        filesystem(src).mv(os.fspath(src), os.fspath(dst), recursive=True)


# -- generation preconditions (Cloud Storage) -----------------------------------------------
def filesystem(remote: AnyPath) -> Any:
    import fsspec

    configure_emulator()
    return fsspec.filesystem("gcs")


def _bucket_key(remote: AnyPath) -> tuple[str, str]:
    bucket, _, key = os.fspath(remote).split("://", 1)[1].partition("/")
    return bucket, key


def _upload(remote: AnyPath, data: bytes, generation: int) -> int:
    fs = filesystem(remote)
    bucket, key = _bucket_key(remote)
    out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o",
                  uploadType="media", name=key, ifGenerationMatch=str(generation),
                  headers={"Content-Type": "application/octet-stream"}, data=data,
                  json_out=True)
    fs.invalidate_cache(os.fspath(remote))
    return int(out["generation"])


def create_object(remote: AnyPath, data: bytes) -> int:
    """Create `remote` only if no object has its name (ifGenerationMatch=0); returns the new
    generation, FileExistsError if one exists: the one atomic test-and-set a bucket offers."""
    return _upload(remote, data, 0)


def replace_object(remote: AnyPath, data: bytes, generation: int) -> int:
    """Overwrite `remote` only if it is still at `generation`; FileExistsError if another
    writer changed it since (or FileNotFoundError if it is gone). Returns the new generation."""
    return _upload(remote, data, generation)


def read_object(remote: AnyPath) -> tuple[bytes, int] | None:
    """(content, generation) of `remote`, or None if there is no such object."""
    fs = filesystem(remote)
    bucket, key = _bucket_key(remote)
    try:
        meta = fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
        generation = int(meta["generation"])
        data = fs.cat_file(f"{os.fspath(remote)}")
    except FileNotFoundError:
        return None
    return data, generation


def delete_object(remote: AnyPath, generation: int) -> bool:
    """Delete `remote` only if it is still at `generation`; False if it changed or is gone."""
    fs = filesystem(remote)
    bucket, key = _bucket_key(remote)
    try:
        fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(generation))
    except (FileExistsError, FileNotFoundError):
        return False
    finally:
        fs.invalidate_cache(os.fspath(remote))
    return True
