"""The self-hosted HTTP transport: the v1 contract over FastAPI, plus a browser playground.

`create_app(settings)` builds the ASGI app; `serve(settings, host, port)` runs it with uvicorn.
The modules: `app` (assembly, state, lifespan), `jobs` (/runsync, /run, /status), `operations`
(/health, /ready, /models, /metrics), `pages` (playground, /docs, OpenAPI), `errors` (one
handler per error kind), `middleware` (request log and metrics), `body` (reading a request),
`queue` (backpressure and background jobs), `metrics` (Prometheus), `logs` (JSON lines).
All the work (auth, images, model, outputs) happens in `Service`; this package only moves bytes.
"""

from da3_serverless.server.app import AppState, create_app, serve

__all__ = ["AppState", "create_app", "serve"]
