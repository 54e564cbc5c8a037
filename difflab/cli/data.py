"""`difflab data NAME`: export points or images of a data set, and a preview picture."""

from __future__ import annotations

import numpy as np
import torch

from ..data.images import load_images
from ..data.toy2d import TOY_DATASETS, make_toy
from ..runs.presets import check_dataset
from ..viz import plots
from .options import check_suffix, positive_int, save_npz


def run(args) -> None:
    check_suffix(args.save, (".npz",), "--save")
    check_suffix(args.out, (".png",), "--out")
    check_dataset(args.name)
    if args.name in TOY_DATASETS:
        items, what = make_toy(args.name, args.n or 5000, args.seed), "points"
        if args.save:
            save_npz(args.save, points=items.numpy())
        if args.out:
            plots.scatter(items, args.out, title=f"{args.name} (n={len(items)})")
    else:
        data = load_images(args.name, split=args.split, size=args.size, channels=args.channels, data_dir=args.data)
        idx = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(args.seed))[: args.n or 64]
        items, what = data.images[idx], "images"
        if args.save:
            arrays = {"images": items.numpy()}
            if data.labels is not None:
                arrays["labels"] = data.labels[idx].numpy()
            if data.captions is not None:  # a fixed-width unicode array: np.load reads it without pickle
                arrays["captions"] = np.array([data.captions[i] for i in idx.tolist()], dtype=str)
            if data.caption_sets is not None:  # every caption of each image, padded with "" to the most any has
                sets = [data.caption_sets[i] for i in idx.tolist()]
                k = max(map(len, sets))
                arrays["caption_sets"] = np.array([[*s, *[""] * (k - len(s))] for s in sets], dtype=str)
            if data.attributes is not None:
                arrays["attributes"], arrays["held_out"] = data.attributes[idx].numpy(), data.held_out[idx].numpy()
            save_npz(args.save, **arrays)
        if args.out and data.captions is not None:
            plots.captioned_grid(items, [data.captions[i] for i in idx.tolist()], args.out)
        elif args.out:
            plots.save_grid(items, args.out)
    if args.save:
        print(f"wrote {len(items)} {what} to {args.save}")
    if args.out:
        print(f"wrote {args.out}")


def register(sub) -> None:
    d = sub.add_parser("data", help="export points or images of a dataset (and a preview picture)")
    d.add_argument(
        "name",
        help=f"a 2-D set ({', '.join(TOY_DATASETS)}), an image set (digits, fashion-mnist, fashion-pairs), a folder "
        "(captions from its metadata.jsonl) or an .npz",
    )
    d.add_argument("-n", "--n", type=positive_int, help="how many (default 5000 points / 64 images)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--split", default="train", choices=["train", "test"])
    d.add_argument("--size", type=positive_int, help="image size for folders of images")
    d.add_argument("--channels", type=int, choices=[1, 3])
    d.add_argument("--data", help="folder holding the dataset's files (e.g. Fashion-MNIST IDX files)")
    d.add_argument("--save", help="write the raw data to this .npz")
    d.add_argument("--out", help="write a preview picture to this .png")
    d.set_defaults(func=run)
