"""Option groups and checks shared by the commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..distributed import DEVICES
from ..io import atomic_path
from ..samplers import SAMPLERS, SPACINGS, default_spacing, sampler_options


class UsageError(ValueError):
    """Bad input from the command line."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump): `difflab sample: error: ... (see --help)`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- argument types


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def unit_float(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


CAP_OFF = "none"


def sigma_cap(s: str) -> float | str:
    """A positive number, or 'none' (CAP_OFF) to turn the cap off."""
    if s.lower() == CAP_OFF:
        return CAP_OFF
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'none', got {s}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'none', got {s}")
    return v


def check_suffix(path: str | None, suffixes: tuple[str, ...], flag: str) -> None:
    if path is not None and Path(path).suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: expected a file ending in {' or '.join(suffixes)}")


def save_npz(path, **arrays) -> None:
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def single_thread_for_points(kind: str) -> None:
    """2-D networks are tiny: a second thread costs more in synchronisation than it saves (measured: 20x
    slower when the cores are busy), so their work runs on one thread. Images use torch's default."""
    if kind == "points":
        torch.set_num_threads(1)


# --------------------------------------------------------------------------- groups


def add_device(p) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto (CUDA when present), cpu or cuda")


def add_sampler(p, sampler: str, steps: int) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", default=sampler, help=f"one of: {', '.join(SAMPLERS)}")
    g.add_argument("--steps", type=positive_int, default=steps)
    g.add_argument("--spacing", choices=SPACINGS, default=None, help="default: the sampler's usual grid")
    g.add_argument("--eta", type=unit_float, default=None, help="ddim: eta in [0, 1] (default 0)")
    g.add_argument("--variance", choices=["beta", "beta_tilde"], default=None, help="ddpm: the reverse variance (default beta)")
    g.add_argument("--n-steps-each", type=positive_int, default=None, help="langevin: Langevin steps per noise level (default 100)")
    g.add_argument("--step-lr", type=positive_float, default=None, help="langevin: the step size at the smallest level")
    g.add_argument("--snr", type=positive_float, default=None, help="pc: the corrector's signal-to-noise ratio (default 0.16)")
    g.add_argument("--n-corrector", type=int, default=None, help="pc: corrector steps per level (default 1)")
    g.add_argument("--sigma-cap", type=sigma_cap, default=None, metavar="CAP",
                   help="karras/logsnr grids on VP processes: spread the levels below sigma/alpha = CAP (default 80; 'none': off)")


SAMPLER_FLAGS = ("eta", "variance", "n_steps_each", "step_lr", "snr", "n_corrector")  # each a sampler's own keyword


def sampler_choice(args, process) -> tuple[str, str, dict]:
    """(sampler, spacing, options) from the sampler group, each option checked against what the sampler and
    the grid take: an option the chosen sampler or spacing does not use is an error, not dropped."""
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    takes = sampler_options(args.sampler)
    options = {}
    for name in SAMPLER_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in takes:
            owners = " and ".join(k for k in SAMPLERS if name in sampler_options(k))
            raise UsageError(f"--{name.replace('_', '-')} is an option of the {owners} sampler; {args.sampler!r} does not take it")
        options[name] = value
    spacing = args.spacing or (default_spacing(args.sampler, process) if process is not None else None)
    if args.sigma_cap is not None and process is not None:
        if not process.variance_preserving:
            raise UsageError("--sigma-cap applies to variance-preserving processes; a variance-exploding run's grid starts at its sigma_max")
        if spacing not in ("karras", "logsnr"):
            raise UsageError(f"--sigma-cap applies to the karras and logsnr spacings; this run samples on {spacing!r}")
        options["sigma_tilde_cap"] = None if args.sigma_cap == CAP_OFF else args.sigma_cap
    return args.sampler, spacing, options


def add_conditions(p) -> None:
    g = p.add_argument_group("conditions")
    g.add_argument("--class-label", type=int, nargs="+", metavar="K",
                   help="class-conditional runs: the class of each sample (one value for all, or several, cycled)")


def conditions_from(args, n: int) -> dict:
    """The condition tensors for n samples from the conditioning flags."""
    cond = {}
    if args.class_label:
        labels = torch.tensor(args.class_label, dtype=torch.long)
        cond["class_labels"] = labels.repeat(-(-n // len(labels)))[:n]  # cycled: (n,)
    return cond
