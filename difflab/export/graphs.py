"""The network as a graph other runtimes load: ONNX (``torch.onnx.export``, the dynamo exporter) and a
``torch.export`` program (``.pt2``), each with a dynamic batch dimension and ``denoiser.json`` beside it
(export/interface.py: what the inputs and the output mean, the process and its schedule).

    export_onnx(run, folder)      folder/denoiser.onnx, checked with onnxruntime against the run's network
    export_program(run, folder)   folder/denoiser.pt2 (torch.export.save), checked after torch.export.load

Each export runs the saved file on random inputs at batch sizes 1 and 3 beside the run's network and records the
largest difference in ``denoiser.json`` (``checked``); above ``TOLERANCE`` the export fails."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import warnings
from pathlib import Path

import torch

from ..io import atomic_path
from ..runs.diffusion import DiffusionRun
from .interface import (
    ExportError,
    check_exportable,
    describe,
    dynamic_shapes,
    example_inputs,
    example_length,
    explicit,
    input_specs,
    integer_ranges,
    max_difference,
    max_length,
)

TOLERANCE = 1e-4  # the largest |exported - run| accepted on the check's random inputs
RECORD = "denoiser.json"
EXTRA = "pip install 'difflab[export]'"


def require(*modules: str, what: str) -> None:
    """Refuse in one line when an optional package is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{what} needs {', '.join(missing)}: {EXTRA}")


@contextlib.contextmanager
def _quiet():
    """The exporters' warnings and log lines (torchvision absent, deprecations) are not the user's concern."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _traced(run: DiffusionRun) -> tuple[list, tuple, tuple]:
    """(input specs, example inputs of batch 2, dynamic shapes) of the run's network, checked exportable."""
    check_exportable(run)
    specs = input_specs(run)
    g = torch.Generator().manual_seed(0)
    inputs = example_inputs(specs, 2, g, length=example_length(run), high=integer_ranges(run))
    return specs, tuple(inputs), dynamic_shapes(specs, max_length(run))


def _write_record(run: DiffusionRun, folder: Path, fmt: str, file: str, specs, checked: dict) -> None:
    if checked["max_abs_diff"] > TOLERANCE:
        raise ExportError(
            f"the exported {fmt} network differs from the run's by {checked['max_abs_diff']:.3g} (> {TOLERANCE})"
        )
    with atomic_path(folder / RECORD) as tmp:
        tmp.write_text(json.dumps(describe(run, fmt, file, specs, checked), indent=1) + "\n")


def export_program(run: DiffusionRun, folder: str | Path) -> Path:
    """``folder/denoiser.pt2``: the network as a torch.export program, and ``denoiser.json``."""
    folder = Path(folder)
    specs, inputs, dynamic = _traced(run)
    with _quiet(), torch.no_grad():
        program = torch.export.export(explicit(run), inputs, dynamic_shapes=dynamic)
    path = folder / "denoiser.pt2"
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp))
    loaded = torch.export.load(str(path)).module()

    def call(inputs):
        with torch.no_grad():
            return loaded(*inputs)

    _write_record(run, folder, "torch-export", path.name, specs, max_difference(run, call))
    return path


def export_onnx(run: DiffusionRun, folder: str | Path) -> Path:
    """``folder/denoiser.onnx``: the network as ONNX (opset of the dynamo exporter), and ``denoiser.json``."""
    require("onnx", "onnxscript", "onnxruntime", what="ONNX export")
    folder = Path(folder)
    specs, inputs, dynamic = _traced(run)
    path = folder / "denoiser.onnx"
    with _quiet(), torch.no_grad():
        onnx_program = torch.onnx.export(
            explicit(run),
            inputs,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=[s.name for s in specs],
            output_names=["prediction"],
            verbose=False,
        )
        with atomic_path(path) as tmp:
            onnx_program.save(str(tmp))
    session = onnx_session(path)

    def call(inputs):
        feeds = {s.name: x.numpy() for s, x in zip(specs, inputs)}
        return torch.from_numpy(session.run(None, feeds)[0])

    _write_record(run, folder, "onnx", path.name, specs, max_difference(run, call))
    return path


def onnx_session(path: str | Path):
    """An onnxruntime CPU session of the ONNX file ``path``."""
    require("onnxruntime", what="running an ONNX export")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
