"""`make demo`: the main job. Trains a class-conditional digits model on the embedded data (scikit-learn's
8x8 digits, labels dropped to the null class 10 % of the time) and a noise-aware classifier, samples p(x)
with a fast sampler, p(x | class) with classifier-free and with classifier guidance, and writes the
grids, the chain GIF and the loss curve. When the package ships the text-to-image model, a grid of captions
drawn by it (seconds, no training) comes first."""

from __future__ import annotations

import sys
import time

from .cli import main as cli
from .runs.shipped import names as shipped_models

OUT = "out/demo"
RUN = "runs/digits"
CLF = "runs/digits-clf"
T2I = "fashion-pairs-t2i"
PROMPTS = (
    "a red sneaker on the left and a blue bag on the right",
    "a blue bag on the left and a red sneaker on the right",
    "a green dress on the left and a yellow sandal on the right",
    "a yellow trouser on the left and a green coat on the right",
)


def run(steps: list[list[str]]) -> None:
    for argv in steps:
        print("$ difflab " + " ".join(argv), flush=True)
        if cli(argv) != 0:
            sys.exit(1)


def main() -> None:
    t0 = time.perf_counter()
    pictures = []
    if T2I in shipped_models():
        prompts = [a for p in PROMPTS for a in ("--prompt", p)]
        run(
            [
                [
                    "sample",
                    T2I,
                    *prompts,
                    "-n",
                    "32",
                    "--guidance",
                    "5",
                    "--seed",
                    "0",
                    "--out",
                    f"{OUT}/text-to-image.png",
                ]
            ]
        )
        pictures.append("text-to-image.png")
    run(
        [
            ["data", "digits", "--split", "test", "--n", "64", "--out", f"{OUT}/digits-real.png"],
            ["train", "digits", "--cond", "class", "--out", RUN, "--force"],
            ["train-classifier", "digits", "--out", CLF, "--force"],
            [
                "sample",
                RUN,
                "--n",
                "64",
                "--sampler",
                "dpmpp-2m",
                "--steps",
                "20",
                "--seed",
                "0",
                "--out",
                f"{OUT}/digits-samples.png",
                "--save",
                f"{OUT}/digits-samples.npz",
            ],
            [
                "sample",
                RUN,
                "--class",
                "all",
                "-n",
                "80",
                "--guidance",
                "3",
                "--sampler",
                "dpmpp-2m",
                "--steps",
                "20",
                "--out",
                f"{OUT}/digits-classes.png",
            ],
            [
                "sample",
                RUN,
                "--class",
                "all",
                "-n",
                "80",
                "--guidance",
                "0",
                "--classifier",
                CLF,
                "--classifier-scale",
                "3",
                "--sampler",
                "dpmpp-2m",
                "--steps",
                "20",
                "--out",
                f"{OUT}/digits-classifier.png",
            ],
            [
                "trajectories",
                RUN,
                "--sampler",
                "dpmpp-2m",
                "--steps",
                "20",
                "--out",
                f"{OUT}/digits-chain.png",
                "--gif",
                f"{OUT}/digits-chain.gif",
                "--forward",
                f"{OUT}/digits-forward.png",
            ],
        ]
    )
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s. Pictures:")
    for name in (
        *pictures,
        "digits-real.png",
        "digits-samples.png",
        "digits-classes.png",
        "digits-classifier.png",
        "digits-chain.gif",
        "digits-chain.png",
        "digits-forward.png",
    ):
        print(f"  {OUT}/{name}")
    print(f"  {RUN}/loss.png (loss curve), {RUN}/samples.png (grid written during training)")


def main_2d() -> None:
    """`make demo-2d`: the swiss roll, trained in under a minute, with the classic trajectories figure."""
    t0 = time.perf_counter()
    out = "out/demo-2d"
    run(
        [
            [
                "data",
                "swissroll",
                "--n",
                "5000",
                "--seed",
                "1",
                "--save",
                f"{out}/data.npz",
                "--out",
                f"{out}/data.png",
            ],
            ["train", "swissroll", "--out", "runs/swissroll", "--force"],
            [
                "sample",
                "runs/swissroll",
                "--sampler",
                "ddim",
                "--steps",
                "50",
                "--n",
                "5000",
                "--seed",
                "0",
                "--out",
                f"{out}/samples.png",
                "--save",
                f"{out}/samples.npz",
            ],
            [
                "trajectories",
                "runs/swissroll",
                "--out",
                f"{out}/trajectories.png",
                "--steps",
                "1000",
                "--sampler",
                "ddpm",
            ],
        ]
    )
    print(
        f"\n2-D demo done in {time.perf_counter() - t0:.0f} s. Pictures: {out}/data.png, {out}/samples.png, "
        f"{out}/trajectories.png, runs/swissroll/loss.png"
    )


if __name__ == "__main__":
    main_2d() if sys.argv[1:] == ["2d"] else main()
