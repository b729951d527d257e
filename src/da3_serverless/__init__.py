"""Depth Anything 3 as a serverless endpoint.

The public face, imported lazily (PEP 562) so that `from da3_serverless import Client` never
imports torch:

- `Predictor`, `Prediction`: run a DA3 network in this process (`Predictor.from_pretrained`).
- `Client`, `DepthResult`, `DA3Error`: call a running endpoint (RunPod or self-hosted).
- `Service`, `Settings`: the transport-free service and its settings, for embedding.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Client": "da3_serverless.client",
    "DA3Error": "da3_serverless.client",
    "DepthResult": "da3_serverless.client",
    "Predictor": "da3_serverless.inference.predictor",
    "Prediction": "da3_serverless.inference.prediction",
    "Service": "da3_serverless.service",
    "Settings": "da3_serverless.config",
}
__all__ = [
    "Client",
    "DA3Error",
    "DepthResult",
    "Prediction",
    "Predictor",
    "Service",
    "Settings",
    "__version__",
]

if TYPE_CHECKING:
    from da3_serverless.client import Client, DA3Error, DepthResult
    from da3_serverless.config import Settings
    from da3_serverless.inference.prediction import Prediction
    from da3_serverless.inference.predictor import Predictor
    from da3_serverless.service import Service


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'da3_serverless' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
