"""`python -m kronjax.train --config FILE --workdir DIR [--config.a.b=v ...] [--dry_run]`.

config -> (multi-host setup) -> mesh -> data (prepared on first use) -> sharded state -> one
jitted step with in/out shardings and donated state -> loop with evaluation, metrics and orbax
checkpoints (kronjax.run assembles, kronjax.loop trains). Rerunning the same command resumes,
on any mesh; SIGTERM or Ctrl-C saves and exits 0 (a second one exits at once); a non-finite
loss stops with an error and keeps the last good checkpoint. --quiet / --log-level set what
is printed on stderr (default: a line every train.log_every steps); stdout gets the result.

--dry_run compiles the step ahead of time for the configured mesh on abstract inputs (no data,
no params) and prints per-device memory and XLA's cost estimate; --topology cpu:8 simulates 8
CPU devices, --topology v5litepod-16 (any Cloud TPU accelerator type, with the tpu extra)
compiles for that slice with libtpu and says whether the step fits the chip's HBM.
--distributed forces jax.distributed.initialize (otherwise KRONJAX_COORDINATOR from
launch/local.sh, or SLURM / TPU pods, are detected).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections

from kronjax import cluster, console, storage
from kronjax import config as config_lib
from kronjax.errors import UserError, exit_line
from kronjax.loop import train


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        overrides, rest = config_lib.parse_overrides(argv)
    except config_lib.ConfigError as e:  # e.g. --config.train.steps with no value
        sys.exit(f"python -m kronjax.train: error: {e}")
    parser = argparse.ArgumentParser(prog="python -m kronjax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(config_lib.DEFAULT_CONFIG),
                        help="config file (default: configs/default.py)")
    parser.add_argument("--workdir", default=None,
                        help="run directory (default: runs/<config>_<arm>); rerun to resume")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (= --config.dist.initialize=on)")
    parser.add_argument("--dry_run", action="store_true",
                        help="compile the step for the mesh on abstract inputs; print memory")
    parser.add_argument("--topology", default=None,
                        help="with --dry_run: a Cloud TPU accelerator type as gcloud writes it "
                             "(v4-8, v5litepod-16, v5p-128, v6e-8, 2xv4-32; needs the tpu "
                             "extra), cpu:N (N simulated CPU devices), or "
                             "PLATFORM:NAME[,key=value...] for jax.experimental.topologies, "
                             "e.g. tpu:v5e:2x2")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="with --dry_run: compile with a synthetic vocabulary of N ids")
    parser.add_argument("--log-level", "--log_level", dest="log_level", default="info",
                        choices=console.LEVELS,
                        help="what to print on stderr (default: info, a line every "
                             "train.log_every steps)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="warnings and errors only, no progress bar (= --log-level warning)")
    args = parser.parse_args(rest)
    if (args.topology or args.vocab_size) and not args.dry_run:
        parser.error("--topology and --vocab_size apply to --dry_run only")
    console.setup_logging("warning" if args.quiet else args.log_level)
    cluster.safe_cpu_collectives()  # before any backend starts
    try:
        cfg = config_lib.build_config(args.config, overrides)
    except config_lib.ConfigError as e:
        parser.error(str(e))
    if args.distributed:
        if "dist" not in cfg:
            cfg.dist = ml_collections.ConfigDict()
        cfg.dist.initialize = "on"
    if args.dry_run:
        if args.workdir:  # not written to, but a bad URL is said now, not at the real run
            try:
                storage.as_path(args.workdir)
            except UserError as e:
                parser.exit(2, f"{parser.prog}: error: {e}\n")
        if args.topology and args.topology.startswith("cpu:"):
            try:
                jax.config.update("jax_num_cpu_devices", int(args.topology[4:]))
            except ValueError:
                parser.error(f"--topology cpu:N needs an integer N; got {args.topology!r}")
            jax.config.update("jax_platforms", "cpu")
        from kronjax import dryrun
        from kronjax.topology import TopologyError

        try:
            report = dryrun.dry_run(cfg, topology=args.topology, vocab_size=args.vocab_size)
        except (dryrun.DryRunError, TopologyError) as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        print(json.dumps(report))
        return 0
    workdir = args.workdir or f"runs/{Path(args.config).stem}_{cfg.model.arm}"
    try:
        result = train(cfg, workdir)
    except UserError as e:  # a setting or a busy workdir: the message says what to do
        parser.exit(2, exit_line(parser.prog, e))
    if jax.process_index() == 0:
        print(console.result_json({"workdir": str(workdir), **dataclasses.asdict(result)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
