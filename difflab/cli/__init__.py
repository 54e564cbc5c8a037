"""The `difflab` command: a thin layer over the library, one small module per command.

    difflab data | train | train-classifier | distill | sample | trajectories | restore | upscale | interpolate |
    img2img | eval | features train | export | models | studio

Each module parses and validates its options (shared groups in ``options.py``) and calls the library.
Bad input (unknown names, out-of-range numbers, missing or corrupt files, options a sampler or a model
does not take) ends with one line ``difflab: error: ...`` on stderr and exit status 2; outputs are
written atomically, so nothing half-written is left behind. A training run stopped by Ctrl-C or SIGTERM
checkpoints and exits with 128 + the signal number (130, 143), printing the resume command."""

from __future__ import annotations

import argparse
import signal
import sys

from ..training.distributed import teardown
from ..training.loop import Interrupted
from . import (
    autoencoder,
    classifier,
    clip,
    data,
    distill,
    edit,
    eval,
    export,
    features,
    models,
    personalize,
    restore,
    sample,
    studio,
    train,
    trajectories,
)
from .options import Parser

COMMANDS = (
    data,
    train,
    classifier,
    autoencoder,
    clip,
    personalize,
    distill,
    sample,
    trajectories,
    restore,
    edit,
    eval,
    features,
    export,
    models,
    studio,
)
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="difflab", description="Diffusion models: train, sample, look, measure.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as typed, for what records it (a run's model card)
    try:
        args.func(args)
        teardown()
    except Interrupted as e:  # every rank stopped at the same step for the same signal
        teardown()
        print(f"difflab: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, FileNotFoundError) as e:  # CheckpointError, DataError, ConditionError, UsageError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"difflab: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
