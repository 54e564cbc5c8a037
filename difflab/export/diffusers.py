"""A diffusers folder of a pixel-space U-Net run: ``DiffusionPipeline.from_pretrained(DIR)`` loads and samples it.

    DIR/model_index.json          the pipeline: diffusers' DDIMPipeline (unconditional), or ClassConditionalPipeline
                                  of DIR/pipeline_difflab.py (class runs: diffusers has no class-label pixel pipeline)
    DIR/unet/                     the weights mapped onto diffusers' UNet2DModel (config.json, safetensors)
    DIR/scheduler/scheduler_config.json   a DDIMScheduler equal to the run's process
    DIR/README.md                 the model card

The U-Net maps one to one: both follow DDPM's layout (Ho et al. 2020) with scale-shift norm (Nichol & Dhariwal
2021): per level ``num_res_blocks`` residual blocks (each followed by self-attention at attention levels) and a
strided-conv downsampler, a middle of residual block, attention, residual block, and a decoder of one block more
per level, each concatenating its skip. Three things differ, and are carried over:

* time: our network sees c_noise = 1000 t / T for the process time t = 1..T, diffusers' scheduler hands the
  network its index k = t - 1 (its ``alphas_cumprod[k]`` is our abar at t = k + 1). The U-Net's time input is
  therefore a table (``time_embedding_type="learned"``) whose row k holds our sinusoidal features of
  1000 (k + 1) / T: exact for every integer time, which are the only times diffusers' schedulers use.
* attention: our fused q, k, v projection is split into diffusers' to_q, to_k, to_v.
* group norms: ours take the largest group count up to ``norm_groups`` that divides each channel count; diffusers
  uses one count everywhere. Where they differ (e.g. 48 or 80 channels), the U-Net is diffusers' UNet2DModel with
  that rule applied after construction, a 20-line subclass in DIR/unet/difflab_unet.py (loaded with
  ``trust_remote_code=True``).

The scheduler is our discrete process (betas, T, prediction type, no clipping): our ``ddim`` on the 'uniform'
(= 'trailing') grid is its ``timestep_spacing="trailing"``, our 'leading' grid its "leading" (ours counts t from
1, diffusers from 0, both grids written as ours = diffusers' + 1). ``check`` compares the mapped U-Net with the
run's network on random inputs (to ``TOLERANCE``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.processes import DiscreteDDPM
from ..nets.embeddings import sinusoidal_embedding
from ..nets.unet import UNet
from ..runs.diffusion import DiffusionRun
from .graphs import require
from .interface import ExportError

TOLERANCE = 1e-4
UNET_MODULE, UNET_CLASS = "difflab_unet", "DivisorGroupsUNet2DModel"
PIPELINE_MODULE, PIPELINE_CLASS = "pipeline_difflab", "ClassConditionalPipeline"
PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
BETA_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}
OTHER_FORMATS = "use --format onnx or torch-export"


def check_diffusers(run: DiffusionRun) -> None:
    """Refuse, in one line, a run a diffusers UNet2DModel folder cannot hold (naming the formats that can)."""
    cfg, path = run.config, run.path

    def refuse(why: str):
        raise ExportError(
            f"{path}: {why}; the diffusers format takes unconditional and class-conditional pixel "
            f"U-Net runs on a DDPM process ({OTHER_FORMATS})"
        )

    if cfg.net_kind != "unet":
        refuse(f"its network is an {cfg.net_kind}, not a U-Net")
    if cfg.latent is not None:
        refuse("it is a latent run (the autoencoder is not exported)")
    if cfg.text is not None or cfg.text_spec() is not None:
        refuse("it reads text")
    if {c.name for c in cfg.conditions} - {"class_labels"}:
        refuse(f"it takes {', '.join(sorted({c.name for c in cfg.conditions} - {'class_labels'}))}")
    if not isinstance(cfg.process, DiscreteDDPM):
        refuse(f"its process is {type(cfg.process).__name__}, not a discrete DDPM")
    if cfg.target not in PREDICTION_TYPE:
        refuse(f"its network predicts the {cfg.target}, which diffusers' schedulers do not read")
    if cfg.variance != "fixed" or cfg.lora is not None:
        refuse("it has a learned variance" if cfg.variance != "fixed" else "it carries LoRA adapters")
    n = cfg.net
    if n.cond_channels or n.low_res_noise or n.coord_channels or n.guidance_input or n.context_dim is not None:
        refuse("its U-Net has inputs beyond the image, the time and a class")
    widths = {
        n.base_channels * m for m, size in zip(n.channel_mults, n.resolutions()) if size in n.attention_resolutions
    }
    if len(widths) > 1:
        refuse(
            f"it attends at levels of {sorted(widths)} channels with {n.num_heads} heads each (UNet2DModel "
            "keeps one head size)"
        )


def _groups(net: UNet) -> list[nn.GroupNorm]:
    return [m for m in net.modules() if isinstance(m, nn.GroupNorm)]


def uniform_groups(net: UNet) -> bool:
    """Whether every group norm of ``net`` uses ``norm_groups`` groups (then diffusers' own UNet2DModel matches)."""
    return all(g.num_groups == net.config.norm_groups for g in _groups(net))


def unet2d_config(run: DiffusionRun) -> dict:
    """The UNet2DModel config of the run's U-Net (see the module doc)."""
    n, T = run.config.net, run.config.process.T
    chans = [n.base_channels * m for m in n.channel_mults]
    attends = [size in n.attention_resolutions for size in n.resolutions()]
    heads_width = next((c for c, a in zip(chans, attends) if a), chans[-1])
    uniform = uniform_groups(run.net)
    widths = [g.num_channels for g in _groups(run.net)]
    return {
        "sample_size": n.image_size if n.image_width is None else [n.image_size, n.width],
        "in_channels": n.in_channels,
        "out_channels": n.out_ch,
        "block_out_channels": chans,
        "layers_per_block": n.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "mid_block_type": "UNetMidBlock2D",
        "add_attention": attends[-1],
        "attention_head_dim": heads_width // n.num_heads,
        "norm_num_groups": n.norm_groups if uniform else math.gcd(*widths),  # the subclass then sets each one's
        "attn_norm_num_groups": n.norm_groups if uniform else math.gcd(*widths),
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift",
        "time_embedding_type": "learned",
        "num_train_timesteps": T,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "dropout": n.dropout,
        "act_fn": "silu",
        "num_class_embeds": None if n.num_classes is None else n.num_classes + 1,
    }


_RENAMES = [  # our state-dict names -> UNet2DModel's, applied in order
    (r"^time\.mlp\.0\.", "time_embedding.linear_1."),
    (r"^time\.mlp\.2\.", "time_embedding.linear_2."),
    (r"^classes\.", "class_embedding."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"^down\.(\d+)\.(\d+)\.res\.", r"down_blocks.\1.resnets.\2."),
    (r"^down\.(\d+)\.(\d+)\.attn\.", r"down_blocks.\1.attentions.\2."),
    (r"^downsample\.(\d+)\.0\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"^mid\.res\.", "mid_block.resnets.0."),
    (r"^mid\.attn\.", "mid_block.attentions.0."),
    (r"^mid_res\.", "mid_block.resnets.1."),
    (r"^up\.(\d+)\.(\d+)\.res\.", r"up_blocks.\1.resnets.\2."),
    (r"^up\.(\d+)\.(\d+)\.attn\.", r"up_blocks.\1.attentions.\2."),
    (r"^upsample\.(\d+)\.1\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"\.emb\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.attentions\.(\d+)\.norm\.", r".attentions.\1.group_norm."),
    (r"\.attentions\.(\d+)\.out\.", r".attentions.\1.to_out.0."),
]


def unet2d_state(run: DiffusionRun) -> dict[str, Tensor]:
    """The run's U-Net weights under UNet2DModel's names: renamed, q/k/v split, and the time table (module doc)."""
    state = {}
    for name, value in run.net.state_dict().items():
        if name.startswith("augment."):  # --augment edm's label map: sampling gives no labels, so it adds nothing
            continue
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        if ".qkv." in name:  # (3C, C) or (3C,): our chunk(3) order is q, k, v
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                state[name.replace("qkv", part)] = chunk.clone()
        else:
            state[name] = value.clone()
    T = run.config.process.T
    t = torch.arange(1, T + 1, dtype=torch.float64)  # diffusers' index k is our t = k + 1
    c_noise = run.config.process.noise_condition(t).float()
    state["time_proj.weight"] = sinusoidal_embedding(c_noise, run.config.net.base_channels)  # (T, base)
    return {k: v.contiguous() for k, v in state.items()}


def scheduler_config(run: DiffusionRun, spacing: str = "trailing") -> dict:
    """The DDIMScheduler config equal to the run's process (module doc): its betas, T, prediction type, no
    clipping, the final step to abar = 1 (our t = 0), and the grid 'trailing' (our 'uniform') or 'leading'."""
    p = run.config.process
    scale = 1000.0 / p.T  # our linear and sigmoid ends are rescaled by 1000 / T (processes.linear_betas)
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": p.T,
        "beta_schedule": BETA_SCHEDULE[p.schedule],
        "beta_start": 1e-4 * scale,
        "beta_end": 0.02 * scale,
        "prediction_type": PREDICTION_TYPE[run.config.target],
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": spacing,
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }


def unet_module(max_groups: int) -> str:
    """DIR/unet/difflab_unet.py: UNet2DModel with difflab's group-count rule (see the module doc)."""
    return f'''"""diffusers' UNet2DModel whose every GroupNorm uses the largest group count up to {max_groups} that
divides its channels (difflab's rule); UNet2DModel itself uses one count for all. Written by `difflab export`."""

import inspect

from diffusers import UNet2DModel
from torch import nn

MAX_GROUPS = {max_groups}


class {UNET_CLASS}(UNet2DModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for m in self.modules():
            if isinstance(m, nn.GroupNorm):
                m.num_groups = max(g for g in range(1, min(MAX_GROUPS, m.num_channels) + 1) if m.num_channels % g == 0)


{UNET_CLASS}.__init__.__signature__ = inspect.signature(UNet2DModel.__init__)  # diffusers reads its config keys
'''


PIPELINE_SOURCE = f'''"""A class-conditional pixel-space pipeline: a UNet2DModel taking class_labels (its last class is
the null class) and a scheduler, with classifier-free guidance. Written by `difflab export`.

    pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=20, guidance_scale=1.0).images   # (3, H, W, C) in [0, 1]
"""

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class {PIPELINE_CLASS}(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_inference_steps=20,
        guidance_scale=1.0,
        generator=None,
        eta=0.0,
        latents=None,
        output_type="np",
        return_dict=True,
    ):
        """Images of the classes ``class_labels``; guidance_scale s mixes the conditional and the null class's
        predictions as uncond + s (cond - uncond) (1: plain conditional). ``latents``: the starting noise."""
        labels = torch.as_tensor(class_labels, device=self.device).reshape(-1).long()
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size, cfg.sample_size)
        shape = (len(labels), cfg.in_channels, *size)
        x = latents
        if x is None:
            x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        null = torch.full_like(labels, cfg.num_class_embeds - 1)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            if guidance_scale == 1.0:
                out = self.unet(x, t, class_labels=labels).sample
            else:
                cond, uncond = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
        image = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
'''


def export_diffusers(run: DiffusionRun, folder: str | Path) -> Path:
    """Write the diffusers folder of ``run`` into ``folder`` (an empty folder) and check the mapped U-Net."""
    require("diffusers", what="the diffusers export")
    check_diffusers(run)
    from diffusers import DDIMScheduler, UNet2DModel

    folder = Path(folder)
    uniform = uniform_groups(run.net)
    unet_dir = folder / "unet"
    unet_dir.mkdir(parents=True)
    config = unet2d_config(run)
    if uniform:
        unet = UNet2DModel(**config)
    else:
        (unet_dir / f"{UNET_MODULE}.py").write_text(unet_module(run.config.net.norm_groups))
        unet = _divisor_groups_class(unet_dir)(**config)
    unet.load_state_dict(unet2d_state(run), strict=True)
    unet.eval()
    checked = check_unet(run, unet)
    if checked["max_abs_diff"] > TOLERANCE:
        raise ExportError(f"the mapped UNet2DModel differs from the run's network by {checked['max_abs_diff']:.3g}")
    unet.save_pretrained(str(unet_dir))
    DDIMScheduler.from_config(scheduler_config(run)).save_pretrained(str(folder / "scheduler"))
    classes = run.config.num_classes is not None
    if classes:
        (folder / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_SOURCE)
    import diffusers

    index = {
        "_class_name": [PIPELINE_MODULE, PIPELINE_CLASS] if classes else "DDIMPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DModel"] if uniform else [UNET_MODULE, UNET_CLASS],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "difflab_export.json").write_text(
        json.dumps(
            {
                "format": "diffusers",
                "run": str(run.path),
                "step": run.step,
                "weights": run.fingerprint,
                "checked": checked,
                "remote_code": classes or not uniform,
            },
            indent=1,
        )
        + "\n"
    )
    return folder


def needs_remote_code(run: DiffusionRun) -> bool:
    """Whether loading the folder runs a module file of it (``trust_remote_code=True``)."""
    return run.config.num_classes is not None or not uniform_groups(run.net)


def _divisor_groups_class(unet_dir: Path):
    """The subclass written into ``unet_dir``, imported from there (the class the folder will load)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_difflab_export_{UNET_MODULE}", unet_dir / f"{UNET_MODULE}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, UNET_CLASS)


def check_unet(run: DiffusionRun, unet, batches=(1, 3), seed: int = 0) -> dict:
    """The largest |UNet2DModel(x, k) - ours(x, 1000 (k + 1) / T)| on random images, integer times and classes."""
    g = torch.Generator().manual_seed(seed)
    cfg, T = run.config, run.config.process.T
    worst, scale = 0.0, 0.0
    for b in batches:
        x = torch.randn((b, *cfg.shape), generator=g)
        k = torch.randint(0, T, (b,), generator=g)
        c_noise = cfg.process.noise_condition((k + 1).double()).float()
        kw = {}
        if cfg.num_classes is not None:
            kw["class_labels"] = torch.randint(0, cfg.num_classes + 1, (b,), generator=g)
        with torch.no_grad():
            ours = run.net(x, c_noise, **kw)
            theirs = unet(x, k, **kw).sample
        worst, scale = max(worst, float((theirs - ours).abs().max())), max(scale, float(ours.abs().max()))
    return {"batch_sizes": list(batches), "max_abs_diff": worst, "output_max_abs": scale}
