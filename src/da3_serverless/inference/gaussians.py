"""The prediction's 3D Gaussians (numpy `Gaussians`) and the model's `GaussianMaps` (torch),
one to the other, and numpy Gaussians moved to another frame through the model's one
frame-change code (`model.gaussians.reframe`: means, scales, rotations and the spherical-
harmonic coefficients together). Used by the predictor (predicted to returned cameras) and
by the sequence path (a chunk's Gaussians into the first chunk's frame by its Sim(3))."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch

from da3_serverless.inference.prediction import Gaussians
from da3_serverless.model.gaussians import GaussianMaps, reframe
from da3_serverless.model.spherical_harmonics import SH_C0


def gaussian_arrays(maps: GaussianMaps) -> Gaussians:
    """(N, h, w, ...) maps as float32 numpy `Gaussians` (colour: 0.5 + SH_C0 x the DC
    coefficient; `sh_rest`: the higher coefficients, None for degree 0)."""

    def array(tensor: torch.Tensor) -> np.ndarray:
        return tensor.float().cpu().numpy()

    return Gaussians(
        means=array(maps.means),
        scales=array(maps.scales),
        rotations=array(maps.rotations),
        opacities=array(maps.opacities),
        colors=array(0.5 + SH_C0 * maps.harmonics[..., 0]),
        sh_rest=array(maps.harmonics[..., 1:]) if maps.harmonics.shape[-1] > 1 else None,
    )


def gaussian_maps(gaussians: Gaussians) -> GaussianMaps:
    """Numpy `Gaussians` as float32 torch maps on the CPU (the inverse of `gaussian_arrays`)."""

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=np.float32))

    dc = (tensor(gaussians.colors) - 0.5) / SH_C0
    harmonics = dc[..., None]
    if gaussians.sh_rest is not None:
        harmonics = torch.cat([harmonics, tensor(gaussians.sh_rest)], dim=-1)
    return GaussianMaps(
        tensor(gaussians.means), tensor(gaussians.scales), tensor(gaussians.rotations),
        tensor(gaussians.opacities), harmonics,
    )  # fmt: skip


def moved_gaussians(
    gaussians: Gaussians, source: np.ndarray, target: np.ndarray, scale: float = 1.0
) -> Gaussians:
    """(N, h, w, ...) Gaussians moved view by view from the world of the `source` cameras to
    that of the `target` cameras (both (N, 3, 4) world-to-camera), lengths divided by `scale`
    (`reframe`): each keeps its place in its own view's camera frame, as the depth does. For a
    Sim(3) x -> s R x + t that moved the cameras (`Sim3.move_extrinsics`), `scale` is 1 / s:
    means become s R x + t, scales s times, rotations R composed, harmonics rotated by R.

    One view at a time into arrays of the result, so the memory beyond the input and the
    result is one view's worth of torch copies, not the whole chunk's."""
    names = [
        field.name for field in fields(Gaussians) if getattr(gaussians, field.name) is not None
    ]
    result = {name: np.empty_like(getattr(gaussians, name), dtype=np.float32) for name in names}
    for view in range(len(gaussians.means)):
        one = Gaussians(**{name: getattr(gaussians, name)[view : view + 1] for name in names})
        with torch.no_grad():
            moved = reframe(
                gaussian_maps(one),
                torch.from_numpy(np.asarray(source[view : view + 1], dtype=np.float32)),
                torch.from_numpy(np.asarray(target[view : view + 1], dtype=np.float32)),
                scale,
            )
        for name, values in vars(gaussian_arrays(moved)).items():
            if name in result:
                result[name][view] = values[0]
    return Gaussians(**result)
