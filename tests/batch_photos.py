"""Eight different photos for the batching tests, made from tests/data/images: crops, resizes,
a mirror and one stored turned left with an EXIF orientation tag. At `RES` they all become the
same 126 x 70 network input, so they can share one forward."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from paths import IMAGES

RES = 126  # every photo below becomes a 126 x 70 network input (9 x 5 patches)
ROTATED = 6  # the index of the photo stored turned left (EXIF orientation 6)
ROTATED_UPRIGHT_SIZE = (1150, 647)


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
