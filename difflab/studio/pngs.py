"""PNGs that carry their settings: a ``parameters`` tEXt chunk holding the JSON of every setting of the image
(AUTOMATIC1111's chunk name; JSON, as ComfyUI embeds its workflow), so an image dropped back in reproduces itself.

    png = encode(images_uint8[0], {"run": "t2i", "fingerprint": "...", "seed": 3, ...})
    decode(png) -> (uint8 (C, H, W), settings or None)"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

CHUNK = "parameters"
MAX_PIXELS = 4096 * 4096  # an upload decoded beyond this is refused (a decompression bomb)


class ImageError(ValueError):
    """Bytes that are not a usable image (not a PNG/JPEG, too large, a wrong size or channel count)."""


def encode(image: torch.Tensor, settings: dict | None = None) -> bytes:
    """uint8 (C, H, W) (C in 1, 3) -> PNG bytes, with ``settings`` as JSON in the ``parameters`` chunk."""
    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    info = PngImagePlugin.PngInfo()
    if settings is not None:
        info.add_text(CHUNK, json.dumps(settings, sort_keys=True))
    out = io.BytesIO()
    pil.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def decode(data: bytes, channels: int | None = None) -> tuple[torch.Tensor, dict | None]:
    """PNG/JPEG bytes -> uint8 (C, H, W) (as grey when ``channels`` is 1, RGB when 3, else as stored) and the
    settings of its ``parameters`` chunk (None when it has none or it is not difflab's JSON)."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        pil = Image.open(io.BytesIO(data))
        if pil.format not in ("PNG", "JPEG"):
            raise ImageError(f"expected a PNG or JPEG image, got {pil.format or 'something else'}")
        if pil.width * pil.height > MAX_PIXELS:
            raise ImageError(f"the image is {pil.width}x{pil.height}: too large")
        pil.load()
        text = getattr(pil, "text", {}) or {}
        mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if pil.mode in ("L", "1", "I", "I;16") else "RGB")
        array = np.asarray(pil.convert(mode))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"not a readable image ({type(e).__name__})") from None
    x = torch.from_numpy(np.array(array[None] if array.ndim == 2 else array.transpose(2, 0, 1)))  # (C, H, W)
    return x, _settings(text.get(CHUNK))


def _settings(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        s = json.loads(text)
    except json.JSONDecodeError:
        return None  # another program's parameters (AUTOMATIC1111 writes plain text)
    return s if isinstance(s, dict) else None
