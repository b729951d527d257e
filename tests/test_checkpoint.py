"""Snapshot folders: loading (strict, tied tensors, 3D-Gaussian keys loaded strictly too), writing,
and interchange with the reference implementation's own files, on the da3-small network.
(The 3D-Gaussian branch itself: tests/test_gaussians.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model

from da3_serverless.model.checkpoint import (
    CheckpointError,
    load_network,
    save_network,
    write_random_checkpoint,
)
from da3_serverless.model.presets import PRESETS, build_network
from reference import load_reference, reference_forward, reference_wrapper

PRESET = "da3-small"
# The ray branch's output LayerNorm is one module shared by the 4 pyramid levels.
TIED = [f"model.head.scratch.output_conv2_aux.{level}.2.weight" for level in range(4)]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    return write_random_checkpoint(PRESET, tmp_path_factory.mktemp("snapshot"), seed=0)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118


def write_snapshot(folder: Path, tensors: dict[str, torch.Tensor], preset: str = PRESET) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_name": preset}))
    return folder


def images(views: int = 2) -> torch.Tensor:
    return torch.randn(1, views, 3, 42, 56, generator=torch.Generator().manual_seed(3))


def test_written_snapshot_has_the_official_layout(snapshot):
    assert json.loads((snapshot / "config.json").read_text()) == {"model_name": PRESET}
    keys = set(read_tensors(snapshot))
    assert all(key.startswith("model.") for key in keys)
    # Tied tensors are stored once, under the first of their names (save_model's choice).
    assert TIED[0] in keys and not keys & set(TIED[1:])
    assert not [p for p in snapshot.iterdir() if p.name not in ("config.json", "model.safetensors")]


def test_random_checkpoint_is_determined_by_the_seed(tmp_path, snapshot):
    again = read_tensors(write_random_checkpoint(PRESET, tmp_path / "again", seed=0))
    other = read_tensors(write_random_checkpoint(PRESET, tmp_path / "other", seed=1))
    first = read_tensors(snapshot)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[TIED[0]], other[TIED[0]])


def test_loads_onto_the_requested_dtype_with_ties_kept(snapshot):
    preset, net = load_network(snapshot, device="cpu", dtype=torch.bfloat16)
    assert preset == PRESET and not net.training
    # The compute dtype holds the backbone's matrices; the heads and the rest stay fp32.
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16, torch.float32}
    assert net.backbone.pretrained.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert {p.dtype for p in net.head.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in net.parameters())
    aux = net.head.scratch.output_conv2_aux
    assert all(branch[2].weight is aux[0][2].weight for branch in aux)


def test_tied_tensor_may_be_stored_under_any_of_its_names(tmp_path, snapshot):
    tensors = read_tensors(snapshot)
    for suffix in ("weight", "bias"):
        first = TIED[0].replace("weight", suffix)
        tensors[TIED[3].replace("weight", suffix)] = tensors.pop(first)
    folder = write_snapshot(tmp_path / "renamed", tensors)
    _, ours = load_network(folder)
    _, original = load_network(snapshot)
    with torch.no_grad():
        got = ours(images(), use_ray_pose=True)
        expected = original(images(), use_ray_pose=True)
    torch.testing.assert_close(got.depth, expected.depth)
    torch.testing.assert_close(got.extrinsics, expected.extrinsics)


def test_gaussian_head_keys_are_not_skipped(tmp_path, snapshot):
    tensors = read_tensors(snapshot)
    tensors["model.gs_head.scratch.output_conv2.0.weight"] = torch.zeros(2, 2)
    tensors["model.gs_adapter.sh_mask"] = torch.ones(3)
    with pytest.raises(CheckpointError) as err:
        load_network(write_snapshot(tmp_path / "gs", tensors))
    message = str(err.value)
    assert "missing keys" in message and "model.gs_head.images_merger.0.weight" in message
    assert "unexpected keys (1: model.gs_adapter.sh_mask)" in message
    assert "model.gs_head.scratch.output_conv2.0.weight (2, 2) instead of" in message


def test_missing_and_unexpected_keys_are_named(tmp_path, snapshot):
    tensors = read_tensors(snapshot)
    del tensors["model.backbone.pretrained.cls_token"]
    tensors["model.head.extra_conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_network(write_snapshot(tmp_path / "bad", tensors))
    message = str(err.value)
    assert "missing keys (1: model.backbone.pretrained.cls_token)" in message
    assert "unexpected keys (1: model.head.extra_conv.weight)" in message


def test_long_key_lists_are_cut_with_a_count(tmp_path, snapshot):
    tensors = {k: v for k, v in read_tensors(snapshot).items() if ".blocks." not in k}
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+: .* and \d+ more\)"):
        load_network(write_snapshot(tmp_path / "few", tensors))


def test_wrong_shapes_are_named(tmp_path, snapshot):
    tensors = read_tensors(snapshot)
    tensors["model.backbone.pretrained.cls_token"] = torch.zeros(1, 1, 7)
    with pytest.raises(CheckpointError, match=r"cls_token \(1, 1, 7\) instead of \(1, 1, 384\)"):
        load_network(write_snapshot(tmp_path / "shape", tensors))


def test_weights_of_another_preset_are_refused(tmp_path, snapshot):
    folder = write_snapshot(tmp_path / "base", read_tensors(snapshot), preset="da3-base")
    with pytest.raises(CheckpointError, match="does not fit da3-base"):
        load_network(folder)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"model_name": "da3-tiny"}, "unknown model 'da3-tiny'; valid names: da3-small"),
        ({"name": "da3-small"}, "must be JSON with a 'model_name'"),
        (None, "must be JSON"),
    ],
)
def test_bad_configs_are_refused(tmp_path, snapshot, config, match):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(snapshot / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        load_network(folder)
    assert issubclass(CheckpointError, ValueError)


def test_missing_weights_file_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_name": PRESET}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_network(tmp_path)


def test_unknown_preset_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid presets: da3-small, da3-base"):
        build_network("da3-huge")
    with pytest.raises(ValueError, match="valid presets"):
        write_random_checkpoint("da3-huge", tmp_path)
    assert set(PRESETS) == {
        "da3-small",
        "da3-base",
        "da3-large",
        "da3-giant",
        "da3mono-large",
        "da3metric-large",
        "da3nested-giant-large",
    }


def test_reference_saved_checkpoint_loads_and_agrees(tmp_path):
    torch.manual_seed(0)
    wrapper = reference_wrapper(PRESET)
    folder = tmp_path / "from-reference"
    folder.mkdir()
    save_model(wrapper, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_name": PRESET}))
    _, net = load_network(folder)
    assert len(net.state_dict()) == len(wrapper.model.state_dict())
    with torch.no_grad():
        ours = net(images(3))
    expected = reference_forward(wrapper, images(3))
    torch.testing.assert_close(ours.depth, expected.depth, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.extrinsics, expected.extrinsics, rtol=1e-4, atol=1e-5)


def test_our_checkpoint_loads_into_the_reference_strictly(snapshot):
    wrapper = reference_wrapper(PRESET)
    missing, unexpected = load_model(wrapper, str(snapshot / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    assert load_reference(PRESET, snapshot) is not None


def test_save_network_round_trips(tmp_path, snapshot):
    _, net = load_network(snapshot)
    folder = save_network(net, PRESET, tmp_path / "resaved")
    first, second = read_tensors(snapshot), read_tensors(folder)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
