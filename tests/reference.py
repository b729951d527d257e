"""The reference implementation (PyPI ``depth-anything-3`` 0.1.1) as a test oracle.

It is installed without its heavy extras; the modules it imports only for export, rendering
or the app (video, meshes, plots, COLMAP, trajectories, torchvision transforms) are replaced
here, for the tests only, by permissive placeholder modules. The network code the tests
compare against never calls them.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch
from torch import nn

# Imported by the reference at import time but never used by its networks.
_OPTIONAL_MODULES = (
    "moviepy",
    "moviepy.editor",
    "cv2",
    "plyfile",
    "matplotlib",
    "matplotlib.pyplot",
    "pycolmap",
    "trimesh",
    "imageio",
    "torchvision",
    "torchvision.transforms",
    "evo",
    "evo.core",
    "evo.core.trajectory",
)


class _PlaceholderMeta(type):
    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _PlaceholderMeta(name, (_Placeholder,), {})


class _Placeholder(metaclass=_PlaceholderMeta):
    """Stands for any class, function or value of a missing module; does nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return _Placeholder()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder()


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _PlaceholderMeta(name, (_Placeholder,), {})


def _install_placeholders() -> None:
    for name in _OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            module = _PlaceholderModule(name)
            module.__path__ = []
            sys.modules[name] = module


def reference_api():
    """The reference's ``depth_anything_3.api`` module."""
    _install_placeholders()
    return importlib.import_module("depth_anything_3.api")


def reference_wrapper(preset: str) -> nn.Module:
    """The reference's ``DepthAnything3`` wrapper for a preset (random weights, eval, fp32)."""
    return reference_api().DepthAnything3(model_name=preset).eval()


GAUSSIAN_HEAD_MODULES = {"gs_head", "gs_adapter"}


def load_reference(
    preset: str, folder: str | Path, device: str | torch.device = "cpu"
) -> nn.Module:
    """The reference wrapper with the weights of ``folder/model.safetensors``, on ``device``
    (built there, so a GPU does the random init the weights then replace).

    Tensors are copied in one at a time (no second copy of a multi-GB state dict). Strict like
    safetensors' ``load_model``: every stored key must exist, and every parameter must be stored
    under its own name or one it shares memory with; except for the 3D-Gaussian head of the
    giant presets when the snapshot was written without it (the depth forward never runs it).
    """
    from safetensors import safe_open

    with torch.device(device):
        wrapper = reference_wrapper(preset).to(device)  # .to: anything built on a fixed device
    state = wrapper.state_dict(keep_vars=True)
    filled = set()
    with (
        safe_open(
            str(Path(folder) / "model.safetensors"), framework="pt", device=str(device)
        ) as file,
        torch.no_grad(),
    ):
        for key in file.keys():  # noqa: SIM118
            assert key in state, f"unexpected key {key}"
            state[key].copy_(file.get_tensor(key))
            filled.add(state[key].data_ptr())
    not_loaded = [
        key
        for key, tensor in state.items()
        if tensor.data_ptr() not in filled and GAUSSIAN_HEAD_MODULES.isdisjoint(key.split("."))
    ]
    assert not not_loaded, f"missing keys {not_loaded}"
    return wrapper


def reference_module(name: str):
    """A reference module by dotted name (placeholders installed first)."""
    _install_placeholders()
    return importlib.import_module(name)


@torch.no_grad()
def reference_forward(wrapper: nn.Module, images: torch.Tensor, **kwargs) -> dict:
    """The reference network's own forward in fp32 (not the wrapper's autocast)."""
    return wrapper.model(images, **kwargs)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """The parity rule: equal to 1e-4 relative; entries near zero get an absolute floor of
    1e-5 x max |ref|."""
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


# The reference estimates quantiles of over this many values from this many drawn at random.
REFERENCE_QUANTILE_SAMPLES = 100_000


def assert_within_sampling_error(estimate: torch.Tensor, values: torch.Tensor, q: float) -> None:
    """The parity rule for a quantile the reference estimates from a random sample of
    `REFERENCE_QUANTILE_SAMPLES` and we take exactly: the reference's `estimate` of the q-quantile
    of `values` lies between their exact (q - d)- and (q + d)-quantiles, d five standard errors
    of a sample quantile's rank, sqrt(q (1 - q) / samples)."""
    spread = 5 * (q * (1 - q) / REFERENCE_QUANTILE_SAMPLES) ** 0.5
    low, high = (max(0.0, q - spread), min(1.0, q + spread))
    sorted_values = values.flatten().sort().values
    bounds = [sorted_values[round(p * (sorted_values.numel() - 1))].item() for p in (low, high)]
    assert bounds[0] <= float(estimate) <= bounds[1], (float(estimate), bounds)


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """Perturb every parameter with seeded noise so norms, biases and scales are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()
