"""Eight different photos for the batching tests, made from tests/data/images: crops, resizes,
a mirror and one stored turned left with an EXIF orientation tag. At `RES` they all become the
same 126 x 70 network input, so they can share one forward. Also: the v1 request of a photo,
and the comparison of a batched answer with the answer alone."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from paths import IMAGES

RES = 126  # every photo below becomes a 126 x 70 network input (9 x 5 patches)
ROTATED = 6  # the index of the photo stored turned left (EXIF orientation 6)
ROTATED_UPRIGHT_SIZE = (1150, 647)
# Response fields that differ between runs (or are compared as numbers below).
VOLATILE = ("timings_ms", "file_path", "file_url", "image_base64", "depth_npy")
NUMBERS = ("min_depth", "max_depth", "intrinsics", "extrinsics")


def write_batch_photos(folder: Path) -> list[Path]:
    """The eight photos as files in `folder` (JPEG and PNG), in a fixed order."""
    first = Image.open(IMAGES / "soh-000.png").convert("RGB")
    second = Image.open(IMAGES / "soh-010.png").convert("RGB")
    photos = [
        first,
        second.resize((1100, 619)),
        first.resize((604, 340)),
        second.crop((100, 50, 1100, 613)),
        first.crop((200, 0, 1208, 567)),
        second.resize((900, 507)),
        second.crop((0, 0, *ROTATED_UPRIGHT_SIZE)).transpose(Image.Transpose.ROTATE_90),
        first.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((800, 450)),
    ]
    paths = []
    for index, photo in enumerate(photos):
        path = folder / f"photo-{index}.{'png' if index % 3 == 0 else 'jpg'}"
        exif = Image.Exif()
        if index == ROTATED:
            exif[0x0112] = 6  # stored turned left: viewers turn it 90 degrees clockwise
        photo.save(path, exif=exif, quality=92)
        paths.append(path)
    return paths


def base64_photos(folder: Path) -> list[str]:
    """The eight photos' files as base64 text."""
    return [base64.b64encode(path.read_bytes()).decode() for path in write_batch_photos(folder)]


def payload(photo: str) -> dict[str, Any]:
    """The v1 request of a base64 photo at `RES`, with the exact depth as .npy."""
    return {"image_base64": photo, "process_res": RES, "outputs": ["depth", "depth_npy"]}


def depth_of(response: dict[str, Any]) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(response["depth_npy"]["base64"])))


def png16_of(response: dict[str, Any]) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(response["image_base64"])))
    return np.asarray(image).astype(np.int64)


def assert_same_answer(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """The same response but for timings and file names; numbers within 1e-5 relative (the
    16-bit PNG within one step)."""
    depth, expected_depth = depth_of(got), depth_of(expected)
    scale = float(np.abs(expected_depth).max())
    np.testing.assert_allclose(depth, expected_depth, rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(png16_of(got) - png16_of(expected)).max() <= 1
    for key in ("min_depth", "max_depth"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5)
    for key in ("intrinsics", "extrinsics"):
        assert (got[key] is None) == (expected[key] is None)
        if got[key] is not None:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5)
    skip = (*VOLATILE, *NUMBERS)
    assert {k: v for k, v in got.items() if k not in skip} == {
        k: v for k, v in expected.items() if k not in skip
    }
