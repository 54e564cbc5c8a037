"""`difflab export RUN --format onnx|torch-export|diffusers --out DIR`: a run as a file other tools load.

DIR gets the exported model, a JSON of what it takes and gives, the model card (README.md) and the run's pictures;
an existing DIR that is not empty is refused unless --force (it is then replaced only once the new one is whole)."""

from __future__ import annotations

import argparse
import json

from ..export import FORMATS, export_run
from ..runs.diffusion import DiffusionRun
from .options import UsageError


def run(args) -> None:
    if args.format not in FORMATS:  # before loading anything
        raise UsageError(f"unknown format {args.format!r}; choose from: {', '.join(FORMATS)}")
    model = DiffusionRun.load(args.run, ema=args.ema)
    out = export_run(model, args.format, args.out, force=args.force)
    record = out / ("difflab_export.json" if args.format == "diffusers" else "denoiser.json")
    checked = json.loads(record.read_text())["checked"]
    print(
        f"wrote {out} ({args.format}); checked against the run at batch sizes "
        f"{', '.join(map(str, checked['batch_sizes']))}: max |difference| {checked['max_abs_diff']:.2g}"
    )


def register(sub) -> None:
    p = sub.add_parser("export", help="export a run as ONNX, a torch.export program or a diffusers folder")
    p.add_argument("run", help="run directory, or a shipped model's name")
    p.add_argument("--format", required=True, help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds anything")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="the EMA weights (default)")
    p.set_defaults(func=run)
