"""`python -m kronjax.sample --workdir DIR --prompt "..." [--oov WORD] [--top-p 0.9]`.

Greedy or nucleus sampling from a trained run (a local or gs:// workdir). With a Kronecker
arm, `--oov WORD` embeds WORD from its bytes at one position (where the prompt says `{oov}`,
else at its end), so the model reads a word that has no single token: the forced
out-of-vocabulary probe. The decoding itself is kronjax.generate.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from kronjax import console
from kronjax.errors import UserError, exit_line
from kronjax.generate import OOV_MARK, encode_prompt, generate, text_arg
from kronjax.run import load_run

log = logging.getLogger("kronjax.sample")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronjax.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--tokens", type=int, default=64, help="new tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oov", default=None, help="a word embedded from its bytes at {oov}")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--log-level", "--log_level", dest="log_level", default="warning",
                   choices=console.LEVELS, help="debug: tracebacks with errors")
    args = p.parse_args(argv)
    console.setup_logging(args.log_level)
    if args.tokens < 0:
        p.error(f"--tokens must be >= 0; got {args.tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error(f"--temperature must be >= 0 and --top-p in (0, 1]; got {args.temperature}, "
                f"{args.top_p}")
    try:
        prompt = text_arg("--prompt", args.prompt)
    except UserError as e:
        p.error(str(e))
    try:
        run = load_run(args.workdir, args.step)
        ids, oov = encode_prompt(run.tokenizer, prompt, args.oov)
        if not ids:
            ids = [run.tokenizer.eot_id if run.tokenizer.eot_id is not None else 0]
        block = run.model.config.block_size
        if len(ids) >= block:
            raise UserError(f"--prompt is {len(ids)} tokens, but the model reads at most "
                            f"block_size {block} and needs room for one new token: shorten "
                            f"the prompt to at most {block - 1} tokens")
        n_new = min(args.tokens, block - len(ids))
        if n_new < args.tokens:
            log.warning("--tokens %d cut to %d: the model's context is %d tokens and the "
                        "prompt takes %d", args.tokens, n_new, block, len(ids))
        out = generate(run, ids, n_new, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, oov=oov)
    except UserError as e:
        p.exit(2, exit_line(p.prog, e))
    text = run.tokenizer.decode(out[len(ids):])
    oov_text = os.fsdecode(oov[1]) if oov else ""
    shown = prompt.replace(OOV_MARK, oov_text) if oov else prompt
    if oov and OOV_MARK not in prompt:
        shown = prompt + oov_text
    shown = shown.encode("utf-8", "replace").decode()  # an --oov of raw bytes shows as such
    print(shown + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
