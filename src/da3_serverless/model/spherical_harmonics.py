"""Real spherical harmonics of degree 0 to 2 in the 3D Gaussian Splatting convention, and their
rotation.

The basis is the one 3DGS renderers evaluate (per colour channel, coefficient k of degree
l = floor(sqrt(k))): 1 constant, 3 linear and 5 quadratic functions of the unit view direction
(x, y, z); see `basis`. `rotate` turns coefficients given in one frame into those of the same
function in a frame rotated by R: f'(d) = f(R^T d).

Each degree is closed under rotation, so the rotated coefficients of degree l are found by
evaluating the function at a fixed set of directions turned by R^T and fitting degree-l
coefficients to those values (an exact least-squares solve, precomputed per degree). This needs
no Euler angles and no Wigner matrices.
"""

from __future__ import annotations

import math

import torch

# Normalisation constants of the real SH basis used by 3DGS (degree 0, 1 and 2).
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
MAX_DEGREE = 2


def coefficient_count(degree: int) -> int:
    """Coefficients per colour channel up to `degree`: (degree + 1)^2."""
    return (degree + 1) ** 2


def basis(directions: torch.Tensor) -> torch.Tensor:
    """Unit directions (..., 3) -> the 9 basis functions of degrees 0..2 (..., 9)."""
    x, y, z = directions.unbind(-1)
    c2 = SH_C2
    return torch.stack(
        [
            torch.full_like(x, SH_C0),
            -SH_C1 * y,
            SH_C1 * z,
            -SH_C1 * x,
            c2[0] * x * y,
            c2[1] * y * z,
            c2[2] * (2 * z * z - x * x - y * y),
            c2[3] * x * z,
            c2[4] * (x * x - y * y),
        ],
        dim=-1,
    )


def _sample_directions() -> torch.Tensor:
    """The 12 vertices of an icosahedron (float64, unit length): a spherical 5-design, so the
    fit below is well conditioned for every degree up to 2."""
    phi = (1 + math.sqrt(5)) / 2
    points = []
    for a in (-1.0, 1.0):
        for b in (-phi, phi):
            points += [(0.0, a, b), (a, b, 0.0), (b, 0.0, a)]
    directions = torch.tensor(points, dtype=torch.float64)
    return directions / directions.norm(dim=-1, keepdim=True)


_DIRECTIONS = _sample_directions()
_FIT = torch.linalg.pinv(basis(_DIRECTIONS))  # (9, 12): values at _DIRECTIONS -> coefficients


def rotation_matrix(rotation: torch.Tensor, degree: int) -> torch.Tensor:
    """Rotations R (..., 3, 3) -> block-diagonal maps T (..., n, n), n = (degree + 1)^2, such that
    coefficients c of f give T @ c, the coefficients of f'(d) = f(R^T d). Computed in float64."""
    if not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"spherical harmonics degree must be 0 to {MAX_DEGREE}, got {degree}")
    n = coefficient_count(degree)
    rot = rotation.to(torch.float64)
    directions = _DIRECTIONS.to(rot.device)
    turned = directions @ rot  # row k: R^T d_k
    values = basis(turned)  # (..., 12, 9): basis function j at R^T d_k
    fit = _FIT.to(rot.device)
    out = torch.zeros(*rotation.shape[:-2], n, n, dtype=torch.float64, device=rot.device)
    for level in range(degree + 1):
        band = slice(level**2, (level + 1) ** 2)
        out[..., band, band] = fit[band] @ values[..., band]
    return out


def rotate(coefficients: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """SH coefficient vectors (..., m, n), n = 1, 4 or 9, and rotations R (..., 3, 3) -> the
    coefficients (..., m, n) of the rotated functions f'(d) = f(R^T d), in the coefficients'
    dtype. Each rotation applies to the m vectors beside it (e.g. the colour channels, or every
    Gaussian of one view), as one matrix product."""
    n = coefficients.shape[-1]
    degree = math.isqrt(n) - 1
    if coefficient_count(degree) != n:
        raise ValueError(f"expected 1, 4 or 9 SH coefficients, got {n}")
    transform = rotation_matrix(rotation, degree).to(coefficients.dtype)
    return coefficients @ transform.mT
