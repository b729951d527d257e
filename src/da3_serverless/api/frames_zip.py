"""A sequence's frames from a zip (`frames_zip_url`, `frames_zip_base64`), read in memory.

The archive is hostile input like any image (docs/ARCHITECTURE.md §5, §8): its end record is
read before Python's `zipfile` parses the central directory (at most `max_entries` entries and
`DIRECTORY_BYTES_PER_ENTRY` bytes of directory each, whatever the count claims); the frames
are the entries whose names end like an image (`IMAGE_SUFFIXES`) in natural name order
(`frame_2` before `frame_10`), folders and hidden or system entries (`__MACOSX/`, a path part
starting with `.` other than a lone `./`) skipped, other files skipped with a warning; at most
`max_frames` of them, then at most `MAX_VIDEO_FRAMES`. Nothing is extracted to disk:
each frame is read when the chunks need it, refused by its declared size before a byte is
inflated and read with a bound (a declared size can lie), then opened by `api/images.py` as a
single image is (formats, pixel limits, EXIF orientation).
"""

from __future__ import annotations

import re
import struct
import zipfile
from dataclasses import dataclass, field
from io import BytesIO

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.images import FORMATS_TEXT, OpenedImage, open_image
from da3_serverless.config import Settings

# Names of the formats `api/images.FORMATS` decodes (the bytes decide; the name only selects).
IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".jpe", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic",
    ".heif", ".avif",
)  # fmt: skip
# Files that tools add beside the frames, skipped without a warning.
SYSTEM_NAMES = ("thumbs.db", "desktop.ini")
# Only these are inflated with a bound on the output (bzip2 and LZMA are inflated whole).
METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# The central directory parsed at most: this many bytes per allowed entry (46 fixed bytes, a
# name, macOS's extra fields), so a count that lies cannot make `zipfile` build more entries.
DIRECTORY_BYTES_PER_ENTRY = 512
# Bytes of an entry inflated at a time.
READ_BYTES = 1 << 16
# Entries named in a warning at most, and characters shown of each name in a message.
NAMED = 5
NAME_CHARS = 80
SOURCE = "frames_zip"


@dataclass
class FramesZip:
    """An opened frames zip: `frames` the image entries to use, in natural name order;
    `warnings` what was skipped; `close` frees the archive."""

    archive: zipfile.ZipFile
    frames: list[zipfile.ZipInfo]
    warnings: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.archive.close()


def max_entries(settings: Settings) -> int:
    """Entries of any kind a frames zip may hold: twice `MAX_VIDEO_FRAMES` (room for macOS's
    `__MACOSX/._frame` twin of every frame) and 64 folders."""
    return 2 * settings.max_video_frames + 64


def open_frames_zip(data: bytes, settings: Settings, max_frames: int | None) -> FramesZip:
    """The frames of a zip's bytes (at most `max_frames`, the first in natural order), their
    sizes and compression checked, none read yet. Raises `ServiceError`: `invalid_input` (not
    a zip, no frames, encrypted or bzip2/LZMA entries), `request_too_large` (too many entries
    or frames, or bytes past `MAX_VIDEO_BYTES`), `image_too_large` (a frame declared past
    `MAX_DOWNLOAD_BYTES`)."""
    if len(data) > settings.max_video_bytes:
        raise ServiceError(
            "request_too_large",
            f"{SOURCE} is {len(data)} bytes; this server accepts at most "
            f"{settings.max_video_bytes} (MAX_VIDEO_BYTES): send fewer or smaller frames",
        )
    _check_directory(data, settings)
    try:
        archive = zipfile.ZipFile(BytesIO(data))
    except MemoryError:
        raise
    except Exception:  # zipfile raises BadZipFile, struct.error, ValueError... on hostile bytes
        raise _not_a_zip() from None
    try:
        frames, skipped = _select(archive.infolist(), settings, max_frames)
        for entry in frames:
            _check_entry(entry, settings)
    except BaseException:
        archive.close()
        raise
    warnings = []
    if skipped:
        names = ", ".join(_shown(name) for name in skipped[:NAMED])
        more = f" and {len(skipped) - NAMED} more" if len(skipped) > NAMED else ""
        warnings.append(
            f"{SOURCE}: skipped {len(skipped)} entries that are not images by their name "
            f"({names}{more}); frames are the entries ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    return FramesZip(archive, frames, warnings)


def open_frame(frames: FramesZip, entry: zipfile.ZipInfo, settings: Settings) -> OpenedImage:
    """One frame's bytes, read with a bound, opened (header checked, pixels not decoded)."""
    source = f"{SOURCE} entry {_shown(entry.filename)}"
    limit = settings.max_download_bytes
    try:
        with frames.archive.open(entry) as stream:
            data = _read_bounded(stream, limit + 1)
    except MemoryError:
        raise
    except Exception:  # BadZipFile (a bad CRC, a size that lied), zlib.error, EOFError...
        raise ServiceError(
            "invalid_input",
            f"{source} could not be read (the zip is truncated or damaged): send the "
            "complete, unmodified zip",
        ) from None
    if len(data) > limit:
        raise _entry_too_large(source, settings)
    return open_image(data, settings, source)


def _read_bounded(stream, most: int) -> bytes:
    """At most `most` bytes of an entry, inflated `READ_BYTES` at a time (deflate's output is
    bounded by what is asked; `zipfile` also stops at the declared size)."""
    buffer = BytesIO()
    while buffer.tell() < most:
        piece = stream.read(min(READ_BYTES, most - buffer.tell()))
        if not piece:
            break
        buffer.write(piece)
    return buffer.getvalue()


def natural_key(name: str) -> tuple:
    """Sort key of a name with its runs of ASCII digits as numbers: frame_2 before frame_10.
    A run compares by its length and digits without leading zeros, the order of its value
    without `int()` (which refuses runs past 4300 digits)."""
    parts = re.split(r"([0-9]+)", name)
    key = []
    for i, part in enumerate(parts):
        digits = part.lstrip("0")
        key.append((len(digits), digits) if i % 2 else part.casefold())
    return tuple(key), name


def _shown(name: str) -> str:
    """A name quoted in a message, cut to `NAME_CHARS` characters."""
    return repr(name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "...")


def _hidden(name: str) -> bool:
    """Whether a name is macOS's `__MACOSX/` or has a part starting with `.` (a hidden file
    or folder, or `..`); empty and lone `.` parts (`./frames/f1.png`, as bsdtar writes) are
    not parts."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _select(entries: list[zipfile.ZipInfo], settings: Settings, max_frames: int | None):
    """(the image entries in natural order, the first `max_frames` of them, the names of
    other files skipped)."""
    if len(entries) > max_entries(settings):
        raise _too_many_entries(len(entries), settings)
    frames, skipped = [], []
    for entry in entries:
        if entry.is_dir() or _hidden(entry.filename):
            continue
        parts = entry.filename.replace("\\", "/").split("/")
        if entry.filename.lower().endswith(IMAGE_SUFFIXES):
            frames.append(entry)
        elif parts[-1].lower() not in SYSTEM_NAMES:
            skipped.append(entry.filename)
    if not frames:
        raise ServiceError(
            "invalid_input",
            f"{SOURCE} holds no image entries ({len(entries)} entries in all): put the frames "
            f"in the zip as {FORMATS_TEXT} files named like frame_0001.png",
        )
    frames = sorted(frames, key=lambda entry: natural_key(entry.filename))[:max_frames]
    if len(frames) > settings.max_video_frames:
        raise ServiceError(
            "request_too_large",
            f"{SOURCE} holds {len(frames)} frames; this server takes at most "
            f"{settings.max_video_frames} in a sequence (MAX_VIDEO_FRAMES): set max_frames, "
            "or send fewer frames",
        )
    return frames, skipped


def _check_entry(entry: zipfile.ZipInfo, settings: Settings) -> None:
    """Refuse an entry that is encrypted, compressed other than stored or deflate, or that
    declares more bytes than an image may have, before any of it is read."""
    source = f"{SOURCE} entry {_shown(entry.filename)}"
    if entry.flag_bits & 0x1:
        raise ServiceError(
            "invalid_input", f"{source} is encrypted: zip the frames without a password"
        )
    if entry.compress_type not in METHODS:
        raise ServiceError(
            "invalid_input",
            f"{source} uses compression method {entry.compress_type}; this server reads "
            "stored or deflate entries only: zip the frames with the default (deflate)",
        )
    if entry.file_size > settings.max_download_bytes:
        raise _entry_too_large(source, settings, entry.file_size)


def _check_directory(data: bytes, settings: Settings) -> None:
    """Refuse an archive whose end record declares more entries, or a larger central
    directory, than `max_entries` allows, before `zipfile` parses it."""
    entries, directory_bytes = _end_record(data)
    most = max_entries(settings)
    if entries > most or directory_bytes > most * DIRECTORY_BYTES_PER_ENTRY:
        raise _too_many_entries(entries, settings)


def _end_record(data: bytes) -> tuple[int, int]:
    """(entries, central directory bytes) from the end record `zipfile` reads (zip64's where a
    zip64 locator precedes it). Raises `invalid_input` when there is no end record."""
    size = zipfile.sizeEndCentDir
    at = len(data) - size  # zipfile takes a last record without a comment as it is
    if at < 0 or data[at : at + 4] != zipfile.stringEndArchive or data[-2:] != b"\0\0":
        at = data.rfind(zipfile.stringEndArchive, max(0, len(data) - (1 << 16) - size))
    if at < 0 or at + size > len(data):
        raise _not_a_zip()
    record = struct.unpack(zipfile.structEndArchive, data[at : at + size])
    locator_at = at - zipfile.sizeEndCentDir64Locator
    if locator_at < 0 or data[locator_at : locator_at + 4] != zipfile.stringEndArchive64Locator:
        return record[4], record[5]
    return _zip64_record(data, locator_at)


def _zip64_record(data: bytes, locator_at: int) -> tuple[int, int]:
    """(entries, central directory bytes) of the zip64 end record just before the locator,
    where `zipfile` reads it; refused (`invalid_input`) unless the locator points there too,
    so no decoy record elsewhere can pass this check while zipfile reads another."""
    locator = struct.unpack(
        zipfile.structEndArchive64Locator,
        data[locator_at : locator_at + zipfile.sizeEndCentDir64Locator],
    )
    record_at = locator_at - zipfile.sizeEndCentDir64
    end64 = data[max(0, record_at) : locator_at]
    if record_at < 0 or locator[2] != record_at or end64[:4] != zipfile.stringEndArchive64:
        raise _not_a_zip()
    record64 = struct.unpack(zipfile.structEndArchive64, end64)
    return record64[7], record64[8]


def _not_a_zip() -> ServiceError:
    return ServiceError(
        "invalid_input",
        f"{SOURCE} is not a zip archive this server can read (truncated or damaged?): send "
        "the frames as a complete .zip file",
    )


def _too_many_entries(entries: int, settings: Settings) -> ServiceError:
    return ServiceError(
        "request_too_large",
        f"{SOURCE} has {entries} entries (or a central directory that large); this server "
        f"reads at most {max_entries(settings)} (twice MAX_VIDEO_FRAMES, plus folders): zip "
        "only the frames",
    )


def _entry_too_large(source: str, settings: Settings, size: int | None = None) -> ServiceError:
    limit = settings.max_download_bytes
    what = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return ServiceError(
        "image_too_large",
        f"{source} is {what} uncompressed; this server accepts images of at most {limit} "
        f"bytes (MAX_DOWNLOAD_BYTES): save the frame smaller (PNG or JPEG at most "
        f"{settings.max_image_side} px)",
    )
