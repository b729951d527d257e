"""RunRequest parsing: defaults, exactly-one image source, camera matrices, helpful errors."""

from __future__ import annotations

import pytest

from da3_serverless.api.errors import ServiceError
from da3_serverless.api.schema import (
    OUTPUT_NAMES,
    RunRequest,
    RunResponse,
    ViewResult,
    check_limits,
    parse_request,
)
from da3_serverless.config import Settings

K = [[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]]
E34 = [[1.0, 0.0, 0.0, 0.1], [0.0, 1.0, 0.0, 0.2], [0.0, 0.0, 1.0, 0.3]]


def invalid(payload: object, settings: Settings | None = None) -> str:
    with pytest.raises(ServiceError) as info:
        parse_request(payload, settings)
    assert info.value.code == "invalid_input"
    assert info.value.status == 400
    return info.value.message


def test_defaults() -> None:
    r = parse_request({"image_url": "https://example.com/a.jpg"})
    assert r.api_key is None and r.model_id is None and r.images is None
    assert r.output_metric is True and r.use_ray_pose is False and r.return_base64 is True
    assert r.process_res == 504 and r.outputs == ["depth"]
    assert r.intrinsics is None and r.extrinsics is None and r.focal_length_px is None
    assert r.view_count == 1


def test_full_request_with_several_views() -> None:
    r = parse_request(
        {
            "api_key": "k",
            "images": [{"url": "https://example.com/a.jpg"}, {"base64": "aGVsbG8="}],
            "model_id": "da3-small",
            "output_metric": False,
            "use_ray_pose": True,
            "process_res": 280,
            "focal_length_px": 812,
            "intrinsics": [K, K],
            "extrinsics": [E34, [*E34, [0, 0, 0, 1]]],
            "outputs": ["depth", "preview", "depth", "pointcloud", "preview"],
            "return_base64": False,
        }
    )
    assert r.view_count == 2
    assert r.images is not None and r.images[1].base64 == "aGVsbG8="
    assert r.focal_length_px == 812.0
    assert r.outputs == ["depth", "preview", "pointcloud"]  # deduplicated, order kept
    assert r.extrinsics == [E34, E34]  # 4x4 reduced to 3x4


def test_single_intrinsics_matrix_is_wrapped() -> None:
    r = parse_request({"image_base64": "aGVsbG8=", "intrinsics": K, "extrinsics": E34})
    assert r.intrinsics == [K]
    assert r.extrinsics == [E34]


def test_one_camera_for_every_view() -> None:
    """One 3x3 (bare or in a list of one) and one focal length stand for every view; a list of
    focal lengths gives one per view."""
    views = [{"url": f"https://example.com/{i}.jpg"} for i in range(4)]
    for given in (K, [K]):
        r = parse_request({"images": views, "intrinsics": given, "focal_length_px": [812]})
        assert r.intrinsics == [K] * 4 and r.focal_length_px == 812.0
    r = parse_request({"images": views, "focal_length_px": [800, 810.5, 820, 830]})
    assert r.focal_length_px == [800.0, 810.5, 820.0, 830.0]
    assert "intrinsics has 2 matrices but the request has 4 view(s)" in invalid(
        {"images": views, "intrinsics": [K, K]}
    )
    assert "focal_length_px has 3 numbers but the request has 4 view(s)" in invalid(
        {"images": views, "focal_length_px": [800, 810, 820]}
    )
    assert "at most 2 numbers" in invalid(
        {"images": views[:2], "focal_length_px": [800] * 3}, Settings(max_views=2)
    )


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"image_url": "u", "image_base64": "b"},
        {"image_url": "u", "images": [{"url": "u"}]},
        {"image_url": None, "image_base64": None},
    ],
)
def test_exactly_one_image_source(payload: dict) -> None:
    assert "give exactly one of image_url, image_base64, images" in invalid(payload)


def test_unknown_field_is_named_with_a_suggestion() -> None:
    message = invalid({"imagee_url": "https://example.com/a.jpg"})
    assert "unknown field 'imagee_url'" in message
    assert "did you mean 'image_url'" in message
    assert "valid fields are api_key, image_url" in message


def test_image_ref_needs_exactly_one_of_url_or_base64() -> None:
    message = invalid({"images": [{"url": "u", "base64": "b"}, {}, {"uri": "u"}]})
    assert "images[0]: give exactly one of 'url' or 'base64'" in message
    assert "images[1]: give exactly one" in message
    assert "unknown field images[2].uri (did you mean 'url'?)" in message
    assert "images" in invalid({"images": []})


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("output_metric", "yes", "output_metric must be true or false"),
        ("use_ray_pose", 1, "use_ray_pose must be true or false"),
        ("return_base64", "false", "return_base64 must be true or false"),
        ("process_res", "504", "process_res must be a whole number"),
        ("process_res", 504.5, "process_res must be a whole number"),
        ("process_res", True, "process_res must be a whole number"),
        ("process_res", 13, "process_res: input should be greater than or equal to 14"),
        ("focal_length_px", "800", "focal_length_px: must be a number"),
        ("focal_length_px", True, "focal_length_px: must be a number"),
        ("focal_length_px", 0, "focal_length_px: must be a finite number greater than 0"),
        ("focal_length_px", float("inf"), "focal_length_px: must be a finite number"),
        ("focal_length_px", [800, -1], "focal_length_px: must be a finite number greater than 0"),
        ("focal_length_px", [800, "9"], "focal_length_px: must be a number"),
        ("focal_length_px", [], "focal_length_px: is an empty list"),
        ("focal_length_px", [800, 900], "focal_length_px has 2 numbers but the request has 1"),
        ("outputs", ["depth", "dpeth"], "outputs[1] must be one of depth, preview"),
        ("outputs", [], "outputs"),
        ("outputs", "depth", "outputs must be a list"),
        ("model_id", 3, "model_id must be a string"),
        ("images", {"url": "u"}, "images must be a list"),
        ("conf_percentile", 101, "conf_percentile: input should be less than or equal to 100"),
        ("conf_percentile", -1, "conf_percentile: input should be greater than or equal to 0"),
        ("conf_percentile", "40", "conf_percentile must be a number"),
        ("max_points", 0, "max_points: input should be greater than or equal to 1"),
        ("max_points", 1000.5, "max_points must be a whole number"),
        ("max_points", float("inf"), "max_points must be a whole number"),
        ("keep_sky", 1, "keep_sky must be true or false"),
        ("remove_edges", "true", "remove_edges must be true or false"),
        ("colmap_text", None, "colmap_text must be true or false"),
    ],
)
def test_strict_types_and_bounds(field: str, value: object, expected: str) -> None:
    payload = {"image_url": "https://example.com/a.jpg", field: value}
    if field == "images":
        del payload["image_url"]
    assert expected in invalid(payload)


def test_integer_fields_take_whole_numbers_written_with_a_fraction() -> None:
    # JSON Schema's "integer" admits 56.0; so does the server (as the integer 56).
    fields = {"process_res": 56.0, "max_points": 1e3, "max_frames": 3.0, "chunk_size": 4.0,
              "overlap": 1.0}  # fmt: skip
    payload = {"video_url": "https://example.com/a.mp4", "outputs": ["trajectory"], **fields}
    request = parse_request(payload)
    for field, value in fields.items():
        got = getattr(request, field)
        assert got == value and type(got) is int, field


def test_every_bad_field_is_reported_at_once() -> None:
    message = invalid({"image_url": "u", "process_res": "x", "use_ray_pose": "no", "bogus": 1})
    assert "process_res" in message and "use_ray_pose" in message and "'bogus'" in message


@pytest.mark.parametrize(
    ("intrinsics", "expected"),
    [
        ([[1, 0, 0], [0, 1, 0]], "must be 3x3"),
        ([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], "must be 3x3"),
        ([[0, 0, 1], [0, 1, 1], [0, 0, 1]], "positive focal lengths"),
        ([[500, 0, 0], [0, 500, 0], [320, 240, 1]], "is the matrix transposed?"),
        ([[500, 0, 0], [0, 500, 0], [float("nan"), 0, 1]], "intrinsics[0][2][0] must be a finite"),
        ([K, K], "intrinsics has 2 matrices but the request has 1 view(s)"),
        ([[["a"]]], "intrinsics[0][0][0] must be a number"),
    ],
)
def test_intrinsics_checks(intrinsics: object, expected: str) -> None:
    assert expected in invalid({"image_url": "u", "intrinsics": intrinsics})


@pytest.mark.parametrize(
    ("extrinsics", "expected"),
    [
        ([K], "must be 3x4 or 4x4"),
        ([[*E34, [0, 0, 1, 1]]], "last row of a 4x4 extrinsics matrix must be [0, 0, 0, 1]"),
        ([E34, E34], "extrinsics has 2 matrices"),
    ],
)
def test_extrinsics_checks(extrinsics: object, expected: str) -> None:
    assert expected in invalid({"image_url": "u", "extrinsics": extrinsics})


def test_api_key_is_never_echoed() -> None:
    secret = "sk-very-secret-value"
    for payload in (
        {"api_key": secret},
        {"api_key": secret, "image_url": "u", "process_res": secret},
        {"api_key": [secret], "image_url": "u"},
        {"api_key": secret, "image_url": "u", "intrinsics": secret},
    ):
        assert secret not in invalid(payload)


@pytest.mark.parametrize("payload", [None, [], "text", 3, [{"image_url": "u"}]])
def test_non_object_payload(payload: object) -> None:
    assert "must be a JSON object" in invalid(payload)


def test_limits_from_settings() -> None:
    settings = Settings(max_process_res=1008, max_views=2)
    ok = parse_request({"image_url": "u", "process_res": 1008}, settings)
    assert ok.process_res == 1008
    message = invalid({"image_url": "u", "process_res": 1022}, settings)
    assert "process_res 1022 is above this server's limit of 1008" in message
    assert parse_request({"image_url": "u", "max_points": 2_000_000}, settings).max_points
    few = Settings(max_points=1000)
    message = invalid({"image_url": "u", "max_points": 1001}, few)
    assert "max_points 1001 is above this server's limit of 1000" in message
    three = {"images": [{"url": "u"}] * 3}
    assert "at most 2" in invalid(three, settings)
    # without settings only the static bounds apply; check_limits can run later
    request = parse_request(three)
    with pytest.raises(ServiceError, match="at most 2"):
        check_limits(request, settings)


def test_default_process_res_is_capped_at_the_server_limit() -> None:
    """Left out, process_res is 504 capped at the limit (the published default); said, it is
    checked against the limit."""
    small = Settings(max_process_res=140)
    assert parse_request({"image_url": "u"}, small).process_res == 140
    assert parse_request({"image_url": "u"}, Settings()).process_res == 504
    assert "above this server's limit of 140" in invalid(
        {"image_url": "u", "process_res": 504}, small
    )


def test_integer_bounds_are_json_schema_minimums() -> None:
    """Optional whole-number fields publish `minimum` (JSON Schema), not pydantic's `ge`."""
    fields = RunRequest.model_json_schema()["properties"]
    for name, low in (("max_frames", 1), ("chunk_size", 2), ("overlap", 1)):
        assert {"type": "integer", "minimum": low} in fields[name]["anyOf"]
    assert parse_request({"video_url": "u", "max_frames": 3.0}).max_frames == 3


def test_a_sequence_left_without_outputs_gets_its_own_default() -> None:
    """`outputs` left out of a video or `sequence` request: trajectory and depth frames (the
    client's default), not `depth`, which a sequence cannot give."""
    assert parse_request({"video_url": "u"}).outputs == ["trajectory", "depth_frames"]
    images = {"images": [{"url": "u"}] * 2, "sequence": True}
    assert parse_request(images).outputs == ["trajectory", "depth_frames"]
    assert "depth cannot be asked" in invalid({"video_url": "u", "outputs": ["depth"]})


def test_output_names_match_the_schema() -> None:
    assert set(OUTPUT_NAMES) == {
        "depth",
        "preview",
        "confidence",
        "sky_mask",
        "depth_npy",
        "pointcloud",
        "confidence_npy",
        "depth_exr",
        "depth_mm_png",
        "scene_ply",
        "scene_glb",
        "colmap",
        "gaussians_ply",
    }
    assert RunRequest.model_fields["outputs"].default_factory() == ["depth"]


def test_response_models_validate_a_service_dict() -> None:
    view = {
        "width": 4,
        "height": 3,
        "min_depth": 0.5,
        "max_depth": 9.0,
        "image_base64": "iVBORw0KGgo=",
        "file_path": "/workspace/DA3-Serverless/output_images/x.png",
        "intrinsics": K,
        "extrinsics": E34,
        "preview": {"base64": "aGk=", "media_type": "image/png"},
    }
    response = RunResponse.model_validate(
        {
            **view,
            "model_id": "depth-anything/DA3NESTED-GIANT-LARGE-1.1",
            "is_metric": True,
            "units": "m",
            "views": [view, view],
            "timings_ms": {"total": 12.5},
            "warnings": ["could not save outputs"],
        }
    )
    assert response.schema_version == "1"
    assert response.depth_encoding == "png16-linear"
    assert response.views is not None and response.views[1].preview is not None
    assert response.views[1].preview.media_type == "image/png"
    schema = RunResponse.model_json_schema()
    assert "image_base64" in schema["properties"] and "views" in schema["properties"]
    with pytest.raises(ValueError):
        ViewResult.model_validate({**view, "min_depth": float("nan")})
