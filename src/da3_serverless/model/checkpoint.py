"""DA3 snapshot folders: ``config.json`` ({"model_name": preset}) + ``model.safetensors``.

Tensor names are those of the official release: the network's state-dict keys under the prefix
``model.``. The official files were written with safetensors' ``save_model``, which stores each
set of shared (tied) tensors once, under one of its names; both reading and writing follow that.

The 3D-Gaussian branch (`gs_head.*`; its adapter stores no tensors) is part of a network exactly
when its checkpoint holds those keys: the loader attaches it then, and loads it strictly too.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn

from da3_serverless.model.net import NestedDepthAnything3Net
from da3_serverless.model.precision import low_precision_names, storage_dtype
from da3_serverless.model.presets import (
    GAUSSIAN_RELEASES,
    PRESETS,
    attach_gaussian_branch,
    build_network,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KEY_PREFIX = "model."
# Module names of the 3D-Gaussian branch; keys under them make the loader attach the branch.
GAUSSIAN_MODULES = frozenset({"gs_head", "gs_adapter"})
# How many offending keys an error lists before giving a count.
MAX_LISTED_KEYS = 10
# The networks that can be the any-view half of a pair with da3metric-large (`load_pair`).
ANY_VIEW_PRESETS = ("da3-small", "da3-base", "da3-large", "da3-giant")


class CheckpointError(ValueError):
    """A snapshot folder that does not hold the network its config names."""


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return f"{len(keys)}: {shown}" + (f" and {more} more" if more > 0 else "")


def read_preset(folder: str | Path) -> str:
    """The preset named by ``folder/config.json``; CheckpointError if absent or unknown."""
    path = Path(folder) / CONFIG_NAME
    try:
        name = json.loads(path.read_text())["model_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} must be JSON with a 'model_name': {exc}") from exc
    if name not in PRESETS:
        raise CheckpointError(
            f"{path} names unknown model {name!r}; valid names: {', '.join(PRESETS)}"
        )
    return name


class _Group:
    """One distinct tensor of a network: all its state-dict names (more than one when tied),
    its placeholder and whether it is a parameter (else a persistent buffer)."""

    def __init__(self, tensor: torch.Tensor, is_param: bool) -> None:
        self.names: list[str] = []
        self.tensor = tensor
        self.is_param = is_param

    def assign(self, net: nn.Module, value: torch.Tensor) -> None:
        """Make ``value`` the tensor of every name (ties kept: one object for all)."""
        new = nn.Parameter(value, requires_grad=False) if self.is_param else value
        for name in self.names:
            module_name, _, leaf = name.rpartition(".")
            module = net.get_submodule(module_name)
            (module._parameters if self.is_param else module._buffers)[leaf] = new


def _groups(net: nn.Module) -> list[_Group]:
    """Distinct parameters and persistent buffers of ``net``, names sorted, in name order."""
    groups: dict[int, _Group] = {}
    for module_name, module in net.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for leaf, param in module._parameters.items():
            if param is not None:
                groups.setdefault(id(param), _Group(param, True)).names.append(prefix + leaf)
        for leaf, buf in module._buffers.items():
            if buf is not None and leaf not in module._non_persistent_buffers_set:
                groups.setdefault(id(buf), _Group(buf, False)).names.append(prefix + leaf)
    for group in groups.values():
        group.names.sort()
    return sorted(groups.values(), key=lambda g: g.names[0])


def _check_materialised(net: nn.Module) -> None:
    left = [name for name, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"tensors without values after loading: {_listing(left)}")


def _is_gaussian(key: str) -> bool:
    return not GAUSSIAN_MODULES.isdisjoint(key.split("."))


def holds_gaussians(folder: str | Path) -> bool:
    """Whether ``folder/model.safetensors`` holds the 3D-Gaussian branch's keys, as the loader
    decides it, read from the file's header alone (no tensor is read): known before loading.
    CheckpointError when the file cannot be read."""
    path = Path(folder) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as file:
            return any(_is_gaussian(key) for key in file.keys())  # noqa: SIM118
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path} cannot be read as safetensors: {error}") from None


def _build(preset: str, keys: set[str]) -> nn.Module:
    """The preset's network on the meta device, with the 3D-Gaussian branch when `keys` hold it."""
    with torch.device("meta"):
        net = build_network(preset)
        if any(_is_gaussian(key) for key in keys):
            # A network that cannot take the branch keeps its keys as unexpected ones.
            with contextlib.suppress(ValueError):
                attach_gaussian_branch(net)
    return net


def load_network(
    folder: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[str, nn.Module]:
    """Build the network of ``folder``'s config and fill it from ``folder/model.safetensors``.

    The network is built on the meta device (no random init) and every tensor is read straight
    onto ``device`` and converted once: ``dtype`` is the compute dtype, which the backbone's
    matrices are held in; every other floating-point tensor is held in fp32
    (``model/precision.py`` says which and why). Strict: missing, unexpected or mis-shaped
    tensors raise CheckpointError naming them. The 3D-Gaussian branch is built when the file
    holds its keys. A tied tensor may be stored under any of its names. Returns (preset,
    network in eval mode).
    """
    folder = Path(folder)
    preset = read_preset(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")

    missing, wrong_shape, used = [], [], set()
    try:
        with safe_open(str(path), framework="pt", device=str(torch.device(device))) as file:
            stored = set(file.keys())
            net = _build(preset, stored)
            low_precision = low_precision_names(net)
            for group in _groups(net):
                present = [KEY_PREFIX + n for n in group.names if KEY_PREFIX + n in stored]
                used.update(present)
                if not present:
                    missing.append(KEY_PREFIX + group.names[0])
                    continue
                value = file.get_tensor(present[0])
                if value.shape != group.tensor.shape:
                    shapes = f"{tuple(value.shape)} instead of {tuple(group.tensor.shape)}"
                    wrong_shape.append(f"{present[0]} {shapes}")
                    continue
                if value.is_floating_point():
                    value = value.to(storage_dtype(group.names, low_precision, dtype))
                group.assign(net, value)
    except SafetensorError as error:  # a truncated or corrupt file
        raise CheckpointError(f"{path} cannot be read as safetensors: {error}") from None
    problems = [
        f"{label} ({_listing(keys)})"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", sorted(stored - used)),
            ("keys of the wrong shape", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(f"{path} does not fit {preset}: " + "; ".join(problems))
    _check_materialised(net)
    return preset, net.eval()


def load_pair(
    folders: Sequence[str | Path],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[str, nn.Module]:
    """Two official snapshots, an any-view network and DA3METRIC-LARGE, loaded each by
    `load_network` and joined as the nested model joins its two (`NestedDepthAnything3Net`:
    the any-view depth and cameras brought to the metric network's metres). Returns
    ("<any-view preset>+da3metric-large", network); CheckpointError when the folders hold
    other networks."""
    if len(folders) != 2:
        raise CheckpointError(f"a pair needs two snapshot folders, got {len(folders)}")
    any_view, metric = (load_network(folder, device, dtype) for folder in folders)
    if metric[0] != "da3metric-large" or any_view[0] not in ANY_VIEW_PRESETS:
        raise CheckpointError(
            f"a pair is an any-view network ({', '.join(ANY_VIEW_PRESETS)}) and "
            f"da3metric-large; {folders[0]} holds {any_view[0]}, {folders[1]} {metric[0]}"
        )
    return f"{any_view[0]}+{metric[0]}", NestedDepthAnything3Net(any_view[1], metric[1]).eval()


@lru_cache(maxsize=32)
def loaded_bytes(preset: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the tensors of ``preset`` take once loaded by ``load_network`` with compute dtype
    ``dtype`` (tied tensors once), counted on the meta device: no weights read. The presets
    whose official snapshots hold the 3D-Gaussian head are counted with it."""
    with torch.device("meta"):
        net = build_network(preset)
        if preset in GAUSSIAN_RELEASES:
            attach_gaussian_branch(net)
    low_precision = low_precision_names(net)
    total = 0
    for group in _groups(net):
        held = group.tensor.dtype
        if group.tensor.is_floating_point():
            held = storage_dtype(group.names, low_precision, dtype)
        total += group.tensor.numel() * held.itemsize
    return total


def save_network(net: nn.Module, preset: str, folder: str | Path) -> Path:
    """Write ``net`` as a snapshot folder of ``preset`` (official layout, tied tensors once),
    each file atomically. Returns the folder."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DA3 preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = nn.Module()
    wrapper.model = net  # gives the keys their "model." prefix
    _write_atomically(folder / WEIGHTS_NAME, lambda tmp: save_model(wrapper, str(tmp)))
    config = json.dumps({"model_name": preset}) + "\n"
    _write_atomically(folder / CONFIG_NAME, lambda tmp: tmp.write_text(config))
    return folder


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _random_value(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Seeded stand-in for a trained tensor, scaled so activations stay O(1) through the
    network: depth is finite and varied, sky probabilities fall on both sides of 0.3."""
    noise = torch.randn(shape, generator=gen, device=gen.device)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "gamma":  # layer scale: small residual branches
        return 0.1 + 0.01 * noise
    if name.endswith("fc_fov.0.bias"):  # fields of view around 1 rad, not clamped at 0
        return 1.0 + 0.05 * noise
    if leaf in ("cls_token", "camera_token", "pos_embed"):
        return 0.02 * noise
    if len(shape) == 1:  # norm weights around 1, biases around 0
        return (1.0 if leaf == "weight" else 0.0) + 0.02 * noise
    fan_in = shape[1:].numel()
    return noise / fan_in**0.5


def write_random_checkpoint(
    preset: str,
    folder: str | Path,
    seed: int = 0,
    device: torch.device | str = "cpu",
    gaussians: bool | None = None,
) -> Path:
    """Write a snapshot folder of ``preset`` whose every tensor is drawn from ``seed`` (the
    same seed gives the same file). For tests and benchmarks. ``device`` draws the numbers (a
    GPU draws the giant presets' billions many times faster; another device type gives other
    values for the same seed). ``gaussians``: include the 3D-Gaussian head (default: as the
    official release of the preset does); tensors outside the head get the same values either
    way. Returns the folder."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DA3 preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    with torch.device("meta"):
        net = build_network(preset)
        if preset in GAUSSIAN_RELEASES if gaussians is None else gaussians:
            attach_gaussian_branch(net)
    fill_random(net, seed, device)
    _check_materialised(net)
    return save_network(net, preset, folder)


def fill_random(net: nn.Module, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """Give every tensor of ``net`` (built, or on the meta device) the seeded stand-in value
    `write_random_checkpoint` writes, on CPU; ``device`` draws the numbers. For tests of small
    networks built by hand. Returns ``net``."""
    gen = torch.Generator(device).manual_seed(seed)
    groups = sorted(_groups(net), key=lambda g: _is_gaussian(g.names[0]))  # the head last
    for group in groups:
        group.assign(net, _random_value(group.names[0], group.tensor.shape, gen).cpu())
    return net
