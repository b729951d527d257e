"""A stand-in network for sequence tests and benchmarks: answers a chunk at once with a depth
made from the frames' pixels and every camera at the chunk's origin (so each chunk aligns to
the one before with the identity), with the shapes and types of a real `Prediction`; and the
checks the sequence tests share (`files_left`, `check_chunk_price`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from da3_serverless.api.budget import Budget
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.storage import OutputStore
from da3_serverless.config import Settings
from da3_serverless.inference.cancel import Cancelled, CancelToken
from da3_serverless.inference.prediction import Prediction
from da3_serverless.sequence.pipeline import SequenceContext, run_sequence


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


def files_left(settings: Settings) -> list[Path]:
    """Every file a sequence left under `settings`: its working folders (`sequences/`) and
    the saved outputs (a failed or cancelled sequence must leave none)."""
    folders = [settings.workspace_dir / "sequences", settings.output_dir]
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()]


def check_chunk_price(
    context: SequenceContext, plain, request, price: int, chunk_size: int, name: str
) -> None:
    """The budget prices `request`'s chunk at `price` host pixels. One pixel short: `plain`
    (the same frames without the priced outputs) still runs in chunks of `chunk_size`, while
    `request` is refused (`request_too_large`, naming `name`) before any frame is
    predicted, leaving no file. At the price it passes the budget and stops at a cancel just
    after it, leaving no file."""
    import pytest  # the benchmarks use the stand-in without pytest

    context.budget = Budget(10**9, price - 1)
    assert run_sequence(context, plain)["sequence"]["chunk_size"] == chunk_size
    with pytest.raises(ServiceError, match=name) as caught:
        run_sequence(context, request)
    assert caught.value.code == "request_too_large"
    assert not files_left(context.settings)
    context.budget = Budget(10**9, price)
    context.cancel = CancelToken()  # the first run committed its token
    context.cancel.cancel("after the budget")
    with pytest.raises(Cancelled):
        run_sequence(context, request)
    assert not files_left(context.settings)
