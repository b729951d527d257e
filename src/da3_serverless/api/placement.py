"""Where each encoded output goes: inline base64, a file on the volume, a bucket URL
(docs/ARCHITECTURE.md §7, decision 3).

Under the response budget (`MAX_RESPONSE_BYTES`; nothing by choice when the request asked for
paths) the depth PNGs go inline first, then the extras in the order requested; a multi-view
response repeats view 0 at the top level, so its payloads count twice, while the scene outputs
(top level only: `scene_ply`, `scene_glb`, `colmap`, `gaussians_ply`) count once. What does
not fit is saved on the volume and uploaded to the bucket when one is configured; the depth PNG
is always saved on the volume too. One rule for every output, of a single request or a
sequence: one that could be stored nowhere (no writable volume, no bucket) goes inline after all
when it fits what remains of the budget, with a warning, else the request fails
(`request_too_large`, naming the settings that give the server somewhere to store it).

An artifact may be a file on disk (a sequence's outputs, whose size grows with its length): it
is sized from the file, read into memory only when it goes inline (so within the response
budget), and otherwise streamed to the bucket and moved onto the volume, never read whole.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.job import JobInfo
from da3_serverless.api.outputs import Artifact
from da3_serverless.api.storage import OutputStore, Saved, StorageError

BUCKET_SETTINGS = "BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY"
BUCKET_HINT = f"; set {BUCKET_SETTINGS} to get URLs to them"
STORED = frozenset(("base64", "path", "url"))  # an entry with none of these: stored nowhere


@dataclass
class Placed:
    """Response fields of the placed outputs: one dict per view, and the top-level-only ones."""

    views: list[dict]
    top: dict = field(default_factory=dict)


def fit_inline(
    artifacts: Sequence[Artifact],
    budget: int,
    repeated_view: int | None = None,
    order: Sequence[str] = (),
) -> set[int]:
    """ids of the artifacts that go inline as base64 within `budget` bytes: the depth maps
    first, then the extras in `order` (the request's outputs; else as given); whatever does not
    fit is stored. `repeated_view`'s artifacts count twice: a multi-view response repeats view 0
    at the top."""
    rank = {name: position for position, name in enumerate(order)}
    inline = set()
    for artifact in sorted(artifacts, key=lambda a: (a.name != "depth", rank.get(a.name, 0))):
        size = inline_size(artifact, repeated_view)
        if size <= budget:
            inline.add(id(artifact))
            budget -= size
    return inline


def inline_size(artifact: Artifact, repeated_view: int | None) -> int:
    """The bytes of base64 `artifact` adds to the response: twice for `repeated_view`'s."""
    size = 4 * ((artifact.size + 2) // 3)
    repeated = artifact.view is not None and artifact.view == repeated_view
    return 2 * size if repeated else size


def place_outputs(
    artifacts: Sequence[Artifact],
    view_count: int,
    store: OutputStore,
    *,
    budget: int,
    paths: bool,
    order: Sequence[str],
    saved: list[Saved],
    warnings: list[str],
    job: JobInfo | None = None,
) -> Placed:
    """Place every artifact (inline within `budget` bytes, MAX_RESPONSE_BYTES, unless `paths`:
    the request asked for paths; volume; bucket: the job's own when it gave one) and return its
    response fields. Files saved on the volume and objects put in the bucket are appended to
    `saved` (the caller removes them if the request fails, here or later); problems are
    appended to `warnings`. Raises `ServiceError` for an output stored nowhere that does not
    fit what remains of `budget` inline."""
    job = job or JobInfo()
    repeated = 0 if view_count > 1 else None
    inline = fit_inline(artifacts, 0 if paths else budget, repeated, order)
    left = budget - sum(inline_size(a, repeated) for a in artifacts if id(a) in inline)
    stored = sorted({a.name for a in artifacts if id(a) not in inline})
    has_bucket = store.has_bucket or job.bucket is not None
    if not paths and stored:
        where = "" if has_bucket else BUCKET_HINT
        warnings.append(
            f"{', '.join(stored)} would pass MAX_RESPONSE_BYTES ({budget} bytes) inline: "
            f"stored and returned as paths/URLs instead of base64{where}"
        )
    placed = Placed([{} for _ in range(view_count)])
    for artifact in artifacts:
        name = object_name(artifact, view_count)
        problems: list[str] = []
        entry = _place(artifact, id(artifact) in inline, store, (saved, problems, job, name))
        warnings += problems
        if not entry.keys() & STORED:
            size = inline_size(artifact, repeated)
            if size > left:
                raise _stored_nowhere(artifact, size, (left, budget), problems, has_bucket)
            entry["base64"] = _base64(artifact)
            left -= size
            warnings.append(f"{artifact.name} could not be stored, so it is inline")
        target = placed.top if artifact.view is None else placed.views[artifact.view]
        target.update(artifact.fields)
        if artifact.name != "depth":
            target[artifact.name] = entry
            continue
        target["image_base64"] = entry.get("base64")
        target["file_path"] = entry.get("path")
        if "url" in entry:
            target["file_url"] = entry["url"]
    return placed


def _stored_nowhere(
    artifact: Artifact,
    size: int,
    budget: tuple[int, int],
    problems: list[str],
    has_bucket: bool,
) -> ServiceError:
    """The error for an output that could be stored nowhere and is too large to go inline:
    what went wrong, and the settings that give the server somewhere to put it."""
    left, total = budget
    why = [*problems, *([] if has_bucket else ["no bucket is configured"])]
    return ServiceError(
        "request_too_large",
        f"{artifact.name} could not be stored ({'; '.join(why)}), and inline its {size} bytes "
        f"of base64 would pass what remains of MAX_RESPONSE_BYTES ({left} of {total} bytes): "
        "the server needs a writable volume (WORKSPACE, whose output_images/ folder holds the "
        f"outputs) or a bucket ({BUCKET_SETTINGS}); or ask for fewer or smaller outputs",
    )


def _base64(artifact: Artifact) -> str:
    """The artifact inline: its bytes (a file's, read whole) as base64 text."""
    return base64.b64encode(artifact.read()).decode("ascii")


def object_name(artifact: Artifact, view_count: int) -> str:
    """The artifact's name in the bucket, under its job's folder: `depth.png`,
    `depth.view1.png` (view 1 of several), `scene_ply.ply`."""
    view = f".view{artifact.view}" if artifact.view is not None and view_count > 1 else ""
    return f"{artifact.name}{view}{artifact.suffix}"


def _place(
    artifact: Artifact,
    inline: bool,
    store: OutputStore,
    context: tuple[list[Saved], list[str], JobInfo, str],
) -> dict:
    """Inline base64 and/or a file on the volume (always for the depth PNG, and for outputs
    that are not inline), or a bucket URL when a bucket is configured or the job gave one.
    `context`: what was saved, the warnings, the job and the artifact's object name."""
    saved, warnings, job, name = context
    entry: dict = {"media_type": artifact.media_type}
    if inline:
        entry["base64"] = _base64(artifact)
    if not inline and (store.has_bucket or job.bucket is not None):
        try:
            entry["url"] = store.upload(
                artifact.data, name, artifact.media_type, saved, job_id=job.id, bucket=job.bucket
            )
        except StorageError as error:
            warnings.append(f"could not upload {artifact.name} to the bucket: {error}")
    if artifact.name == "depth" or not inline:
        try:
            if isinstance(artifact.data, bytes):
                path = store.save(artifact.data, artifact.suffix)
            else:  # moved, after any upload above read it
                path = store.save_file(artifact.data, artifact.suffix)
            saved.append(path)
            entry["path"] = str(path)
        except StorageError as error:
            warnings.append(f"could not save {artifact.name} on the volume: {error}")
    return entry
