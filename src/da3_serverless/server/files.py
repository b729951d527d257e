"""`GET /files/{name}`: a stored output, by the signed link a response gave (`api/links.py`),
and `deliver`, which adds those links to a finished job's output. Only regular files directly
in the service's `output_images/` are served; a link's name cannot leave that folder."""

from __future__ import annotations

import mimetypes
import os
import stat
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.links import ROUTE, add_links
from da3_serverless.api.placement import BUCKET_HINT
from da3_serverless.server.docs import ERRORS
from da3_serverless.server.state import AppState

# Suffixes mimetypes may not know, as the outputs' media types name them.
MEDIA_TYPES = {".npy": "application/octet-stream", ".exr": "image/x-exr",
               ".glb": "model/gltf-binary", ".ply": "application/octet-stream"}  # fmt: skip


def deliver(state: AppState, base_url: str, output: dict[str, Any]) -> dict[str, Any]:
    """`output` with a signed download link for every output it stored on the volume (its
    warnings then point to those links rather than to a bucket)."""
    base = state.settings.public_url or base_url
    base = base if base.endswith("/") else f"{base}/"
    hint = "; each has a download link (url) from this server"
    if "warnings" in output:  # an answer without the field stays without it
        output["warnings"] = [w.replace(BUCKET_HINT, hint) for w in output["warnings"]]
    return add_links(output, state.links, base, state.service.settings.output_dir)


def add_file_routes(app: FastAPI, state: AppState) -> None:
    @app.get(
        f"/{ROUTE}/{{name}}",
        summary="A stored output, by the signed link a response gave (valid while it is kept)",
        responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
    )
    async def stored_file(
        name: str,
        expires: str | None = Query(None, description="from the link"),
        signature: str | None = Query(None, description="from the link"),
    ) -> FileResponse:
        state.links.check(name, expires, signature)
        path = state.service.settings.output_dir / name
        try:
            info = os.lstat(path)
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            raise ServiceError(
                "not_found", "the file is gone (older than OUTPUT_RETENTION_DAYS, or removed)"
            )
        suffix = os.path.splitext(name)[1]
        media = MEDIA_TYPES.get(suffix) or mimetypes.guess_type(name)[0]
        return FileResponse(path, media_type=media or "application/octet-stream")
