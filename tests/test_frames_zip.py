"""A zip of frames as a sequence (`frames_zip_base64`, `frames_zip_url`): real zips built here
from the repository's photos (small crops), read back in natural name order with folders,
`__MACOSX/` and hidden entries skipped; through the chunked path with the stand-in network;
by URL through the safe download; and hostile zips (bombs, too many entries, no frames,
damage, mixed sizes, two sources) refused with their documented codes, leaving no file; and
`request --frames-zip` through a real self-hosted server with a random da3-small."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import random
import struct
import tracemalloc
import zipfile
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from conftest import TEST_API_KEY, offline_settings
from contract_cases import serve_directory
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.frames_zip import open_frames_zip
from da3_serverless.api.schema import parse_request
from da3_serverless.cli import main
from da3_serverless.inference.cancel import CancelToken
from da3_serverless.sequence.pipeline import run_sequence
from da3_serverless.sequence.source import Frame, FrameSource, open_source
from da3_serverless.service import Service
from paths import IMAGES
from sequence_standin import standin_context

SIZE = (32, 24)
COUNT = 12
FIELDS = {"chunk_size": 4, "overlap": 2, "process_res": 56, "output_metric": False,
          "outputs": ["trajectory", "depth_frames"]}  # fmt: skip


def frame(index: int, size: tuple[int, int] = SIZE) -> Image.Image:
    """Frame `index`: a crop of one of the repository's photos, a different one per index."""
    photos = sorted(IMAGES.glob("*.png"))
    with Image.open(photos[index % len(photos)]) as photo:
        left = 40 * index
        return photo.convert("RGB").crop((left, 0, left + 320, 240)).resize(size)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def frames_zip(count: int = COUNT, extras: bool = True, size=SIZE) -> bytes:
    """`count` frames as clip/frame_<i>.png in shuffled entry order; with `extras`, a folder
    entry, macOS's `__MACOSX/` twins, a `.DS_Store` and a `notes.txt`."""
    entries = [(f"clip/frame_{i}.png", png(frame(i, size))) for i in range(count)]
    if extras:
        entries += [(f"__MACOSX/clip/._frame_{i}.png", b"\x00\x05\x16\x07") for i in range(2)]
        entries += [("clip/.DS_Store", b"\x00" * 8), ("clip/notes.txt", b"shot on a phone")]
    random.Random(0).shuffle(entries)
    return _zip([("clip/", b"")] * extras + entries)  # a name ending in / is a folder


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _settings(tmp_path, **overrides):
    return offline_settings(None, tmp_path / "workspace", **overrides)


def _frames(payload: dict, settings) -> tuple[FrameSource, list[Frame]]:
    """The request's frame source (closed) and every frame it gave."""
    request = parse_request(payload, settings)
    source = open_source(request, settings, CancelToken())
    try:
        return source, list(source.frames)
    finally:
        source.close()


def test_frames_come_in_natural_order_with_index_timestamps(tmp_path):
    settings = _settings(tmp_path)
    source, frames = _frames({"frames_zip_base64": b64(frames_zip())}, settings)
    assert (source.width, source.height, source.planned) == (*SIZE, COUNT)
    assert [f.timestamp for f in frames] == [float(i) for i in range(COUNT)]
    for index, item in enumerate(frames):  # frame_2 before frame_10, PNG is lossless
        np.testing.assert_array_equal(np.asarray(item.image), np.asarray(frame(index)))
    assert len(source.warnings) == 1 and "'clip/notes.txt'" in source.warnings[0]
    payload = {"frames_zip_base64": b64(frames_zip()), "fps": 4, "max_frames": 5}
    _, frames = _frames(payload, settings)
    assert [f.timestamp for f in frames] == [i / 4 for i in range(5)]


def test_a_frames_zip_runs_in_chunks_with_the_stand_in(tmp_path):
    settings = _settings(tmp_path)
    payload = {"frames_zip_base64": b64(frames_zip()), "fps": 2, **FIELDS}
    response = run_sequence(standin_context(settings), parse_request(payload, settings))
    assert response["sequence"]["frames"] == COUNT
    assert response["sequence"]["timestamps"] == [i / 2 for i in range(COUNT)]
    assert (response["width"], response["height"]) == SIZE
    assert any("notes.txt" in warning for warning in response["warnings"])
    depth = base64.b64decode(response["depth_frames"]["base64"])
    with zipfile.ZipFile(io.BytesIO(depth)) as archive:
        assert len([n for n in archive.namelist() if n.endswith(".png")]) == COUNT
    assert not list((settings.workspace_dir / "sequences").iterdir())


@pytest.fixture(scope="module")
def zip_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zips")
    (folder / "frames.zip").write_bytes(frames_zip(6))
    with serve_directory(folder) as url:
        yield url


def test_frames_zip_url_goes_through_the_safe_download(tmp_path, zip_server):
    url = f"{zip_server}/frames.zip"
    refused = _error(_settings(tmp_path), {"frames_zip_url": url})
    assert refused.code == "invalid_input" and refused.message.startswith("frames_zip_url: ")
    small = _error(_settings(tmp_path, allow_private_urls=True, max_video_bytes=500),
                   {"frames_zip_url": url})  # fmt: skip
    assert small.code == "image_too_large" and "frames_zip_url" in small.message
    missing = _error(_settings(tmp_path, allow_private_urls=True),
                     {"frames_zip_url": f"{zip_server}/none.zip"})  # fmt: skip
    assert missing.code == "fetch_failed"
    settings = _settings(tmp_path, allow_private_urls=True)
    payload = {"frames_zip_url": url, **FIELDS}
    response = run_sequence(standin_context(settings), parse_request(payload, settings))
    assert response["sequence"]["timestamps"] == [float(i) for i in range(6)]


def _error(settings, payload: dict) -> ServiceError:
    """The error of a request through the service, which must load no model and leave no file."""
    service = Service(settings)
    with pytest.raises(ServiceError) as caught:
        service.handle({"api_key": TEST_API_KEY, **FIELDS, **payload})
    assert service.model_cache.loaded() == []
    folder = settings.workspace_dir / "sequences"  # made once the request parses
    assert not folder.exists() or not list(folder.iterdir())
    return caught.value


def bomb(expanded: int) -> bytes:
    """One frame entry of `expanded` zero bytes, deflated (about a thousandth of that)."""
    buffer = io.BytesIO()
    archive = zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED)
    with archive, archive.open("frame_0.png", "w", force_zip64=True) as entry:
        for _ in range(expanded >> 20):
            entry.write(bytes(1 << 20))
    return buffer.getvalue()


def lie_about_size(data: bytes, declared: int) -> bytes:
    """The zip with its first entry's uncompressed size in the central directory set to
    `declared` (the entry's data unchanged)."""
    at = data.index(b"PK\x01\x02")
    return data[: at + 24] + struct.pack("<I", declared) + data[at + 28 :]


def _traced(settings, payload: dict) -> tuple[ServiceError, int]:
    tracemalloc.start()
    try:
        error = _error(settings, payload)
        return error, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_zip_bomb_is_refused_with_bounded_memory(tmp_path):
    expanded = 256 << 20
    data = bomb(expanded)
    settings = _settings(tmp_path, max_download_bytes=1 << 20)
    text = b64(data)
    error, peak = _traced(settings, {"frames_zip_base64": text})
    assert error.code == "image_too_large", error
    assert "'frame_0.png' is 268435456 bytes uncompressed" in error.message
    assert peak < expanded // 20, peak  # the bytes in hand and a few copies, never the frame
    small = b64(bomb(8 << 20))
    error = _error(settings, {"frames_zip_base64": small})
    assert error.code == "image_too_large" and "MAX_DOWNLOAD_BYTES" in error.message
    lying = b64(lie_about_size(bomb(8 << 20), 1000))  # declares 1000 bytes, inflates to 8 MiB
    error, peak = _traced(settings, {"frames_zip_base64": lying})
    assert error.code == "invalid_input" and "could not be read" in error.message, error
    assert peak < (8 << 20) // 4, peak


def _zip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED,
         zip64: bool = False) -> bytes:  # fmt: skip
    """The entries zipped by `zipfile`; with `zip64`, with zip64 end records as zipfile writes
    them past 65,535 entries (it is told the limit is 0)."""
    buffer = io.BytesIO()
    limit = 0 if zip64 else zipfile.ZIP_FILECOUNT_LIMIT
    with (
        mock.patch.object(zipfile, "ZIP_FILECOUNT_LIMIT", limit),
        zipfile.ZipFile(buffer, "w", method) as archive,
    ):
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def zip64_decoy(count: int) -> bytes:
    """A central directory of `count` empty entries whose zip64 locator points at a decoy
    zip64 end record (1 entry, 46 bytes) at the start, while the real record, the one just
    before the locator that `zipfile` reads, declares all `count`."""

    def end64(entries: int, size: int) -> bytes:
        return struct.pack(zipfile.structEndArchive64, zipfile.stringEndArchive64, 44, 45,
                           45, 0, 0, entries, entries, size, 56)  # fmt: skip

    entry = struct.pack(zipfile.structCentralDir, zipfile.stringCentralDir, 20, 0, 20,
                        *[0] * 15)  # fmt: skip
    locator = struct.pack(zipfile.structEndArchive64Locator, zipfile.stringEndArchive64Locator,
                          0, 0, 1)  # fmt: skip
    end = struct.pack(zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0, 0xFFFF,
                      0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)  # fmt: skip
    return end64(1, 46) + entry * count + end64(count, 46 * count) + locator + end


def _count_says(data: bytes, entries: int) -> bytes:
    """The zip with its end record claiming `entries` entries."""
    at = data.rindex(b"PK\x05\x06")
    return data[: at + 8] + struct.pack("<HH", entries, entries) + data[at + 12 :]


def test_hostile_zips_get_their_documented_errors(tmp_path):
    settings = _settings(tmp_path, max_video_frames=3)  # at most 70 entries
    many = _zip([(f"f{i}.txt", b"") for i in range(80)])
    good = _zip([(f"frame_{i}.png", png(frame(i))) for i in range(2)])
    damaged = bytearray(good)
    damaged[60:90] = bytes(30)  # inside frame_0.png's deflated data
    cases = [
        (many, "request_too_large", "has 80 entries"),
        (_count_says(many, 1), "request_too_large", "has 80 entries"),
        (_count_says(_zip([(f"f{i}.txt", b"") for i in range(80)], zip64=True), 1),
         "request_too_large", "has 80 entries"),  # the zip64 record's count
        (zip64_decoy(1000), "invalid_input", "not a zip archive"),
        (frames_zip(5, extras=False), "request_too_large", "holds 5 frames"),
        (_zip([("readme.txt", b"hi"), ("__MACOSX/._a.png", b"")]), "invalid_input",
         "no image entries"),
        (b"PK\x03\x04" + bytes(200), "invalid_input", "not a zip archive"),
        (good[: len(good) // 2], "invalid_input", "not a zip archive"),
        (bytes(damaged), "invalid_input", "could not be read"),
        (_zip([("a.png", b"not a png")]), "invalid_input", "'a.png' is not an image"),
        (_zip([("a.png", png(frame(0)))], zipfile.ZIP_BZIP2), "invalid_input",
         "stored or deflate"),
    ]  # fmt: skip
    for data, code, message in cases:
        error = _error(settings, {"frames_zip_base64": b64(data)})
        assert (error.code, message in error.message) == (code, True), error
    error = _error(settings, {"frames_zip_base64": b64(good), "video_base64": b64(good)})
    assert error.code == "invalid_input"
    assert "(got video_base64, frames_zip_base64)" in error.message
    error = _error(settings, {"frames_zip_base64": b64(good), "max_frames": 4})
    assert error.code == "invalid_input" and "max_frames 4" in error.message
    decoy = zip64_decoy(200_000)  # 9.2 MB; zipfile would build 200,000 ZipInfos (~70 MiB)
    error, peak = _traced(settings, {"frames_zip_base64": b64(decoy)})
    assert error.code == "invalid_input" and "not a zip archive" in error.message, error
    assert peak < 4 * len(decoy), peak  # the base64 and the bytes, refused before parsing


def _names(entries: list[str], settings, max_frames: int | None = None) -> tuple[list, list]:
    """(the frames' names in order, the warnings) of a zip of these (empty) entries."""
    opened = open_frames_zip(_zip([(name, b"") for name in entries]), settings, max_frames)
    with contextlib.closing(opened):
        return [entry.filename for entry in opened.frames], opened.warnings


def test_names_are_ordered_and_shown_whatever_their_length(tmp_path):
    settings = _settings(tmp_path)
    normal = ["f10.png", "f2.png", "F3.png", "f02.png", "f1.png", "f0.png"]
    assert _names(normal, settings)[0] == ["f0.png", "f1.png", "f02.png", "f2.png", "F3.png",
                                           "f10.png"]  # fmt: skip
    digits = "1" * 5000 + ".png"  # past Python's 4300-digit limit of int()
    assert _names([digits, "9.png", "0" * 4999 + "2.png"], settings)[0] == [
        "0" * 4999 + "2.png", "9.png", digits]  # fmt: skip
    long_names = [f"{i}" + "n" * 65000 + ".txt" for i in range(6)]
    _, warnings = _names(["frame_1.png", *long_names], settings)
    assert len(warnings) == 1 and len(warnings[0]) < 1000, len(warnings[0])
    assert "'0nnnn" in warnings[0] and "n...'" in warnings[0] and "and 1 more" in warnings[0]
    zipped = _zip([(digits, png(frame(0))), ("9.png", png(frame(1)))])
    _, frames = _frames({"frames_zip_base64": b64(zipped)}, settings)
    np.testing.assert_array_equal(np.asarray(frames[1].image), np.asarray(frame(0)))


def test_a_dot_slash_prefix_is_no_hidden_folder(tmp_path):
    """bsdtar writes `./frames/f1.png`; a part starting with `.` (`.hidden/`, `._f1.png`,
    `..`) is still skipped silently."""
    entries = ["./", "./frames/", "./frames/f10.png", "./frames/f2.png", "./frames/._f2.png",
               "./.hidden/f1.png", "../f1.png", "frames/.x/f1.png", ".//f3.png"]  # fmt: skip
    names, warnings = _names(entries, _settings(tmp_path))
    assert names == [".//f3.png", "./frames/f2.png", "./frames/f10.png"] and warnings == []


def test_max_frames_applies_before_the_frame_limit(tmp_path):
    settings = _settings(tmp_path, max_video_frames=3)
    payload = {"frames_zip_base64": b64(frames_zip(5, extras=False)), "max_frames": 2}
    _, frames = _frames(payload, settings)
    assert [f.timestamp for f in frames] == [0.0, 1.0]
    for index, item in enumerate(frames):
        np.testing.assert_array_equal(np.asarray(item.image), np.asarray(frame(index)))
    error = _error(settings, {"frames_zip_base64": payload["frames_zip_base64"]})
    assert error.code == "request_too_large" and "set max_frames" in error.message


def test_frames_of_two_sizes_are_refused_leaving_no_file(tmp_path):
    settings = _settings(tmp_path)
    entries = [(f"frame_{i}.png", png(frame(i))) for i in range(4)]
    entries.append(("frame_4.png", png(frame(4, (24, 32)))))
    payload = {"frames_zip_base64": b64(_zip(entries)), **FIELDS}
    with pytest.raises(ServiceError, match=r"'frame_4.png' is 24x32 .* first frame is 32x24"):
        run_sequence(standin_context(settings), parse_request(payload, settings))
    assert not list((settings.workspace_dir / "sequences").iterdir())


@pytest.mark.slow
def test_request_frames_zip_through_the_self_hosted_server(small_server, tmp_path, capsys):
    """`request --frames-zip` (Client.frames_zip) with the random da3-small in a real server."""
    path = tmp_path / "frames.zip"
    path.write_bytes(frames_zip(6))
    out = tmp_path / "out"
    argv = ["request", "--frames-zip", str(path), "--endpoint", small_server, "--api-key",
            TEST_API_KEY, "--out", str(out), "--fps", "5", "--chunk-size", "4",
            "--process-res", "56", "--relative"]  # fmt: skip
    assert main(argv) == 0
    assert "frames: 6 frames; wrote 3 file(s)" in capsys.readouterr().out
    with zipfile.ZipFile(out / "frames.trajectory.zip") as archive:
        rows = archive.read("trajectory.tum").decode().splitlines()[1:]
    assert [float(row.split()[0]) for row in rows] == pytest.approx([i / 5 for i in range(6)])
    meta = json.loads((out / "frames.json").read_text())
    assert (meta["width"], meta["height"]) == SIZE and meta["sequence"]["frames"] == 6
    assert any("notes.txt" in warning for warning in meta["warnings"])
    both = ["request", "--frames-zip", str(path), "--video", str(path), "--endpoint", small_server]
    assert main(both) == 2
    assert "--video or --frames-zip (one of them)" in capsys.readouterr().err


def test_frames_zip_fields_are_checked_before_decoding(tmp_path):
    settings = _settings(tmp_path, max_video_bytes=1000)
    error = _error(settings, {"frames_zip_base64": "A" * 3000})
    assert error.code == "request_too_large"
    assert "frames_zip_base64 is 3000 characters" in error.message
    assert "MAX_VIDEO_BYTES" in error.message and "frames_zip_url" in error.message
    error = _error(settings, {"frames_zip_base64": b64(frames_zip(1, extras=False)[:1200])})
    assert error.code == "request_too_large" and "frames_zip is 1200 bytes" in error.message
    error = _error(settings, {"frames_zip_url": "https://example.com/" + "a" * 9000})
    assert error.code == "invalid_input" and "frames_zip_url is 9020 characters" in error.message
    camera = [[30.0, 0.0, 16.0], [0.0, 30.0, 12.0], [0.0, 0.0, 1.0]]
    payload = {"frames_zip_base64": b64(frames_zip(2)), "intrinsics": [camera, camera]}
    error = _error(_settings(tmp_path), payload)
    assert error.code == "invalid_input" and "one 3x3 intrinsics for all frames" in error.message
