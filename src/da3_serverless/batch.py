"""Datasets through an endpoint: many requests fanned out over one `Client` (`Client.map` and
`da3-serverless batch`).

A source is a folder of photos (each its own request), a folder of scene folders (each one
multi-view request), both, or a JSONL manifest (one request per line). `run_batch` sends the
items with at most `concurrency` requests in flight (worker threads sharing the client's
connection pool; the client polls `IN_QUEUE`/`IN_PROGRESS` jobs), retries an item with
backoff and jitter when the endpoint is busy or failing for now (429, 5xx, `overloaded`,
`out_of_memory`, a lost connection), and writes each finished item's files whole: into
`OUT/.<name>.partial/`, then renamed to `OUT/<name>/`. That folder is the record of success: a
rerun (after Ctrl-C, a kill or a crash) sends only the items without one. Every finished
item, failed ones with their error code included, is also appended as one JSON line (a single
`write`, fsynced) to `OUT/batch-record.jsonl`.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from da3_serverless.client import TRANSIENT_CODES, DA3Error, image_fields, parse_response

if TYPE_CHECKING:
    from da3_serverless.client import Client

RECORD_NAME = "batch-record.jsonl"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
# A scene item also asks for the scene files, as `da3-serverless request --scene` does.
SCENE_OUTPUTS = ("scene_ply", "scene_glb", "colmap")
# Failures that waiting will not mend: a job that ran out of time would run out again (and
# may still be running), a cancelled one was meant to stop, a missing model stays missing.
FINAL_CODES = ("timeout", "cancelled", "model_unavailable")
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch: `name` (its output folder), `images` (paths or http(s) URLs;
    several are views of one scene) and `fields` (request fields of this item alone, over the
    batch's options; a manifest line may also carry its images here, as `image_base64`,
    `image_url` or `images`)."""

    name: str
    images: tuple[str, ...] = ()
    fields: dict[str, Any] = field(default_factory=dict)

    def payload(self, options: dict[str, Any]) -> dict[str, Any]:
        """The v1 request object: the batch's options, this item's fields, its images."""
        fields = {**options, **self.fields}
        if len(self.images) == 1:
            source = image_fields(self.images[0])
            fields["image_url" if "url" in source else "image_base64"] = next(iter(source.values()))
        elif self.images:
            fields["images"] = [image_fields(image) for image in self.images]
            if "outputs" not in self.fields:
                outputs = fields.get("outputs") or ["depth", "preview"]
                fields["outputs"] = list(dict.fromkeys([*outputs, *SCENE_OUTPUTS]))
        return fields


@dataclass
class Outcome:
    """How one item ended: done (`code` None), failed (`code`, `status`, `message`), or left
    for the next run (`stopped`: the batch was stopped while it waited to retry)."""

    name: str
    attempts: int
    seconds: float
    code: str | None = None
    status: int | None = None
    message: str = ""
    stopped: bool = False
    left_on_server: list[str] = field(default_factory=list)

    def entry(self) -> dict[str, Any]:
        """Its line in the record."""
        entry: dict[str, Any] = {
            "name": self.name,
            "ok": self.code is None,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 3),
        }
        if self.code is not None:
            entry.update(code=self.code, status=self.status, message=self.message)
        if self.left_on_server:
            entry["left_on_server"] = self.left_on_server
        return entry


@dataclass
class BatchReport:
    """What a run did: `total` items in the source, `skipped` (done by an earlier run),
    `done` and `failures` (this run), `left` (not sent: the run was stopped)."""

    total: int
    skipped: int
    done: list[str] = field(default_factory=list)
    failures: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def left(self) -> int:
        return self.total - self.skipped - len(self.done) - len(self.failures)

    def summary(self) -> str:
        """Counts, then one line per failure with its error code, then the codes tallied."""
        lines = [
            f"{self.total} item(s): {self.skipped} done before, {len(self.done)} done now, "
            f"{len(self.failures)} failed, {self.left} left, in {self.seconds:.1f} s"
        ]
        for failure in sorted(self.failures, key=lambda f: f.name):
            lines.append(
                f"  failed {failure.name}: {failure.code} ({failure.status}) "
                f"{failure.message} [{failure.attempts} attempt(s)]"
            )
        if self.failures:
            codes = Counter(failure.code for failure in self.failures)
            lines.append(
                "failures by code: " + ", ".join(f"{c} x{n}" for c, n in codes.most_common())
            )
        if self.left:
            lines.append(f"{self.left} item(s) not sent: run the same command again to send them")
        return "\n".join(lines)


def items_from(source: str | Path | Iterable[BatchItem]) -> list[BatchItem]:
    """The items of a source: a folder (photos and scene folders), a .jsonl manifest, or
    BatchItems as they are. ValueError for a video (one job, not a batch) or an empty source."""
    if not isinstance(source, (str, Path)):
        return list(source)
    path = Path(source)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        raise ValueError(
            f"{path} is a video: a video is one job, not a batch; SOURCE is a "
            "folder of photos, a folder of scene folders or a .jsonl manifest"
        )
    if path.is_dir():
        return folder_items(path)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson"):
        return manifest_items(path)
    raise ValueError(f"{path} is not a folder or a .jsonl manifest")


def folder_items(folder: Path) -> list[BatchItem]:
    """Each photo in `folder` its own item (named by its file stem), each subfolder holding
    photos one multi-view item (named by the folder; its photos in name order)."""
    items = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in PHOTO_SUFFIXES:
            items.append(BatchItem(entry.stem, (str(entry),)))
        elif entry.is_dir() and (views := _photos(entry)):
            items.append(BatchItem(entry.name, tuple(str(view) for view in views)))
    if not items:
        raise ValueError(
            f"{folder} holds no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) and no folders of them"
        )
    check_names(items)
    return items


def _photos(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith(".")
    )


def manifest_items(path: Path) -> list[BatchItem]:
    """One item per non-blank line: a JSON object of request fields, plus `name` (default: the
    image's file stem, else `line-<n>`) and `image` (a path, relative to the manifest's
    folder, or an http(s) URL) or `images` (a list of them: views of one scene). Fields already
    in the wire form (`image_base64`, `image_url`, `images` of objects) go as given."""
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{path}:{number}: a line is a JSON object of request fields")
        images = fields.pop("image", None)
        images = [images] if isinstance(images, str) else images
        if isinstance(fields.get("images"), list) and all(
            isinstance(i, str) for i in fields["images"]
        ):
            images = fields.pop("images")
        images = [_resolve(image, path.parent) for image in images or []]
        default = Path(images[0]).stem if len(images) == 1 and "://" not in images[0] else None
        name = fields.pop("name", None) or default or f"line-{number}"
        items.append(BatchItem(str(name), tuple(images), fields))
    if not items:
        raise ValueError(f"{path} holds no requests (one JSON object per line)")
    check_names(items)
    return items


def _resolve(image: str, base: Path) -> str:
    if image.startswith(("http://", "https://")):
        return image
    return str(base / image)


def check_names(items: list[BatchItem]) -> None:
    """Every name a plain folder name, each once. ValueError naming the offenders."""
    seen: Counter[str] = Counter(item.name for item in items)
    twice = sorted(name for name, count in seen.items() if count > 1)
    if twice:
        raise ValueError(
            f"names given to more than one item (each is a folder): {twice[:10]}; "
            "rename the files or give each manifest line its own `name`"
        )
    bad = [name for name in seen if not _plain_name(name)]
    if bad:
        raise ValueError(
            f"names that cannot be a folder name: {bad[:10]}; use names without "
            "'/', '\\' or a leading '.', at most 200 characters"
        )


def _plain_name(name: str) -> bool:
    return (
        0 < len(name) <= 200
        and not name.startswith(".")
        and name != RECORD_NAME
        and not any(c in name for c in "/\\\0")
    )


def retryable(error: DA3Error) -> bool:
    """Worth sending again after a pause: the endpoint is busy or failing for now."""
    if error.code in FINAL_CODES:
        return False
    if error.code in (*TRANSIENT_CODES, "connection_failed"):
        return True
    return error.status is not None and (error.status == 429 or 500 <= error.status <= 599)


def backoff_s(attempt: int, base_s: float) -> float:
    """Exponential backoff with jitter (half to all of `base_s * 2**attempt`, at most 60 s),
    so the many workers of a batch do not retry in step."""
    return min(base_s * 2**attempt, MAX_BACKOFF_S) * random.uniform(0.5, 1.0)


def read_record(out: Path) -> list[dict[str, Any]]:
    """The record's entries, oldest first (a line cut short by a crash is skipped)."""
    path = Path(out) / RECORD_NAME
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


@dataclass
class _Run:
    """What the workers of one run share."""

    client: Client
    out: Path
    options: dict[str, Any]
    retries: int
    backoff_base_s: float
    stop: threading.Event
    pending: queue.Queue = field(default_factory=queue.Queue)
    results: queue.Queue = field(default_factory=queue.Queue)


def run_batch(
    client: Client,
    source: str | Path | Iterable[BatchItem],
    out: str | Path,
    *,
    options: dict[str, Any] | None = None,
    concurrency: int = 4,
    retries: int = 3,
    backoff_base_s: float = 1.0,
    progress: bool = False,
    stop: threading.Event | None = None,
) -> BatchReport:
    """Send every item of `source` not yet done in `out` and write its files to
    `out/<name>/` (`DepthResult.save_all` with the name as stem). `options` are request fields
    for every item. Setting `stop` (or a first Ctrl-C) sends nothing more and waits for the
    requests in flight (a second Ctrl-C leaves them). Returns the report; raises ValueError for
    a bad source before sending anything."""
    if concurrency < 1:
        raise ValueError("concurrency is at least 1")
    items = items_from(source)
    check_names(items)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.partial"):  # a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    todo = [item for item in items if not (out / item.name).is_dir()]
    report = BatchReport(total=len(items), skipped=len(items) - len(todo))
    run = _Run(client, out, dict(options or {}), retries, backoff_base_s, stop or threading.Event())
    for item in todo:
        run.pending.put(item)
    workers = [
        threading.Thread(target=_worker, args=(run,), daemon=True, name=f"batch-{i}")
        for i in range(min(concurrency, len(todo)))
    ]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    with tqdm(
        total=len(items),
        initial=report.skipped,
        unit="item",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    ) as bar:
        _collect(run, len(workers), report, bar)
    report.seconds = time.monotonic() - started
    return report


def _collect(run: _Run, workers: int, report: BatchReport, bar: tqdm) -> None:
    """Record each outcome as it arrives until every worker has ended. A first Ctrl-C sets
    `stop` and keeps waiting for the requests in flight; a second one is raised."""
    descriptor = os.open(run.out / RECORD_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while workers:
            try:
                try:
                    outcome = run.results.get(timeout=0.5)
                except queue.Empty:
                    continue
                if outcome is None:
                    workers -= 1
                    continue
                if outcome.stopped:
                    continue
                os.write(descriptor, (json.dumps(outcome.entry()) + "\n").encode())
                os.fsync(descriptor)
                if outcome.code is None:
                    report.done.append(outcome.name)
                else:
                    report.failures.append(outcome)
                    _say(bar, f"failed {outcome.name}: {outcome.code} ({outcome.status})")
                bar.set_postfix(failed=len(report.failures), refresh=False)
                bar.update()
            except KeyboardInterrupt:
                if run.stop.is_set():
                    raise
                run.stop.set()
                _say(
                    bar,
                    "stopping: waiting for the requests in flight (Ctrl-C again to quit "
                    "now); a rerun sends what is left",
                )
    finally:
        os.close(descriptor)


def _say(bar: tqdm, text: str) -> None:
    """A line above the progress bar, on stderr; nothing when the bar is off (the library)."""
    if not bar.disable:
        tqdm.write(text, file=sys.stderr)


def _worker(run: _Run) -> None:
    """Take items until none are left or the run is stopped; report each outcome, then None."""
    try:
        while not run.stop.is_set():
            try:
                item = run.pending.get_nowait()
            except queue.Empty:
                return
            run.results.put(_process(run, item))
    finally:
        run.results.put(None)


def _process(run: _Run, item: BatchItem) -> Outcome:
    """Send one item (retrying while the failure is transient) and write its files."""
    started = time.monotonic()
    for attempt in range(1, run.retries + 2):
        try:
            response = run.client.run(item.payload(run.options))
            result = parse_response(response)
            missing = run.client.download_outputs(result)
            _save(result, run.out, item.name)
            return Outcome(item.name, attempt, time.monotonic() - started, left_on_server=missing)
        except DA3Error as error:
            failure = Outcome(
                item.name,
                attempt,
                time.monotonic() - started,
                error.code,
                error.status,
                error.message,
            )
            if not retryable(error) or attempt > run.retries:
                return failure
        except OSError as error:  # an unreadable photo, a full disk
            return Outcome(
                item.name, attempt, time.monotonic() - started, "local_io_error", None, str(error)
            )
        except Exception as error:  # never let one item end the worker (and hang the run)
            return Outcome(
                item.name,
                attempt,
                time.monotonic() - started,
                "client_error",
                None,
                repr(error)[:500],
            )
        if run.stop.wait(backoff_s(attempt - 1, run.backoff_base_s)):
            return Outcome(item.name, attempt, time.monotonic() - started, stopped=True)
    raise AssertionError("unreachable")


def _save(result: Any, out: Path, name: str) -> None:
    """The item's files, written whole: a hidden partial folder renamed to `out/<name>`."""
    partial = out / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    result.save_all(partial, stem=name)
    os.replace(partial, out / name)
