"""Data: corpora -> tokenizers -> the on-disk token store -> grain pipelines per process.

  corpora     documents from the embedded corpora, local files or Hugging Face streaming
  tokenizers  tiktoken / sentencepiece adapters with exact token bytes; train a sentencepiece
  store       the prepared format (sharded token files + meta.json) and reading it back
  writer      appending a split's shards, tokenizing in worker processes
  prepare     a corpus -> a prepared directory, resumable
  pipeline    grain pipelines: each process's rows of every global batch

`python -m kronjax.data prepare ...` (kronjax.data.cli) prepares by hand.
"""

from kronjax.data.cli import main
from kronjax.data.corpora import BUILTIN_SOURCES, LOCAL_SUFFIXES, SOURCES_HELP, iter_documents
from kronjax.data.pipeline import eval_batch_count, eval_batches, train_dataset
from kronjax.data.prepare import prepare
from kronjax.data.store import (
                                FORMAT_VERSION,
                                META,
                                PROGRESS,
                                SHARD_TOKENS,
                                SPLITS,
                                DataError,
                                ShardedTokens,
                                load_meta,
                                load_split,
                                load_tokenizer_for,
                                shard_name,
                                token_dtype,
)
from kronjax.data.tokenizers import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "BUILTIN_SOURCES", "DataError", "FORMAT_VERSION", "LOCAL_SUFFIXES", "META", "PROGRESS",
    "SHARD_TOKENS", "SOURCES_HELP", "SPLITS", "ShardedTokens", "Tokenizer", "eval_batch_count",
    "eval_batches", "iter_documents", "load_meta", "load_split", "load_tokenizer",
    "load_tokenizer_for", "main", "prepare", "shard_name", "token_dtype", "train_dataset",
    "train_sentencepiece",
]
