"""The `gaussians_ply` output end to end: through `Service.handle` (the real request path) with a
random-weight da3-small that carries the 3D-Gaussian head (the branch fits any any-view network;
written in the official layout and loaded as an operator's snapshot folder), read back with
plyfile; the one rule for models without the head; the request budget; `predict --out`, the
client's `save_all` and the self-hosted server; and one real DA3-GIANT snapshot (slow).

The head of the fast tests predicts no offsets (the output channels of the sub-pixel and depth
offsets are zeroed), so where each Gaussian must sit is known exactly: on the ray through its
grid cell's centre, at the predicted depth along that ray."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import plyfile
import pytest

from conftest import (
    FAKE_REVISION,
    SMALL_REPO,
    TEST_API_KEY,
    offline_settings,
    place_in_hf_cache,
    random_checkpoint,
)
from da3_serverless.api.budget import HOST_BYTES_PER_PIXEL, estimate_cost
from da3_serverless.api.errors import ServiceError
from da3_serverless.api.outputs import encode_scene, unavailable_outputs
from da3_serverless.api.schema import parse_request
from da3_serverless.client import parse_response
from da3_serverless.config import Settings
from da3_serverless.exports.gaussians import HELD_BYTES_PER_CELL, gaussian_bytes, select_gaussians
from da3_serverless.exports.points import SceneOptions, depth_edges, fuse
from da3_serverless.inference.catalog import MODELS, lookup_model
from da3_serverless.inference.prediction import Gaussians, Prediction
from da3_serverless.inference.predictor import Predictor
from da3_serverless.inference.preprocess import processing_size
from da3_serverless.model.checkpoint import WEIGHTS_NAME
from da3_serverless.model.presets import GAUSSIAN_RELEASES
from da3_serverless.service import Service
from paths import IMAGES

RES = 70  # the smallest grid that still has a few thousand Gaussians per view
PHOTOS = [IMAGES / "soh-000.png", IMAGES / "soh-010.png"]
HEIGHT, WIDTH = 680, 1208  # both photos
GRID_W, GRID_H = processing_size(WIDTH, HEIGHT, RES)
CELLS = 2 * GRID_H * GRID_W
# The 3DGS PLY layouts, in order: INRIA's (the default: what INRIA's 3DGS code, SIBR and the
# viewers read) and the compact one (degree-0 colour, no normals).
INRIA = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2",
         *(f"f_rest_{index}" for index in range(45)), "opacity",
         "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
COMPACT = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
           "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
# Every Gaussian: no filter, no cap (MAX_POINTS is 2 million: room for every input pixel too).
EVERY = {"conf_percentile": 0, "keep_sky": True, "remove_edges": False, "max_points": 2_000_000}
GIANT_REPO = "depth-anything/DA3-GIANT-1.1"


def settings_for(model: str | Path, workspace: Path, **overrides) -> Settings:
    return offline_settings(None, workspace, model_id=str(model), **overrides)


@pytest.fixture(scope="module")
def service(still_snapshot, tmp_path_factory) -> Service:
    """The operator's MODEL_ID is the snapshot folder (the real loading path)."""
    return Service(settings_for(still_snapshot, tmp_path_factory.mktemp("workspace")))


def photo(path: Path) -> dict[str, str]:
    return {"base64": base64.b64encode(path.read_bytes()).decode()}


def gs_request(**fields) -> dict:
    return {
        "api_key": TEST_API_KEY, "images": [photo(p) for p in PHOTOS], "process_res": RES,
        "outputs": ["depth", "depth_npy", "confidence_npy", "gaussians_ply"], **fields,
    }  # fmt: skip


def decoded(entry: dict) -> bytes:
    """An output's bytes: inline, or from the volume when it did not fit the response."""
    if "base64" in entry:
        return base64.b64decode(entry["base64"])
    return Path(entry["path"]).read_bytes()


def read_gaussians(data: bytes, layout: list[str] = INRIA) -> tuple[np.ndarray, list[str]]:
    """The vertices of a 3DGS PLY (checked to be in `layout`) and its comments."""
    ply = plyfile.PlyData.read(io.BytesIO(data))
    assert ply.header.splitlines()[1] == "format binary_little_endian 1.0"
    vertex = ply["vertex"]
    assert [prop.name for prop in vertex.properties] == layout
    assert {prop.val_dtype for prop in vertex.properties} == {"f4"}
    return vertex.data, [*ply.comments, *vertex.comments]


def sh_rest(vertices: np.ndarray) -> np.ndarray:
    """(M, 3, 15) the f_rest coefficients, channel first (INRIA's order)."""
    rest = np.stack([vertices[f"f_rest_{index}"] for index in range(45)], axis=-1)
    return rest.reshape(-1, 3, 15)


def xyz(vertices: np.ndarray) -> np.ndarray:
    return np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=-1).astype(np.float64)


def cell_pixels(size: int, cells: int) -> np.ndarray:
    """The input pixel holding each grid cell's centre (the README's rule), in floats."""
    return np.floor((np.arange(cells) + 0.5) * size / cells).astype(int)


def in_camera(points: np.ndarray, extrinsics: list) -> np.ndarray:
    pose = np.asarray(extrinsics, dtype=np.float64)
    return points @ pose[:, :3].T + pose[:, 3]


# ---- the real request path -------------------------------------------------------------------


def test_gaussians_sit_on_their_cells_rays_in_the_scene_frame(service):
    """Every Gaussian, in its view's camera frame (the response's extrinsics), projects with the
    response's intrinsics onto its grid cell's centre, at the depth of the scene_ply point of
    the pixel under that centre: the file overlays scene_ply, in its frame and units."""
    body = service.handle(gs_request(outputs=["depth", "scene_ply", "gaussians_ply"],
                                     return_base64=False, **EVERY))  # fmt: skip
    assert body["units"] == "relative" and body["views"][0]["extrinsics"] == np.eye(4)[:3].tolist()
    vertices, comments = read_gaussians(decoded(body["gaussians_ply"]))
    assert "units relative" in comments
    assert len(vertices) == body["gaussians"]["points"] == CELLS
    assert set(body["gaussians"]["removed"].values()) == {0}
    assert all("gaussians" not in view and "gaussians_ply" not in view for view in body["views"])
    # From its file on the volume (plyfile maps a file; it reads 1.6 million vertices from
    # bytes in memory much more slowly).
    scene = xyz(plyfile.PlyData.read(body["scene_ply"]["path"])["vertex"].data)
    assert len(scene) == 2 * HEIGHT * WIDTH  # every pixel, in (view, row, column) order
    gaussians = xyz(vertices).reshape(2, GRID_H, GRID_W, 3)
    rows, cols = cell_pixels(HEIGHT, GRID_H), cell_pixels(WIDTH, GRID_W)
    for index, view in enumerate(body["views"]):
        mine = in_camera(gaussians[index], view["extrinsics"])
        pixel_points = scene[index * HEIGHT * WIDTH + rows[:, None] * WIDTH + cols[None, :]]
        theirs = in_camera(pixel_points, view["extrinsics"])
        # The ray: float32 rounding only (a frame or scale error moves them by many pixels).
        projected = mine @ np.asarray(view["intrinsics"]).T
        centre_x = (np.arange(GRID_W) + 0.5) * WIDTH / GRID_W
        centre_y = (np.arange(GRID_H) + 0.5) * HEIGHT / GRID_H
        assert np.abs(projected[..., 0] / projected[..., 2] - centre_x[None, :]).max() < 0.01
        assert np.abs(projected[..., 1] / projected[..., 2] - centre_y[:, None]).max() < 0.01
        # The depth, as a distance along the unit ray (the reference's convention for the
        # Gaussians; scene points have it as z): the input-size depth is the grid's, resized
        # bilinearly, read at a pixel centre within half an input pixel of the cell's centre,
        # so it differs from the cell's value by at most half a pixel's step of the depth
        # (measured: 1.6 % at most on this random network's rough depth, 0.1 % typically).
        depth = theirs[..., 2]
        distance = np.linalg.norm(mine, axis=-1)
        assert np.abs(distance / depth - 1).max() < 0.05
        assert np.median(np.abs(distance / depth - 1)) < 0.005


def test_filters_keep_the_gaussians_of_the_scenes_kept_pixels(service):
    """With the default filters, the file holds exactly the Gaussians whose cell's pixel the
    scene keeps (invalid, edges, confidence below the scene's own threshold), in order."""
    every, _ = read_gaussians(decoded(service.handle(gs_request(**EVERY))["gaussians_ply"]))
    body = service.handle(gs_request(outputs=[*gs_request()["outputs"], "scene_ply"],
                                     max_points=2_000_000))  # fmt: skip
    vertices, _ = read_gaussians(decoded(body["gaussians_ply"]))
    summary = body["gaussians"]
    assert summary["confidence_threshold"] == body["scene"]["confidence_threshold"] is not None
    kept_cells = []
    for view in body["views"]:
        depth = np.load(io.BytesIO(decoded(view["depth_npy"])))
        confidence = np.load(io.BytesIO(decoded(view["confidence_npy"])))
        kept = ~depth_edges(depth) & (confidence >= summary["confidence_threshold"])
        kept_cells.append(kept[np.ix_(cell_pixels(HEIGHT, GRID_H), cell_pixels(WIDTH, GRID_W))])
    kept_cells = np.stack(kept_cells).reshape(-1)
    assert 0 < kept_cells.sum() < CELLS
    np.testing.assert_array_equal(vertices, every[kept_cells])
    removed = summary["removed"]
    assert removed["edges"] > 0 and removed["confidence"] > 0 and removed["voxel"] == 0
    assert summary["points"] + sum(removed.values()) == CELLS
    assert summary["voxel_size"] is None


def test_max_points_holds_and_the_same_request_gives_the_same_file(service):
    first, second = (service.handle(gs_request(max_points=500)) for _ in range(2))
    assert decoded(first["gaussians_ply"]) == decoded(second["gaussians_ply"])
    assert first["gaussians"] == second["gaussians"]
    vertices, _ = read_gaussians(decoded(first["gaussians_ply"]))
    filtered, _ = read_gaussians(decoded(service.handle(gs_request())["gaussians_ply"]))
    summary = first["gaussians"]
    assert 0 < len(vertices) == summary["points"] <= 500
    assert summary["voxel_size"] > 0
    assert summary["removed"]["voxel"] == len(filtered) - len(vertices)
    # The voxel grid keeps original Gaussians (no averaging), in file order.
    position = {row.tobytes(): index for index, row in enumerate(filtered)}
    indices = [position[row.tobytes()] for row in vertices]
    assert indices == sorted(indices)


def test_the_branch_runs_only_when_gaussians_ply_is_asked_for(service):
    calls = []
    with service.model_cache.use(service.default_model_id) as predictor:
        assert predictor.supports_gaussians and predictor.capabilities.gaussians
        hook = predictor.network.gs_head.register_forward_hook(lambda *_: calls.append(1))
        try:
            plain = service.handle(gs_request(outputs=["depth", "scene_ply"]))
            assert calls == [] and "gaussians_ply" not in plain and "gaussians" not in plain
            service.handle(gs_request(outputs=["depth", "gaussians_ply"]))
            assert calls == [1]
        finally:
            hook.remove()


def test_a_batch_runs_the_branch_for_the_requests_that_ask_and_equals_their_lone_answers(service):
    """One photo each (batchable): `gaussians_ply` is a forward flag of the batch key, so the
    requests that ask batch apart from the ones that do not, and each gets its lone answer."""
    one = {"images": [photo(PHOTOS[0])], "max_points": 2000}
    asks = gs_request(**one, outputs=["depth_npy", "gaussians_ply"])
    plain = gs_request(**one, outputs=["depth_npy"])
    keys = {service.batch_key(service.authorize(r)) for r in (asks, plain)}
    assert len(keys) == 2 and None not in keys
    batched = service.handle_batch([(asks, None, None), (plain, None, None), (asks, None, None)])
    assert not [r for r in batched if isinstance(r, Exception)]
    alone = service.handle(asks)
    assert "gaussians_ply" not in batched[1] and "gaussians" not in batched[1]
    summary, lone = batched[0]["gaussians"], alone["gaussians"]
    assert summary["points"] == lone["points"] and summary["removed"] == lone["removed"]
    assert summary["confidence_threshold"] == pytest.approx(lone["confidence_threshold"], 1e-4)
    want, _ = read_gaussians(decoded(alone["gaussians_ply"]))
    for answer in (batched[0], batched[2]):
        got, _ = read_gaussians(decoded(answer["gaussians_ply"]))
        assert len(got) == len(want)
        for name in INRIA:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_given_poses_move_the_gaussians_into_their_frame_and_units(service, still_snapshot):
    """With given poses the file is in their frame and units: exactly the Predictor's Gaussians
    (moved with the cameras, tested in test_gaussians.py), each at its depth from its camera."""
    k = [[900.0, 0, 604], [0, 900.0, 340], [0, 0, 1]]
    turn = np.array([[0.96, 0, 0.28], [0, 1, 0], [-0.28, 0, 0.96]])
    poses = [[[1.0, 0, 0, 5], [0, 1.0, 0, -3], [0, 0, 1.0, 2]],
             np.c_[turn, [-40.0, 1, 3]].tolist()]  # fmt: skip
    cameras = {"intrinsics": [k, k], "extrinsics": poses}
    body = service.handle(gs_request(**cameras, **EVERY))
    assert body["units"] == "pose_units"
    vertices, comments = read_gaussians(decoded(body["gaussians_ply"]))
    assert "units pose_units" in comments
    predictor = Predictor.from_pretrained(still_snapshot, device="cpu")
    prediction = predictor.predict(PHOTOS, process_res=RES, gaussians=True, **cameras)
    # (The service re-orthonormalises the given rotations: equal up to float rounding.)
    expected = prediction.gaussians.means.reshape(-1, 3)
    np.testing.assert_allclose(xyz(vertices), expected, rtol=1e-5, atol=1e-5)
    # Degrees 1 and 2 of the colour, turned with the frame (test_gaussians.py checks the turn).
    rest = prediction.gaussians.sh_rest.reshape(-1, 3, 8)
    np.testing.assert_allclose(sh_rest(vertices)[:, :, :8], rest, rtol=1e-4, atol=1e-6)
    assert not sh_rest(vertices)[:, :, 8:].any() and np.abs(rest).max() > 0
    means = xyz(vertices).reshape(2, GRID_H, GRID_W, 3)
    rows, cols = cell_pixels(HEIGHT, GRID_H), cell_pixels(WIDTH, GRID_W)
    for index, view in enumerate(body["views"]):
        depth = np.load(io.BytesIO(decoded(view["depth_npy"])))[np.ix_(rows, cols)]
        distance = np.linalg.norm(in_camera(means[index], view["extrinsics"]), axis=-1)
        assert np.median(np.abs(distance / depth - 1)) < 0.005  # as above, in the poses' units


def test_the_compact_file_on_request(service):
    """`gaussians_compact`: the same Gaussians without normals and higher bands."""
    full, _ = read_gaussians(decoded(service.handle(gs_request())["gaussians_ply"]))
    body = service.handle(gs_request(gaussians_compact=True))
    compact, comments = read_gaussians(decoded(body["gaussians_ply"]), COMPACT)
    assert "units relative" in comments and len(compact) == len(full) > 0
    for name in COMPACT:
        np.testing.assert_array_equal(compact[name], full[name])


# ---- models without the head: the one rule ------------------------------------------------


def test_the_catalog_says_which_releases_carry_the_head():
    assert {info.preset for info in MODELS if info.gaussians} == GAUSSIAN_RELEASES
    request = parse_request({"image_url": "u", "outputs": ["depth", "gaussians_ply"]})
    for name in ("da3-giant", "da3-giant-1.1", "da3nested-giant-large", GIANT_REPO):
        assert unavailable_outputs(request, lookup_model(name)) == [], name
    (reason,) = unavailable_outputs(request, lookup_model("da3-large"))
    assert reason.startswith("gaussians_ply: the checkpoint of depth-anything/DA3-LARGE")
    assert "no 3D-Gaussian head" in reason and "da3-giant-1.1" in reason


def test_a_model_without_the_head_is_refused_before_decoding(hf_cache, small_snapshot, tmp_path):
    """A catalog model without the head, and a snapshot folder whose file has none (known from
    its header before loading): refused up front, so a broken image is not even looked at."""
    broken = {**gs_request(), "images": [{"base64": "not an image"}]}
    for model in (SMALL_REPO, small_snapshot):
        service = Service(settings_for(model, tmp_path / "ws", hf_home=hf_cache))
        with pytest.raises(ServiceError) as error:
            service.handle(broken)
        assert error.value.code == "invalid_input"
        assert "gaussians_ply: the checkpoint of depth-anything/DA3-SMALL in use has no " \
            "3D-Gaussian head" in error.value.message  # fmt: skip
        assert service.model_cache.loaded() == []  # refused before loading anything


def test_the_loaded_file_decides_not_the_name(small_snapshot, tmp_path):
    """A checkpoint without the head under a release's name that ships one: the catalog lets
    the request through, the loaded network refuses it by the same rule."""
    cache = tmp_path / "hf"
    place_in_hf_cache(small_snapshot, cache, GIANT_REPO)
    assert (cache / "hub" / "models--depth-anything--DA3-GIANT-1.1" / "snapshots"
            / FAKE_REVISION / WEIGHTS_NAME).is_file()  # fmt: skip
    service = Service(settings_for(GIANT_REPO, tmp_path / "ws", hf_home=cache))
    with pytest.raises(ServiceError) as error:
        service.handle(gs_request())
    assert error.value.code == "invalid_input"
    # The loaded file is a da3-small network: the message says what the checkpoint is.
    assert "gaussians_ply: the checkpoint of depth-anything/DA3-SMALL in use has no " \
        "3D-Gaussian head" in error.value.message  # fmt: skip
    assert service.model_cache.loaded() == [GIANT_REPO]  # it was known only once loaded
    assert service.handle(gs_request(outputs=["depth"]))["model_id"] == GIANT_REPO


def test_models_says_which_models_can_give_gaussians(service):
    table = {row["model_id"]: row for row in service.model_table()}
    assert table[GIANT_REPO]["gaussians"] is True
    assert table["depth-anything/DA3NESTED-GIANT-LARGE-1.1"]["gaussians"] is True
    assert table[SMALL_REPO]["gaussians"] is False


# ---- the request budget --------------------------------------------------------------------


def test_the_request_budget_covers_the_export(service, still_snapshot, tmp_path):
    """The export's host memory (tracemalloc's peak while selecting, writing and encoding, plus
    the Gaussians the prediction holds) is within what the budget charges for it, and a server
    whose budget has no room for it refuses the request before decoding."""
    sizes = [(WIDTH, HEIGHT)] * 2
    plain = estimate_cost(str(still_snapshot), RES, sizes)
    cost = estimate_cost(str(still_snapshot), RES, sizes, gaussian_points=200_000)
    assert plain.gaussian_pixels == 0 and cost.pixels == plain.pixels
    charged = cost.gaussian_pixels * HOST_BYTES_PER_PIXEL
    assert charged >= gaussian_bytes(plain.pixels, CELLS, 200_000)

    predictor = Predictor.from_pretrained(still_snapshot, device="cpu")
    prediction = predictor.predict(PHOTOS, process_res=RES, gaussians=True)
    request = parse_request(gs_request(outputs=["gaussians_ply"], **EVERY))
    tracemalloc.start()
    try:
        artifacts, _ = encode_scene(request, prediction, [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(artifacts) == 1 and artifacts[0].fields["gaussians"]["points"] == CELLS
    held = HELD_BYTES_PER_CELL * CELLS
    assert peak + held <= gaussian_bytes(plain.pixels, CELLS, 2_000_000)

    tight = Service(settings_for(still_snapshot, tmp_path / "ws",
                                 request_budget_pixels=plain.pixels))  # fmt: skip
    with pytest.raises(ServiceError) as error:
        tight.handle(gs_request())
    assert error.value.code == "request_too_large" and "gaussians_ply" in error.value.message
    assert tight.handle(gs_request(outputs=["depth"]))["units"] == "relative"


def test_a_batch_is_priced_with_its_gaussians(still_snapshot, tmp_path):
    """Two one-photo `gaussians_ply` requests that each fit the pixel budget but not together
    run as two forwards; without the Gaussians the same two share one."""
    one = {"images": [photo(PHOTOS[0])], "max_points": 2000}
    cost = estimate_cost(str(still_snapshot), RES, [(WIDTH, HEIGHT)], gaussian_points=2000)
    budget = 2 * cost.pixels + cost.gaussian_pixels  # two maps, but one request's Gaussians
    assert cost.gaussian_pixels > 0 and cost.host_pixels <= budget < 2 * cost.host_pixels
    service = Service(settings_for(still_snapshot, tmp_path / "ws", warmup=False,
                                   request_budget_pixels=budget))  # fmt: skip
    network = service.model_cache.get(str(still_snapshot)).network
    batches = []
    hook = network.register_forward_pre_hook(lambda _, args: batches.append(len(args[0])))
    try:
        for outputs, expected in ((["gaussians_ply"], [1, 1]), (["depth"], [2])):
            batches.clear()
            items = [(gs_request(**one, outputs=outputs), None, None)] * 2
            answers = service.handle_batch(items)
            assert not [a for a in answers if isinstance(a, Exception)], answers
            assert batches == expected
    finally:
        hook.remove()


# ---- the selection on synthetic predictions ---------------------------------------------------


def synthetic(sky: bool = True) -> Prediction:
    """Two views of 40 x 60 pixels with sky in the top rows, Gaussians on a 10 x 16 grid (the
    cells do not fall on whole pixels), one of them not finite."""
    rng = np.random.default_rng(0)
    depth = (2 + rng.random((2, 40, 60))).astype(np.float32)
    sky_map = np.zeros_like(depth)
    sky_map[:, :9] = 0.9
    intrinsics = np.tile(np.array([[50.0, 0, 30], [0, 50.0, 20], [0, 0, 1]]), (2, 1, 1))
    extrinsics = np.tile(np.eye(4)[:3], (2, 1, 1)).astype(np.float32)
    extrinsics[1, :, 3] = [0.3, 0, 0]
    grid = (2, 10, 16)
    gaussians = Gaussians(
        means=rng.normal(size=(*grid, 3)).astype(np.float32),
        scales=rng.uniform(0.01, 0.1, size=(*grid, 3)).astype(np.float32),
        rotations=rng.normal(size=(*grid, 4)).astype(np.float32),
        opacities=rng.uniform(0.1, 0.9, size=grid).astype(np.float32),
        colors=rng.uniform(0, 1, size=(*grid, 3)).astype(np.float32),
    )
    gaussians.scales[1, 5, 7, 0] = np.inf
    confidence = (1 + rng.random(depth.shape)).astype(np.float32)
    return Prediction(depth, confidence, sky_map if sky else None, intrinsics.astype(np.float32),
                      extrinsics, False, "relative", gaussians)  # fmt: skip


@pytest.mark.parametrize("keep_sky", [False, True])
def test_a_gaussian_is_kept_exactly_when_the_scene_keeps_its_cells_pixel(keep_sky):
    prediction = synthetic()
    options = SceneOptions(conf_percentile=30, keep_sky=keep_sky, max_points=10**6)
    points = fuse(prediction, [np.zeros((40, 60, 3), np.uint8)] * 2, options)
    kept_pixels = set(zip(points.view.tolist(), points.row.tolist(), points.col.tolist(),
                          strict=True))  # fmt: skip
    selection = select_gaussians(prediction, options)
    rows, cols = cell_pixels(40, 10), cell_pixels(60, 16)
    expected = np.array([[[(v, rows[r], cols[c]) in kept_pixels for c in range(16)]
                          for r in range(10)] for v in range(2)])  # fmt: skip
    expected[1, 5, 7] = False  # its scale is not finite: invalid
    np.testing.assert_array_equal(selection.keep, expected)
    summary = selection.summary()
    assert summary["removed"]["invalid"] == 1
    sky_cells = 2 * 16 * np.count_nonzero(rows < 9)
    assert summary["removed"]["sky"] == (0 if keep_sky else sky_cells)
    assert summary["confidence_threshold"] == points.confidence_threshold
    assert summary["points"] + sum(summary["removed"].values()) == 2 * 10 * 16


def test_a_prediction_without_gaussians_cannot_give_the_file():
    prediction = synthetic()
    prediction.gaussians = None
    with pytest.raises(ValueError, match="gaussians=True"):
        select_gaussians(prediction, SceneOptions())


# ---- predict --out, the client and the server -------------------------------------------------


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "da3_serverless.cli", *args],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def test_predict_out_and_save_all_write_the_file(service, service_env, still_snapshot, tmp_path):
    """`predict --out` writes the bytes the service returns for the same request, under the
    name the client's save_all gives them; a model without the head is refused (exit 2)."""
    out = tmp_path / "scene"
    done = cli(service_env, "predict", *map(str, PHOTOS), "--model", str(still_snapshot),
               "--out", str(out), "--outputs", "depth,gaussians_ply", "--process-res", str(RES),
               "--max-points", "3000")  # fmt: skip
    assert done.returncode == 0, done.stderr
    body = service.handle(gs_request(outputs=["depth", "gaussians_ply"], max_points=3000))
    result = parse_response(body)
    assert result.gaussians_ply == decoded(body["gaussians_ply"]) and result.gaussians
    saved = {path.name: path for path in result.save_all(tmp_path / "client", "scene")}
    assert saved["scene.gaussians.ply"].read_bytes() == result.gaussians_ply
    assert (out / "scene.gaussians.ply").read_bytes() == result.gaussians_ply
    metadata = json.loads((out / "scene.json").read_text())
    assert metadata["gaussians"] == body["gaussians"]
    assert metadata["files"]["gaussians_ply"] == "scene.gaussians.ply"

    refused = cli(service_env, "predict", str(PHOTOS[0]), "--out", str(tmp_path / "no"),
                  "--outputs", "depth,gaussians_ply", "--process-res", str(RES))  # fmt: skip
    assert (
        refused.returncode == 2
        and "gaussians_ply: the checkpoint of" in refused.stderr
        and "this server" not in refused.stderr
    )
    assert not (tmp_path / "no").exists()


@pytest.mark.slow
def test_through_the_server_and_the_client(service_env, still_snapshot, tmp_path):
    from da3_serverless.client import Client
    from servers import serve_process

    env = {**service_env, "MODEL_ID": str(still_snapshot)}
    with (
        serve_process(env, tmp_path / "serve.log") as (url, _),
        Client(url, api_key=TEST_API_KEY) as client,
    ):
        models = {row["model_id"]: row["gaussians"] for row in client.models()}
        result = client.depth(PHOTOS, outputs=["depth", "gaussians_ply"], process_res=RES,
                              max_points=4000)  # fmt: skip
    vertices, comments = read_gaussians(result.gaussians_ply)
    assert models[GIANT_REPO] and not models[SMALL_REPO]
    assert 0 < len(vertices) == result.gaussians["points"] <= 4000
    written = [path.name for path in result.save_all(tmp_path / "out", "garden")]
    assert "garden.gaussians.ply" in written and "units relative" in comments


# ---- a real DA3-GIANT snapshot ---------------------------------------------------------------


@pytest.mark.slow
def test_a_random_da3_giant_gives_its_gaussians(tmp_path, tmp_path_factory):
    """The release's network (its checkpoint has the head by default), 2 views at process_res
    70: a standard 3DGS PLY of the filtered Gaussians, the same bytes on repeat."""
    with random_checkpoint(tmp_path_factory, "da3-giant", seed=0) as folder:
        service = Service(settings_for(folder, tmp_path / "ws"))
        first, second = (service.handle(gs_request(max_points=2000)) for _ in range(2))
    assert decoded(first["gaussians_ply"]) == decoded(second["gaussians_ply"])
    vertices, comments = read_gaussians(decoded(first["gaussians_ply"]))
    assert 0 < len(vertices) == first["gaussians"]["points"] <= 2000
    assert np.isfinite(xyz(vertices)).all() and "units relative" in comments
    assert first["gaussians"]["confidence_threshold"] is not None
