"""Output storage: atomic saves, failures as StorageError, pruning that never follows links or
leaves the folder, and uploads to a real S3 API (moto's server on 127.0.0.1)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from da3_serverless.api import storage
from da3_serverless.api.storage import OutputStore, StorageError, parse_bucket_endpoint
from da3_serverless.config import Settings
from servers import free_port, wait_ready

DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> OutputStore:
    return OutputStore(Settings(workspace=tmp_path / "ws", output_retention_days=14))


def test_save_writes_atomically_under_output_images(store: OutputStore, tmp_path: Path) -> None:
    path = store.save(b"\x89PNG data", ".png")
    assert path.parent == tmp_path / "ws" / "output_images" == store.root
    assert path.read_bytes() == b"\x89PNG data"
    assert path.suffix == ".png" and len(path.stem) == 32 and int(path.stem, 16) >= 0
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    other = store.save(b"", ".tar.gz")
    assert other.name.endswith(".tar.gz") and other != path
    assert sorted(p.name for p in store.root.iterdir()) == sorted([path.name, other.name])


@pytest.mark.parametrize("suffix", ["png", "../x.png", ".png/..", "./", ".p ng", ""])
def test_save_refuses_odd_suffixes(store: OutputStore, suffix: str) -> None:
    with pytest.raises(ValueError, match="suffix"):
        store.save(b"x", suffix)


def test_unwritable_folder_raises_storage_error(tmp_path: Path) -> None:
    # Tests run as root, so chmod would not stop writes: make the workspace a regular file.
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    store = OutputStore(Settings(workspace=blocker))
    with pytest.raises(StorageError, match="could not save an output file"):
        store.save(b"data", ".png")


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every temporary file the store makes from now on writes to /dev/full (ENOSPC); returns
    the list of their paths as they are made."""
    made: list[Path] = []

    def full_mkstemp(dir: Path, prefix: str, suffix: str) -> tuple[int, str]:
        path = Path(dir) / f"{prefix}full{suffix}"
        path.touch()
        made.append(path)
        return os.open("/dev/full", os.O_WRONLY), str(path)

    monkeypatch.setattr(tempfile, "mkstemp", full_mkstemp)
    return made


def test_disk_full_leaves_nothing_behind(
    store: OutputStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary file's descriptor is /dev/full, so the real write fails with ENOSPC."""
    made = _full_disk(monkeypatch)
    with pytest.raises(StorageError, match="No space left on device"):
        store.save(b"x" * 100_000, ".png")
    assert made and not made[0].exists()
    assert list(store.root.iterdir()) == []


def _other_filesystem(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Renames from outside `root` fail with EXDEV, as the kernel answers a rename across
    filesystems (the volume on another disk than the sequence's scratch folder)."""
    rename = os.replace

    def replace(source, target) -> None:
        if Path(source).parent != root:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        rename(source, target)

    monkeypatch.setattr(os, "replace", replace)


def test_save_file_moves_it_into_the_folder(store: OutputStore, tmp_path: Path) -> None:
    source = tmp_path / "scratch" / "depth_video.mkv"
    source.parent.mkdir()
    source.write_bytes(b"matroska" * 1000)
    os.chmod(source, 0o600)
    path = store.save_file(source, ".mkv")
    assert path.parent == store.root and path.suffix == ".mkv" and len(path.stem) == 32
    assert path.read_bytes() == b"matroska" * 1000
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert not source.exists()
    assert list(store.root.iterdir()) == [path]


def test_save_file_copies_across_filesystems(
    store: OutputStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across filesystems the file is copied in chunks into a temporary file, renamed, and
    the source removed; the copy is byte-identical, several chunks long."""
    data = os.urandom(2 * storage.COPY_CHUNK + 123)
    source = tmp_path / "frames.zip"
    source.write_bytes(data)
    _other_filesystem(monkeypatch, store.root)
    path = store.save_file(source, ".zip")
    assert path.read_bytes() == data
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert not source.exists()
    assert list(store.root.iterdir()) == [path]


def test_save_file_to_unwritable_folder_keeps_the_source(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    source = tmp_path / "frames.zip"
    source.write_bytes(b"zip")
    store = OutputStore(Settings(workspace=blocker))
    with pytest.raises(StorageError, match="could not save an output file"):
        store.save_file(source, ".zip")
    assert source.read_bytes() == b"zip"


def test_save_file_missing_source_says_the_file_not_the_volume(
    store: OutputStore, tmp_path: Path
) -> None:
    """A source that cannot be read is the service's own file going missing: the message names
    it and does not send the operator to check the volume."""
    with pytest.raises(StorageError) as info:
        store.save_file(tmp_path / "gone.zip", ".zip")
    message = str(info.value)
    assert message.startswith("could not read the output file gone.zip before saving it: No such")
    assert "temporary file this service wrote itself" in message and "volume" not in message
    assert str(tmp_path) not in message  # the full path goes to the log only
    assert not store.root.exists() or list(store.root.iterdir()) == []


def test_save_file_disk_full_leaves_no_partial_copy(
    store: OutputStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy across filesystems onto a full disk (/dev/full) leaves nothing in the folder and
    the source in place."""
    source = tmp_path / "frames.zip"
    source.write_bytes(b"x" * 100_000)
    _other_filesystem(monkeypatch, store.root)
    made = _full_disk(monkeypatch)
    with pytest.raises(StorageError, match="No space left on device"):
        store.save_file(source, ".zip")
    assert made and not made[0].exists()
    assert list(store.root.iterdir()) == []
    assert source.stat().st_size == 100_000


def age(path: Path, days: float, now: float) -> None:
    os.utime(path, (now - days * DAY, now - days * DAY), follow_symlinks=False)


def test_prune_removes_only_old_entries_and_never_follows_links(
    store: OutputStore, tmp_path: Path
) -> None:
    now = time.time()
    old, fresh = store.save(b"old", ".png"), store.save(b"fresh", ".png")
    age(old, 15, now)
    age(fresh, 13, now)
    leftover = store.root / ".tmp-crashed.png"  # from a process killed mid-save
    leftover.write_bytes(b"partial")
    age(leftover, 30, now)

    outside = tmp_path / "precious"
    outside.mkdir()
    target = outside / "keep.png"
    target.write_bytes(b"keep")
    age(target, 100, now)
    old_link = store.root / "old-link.png"
    old_link.symlink_to(target)
    age(old_link, 20, now)  # the link itself is old: it goes, the target stays
    new_link = store.root / "new-link.png"
    new_link.symlink_to(target)  # a new link to an old target: kept
    dir_link = store.root / "dir-link"
    dir_link.symlink_to(outside, target_is_directory=True)
    age(dir_link, 20, now)
    sub = store.root / "sub"
    sub.mkdir()
    nested = sub / "nested.png"
    nested.write_bytes(b"n")
    age(nested, 50, now)
    age(sub, 50, now)

    removed = store.prune(now)

    assert sorted(p.name for p in removed) == sorted(
        [old.name, leftover.name, old_link.name, dir_link.name]
    )
    assert fresh.exists() and new_link.is_symlink()
    assert target.read_bytes() == b"keep" and outside.is_dir()
    assert nested.exists() and sub.is_dir()  # folders are neither entered nor removed
    assert not old.exists() and not os.path.lexists(old_link)


def test_prune_respects_retention_setting(tmp_path: Path) -> None:
    store = OutputStore(Settings(workspace=tmp_path, output_retention_days=0.5))
    now = time.time()
    path = store.save(b"x", ".npy")
    age(path, 0.4, now)
    assert store.prune(now) == []
    assert store.prune(now + 0.2 * DAY) == [path]


def test_prune_without_folder(store: OutputStore) -> None:
    assert not store.root.exists()
    assert store.prune() == []


def test_maybe_prune_runs_at_most_hourly(store: OutputStore) -> None:
    now = time.time()
    first = store.save(b"1", ".png")
    age(first, 20, now)
    assert store.maybe_prune(now) == [first]
    second = store.save(b"2", ".png")
    age(second, 20, now)
    assert store.maybe_prune(now + 3599) == []  # too soon
    assert second.exists()
    assert store.maybe_prune(now + 3601) == [second]
    other = OutputStore(store._settings)  # the interval belongs to the instance
    third = store.save(b"3", ".png")
    age(third, 20, now)
    assert other.maybe_prune(now + 3602) == [third]


def test_discard(store: OutputStore, tmp_path: Path) -> None:
    a, b = store.save(b"a", ".png"), store.save(b"b", ".ply")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"o")
    sneaky = store.root / ".." / "outside.png"
    store.discard([a, str(b), store.root / "missing.png", outside, sneaky])
    assert not a.exists() and not b.exists()
    assert outside.read_bytes() == b"o"


# ---- bucket -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://my-bucket.s3.eu-west-1.amazonaws.com",
            ("https://s3.eu-west-1.amazonaws.com", "my-bucket", False),
        ),
        (
            "https://outputs.nyc3.digitaloceanspaces.com/",
            ("https://nyc3.digitaloceanspaces.com", "outputs", False),
        ),
        ("http://127.0.0.1:9000/da3", ("http://127.0.0.1:9000", "da3", True)),
        (
            "https://acc.r2.cloudflarestorage.com/out/ignored",
            ("https://acc.r2.cloudflarestorage.com", "out", True),
        ),
    ],
)
def test_parse_bucket_endpoint(url: str, expected: tuple) -> None:
    assert parse_bucket_endpoint(url) == expected


@pytest.mark.parametrize("url", ["s3://bucket", "https://localhost", "not a url"])
def test_parse_bucket_endpoint_refuses(url: str) -> None:
    with pytest.raises(StorageError, match="BUCKET_ENDPOINT_URL"):
        parse_bucket_endpoint(url)


def test_region_from_endpoint() -> None:
    assert storage._region("https://s3.eu-west-1.amazonaws.com") == "eu-west-1"
    assert storage._region("https://nyc3.digitaloceanspaces.com") == "nyc3"
    assert storage._region("http://127.0.0.1:9000") == "us-east-1"


def test_upload_without_bucket(store: OutputStore) -> None:
    assert not store.has_bucket
    with pytest.raises(StorageError, match="BUCKET_ENDPOINT_URL"):
        store.upload(b"x", "depth.png", "image/png")


def bucket_settings(endpoint: str, tmp_path: Path, bucket: str, secret: str = "secret") -> Settings:
    return Settings(
        workspace=tmp_path,
        bucket_endpoint_url=f"{endpoint}/{bucket}",
        bucket_access_key_id="testing",
        bucket_secret_access_key=secret,
    )


def test_upload_to_s3(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="secret",
        region_name="us-east-1",
    ).create_bucket(Bucket="da3-outputs")
    store = OutputStore(bucket_settings(s3_endpoint, tmp_path, "da3-outputs"))
    assert store.has_bucket
    url = store.upload(b"\x89PNG depth", "depth.png", "image/png", job_id="job-42")
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert url.startswith(f"{s3_endpoint}/da3-outputs/{day}/job-42/depth.png?")
    assert "X-Amz-Signature=" in url
    response = httpx.get(url)  # the presigned URL works without credentials
    assert response.status_code == 200
    assert response.content == b"\x89PNG depth"
    assert response.headers["content-type"] == "image/png"


def test_upload_a_file_to_s3(s3_endpoint: str, tmp_path: Path) -> None:
    """A file is streamed to the bucket (past storage.UPLOAD_PART: in parts) under the same
    key as bytes would be, listed in `saved`, and read back whole through its URL; the file
    stays where it was. A missing file is a StorageError."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="secret", region_name="us-east-1")  # fmt: skip
    s3.create_bucket(Bucket="da3-outputs")
    store = OutputStore(bucket_settings(s3_endpoint, tmp_path, "da3-outputs"))
    data = os.urandom(storage.UPLOAD_PART + 1024 * 1024)
    source = tmp_path / "depth_video.mkv"
    source.write_bytes(data)
    saved: list = []
    url = store.upload(source, "depth_video.mkv", "video/x-matroska", saved, job_id="job-7")
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert saved == [storage.BucketObject(f"{day}/job-7/depth_video.mkv")]
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == data
    assert response.headers["content-type"] == "video/x-matroska"
    assert source.read_bytes() == data
    with pytest.raises(StorageError) as info:
        store.upload(tmp_path / "gone.mkv", "gone.mkv", "video/x-matroska", saved)
    assert str(info.value).startswith("could not read the output file gone.mkv before uploading")
    assert "BUCKET_ENDPOINT_URL" not in str(info.value)
    assert len(saved) == 1


@pytest.fixture
def s3_process() -> Iterator[str]:
    """A moto S3 server in a process of its own (real HTTP on 127.0.0.1): what it stores is not
    traced by tracemalloc in this one, unlike the threaded `s3_endpoint`'s."""
    pytest.importorskip("moto.server")
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_ready(endpoint, server, None, path="/moto-api/")
        yield endpoint
    finally:
        server.terminate()
        server.wait(30)


def test_uploading_a_file_holds_blocks_not_parts(s3_process: str, tmp_path: Path) -> None:
    """A 48 MiB file goes up in 6 parts of 8 MiB, 4 at a time, and the upload's traced peak
    stays under 2 parts (16 MiB; 5.3 MiB measured): `upload_file` reads each part from disk
    a block at a time as it is hashed and sent. (`upload_fileobj` buffers whole parts: 53 MiB
    traced here; one PUT of bytes would hold the whole file.)"""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_process, aws_access_key_id="testing",
                      aws_secret_access_key="secret", region_name="us-east-1")  # fmt: skip
    s3.create_bucket(Bucket="da3-outputs")
    store = OutputStore(bucket_settings(s3_process, tmp_path, "da3-outputs"))
    store.upload(b"warm", "warm.txt", "text/plain")  # the client is made once per bucket
    source = tmp_path / "depth_frames.zip"
    with open(source, "wb") as out:
        for _ in range(6):
            out.write(os.urandom(storage.UPLOAD_PART))
    tracemalloc.start()
    try:
        url = store.upload(source, "depth_frames.zip", "application/zip", job_id="big")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * storage.UPLOAD_PART, f"traced peak {peak / 2**20:.1f} MiB"
    response = httpx.get(url)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(source.read_bytes()).digest()
    key = url.split("/da3-outputs/", 1)[1].split("?")[0]
    assert s3.head_object(Bucket="da3-outputs", Key=key)["ETag"].endswith('-6"')  # 6 parts


def test_upload_failure_is_a_storage_error_without_secrets(
    s3_endpoint: str, tmp_path: Path
) -> None:
    store = OutputStore(bucket_settings(s3_endpoint, tmp_path, "no-such-bucket", "SEKRIT-123"))
    with pytest.raises(StorageError) as info:
        store.upload(b"x", "depth.png", "image/png")
    assert "no-such-bucket" in str(info.value) and "SEKRIT" not in str(info.value)


def test_upload_to_unreachable_endpoint(tmp_path: Path) -> None:
    store = OutputStore(bucket_settings(f"http://127.0.0.1:{free_port()}", tmp_path, "b"))
    with pytest.raises(
        StorageError, match=r"could not upload an output to bucket 'b' at 127\.0\.0\.1"
    ):
        store.upload(b"x", "depth.png", "image/png")


def test_upload_to_a_jobs_own_bucket_and_discard(s3_endpoint: str, tmp_path: Path) -> None:
    """A job's own bucket (RunPod's s3Config) takes its outputs under `<day>/<job id>/`, with
    no bucket configured; discarding removes them from that bucket."""
    import boto3

    from da3_serverless.api.job import bucket_from_s3_config

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="job-key",
                      aws_secret_access_key="job-secret", region_name="us-east-1")  # fmt: skip
    s3.create_bucket(Bucket="job-bucket")
    config = {"accessId": "job-key", "accessSecret": "job-secret", "bucketName": "job-bucket",
              "endpointUrl": s3_endpoint}  # fmt: skip
    bucket = bucket_from_s3_config(config)
    store = OutputStore(Settings(workspace=tmp_path))
    assert not store.has_bucket
    saved: list = []
    url = store.upload(b"ply", "scene_ply.ply", "model/ply", saved, job_id="j1", bucket=bucket)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="job-bucket")["Contents"]]
    assert keys == [f"{day}/j1/scene_ply.ply"]
    assert httpx.get(url).content == b"ply"
    store.discard(saved)
    assert s3.list_objects_v2(Bucket="job-bucket")["KeyCount"] == 0
    assert "job-secret" not in repr(bucket)


def test_s3_config_refusals() -> None:
    from da3_serverless.api.errors import ServiceError
    from da3_serverless.api.job import bucket_from_s3_config

    assert bucket_from_s3_config(None) is None
    for config in ("x", {"accessId": "a"}, {"accessId": "a", "accessSecret": "s",
                   "bucketName": "b", "endpointUrl": "ftp://h"}):  # fmt: skip
        with pytest.raises(ServiceError) as info:
            bucket_from_s3_config(config)
        assert info.value.code == "invalid_input" and "endpointUrl" in info.value.message
