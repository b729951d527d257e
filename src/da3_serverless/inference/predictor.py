"""The user-facing face of the network: images in, metric depth and cameras out.

`Predictor.predict` serves one scene (N views, one forward); `Predictor.predict_batch` serves
several unrelated requests, running those that can share a forward as samples of one batch
(docs/ARCHITECTURE.md §3)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from da3_serverless.inference.cameras import (
    as_matrices,
    camera_centers,
    extrinsics_4x4,
    normalise_extrinsics,
    relative_to_first_view,
    umeyama_scale,
)
from da3_serverless.inference.cancel import CancelGroup, Cancelled, CancelToken
from da3_serverless.inference.catalog import ModelInfo, lookup_model
from da3_serverless.inference.gaussians import gaussian_arrays
from da3_serverless.inference.prediction import Gaussians, Prediction
from da3_serverless.inference.preprocess import (
    MAX_PROCESS_RES,
    PATCH_SIZE,
    ImageInput,
    load_rgb,
    processing_size,
    to_network_input,
)
from da3_serverless.model.checkpoint import load_network, load_pair
from da3_serverless.model.gaussians import reframe
from da3_serverless.model.layers import keep_stop_points_out_of_compile
from da3_serverless.model.net import NetOutput

# DA3METRIC-LARGE predicts depth for a canonical focal length of 300 px.
CANONICAL_FOCAL_PX = 300.0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on GPUs that support it, fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class Scene:
    """Checked views of one scene: upright RGB images, their EXIF focal lengths (input pixels,
    None where absent) and the given cameras, (N, 3, 3) intrinsics and (N, 4, 4) extrinsics."""

    views: list[Image.Image]
    exif_focals: list[float | None]
    intrinsics: np.ndarray | None
    extrinsics: np.ndarray | None


@dataclass
class PreparedInput:
    """A scene ready for the network: `batch` (1, N, 3, h, w) on the device (several scenes of
    one view stack along dim 0 to share a forward: `predict_batch`), each view's input
    `sizes` (W, H), `scales` (N, 2) from input to network pixels, the metric focal lengths in
    input pixels (DA3METRIC-LARGE) and the conditioning cameras in network pixels."""

    scene: Scene
    sizes: list[tuple[int, int]]
    batch: torch.Tensor
    scales: np.ndarray
    focal_px: np.ndarray | None
    net_extrinsics: np.ndarray | None
    net_intrinsics: np.ndarray | None
    use_ray_pose: bool
    metric: bool
    gaussians: bool = False
    focal_from: str | None = None  # where focal_px came from: focal_length_px, intrinsics, exif


@dataclass
class PredictRequest:
    """One request of `Predictor.predict_batch`: the arguments of `Predictor.predict`."""

    images: ImageInput | Sequence[ImageInput]
    process_res: int = 504
    use_ray_pose: bool = False
    intrinsics: np.ndarray | Sequence | None = None
    extrinsics: np.ndarray | Sequence | None = None
    focal_length_px: float | Sequence[float] | None = None
    metric: bool = True
    exif_focal_length_px: Sequence[float | None] | None = None
    gaussians: bool = False


class Predictor:
    """A loaded DA3 network with its pre- and post-processing.

    `predict` takes N views of one scene and returns a `Prediction` at each input's own size.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        preset: str,
        *,
        model_id: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.network = network
        self.preset = preset
        self.model_id = model_id or preset
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        # What the network can give comes from the model table (every preset is in it), but
        # the 3D Gaussians from the loaded checkpoint itself.
        info = lookup_model(preset)
        self.capabilities: ModelInfo = replace(info, gaussians=self.supports_gaussians)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        locator=None,
    ) -> Predictor:
        """Load from a snapshot folder or an HF repo id / short name.

        `locator` is a `weights.WeightLocator`; by default one built from the environment's
        settings (a snapshot folder needs none, so loading from a folder never imports the
        settings). `dtype` is the compute dtype (default: bf16 on CUDA when supported, else
        fp32); the backbone's matrices are converted to it once, here, and the modules that
        need fp32 stay fp32 (`model/precision.py`).
        """
        from da3_serverless.inference.weights import WeightLocator, is_snapshot

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        name = str(repo_id_or_path)
        info = lookup_model(name)
        folder = Path(name).expanduser()
        if info is not None and info.parts:
            folders = (locator or WeightLocator.from_settings()).resolve_all(name)
            preset, network = load_pair(folders, device=device, dtype=dtype)
            if preset != info.preset:
                raise ValueError(f"{info.repo_id}'s snapshots hold {preset}, not {info.preset}")
            return cls(network, preset, model_id=info.repo_id, device=device, dtype=dtype)
        if locator is not None or info is not None or not is_snapshot(folder):
            folder = (locator or WeightLocator.from_settings()).resolve(name)
        preset, network = load_network(folder, device=device, dtype=dtype)
        model_id = info.repo_id if info else name
        return cls(network, preset, model_id=model_id, device=device, dtype=dtype)

    @property
    def is_metric(self) -> bool:
        return self.capabilities.metric

    @property
    def needs_focal(self) -> bool:
        return self.capabilities.needs_focal

    @property
    def predicts_camera(self) -> bool:
        return self.capabilities.camera

    @property
    def supports_gaussians(self) -> bool:
        """Whether the loaded network has the 3D-Gaussian head (its checkpoint held it)."""
        return bool(getattr(self.network, "has_gaussians", False))

    def compile(self, cache_dir: Path | None = None) -> None:
        """Opt-in speed: channels-last convolutions and `torch.compile` of the network, on CPU
        and CUDA alike.

        The inductor cache (and on CUDA its Triton kernels, kept under it) goes to `cache_dir`
        so a restarted worker reuses compiled kernels. No CUDA graphs: post-processing has
        data-dependent steps (sky quantiles, ray-pose sampling) that would break them. Outputs
        stay within 1e-4 of the eager path in fp32.
        """
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        keep_stop_points_out_of_compile()
        self.network = self.network.to(memory_format=torch.channels_last)
        self.network = torch.compile(
            self.network, dynamic=False, options={"triton.cudagraphs": False}
        )

    @torch.inference_mode()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        process_res: int = 504,
        use_ray_pose: bool = False,
        intrinsics: np.ndarray | Sequence | None = None,
        extrinsics: np.ndarray | Sequence | None = None,
        focal_length_px: float | Sequence[float] | None = None,
        metric: bool = True,
        exif_focal_length_px: Sequence[float | None] | None = None,
        gaussians: bool = False,
        cancel: CancelToken | None = None,
    ) -> Prediction:
        """Depth, confidence, sky and cameras for N views of one scene.

        images: a PIL image, HxWx3 uint8 array or path, or a list of them (views of one scene).
        intrinsics: (N, 3, 3) or one 3x3 pinhole matrix, in pixels of the input images.
        extrinsics: (N, 3, 4) or (N, 4, 4) world-to-camera; with intrinsics, conditions the
            network on known poses and returns depth in their units.
        focal_length_px: focal length(s) in input pixels, for DA3METRIC-LARGE.
        metric: False asks for relative depth: no focal length needed, `units="relative"`.
        exif_focal_length_px: per-view EXIF focal lengths, for images the caller decoded (and
            oriented) itself; by default they are read from the images. DA3METRIC-LARGE takes
            its focal length from focal_length_px, else intrinsics, else EXIF.
        gaussians: also return 3D Gaussians (`Prediction.gaussians`); only for models whose
            checkpoint holds the Gaussian head (`supports_gaussians`).
        cancel: a job's `CancelToken`; once cancelled, the forward stops at its next check
            (between the network's blocks) and `Cancelled` is raised.
        Raises ValueError with what to fix for any bad argument.

        The stages: check the arguments, prepare the network input, forward, then metric
        scaling, alignment to given poses and assembling the `Prediction`.
        """
        scene = self._check_arguments(
            images, process_res, use_ray_pose, intrinsics, extrinsics, exif_focal_length_px
        )
        self._check_gaussians(gaussians)
        prepared = self._prepare(scene, process_res, focal_length_px, metric, use_ray_pose)
        prepared = replace(prepared, gaussians=gaussians)
        check = cancel.check if cancel is not None else None
        output = self._forward(prepared, check)
        if check is not None:
            check()
        return self._finish(prepared, output, sample=0)

    def _check_gaussians(self, gaussians: bool) -> None:
        """Gaussians only from a network that has the 3D-Gaussian branch."""
        if gaussians and not self.supports_gaussians:
            raise ValueError(
                f"{self.model_id} has no 3D-Gaussian head: use depth-anything/DA3-GIANT-1.1 or "
                "depth-anything/DA3NESTED-GIANT-LARGE-1.1, or leave gaussians off"
            )

    @torch.inference_mode()
    def predict_batch(
        self,
        requests: Sequence[PredictRequest],
        *,
        max_batch: int | None = None,
        return_exceptions: bool = False,
        cancel: CancelToken | CancelGroup | Sequence[CancelToken | None] | None = None,
    ) -> list[Prediction | Exception]:
        """`predict` for several unrelated requests, one `Prediction` each, in order.

        Requests that can share a forward (one view each, the same network input size and
        forward flags, no conditioning poses) run as samples of one batch, at most `max_batch`
        at a time; the others run alone. Each sample is post-processed on its own, so every
        answer equals what `predict` gives for that request alone (within float rounding). A
        batch that runs out of GPU memory runs again one by one. With `return_exceptions`, a
        request's error (ValueError for bad arguments, or the error of the forward it was in)
        takes its place in the list; otherwise the first error is raised, bad arguments before
        any forward runs. `cancel` is one token for the whole batch, or one per request: a
        request cancelled before its forward starts never runs, and a forward stops at its next
        check once all of its requests are cancelled (`Cancelled` is their error).
        """
        prepared: list[PreparedInput | Exception] = []
        for request in requests:
            try:
                prepared.append(self._prepare_request(request))
            except ValueError as error:
                if not return_exceptions:
                    raise
                prepared.append(error)
        results: list[Prediction | Exception] = list(prepared)
        tokens = _per_request(cancel, len(requests))
        for group in _batch_groups(prepared, max_batch):
            for index, prediction in self._run_group(group, prepared, tokens).items():
                if isinstance(prediction, Exception) and not return_exceptions:
                    raise prediction
                results[index] = prediction
        return results

    def _run_group(
        self,
        group: list[int],
        prepared: list[PreparedInput | Exception],
        tokens: list[CancelToken | CancelGroup | None],
    ) -> dict[int, Prediction | Exception]:
        """One batch group's results by request index: `Cancelled` for the requests cancelled
        before it starts (they never run), one forward for the others, which stops once all of
        them are cancelled; the forward's error is each of its requests' error."""
        results: dict[int, Prediction | Exception] = {}
        live = []
        for index in group:
            token = tokens[index]
            if token is not None and token.cancelled:
                results[index] = Cancelled(token.reason)
            else:
                live.append(index)
        if not live:
            return results
        live_tokens = [tokens[index] for index in live]
        # A request that cannot be cancelled keeps the forward going.
        check = None if None in live_tokens else CancelGroup(live_tokens).check
        try:
            predictions = self._predict_group([prepared[index] for index in live], check)
        except Exception as error:
            predictions = [error] * len(live)
        results.update(zip(live, predictions, strict=True))
        return results

    def _predict_group(
        self, group: list[PreparedInput], check: Callable[[], None] | None = None
    ) -> list[Prediction | Exception]:
        """One forward of a batch group, each sample finished on its own. A group that runs
        out of GPU memory together runs again one by one (each may fit alone); then a sample
        that does not fit alone gets its own error. `check` raises to stop the forward."""
        try:
            output = self._forward(_stack(group), check)
            if check is not None:
                check()
        except torch.cuda.OutOfMemoryError:
            if len(group) == 1:
                raise
            output = None  # out of the except block: its traceback holds the batch's memory
        if output is not None:
            return [self._finish_sample(entry, output, i) for i, entry in enumerate(group)]
        torch.cuda.empty_cache()
        alone: list[Prediction | Exception] = []
        for entry in group:
            try:
                alone.extend(self._predict_group([entry], check))
            except torch.cuda.OutOfMemoryError as error:
                alone.append(error)
        return alone

    def _finish_sample(
        self, entry: PreparedInput, output: NetOutput, sample: int
    ) -> Prediction | Exception:
        """`_finish` of one sample of a batch, or its error in its place: one sample's failure
        (say, out of memory resizing its maps to a large input) never fails its batch-mates. The
        error leaves its traceback behind, whose frames hold the batch's tensors."""
        try:
            return self._finish(entry, output, sample)
        except Exception as error:
            return error.with_traceback(None)

    def _prepare_request(self, request: PredictRequest) -> PreparedInput:
        """`_check_arguments` and `_prepare` of one `PredictRequest`, as `predict` does."""
        scene = self._check_arguments(
            request.images, request.process_res, request.use_ray_pose, request.intrinsics,
            request.extrinsics, request.exif_focal_length_px,
        )  # fmt: skip
        self._check_gaussians(request.gaussians)
        prepared = self._prepare(
            scene, request.process_res, request.focal_length_px, request.metric,
            request.use_ray_pose,
        )  # fmt: skip
        return replace(prepared, gaussians=request.gaussians)

    def _check_arguments(
        self, images, process_res, use_ray_pose, intrinsics, extrinsics, exif_focal_length_px
    ) -> Scene:
        """The views, their EXIF focal lengths and the given cameras, checked."""
        views, exif_focals = zip(*self._load_views(images), strict=True)
        count = len(views)
        if exif_focal_length_px is not None:
            exif_focals = tuple(exif_focal_length_px)
        if not isinstance(process_res, int) or not PATCH_SIZE <= process_res <= MAX_PROCESS_RES:
            raise ValueError(
                f"process_res={process_res!r} is out of range: use an integer between "
                f"{PATCH_SIZE} and {MAX_PROCESS_RES} (default 504)"
            )
        if use_ray_pose and not self.predicts_camera:
            raise ValueError(f"use_ray_pose needs a model that predicts cameras, not {self.preset}")
        given_intrinsics = (
            as_matrices(intrinsics, (3, 3), count, "intrinsics") if intrinsics is not None else None
        )
        given_extrinsics = None
        if extrinsics is not None:
            given_extrinsics = extrinsics_4x4(_extrinsics_array(extrinsics, count))
            if given_intrinsics is None:
                raise ValueError("extrinsics need intrinsics too: give both to condition on poses")
            if not self.predicts_camera:
                raise ValueError(f"{self.preset} takes no camera poses: leave out extrinsics")
        return Scene(list(views), list(exif_focals), given_intrinsics, given_extrinsics)

    def _prepare(
        self,
        scene: Scene,
        process_res: int,
        focal_length_px: float | Sequence[float] | None,
        metric: bool,
        use_ray_pose: bool,
    ) -> PreparedInput:
        """The network input of one scene: resized, normalised views on the device, the scale
        from input to network pixels, the metric focal lengths and the conditioning cameras."""
        sizes = [view.size for view in scene.views]
        width, height = processing_size(*sizes[0], process_res)
        scales = np.array([[width / w, height / h] for w, h in sizes])  # input px -> network px
        batch = to_network_input(scene.views, (width, height)).to(self.device)
        focal_px = focal_from = None
        if metric:
            focal_px, focal_from = self._metric_focals(
                scene.exif_focals, focal_length_px, scene.intrinsics
            )
        # Known cameras condition the network only as a pair; intrinsics alone serve the
        # metric focal length and the returned camera.
        net_extrinsics = net_intrinsics = None
        if scene.extrinsics is not None:
            net_extrinsics = normalise_extrinsics(scene.extrinsics)
            net_intrinsics = _rescale(scene.intrinsics, scales)
        return PreparedInput(
            scene, sizes, batch, scales, focal_px, net_extrinsics, net_intrinsics, use_ray_pose,
            metric, focal_from=focal_from,
        )  # fmt: skip

    def _finish(self, prepared: PreparedInput, output: NetOutput, sample: int) -> Prediction:
        """Entry `sample` of the network output's batch -> the `Prediction` of `prepared`, at
        each input's own size. The maps are resized on the device and copied back at once."""
        depth = self._metric_depth(output.depth[sample].float(), prepared)
        extrinsics = _numpy(output.extrinsics, sample)
        given = prepared.scene
        pose_scale = None
        if given.extrinsics is not None:
            depth, extrinsics, pose_scale = _align_to_given_poses(
                depth, extrinsics, given.extrinsics
            )
        elif extrinsics is not None:  # world frame: the first view's camera (§7)
            extrinsics = relative_to_first_view(extrinsics)
        if given.intrinsics is not None:
            intrinsics = given.intrinsics.astype(np.float32)
        elif output.intrinsics is not None:
            intrinsics = _rescale(_numpy(output.intrinsics, sample), 1.0 / prepared.scales)
            intrinsics = intrinsics.astype(np.float32)
        else:
            intrinsics = None
        metric = prepared.metric and (self.is_metric or prepared.focal_px is not None)
        # Known poses fix the scale: the depth is in their units, whatever those are.
        units = "pose_units" if given.extrinsics is not None else "m" if metric else "relative"
        maps = {"depth": depth}
        for name, batch in (("confidence", output.confidence), ("sky", output.sky)):
            if batch is not None:
                maps[name] = batch[sample]
        resized = _resize_to_host(maps, prepared.sizes)
        return Prediction(
            depth=resized["depth"],
            confidence=resized.get("confidence"),
            sky=resized.get("sky"),
            intrinsics=intrinsics,
            extrinsics=extrinsics,
            is_metric=units == "m",
            units=units,
            gaussians=_gaussians(output, sample, extrinsics, given.extrinsics is not None),
            scale=_scale_source(prepared, output, sample, units, pose_scale),
        )

    def _metric_depth(self, depth: torch.Tensor, prepared: PreparedInput) -> torch.Tensor:
        """DA3METRIC-LARGE's output to meters: x focal (network pixels) / 300."""
        if prepared.focal_px is None:
            return depth
        focal_net = torch.tensor(prepared.focal_px * prepared.scales.mean(axis=1))
        focal_net = focal_net.to(device=depth.device, dtype=depth.dtype)
        return depth * (focal_net / CANONICAL_FOCAL_PX)[:, None, None]

    def _load_views(self, images: ImageInput | Sequence[ImageInput]) -> list[tuple]:
        """(RGB image, EXIF focal length px or None) per view."""
        if isinstance(images, str | os.PathLike | np.ndarray) or hasattr(images, "getexif"):
            images = [images]
        if not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError("images is empty: give at least one image (PIL, array or path)")
        return [load_rgb(image, index) for index, image in enumerate(images)]

    def _metric_focals(self, exif_focals, focal_length_px, intrinsics) -> tuple:
        """Per-view focal length in input pixels for DA3METRIC-LARGE and where it came from
        ("focal_length_px", "intrinsics" or "exif"), else (None, None)."""
        if not self.needs_focal:
            return None, None
        count = len(exif_focals)
        if focal_length_px is not None:
            values = np.broadcast_to(np.asarray(focal_length_px, dtype=np.float64), (count,))
            source = "focal_length_px"
        elif intrinsics is not None:
            values = (intrinsics[:, 0, 0] + intrinsics[:, 1, 1]) / 2
            source = "intrinsics"
        else:
            values = np.array([np.nan if f is None else f for f in exif_focals])
            source = "exif"
        if not (np.isfinite(values) & (values > 0)).all():
            raise ValueError(
                f"{self.model_id} needs the camera's focal length to give meters: pass "
                "focal_length_px (in pixels of the input image) or intrinsics, send a photo "
                "whose EXIF has FocalLengthIn35mmFilm, use the nested metric model "
                "(depth-anything/DA3NESTED-GIANT-LARGE-1.1), or ask for relative depth "
                "(output_metric false; metric=False in Python)"
            )
        return values, source

    def _forward(
        self, prepared: PreparedInput, check: Callable[[], None] | None = None
    ) -> NetOutput:
        """One forward pass of the prepared scene (autocast to `self.dtype` when it is not
        fp32; the network keeps its heads in fp32 itself); `check` raises to stop it."""

        def tensor(array):
            if array is None:
                return None
            return torch.as_tensor(array, dtype=torch.float32, device=self.device)[None]

        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else nullcontext()
        )
        with autocast:
            return self.network(
                prepared.batch,
                tensor(prepared.net_extrinsics),
                tensor(prepared.net_intrinsics),
                use_ray_pose=prepared.use_ray_pose,
                gaussians=prepared.gaussians,
                check=check,
            )


def batch_key(prepared: PreparedInput) -> tuple | None:
    """What must match for prepared inputs to share a forward, or None when one must run
    alone: one view, no conditioning poses, then the network input shape and the flags the
    forward takes (`use_ray_pose`, `gaussians`). (Given intrinsics alone never enter the
    network, so they batch.)"""
    if prepared.batch.shape[1] != 1 or prepared.net_extrinsics is not None:
        return None
    return (tuple(prepared.batch.shape[2:]), prepared.use_ray_pose, prepared.gaussians)


def _per_request(
    cancel: CancelToken | CancelGroup | Sequence[CancelToken | None] | None, count: int
) -> list[CancelToken | CancelGroup | None]:
    """`predict_batch`'s `cancel` as one token (or None) per request."""
    if cancel is None or isinstance(cancel, CancelToken | CancelGroup):
        return [cancel] * count
    if len(cancel) != count:
        raise ValueError(f"cancel has {len(cancel)} tokens for {count} requests")
    return list(cancel)


def _batch_groups(
    prepared: Sequence[PreparedInput | Exception], max_batch: int | None
) -> list[list[int]]:
    """Indices of the prepared inputs (errors skipped) in groups that share a forward, each at
    most `max_batch` long, in request order of their first member."""
    groups: list[list[int]] = []
    open_groups: dict[tuple, list[int]] = {}
    for index, entry in enumerate(prepared):
        if isinstance(entry, Exception):
            continue
        key = batch_key(entry)
        group = open_groups.get(key) if key is not None else None
        if group is None or (max_batch is not None and len(group) >= max_batch):
            group = []
            groups.append(group)
            if key is not None:
                open_groups[key] = group
        group.append(index)
    return groups


def _stack(group: list[PreparedInput]) -> PreparedInput:
    """Prepared inputs of one batch group as one: their network inputs along the batch
    dimension (the rest of the first is what the forward reads: no poses, the flags)."""
    if len(group) == 1:
        return group[0]
    return replace(group[0], batch=torch.cat([entry.batch for entry in group]))


def _extrinsics_array(extrinsics, count: int) -> np.ndarray:
    array = np.asarray(extrinsics, dtype=np.float64)
    shape = (3, 4) if array.shape[-2:] == (3, 4) else (4, 4)
    return as_matrices(array, shape, count, "extrinsics")


def _rescale(intrinsics: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(N, 3, 3) pinhole matrices with x rows scaled by scales[:, 0] and y rows by scales[:, 1]."""
    scaled = np.array(intrinsics, dtype=np.float64)
    scaled[:, 0, :] *= scales[:, 0:1]
    scaled[:, 1, :] *= scales[:, 1:2]
    return scaled


def _align_to_given_poses(
    depth: torch.Tensor, predicted: np.ndarray, given: np.ndarray
) -> tuple[torch.Tensor, np.ndarray, float]:
    """Known poses fix the scale: the depth in their units (Umeyama scale between the
    predicted and the given camera centres), the given poses as (N, 3, 4) float32 and the
    factor applied to the depth."""
    scale = umeyama_scale(camera_centers(predicted), camera_centers(given[:, :3]))
    return depth / scale, given[:, :3].astype(np.float32), 1.0 / float(scale)


def _scale_source(
    prepared: PreparedInput, output: NetOutput, sample: int, units: str, pose_scale
) -> dict:
    """Where a prediction's scale came from (`Prediction.scale`)."""
    if units == "pose_units":
        return {"source": "poses", "pose_scale": pose_scale}
    if units != "m":
        return {"source": "none"}
    if prepared.focal_px is not None:
        return {
            "source": "focal_length",
            "focal_length_px": [float(f) for f in prepared.focal_px],
            "focal_from": prepared.focal_from,
            "canonical_focal_px": CANONICAL_FOCAL_PX,
        }
    scale = output.metric_scale
    return {"source": "model", "nested_scale": None if scale is None else float(scale[sample])}


def _gaussians(
    output: NetOutput, sample: int, extrinsics: np.ndarray, given: bool
) -> Gaussians | None:
    """Batch entry `sample` of the network's Gaussians, as numpy at the network grid, moved view
    by view from the predicted cameras to the prediction's `extrinsics` (N, 3, 4): the first
    view's frame, or the `given` poses' frame and units (the scale of `_align_to_given_poses`);
    the frame and units of the depth."""
    if output.gaussians is None:
        return None
    predicted = output.extrinsics[sample].float()
    scale = 1.0
    if given:
        scale = umeyama_scale(camera_centers(predicted.cpu().numpy()), camera_centers(extrinsics))
    target = torch.as_tensor(extrinsics, dtype=torch.float32, device=predicted.device)
    return gaussian_arrays(reframe(output.gaussians.entry(sample), predicted, target, scale))


def _numpy(tensor: torch.Tensor | None, sample: int) -> np.ndarray | None:
    """Batch entry `sample` of an optional tensor, as float32 numpy."""
    return None if tensor is None else tensor[sample].float().cpu().numpy()


def _resize_to_host(
    maps: dict[str, torch.Tensor], sizes: list[tuple[int, int]]
) -> dict[str, np.ndarray]:
    """Named (N, h, w) network-resolution maps -> (N, H, W) float32 numpy arrays at each view's
    input size (W, H), bilinear; an object array of per-view maps when views differ in size.

    Resizing runs on the maps' device, one call per distinct size, and everything comes back
    to the host in a single copy: no per-view round trips, no device memory kept afterwards.
    """
    names = list(maps)
    stacked = torch.stack([maps[name].float() for name in names])  # (K, N, h, w)
    by_size: dict[tuple[int, int], list[int]] = {}
    for view, size in enumerate(sizes):
        by_size.setdefault(size, []).append(view)
    flat = []
    for (width, height), views in by_size.items():
        part = stacked[:, views]  # views as channels: one interpolate call per size
        if part.shape[-2:] != (height, width):
            part = F.interpolate(part, size=(height, width), mode="bilinear", align_corners=False)
        flat.append(part.reshape(-1))
    host = torch.cat(flat).cpu().numpy()  # the one copy to the host
    blocks, offset = [], 0
    for (width, height), views in by_size.items():
        count = len(names) * len(views) * height * width
        blocks.append(host[offset : offset + count].reshape(len(names), len(views), height, width))
        offset += count
    if len(blocks) == 1:  # every view at one size: (N, H, W) per map, no further copy
        return {name: blocks[0][k] for k, name in enumerate(names)}
    resized = {}
    for k, name in enumerate(names):
        holder = np.empty(len(sizes), dtype=object)
        for block, views in zip(blocks, by_size.values(), strict=True):
            for index, view in enumerate(views):
                holder[view] = block[k, index]
        resized[name] = holder
    return resized
