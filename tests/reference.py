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


def load_reference(preset: str, folder: str | Path) -> nn.Module:
    """The reference wrapper with the weights of ``folder/model.safetensors`` (strict)."""
    from safetensors.torch import load_model

    wrapper = reference_wrapper(preset)
    missing, unexpected = load_model(wrapper, str(Path(folder) / "model.safetensors"))
    assert not missing and not unexpected, (missing, unexpected)
    return wrapper


def reference_module(name: str):
    """A reference module by dotted name (placeholders installed first)."""
    _install_placeholders()
    return importlib.import_module(name)


@torch.no_grad()
def reference_forward(wrapper: nn.Module, images: torch.Tensor, **kwargs) -> dict:
    """The reference network's own forward in fp32 (not the wrapper's autocast)."""
    return wrapper.model(images, **kwargs)
