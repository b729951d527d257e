"""A stand-in network for sequence tests and benchmarks: answers a chunk at once with a depth
made from the frames' pixels and every camera at the chunk's origin (so each chunk aligns to
the one before with the identity), with the shapes and types of a real `Prediction`."""

from __future__ import annotations

import numpy as np

from da3_serverless.api.budget import Budget
from da3_serverless.api.storage import OutputStore
from da3_serverless.config import Settings
from da3_serverless.inference.cancel import CancelToken
from da3_serverless.inference.prediction import Prediction
from da3_serverless.sequence.pipeline import SequenceContext


class StandIn:
    model_id = "stand-in"

    def predict(self, images, **options) -> Prediction:
        gray = np.stack([np.asarray(image, np.float32).mean(axis=2) for image in images])
        count, height, width = gray.shape
        intrinsics = np.array([[width, 0, width / 2], [0, width, height / 2], [0, 0, 1]])
        extrinsics = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)
        return Prediction(
            depth=1.0 + gray / 255.0,
            confidence=np.ones_like(gray),
            sky=np.zeros_like(gray),
            intrinsics=np.repeat(intrinsics[None].astype(np.float32), count, 0),
            extrinsics=np.repeat(extrinsics[None].astype(np.float32), count, 0),
            is_metric=False,
            units="relative",
        )


def standin_context(settings: Settings, cancel: CancelToken | None = None) -> SequenceContext:
    """A sequence context whose model is the stand-in, with a budget that admits any chunk."""
    load = lambda pinned: StandIn()  # noqa: E731

    return SequenceContext(
        settings, OutputStore(settings), Budget(10**12, 10**12), "stand-in", load,
        cancel or CancelToken(),
    )  # fmt: skip
