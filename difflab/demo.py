"""`make demo`: the main job. Trains the default model on the embedded data and writes its pictures."""

from __future__ import annotations

import sys
import time

from .cli import main as cli


def run(steps: list[list[str]]) -> None:
    for argv in steps:
        print("$ difflab " + " ".join(argv), flush=True)
        if cli(argv) != 0:
            sys.exit(1)


def main() -> None:
    t0 = time.perf_counter()
    out = "out/demo"
    run(
        [
            ["data", "swissroll", "--n", "5000", "--seed", "1", "--save", f"{out}/data.npz", "--out", f"{out}/data.png"],
            ["train", "swissroll", "--out", "runs/swissroll", "--force"],
            ["sample", "runs/swissroll", "--sampler", "ddim", "--steps", "50", "--n", "5000", "--seed", "0", "--out", f"{out}/samples.png", "--save", f"{out}/samples.npz"],
            ["trajectories", "runs/swissroll", "--out", f"{out}/trajectories.png", "--steps", "1000", "--sampler", "ddpm"],
        ]
    )
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s. Pictures: {out}/data.png, {out}/samples.png, {out}/trajectories.png, runs/swissroll/loss.png")


if __name__ == "__main__":
    main()
