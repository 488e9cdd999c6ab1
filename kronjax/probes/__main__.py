"""`python -m kronjax.probes {robustness,generation,geometry} ...`: the probe command line.

  robustness  KL / hidden cosine / top-1 survival under one-word typos, per category
  generation  completions of normal, misspelled and forced out-of-vocabulary prompts; echo rate
  geometry    typographic vs morphological nearest neighbours of input (and hidden) embeddings

`python -m kronjax.probes COMMAND --help` describes each one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

COMMANDS = ("robustness", "generation", "geometry")


def _entry(command: str) -> Callable[[Sequence[str]], int]:
    import importlib

    return importlib.import_module(f"kronjax.probes.{command}").main


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"python -m kronjax.probes: unknown command {command!r}; choose one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return _entry(command)(rest)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"python -m kronjax.probes {command}: error: {e}", file=sys.stderr)
        return 2  # bad input, as every kronjax command line says it


if __name__ == "__main__":
    sys.exit(main())
