"""What one request costs, known before any pixel is decoded, and the budget it must fit.

`estimate_cost` is the one place that prices a request (docs/ARCHITECTURE.md §4): from the
views' sizes in their image headers and the request's `process_res` it counts the network
tokens and the output pixels, and the scene outputs' host memory (the fused points' files, the
3D Gaussians' file) in output pixels' worth. Later features extend `RequestCost` with their own
named parts (batching prices each batch).
`Budget.check` refuses a request over budget with `request_too_large` (413) before any pixel is
decoded or a model is loaded.

Default budgets depend on the device, chosen once at start (`default_budget`):
- CPU: `CPU_BUDGET_TOKENS` and `CPU_BUDGET_PIXELS`, fixed and low: on a CPU time is the limit
  (a da3-small forward costs about 5 ms per token on two cores, more with the giant models).
- GPU: tokens scale with the GPU memory free at start minus the share reserved for loaded
  models (`MODEL_MEMORY_BUDGET_GB`): `(free - model budget) / GPU_BYTES_PER_TOKEN`, at least
  `MIN_BUDGET_TOKENS`; pixels scale with the host's memory: `host memory / 4 /
  HOST_BYTES_PER_PIXEL` (the output maps and their encodings live in host memory), at least
  `CPU_BUDGET_PIXELS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from da3_serverless.api.errors import ServiceError
from da3_serverless.exports.gaussians import gaussian_bytes
from da3_serverless.exports.points import scene_bytes
from da3_serverless.inference.preprocess import PATCH_SIZE, processing_size

# A CPU worker: about 11 views of a 16:9 photo or 6 square views at process_res 504, or one
# 16:9 view at 1512; two 4096 x 4096 images, or 16 views of 2 megapixels.
CPU_BUDGET_TOKENS = 8192
CPU_BUDGET_PIXELS = 32_000_000
# Activation memory per network token of the largest networks (ViT-G backbone, DPT heads at
# 256 features) under bf16 autocast, with room to spare: DA3-LARGE takes 0.37 to 0.5 MiB per
# token in fp32 on a CPU (`bench/budget.py --per-token --preset da3-large`); bf16 saves less
# than half of it, as the heads stay fp32, and the giant's wider backbone and the CUDA
# allocator take the rest. Not measured on a GPU yet.
GPU_BYTES_PER_TOKEN = 512 * 1024
# Host memory per output pixel: the maps at input resolution (depth, confidence, sky as
# float32, their copies while resizing) and the encoded outputs (bench/budget.py).
HOST_BYTES_PER_PIXEL = 128
MIN_BUDGET_TOKENS = (504 // PATCH_SIZE) ** 2  # one square view at the native 504


@dataclass(frozen=True)
class RequestCost:
    """A request's price: `views`, the network input `grid` (W', H') every view is resized to,
    `tokens` = views x (H'/14) x (W'/14) through the network, `pixels` = the output maps at
    input resolution (the sum of W x H over the views), `scene_pixels` = the scene outputs'
    host memory (fusing every pixel, then up to `max_points` points in three files) as that
    many output pixels' worth (HOST_BYTES_PER_PIXEL each), 0 without them; `gaussian_pixels`
    the same for `gaussians_ply` (one Gaussian per grid cell: `views` x W' x H' of them held and
    filtered with the pixels' filters, up to `max_points` written), 0 without it."""

    model_id: str
    process_res: int
    views: int
    grid: tuple[int, int]
    tokens: int
    pixels: int
    scene_pixels: int = 0
    gaussian_pixels: int = 0

    @property
    def host_pixels(self) -> int:
        """Everything the request holds on the host, in output pixels' worth: the maps and
        the scene outputs' and the Gaussians' memory."""
        return self.pixels + self.scene_pixels + self.gaussian_pixels


@dataclass(frozen=True)
class Budget:
    """The most one request may cost: network `tokens` and output `pixels`; `origin` says
    where the numbers come from (settings, or the device default)."""

    tokens: int
    pixels: int
    origin: str = "settings"

    def describe(self) -> str:
        return f"{self.tokens} network tokens and {self.pixels} output pixels ({self.origin})"

    def check(self, cost: RequestCost) -> None:
        """Raise `request_too_large` (413) naming what to lower when `cost` is over budget."""
        problems = []
        if cost.tokens > self.tokens:
            width, height = cost.grid
            problems.append(
                f"{cost.views} view(s) at process_res {cost.process_res} are {cost.tokens} "
                f"network tokens ({cost.views} x {width // PATCH_SIZE} x "
                f"{height // PATCH_SIZE}), over this server's budget of {self.tokens}: lower "
                "process_res or send fewer views"
            )
        if cost.pixels > self.pixels:
            problems.append(
                f"the images hold {cost.pixels} pixels in all (outputs come back at input "
                f"size), over this server's budget of {self.pixels}: send smaller images "
                "or fewer views"
            )
        elif cost.host_pixels > self.pixels:
            extra = cost.host_pixels - cost.pixels
            problems.append(
                f"the images hold {cost.pixels} pixels in all and their scene outputs need the "
                f"memory of {extra} more, over this server's budget of {self.pixels}: lower "
                "max_points (or process_res, for gaussians_ply), send smaller images or fewer "
                "views, or leave out scene_ply, scene_glb, colmap and gaussians_ply"
            )
        if problems:
            raise ServiceError("request_too_large", "; ".join(problems))


def estimate_cost(
    model_id: str,
    process_res: int,
    sizes: Sequence[tuple[int, int]],
    scene_points: int | None = None,
    gaussian_points: int | None = None,
) -> RequestCost:
    """The cost of running `model_id` on views of `sizes` ((W, H) from the image headers, in
    request order) at `process_res`, with scene outputs of at most `scene_points` points (None:
    no scene output) and a Gaussians' file of at most `gaussian_points` (None: none). Every view
    is resized to the first view's grid (as the predictor does); EXIF rotation swaps W and H and
    changes neither count."""
    width, height = processing_size(*sizes[0], process_res)
    tokens = len(sizes) * (width // PATCH_SIZE) * (height // PATCH_SIZE)
    pixels = sum(w * h for w, h in sizes)
    scene = 0
    if scene_points is not None:
        scene = math.ceil(scene_bytes(pixels, scene_points) / HOST_BYTES_PER_PIXEL)
    gaussians = 0
    if gaussian_points is not None:
        cells = len(sizes) * width * height
        memory = gaussian_bytes(pixels, cells, gaussian_points)
        gaussians = math.ceil(memory / HOST_BYTES_PER_PIXEL)
    return RequestCost(
        model_id, process_res, len(sizes), (width, height), tokens, pixels, scene, gaussians
    )


def default_budget(
    device_type: str, gpu_free_bytes: int, model_budget_bytes: int, host_bytes: int
) -> Budget:
    """The budget for a device when the settings give none (see the module docstring)."""
    if device_type != "cuda":
        return Budget(CPU_BUDGET_TOKENS, CPU_BUDGET_PIXELS, f"default for {device_type}")
    activations = gpu_free_bytes - model_budget_bytes
    tokens = max(MIN_BUDGET_TOKENS, activations // GPU_BYTES_PER_TOKEN)
    pixels = max(CPU_BUDGET_PIXELS, host_bytes // 4 // HOST_BYTES_PER_PIXEL)
    gib = activations / 1024**3
    return Budget(int(tokens), int(pixels), f"default for cuda: {gib:.1f} GiB for activations")


def request_budget(
    tokens: int | None, pixels: int | None, device_default: Callable[[], Budget]
) -> Budget:
    """The settings' budget where given (REQUEST_BUDGET_TOKENS / _PIXELS), else the device's
    (`device_default` is asked only when a setting is missing)."""
    if tokens is not None and pixels is not None:
        return Budget(tokens, pixels, "settings")
    default = device_default()
    if tokens is None and pixels is None:
        return default
    return Budget(
        tokens if tokens is not None else default.tokens,
        pixels if pixels is not None else default.pixels,
        f"settings and {default.origin}",
    )
