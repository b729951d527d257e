"""Where outputs go besides the response: files under the workspace's `output_images/` and,
when configured, an S3-compatible bucket (docs/ARCHITECTURE.md §4, §5).

Failures raise `StorageError`; the service reports them as warnings in a response that still
comes back. Files are only ever written, removed or pruned directly inside `output_images/`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from da3_serverless.config import Settings

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0
PRESIGNED_URL_TTL_S = 7 * 24 * 3600  # the longest S3 allows, as RunPod's own upload helper uses
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}(\.[A-Za-z0-9]{1,16})?")
_OBJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
COPY_CHUNK = 1 << 20  # bytes read at a time when a file is copied
# A file past UPLOAD_PART bytes goes up in parts of that size, UPLOAD_THREADS at a time. boto3's
# `upload_file` reads each part from the file as it is sent (never a whole part in memory);
# `upload_fileobj` would buffer up to 10 parts plus those in flight, so it is not used.
UPLOAD_PART = 8 * 1024 * 1024
UPLOAD_THREADS = 4


class StorageError(Exception):
    """Saving or uploading an output failed; the message says where and why (never a secret)."""


@dataclass(frozen=True)
class Bucket:
    """An S3-compatible bucket: the endpoint, the bucket's name and credentials. `path_style`:
    `https://host/<bucket>/<key>` addressing (None: boto3 chooses)."""

    endpoint: str
    name: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    path_style: bool | None = None


@dataclass(frozen=True)
class BucketObject:
    """An output this store put in a bucket, by its key (what `discard` removes); `bucket`:
    the job's own bucket (RunPod's s3Config), None for the configured one."""

    key: str
    bucket: Bucket | None = None


Saved = Path | BucketObject  # what a request saved: a file on the volume or a bucket object


def _check_suffix(suffix: str) -> None:
    if not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"suffix must look like '.png' or '.tar.gz', got {suffix!r}")


def _unreadable(source: Path, exc: OSError, doing: str = "saving") -> StorageError:
    """The error for an output file that cannot be read while `doing` ("saving" it on the
    volume, "uploading" it): the service's own temporary file (not the request's, nor the
    volume's or the bucket's fault); its full path goes to the log."""
    log.warning("could not read the output file %s: %s", source, exc)
    return StorageError(
        f"could not read the output file {source.name} before {doing} it: "
        f"{exc.strerror or type(exc).__name__} (a temporary file this service wrote itself, "
        "not part of the request; the server log has its path)"
    )


def _chunks(source: Path) -> Iterator[bytes]:
    """`source`'s content, COPY_CHUNK bytes at a time; failing to read it is `_unreadable`."""
    try:
        with open(source, "rb") as data:
            while chunk := data.read(COPY_CHUNK):
                yield chunk
    except OSError as exc:
        raise _unreadable(source, exc) from None


def _copy(source: Path, out: BinaryIO) -> None:
    for chunk in _chunks(source):
        out.write(chunk)  # a failure here is an OSError: the volume's


class OutputStore:
    """Output files of requests: `save` (bytes), `save_file` (a file moved in) and `discard` in
    `settings.output_dir`, `prune` of old ones, optional `upload` (bytes or a file) to the
    bucket of `settings.bucket_endpoint_url`."""

    def __init__(self, settings: Settings):
        self.root = settings.output_dir
        self.retention_s = settings.output_retention_days * 86400.0
        self._settings = settings
        self._last_prune: float | None = None
        self._prune_lock = threading.Lock()
        self._s3: dict[Bucket, Any] = {}
        self._s3_lock = threading.Lock()

    # ---- local files -------------------------------------------------------------------------

    def save(self, data: bytes, suffix: str) -> Path:
        """Write `data` to `<root>/<uuid4 hex><suffix>` atomically (a temporary file in the same
        folder, fsync, rename) and return the path. Raises `StorageError` (read-only or missing
        volume, disk full, ...), leaving no partial file behind."""
        return self._write(suffix, lambda out: out.write(data))

    def save_file(self, source: Path, suffix: str) -> Path:
        """Move the file `source` to `<root>/<uuid4 hex><suffix>` and return the new path,
        without reading it into memory: a rename when it is on the volume's filesystem (after
        an fsync), else a copy in chunks as `save` writes (temporary file, fsync, rename), then
        the source is removed. Raises `StorageError`, leaving no partial file behind and the
        source where it was."""
        final = self._new_path(suffix)
        try:
            with open(source, "rb") as data:
                os.fsync(data.fileno())
            os.chmod(source, 0o644)
        except OSError as exc:
            raise _unreadable(source, exc) from None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.replace(source, final)
            return final
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise self._error(exc) from None
        final = self._write(suffix, lambda out: _copy(source, out))
        with contextlib.suppress(OSError):
            os.unlink(source)
        return final

    def _write(self, suffix: str, write: Callable[[BinaryIO], object]) -> Path:
        """`write` into a temporary file in the root, fsync, then rename it to `<root>/<uuid4
        hex><suffix>`: the one way `save` and `save_file` write. Raises `StorageError`."""
        final = self._new_path(suffix)
        tmp: str | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=suffix)
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be read by others
            os.replace(tmp, final)
            tmp = None
        except OSError as exc:
            raise self._error(exc) from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return final

    def _new_path(self, suffix: str) -> Path:
        _check_suffix(suffix)
        return self.root / f"{uuid.uuid4().hex}{suffix}"

    def _error(self, exc: OSError) -> StorageError:
        return StorageError(
            f"could not save an output file in {self.root}: {exc.strerror or exc} "
            "(check that the volume is mounted, writable and not full)"
        )

    def _inside(self, path: Path) -> bool:
        """True when `path` names an entry directly inside the root (the entry itself may be a
        link: its target is not looked at)."""
        try:
            return path.parent.resolve() == self.root.resolve() and path.name not in ("", ".", "..")
        except OSError:
            return False

    def discard(self, saved: Iterable[Path | str | BucketObject]) -> None:
        """Remove what a failed request saved: its files (paths outside the root and missing
        files are ignored) and its bucket objects (failures are logged, never raised)."""
        for item in saved:
            if isinstance(item, BucketObject):
                self._delete_object(item)
                continue
            path = Path(item)
            if self._inside(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def prune(self, now: float | None = None) -> list[Path]:
        """Remove entries directly in the root whose own modification time (lstat) is older than
        `settings.output_retention_days`, and return them. Regular files and symbolic links
        are removed (a link, never its target); folders are neither entered nor removed.
        Entries that vanish or cannot be removed are skipped."""
        cutoff = (time.time() if now is None else now) - self.retention_s
        removed: list[Path] = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return removed
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
                if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                    continue
                if info.st_mtime < cutoff:
                    os.unlink(entry.path)  # unlink never follows a link
                    removed.append(Path(entry.path))
            except OSError:
                continue
        return removed

    def maybe_prune(self, now: float | None = None) -> list[Path]:
        """`prune` at most once per hour for this store (and never twice at the same time)."""
        now = time.time() if now is None else now
        if not self._prune_lock.acquire(blocking=False):
            return []
        try:
            if self._last_prune is not None and now - self._last_prune < PRUNE_INTERVAL_S:
                return []
            self._last_prune = now
            return self.prune(now)
        finally:
            self._prune_lock.release()

    # ---- bucket ------------------------------------------------------------------------------

    @property
    def has_bucket(self) -> bool:
        """True when BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY are
        all set."""
        s = self._settings
        return bool(s.bucket_endpoint_url and s.bucket_access_key_id and s.bucket_secret_access_key)

    def upload(
        self,
        data: bytes | Path,
        name: str,
        media_type: str,
        saved: list | None = None,
        *,
        job_id: str | None = None,
        bucket: Bucket | None = None,
    ) -> str:
        """Put `data` (bytes, or a file streamed from disk) in the bucket as
        `<YYYY-MM-DD>/<job_id>/<name>` (a fresh id when there is no job; the date first, for
        lifecycle rules) and return a presigned GET URL valid for 7 days; the object is
        appended to `saved` (as a `BucketObject`) once it is in the bucket. Bytes go in one
        PUT; a file past UPLOAD_PART bytes in parts, read from disk as they are sent.
        `bucket`: the job's own (RunPod's s3Config) instead of the configured one. Raises
        `StorageError` (a file that cannot be read says so, not the bucket)."""
        if not _OBJECT_NAME.fullmatch(name):
            raise ValueError(f"an object name is letters, digits, '_', '.', '-': got {name!r}")
        if bucket is None and not self.has_bucket:
            raise StorageError(
                "no bucket configured: set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and "
                "BUCKET_SECRET_ACCESS_KEY to upload outputs"
            )
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        folder = job_id if job_id and _OBJECT_NAME.fullmatch(job_id) else uuid.uuid4().hex
        key = f"{time.strftime('%Y-%m-%d', time.gmtime())}/{folder}/{name}"
        where = "?"
        try:
            target = bucket or self._configured_bucket()  # a malformed endpoint fails here
            where = target.name
            client = self._client(target)
            _put(client, data, target.name, key, media_type)
            if saved is not None:
                saved.append(BucketObject(key, bucket))
            return client.generate_presigned_url(
                "get_object", Params={"Bucket": target.name, "Key": key},
                ExpiresIn=PRESIGNED_URL_TTL_S,
            )  # fmt: skip
        except (BotoCoreError, ClientError, S3UploadFailedError, ValueError, OSError) as exc:
            # Some of botocore's network errors are OSErrors too; any other is the file's.
            local = isinstance(exc, OSError) and not isinstance(exc, BotoCoreError)
            if local and isinstance(data, Path):
                raise _unreadable(data, exc, "uploading") from None
            endpoint = bucket.endpoint if bucket else self._settings.bucket_endpoint_url
            host = urlsplit(endpoint or "").hostname
            setting = "the job's s3Config" if bucket else "BUCKET_ENDPOINT_URL"
            raise StorageError(
                f"could not upload an output to bucket {where!r} at {host}: "
                f"{type(exc).__name__} (check {setting} and the bucket's credentials)"
            ) from None

    def _delete_object(self, item: BucketObject) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            target = item.bucket or self._configured_bucket()
            self._client(target).delete_object(Bucket=target.name, Key=item.key)
        except (BotoCoreError, ClientError, ValueError, StorageError) as exc:
            log.warning("could not remove bucket object %s: %s", item.key, type(exc).__name__)

    def _configured_bucket(self) -> Bucket:
        """The bucket of BUCKET_ENDPOINT_URL and its credentials."""
        settings = self._settings
        endpoint, name, path_style = parse_bucket_endpoint(settings.bucket_endpoint_url or "")
        return Bucket(
            endpoint, name, settings.bucket_access_key_id or "",
            settings.bucket_secret_access_key or "", path_style,
        )  # fmt: skip

    def _client(self, bucket: Bucket) -> Any:
        """An S3 client for `bucket`'s endpoint and credentials, made once per bucket (the last
        few are kept; boto3 is imported only when uploads are used)."""
        with self._s3_lock:
            client = self._s3.pop(bucket, None) or _s3_client(bucket)
            self._s3[bucket] = client  # most recently used last
            while len(self._s3) > 8:
                self._s3.pop(next(iter(self._s3)))
        return client


def _put(client: Any, data: bytes | Path, bucket: str, key: str, media_type: str) -> None:
    """Bytes in one PUT (a depth PNG starts no thread pool); a file through `upload_file`."""
    if isinstance(data, bytes):
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=media_type)
        return
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=UPLOAD_PART, multipart_chunksize=UPLOAD_PART,
        max_concurrency=UPLOAD_THREADS,
    )  # fmt: skip
    client.upload_file(str(data), bucket, key, ExtraArgs={"ContentType": media_type}, Config=config)


def _s3_client(bucket: Bucket) -> Any:
    import boto3
    from botocore.config import Config

    addressing = {True: "path", False: "virtual", None: "auto"}[bucket.path_style]
    return boto3.session.Session().client(
        "s3",
        endpoint_url=bucket.endpoint,
        aws_access_key_id=bucket.access_key_id,
        aws_secret_access_key=bucket.secret_access_key,
        region_name=_region(bucket.endpoint),
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        ),
    )


def parse_bucket_endpoint(url: str) -> tuple[str, str, bool]:
    """Split BUCKET_ENDPOINT_URL into (S3 endpoint, bucket, path_style).

    Two forms name the bucket: virtual-hosted, RunPod's documented form,
    `https://<bucket>.s3.<region>.amazonaws.com` (the bucket is the first host label; also
    DigitalOcean-style `https://<bucket>.<region>.digitaloceanspaces.com`), and path style,
    `https://<host>[:port]/<bucket>` (MinIO, Cloudflare R2, a local test server).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError("BUCKET_ENDPOINT_URL must be an http(s) URL naming the bucket")
    segments = [s for s in parts.path.split("/") if s]
    if segments:
        return f"{parts.scheme}://{parts.netloc}", segments[0], True
    bucket, dot, rest = parts.netloc.partition(".")
    if not dot or "." not in rest:
        raise StorageError(
            "BUCKET_ENDPOINT_URL must name the bucket: https://<bucket>.s3.<region>.amazonaws.com "
            "or https://<host>/<bucket>"
        )
    return f"{parts.scheme}://{rest}", bucket, False


def _region(endpoint: str) -> str:
    """The region in an AWS (`s3.<region>.amazonaws.com`) or DigitalOcean
    (`<region>.digitaloceanspaces.com`) endpoint; us-east-1 (the S3 default) otherwise."""
    host = urlsplit(endpoint).hostname or ""
    match = re.match(r"s3[.-]([a-z0-9-]+)\.amazonaws\.com$", host) or re.match(
        r"([a-z0-9-]+)\.digitaloceanspaces\.com$", host
    )
    return match.group(1) if match else "us-east-1"
