"""The self-hosted HTTP transport: the v1 contract over FastAPI, plus a browser playground.

`create_app(settings)` builds the ASGI app; `serve(settings, host, port)` runs it with uvicorn.
The modules: `app` (assembly, state, lifespan), `jobs` (/runsync, /run, /status), `operations`
(/health, /ready, /models, /metrics), `pages` (playground, /docs, OpenAPI), `errors` (one
handler per error kind), `middleware` (request log and metrics), `body` (reading a request),
`queue` (backpressure and background jobs), `batching` (gathering requests into batches),
`metrics` (Prometheus), `logs` (JSON lines). All the work (auth, images, model, outputs)
happens in `Service`; this package only moves bytes.

`queue` and `batching` know no HTTP; the RunPod worker uses them too. The app is imported
lazily (PEP 562), so importing them does not import FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["AppState", "create_app", "serve"]

if TYPE_CHECKING:
    from da3_serverless.server.app import create_app, serve
    from da3_serverless.server.state import AppState


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = "state" if name == "AppState" else "app"
        return getattr(importlib.import_module(f"da3_serverless.server.{module}"), name)
    raise AttributeError(f"module 'da3_serverless.server' has no attribute {name!r}")
