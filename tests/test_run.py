"""The run object and the run kinds: `difflab.load(...).sample(...)` makes the CLI's images for every kind of
diffusion run, a kind registered in a test trains, resumes and loads through the table alone, prompts longer
than the training captions, one reader of a user's images, defaults that work, and the README's Python."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import difflab
from difflab.cli import main
from difflab.core.operators import Mask, box_mask
from difflab.data.images import DataError, load_images, read_inputs, to_uint8
from difflab.data.loader import TensorDataset
from difflab.runs.config import DataSpec, RunConfig, TrainConfig
from difflab.runs.diffusion import DefaultSampling, DiffusionRun
from difflab.runs.kinds import KINDS, RunKind, RunKindError, register
from difflab.runs.lifecycle import LifecycleError, begin
from difflab.runs.presets import RECIPE_PROCESS
from difflab.runs.run import Run
from difflab.runs.store import weights_step
from difflab.training.loop import train

README = Path(__file__).resolve().parent.parent / "README.md"


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def cli_samples(capsys, tmp_path, run, *argv) -> np.ndarray:
    out = tmp_path / "cli.npz"
    code, err = cli(
        capsys, "sample", run, "--sampler", "dpmpp-2m", "--steps", 6, "--seed", 3, "--save", out, "--quiet", *argv
    )
    assert code == 0, err
    saved = np.load(out)
    return saved["images"] if "images" in saved else saved["points"]


# --------------------------------------------------------------------------- one object, the CLI's images


def test_one_place_decides_the_default_sampling(digits_runs, tmp_path, capsys):
    """``run.default_sampling()`` decides what a call naming no sampler, steps or guidance gets: `difflab sample`
    with none of them and ``run.sample`` with none of them make the same images, those of the record's values
    named; a distilled student overrides that record and its checks, never ``sample`` or ``trajectory``."""
    from difflab.distill.student import StudentRun

    run = difflab.load(digits_runs / "dc")
    own = run.default_sampling()
    assert own == DefaultSampling("dpmpp-2m", 20, guidance=1.0, spacing=None, fixed=False)
    out = tmp_path / "own.npz"
    code, err = cli(capsys, "sample", digits_runs / "dc", "-n", 3, "--class", 3, "--seed", 2, "--save", out, "--quiet")
    assert code == 0, err
    got = run.sample(3, class_label=3, seed=2)
    assert np.abs(to_uint8(got).numpy().astype(int) - np.load(out)["images"].astype(int)).max() <= 1
    named = run.sample(3, class_label=3, seed=2, sampler=own.sampler, steps=own.steps, guidance=own.guidance)
    torch.testing.assert_close(got, named, rtol=0, atol=0)
    assert {"sample", "trajectory"}.isdisjoint(vars(StudentRun))
    assert {"default_sampling", "check_sampling"} <= set(vars(StudentRun))


def test_run_sample_gives_the_clis_images_for_every_kind_of_diffusion_run(
    tiny_toy_run, digits_runs, text_runs, tmp_path, capsys
):
    three, eight = "a handwritten three", "a handwritten eight"
    cases = [
        ("unconditional", tiny_toy_run, [], {}, {}),
        (
            "class-conditional, guided",
            digits_runs / "dc",
            ["--class", 3, "--guidance", 3],
            {"class_label": 3, "guidance": 3.0},
            {},
        ),
        (
            "latent text, negative prompt",
            text_runs / "minilm",
            ["--prompt", three, "--negative-prompt", eight, "--guidance", 3],
            {"prompt": three, "negative_prompt": eight, "guidance": 3.0},
            {},
        ),
        (
            "LoRA over its base",
            text_runs / "minilm",
            ["--prompt", "a handwritten sks three", "--lora", text_runs / "lora", "--lora-scale", 0.7],
            {"prompt": "a handwritten sks three"},
            {"lora": [(text_runs / "lora", 0.7)]},
        ),
    ]
    for name, run, argv, ask, load in cases:
        want = cli_samples(capsys, tmp_path, run, "-n", 5, *argv)
        got = difflab.load(run, **load).sample(5, sampler="dpmpp-2m", steps=6, seed=3, **ask)
        if run == tiny_toy_run:  # points: saved as floats
            np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
            continue
        got = to_uint8(got).numpy()
        assert got.shape == want.shape, name
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (
            name
        )  # equal up to a rounding of the last float bit
    # the adapter changes the base's images (it is really loaded), and at strength 0 it is the base exactly
    base = difflab.load(text_runs / "minilm").sample(3, prompt="a handwritten sks three", steps=4)
    adapted = difflab.load(text_runs / "minilm", lora=[(text_runs / "lora", 1.0)]).sample(
        3, prompt="a handwritten sks three", steps=4
    )
    off = difflab.load(text_runs / "minilm", lora=[(text_runs / "lora", 0.0)]).sample(
        3, prompt="a handwritten sks three", steps=4
    )
    assert torch.equal(off, base) and not torch.equal(adapted, base)


def test_the_callback_sees_every_step_of_the_chain(digits_runs, latent_runs):
    for run in (digits_runs / "dc", latent_runs / "ldm"):
        model = difflab.load(run)
        seen = []
        x = model.sample(
            4,
            class_label=[1, 2, 3, 4],
            guidance=2.0,
            steps=7,
            callback=lambda i, x_t, x0: seen.append((i, x_t.clone(), x0.clone())),  # noqa: B023 (called in this iteration)
        )
        assert [i for i, _, _ in seen] == list(range(7))
        assert all(x_t.shape == (4, *model.config.shape) == x0.shape for _, x_t, x0 in seen)
        # the last prediction is the sample (dpmpp-2m's step into t = 0 returns x0_hat), decoded for a latent run
        assert torch.allclose(model.decode(seen[-1][2]), x, atol=1e-5)
        # img2img: every step of the shortened chain (strength 0.5 of 20 DDIM steps), and the callback changes nothing
        seen.clear()
        edited = model.img2img(x[:2], 0.5, steps=20, class_label=[1, 2], callback=lambda i, x_t, x0: seen.append(i))  # noqa: B023
        assert seen == list(range(len(seen))) and 8 <= len(seen) <= 11
        torch.testing.assert_close(edited, model.img2img(x[:2], 0.5, steps=20, class_label=[1, 2]), rtol=0, atol=0)


def test_load_gives_each_kind_its_object_and_refuses_the_wrong_one(digits_runs, latent_runs, tiny_toy_run):
    from difflab.guidance.classifier import ClassifierRun
    from difflab.latent.autoencoder import AutoencoderRun

    assert type(difflab.load(digits_runs / "dc")) is DiffusionRun
    assert (
        type(difflab.load(digits_runs / "clf")) is ClassifierRun
        and difflab.load(digits_runs / "clf").classifier.num_classes == 10
    )
    ae = difflab.load(latent_runs / "ae")
    assert type(ae) is AutoencoderRun and ae.space.latent_shape == [2, 4, 4]
    with pytest.raises(RunKindError, match="is a noise-aware classifier run, not a denoiser"):
        DiffusionRun.load(digits_runs / "clf")
    with pytest.raises(ValueError, match="LoRA adapters load over a diffusion run"):
        difflab.load(latent_runs / "ae", lora=[("x", 1.0)])
    points = difflab.load(tiny_toy_run).sample(7, steps=3)
    assert points.shape == (7, 2)


# --------------------------------------------------------------------------- a new kind is one entry


class Constant(nn.Module):
    """A toy network: one learned vector, whatever the input (its training pulls it to the data's mean)."""

    accepts = frozenset()

    def __init__(self, config: ConstantConfig):
        super().__init__()
        self.config, self.value = config, nn.Parameter(torch.zeros(config.dim))

    def forward(self, x: Tensor, c_noise=None) -> Tensor:
        return self.value.expand(len(x), -1)


@dataclass
class ConstantConfig:
    dim: int = 2


@dataclass
class MeanLoss:
    def __call__(self, model, x0, *, t=None, noise=None, cond=None) -> Tensor:
        return ((model.net(x0) - x0) ** 2).mean()


class ConstantRun(Run):
    kinds = ("toy-mean",)
    what = "a toy mean"

    def mean(self) -> Tensor:
        return self.net.value.detach()


TOY = RunKind(
    "toy-mean",
    "a toy-mean run",
    {"constant": (ConstantConfig, Constant)},
    lambda cfg: MeanLoss(),
    ConstantRun,
    "toy-train",
    use="ask it for its mean",
)


def test_a_new_run_kind_trains_resumes_and_loads_through_the_table_alone(tmp_path):
    register(TOY)
    try:
        cfg = RunConfig(
            dataset="swissroll",
            process=RECIPE_PROCESS,
            net_kind="constant",
            net=ConstantConfig(dim=2),
            shape=[2],
            data_kind="points",
            run_kind="toy-mean",
            train=TrainConfig(steps=200, batch_size=64, lr=0.05, warmup=1, ema_decay=0.0, checkpoint_every=50),
            data=DataSpec(n=512),
        )
        cfg.validate()
        x = torch.randn(512, 2) * 0.1 + torch.tensor([3.0, -1.0])
        run = tmp_path / "toy"
        train(run, cfg, TensorDataset(x), progress=False, stop_after=100)
        assert weights_step(run) == 100
        again, resumed = begin(run, TOY, resume=True, force=False, fresh=lambda: cfg)
        assert resumed and again == cfg
        train(run, again, TensorDataset(x), resume=True, progress=False)
        straight = tmp_path / "straight"
        train(straight, cfg, TensorDataset(x), progress=False)
        loaded = difflab.load(run)
        assert type(loaded) is ConstantRun and loaded.step == 200
        assert torch.equal(loaded.mean(), difflab.load(straight).mean())  # the resume continued exactly
        assert torch.allclose(loaded.mean(), x.mean(0), atol=0.1)
        with pytest.raises(LifecycleError, match="holds a toy-mean run: continue it with `difflab toy-train"):
            from difflab.runs.diffusion import DIFFUSION

            begin(run, DIFFUSION, resume=True, force=False, fresh=lambda: cfg)
        with pytest.raises(RunKindError, match="is a toy-mean run, not a denoiser \\(ask it for its mean\\)"):
            DiffusionRun.load(run)
    finally:
        KINDS.pop("toy-mean")
    with pytest.raises(ValueError, match="unknown run kind 'toy-mean'"):
        difflab.load(run)


# --------------------------------------------------------------------------- prompts, images, defaults


def test_a_minilm_run_takes_prompts_longer_than_every_training_caption(text_runs, tmp_path, capsys):
    model = difflab.load(text_runs / "minilm")
    trained = model.config.text.max_tokens
    long = (
        "a handwritten three, " + "drawn with a thick black pen on white paper and slightly tilted to the right, " * 3
    )
    assert model.text.length([long]) > 3 * trained
    x = model.sample(2, prompt=long, negative_prompt="a handwritten eight", guidance=3.0, steps=4)
    cut = model.sample(
        2,
        prompt=model.text.tokenizer.decode(model.text.tokenizer(long)["input_ids"][1 : trained - 1]),
        negative_prompt="a handwritten eight",
        guidance=3.0,
        steps=4,
    )
    assert x.shape == (2, 1, 8, 8) and not torch.equal(x, cut)  # the whole prompt is read, not its first tokens
    code, err = cli(
        capsys, "sample", text_runs / "minilm", "--prompt", "three " * 300, "-n", 1, "--out", tmp_path / "x.png"
    )
    assert code == 2 and "reads at most 256" in err and len(err.splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_every_command_reads_a_folder_files_or_an_npz_through_one_reader(digits_runs, tmp_path, capsys):
    from PIL import Image

    test = load_images("digits", split="test").images[:3]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(test):
        Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
    np.savez(tmp_path / "x.npz", images=test.numpy())
    a = read_inputs([folder], (1, 8, 8))
    b = read_inputs(sorted(folder.glob("*.png")), (1, 8, 8))
    c = read_inputs([tmp_path / "x.npz"], (1, 8, 8))
    assert torch.equal(a, test) and torch.equal(b, test) and torch.equal(c, test)
    for argv in (
        ["img2img", digits_runs / "dc", folder, "--steps", 4],
        ["restore", digits_runs / "dc", "--task", "inpaint", "--clean", folder, "--steps", 4],
    ):
        code, err = cli(capsys, *argv, "--out", tmp_path / "o.png", "--quiet")
        assert code == 0 and (tmp_path / "o.png").exists(), err
    for argv in (
        ["img2img", digits_runs / "dc", tmp_path / "nothing"],
        ["restore", digits_runs / "dc", "--task", "inpaint", "--clean", tmp_path / "nothing"],
    ):
        code, err = cli(capsys, *argv, "--out", tmp_path / "p.png")
        assert code == 2 and "no such file or folder" in err and len(err.splitlines()) == 1, err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        read_inputs([tmp_path / "empty"], (1, 8, 8))


def test_restore_defaults_work_for_every_run_kind(digits_runs, latent_runs, tmp_path, capsys):
    np.savez(tmp_path / "x.npz", images=load_images("digits", split="test").images[:2].numpy())
    for run, method in ((digits_runs / "dc", "ddrm"), (latent_runs / "ldm", "dps")):
        code, err = cli(
            capsys,
            "restore",
            run,
            "--task",
            "inpaint",
            "--clean",
            tmp_path / "x.npz",
            "--steps",
            5,
            "--class",
            1,
            "--out",
            tmp_path / "r.png",
        )
        assert code == 0, err
        model = difflab.load(run)
        assert model.default_restoration(Mask(box_mask((1, 8, 8)), (1, 8, 8))) == method


# --------------------------------------------------------------------------- the README's Python


def readme_python() -> list[str]:
    text = README.read_text()
    section = text.split("## In Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readmes_python_section_runs_as_written(digits_runs, text_runs, tmp_path, monkeypatch):
    blocks = readme_python()
    assert blocks, "README.md has no ```python block under '## In Python'"
    (tmp_path / "runs").mkdir()
    for name, run in (("digits", digits_runs / "dc"), ("t2i", text_runs / "minilm"), ("sks", text_runs / "lora")):
        (tmp_path / "runs" / name).symlink_to(run)
    monkeypatch.chdir(tmp_path)
    names: dict = {}  # one namespace, as a reader who runs the blocks in turn has
    for code in blocks:
        exec(compile(code, "README.md", "exec"), names)  # noqa: S102 - the project's own README
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())  # the README's example writes a picture
