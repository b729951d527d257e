"""`da3-serverless` command line: predict, warmup, prefetch, prune, serve, request."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from da3_serverless.client import Client, DA3Error
from da3_serverless.config import Settings, SettingsError, load_settings


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    from da3_serverless.inference.predictor import Predictor
    from da3_serverless.inference.weights import WeightLocator

    predictor = Predictor.from_pretrained(
        args.model or settings.model_id, locator=WeightLocator.from_settings(settings)
    )
    prediction = predictor.predict(
        [str(path) for path in args.images],
        process_res=args.process_res,
        use_ray_pose=args.ray_pose,
        focal_length_px=args.focal_length_px,
        metric=not args.relative,
    )
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
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, **arrays, units=prediction.units)
    for path, depth in zip(args.images, prediction.depth, strict=True):
        print(
            f"{path}: {depth.shape[1]}x{depth.shape[0]} depth {depth.min():.3f}..{depth.max():.3f}"
            f" {prediction.units} ({predictor.model_id})"
        )
    print(f"wrote {args.output}")
    return 0


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
            print(f"{model_id}: {locator.resolve(model_id)}")
        except ModelNotFoundError as error:
            print(f"{model_id}: missing: {error}", file=sys.stderr)
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

    predict = commands.add_parser("predict", help="depth for local images, written to .npz")
    predict.add_argument("images", nargs="+", type=Path, help="views of one scene")
    predict.add_argument("--model", help="HF repo id, short name or snapshot folder")
    predict.add_argument("--process-res", type=int, default=504)
    predict.add_argument("--ray-pose", action="store_true", help="camera pose from rays")
    predict.add_argument("--focal-length-px", type=float, help="for DA3METRIC-LARGE")
    predict.add_argument("--relative", action="store_true", help="relative depth is enough")
    predict.add_argument("-o", "--output", type=Path, required=True, help="OUT.npz")
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
    return parser


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here so `request` and `prune` start without loading torch and FastAPI.
    from da3_serverless.server import serve

    if args.model:
        settings = settings.model_copy(update={"model_id": args.model})
    serve(settings, args.host, args.port)
    return 0


def _request_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files or http(s) URLs")
    parser.add_argument("--endpoint", help="server URL or https://api.runpod.ai/v2/<id> "
                        "(default: DA3_ENDPOINT)")  # fmt: skip
    parser.add_argument("--api-key", help="this service's key (default: DA3_API_KEY)")
    parser.add_argument("--runpod-api-key", help="RunPod account key (default: RUNPOD_API_KEY)")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder")
    parser.add_argument("--model", dest="model_id", help="model id or short name")
    parser.add_argument("--process-res", type=int, help="processing resolution (longest side)")
    parser.add_argument("--outputs", help="comma-separated output names, e.g. depth,preview,"
                        "depth_npy,pointcloud,depth_exr (default: depth,preview)")  # fmt: skip
    parser.add_argument("--relative", action="store_true", help="output_metric=false")
    parser.add_argument("--focal-length-px", type=float, help="focal length in input pixels")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per image")
    parser.add_argument(
        "--scene",
        action="store_true",
        help="the images are views of one "
        "scene: one request, and the scene files (scene_ply, scene_glb, colmap)",
    )
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
    options = _request_options(args)
    args.out.mkdir(parents=True, exist_ok=True)
    client = Client(
        endpoint,
        api_key=args.api_key or settings.api_key,
        runpod_api_key=args.runpod_api_key or settings.runpod_api_key,
        timeout=args.timeout,
    )
    jobs = [("scene", list(args.images))] if args.scene else [
        (Path(str(image).split("?")[0]).stem or "image", image) for image in args.images
    ]  # fmt: skip
    failed = 0
    with client, tqdm(jobs, unit="request", disable=len(jobs) < 2) as bar:
        for stem, images in bar:
            try:
                result = client.depth(images, **options)
                missing = client.download_outputs(result)
            except (DA3Error, OSError) as exc:
                failed += 1
                tqdm.write(f"{stem}: {exc}", file=sys.stderr)
                continue
            result.save_all(args.out, stem)
            if missing:
                tqdm.write(f"{stem}: {', '.join(missing)} stayed on the server (see "
                           f"{stem}.json for their paths)", file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the `request` command's flags ask for."""
    outputs = (args.outputs or "depth,preview").split(",")
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
    return options


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
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
