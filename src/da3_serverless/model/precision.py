"""Which tensors of a DA3 network are held in the compute dtype (bf16 on GPUs), which in fp32.

Only the big matrices are converted, once, at load: the weights of the backbone's linear and
convolution layers, nearly all of a network's bytes. They run under ``torch.autocast`` in the
compute dtype anyway, so holding them there changes no result (autocast would cast them on every
forward) and halves their memory. Everything else stays fp32:

- ``FP32_MODULES``, the modules that run with autocast off (``model/net.py``), keep every tensor
  in fp32:
  - ``head`` (DPT / DualDPT): depth goes through ``exp`` and confidence through ``1 + exp``, so
    a bf16 rounding of the last features (3 significant digits) becomes a relative error of the
    output itself; its 3x3 convolutions at full resolution also sum many terms.
  - ``cam_dec``: the pose encoding (translation, quaternion, field of view) decides every
    camera; a rounded quaternion or field of view moves the whole point cloud.
  - ``cam_enc``: given cameras enter as a pose encoding; rounding them changes the conditioning.
  - ``gs_head``, the 3D-Gaussian head of networks whose checkpoint holds it (so not in the
    tuple): its outputs become positions, sizes and colours through the depth and cameras.
  They compute in fp32 (as in the reference), so holding them in bf16 would only add a cast
  back on every forward. They hold 9 % (metric-large) to 36 % (small) of the parameters, the
  camera encoder's transformer most of it: with bf16 weights a network takes 55-69 % of its
  fp32 bytes (``checkpoint.loaded_bytes``) instead of 50 %.
- In the backbone, norms, biases, layer scales, the class / camera tokens and the position
  embedding stay fp32: they are tiny, and with them in fp32 the residual stream stays fp32
  under autocast, as in the reference's own mixed-precision path.

Post-processing (ray pose, sky fill, metric alignment) runs in fp32 on the heads' fp32 outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from da3_serverless.model.net import DepthAnything3Net

# Submodules of every DepthAnything3Net kept in fp32 (and run with autocast off); see above.
FP32_MODULES = ("head", "cam_dec", "cam_enc")
# The only submodule whose matrices are held in the compute dtype.
LOW_PRECISION_MODULE = "backbone"
_MATRIX_LAYERS = (nn.Linear, nn.Conv2d)


def low_precision_names(net: nn.Module) -> set[str]:
    """State-dict names of the tensors held in the compute dtype: the weights of the linear and
    convolution layers in each DepthAnything3Net's backbone (the nested network has two)."""
    names: set[str] = set()
    for prefix, module in net.named_modules():
        if not isinstance(module, DepthAnything3Net):
            continue
        base = f"{prefix}.{LOW_PRECISION_MODULE}" if prefix else LOW_PRECISION_MODULE
        for name, layer in getattr(module, LOW_PRECISION_MODULE).named_modules():
            if isinstance(layer, _MATRIX_LAYERS):
                names.add(f"{base}.{name}.weight")
    return names


def storage_dtype(names: list[str], low_precision: set[str], dtype: torch.dtype) -> torch.dtype:
    """The dtype a floating-point tensor known by `names` (all names of one tied tensor) is
    held in, for compute dtype `dtype`: `dtype` when every name is a backbone matrix, else fp32.
    """
    return dtype if all(name in low_precision for name in names) else torch.float32
