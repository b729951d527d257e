"""The GPU check: load time, latency, peak memory, throughput and bf16 error of the presets on
one GPU, against the reference implementation on the same inputs and weights, in one short run
(sized for under 4 minutes on one H200).

    python bench/gpu.py --out DIR [--only da3-small da3-large ...] [--device cuda]
    python bench/gpu.py --device cpu --quick --out DIR   # the same code, tiny, on CPU (tests)

For each preset (default: da3-small, da3-large, da3-giant, da3nested-giant-large) it writes a
random-weight snapshot locally (`--snapshots`, never carried; drawn on the device) and measures:
load time through the real loading path (`Predictor.from_pretrained`, bf16 weights, with the
page cache warm: the file is read once before timing), `predict` latency at process_res 504
for 1, 4 and 16 views, a batch of 8 unrelated photos with batching on (one forward, batch
dimension 8) and off (8 forwards), peak GPU memory and whether allocated memory returns to its
post-load value after each request, a short synthetic video through the sequence path's
device part (frames/s: overlapping chunks through `predict` and the chunk alignment, without
video decoding or output files, which `bench/sequence.py` measures on CPU), bf16 against
fp32 (depth relative error p99 / max, fp32 load and latency), the reference's default path (its
autocast wrapper, fp32 weights) on the same batches, and, for one preset and one shape, the
compiled path's speed-up. Every measurement is one JSON line in DIR/rows.jsonl, flushed as it
is taken (a run cut short still reports); at the end a Markdown table (with the torch
version) goes to stdout and DIR/table.md. Past `--budget-s` the remaining measurements are
skipped, and say so.

Imports only what the network, the predictor and the reference need (no pydantic, FastAPI or
runpod): on a machine without a registry, `scripts/gpu_wheels.sh` brings the reference's
wheels. Random weights: speed and memory are real, accuracy is not measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the reference oracle helper lives with the tests

from da3_serverless.inference.predictor import Predictor, PredictRequest  # noqa: E402
from da3_serverless.model.alignment import SKY_THRESHOLD  # noqa: E402
from da3_serverless.model.checkpoint import write_random_checkpoint  # noqa: E402
from da3_serverless.sequence.assemble import Assembler  # noqa: E402
from da3_serverless.sequence.plan import windows  # noqa: E402
from reference import load_reference  # noqa: E402

IMAGES = REPO / "tests" / "data" / "images"
PHOTOS = [IMAGES / "soh-000.png", IMAGES / "soh-010.png"]
DEFAULT_PRESETS = ["da3-small", "da3-large", "da3-giant", "da3nested-giant-large"]
FOCAL_PX = 1000.0  # for da3metric-large, if chosen; the other presets ignore it
MIB = 1024**2
# Time a first compile of da3-large takes, at most, with an empty cache (started only if the
# budget has that much left).
COMPILE_NEEDS_S = 90.0


@dataclasses.dataclass
class Plan:
    """What one run measures."""

    device: torch.device
    presets: list[str]
    process_res: int = 504
    views: tuple[int, ...] = (1, 4, 16)
    batch: int = 8
    runs: int = 3
    sequence_frames: int = 32  # frames of the synthetic pan, in chunks overlapping by half
    sequence_chunk: int = 16
    compile_preset: str | None = "da3-large"
    budget_s: float = 225.0
    snapshots: Path = REPO / "artifacts" / "bench-snapshots"
    dtype: torch.dtype = torch.bfloat16


class Rows:
    """Measurements as JSON lines in `folder/rows.jsonl`, each flushed to disk when taken."""

    def __init__(self, folder: Path, plan: Plan) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "rows.jsonl"
        self.path.write_text("")
        self.rows: list[dict] = []
        self.start = time.perf_counter()
        self.plan = plan

    def add(self, preset: str, measure: str, **fields) -> dict:
        row = {"preset": preset, "measure": measure, **fields}
        row["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.rows.append(row)
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")
            file.flush()
            os.fsync(file.fileno())
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row

    def over_budget(self, preset: str, measure: str, needs_s: float = 0.0) -> bool:
        """True (and a row saying so) once the run has used its time budget, or would with a
        measurement that needs `needs_s` seconds."""
        if time.perf_counter() - self.start + needs_s <= self.plan.budget_s:
            return False
        self.add(preset, measure, skipped=f"time budget of {self.plan.budget_s:.0f} s used")
        return True


# ---- device helpers -----------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, plan: Plan, runs: int | None = None, warm_up: bool = True) -> tuple[float, object]:
    """Median seconds of `fn` over `runs` calls after one untimed warm-up; the last result."""
    result = None
    if warm_up:
        result = fn()
        sync(plan.device)
    times = []
    for _ in range(runs or plan.runs):
        start = time.perf_counter()
        result = fn()
        sync(plan.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measured(fn, plan: Plan, post_load: int | None, runs: int | None = None) -> dict:
    """Median seconds and peak memory of the timed calls of `fn` (after one warm-up), and
    whether allocated memory came back after them to its value after the warm-up: the
    post-load value plus what the first request keeps for good (cuBLAS / cuDNN workspaces),
    reported as `kept_by_first_request_bytes` when `post_load` is given."""
    fn()
    sync(plan.device)
    settled = allocated(plan.device)
    reset_peak(plan.device)
    seconds, result = timed(fn, plan, runs, warm_up=False)
    del result
    fields = {"seconds": round(seconds, 4), "peak_bytes": peak(plan.device)}
    if post_load is not None and settled is not None:
        fields["back_to_baseline"] = allocated(plan.device) == settled
        fields["kept_by_first_request_bytes"] = settled - post_load
    return fields


# ---- inputs -------------------------------------------------------------------------------


def scene_views(count: int) -> list[Image.Image]:
    """`count` views of one scene (the two photos, in turn)."""
    photos = [Image.open(path).convert("RGB") for path in PHOTOS]
    return [photos[i % len(photos)] for i in range(count)]


def unrelated_photos(count: int) -> list[Image.Image]:
    """`count` different photos of one size: the two photos mirrored, flipped and turned."""
    changes = [lambda im: im, ImageOps.mirror, ImageOps.flip, lambda im: im.rotate(180)]
    photos = [Image.open(path).convert("RGB") for path in PHOTOS]
    return [changes[(i // 2) % 4](photos[i % 2]) for i in range(count)]


def pan_frames(count: int) -> list[Image.Image]:
    """`count` frames of a synthetic pan: a window of 3/4 of the first photo's width sliding
    across it from left to right."""
    photo = Image.open(PHOTOS[0]).convert("RGB")
    width, height = photo.size
    window = width * 3 // 4
    step = (width - window) / max(count - 1, 1)
    return [
        photo.crop((round(i * step), 0, round(i * step) + window, height)) for i in range(count)
    ]


def snapshot(plan: Plan, preset: str, rows: Rows) -> Path:
    """The preset's random-weight snapshot, written (on the device) unless already there, then
    read once so the page cache is warm for the load timing."""
    folder = plan.snapshots / f"{preset}-seed0-{plan.device.type}"
    if not (folder / "model.safetensors").is_file():
        start = time.perf_counter()
        write_random_checkpoint(preset, folder, seed=0, device=plan.device)
        rows.add(preset, "write snapshot", seconds=round(time.perf_counter() - start, 2))
    with (folder / "model.safetensors").open("rb") as file:
        while file.read(64 * MIB):
            pass
    return folder


# ---- measurements -------------------------------------------------------------------------


def load(plan: Plan, folder: Path, preset: str, dtype: torch.dtype, rows: Rows) -> Predictor:
    free(plan.device)
    before = allocated(plan.device)
    start = time.perf_counter()
    predictor = Predictor.from_pretrained(folder, device=plan.device, dtype=dtype)
    sync(plan.device)
    seconds = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in predictor.network.state_dict().values())
    after = allocated(plan.device)
    rows.add(
        preset,
        "load",
        dtype=str(dtype).removeprefix("torch."),
        seconds=round(seconds, 3),
        weight_bytes=weights,
        device_bytes=None if after is None else after - before,
        note="page cache warm (snapshot read once before timing)",
    )
    return predictor


def batched(predictor: Predictor, photos: list[Image.Image], process_res: int) -> list:
    """The photos as one forward through the network's batch dimension (`predict_batch`)."""
    requests = [
        PredictRequest(photo, process_res=process_res, focal_length_px=FOCAL_PX) for photo in photos
    ]
    return predictor.predict_batch(requests, max_batch=len(photos))


def forward_input(predictor: Predictor, views: list[Image.Image], process_res: int):
    """The prepared network input of `views` (what both networks get)."""
    scene = predictor._check_arguments(views, process_res, False, None, None, None)
    return predictor._prepare(scene, process_res, FOCAL_PX, True, False)


def measure_views(
    plan: Plan, predictor: Predictor, post_load: int | None, preset: str, rows: Rows
) -> dict:
    """`predict` and the network forward alone for each view count; returns forward seconds
    per view count, for the reference's comparison."""
    forwards = {}
    for count in plan.views:
        shape = f"{count} view(s) @ {plan.process_res}"
        if rows.over_budget(preset, f"predict {shape}"):
            break
        views = scene_views(count)
        fields = measured(
            lambda v=views: predictor.predict(
                v, process_res=plan.process_res, focal_length_px=FOCAL_PX
            ),
            plan,
            post_load,
        )
        prepared = forward_input(predictor, views, plan.process_res)
        tokens = count * (prepared.batch.shape[-2] // 14) * (prepared.batch.shape[-1] // 14)
        if fields["peak_bytes"] is not None and post_load is not None:
            # What the request budget (api/budget.py: GPU_BYTES_PER_TOKEN) prices per token.
            fields["peak_over_weights_bytes_per_token"] = (
                fields["peak_bytes"] - post_load
            ) // tokens
        rows.add(preset, "predict", shape=shape, views=count, tokens=tokens, **fields)
        with torch.inference_mode():
            seconds, _ = timed(lambda p=prepared: predictor._forward(p), plan)
        forwards[count] = seconds
        rows.add(preset, "network forward", shape=shape, views=count, seconds=round(seconds, 4))
        del prepared
    return forwards


def measure_batching(
    plan: Plan, predictor: Predictor, post_load: int | None, preset: str, rows: Rows
) -> None:
    """A batch of unrelated photos: one forward (batching on) against one each (off)."""
    if rows.over_budget(preset, "batch"):
        return
    photos = unrelated_photos(plan.batch)
    shape = f"{plan.batch} photos @ {plan.process_res}"
    on = measured(lambda: batched(predictor, photos, plan.process_res), plan, post_load)
    rows.add(
        preset,
        "batching on",
        shape=shape,
        photos=plan.batch,
        **on,
        photos_per_s=round(plan.batch / on["seconds"], 2),
        note=f"one forward, batch dimension {plan.batch}, via Predictor.predict_batch",
    )

    def one_by_one():
        for photo in photos:
            predictor.predict(photo, process_res=plan.process_res, focal_length_px=FOCAL_PX)

    off = measured(one_by_one, plan, post_load)
    rows.add(
        preset,
        "batching off",
        shape=shape,
        photos=plan.batch,
        **off,
        photos_per_s=round(plan.batch / off["seconds"], 2),
        note="one predict per photo",
    )


def sequence_chunks(predictor: Predictor, frames: list[Image.Image], plan: Plan) -> int:
    """The device part of `sequence/pipeline.py`: `frames` in chunks of `plan.sequence_chunk`
    overlapping by half (`sequence/plan.windows`), each through `predict` and aligned to the
    one before (`Assembler`); returns the frames owned (each frame once)."""
    overlap = plan.sequence_chunk // 2
    assembler = Assembler(overlap)
    owned = 0
    for chunk, items in windows(frames, plan.sequence_chunk, overlap):
        prediction = predictor.predict(
            items, process_res=plan.process_res, focal_length_px=FOCAL_PX
        )
        owned += len(assembler.add(chunk, prediction).outputs.depth)
    return owned


def measure_sequence(
    plan: Plan, predictor: Predictor, post_load: int | None, preset: str, rows: Rows
) -> None:
    """Frames per second of the synthetic pan through `sequence_chunks` (one warm-up run)."""
    frames = pan_frames(plan.sequence_frames)
    shape = f"{len(frames)} frames, chunks of {plan.sequence_chunk} @ {plan.process_res}"
    if rows.over_budget(preset, "sequence"):
        return
    owned: list[int] = []
    run = lambda: owned.append(sequence_chunks(predictor, frames, plan))  # noqa: E731
    fields = measured(run, plan, post_load, runs=1)
    per_s = round(owned[-1] / fields["seconds"], 3)
    rows.add(preset, "sequence", shape=shape, frames=owned[-1], frames_per_s=per_s, **fields)


def relative_error(low: np.ndarray, reference: np.ndarray) -> dict:
    """Depth relative error |low - reference| / |reference| per pixel: p99 and max."""
    relative = np.abs(low - reference) / np.maximum(np.abs(reference), 1e-12)
    return {
        "error_p99": float(np.percentile(relative, 99)),
        "error_max": float(relative.max()),
    }


def measure_fp32(plan: Plan, folder: Path, low: Predictor, preset: str, rows: Rows) -> None:
    """bf16 against fp32: the fp32 load, its 1-view latency and the depth error of bf16."""
    if plan.dtype == torch.float32 or rows.over_budget(preset, "bf16 vs fp32"):
        return
    view = scene_views(1)
    ours = low.predict(view, process_res=plan.process_res, focal_length_px=FOCAL_PX)
    fp32 = load(plan, folder, preset, torch.float32, rows)
    shape = f"1 view(s) @ {plan.process_res}"
    fields = measured(
        lambda: fp32.predict(view, process_res=plan.process_res, focal_length_px=FOCAL_PX),
        plan,
        allocated(plan.device),
    )
    rows.add(preset, "predict fp32", shape=shape, views=1, **fields)
    exact = fp32.predict(view, process_res=plan.process_res, focal_length_px=FOCAL_PX)
    sky = {}
    if exact.sky is not None:  # a flipped sky decision is a jump to the filled-in far depth
        agree = (exact.sky >= SKY_THRESHOLD) == (ours.sky >= SKY_THRESHOLD)
        errors = relative_error(ours.depth[agree], exact.depth[agree])
        sky = {"sky_flipped_fraction": float(1 - agree.mean())}
        sky.update({f"{key}_sky_agreeing": value for key, value in errors.items()})
    rows.add(
        preset,
        "bf16 vs fp32",
        shape=shape,
        **relative_error(ours.depth, exact.depth),
        **sky,
        note="depth relative error of bf16 weights against fp32, at the input size",
    )


def measure_reference(
    plan: Plan, folder: Path, ours: Predictor, forwards: dict, preset: str, rows: Rows
) -> None:
    """The reference's default path (its wrapper: autocast, fp32 weights) on the same network
    inputs, each view count, against our network forward."""
    if rows.over_budget(preset, "reference"):
        return
    free(plan.device)
    reference = load_reference(preset, folder, device=plan.device)
    for count, our_seconds in forwards.items():
        shape = f"{count} view(s) @ {plan.process_res}"
        if rows.over_budget(preset, f"reference {shape}"):
            break
        prepared = forward_input(ours, scene_views(count), plan.process_res)
        fields = measured(lambda p=prepared: reference(p.batch, export_feat_layers=[]), plan, None)
        extra = {}
        if count == 1:
            with torch.inference_mode():
                mine = ours._forward(prepared).depth.float().cpu().numpy()
            theirs = reference(prepared.batch, export_feat_layers=[])["depth"].float().cpu()
            extra = {
                f"ours_vs_reference_{k}": v for k, v in relative_error(mine, theirs.numpy()).items()
            }
        rows.add(
            preset,
            "reference forward",
            shape=shape,
            views=count,
            **fields,
            **extra,
            ours_seconds=round(our_seconds, 4),
            speedup=round(fields["seconds"] / our_seconds, 3),
            note="the reference wrapper's default path against our network forward",
        )


def measure_compiled(plan: Plan, preset: str, rows: Rows) -> None:
    """`Predictor.compile` (inductor, no CUDA graphs, cache in a fresh folder): compile time on
    the first call and the speed-up of `predict` over eager, one shape."""
    if rows.over_budget(preset, "compiled", needs_s=COMPILE_NEEDS_S):
        return
    folder = snapshot(plan, preset, rows)
    predictor = Predictor.from_pretrained(folder, device=plan.device, dtype=plan.dtype)
    view = scene_views(1)

    def run():
        return predictor.predict(view, process_res=plan.process_res, focal_length_px=FOCAL_PX)

    eager, _ = timed(run, plan)
    with tempfile.TemporaryDirectory() as cache:
        predictor.compile(Path(cache))
        start = time.perf_counter()
        run()
        sync(plan.device)
        first = time.perf_counter() - start
        compiled, _ = timed(run, plan)
    rows.add(
        preset,
        "compiled",
        shape=f"1 view(s) @ {plan.process_res}",
        seconds=round(compiled, 4),
        eager_seconds=round(eager, 4),
        speedup=round(eager / compiled, 3),
        compile_seconds=round(first, 1),
        note="torch.compile, inductor cache in a fresh folder",
    )


def measure_preset(plan: Plan, preset: str, rows: Rows) -> None:
    if rows.over_budget(preset, "load"):
        return
    folder = snapshot(plan, preset, rows)
    predictor = load(plan, folder, preset, plan.dtype, rows)
    post_load = allocated(plan.device)
    forwards = measure_views(plan, predictor, post_load, preset, rows)
    measure_batching(plan, predictor, post_load, preset, rows)
    measure_sequence(plan, predictor, post_load, preset, rows)
    measure_fp32(plan, folder, predictor, preset, rows)
    free(plan.device)  # the fp32 copy
    measure_reference(plan, folder, predictor, forwards, preset, rows)
    del predictor
    free(plan.device)


# ---- report -------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _gib(count: int | None) -> str:
    return "" if count is None else f"{count / 1024**3:.2f} GiB"


def describe(row: dict) -> str:
    """The result cell of one row."""
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    measure = row["measure"]
    if measure == "load":
        return f"{_ms(row['seconds'])}; weights {_gib(row['weight_bytes'])}"
    if measure.startswith("batching"):
        return f"{_ms(row['seconds'])}; {row['photos_per_s']} photos/s"
    if measure == "sequence":
        return f"{_ms(row['seconds'])}; {row['frames_per_s']} frames/s"
    if measure == "bf16 vs fp32":
        text = f"p99 {row['error_p99']:.2%}, max {row['error_max']:.2%}"
        if "sky_flipped_fraction" in row:
            text += (
                f" ({row['sky_flipped_fraction']:.3%} of pixels flip sky; elsewhere p99 "
                f"{row['error_p99_sky_agreeing']:.2%}, max {row['error_max_sky_agreeing']:.2%})"
            )
        return text
    if measure == "reference forward":
        text = f"{_ms(row['seconds'])} vs ours {_ms(row['ours_seconds'])}: ours {row['speedup']}x"
        if "ours_vs_reference_error_p99" in row:
            text += f"; depth p99 {row['ours_vs_reference_error_p99']:.2%} apart"
        return text
    if measure == "compiled":
        return (
            f"{_ms(row['seconds'])} vs eager {_ms(row['eager_seconds'])}: {row['speedup']}x; "
            f"compile {row['compile_seconds']} s"
        )
    if measure == "environment":
        return row["torch"]
    if "peak_over_weights_bytes_per_token" in row:
        per_token = row["peak_over_weights_bytes_per_token"] / 1024**2
        return f"{_ms(row['seconds'])}; {per_token:.2f} MiB per token over the weights"
    return _ms(row["seconds"])


def table(rows: list[dict], plan: Plan, environment: dict) -> str:
    lines = [
        f"GPU check on {environment['device_name']}, torch {environment['torch']} "
        f"(CUDA {environment['cuda']}), {str(plan.dtype).removeprefix('torch.')} weights, "
        f"process_res {plan.process_res}, random weights; load times with the page cache warm. "
        "Peak = torch.cuda.max_memory_allocated during the timed calls; 'back' = allocated "
        "memory returned after them to its value after the first request (the post-load value "
        "plus what a first request keeps for good, `kept_by_first_request_bytes` in rows.jsonl).",
        "",
        "| preset | measurement | shape | result | peak memory | back |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["measure"] in ("environment", "imports"):
            continue
        back = {True: "yes", False: "NO"}.get(row.get("back_to_baseline"), "")
        lines.append(
            f"| {row['preset']} | {row['measure']} | {row.get('shape', '')} | {describe(row)} "
            f"| {_gib(row.get('peak_bytes'))} | {back} |"
        )
    return "\n".join(lines) + "\n"


def environment(plan: Plan) -> dict:
    cuda = plan.device.type == "cuda"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else "none",
        "device_name": torch.cuda.get_device_name(plan.device) if cuda else "CPU",
        "python": sys.version.split()[0],
    }


def imported_distributions() -> list[str]:
    """The installed distributions whose modules this process imported (what the check needs
    on a bare machine)."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    tops = {name.split(".")[0] for name in list(sys.modules)}
    return sorted({dist for top in tops for dist in owners.get(top, [])})


# ---- main ---------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> tuple[Plan, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for rows.jsonl, table.md")
    parser.add_argument("--only", nargs="+", metavar="PRESET", help="presets to measure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="da3-small, tiny shapes (tests)")
    parser.add_argument("--snapshots", type=Path, help="where snapshots are written")
    parser.add_argument("--budget-s", type=float, help="skip what is left after this many s")
    parser.add_argument(
        "--compile-preset", help="preset of the compiled measurement ('none' to skip)"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    plan = Plan(torch.device(args.device), args.only or DEFAULT_PRESETS)
    if args.quick:
        plan = dataclasses.replace(
            plan,
            presets=args.only or ["da3-small"],
            process_res=70,
            views=(1, 2),
            batch=2,
            runs=1,
            sequence_frames=6,
            sequence_chunk=4,
            budget_s=600.0,
        )
    # Compiling takes minutes on a CPU: the quick run leaves it out unless asked.
    compile_preset = args.compile_preset or (
        "none" if args.quick else "da3-large" if "da3-large" in plan.presets else plan.presets[0]
    )
    plan.compile_preset = None if compile_preset == "none" else compile_preset
    plan.dtype = getattr(torch, args.dtype)
    plan.snapshots = args.snapshots or plan.snapshots
    plan.budget_s = args.budget_s or plan.budget_s
    return plan, args.out


def main(argv: list[str] | None = None) -> None:
    plan, out = parse(argv)
    rows = Rows(out, plan)
    env = environment(plan)
    rows.add(
        "-",
        "environment",
        **env,
        plan={
            "presets": plan.presets,
            "views": plan.views,
            "process_res": plan.process_res,
            "batch": plan.batch,
            "runs": plan.runs,
        },
    )
    torch.manual_seed(0)
    for preset in plan.presets:
        measure_preset(plan, preset, rows)
    if plan.compile_preset:
        measure_compiled(plan, plan.compile_preset, rows)
        free(plan.device)
    else:
        rows.add("-", "compiled", skipped="not asked (--compile-preset none, the --quick default)")
    rows.add("-", "imports", distributions=imported_distributions())
    text = table(rows.rows, plan, env)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
