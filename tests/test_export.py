"""difflab export: ONNX and torch.export graphs equal the run's network, diffusers folders sample as difflab does,
refusals are one line, and the model card says what the run is."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from difflab.cli import main
from difflab.export.card import CARD, model_card, write_model_card
from difflab.export.interface import example_inputs, example_length, explicit, input_specs, integer_ranges
from difflab.guidance.config import GuidanceConfig
from difflab.runs.config import LatentRecord, save_config
from difflab.runs.diffusion import DiffusionRun
from difflab.runs.presets import preset_for, with_text
from difflab.runs.store import save_checkpoint, weights_step
from difflab.sampling.samplers import sample
from difflab.text.encoders import text_record

torch.set_num_threads(1)
TOLERANCE, SAMPLE_TOLERANCE = 1e-4, 1e-3


def cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def roughen(run_dir: Path, scale: float) -> None:
    """Replace the run's weights by themselves plus noise: a few training steps leave the zero-initialised output
    layers near zero, and a comparison of zeros would show nothing."""
    run = DiffusionRun.load(run_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in run.net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    save_checkpoint(run_dir, weights_step(run_dir), run.net, copy.deepcopy(run.net))


def saved_fresh(run_dir: Path, cfg) -> Path:
    """A run folder holding ``cfg`` and a freshly initialised network (the refusals need no training)."""
    save_config(run_dir, cfg)
    net = cfg.build_net()
    save_checkpoint(run_dir, 1, net, copy.deepcopy(net))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """dc: class-conditional digits; du: unconditional digits; toy: swiss roll (an MLP). 3 steps each, roughened."""
    root = tmp_path_factory.mktemp("export-runs")
    common = ("--steps", 3, "--batch-size", 16, "--quiet")
    cli("train", "digits", "--cond", "class", "--out", root / "dc", *common)
    cli("train", "digits", "--out", root / "du", *common)
    cli("train", "swissroll", "--n", 200, "--out", root / "toy", *common)
    for name, scale in (("dc", 0.02), ("du", 0.02), ("toy", 0.05)):
        roughen(root / name, scale)
    return root


def differences(run: DiffusionRun, call, batches=(1, 4)) -> float:
    specs, net = input_specs(run), explicit(run)
    g = torch.Generator().manual_seed(7)
    worst = 0.0
    for b in batches:
        inputs = example_inputs(specs, b, g, length=example_length(run), high=integer_ranges(run))
        with torch.no_grad():
            ours = net(*inputs)
        assert float(ours.abs().max()) > 0.1  # a comparison of something
        theirs = call(inputs)
        assert theirs.shape == ours.shape
        worst = max(worst, float((theirs - ours).abs().max()))
    return worst


# --------------------------------------------------------------------------- onnx and torch-export


def test_onnx_equals_the_run(runs, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    cli("export", runs / "dc", "--format", "onnx", "--out", tmp_path / "onnx")
    run = DiffusionRun.load(runs / "dc")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    specs = input_specs(run)
    assert [i.name for i in session.get_inputs()] == ["x", "c_noise", "class_labels"]

    def call(inputs):
        return torch.from_numpy(session.run(None, {s.name: x.numpy() for s, x in zip(specs, inputs)})[0])

    worst = differences(run, call)
    print(f"onnx: max |difference| {worst:.3g}")
    assert worst < TOLERANCE
    record = json.loads((tmp_path / "onnx" / "denoiser.json").read_text())
    assert record["target"] == run.config.target and record["process"]["kind"] == "ddpm"
    assert len(record["alphas_cumprod"]) == run.config.process.T + 1 and record["alphas_cumprod"][0] == 1.0
    assert record["inputs"][2]["meaning"].startswith("class index 0..9; 10 is the null class")
    assert record["checked"]["max_abs_diff"] < TOLERANCE
    assert (tmp_path / "onnx" / CARD).is_file() and (tmp_path / "onnx" / "samples.png").is_file()


@pytest.mark.parametrize("name", ["dc", "toy"])
def test_torch_export_equals_the_run(runs, tmp_path, name):
    cli("export", runs / name, "--format", "torch-export", "--out", tmp_path / "pt2")
    run = DiffusionRun.load(runs / name)
    program = torch.export.load(str(tmp_path / "pt2" / "denoiser.pt2")).module()

    def call(inputs):
        with torch.no_grad():
            return program(*inputs)

    worst = differences(run, call)
    print(f"torch-export ({name}): max |difference| {worst:.3g}")
    assert worst < TOLERANCE


def test_torch_export_of_a_text_run_takes_its_tokens(tmp_path):
    captions = ["a handwritten three on the left", "a handwritten seven", "one"]
    record, width, joint = text_record("joint", captions)
    cfg = with_text(preset_for("digits"), record, width, joint.to_dict())
    run_dir = saved_fresh(tmp_path / "text", cfg)
    roughen(run_dir, 0.02)
    from difflab.export import export_run

    export_run(DiffusionRun.load(run_dir), "torch-export", tmp_path / "pt2")
    run = DiffusionRun.load(run_dir)
    assert [s.name for s in input_specs(run)] == ["x", "c_noise", "tokens", "token_mask"]
    program = torch.export.load(str(tmp_path / "pt2" / "denoiser.pt2")).module()
    assert differences(run, lambda inputs: program(*inputs)) < TOLERANCE


def test_a_missing_optional_package_is_one_line(runs, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", str(runs / "dc"), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'difflab[export]'" in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())  # no half-written folder


# --------------------------------------------------------------------------- diffusers


def _pipeline_noise(n: int, shape, seed: int) -> torch.Tensor:
    """The noise diffusers' pipelines draw from torch.Generator().manual_seed(seed) (randn_tensor on the CPU)."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _as_pipeline_images(x: torch.Tensor):
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_diffusers_unconditional_samples_as_difflab(runs, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cli("export", runs / "du", "--format", "diffusers", "--out", tmp_path / "hf")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "hf"))  # no remote code: stock classes
    assert type(pipe).__name__ == "DDIMPipeline" and type(pipe.unet).__name__ == "UNet2DModel"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=4, num_inference_steps=20, generator=torch.Generator().manual_seed(3), eta=0.0, output_type="np"
    ).images
    run = DiffusionRun.load(runs / "du")
    x = sample(run.denoiser, (4, 1, 8, 8), 20, "ddim", spacing="uniform", x_start=_pipeline_noise(4, (1, 8, 8), 3))
    worst = abs(images - _as_pipeline_images(x)).max()
    print(f"diffusers unconditional: max |difference| {worst:.3g} (images in [0, 1])")
    assert 0.05 < x.std() and worst < SAMPLE_TOLERANCE
    checked = json.loads((tmp_path / "hf" / "difflab_export.json").read_text())["checked"]
    assert checked["max_abs_diff"] < TOLERANCE


def test_diffusers_class_samples_as_difflab_with_and_without_guidance(runs, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cli("export", runs / "dc", "--format", "diffusers", "--out", tmp_path / "hf")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    run = DiffusionRun.load(runs / "dc")
    labels = torch.tensor([0, 3, 9, 10])  # 10: the null class
    noise = _pipeline_noise(4, (1, 8, 8), 5)
    for scale in (1.0, 3.0):
        images = pipe(class_labels=labels, num_inference_steps=20, guidance_scale=scale, latents=noise).images
        denoiser = run.guided(GuidanceConfig.of(scale) if scale != 1 else None)
        x = sample(denoiser, (4, 1, 8, 8), 20, "ddim", spacing="uniform", x_start=noise, cond={"class_labels": labels})
        worst = abs(images - _as_pipeline_images(x)).max()
        print(f"diffusers class, guidance {scale}: max |difference| {worst:.3g}")
        assert worst < SAMPLE_TOLERANCE


def test_diffusers_folder_of_a_shipped_model_with_other_group_counts(tmp_path):
    """fashion-mnist-classes has 16, 48 and 80 channels: its group norms use 16, 24 and 20 groups, which diffusers'
    UNet2DModel cannot (one count for all); the folder's own subclass applies difflab's rule."""
    diffusers = pytest.importorskip("diffusers")
    cli("export", "fashion-mnist-classes", "--format", "diffusers", "--out", tmp_path / "hf")
    assert (tmp_path / "hf" / "unet" / "difflab_unet.py").is_file()
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    run = DiffusionRun.load("fashion-mnist-classes")
    labels, noise = torch.tensor([1, 7]), _pipeline_noise(2, (1, 28, 28), 0)
    images = pipe(class_labels=labels, num_inference_steps=8, latents=noise).images
    x = sample(run.denoiser, (2, 1, 28, 28), 8, "ddim", spacing="uniform", x_start=noise, cond={"class_labels": labels})
    worst = abs(images - _as_pipeline_images(x)).max()
    print(f"diffusers, shipped fashion-mnist-classes: max |difference| {worst:.3g}")
    assert worst < SAMPLE_TOLERANCE
    card = (tmp_path / "hf" / CARD).read_text()
    assert "trust_remote_code=True" in card and "fashion-mnist" in card


# --------------------------------------------------------------------------- refusals


def _refused(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error: ") and "\n" not in err, err
    return err


def test_refusals_are_one_line(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert "unknown format 'tflite'" in _refused(capsys, "export", runs / "dc", "--format", "tflite", "--out", out)
    assert "does not exist" in _refused(capsys, "export", tmp_path / "nowhere", "--format", "onnx", "--out", out)
    err = _refused(capsys, "export", runs / "toy", "--format", "diffusers", "--out", out)
    assert "not a U-Net" in err and "onnx or torch-export" in err
    latent = preset_for("digits")
    latent = replace(latent, latent=LatentRecord("some-autoencoder", "0" * 16, 1.0, 2, [1, 8, 8]), shape=[1, 4, 4])
    latent = replace(latent, net=replace(latent.net, image_size=4))
    err = _refused(capsys, "export", saved_fresh(tmp_path / "latent", latent), "--format", "diffusers", "--out", out)
    assert "latent run" in err
    record, width, joint = text_record("joint", ["a handwritten three"])
    text = with_text(preset_for("digits"), record, width, joint.to_dict())
    err = _refused(capsys, "export", saved_fresh(tmp_path / "text", text), "--format", "diffusers", "--out", out)
    assert "reads text" in err
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in _refused(capsys, "export", runs / "dc", "--format", "torch-export", "--out", out)
    assert (out / "keep.txt").read_text() == "mine"
    cli("export", runs / "dc", "--format", "torch-export", "--out", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "denoiser.pt2").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


# --------------------------------------------------------------------------- the model card


def test_model_card_names_data_steps_time_and_command(runs, tmp_path):
    run_dir = tmp_path / "dc"
    import shutil

    shutil.copytree(runs / "dc", run_dir)
    command = f"difflab train digits --cond class --out {run_dir} --steps 3 --batch-size 16"
    path = write_model_card(run_dir, command=command)
    card = path.read_text()
    for said in ("digits", "steps: 3 of 3", "class labels 0..9", "M parameters", "training time", command):
        assert said in card, said
    assert "![samples](samples.png)" in card and "reconstructed" not in card
    assert model_card(run_dir) == card  # written again without a command: the recorded one stays
    (run_dir / CARD).unlink()
    assert "reconstructed from config.json" in model_card(run_dir)
    shipped = model_card("fashion-mnist-classes")
    assert "difflab train fashion-mnist --cond class" in shipped and "fd: 1.038" in shipped
    from difflab.runs import shipped as package

    recipe = package.recipe("fashion-pairs-t2i")
    if "stage_steps" in recipe:  # a recipe in stages, a table of figures
        flagship = model_card("fashion-pairs-t2i")
        stages = " + ".join(map(str, recipe["stage_steps"]))
        assert f"{recipe['steps']} of {recipe['steps']} (the last of its stages: {stages})" in flagship, flagship
        phrasing, figure = next(iter(recipe["figures"]["by_phrasing"].items()))
        assert f"- by_phrasing: {phrasing} {figure:.4g}; " in flagship, flagship


def test_the_card_keeps_eval_bookkeeping_out_of_its_figures_and_says_under_a_second(tmp_path):
    from difflab.export.card import _duration, _figures

    rows = [{"step": 10, "loss": 0.1, "it_s": 5.0}, {"step": 10, "fd": 3.5, "eval_seconds": 2.0, "best_step": 10}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _figures(tmp_path, {}) == {"fd (step 10)": 3.5}
    assert _duration(0.3) == "under 1 s" and _duration(30) == "30 s" and _duration(600) == "10 min"
