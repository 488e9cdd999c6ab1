"""A Cloud Storage emulator on 127.0.0.1, to try gs:// workdirs on a laptop and to test them.

    python -m kronjax.emulator [--port 9023] [--bucket my-bucket]
    export STORAGE_EMULATOR_HOST=http://127.0.0.1:9023       # in the shell that trains
    python -m kronjax.train --config configs/tiny.py --workdir gs://my-bucket/runs/tiny

gcp-storage-emulator (the `test` extra), in memory, with what the real service does that it
skips and kronjax relies on: generation preconditions (the bucket lock, tensorstore's
conditional writes) and the x-goog-generation header on downloads (tensorstore reads every
object's generation from it). `Emulator` runs it in a subprocess at a free port (the tests'
fixture) and stops it.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from http import HTTPStatus

__all__ = ["Emulator", "free_port", "serve"]


def _patch_preconditions() -> None:
    """What the real service does that the emulator skips (as tensorstore's own GCS mock
    models it): ifGenerationMatch / ifGenerationNotMatch on uploads, reads and deletes (412
    Precondition Failed, 304 Not Modified), and x-goog-generation on media downloads, which
    tensorstore reads every object's generation from."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def generation(request, storage, name):
        try:
            return int(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
        except NotFound:
            return 0

    def guarded(handler, name_of, read=False):
        def wrapped(request, response, storage, *args, **kwargs):
            name = name_of(request)
            match = request.query.get("ifGenerationMatch")
            not_match = request.query.get("ifGenerationNotMatch")
            if name and (match or not_match):
                current = generation(request, storage, name)
                if match and current != int(match[0]):
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                    return None
                if not_match and current and current == int(not_match[0]):
                    response.status = (HTTPStatus.NOT_MODIFIED if read
                                       else HTTPStatus.PRECONDITION_FAILED)
                    return None
            if read and name and request.query.get("alt", [""])[0] == "media" or \
                    handler is _download:
                current = generation(request, storage, name)
                if current:
                    response["x-goog-generation"] = str(current)
                    response["x-goog-metageneration"] = "1"
            return handler(request, response, storage, *args, **kwargs)
        return wrapped

    def upload_name(request):
        if "name" in request.query:
            return request.query["name"][0]
        return (request.data or {}).get("name") if isinstance(request.data, dict) else None

    def object_name(request):
        return request.params.get("object_id")

    _download = objects.download
    objects.insert = guarded(objects.insert, upload_name)
    objects.delete = guarded(objects.delete, object_name)
    objects.get = guarded(objects.get, object_name, read=True)
    objects.download = guarded(_download, object_name, read=True)


def serve(port: int, bucket: str) -> None:
    """Serve until killed; prints "ready" once it accepts requests."""
    _patch_preconditions()
    from gcp_storage_emulator.server import create_server  # after the patch: routes bind here

    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """The emulator in a subprocess: `host` is what STORAGE_EMULATOR_HOST takes."""

    def __init__(self, bucket: str = "kronjax-test") -> None:
        self.bucket = bucket
        self.port = free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen([sys.executable, "-m", "kronjax.emulator", "--port",
                                       str(self.port), "--bucket", bucket, "--quiet"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the storage emulator did not start")
        deadline = time.time() + 30
        while True:  # the server thread may need a moment after "ready"
            try:
                urllib.request.urlopen(f"{self.host}/storage/v1/b/{bucket}", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.emulator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=9023)
    p.add_argument("--bucket", default="my-bucket", help="a bucket created at start")
    p.add_argument("--quiet", action="store_true", help="print only 'ready'")
    args = p.parse_args(argv)
    try:
        import gcp_storage_emulator  # noqa: F401
    except ImportError:
        p.exit(2, "python -m kronjax.emulator: needs gcp-storage-emulator, in the test extra: "
                  "pip install 'kronjax[test]'\n")
    if not args.quiet:
        print(f"Cloud Storage emulator (in memory) with bucket {args.bucket!r}; in the shell "
              f"that trains:\n  export STORAGE_EMULATOR_HOST=http://127.0.0.1:{args.port}",
              flush=True)
    serve(args.port, args.bucket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
