"""Can the identity measure see identity? Same-class retrieval of held-out Fashion-MNIST items (issue 24).

For each query (a test item never seen in training), a random identity-keeping view of it (another tint,
a shift of up to 2 pixels, a scale of 0.9-1.1, blur, noise; evaluation/identity.identity_views) must be nearer
to another view of it than to a view of each of 100 other test items of its class. Read side by side in:

* the identity encoder (difflab/weights/fashion-identity.*: NT-Xent instance discrimination, the measure of
  benchmarks/personalization.py);
* the fashion-pairs attribute network's features (the measure issue 13 used: centred, the half placed on a
  black canvas);
* pixels (the luminance correlation of evaluation/subject.shape_similarity);
* and, "through the autoencoder", the identity encoder on views decoded by the shipped fashion-pairs-ae
  (what a latent model's samples look like at best).

    .venv/bin/python benchmarks/identity.py [--queries 1000]

Writes benchmarks/results/identity.json and identity.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import difflab  # noqa: E402
from benchmarks.common import RESULTS, header, md_table  # noqa: E402
from benchmarks.guidance_tradeoff import write_text  # noqa: E402
from difflab.data.images import load_images, to_model, to_uint8  # noqa: E402
from difflab.data.pairs import place  # noqa: E402
from difflab.evaluation.features import embed, load_feature_net  # noqa: E402
from difflab.evaluation.identity import identity_embed, load_identity_net, retrieval_accuracy  # noqa: E402
from difflab.evaluation.subject import feature_center  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--distractors", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    test = load_images("fashion-mnist", "test")
    items = to_model(test.images)
    ident = load_identity_net()
    attr = load_feature_net("fashion-pairs")
    center = feature_center(attr)
    space = difflab.load("fashion-pairs-ae").space

    def identity(v):
        return identity_embed(ident, v)

    def attributes(
        v,
    ):  # the half on the left of a black 32x64 canvas, as evaluation/subject.subject_similarity reads it
        halves = to_uint8(v)
        return F.normalize(embed(attr, place(halves, torch.zeros(len(v), dtype=torch.long)))[0] - center, dim=1)

    def pixels(v):
        lum = (v * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).flatten(1)
        return F.normalize(lum - lum.mean(1, keepdim=True), dim=1)

    def through_ae(
        v,
    ):  # each view decoded from its latent: the half on the left of a black canvas, round trip, half again
        canvas = place(to_uint8(v), torch.zeros(len(v), dtype=torch.long))
        with torch.no_grad():
            trip = space.reconstruct(canvas)[:, :, :, :32]
        return identity_embed(ident, trip)

    readings = {
        "identity encoder": identity,
        "attribute network (centred)": attributes,
        "pixels (luminance correlation)": pixels,
        "identity encoder, views through fashion-pairs-ae": through_ae,
    }
    results = {}
    for name, fn in readings.items():
        results[name] = retrieval_accuracy(fn, items, test.labels, args.distractors, args.queries, seed=7)
        print(f"{name}: top-1 {100 * results[name]:.1f} %", flush=True)
    lines = header("Identity measure: same-class retrieval of held-out items (issue 24)")
    lines += [
        f"{args.queries} test items, each among {args.distractors} other test items of its class; chance "
        f"{100 / (args.distractors + 1):.1f} %.",
        "",
    ]
    lines += md_table(["reading", "top-1"], [[k, f"{100 * v:.1f} %"] for k, v in results.items()])
    write_text(RESULTS / "identity.md", "\n".join(lines) + "\n")
    write_text(
        RESULTS / "identity.json",
        json.dumps(
            {"queries": args.queries, "distractors": args.distractors, "top1": results, "encoder": ident.meta}, indent=1
        ),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
