"""What an exported network takes and gives: its inputs by name, and the record that lets a program outside
difflab build a sampler around it.

A run's network is called as ``net(x, c_noise, **conditions)`` (core/parameterize.py, ``Denoiser``): the
exported graph takes the same tensors, positionally, in the order of ``input_specs``:

    x          (batch, *shape) float32   x_t / sqrt(alpha_t^2 + sigma_t^2): x_t itself for a variance-preserving
                                         process, x_t / sqrt(1 + sigma^2) for a variance-exploding one
    c_noise    (batch,) float32          the process's noise condition of t (``Process.noise_condition``)
    class_labels, low_res, context, ...  the conditions the network takes (``CONDITION_INPUTS``)

and returns the prediction of the run's target (eps, x0, v or the score), with a second half of channels for a
learned variance. ``describe(run)`` writes this down, with the process and its schedule, as the JSON an export
holds beside its file (``denoiser.json``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.processes import DiscreteDDPM, has_parameters, process_name
from ..runs.config import process_to_dict
from ..runs.diffusion import DiffusionRun

BATCH, LENGTH = "batch", "length"  # the dynamic dimensions' names


class ExportError(ValueError):
    """A run or a format an export cannot take."""


@dataclass(frozen=True)
class InputSpec:
    """One input of an exported network: its name, shape (``BATCH`` and ``LENGTH`` are dynamic), dtype, meaning."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype
    meaning: str

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "meaning": self.meaning,
        }


TRAINING_ONLY = ("augment_labels",)  # --augment edm's labels: none at sampling (no augmentation), so not exported
CONDITION_INPUTS = (  # the order conditions follow x and c_noise in every exported graph
    "class_labels",
    "low_res",
    "low_res_noise",
    "context",
    "context_mask",
    "tokens",
    "token_mask",
    "guidance_scale",
)

C_NOISE = {  # Process.noise_condition in words, by process name
    "ddpm": "1000 * t / T, t in 0..T (integers on the usual grids; alpha, sigma interpolate log abar between them)",
    "vp": "1000 * t, t in [0, 1]",
    "ve": "1000 * (log(sigma) - log(sigma_min)) / (log(sigma_max) - log(sigma_min)), t = sigma",
}

ALPHA_SIGMA = {  # alpha(t), sigma(t) in words, by process name
    "ddpm": "alpha = sqrt(alphas_cumprod[t]), sigma = sqrt(1 - alphas_cumprod[t]) (alphas_cumprod[0] = 1)",
    "vp": "linear: log abar = -beta_min t - (beta_max - beta_min) t^2 / 2; cosine: abar = cos(atan(exp(-lambda_min "
    "/ 2)) t)^2; alpha = sqrt(abar), sigma = sqrt(1 - abar)",
    "ve": "alpha = 1, sigma = t",
}

TARGET_MEANING = {
    "eps": "the noise eps in x_t = alpha x_0 + sigma eps",
    "x0": "the clean sample x_0",
    "v": "v = alpha eps - sigma x_0 (Salimans & Ho 2022)",
    "score": "the score grad log p(x_t) = -eps / sigma",
}


def check_exportable(run: DiffusionRun) -> None:
    """Refuse, in one line, a run whose network cannot leave difflab as a graph of explicit inputs."""
    cfg = run.config
    if has_parameters(cfg.process):
        raise ExportError(
            f"{run.path} has a learned noise schedule (a network inside the run): only fixed schedules are exported"
        )
    if cfg.inverts_through_tower:
        raise ExportError(
            f"{run.path} reads its captions through its CLIP's pretrained text tower inside the network (textual "
            "inversion): exporting that tower is not built"
        )
    unknown = sorted(set(getattr(run.net, "accepts", frozenset())) - set(CONDITION_INPUTS) - set(TRAINING_ONLY))
    if unknown:
        raise ExportError(f"{run.path}'s network takes {', '.join(unknown)}, which an export does not know")


def accepted(net: nn.Module) -> tuple[str, ...]:
    """The condition inputs ``net`` takes, in ``CONDITION_INPUTS`` order."""
    takes = getattr(net, "accepts", frozenset())
    return tuple(n for n in CONDITION_INPUTS if n in takes)


def input_specs(run: DiffusionRun) -> list[InputSpec]:
    """The exported graph's inputs, in order: x, c_noise, then the conditions the network takes."""
    cfg, net = run.config, run.net
    specs = [
        InputSpec("x", (BATCH, *cfg.shape), torch.float32, "x_t / sqrt(alpha_t^2 + sigma_t^2)"),
        InputSpec(
            "c_noise", (BATCH,), torch.float32, "the noise condition of t: " + C_NOISE[process_name(cfg.process)]
        ),
    ]
    for name in accepted(net):
        specs.append(_condition_spec(run, name))
    return specs


def _condition_spec(run: DiffusionRun, name: str) -> InputSpec:
    cfg, n = run.config, run.net.config
    if name == "class_labels":
        K = cfg.num_classes
        return InputSpec(name, (BATCH,), torch.int64, f"class index 0..{K - 1}; {K} is the null class (unconditional)")
    if name == "low_res":
        k = cfg.super_resolution.factor if cfg.super_resolution is not None else 1
        shape = (BATCH, n.cond_channels, cfg.shape[1] // k, cfg.shape[2] // k)
        return InputSpec(name, shape, torch.float32, "the low-resolution image in [-1, 1] (upsampled inside)")
    if name == "low_res_noise":
        return InputSpec(name, (BATCH,), torch.float32, "the std of the noise added to low_res (0: none)")
    if name == "context":
        return InputSpec(name, (BATCH, LENGTH, n.context_dim), torch.float32, "the text encoder's token embeddings")
    if name in ("context_mask", "token_mask"):
        return InputSpec(name, (BATCH, LENGTH), torch.bool, "True where a token is read (all False: no text)")
    if name == "tokens":
        return InputSpec(name, (BATCH, LENGTH), torch.int64, "word ids in the vocabulary of config.json's net.text")
    return InputSpec(name, (BATCH,), torch.float32, "the classifier-free guidance scale w of a guided student")


class ExplicitInputs(nn.Module):
    """``net(x, c_noise, *conditions)`` with the conditions positional, named by ``names``: the form exporters
    trace (they take positional tensors, not keywords that may be absent)."""

    def __init__(self, net: nn.Module, names: Sequence[str]):
        super().__init__()
        self.net, self.names = net, tuple(names)

    def forward(self, x: Tensor, c_noise: Tensor, *conditions: Tensor) -> Tensor:
        return self.net(x, c_noise, **dict(zip(self.names, conditions)))


def explicit(run: DiffusionRun) -> ExplicitInputs:
    return ExplicitInputs(run.net, accepted(run.net)).eval()


def example_inputs(specs: Sequence[InputSpec], batch: int, generator: torch.Generator, length: int = 5, high=None):
    """Random inputs of ``specs`` for ``batch`` samples (``length`` tokens): normal floats, c_noise in [0, 1000],
    integers below ``high[name]`` (class labels: 0..K, the null class included), masks with the first token read."""
    high = high or {}
    out = []
    for s in specs:
        shape = tuple(batch if d == BATCH else length if d == LENGTH else d for d in s.shape)
        if s.name == "c_noise":
            out.append(torch.rand(shape, generator=generator) * 1000)
        elif s.dtype == torch.bool:
            mask = torch.rand(shape, generator=generator) < 0.7
            mask[:, 0] = True
            out.append(mask)
        elif s.dtype == torch.int64:
            out.append(torch.randint(0, high.get(s.name, 2), shape, generator=generator))
        elif s.name in ("low_res_noise", "guidance_scale"):
            out.append(torch.rand(shape, generator=generator))
        else:
            out.append(torch.randn(shape, generator=generator))
    return out


def integer_ranges(run: DiffusionRun) -> dict[str, int]:
    """The exclusive upper bound of each integer input (class labels with the null class, word ids)."""
    n = run.net.config
    highs = {}
    if run.config.num_classes is not None:
        highs["class_labels"] = run.config.num_classes + 1
    if getattr(n, "text", None) is not None:
        highs["tokens"] = len(n.text_config.vocabulary)
    return highs


def max_length(run: DiffusionRun) -> int:
    """The longest token sequence the network reads: a joint text encoder's max_len, else 1024 (a frozen encoder's
    embeddings, any length)."""
    text = getattr(run.net.config, "text", None)
    return run.net.config.text_config.max_len if text is not None else 1024


def example_length(run: DiffusionRun) -> int:
    return min(5, max_length(run))


def dynamic_shapes(specs: Sequence[InputSpec], longest: int = 1024) -> tuple:
    """torch.export's dynamic_shapes of ``ExplicitInputs``' inputs: the batch dimension everywhere, the token length
    up to ``longest`` where there is one (one ``Dim`` each, shared by every input; a length of at most 1 is fixed)."""
    dims = {BATCH: torch.export.Dim(BATCH, min=1, max=4096)}
    if longest > 1:
        dims[LENGTH] = torch.export.Dim(LENGTH, min=1, max=longest)
    each = [{i: dims[d] for i, d in enumerate(s.shape) if d in dims} for s in specs]
    return (each[0], each[1], tuple(each[2:])) if len(each) > 2 else tuple(each)  # forward(x, c_noise, *conditions)


def describe(run: DiffusionRun, fmt: str, file: str, specs: Sequence[InputSpec], checked: dict) -> dict:
    """The JSON beside an exported network: its inputs and output, what the output predicts, the process and its
    schedule (for DDPM the alphas_cumprod table), the conditions' null values, the data it makes, the check."""
    cfg = run.config
    name = process_name(cfg.process)
    out_shape = [BATCH, *cfg.shape]
    learned = cfg.variance == "learned"
    if learned:
        out_shape[1] *= 2
    record = {
        "format": fmt,
        "file": file,
        "run": str(run.path),
        "step": run.step,
        "weights": run.fingerprint,
        "inputs": [s.to_dict() for s in specs],
        "output": {
            "name": "prediction",
            "shape": out_shape,
            "dtype": "float32",
            "meaning": f"{cfg.target}: {TARGET_MEANING[cfg.target]}"
            + (
                "; then as many channels of v in [-1, 1]: the reverse step's log variance is (v + 1)/2 log beta + "
                "(1 - v)/2 log beta_tilde (Nichol & Dhariwal 2021, eq. 15)"
                if learned
                else ""
            ),
        },
        "target": cfg.target,
        "variance": cfg.variance,
        "process": process_to_dict(cfg.process),
        "c_noise": C_NOISE[name],
        "alpha_sigma": ALPHA_SIGMA[name],
        "conditions": [c.to_dict() for c in cfg.conditions],
        "data": {
            "kind": cfg.data_kind,
            "shape": cfg.data_shape,
            "range": "[-1, 1]" if cfg.data_kind == "images" else "the data's own",
            "latent": None
            if cfg.latent is None
            else {
                "autoencoder": cfg.latent.autoencoder,
                "scale": cfg.latent.scale,
                "note": "x lives in the autoencoder's scaled latent space; the decoder is not exported",
            },
        },
        "checked": checked,
    }
    if isinstance(cfg.process, DiscreteDDPM):
        record["alphas_cumprod"] = [float(v) for v in cfg.process.log_abar.exp()]  # index t = 0..T
    return record


def max_difference(run: DiffusionRun, call, batches=(1, 3), seed: int = 0) -> dict:
    """Run the exported network (``call(inputs) -> Tensor``) and the run's on the same random inputs at each batch
    size; the largest absolute difference and the output's scale (its largest magnitude)."""
    specs, net = input_specs(run), explicit(run)
    g = torch.Generator().manual_seed(seed)
    worst, scale = 0.0, 0.0
    for b in batches:
        inputs = example_inputs(specs, b, g, length=example_length(run), high=integer_ranges(run))
        with torch.no_grad():
            ours = net(*inputs)
        theirs = call(inputs)
        worst = max(worst, float((theirs - ours).abs().max()))
        scale = max(scale, float(ours.abs().max()))
    return {"batch_sizes": list(batches), "max_abs_diff": worst, "output_max_abs": scale}
