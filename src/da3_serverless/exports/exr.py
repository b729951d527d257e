"""A depth map as OpenEXR: one FLOAT channel "Y" (exact float32, NaN and inf kept), ZIP
compressed (lossless), written by the OpenEXR library."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import OpenEXR


def depth_exr(depth: np.ndarray) -> bytes:
    """The EXR file of a (H, W) depth map, bit-exact float32."""
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {depth.shape}")
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    channels = {"Y": np.ascontiguousarray(depth, dtype=np.float32)}
    out = BytesIO()
    with OpenEXR.File(header, channels) as exr:
        exr.write(out)
    return out.getvalue()
