"""Time from cancel to the worker being free: a 16-view request at process_res 1008, da3-small
(random weights) on CPU, cancelled at several points of its run.

    PYTHONPATH=src .venv/bin/python bench/cancel.py [--views 16] [--res 1008]
        [--points decode+0.2,block:0+3,block:5+10,head+1] [--overhead 4] [--threads N]

Each point is `stage+seconds`: the job's token is cancelled that long after the stage begins
(`decode`: the request itself; `block:K`: the backbone's block K, marked by a forward pre-hook;
`head`: the depth head). The request runs `Service.handle` in a worker thread, as both
transports run it; the worker is free when that thread has returned (with `cancelled`). One
request per point, one after the other; a late point waits for the run to reach it (the head
comes after the whole backbone: minutes on CPU).

`--overhead N` also times the network's forward on N views with and without a stop check (on
CPU a checked forward runs its blocks in slices), the two interleaved, twice each.
"""

from __future__ import annotations

import argparse
import base64
import tempfile
import threading
import time
from pathlib import Path

import torch

from common import REPO, snapshot
from da3_serverless.api.errors import ServiceError
from da3_serverless.config import Settings
from da3_serverless.inference.cancel import CancelToken
from da3_serverless.inference.preprocess import processing_size
from da3_serverless.service import Service

PHOTOS = [REPO / "tests" / "data" / "images" / name for name in ("soh-000.png", "soh-010.png")]


def stage_events(service: Service) -> dict[str, threading.Event]:
    """One event per stage of the network, set by forward pre-hooks when the stage begins."""
    network = service.model_cache.get(service.default_model_id).network
    events: dict[str, threading.Event] = {}
    for index, block in enumerate(network.backbone.pretrained.blocks):
        events[f"block:{index}"] = event = threading.Event()
        block.register_forward_pre_hook(lambda m, a, e=event: e.set())
    events["head"] = head = threading.Event()
    network.head.register_forward_pre_hook(lambda m, a, e=head: e.set())
    return events


def cancel_at(point: str, service: Service, payload: dict) -> tuple[float, float]:
    """Run the request, cancel it at `point`; (seconds into the job at the cancel, seconds
    from the cancel to the worker being free)."""
    stage, _, delay = point.partition("+")
    events = stage_events(service)
    for event in events.values():
        event.clear()
    token, times = CancelToken(), {}

    def work() -> None:
        try:
            service.handle(payload, cancel=token)
        except ServiceError as error:
            assert error.code == "cancelled", error
        times["free"] = time.perf_counter()

    times["start"] = time.perf_counter()
    worker = threading.Thread(target=work)
    worker.start()
    if stage != "decode":
        events[stage].wait()
    time.sleep(float(delay or 0))
    times["cancel"] = time.perf_counter()
    token.cancel("cancelled by bench/cancel.py")
    worker.join()
    if "free" not in times:
        raise SystemExit(f"{point}: the request did not stop")
    return times["cancel"] - times["start"], times["free"] - times["cancel"]


def overhead(service: Service, views: int, res: int) -> None:
    """Forward seconds of `views` views without and with a stop check, interleaved."""
    network = service.model_cache.get(service.default_model_id).network
    width, height = processing_size(1208, 680, res)
    batch = torch.randn(1, views, 3, height, width)
    times: dict[str, list[float]] = {"unchecked": [], "checked": []}
    with torch.inference_mode():
        for _ in range(2):
            for name, check in (("unchecked", None), ("checked", lambda: None)):
                start = time.perf_counter()
                network(batch, check=check)
                times[name].append(time.perf_counter() - start)
    plain, checked = min(times["unchecked"]), min(times["checked"])
    print(f"forward of {views} views: {plain:.1f} s unchecked, {checked:.1f} s checked "
          f"(x{checked / plain:.3f}; best of 2 each)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--res", type=int, default=1008)
    parser.add_argument("--points", default="decode+0.2,block:0+3,block:5+10,head+1")
    parser.add_argument("--overhead", type=int, default=0, help="views; 0 skips it")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    photos = [base64.b64encode(path.read_bytes()).decode("ascii") for path in PHOTOS]
    payload = {"images": [{"base64": photos[i % 2]} for i in range(args.views)],
               "process_res": args.res, "outputs": ["depth", "depth_npy"]}  # fmt: skip
    with tempfile.TemporaryDirectory() as workspace:
        settings = Settings(
            model_id=str(snapshot("da3-small")), workspace=Path(workspace), device="cpu",
            allow_unauthenticated=True, warmup=False, max_views=args.views,
            request_budget_tokens=10**7, request_budget_pixels=10**10,  # well past this request
        )  # fmt: skip
        service = Service(settings)
        service.start()
        print(f"da3-small, {args.views} views of 1208x680 at process_res {args.res}, CPU, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        print(f"{'cancelled at':<14} {'into the job':>13} {'cancel -> free':>15}")
        for point in args.points.split(","):
            into, freed = cancel_at(point, service, payload)
            print(f"{point:<14} {into:>11.1f} s {freed:>13.2f} s", flush=True)
        left = list(Path(workspace, "output_images").glob("*"))
        print(f"files left in output_images/: {len(left)}")
        if args.overhead:
            overhead(service, args.overhead, args.res)


if __name__ == "__main__":
    main()
