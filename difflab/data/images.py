"""Image data sets, kept as uint8 (N, C, H, W) and scaled to [-1, 1] only when a batch is drawn.

Sources for ``load_images(source, split, size, channels, data_dir)``:

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), values
  0..16 mapped to uint8 by round(v * 255 / 16).
* ``"fashion-mnist"``: the four IDX files (optionally gzipped) in ``data_dir`` or
  /usr/share/datasets/fashion-mnist; 28x28 grey, 10 classes.
* ``"fashion-pairs"``: 32x64 RGB captioned pairs of tinted Fashion-MNIST items (data/pairs.py), unlabelled,
  with ``captions``, ``attributes`` and ``held_out``; the only non-square set, never cropped.
* a folder of PNG/JPEG images, searched recursively (hidden files and folders skipped). Each image is
  resized so its shorter side is ``size`` and center-cropped to size x size; without ``size`` all
  images must have one size and are center-cropped to a square. Images are read as grey ('L') when
  ``channels=1``, RGB when ``channels=3``, and by default grey if every image is grey (a grey mode, or
  RGB with equal channels), else RGB. When every image lies inside a first-level subfolder the
  subfolder names are the classes (sorted, indices 0..K-1); otherwise the set is unlabelled. A
  ``metadata.jsonl`` in the folder (rows ``{"file_name": "a/b.png", "text": "a caption"}``, the image-folder
  convention) gives every image its caption; an image without a row, or a row without its image, is an error.
  ``"text"`` may be a list of captions (as COCO gives five per image): the first is the image's caption for
  evaluation and grids, and text models train on every one (``ImageSet.caption_pairs``).
* an ``.npz`` file with a uint8 array ``images`` of shape (N, H, W), (N, H, W, C) or (N, C, H, W)
  (C in {1, 3}) and optionally integer ``labels`` (N,). ``save_npz`` writes this format. Non-square
  images keep their shape unless a ``size`` is given (then they are center-cropped and resized).

Known dataset names win over paths: write ``./digits`` for a folder called digits.

Splits (deterministic, disjoint, stratified by class when there are labels):

* ``"digits"``: within each class, in dataset order, every 5th image (positions 4, 9, 14, ...) is
  ``"test"`` (355 images), the rest ``"train"`` (1442).
* ``"fashion-mnist"``: the official files, ``"train"`` (60000) and ``"test"`` (t10k, 10000).
* ``"fashion-pairs"``: ``"train"`` (20000 images of train items, no held-out combination) and ``"test"``
  (4000 images of test items, every combination); ``"all"`` is the two.
* folders and npz files: within each class (or over the whole set when unlabelled), in sorted file
  order / array order, every 10th image (positions 9, 19, ...) is ``"test"``, the rest ``"train"``.
* ``"all"``: every image of the source (train then test for fashion-mnist).

Every problem with the data raises ``DataError``, one line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..io import atomic_path
from .base import DataError, ImageSet, to_model, to_uint8
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist, read_idx, write_idx
from .pairs import make_pairs

__all__ = [
    "DATASETS",
    "DataError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "ImageSet",
    "load_images",
    "read_captioned_folder",
    "read_idx",
    "read_inputs",
    "read_mask",
    "save_npz",
    "to_model",
    "to_uint8",
    "write_idx",
]

DATASETS = ("digits", "fashion-mnist", "fashion-pairs")
SPLITS = ("train", "test", "all")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------- loading


def load_split(cfg, split: str) -> ImageSet:
    """A run's data set (``cfg``: a RunConfig; its dataset with the size, channels and folder it records), one split."""
    return load_images(
        cfg.dataset,
        split=split,
        size=cfg.data.get("size"),
        channels=cfg.data.get("channels"),
        data_dir=cfg.data.get("data_dir"),
    )


def load_images(
    source: str,
    split: str = "train",
    size: int | None = None,
    channels: int | None = None,
    data_dir: str | None = None,
    n: int | None = None,
) -> ImageSet:
    """Load ``source`` (a dataset name, a folder of images or an .npz file) as uint8 (N, C, H, W); see the module doc.
    ``n`` (fashion-pairs only): that many images of the split instead of its default count."""
    if split not in SPLITS:
        raise DataError(f"{source}: unknown split {split!r}; choose one of {SPLITS}")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise DataError(f"{source}: size must be a positive integer, got {size!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"{source}: channels must be 1 or 3, got {channels!r}")
    if n is not None and source != "fashion-pairs":
        raise DataError(f"{source}: only fashion-pairs takes a number of images (it makes them)")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise DataError(f"{source}: the number of images must be a positive integer, got {n!r}")

    if source == "digits":
        data = _split(_load_digits(), split, every=5)
    elif source == "fashion-mnist":
        data = load_fashion_mnist(split, data_dir)
    elif source == "fashion-pairs":
        if size is not None or channels not in (None, 3):
            raise DataError("fashion-pairs is 3x32x64 RGB: it takes no size or channels")
        return _load_pairs(split, data_dir, n)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            return _split(_load_folder(path, size, channels), split, every=10)
        if path.is_file() and path.suffix.lower() == ".npz":
            data = _split(_load_npz(path), split, every=10)
        elif path.exists():
            raise DataError(f"{path}: not a folder of images or an .npz file")
        else:
            raise DataError(
                f"unknown image source {source!r}: not a dataset name {DATASETS} and no such file or folder; "
                "give a dataset name, a folder of PNG/JPEG images, or an .npz file"
            )
    data.images = _conform(data.images, size, channels, data.name)
    return data


def _split(data: ImageSet, split: str, every: int) -> ImageSet:
    """Deterministic holdout: every ``every``-th image of each class (positions every-1, 2*every-1, ...) is test."""
    data.split = split
    if split == "all":
        return data
    groups = data.labels if data.labels is not None else torch.zeros(len(data), dtype=torch.long)
    rank = torch.empty(len(data), dtype=torch.long)  # position of each image within its class
    for k in groups.unique():
        members = (groups == k).nonzero().squeeze(1)
        rank[members] = torch.arange(len(members))
    keep = (rank % every == every - 1) if split == "test" else (rank % every != every - 1)
    if not keep.any():
        raise DataError(
            f"{data.name}: the {split!r} split is empty (fewer than {every} images per class); use split='all'"
        )
    return data.subset(keep)


def _load_pairs(split: str, data_dir: str | None, n: int | None = None) -> ImageSet:
    if n is not None and split == "all":
        raise DataError("fashion-pairs: a number of images is per split (train or test), not for 'all'")
    parts = [make_pairs(s, n, data_dir=data_dir) for s in (["train", "test"] if split == "all" else [split])]
    return ImageSet(
        torch.cat([p.images for p in parts]),
        None,
        None,
        "fashion-pairs",
        None,
        split,
        [c for p in parts for c in p.captions],
        torch.cat([p.attributes for p in parts]),
        torch.cat([p.held_out for p in parts]),
    )


def _conform(images: Tensor, size: int | None, channels: int | None, name: str) -> Tensor:
    """With ``size``: center-crop to a square and resize to size x size (antialiased bilinear); convert to
    ``channels``. Without ``size`` a non-square set (e.g. fashion-pairs saved to .npz) keeps its shape."""
    H, W = images.shape[-2:]
    if H != W and size is not None:
        s = min(H, W)
        top, left = (H - s) // 2, (W - s) // 2
        images = images[..., top : top + s, left : left + s]
    if size is not None and size != images.shape[-1]:
        chunks = []
        for chunk in images.split(4096):
            resized = F.interpolate(
                chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
            chunks.append(resized.round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(chunks)
    C = images.shape[1]
    if C not in (1, 3):
        raise DataError(f"{name}: images must have 1 or 3 channels, got {C}")
    if channels == 3 and C == 1:
        images = images.expand(-1, 3, -1, -1)  # (N, 3, H, W)
    elif channels == 1 and C == 3:
        images = _luminance(images)
    return images.contiguous()


def _luminance(rgb: Tensor) -> Tensor:
    """ITU-R 601-2 luma, as PIL's convert('L'): (N, 3, H, W) uint8 -> (N, 1, H, W) uint8."""
    r, g, b = rgb.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[:, None]  # (N, 1, H, W)


def _load_digits() -> ImageSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return ImageSet(torch.from_numpy(images), labels, 10, "digits", tuple(str(k) for k in range(10)))


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _read_image(path: Path, size: int | None, square: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """One image as uint8 (H, W) when grey or (H, W, 3), resized (shorter side = size) and center-cropped
    square (unless not ``square``); and its original (width, height)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16"):
                im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
            im = im.convert("L" if im.mode in GREY_MODES else "RGB")
            w, h = original = im.size
            if size is not None and min(w, h) != size:
                scale = size / min(w, h)
                w, h = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((w, h), Image.Resampling.BICUBIC)
            if square:
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            array = np.array(im)  # a writable copy
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    if array.ndim == 3 and (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all():
        array = array[..., 0]  # RGB with equal channels is grey
    return array, original


def _load_folder(root: Path, size: int | None, channels: int | None) -> ImageSet:
    files = image_files(root)
    arrays, first = [], None
    for path in files:
        array, shape = _read_image(path, size)
        first = first or (path, shape)
        if size is None and shape != first[1]:  # without a target size every image must already have one size
            raise DataError(
                f"{path}: is {shape[0]}x{shape[1]} but {first[0].name} is {first[1][0]}x{first[1][1]}; "
                "pass a size (--size) to resize every image"
            )
        arrays.append(array)

    if channels is None:
        channels = 1 if all(a.ndim == 2 for a in arrays) else 3
    images = np.stack([_as_channels(a, channels) for a in arrays])  # (N, H, W, C)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)

    relative = [p.relative_to(root) for p in files]
    labels = class_names = None
    if all(len(r.parts) >= 2 for r in relative):
        class_names = tuple(sorted({r.parts[0] for r in relative}))
        index = {name: k for k, name in enumerate(class_names)}
        labels = torch.tensor([index[r.parts[0]] for r in relative], dtype=torch.long)
    sets = _read_metadata(root, relative) if (root / METADATA).exists() else None
    return ImageSet(
        images, labels, len(class_names) if class_names else None, root.name, class_names, **_captions(sets)
    )


METADATA = "metadata.jsonl"


def _read_metadata(root: Path, relative: list[Path]) -> list[tuple[str, ...]]:
    """The captions of every image from ``root/metadata.jsonl`` (rows {"file_name": ..., "text": ...}, "text" a
    caption or a list of captions), in ``relative``'s order."""
    path, texts = root / METADATA, {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f'{path}:{number}: expected a JSON object with "file_name" and "text"') from None
        if isinstance(text, str):
            text = [text]
        if (
            not isinstance(name, str)
            or not isinstance(text, list)
            or not text
            or not all(isinstance(t, str) for t in text)
        ):
            raise DataError(f'{path}:{number}: "file_name" must be a string and "text" a caption or a list of captions')
        if not (root / name).is_file():
            raise DataError(f"{path}:{number}: no image {name!r} in {root}")
        texts[Path(name).as_posix()] = tuple(text)
    missing = [r.as_posix() for r in relative if r.as_posix() not in texts]
    if missing:
        raise DataError(f"{path}: no caption for {len(missing)} image(s), e.g. {missing[0]!r}")
    return [texts[r.as_posix()] for r in relative]


def _captions(sets: list[tuple[str, ...]] | None) -> dict:
    """ImageSet's caption fields from each image's captions: ``captions`` (the first of each) and, where some
    image has several, ``caption_sets``."""
    if sets is None:
        return {"captions": None}
    return {"captions": [s[0] for s in sets], "caption_sets": sets if any(len(s) > 1 for s in sets) else None}


def _as_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) grey or (H, W, 3) RGB -> (H, W, channels)."""
    if array.ndim == 2:
        return np.repeat(array[..., None], channels, axis=-1)
    if channels == 3:
        return array
    return _luminance(torch.from_numpy(array).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()  # (H, W, 1)


def _load_npz(path: Path) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            images = archive["images"] if "images" in keys else None
            labels = archive["labels"] if "labels" in keys else None
            captions = archive["captions"] if "captions" in keys else None
            sets = archive["caption_sets"] if "caption_sets" in keys else None
    except Exception as e:  # BadZipFile, OSError, ValueError (pickled objects), EOFError...
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if images is None:
        raise DataError(f"{path}: no 'images' array (found {keys})")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8 (0..255), got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]  # (N, 1, H, W)
    elif images.ndim == 4:
        if _channels_last(images.shape):
            images = images.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        elif images.shape[1] not in (1, 3):
            raise DataError(f"{path}: 'images' of shape {images.shape} has no channel axis of size 1 or 3")
    else:
        raise DataError(f"{path}: 'images' must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {images.shape}")
    if len(images) == 0 or min(images.shape[2:]) == 0:
        raise DataError(f"{path}: 'images' is empty ({images.shape})")
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: 'labels' must be {len(images)} integers, got {labels.dtype} {labels.shape}")
        if labels.min() < 0:
            raise DataError(f"{path}: 'labels' must be non-negative, found {int(labels.min())}")
        labels = torch.from_numpy(labels.astype(np.int64))
    num_classes = int(labels.max()) + 1 if labels is not None else None
    texts = _npz_captions(path, len(images), captions, sets)
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), labels, num_classes, path.stem, **_captions(texts))


def _npz_captions(path: Path, n: int, captions, sets) -> list[tuple[str, ...]] | None:
    """Each image's captions from an .npz's text arrays (what `difflab data --save` writes): ``captions`` (N,)
    and, where an image has several, ``caption_sets`` (N, K), padded with empty strings."""
    if sets is not None and captions is None:
        raise DataError(f"{path}: 'caption_sets' without 'captions' (each image's first caption)")
    if captions is None:
        return None
    if captions.dtype.kind != "U" or captions.shape != (n,):
        raise DataError(f"{path}: 'captions' must be {n} strings, got {captions.dtype} {captions.shape}")
    if sets is None:
        return [(c,) for c in captions.tolist()]
    if sets.dtype.kind != "U" or sets.ndim != 2 or len(sets) != n:
        raise DataError(f"{path}: 'caption_sets' must be {n} rows of strings, got {sets.dtype} {sets.shape}")
    rows = [_unpadded(row) for row in sets.tolist()]
    if any(not row or row[0] != c for row, c in zip(rows, captions.tolist())):
        raise DataError(f"{path}: each row of 'caption_sets' must start with the image's caption")
    return rows


def _unpadded(row: list[str]) -> tuple[str, ...]:
    """A caption_sets row without the empty strings that pad it to the widest (the first caption is kept even when
    empty, and an empty caption between others too)."""
    end = len(row)
    while end > 1 and not row[end - 1]:
        end -= 1
    return tuple(row[:end])


def _channels_last(shape: tuple[int, ...]) -> bool:
    """Whether a 4-D image array is (N, H, W, C): the last axis is 1 or 3 and the first is not, or both are
    and the array is square in the (H, W) it would imply."""
    last, first = shape[3] in (1, 3), shape[1] in (1, 3)
    return last and (not first or shape[1] == shape[2])


# --------------------------------------------------------------------------- writing


def save_npz(path: str | os.PathLike, images: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None) -> None:
    """Write uint8 images (N, C, H, W) and optional labels (N,) to an .npz that load_images reads back; atomic."""
    images = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"{path}: save_npz needs uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
    arrays = {"images": images}
    if labels is not None:
        labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
        arrays["labels"] = labels.astype(np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


# --------------------------------------------------------------------------- a user's input images


def image_files(folder: Path) -> list[Path]:
    """The PNG/JPEG files in ``folder`` and its subfolders, sorted by path (hidden ones skipped)."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(
            f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files in it and its subfolders)"
        )
    return files


def read_inputs(paths, shape: tuple[int, int, int], what: str = "input") -> Tensor:
    """A user's images for a command, as uint8 (N, C, H, W), each exactly C x H x W (a wrong size or channel count
    is refused, never resized): every path may be an image file, an .npz with 'images', or a folder (its images,
    sorted by path). The one reader of every command that takes images."""
    C, H, W = shape
    out = []
    for path in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if path.is_dir():
            out.append(read_inputs(image_files(path), shape, what))
            continue
        if not path.is_file():
            raise DataError(f"{what} {path}: no such file or folder")
        if path.suffix.lower() == ".npz":
            images = _load_npz(path).images
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            array, _ = _read_image(path, None, square=False)
            if array.ndim == 2:
                array = array[None] if C == 1 else np.repeat(array[None], 3, axis=0)
            else:
                array = array.transpose(2, 0, 1)
            images = torch.from_numpy(np.ascontiguousarray(array))[None]
        else:
            raise DataError(
                f"{what} {path}: expected an image ({', '.join(IMAGE_EXTENSIONS)}), an .npz with 'images' or a folder "
                "of images"
            )
        if images.shape[1] != C:
            raise DataError(f"{what} {path} has {images.shape[1]} channel(s); this needs {C}")
        if tuple(images.shape[2:]) != (H, W):
            raise DataError(f"{what} {path} is {images.shape[3]}x{images.shape[2]}; this needs {W}x{H} images")
        out.append(images)
    if not out:
        raise DataError(f"no {what} images given")
    return torch.cat(out)


def read_captioned_folder(folder, shape: tuple[int, int, int], what: str = "image") -> tuple[Tensor, list[str] | None]:
    """Every image in ``folder`` (sorted by path; each exactly C x H x W, never resized) and their captions
    from its metadata.jsonl (None without one); an image with several captions comes once per caption."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    files = image_files(root)
    images = read_inputs(files, shape, what)
    if not (root / METADATA).exists():
        return images, None
    sets = _read_metadata(root, [p.relative_to(root) for p in files])
    index = [i for i, s in enumerate(sets) for _ in s]
    return images[index], [c for s in sets for c in s]


def read_mask(path, size: tuple[int, int]) -> Tensor:
    """A mask image as bool (H, W), True where a pixel is kept: white (>= 128) marks the pixels to fill in,
    black the known ones (the convention of diffusers' inpainting pipelines)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask {path} does not exist")
    array, _ = _read_image(path, None, square=False)
    if array.ndim == 3:
        array = array.mean(axis=2)
    if array.shape != tuple(size):
        raise DataError(f"mask {path} is {array.shape[1]}x{array.shape[0]}; the images are {size[1]}x{size[0]}")
    keep = torch.from_numpy(np.asarray(array) < 128)
    if keep.all():
        raise DataError(f"mask {path} marks no pixel to fill in (white = fill in, black = keep)")
    return keep
