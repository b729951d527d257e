"""Images in, network input out: loading, EXIF, resizing to the patch grid, normalisation."""

from __future__ import annotations

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
# EXIF tags (Pillow's ExifTags.Base): the Exif sub-IFD holds the focal length
_EXIF_IFD = 0x8769
_FOCAL_LENGTH_35MM = 0xA405

ImageInput = Image.Image | np.ndarray | str | os.PathLike


def load_rgb(image: ImageInput, index: int = 0) -> Image.Image:
    """A PIL, HxWx3 uint8 array or file path -> an RGB PIL image with EXIF orientation applied.

    Raises ValueError naming the view (`index`) and what to fix.
    """
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
                image.info["exif_focal_35mm"] = _focal_35mm(opened)
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
        return Image.fromarray(np.ascontiguousarray(image), "RGB")
    if not isinstance(image, Image.Image):
        raise ValueError(
            f"images[{index}]: unsupported type {type(image).__name__}; "
            "pass a PIL image, an HxWx3 uint8 array or a file path"
        )
    focal_35mm = image.info.get("exif_focal_35mm") or _focal_35mm(image)
    upright = ImageOps.exif_transpose(image)
    rgb = upright if upright.mode == "RGB" else upright.convert("RGB")
    if focal_35mm:
        rgb.info["exif_focal_35mm"] = focal_35mm
    return rgb


def _focal_35mm(image: Image.Image) -> float | None:
    value = image.getexif().get_ifd(_EXIF_IFD).get(_FOCAL_LENGTH_35MM)
    try:
        focal = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return focal if focal and focal > 0 else None


def exif_focal_length_px(image: Image.Image) -> float | None:
    """Focal length in pixels from EXIF `FocalLengthIn35mmFilm`, or None.

    The 35 mm equivalent refers to a 36 x 24 mm frame, so the image's long side spans 36 mm:
    f_px = f_35mm / 36 * max(width, height). Works on images returned by `load_rgb` (which
    keeps the value through orientation and mode changes) and on freshly opened files.
    """
    focal_35mm = image.info.get("exif_focal_35mm") or _focal_35mm(image)
    if not focal_35mm:
        return None
    return float(focal_35mm) / 36.0 * max(image.size)


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
