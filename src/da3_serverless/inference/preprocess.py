"""Images in, network input out: loading, EXIF, resizing to the patch grid, normalisation."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

PATCH_SIZE = 14
MAX_PROCESS_RES = 2016  # 144 x 14: beyond this the ViT's attention no longer fits typical GPUs
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = Image.Image | np.ndarray | str | os.PathLike
# The 36 x 24 mm frame that "35 mm equivalent" focal lengths refer to.
FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
EXIF_IFD = 0x8769
EXIF_FOCAL_35MM = 0xA405


def load_rgb(image: ImageInput, index: int = 0) -> tuple[Image.Image, float | None]:
    """A PIL image, HxWx3 uint8 array or file path -> (upright RGB image, EXIF focal length in
    pixels or None), as `upright_rgb` does.

    Raises ValueError naming the view (`index`) and what to fix.
    """
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        try:
            with Image.open(path) as opened:
                opened.load()
                return upright_rgb(opened)
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(
                f"images[{index}]: cannot read {str(path)!r} as an image ({error}); "
                "pass an existing JPEG/PNG/WebP/TIFF file, a PIL image or an HxWx3 uint8 array"
            ) from None
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"images[{index}]: array of shape {image.shape} and dtype {image.dtype}; "
                "expected an HxWx3 uint8 RGB array"
            )
        if min(image.shape[:2]) < 1:
            raise ValueError(f"images[{index}]: the array is empty ({image.shape})")
        return Image.fromarray(np.ascontiguousarray(image), "RGB"), None
    if not isinstance(image, Image.Image):
        raise ValueError(
            f"images[{index}]: unsupported type {type(image).__name__}; "
            "pass a PIL image, an HxWx3 uint8 array or a file path"
        )
    return upright_rgb(image)


def upright_rgb(image: Image.Image) -> tuple[Image.Image, float | None]:
    """(RGB image with EXIF orientation applied, EXIF focal length in pixels or None).

    The focal length is read before the orientation is applied (the diagonal does not change).
    """
    focal = exif_focal_length_px(image)
    with contextlib.suppress(Exception):  # a broken orientation tag: keep the image as stored
        image = ImageOps.exif_transpose(image)
    return to_rgb(image), focal


def exif_focal_length_px(image: Image.Image) -> float | None:
    """Focal length in pixels from EXIF FocalLengthIn35mmFilm, or None.

    "35 mm equivalent" means the same diagonal field of view as on a 36 x 24 mm frame, so
    f_px = f35 * diagonal_px / 43.27 mm. (The width convention f35 / 36 * width agrees for 3:2
    images and is ~4 % lower for 4:3 ones; the diagonal one does not depend on orientation.)
    """
    try:
        f35 = float(image.getexif().get_ifd(EXIF_IFD).get(EXIF_FOCAL_35MM) or 0)
    except Exception:  # EXIF is optional metadata: a broken block just means "no focal length"
        return None
    if not (math.isfinite(f35) and f35 > 0):
        return None
    return f35 * math.hypot(*image.size) / FULL_FRAME_DIAGONAL_MM


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB. Transparent pixels are composited on white (what viewers and
    product photos show; a uniform background gives the model a plain, far-looking backdrop)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _gray16_to_8bit(image)
    has_alpha = "A" in image.getbands() or "a" in image.mode or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _gray16_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale to 8-bit by scaling, not clipping (Pillow's convert("L") clips).

    I;16*: 0..65535 -> 0..255. I (32-bit int): the same when the values fit 16 bits, else the
    image's own min..max. F (float): its finite min..max.
    """
    a = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and a.min() >= 0 and a.max() <= 65535):
        scaled = a / 257.0
    else:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = (np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo) - lo) / max(hi - lo, 1e-12) * 255
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def processing_size(width: int, height: int, process_res: int) -> tuple[int, int]:
    """(width, height) with the longest side scaled to `process_res`, both sides then rounded
    to the nearest multiple of the patch size (at least one patch)."""
    scale = process_res / max(width, height)

    def to_grid(side: int) -> int:
        return max(PATCH_SIZE, round(side * scale / PATCH_SIZE) * PATCH_SIZE)

    return to_grid(width), to_grid(height)


def to_network_input(images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """RGB images -> (1, N, 3, H, W) float32, ImageNet-normalised, every view resized to
    `size` = (W, H) in one step (bicubic, antialiased when shrinking)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    views = []
    for image in images:
        resized = image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
        views.append((pixels.permute(2, 0, 1).float() / 255.0 - mean) / std)
    return torch.stack(views)[None]
