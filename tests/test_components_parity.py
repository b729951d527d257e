"""Parity of the DA3 heads and camera components with the reference implementation.

Each component is built with the reference config values of a real preset, both copies get the
same seeded random weights (ours loads the reference's state dict strictly, which also proves the
key names match) and the same small random inputs; outputs must agree to 1e-4 relative in fp32.
"""

from __future__ import annotations

import pytest
import torch
from addict import Dict
from depth_anything_3.model.cam_dec import CameraDec as RefCameraDec
from depth_anything_3.model.cam_enc import CameraEnc as RefCameraEnc
from depth_anything_3.model.da3 import DepthAnything3Net, NestedDepthAnything3Net
from depth_anything_3.model.dpt import DPT as RefDPT
from depth_anything_3.model.dualdpt import DualDPT as RefDualDPT
from depth_anything_3.model.utils.transform import (
    extri_intri_to_pose_encoding,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
)
from depth_anything_3.utils.alignment import (
    apply_metric_scaling,
    compute_sky_mask,
    least_squares_scale_scalar,
    set_sky_regions_to_max_depth,
)
from depth_anything_3.utils.geometry import affine_inverse
from depth_anything_3.utils.ray_utils import get_extrinsic_from_camray

from da3_serverless.model.alignment import (
    align_to_metric,
    exact_quantile,
    fill_sky,
    least_squares_scale,
    metric_depth_from_focal,
    mono_sky_fill,
    non_sky_mask,
)
from da3_serverless.model.camera import (
    CameraDec,
    CameraEnc,
    camera_from_pose_encoding,
    invert_rigid,
    pose_encoding_from_camera,
    quaternion_to_rotation,
    rotation_to_quaternion,
)
from da3_serverless.model.dpt import DPT, DualDPT
from da3_serverless.model.rays import camera_from_rays, pose_from_rays
from da3_serverless.model.rng import RNG_SEED, seeded_generator
from reference import assert_close, assert_within_sampling_error, randomized

# (dim_in, features, out_channels) of the heads in the reference configs.
DUALDPT_PRESETS = {
    "da3-small": (768, 64, [48, 96, 192, 384]),
    "da3-base": (1536, 128, [96, 192, 384, 768]),
    "da3-large": (2048, 256, [256, 512, 1024, 1024]),
}
# Camera encoder width (dim_out) and decoder input width (dim_in) of the any-view presets.
CAMERA_PRESETS = {"da3-small": (384, 768), "da3-large": (1024, 2048)}
DPT_PRESETS = {"da3mono-large": (1024, 256, [256, 512, 1024, 1024])}  # same for da3metric-large


def presets(table: dict) -> list:
    """The table's presets as parameters; da3-large's heads are marked `large` (test-fast)."""
    return [pytest.param(name, marks=pytest.mark.large) if name == "da3-large" else name
            for name in sorted(table)]  # fmt: skip


def copy_into(ours: torch.nn.Module, ref: torch.nn.Module) -> torch.nn.Module:
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval()


def head_inputs(
    dim_in: int, views: int = 2, grid: tuple[int, int] = (2, 3), seed: int = 1
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, int]:
    """4 backbone layers as the network hands them over: (tokens (1, S, p*q, dim_in), cam token)."""
    gen = torch.Generator().manual_seed(seed)
    feats = [
        (
            torch.randn(1, views, grid[0] * grid[1], dim_in, generator=gen),
            torch.randn(1, views, dim_in, generator=gen),
        )
        for _ in range(4)
    ]
    return feats, grid[0] * 14, grid[1] * 14


@pytest.mark.parametrize("preset", presets(DUALDPT_PRESETS))
def test_dualdpt_matches_reference(preset: str) -> None:
    dim_in, features, out_channels = DUALDPT_PRESETS[preset]
    torch.manual_seed(0)
    ref = randomized(
        RefDualDPT(dim_in=dim_in, output_dim=2, features=features, out_channels=out_channels), 0
    )
    ours = copy_into(
        DualDPT(dim_in=dim_in, output_dim=2, features=features, out_channels=out_channels), ref
    )
    # Like the reference, all ray output branches share one LayerNorm (stored once in releases).
    shared = {id(b[2].weight) for b in ours.scratch.output_conv2_aux}
    assert len(shared) == len({id(b[2].weight) for b in ref.scratch.output_conv2_aux}) == 1
    feats, H, W = head_inputs(dim_in)
    with torch.no_grad():
        expected = ref(feats, H, W, patch_start_idx=0)
        got = ours(feats, H, W, patch_start_idx=0)
        no_rays = ours(feats, H, W, patch_start_idx=0, compute_rays=False)
        one_by_one = ours(feats, H, W, patch_start_idx=0, chunk_size=1)

    assert set(got) == {"depth", "depth_conf", "ray", "ray_conf"}
    assert got["depth"].shape == (1, 2, H, W)
    assert got["ray"].shape == (1, 2, 8 * 2, 8 * 3, 6)
    assert got["ray_conf"].shape == (1, 2, 16, 24)
    for key in got:
        assert_close(got[key], expected[key])
        assert_close(one_by_one[key], expected[key])
    assert set(no_rays) == {"depth", "depth_conf"}
    for key in no_rays:
        assert torch.equal(no_rays[key], got[key])

    # Tokens handed over in bf16 (backbone under autocast) are decoded in the head's fp32.
    bf16_feats = [(t.bfloat16(), c.bfloat16()) for t, c in feats]
    rounded_feats = [(t.bfloat16().float(), c) for t, c in feats]
    with torch.no_grad():
        from_bf16 = ours(bf16_feats, H, W, patch_start_idx=0)
        from_rounded = ours(rounded_feats, H, W, patch_start_idx=0)
    for key in got:
        assert from_bf16[key].dtype == torch.float32
        assert torch.equal(from_bf16[key], from_rounded[key])


@pytest.mark.parametrize("preset", sorted(DPT_PRESETS))
def test_dpt_matches_reference(preset: str) -> None:
    dim_in, features, out_channels = DPT_PRESETS[preset]
    torch.manual_seed(0)
    ref = randomized(
        RefDPT(dim_in=dim_in, output_dim=1, features=features, out_channels=out_channels), 0
    )
    ours = copy_into(
        DPT(dim_in=dim_in, output_dim=1, features=features, out_channels=out_channels), ref
    )
    feats, H, W = head_inputs(dim_in, grid=(3, 2))
    with torch.no_grad():
        expected = ref(feats, H, W, patch_start_idx=0)
        got = ours(feats, H, W, patch_start_idx=0)

    assert set(got) == {"depth", "sky"}
    assert got["depth"].shape == (1, 2, H, W)
    for key in got:
        assert_close(got[key], expected[key])


def random_cameras(views: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World-to-camera (1, views, 4, 4) rigid transforms and pixel intrinsics (1, views, 3, 3)."""
    gen = torch.Generator().manual_seed(seed)
    rot = quat_to_mat(torch.randn(1, views, 4, generator=gen))
    trans = torch.randn(1, views, 3, 1, generator=gen)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(1, views, 1, 4)
    ext = torch.cat([torch.cat([rot, trans], dim=-1), bottom], dim=-2)
    ixt = torch.zeros(1, views, 3, 3)
    ixt[..., 0, 0] = 20 + 40 * torch.rand(1, views, generator=gen)
    ixt[..., 1, 1] = 20 + 40 * torch.rand(1, views, generator=gen)
    ixt[..., 0, 2], ixt[..., 1, 2], ixt[..., 2, 2] = 21.0, 14.0, 1.0
    return ext, ixt


def test_rigid_inverse_and_quaternions_match_reference() -> None:
    ext, _ = random_cameras(64, seed=2)
    assert_close(invert_rigid(ext), affine_inverse(ext))
    assert_close(invert_rigid(ext[..., :3, :]), affine_inverse(ext[..., :3, :]))
    # Half-turns about each axis put the pivot on x, y and z as well as w.
    half_turns = torch.diag_embed(torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]]))
    rotations = torch.cat([ext[0, :, :3, :3], half_turns])
    quat = rotation_to_quaternion(rotations)
    assert_close(quat, mat_to_quat(rotations))
    assert (quat[:, 3] >= 0).all()
    assert_close(quaternion_to_rotation(quat), quat_to_mat(quat))
    assert_close(quaternion_to_rotation(3.0 * quat), rotations)


def test_pose_encoding_matches_reference_both_ways() -> None:
    ext, ixt = random_cameras(5, seed=3)
    cam_to_world = affine_inverse(ext)
    encoding = pose_encoding_from_camera(cam_to_world, ixt, (28, 42))
    assert encoding.shape == (1, 5, 9)
    assert_close(encoding, extri_intri_to_pose_encoding(cam_to_world, ixt, (28, 42)))
    got_c2w, got_k = camera_from_pose_encoding(encoding, (28, 42))
    ref_c2w, ref_k = pose_encoding_to_extri_intri(encoding, (28, 42))
    assert_close(got_c2w, ref_c2w)
    assert_close(got_k, ref_k)
    # The round trip gives the cameras back (principal point moves to the image centre).
    assert_close(got_c2w, cam_to_world[..., :3, :])
    assert_close(got_k, ixt)


@pytest.mark.parametrize("preset", presets(CAMERA_PRESETS))
def test_camera_encoder_matches_reference(preset: str) -> None:
    dim_out, _ = CAMERA_PRESETS[preset]
    torch.manual_seed(0)
    ref = randomized(RefCameraEnc(dim_out=dim_out), 0)
    ours = copy_into(CameraEnc(dim_out=dim_out), ref)
    ext, ixt = random_cameras(3, seed=4)
    with torch.no_grad():
        got = ours(ext, ixt, (28, 42))
        assert_close(got, ref(ext, ixt, (28, 42)))
    assert got.shape == (1, 3, dim_out)


@pytest.mark.parametrize("preset", presets(CAMERA_PRESETS))
def test_camera_decoder_matches_reference(preset: str) -> None:
    _, dim_in = CAMERA_PRESETS[preset]
    torch.manual_seed(0)
    ref = randomized(RefCameraDec(dim_in=dim_in), 0)
    ours = copy_into(CameraDec(dim_in=dim_in), ref)
    tokens = torch.randn(1, 3, dim_in, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = ours(tokens)
        assert_close(got, ref(tokens))
    assert got.shape == (1, 3, 9)


def synthetic_ray_map(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy rays of a known camera with 5 % outliers and a few directions in the image plane.

    Returns ray (h, w, 6), confidence (h, w) and the true cam-to-world rotation (3, 3).
    """
    gen = torch.Generator().manual_seed(seed)
    rotation = quat_to_mat(torch.randn(4, generator=gen))
    centre = torch.randn(3, generator=gen)
    # Normalised intrinsics (the image spans 2 units) with a centred principal point.
    k_inv = torch.linalg.inv(torch.tensor([[1.2, 0.0, 1.0], [0.0, 1.4, 1.0], [0.0, 0.0, 1.0]]))
    ys, xs = torch.meshgrid(
        (torch.arange(h) + 0.5) / h * 2, (torch.arange(w) + 0.5) / w * 2, indexing="ij"
    )
    pixels = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)
    directions = pixels @ k_inv.T @ rotation.T
    directions += 0.005 * torch.randn(directions.shape, generator=gen)
    outliers = torch.rand(h, w, generator=gen) < 0.05
    directions[outliers] = torch.randn(int(outliers.sum()), 3, generator=gen)
    directions[0, :5, 2] = 0.0
    origins = centre + 0.01 * torch.randn(h, w, 3, generator=gen)
    confidence = 1 + torch.rand(h, w, generator=gen).exp()
    return torch.cat([directions, origins], dim=-1), confidence, rotation


def reference_ray_pose(
    ray: torch.Tensor, conf: torch.Tensor, image_hw: tuple[int, int], seed: int
) -> tuple[torch.Tensor, ...]:
    """The reference's c2w/focal/principal point and its network's extrinsics/intrinsics step."""
    torch.manual_seed(seed)
    raw = get_extrinsic_from_camray(ray.clone(), conf.clone(), ray.shape[2], ray.shape[3])
    torch.manual_seed(seed)
    out = Dict(ray=ray.clone(), ray_conf=conf.clone())
    out = DepthAnything3Net._process_ray_pose_estimation(None, out, *image_hw)
    return (*raw, out.extrinsics, out.intrinsics)


def test_ray_pose_matches_reference_with_same_random_stream(monkeypatch) -> None:
    # 100 x 100 cells: the best hypothesis has over 8000 inliers, so the final fit also samples.
    maps = [synthetic_ray_map(100, 100, seed) for seed in (6, 7)]
    ray = torch.stack([m[0] for m in maps])[None]
    conf = torch.stack([m[1] for m in maps])[None]
    # The reference's final fit asks for a full SVD (a 16000 x 16000 U, 1 GB); the reduced one
    # has the same V, so both implementations get it here.
    full_svd = torch.linalg.svd
    monkeypatch.setattr(
        torch.linalg, "svd", lambda a, full_matrices=True: full_svd(a, full_matrices=False)
    )
    image_hw = (28, 42)
    expected = reference_ray_pose(ray, conf, image_hw, RNG_SEED)
    other_seed = reference_ray_pose(ray, conf, image_hw, RNG_SEED + 1)

    global_state = torch.get_rng_state()
    got = (*camera_from_rays(ray, conf), *pose_from_rays(ray, conf, image_hw))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert [g.shape for g in got] == [
        (1, 2, 4, 4),
        (1, 2, 2),
        (1, 2, 2),
        (1, 2, 3, 4),
        (1, 2, 3, 3),
    ]
    for ours, ref in zip(got, expected, strict=True):
        assert_close(ours, ref)
    # The answer depends on the random draws; ours are the same on every call.
    assert not torch.equal(other_seed[0], expected[0])
    assert all(torch.equal(a, b) for a, b in zip(got[:3], camera_from_rays(ray, conf), strict=True))
    # And it is the camera the rays were made from.
    for view, (_, _, rotation) in enumerate(maps):
        torch.testing.assert_close(got[0][0, view, :3, :3], rotation, atol=0.02, rtol=0)
    torch.testing.assert_close(got[1][0], torch.tensor([[1.2, 1.4]] * 2), atol=0.02, rtol=0)


def test_ray_pose_without_consensus_keeps_best_hypothesis() -> None:
    # Wildly scattered directions: no hypothesis reaches 4 inliers. The reference raises here;
    # ours keeps the best sampled homography and still returns a finite camera.
    gen = torch.Generator().manual_seed(0)
    ray = torch.randn(1, 1, 3, 3, 6, generator=gen) * torch.tensor([50, 50, 1, 1, 1, 1.0])
    conf = 1 + torch.rand(1, 1, 3, 3, generator=gen)
    with pytest.raises(ValueError):
        get_extrinsic_from_camray(ray.clone(), conf.clone(), 3, 3)
    extrinsics, intrinsics = pose_from_rays(ray, conf, (42, 42))
    assert extrinsics.isfinite().all() and intrinsics.isfinite().all()
    rotation = extrinsics[0, 0, :, :3]
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3), atol=1e-5, rtol=0)


def depth_scene(far: bool, seed: int = 8, rows: int = 300) -> dict[str, torch.Tensor]:
    """Any-view and metric outputs of 2 views of `rows` x 210 with sky in the top 15 % of rows.
    With 300 rows there are over 100000 non-sky pixels (the reference then estimates quantiles
    from a random sample); with 250 or fewer, under (it takes them exactly, as we always do)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 2, rows, 210)
    depth = (0.5 * torch.randn(shape, generator=gen)).exp() * 3
    sky = 0.25 * torch.rand(shape, generator=gen)
    sky[..., : rows * 15 // 100, :] += 0.5
    ext, ixt = random_cameras(2, seed)
    ixt[..., 0, 0], ixt[..., 1, 1] = 250.0, 270.0
    # Raw metric output (for a 300 px focal length) of the same scene 25x (far: sky beyond
    # 200 m) or 0.8x as deep, with 0-5 % noise; the mean focal length is 260 px.
    metric = (
        depth * (25.0 if far else 0.8) * (300 / 260) * (1 + 0.05 * torch.rand(shape, generator=gen))
    )
    return {
        "depth": depth,
        "depth_conf": 1 + torch.randn(shape, generator=gen).exp(),
        "extrinsics": ext[..., :3, :],
        "intrinsics": ixt,
        "metric_depth": metric,
        "metric_sky": sky,
    }


EXACT_ROWS = 250  # 2 x 213 x 210 = 89460 non-sky pixels: the reference's quantiles are exact
SAMPLED_ROWS = 300  # 2 x 255 x 210 = 107100: the reference samples 100000 of them


def reference_nested_alignment(scene: dict[str, torch.Tensor]) -> Dict:
    """The reference nested network's scaling, alignment and sky steps, in its order."""
    output = Dict(
        {k: scene[k].clone() for k in ("depth", "depth_conf", "extrinsics", "intrinsics")}
    )
    metric = Dict(depth=scene["metric_depth"].clone(), sky=scene["metric_sky"].clone())
    output = NestedDepthAnything3Net._apply_metric_scaling(None, output, metric)
    output = NestedDepthAnything3Net._apply_depth_alignment(None, output, metric)
    return NestedDepthAnything3Net._handle_sky_regions(None, output, metric)


def test_alignment_helpers_match_reference() -> None:
    scene = depth_scene(far=False)
    intrinsics = scene["intrinsics"]
    assert_close(
        metric_depth_from_focal(scene["metric_depth"], intrinsics),
        apply_metric_scaling(scene["metric_depth"], intrinsics),
    )
    mask = non_sky_mask(scene["metric_sky"])
    assert torch.equal(mask, compute_sky_mask(scene["metric_sky"], threshold=0.3))
    assert_close(
        least_squares_scale(scene["metric_depth"][mask], scene["depth"][mask]),
        least_squares_scale_scalar(scene["metric_depth"][mask], scene["depth"][mask]),
    )
    got = fill_sky(scene["depth"], mask, 7.5, scene["depth_conf"])
    expected = set_sky_regions_to_max_depth(scene["depth"], scene["depth_conf"], mask, 7.5)
    for ours, ref in zip(got, expected, strict=True):
        assert torch.equal(ours, ref)
    assert fill_sky(scene["depth"], mask, 7.5)[1] is None


@pytest.mark.parametrize("far", [False, True], ids=["near", "far-sky-capped"])
def test_nested_alignment_matches_reference(far: bool) -> None:
    scene = depth_scene(far, rows=EXACT_ROWS)
    inputs = {k: v.clone() for k, v in scene.items()}
    expected = reference_nested_alignment(scene)
    got = align_to_metric(**scene)

    assert_close(got.depth, expected.depth)
    assert_close(got.depth_conf, expected.depth_conf)
    assert_close(got.extrinsics, expected.extrinsics)
    assert got.scale_factor == pytest.approx(expected.scale_factor, rel=1e-5)
    assert all(torch.equal(scene[k], inputs[k]) for k in scene)  # inputs untouched
    sky_depth = got.depth[~non_sky_mask(scene["metric_sky"])]
    assert (sky_depth == sky_depth[0]).all()
    assert (sky_depth[0] == 200.0) == far


@pytest.mark.parametrize("seed", [8, 9, 10])
def test_nested_alignment_over_100k_pixels_is_within_the_references_sampling_error(seed):
    # The reference estimates the median confidence (which picks the pixels the scale is fitted
    # on) and the sky's 99th percentile from 100000 random pixels; ours are exact.
    scene = depth_scene(far=False, seed=seed, rows=SAMPLED_ROWS)
    torch.manual_seed(seed)
    expected = reference_nested_alignment(scene)
    got = align_to_metric(**scene)
    # Half a percent of the pixels move in or out of the fit: the scale moves by far less.
    assert got.scale_factor == pytest.approx(expected.scale_factor, rel=1e-3)
    non_sky = non_sky_mask(scene["metric_sky"])
    ratio = expected.scale_factor / got.scale_factor
    assert_close(got.depth[non_sky] * ratio, expected.depth[non_sky])
    assert_close(got.extrinsics * ratio, expected.extrinsics)
    sky = expected.depth[~non_sky]
    assert (sky == sky[0]).all() and (got.depth[~non_sky] == got.depth[~non_sky][0]).all()
    # Its sky depth: the 99th percentile of a 100000-pixel sample of the scaled non-sky depth.
    assert_within_sampling_error(sky[0], expected.depth[non_sky], 0.99)
    assert got.depth[~non_sky][0] == exact_quantile(got.depth[non_sky], 0.99)


def test_nested_alignment_without_enough_non_sky_pixels_uses_all() -> None:
    # All sky: the reference stops there; ours fits the scale on every pixel, fills nothing.
    scene = depth_scene(far=False)
    scene["metric_sky"] = torch.ones_like(scene["metric_sky"])
    got = align_to_metric(**scene)
    assert 0.8 < got.scale_factor < 0.84  # 0.8x as deep, plus 0-5 % noise
    assert_close(got.depth, scene["depth"] * got.scale_factor)
    assert torch.equal(got.depth_conf, scene["depth_conf"])


@pytest.mark.parametrize("rows", [EXACT_ROWS, SAMPLED_ROWS], ids=["exact", "sampled"])
def test_mono_sky_fill_matches_reference(rows: int) -> None:
    scene = depth_scene(far=False, rows=rows)
    depth, sky = scene["metric_depth"], scene["metric_sky"]
    torch.manual_seed(RNG_SEED)
    expected = DepthAnything3Net._process_mono_sky_estimation(None, Dict(depth=depth, sky=sky))
    got = mono_sky_fill(depth, sky)
    non_sky = non_sky_mask(sky)
    assert torch.equal(got[non_sky], depth[non_sky])
    fill = got[~non_sky]
    assert (fill == fill[0]).all() and fill[0] == exact_quantile(depth[non_sky], 0.99)
    if rows == EXACT_ROWS:
        assert_close(got, expected.depth)
    else:  # the reference's fill: the 99th percentile of 100000 random non-sky pixels
        assert torch.equal(expected.depth[non_sky], depth[non_sky])
        assert_within_sampling_error(expected.depth[~non_sky][0], depth[non_sky], 0.99)
    # With (almost) no sky, or no ground, the depth is left as it is.
    assert mono_sky_fill(depth, torch.zeros_like(sky)) is depth
    assert mono_sky_fill(depth, torch.ones_like(sky)) is depth


def test_exact_quantile_is_torch_quantile_without_its_size_limit() -> None:
    gen = torch.Generator().manual_seed(11)
    for n in (1, 2, 7, 1000):
        values = torch.randn(n, generator=gen)
        for q in (0.0, 0.5, 0.99, 1.0):
            # torch.quantile interpolates in float32: within its rounding
            torch.testing.assert_close(exact_quantile(values, q), torch.quantile(values, q))
    many = torch.rand(17_000_000, generator=gen)  # over torch.quantile's limit (2**24)
    assert exact_quantile(many, 0.5) == pytest.approx(0.5, abs=1e-3)


def test_the_nested_chain_with_ray_pose_matches_reference() -> None:
    # Nested network with ray pose: rays -> metric branch's sky -> alignment. Under 100000
    # non-sky pixels only ray pose draws random numbers: the reference from the global
    # generator, ours from a seeded one, the same numbers.
    scene = depth_scene(far=True, rows=EXACT_ROWS)
    ray, conf, _ = synthetic_ray_map(12, 16, seed=9)
    ray, conf = ray.expand(1, 2, -1, -1, -1), conf.expand(1, 2, -1, -1)
    torch.manual_seed(RNG_SEED)
    ref_pose = DepthAnything3Net._process_ray_pose_estimation(
        None, Dict(ray=ray.clone(), ray_conf=conf.clone()), EXACT_ROWS, 210
    )
    ref_metric = DepthAnything3Net._process_mono_sky_estimation(
        None, Dict(depth=scene["metric_depth"].clone(), sky=scene["metric_sky"])
    )
    scene |= {
        "extrinsics": ref_pose.extrinsics,
        "intrinsics": ref_pose.intrinsics,
        "metric_depth": ref_metric.depth,
    }
    expected = reference_nested_alignment(scene)

    extrinsics, intrinsics = pose_from_rays(ray, conf, (EXACT_ROWS, 210), seeded_generator("cpu"))
    metric_depth = mono_sky_fill(scene["metric_depth"], scene["metric_sky"])
    assert_close(extrinsics, ref_pose.extrinsics)
    assert_close(metric_depth, ref_metric.depth)
    scene |= {"extrinsics": extrinsics, "intrinsics": intrinsics, "metric_depth": metric_depth}
    got = align_to_metric(**scene)
    assert_close(got.depth, expected.depth)
    assert_close(got.extrinsics, expected.extrinsics)
