"""Input-side parameter accounting: learned V x d table vs Kronecker projection (256 P) x d.

    python -m kronjax.params --vocab 50257 --d-model 768 --pos-dim 16 [--json]

Also reports what the codec costs in memory: the byte buffer the closed form reads
(V rows of P uint8 bytes plus an int16 length, V * (P + 2) bytes) and the dense float32
V x 256P codec table that the closed form never builds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kronjax.codec import CHAR_DIM

FLOAT32_BYTES = 4


def input_side_accounting(vocab: int, d_model: int, pos_dim: int) -> dict[str, float | int]:
    """Counts and bytes for one (V, d, P); `saving_pct` is negative when 256 P > V."""
    for name, value in (("vocab", vocab), ("d_model", d_model), ("pos_dim", pos_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    codec_width = CHAR_DIM * pos_dim
    table = vocab * d_model
    projection = codec_width * d_model
    return {
        "vocab": vocab, "d_model": d_model, "pos_dim": pos_dim, "codec_width": codec_width,
        "table_params": table,
        "projection_params": projection,
        "saving_params": table - projection,
        "saving_pct": 100.0 * (table - projection) / table,
        "table_to_projection": table / projection,
        "table_bytes_f32": table * FLOAT32_BYTES,
        "projection_bytes_f32": projection * FLOAT32_BYTES,
        "byte_buffer_bytes": vocab * (pos_dim + 2),
        "dense_codec_bytes_f32": vocab * codec_width * FLOAT32_BYTES,
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_accounting(a: dict[str, float | int]) -> str:
    """The human table the CLI prints (thousands separators)."""
    rows = [
        ("learned table", "V x d", a["table_params"], a["table_bytes_f32"], "float32"),
        ("Kronecker projection", "256P x d", a["projection_params"], a["projection_bytes_f32"],
         "float32"),
    ]
    lines = [f"Input side for V={a['vocab']:,}, d={a['d_model']:,}, pos_dim={a['pos_dim']} "
             f"(codec width 256P = {a['codec_width']:,})",
             f"  {'':22}{'shape':>10}{'params':>16}{'bytes':>18}"]
    for name, shape, params, nbytes, note in rows:
        lines.append(f"  {name:22}{shape:>10}{params:>16,}{nbytes:>18,}  "
                     f"({_human_bytes(nbytes)} {note})")
    lines.append(f"  {'saving':22}{'':>10}{a['saving_params']:>16,}  "
                 f"{a['saving_pct']:.2f}% ({a['table_to_projection']:.2f}x fewer)")
    lines.append(f"  {'byte buffer':22}{'V x (P+2)':>10}{'':>16}{a['byte_buffer_bytes']:>18,}  "
                 f"({_human_bytes(a['byte_buffer_bytes'])}: uint8 rows + int16 lengths)")
    lines.append(f"  {'dense codec table':22}{'V x 256P':>10}{'':>16}"
                 f"{a['dense_codec_bytes_f32']:>18,}  ({_human_bytes(a['dense_codec_bytes_f32'])}"
                 f" float32, never built by the closed form)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kronjax.params", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, required=True, help="vocabulary size V")
    parser.add_argument("--d-model", type=int, required=True, help="model width d")
    parser.add_argument("--pos-dim", type=int, default=16, help="codec positions P (default 16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        acc = input_side_accounting(args.vocab, args.d_model, args.pos_dim)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(acc, indent=2) if args.json else format_accounting(acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
