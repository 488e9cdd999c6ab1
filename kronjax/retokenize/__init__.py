"""Tokenizer freedom: a trained run with another (or an extended) tokenizer, no retraining.

  specs     SPEC: a sentencepiece .model, a tiktoken encoding, sp:N, extend:FILE
  mapping   which source tokens stand for each new token (exact keys, FVT segmentation)
  rows      the new table / head rows: fvt, mean or zero, as pure NumPy
  build     W2, a normal run directory: re-tokenized data, config, checkpoint at step 0
  evaluate  bits per UTF-8 byte over a whole held-out split (compares tokenizers)
  experiment  the docs/results.md experiment (python -m kronjax.retokenize.experiment)

`python -m kronjax.retokenize --workdir W --tokenizer SPEC --out W2` is the command line.
"""

from kronjax.retokenize.build import RetokenizeError, retokenize
from kronjax.retokenize.specs import SpecError, parse_spec

__all__ = ["RetokenizeError", "SpecError", "parse_spec", "retokenize"]
