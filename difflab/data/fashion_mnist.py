"""Fashion-MNIST (Xiao et al. 2017) from its four IDX files: those of Debian's ``dataset-fashion-mnist``
(/usr/share/datasets/fashion-mnist) or a folder holding them (optionally gzipped); and the IDX format itself."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_path
from .base import DataError, ImageSet

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _find_idx(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"fashion-mnist: {folder / name}[.gz] not found; install with `apt-get install dataset-fashion-mnist` "
        "or point --data at a folder with the four IDX files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally "
        ".gz)"
    )


def load_fashion_mnist(split: str, data_dir: str | None = None) -> ImageSet:
    """The train (60000), test (t10k, 10000) or all images, 28x28 grey, 10 classes."""
    folder = Path(data_dir or FASHION_MNIST_DIR)
    parts = [
        _read_part(folder, prefix) for prefix in {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    ]
    if len({tuple(x.shape[1:]) for x, _ in parts}) > 1:
        raise DataError(f"fashion-mnist in {folder}: train and test images differ in size")
    images, labels = (
        torch.cat([p[i] for p in parts]) for i in (0, 1)
    )  # new tensors: the cached ones are never handed out
    return ImageSet(images, labels, 10, "fashion-mnist", FASHION_MNIST_CLASSES, split)


def _read_part(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One part's images (N, 1, H, W) and labels (N,), read once per file (its path, size and modification time)."""
    image_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (image_path, label_path))
    return _read_files(image_path, label_path, stamp)


@lru_cache(maxsize=4)
def _read_files(image_path: Path, label_path: Path, stamp) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = read_idx(image_path), read_idx(label_path)
    if x.dtype != np.uint8 or x.ndim != 3:
        raise DataError(f"{image_path}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
    if y.dtype != np.uint8 or y.shape != (len(x),):
        raise DataError(
            f"{label_path}: expected {len(x)} uint8 labels to match {image_path.name}, got {y.dtype} {y.shape}"
        )
    if y.size and y.max() >= 10:
        raise DataError(f"{label_path}: labels must be in 0..9, found {int(y.max())}")
    return torch.from_numpy(x)[:, None], torch.from_numpy(y.astype(np.int64))  # (N, 1, H, W), (N,)


# --------------------------------------------------------------------------- IDX (the MNIST file format)

# IDX header: two zero bytes, a type code, the number of dimensions; then each size as a big-endian uint32
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw, detected from its first bytes), checking the magic number and size."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_TYPES[raw[2]]).newbyteorder(">")
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes but its header (shape {dims}, {dtype.name}) needs {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in .gz; atomic."""
    array = np.asarray(array)
    codes = {np.dtype(t): code for code, t in IDX_TYPES.items()}
    if array.dtype not in codes:
        raise DataError(
            f"{path}: IDX cannot store {array.dtype}; use one of {[np.dtype(t).name for t in IDX_TYPES.values()]}"
        )
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if str(path).endswith(".gz"):
        raw = gzip.compress(raw, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)
