"""The command line of `python -m kronjax.export` (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kronjax import console
from kronjax import export as package
from kronjax.errors import debug_traceback
from kronjax.export import export
from kronjax.export.state import ExportError


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.export", description=package.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=("hf", "nanogpt"),
                   help="hf: a transformers GPT2LMHeadModel directory; nanogpt: a ckpt.pt file")
    p.add_argument("--workdir", required=True, help="a kronjax.train workdir")
    p.add_argument("--out", required=True, help="hf: a directory; nanogpt: a file (ckpt.pt)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--force", action="store_true",
                   help="replace what this export writes in an existing --out")
    p.add_argument("--log-level", "--log_level", dest="log_level", default="warning",
                   choices=console.LEVELS, help="debug: tracebacks with errors")
    args = p.parse_args(argv)
    console.setup_logging(args.log_level)
    try:
        warnings = export(args.format, args.workdir, args.out, args.step, args.force)
    except (ExportError, FileNotFoundError, ValueError) as e:
        debug_traceback(e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
