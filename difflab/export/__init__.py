"""Export: a run leaves difflab as a file other tools load, with a model card beside it.

    difflab export RUN --format onnx|torch-export|diffusers --out DIR

    export_run(run, "onnx", "out/")        # out/denoiser.onnx, denoiser.json, README.md (and the run's pictures)

onnx and torch-export (export/graphs.py) hold the network with explicit inputs (x, c_noise, the conditions) and a
JSON of what they mean (export/interface.py); diffusers (export/diffusers.py) a folder DiffusionPipeline loads. The
folder is written beside DIR and renamed into place whole (io.atomic_dir); card.py writes the card."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..io import atomic_dir
from ..runs.diffusion import DiffusionRun
from .card import CARD, PICTURES, model_card
from .diffusers import export_diffusers, needs_remote_code
from .graphs import export_onnx, export_program
from .interface import ExportError

FORMATS: dict[str, Callable[[DiffusionRun, Path], Path]] = {
    "onnx": export_onnx,
    "torch-export": export_program,
    "diffusers": export_diffusers,
}


def export_run(run: DiffusionRun, fmt: str, out: str | Path, *, force: bool = False) -> Path:
    """Write ``run`` in format ``fmt`` (FORMATS) into the folder ``out``, with the model card and the run's pictures;
    a non-empty ``out`` is refused unless ``force`` (then replaced once the new folder is whole)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from: {', '.join(FORMATS)}")
    out = Path(out)
    try:
        with atomic_dir(out, replace=force) as tmp:
            FORMATS[fmt](run, tmp)
            for picture in PICTURES:
                if (run.path / picture).is_file():
                    shutil.copyfile(run.path / picture, tmp / picture)
            (tmp / CARD).write_text(model_card(run.path, extra=usage(run, fmt, out)))
    except FileExistsError as e:
        raise ExportError(str(e)) from None
    return out


def usage(run: DiffusionRun, fmt: str, out: Path) -> str:
    """The card's section on the export: what the folder holds and how it loads."""
    if fmt == "diffusers":
        remote = ", trust_remote_code=True" if needs_remote_code(run) else ""
        call = (
            "pipe(class_labels=[0, 1, 2], num_inference_steps=20)"
            if run.config.num_classes is not None
            else ("pipe(batch_size=4, num_inference_steps=20)")
        )
        lines = [
            "from diffusers import DiffusionPipeline",
            f'pipe = DiffusionPipeline.from_pretrained("{out}"{remote})',
            f"images = {call}.images  # (N, H, W, C) in [0, 1], DDIM",
        ]
        holds = "a diffusers pipeline (model_index.json, unet/, scheduler/)"
    elif fmt == "onnx":
        lines = [
            "import onnxruntime",
            f'session = onnxruntime.InferenceSession("{out}/denoiser.onnx")',
            "prediction = session.run(None, {'x': x, 'c_noise': c_noise, ...})[0]  # inputs: denoiser.json",
        ]
        holds = "the network as ONNX (denoiser.onnx) and what its inputs mean (denoiser.json)"
    else:
        lines = [
            "import torch",
            f'net = torch.export.load("{out}/denoiser.pt2").module()',
            "prediction = net(x, c_noise, ...)  # inputs: denoiser.json",
        ]
        holds = "the network as a torch.export program (denoiser.pt2) and what its inputs mean (denoiser.json)"
    return "\n".join(
        ["## This export", "", f"Format {fmt}: {holds}. See difflab's docs/export.md.", "", "```python", *lines, "```"]
    )


__all__ = ["FORMATS", "ExportError", "export_run"]
