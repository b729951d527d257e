"""`da3-serverless` command line: predict, warmup, prefetch, prune, serve, request, batch."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import logging.config
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from da3_serverless.client import Client, DA3Error
from da3_serverless.config import Settings, SettingsError, load_settings

if TYPE_CHECKING:  # the CLI imports torch only for the commands that run a model
    from da3_serverless.api.images import DecodedImage
    from da3_serverless.api.schema import RunRequest
    from da3_serverless.inference.cancel import CancelToken
    from da3_serverless.inference.prediction import Prediction
    from da3_serverless.inference.predictor import Predictor


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    """`da3-serverless predict`: the model in this process. `-o OUT.npz` writes the arrays;
    `--out DIR` writes the requested outputs as files, encoded as the service encodes them and
    named as the client's `save_all` names them."""
    from da3_serverless.api.errors import ServiceError
    from da3_serverless.api.outputs import wants_gaussians
    from da3_serverless.inference.predictor import Predictor
    from da3_serverless.inference.weights import WeightLocator

    if args.output is None and args.out is None:
        print("error: give -o OUT.npz, --out DIR, or both", file=sys.stderr)
        return 2
    try:
        request = _predict_request(args, settings) if args.out is not None else None
    except ServiceError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    views = [_read_view(path, index) for index, path in enumerate(args.images)]
    predictor = Predictor.from_pretrained(
        args.model or settings.model_id, locator=WeightLocator.from_settings(settings)
    )
    if request is not None and (reasons := _unavailable(request, predictor)):
        print("error: the model cannot give " + "; ".join(reasons), file=sys.stderr)
        return 2
    with interruptible() as cancel:
        prediction = predictor.predict(
            [view.image for view in views],
            process_res=args.process_res,
            use_ray_pose=args.ray_pose,
            focal_length_px=args.focal_length_px,
            metric=not args.relative,
            exif_focal_length_px=[view.focal_length_px for view in views],
            gaussians=request is not None and wants_gaussians(request),
            cancel=cancel,
        )
    for path, depth in zip(args.images, prediction.depth, strict=True):
        print(
            f"{path}: {depth.shape[1]}x{depth.shape[0]} depth {depth.min():.3f}..{depth.max():.3f}"
            f" {prediction.units} ({predictor.model_id})"
        )
    if args.output is not None:
        _write_npz(args.output, prediction)
        print(f"wrote {args.output}")
    if request is not None:
        stem = args.stem or (args.images[0].stem if len(args.images) == 1 else "scene")
        written = _write_outputs(args.out, stem, request, predictor, prediction, views)
        print(f"wrote {len(written)} file(s) to {args.out}: {', '.join(p.name for p in written)}")
    return 0


@contextmanager
def interruptible() -> Iterator[CancelToken]:
    """A cancel token that Ctrl-C sets while the block runs: the forward stops at its next
    check, as a cancelled job of the service does (and runs the service's exact path, so the
    files equal the service's to the bit); KeyboardInterrupt is raised as the block ends."""
    from da3_serverless.inference.cancel import Cancelled, CancelToken

    cancel = CancelToken()
    if threading.current_thread() is not threading.main_thread():  # signals go to the main one
        yield cancel
        return
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.cancel("interrupted (Ctrl-C)"))
    try:
        yield cancel
    except Cancelled as stopped:
        raise KeyboardInterrupt(str(stopped)) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    if cancel.cancelled:  # Ctrl-C after the forward's last check: stop all the same
        raise KeyboardInterrupt(cancel.reason)


def _read_view(path: Path, index: int) -> DecodedImage:
    """One local photo, upright RGB with its EXIF focal length, as the service decodes a view
    (the library's reader: a local file is trusted, so no size limit); ValueError naming it."""
    from da3_serverless.api.images import DecodedImage
    from da3_serverless.inference.preprocess import load_rgb

    rgb, focal = load_rgb(path, index)
    return DecodedImage(rgb, focal, rgb.width, rgb.height, str(path))


def _predict_request(args: argparse.Namespace, settings: Settings) -> RunRequest:
    """The v1 request the service would get for `predict`'s options (validated the same way,
    within the same limits); its `images` only count the views, whose pixels come from the
    files."""
    from da3_serverless.api.schema import parse_request

    payload: dict[str, Any] = {
        "images": [{"base64": ""} for _ in args.images],
        "outputs": list(dict.fromkeys((args.outputs or "depth,preview").split(","))),
        "process_res": args.process_res,
        "use_ray_pose": args.ray_pose,
        "output_metric": not args.relative,
        "keep_sky": args.keep_sky,
        "remove_edges": not args.no_remove_edges,
        "colmap_text": args.colmap_text,
        "gaussians_compact": args.gaussians_compact,
        "colmap_images": args.colmap_images,
    }
    if args.focal_length_px is not None:
        payload["focal_length_px"] = args.focal_length_px
    if args.conf_percentile is not None:
        payload["conf_percentile"] = args.conf_percentile
    if args.max_points is not None:
        payload["max_points"] = args.max_points
    return parse_request(payload, settings)


def _unavailable(request: RunRequest, predictor: Predictor) -> list[str]:
    """The service's one rule for outputs a model cannot give (`unavailable_outputs`)."""
    from da3_serverless.api.outputs import unavailable_outputs

    return unavailable_outputs(request, predictor.capabilities)


def _write_npz(path: Path, prediction: Prediction) -> None:
    arrays = {
        name: value
        for name in ("depth", "confidence", "sky", "intrinsics", "extrinsics")
        if (value := getattr(prediction, name)) is not None
    }
    if prediction.depth.dtype == object:  # views of different sizes: one array per view
        arrays = {
            f"{name}_{index}": view
            for name, value in arrays.items()
            for index, view in enumerate(value)
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays, units=prediction.units)


def _write_outputs(
    folder: Path,
    stem: str,
    request: RunRequest,
    predictor: Predictor,
    prediction: Prediction,
    views: list[DecodedImage],
) -> list[Path]:
    """Encode the request's outputs as the service does (`api/outputs.py`: every view's depth
    PNG, the extras, the scene files) and write them under the client's `save_all` names, with
    `<stem>.json` (cameras, depth ranges, the scene summary, warnings). Each file is written
    whole (a temporary name, then renamed)."""
    from da3_serverless.api.outputs import encode_outputs, encode_scene, view_skeleton
    from da3_serverless.client import output_file_name

    artifacts, warnings = encode_outputs(request, prediction, views)
    scene, scene_warnings = encode_scene(request, prediction, views)
    for warning in [*warnings, *scene_warnings]:
        print(f"warning: {warning}", file=sys.stderr)
    skeletons = [view_skeleton(prediction, index) for index in range(len(prediction))]
    top: dict[str, Any] = {}
    files = {}
    for artifact in [*artifacts, *scene]:
        fields = top if artifact.view is None else skeletons[artifact.view]
        fields.update(artifact.fields)
        name = output_file_name(stem, artifact.name, artifact.view, len(skeletons))
        fields.setdefault("files", {})[artifact.name] = name
        files[name] = artifact.data
    metadata = {
        "model_id": predictor.model_id,
        "is_metric": prediction.is_metric,
        "units": prediction.units,
        "views": skeletons,
        **top,
        "warnings": [*warnings, *scene_warnings],
    }
    files[f"{stem}.json"] = json.dumps(metadata, indent=2).encode()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        partial = folder / f".{name}.partial"
        partial.write_bytes(data)
        os.replace(partial, folder / name)
        written.append(folder / name)
    return written


def cmd_warmup(args: argparse.Namespace, settings: Settings) -> int:
    from da3_serverless.service import Service, warm_up

    if args.model:
        settings = settings.model_copy(update={"model_id": args.model})
    service = Service(settings)
    try:
        warm_up(service.model_cache.get(settings.model_id))
    except Exception as error:  # a failed warmup must fail loudly, whatever the cause
        print(f"warmup of {settings.model_id} failed: {error}", file=sys.stderr)
        return 1
    print(f"warmup of {settings.model_id} ok")
    return 0


def cmd_prefetch(args: argparse.Namespace, settings: Settings) -> int:
    from da3_serverless.inference.weights import ModelNotFoundError, WeightLocator

    locator = WeightLocator.from_settings(settings)
    failed = 0
    for model_id in args.models or [settings.model_id]:
        try:
            folders = locator.resolve_all(model_id)  # a pair of models: both
            print(f"{model_id}: {', '.join(map(str, folders))}")
        except ModelNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)  # three lines: where, why, what next
            failed += 1
    return 1 if failed else 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from da3_serverless.api.storage import OutputStore

    removed = OutputStore(settings).prune()
    for path in removed:
        print(f"removed {path}")
    print(f"pruned {len(removed)} file(s) older than {settings.output_retention_days} days")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="da3-serverless", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser(
        "predict", help="depth (and any output) for local images, without a server"
    )
    predict.add_argument("images", nargs="+", type=Path, help="views of one scene")
    predict.add_argument("--model", help="HF repo id, short name or snapshot folder")
    predict.add_argument("--process-res", type=int, default=504)
    predict.add_argument("--ray-pose", action="store_true", help="camera pose from rays")
    predict.add_argument("--focal-length-px", type=float, help="for DA3METRIC-LARGE")
    predict.add_argument("--relative", action="store_true", help="relative depth is enough")
    predict.add_argument("-o", "--output", type=Path, help="OUT.npz: the arrays")
    predict.add_argument("--out", type=Path, help="folder for the output files (as `request`)")
    predict.add_argument(
        "--outputs",
        help="with --out: comma-separated output names, e.g. "
        "depth,preview,scene_ply,scene_glb,colmap,gaussians_ply (default: depth,preview)",
    )
    predict.add_argument("--stem", help="file name stem (default: the image's name, or 'scene' "
                         "for several)")  # fmt: skip
    _scene_arguments(predict)
    predict.set_defaults(run=cmd_predict)

    warmup = commands.add_parser("warmup", help="load the model and run one forward pass")
    warmup.add_argument("--model", help="default: MODEL_ID")
    warmup.set_defaults(run=cmd_warmup)

    prefetch = commands.add_parser("prefetch", help="download model snapshots into the cache")
    prefetch.add_argument("models", nargs="*", help="default: MODEL_ID")
    prefetch.set_defaults(run=cmd_prefetch)

    prune = commands.add_parser("prune", help="remove outputs past OUTPUT_RETENTION_DAYS")
    prune.set_defaults(run=cmd_prune)

    serve = commands.add_parser("serve", help="self-hosted HTTP server for the v1 API")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--model", default=None, help="default model (overrides MODEL_ID)")
    serve.set_defaults(run=cmd_serve)

    request = commands.add_parser("request", help="send images to a running endpoint")
    _request_arguments(request)
    request.set_defaults(run=cmd_request)

    batch = commands.add_parser("batch", help="send a dataset to an endpoint, resumably")
    _batch_arguments(batch)
    batch.set_defaults(run=cmd_batch, scene=False)
    return parser


def _scene_arguments(parser: argparse.ArgumentParser) -> None:
    """`predict`'s options of the scene outputs (the request's scene fields)."""
    parser.add_argument("--max-points", type=int, help="scene: most points (default 200000)")
    parser.add_argument("--conf-percentile", type=float, help="scene: drop points below this "
                         "confidence percentile (default 40)")  # fmt: skip
    parser.add_argument("--keep-sky", action="store_true", help="scene: keep sky pixels")
    parser.add_argument("--no-remove-edges", action="store_true",
                         help="scene: keep pixels at depth edges")  # fmt: skip
    parser.add_argument("--colmap-text", action="store_true",
                         help="colmap: add the .txt files to the zip")  # fmt: skip
    parser.add_argument("--colmap-images", choices=("png", "jpg"), default="png",
                         help="colmap: lossless PNG images (default) or JPEG 4:4:4")  # fmt: skip
    parser.add_argument("--gaussians-compact", action="store_true",
                         help="gaussians_ply: DC colour only, no normals (4x smaller)")  # fmt: skip


def _batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        type=Path,
        help="a folder of photos (each one request), of "
        "scene folders (each one multi-view request), or a .jsonl manifest",
    )
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/<name>/...")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--retries", type=int, default=3,
                        help="resends of an item on 429, 5xx or a lost connection")  # fmt: skip
    _field_arguments(parser)


def cmd_batch(args: argparse.Namespace, settings: Settings) -> int:
    """`da3-serverless batch`: `Client.map` with a progress bar; prints the summary. Returns 0
    when every item is done, 130 when stopped with items left, else 1 when some failed."""
    endpoint = args.endpoint or settings.endpoint
    if not endpoint:
        print("error: give --endpoint or set DA3_ENDPOINT", file=sys.stderr)
        return 2
    options = _request_options(args)  # a scene item adds the scene files to its outputs
    try:
        with Client(endpoint, api_key=args.api_key or settings.api_key,
                    runpod_api_key=args.runpod_api_key or settings.runpod_api_key,
                    timeout=args.timeout) as client:  # fmt: skip
            report = client.map(args.source, args.out, concurrency=args.concurrency,
                                retries=args.retries, progress=True, **options)  # fmt: skip
    except KeyboardInterrupt:  # the second Ctrl-C: the requests in flight are left
        print("stopped; run the same command again to send what is left", file=sys.stderr)
        return 130
    print(report.summary(), file=sys.stderr)
    if report.left:
        return 130
    return 1 if report.failures else 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here so `request` and `prune` start without loading torch and FastAPI.
    from da3_serverless.server import serve
    from da3_serverless.startup import StartupError, check_start, workspace_line

    if args.model:
        settings = settings.model_copy(update={"model_id": args.model})
    print(workspace_line(settings), file=sys.stderr)
    try:
        check_start(settings)  # before the server: a failure is three lines, not a traceback
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    serve(settings, args.host, args.port)
    return 0


def _request_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", help="image files or http(s) URLs")
    parser.add_argument("--video", help="a video file or http(s) URL, sent as a sequence "
                        "(writes video.trajectory.zip, video.depth_frames.zip, ...)")  # fmt: skip
    parser.add_argument("--frames-zip", help="a zip of frames (file or http(s) URL), sent as "
                        "a sequence in natural name order (writes frames.*)")  # fmt: skip
    parser.add_argument("--fps", type=float, help="video: frames sampled per second "
                        "(--frames-zip: frame i's timestamp is i / fps)")  # fmt: skip
    parser.add_argument("--max-frames", type=int, help="sequence: most frames to take")
    parser.add_argument("--chunk-size", type=int, help="sequence: frames per forward pass")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder")
    _field_arguments(parser)
    parser.add_argument(
        "--scene",
        action="store_true",
        help="the images are views of one "
        "scene: one request, and the scene files (scene_ply, scene_glb, colmap)",
    )
    parser.add_argument("--anchor-depth", type=Path, action="append", default=[],
                        help="a known depth map (16-bit PNG or float .npy, zeros unknown) "
                        "of the next view, e.g. a LiDAR map; repeat per view")  # fmt: skip
    parser.add_argument("--anchor-scale", type=float, default=1.0,
                        help="metres per stored unit of --anchor-depth (0.001 for mm)")  # fmt: skip


def _field_arguments(parser: argparse.ArgumentParser) -> None:
    """The endpoint, the keys and the request fields: `request` and `batch` share them."""
    parser.add_argument("--endpoint", help="server URL or https://api.runpod.ai/v2/<id> "
                        "(default: DA3_ENDPOINT)")  # fmt: skip
    parser.add_argument("--api-key", help="this service's key (default: DA3_API_KEY)")
    parser.add_argument("--runpod-api-key", help="RunPod account key (default: RUNPOD_API_KEY)")
    parser.add_argument("--model", dest="model_id", help="model id or short name")
    parser.add_argument("--process-res", type=int, help="processing resolution (longest side)")
    parser.add_argument("--outputs", help="comma-separated output names, e.g. depth,preview,"
                        "depth_npy,pointcloud,depth_exr (default: depth,preview)")  # fmt: skip
    parser.add_argument("--relative", action="store_true", help="output_metric=false")
    parser.add_argument("--focal-length-px", type=float, help="focal length in input pixels")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per image")
    parser.add_argument("--max-points", type=int, help="scene: most points (default 200000)")
    parser.add_argument("--conf-percentile", type=float, help="scene: drop points below this "
                        "confidence percentile (default 40)")  # fmt: skip


def cmd_request(args: argparse.Namespace, settings: Settings) -> int:
    """`da3-serverless request`: for each image write `<stem>.depth.png` (16-bit), the extras
    (`<stem>.preview.png`, ...) and `<stem>.json` (the response without base64); with `--scene`
    one request for all images as views of one scene, written as `scene.*`. Returns 0 when
    every request succeeded, else 1."""
    endpoint = args.endpoint or settings.endpoint
    if not endpoint:
        print("error: give --endpoint or set DA3_ENDPOINT", file=sys.stderr)
        return 2
    if sum(map(bool, (args.images, args.video, args.frames_zip))) != 1:
        print("error: give image files/URLs, --video or --frames-zip (one of them)",
              file=sys.stderr)  # fmt: skip
        return 2
    options = _request_options(args)
    args.out.mkdir(parents=True, exist_ok=True)
    client = Client(
        endpoint,
        api_key=args.api_key or settings.api_key,
        runpod_api_key=args.runpod_api_key or settings.runpod_api_key,
        timeout=args.timeout,
    )
    if args.video or args.frames_zip:
        with client:
            return _request_video(client, args, options)
    jobs = [("scene", list(args.images))] if args.scene else [
        (Path(str(image).split("?")[0]).stem or "image", image) for image in args.images
    ]  # fmt: skip
    failed = 0
    with client, tqdm(jobs, unit="request", disable=len(jobs) < 2) as bar:
        for stem, images in bar:
            try:
                with job_progress_bar(stem) as on_progress:
                    result = client.depth(images, on_progress=on_progress, **options)
                missing = client.download_outputs(result)
            except (DA3Error, OSError) as exc:
                failed += 1
                tqdm.write(f"{stem}: {exc}", file=sys.stderr)
                continue
            written = result.save_all(args.out, stem)
            tqdm.write(f"{stem}: wrote {len(written)} file(s) to {args.out}: "
                       f"{', '.join(path.name for path in written)}")  # fmt: skip
            if missing:
                tqdm.write(f"{stem}: {', '.join(missing)} stayed on the server (see "
                           f"{stem}.json for their paths)", file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


def _request_video(client: Client, args: argparse.Namespace, options: dict[str, Any]) -> int:
    """`request --video` (or `--frames-zip`): one sequence request, a progress bar over its
    frames (from each chunk's summary), the files written as `video.*` (`frames.*`)."""
    for name in ("fps", "max_frames", "chunk_size"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    stem = "video" if args.video else "frames"
    send = client.video if args.video else client.frames_zip
    with tqdm(unit="frame", desc=stem) as bar:

        def progress(summary: dict[str, Any]) -> None:
            if summary.get("percent") is not None:  # else the planned count is only a cap
                bar.total = summary.get("frames_planned") or bar.total
            bar.update(summary.get("frames_done", bar.n) - bar.n)

        try:
            result = send(args.video or args.frames_zip, on_progress=progress, **options)
        except (DA3Error, OSError) as exc:
            tqdm.write(f"{stem}: {exc}", file=sys.stderr)
            return 1
        bar.update(result.sequence.get("frames", bar.n) - bar.n)
    written = result.save_all(args.out, stem)
    print(f"{stem}: {result.sequence.get('frames')} frames; wrote {len(written)} file(s) to "
          f"{args.out}: {', '.join(path.name for path in written)}")  # fmt: skip
    return 0


@contextmanager
def job_progress_bar(stem: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A bar of one job's progress (percent and stage, from the job's progress updates; the
    result itself never reaches it), removed once the job ends."""
    with tqdm(total=100, desc=stem, unit="%", leave=False, delay=0.5) as bar:

        def on_progress(progress: dict[str, Any]) -> None:
            percent = progress.get("percent")
            if isinstance(percent, int) and percent > bar.n:
                bar.update(percent - bar.n)
            bar.set_postfix_str(str(progress.get("message", ""))[:60])

        yield on_progress


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the `request` command's flags ask for."""
    sequence = getattr(args, "video", None) or getattr(args, "frames_zip", None)
    default = "trajectory,depth_frames" if sequence else "depth,preview"
    outputs = (args.outputs or default).split(",")
    if args.scene:
        outputs += ["scene_ply", "scene_glb", "colmap"]
    options: dict[str, Any] = {"outputs": list(dict.fromkeys(outputs))}
    if args.model_id:
        options["model_id"] = args.model_id
    if args.process_res:
        options["process_res"] = args.process_res
    if args.relative:
        options["output_metric"] = False
    if args.focal_length_px:
        options["focal_length_px"] = args.focal_length_px
    if args.max_points is not None:
        options["max_points"] = args.max_points
    if args.conf_percentile is not None:
        options["conf_percentile"] = args.conf_percentile
    if getattr(args, "anchor_depth", None):  # `request` only, not `batch`
        maps = [
            {"view": view, "base64": base64.b64encode(path.read_bytes()).decode(),
             "scale": args.anchor_scale}
            for view, path in enumerate(args.anchor_depth)
        ]  # fmt: skip
        options["anchors"] = {"sparse_depth": maps}
    return options


# HTTP clients log every request at INFO: noise on a terminal (`request`, `prefetch`).
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "urllib3")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet = {name: {"level": "WARNING"} for name in QUIET_LOGGERS}
    logging.config.dictConfig({"version": 1, "incremental": True, "loggers": quiet})
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as error:  # checked before any command starts
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return args.run(args, settings)
    except (ValueError, LookupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
