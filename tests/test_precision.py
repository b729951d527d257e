"""The GPU path, proven on CPU: weights held in the compute dtype (backbone matrices in bf16,
the modules that need fp32 in fp32), bf16 against fp32 within a stated tolerance, the memory
estimate by dtype, output maps copied to the host once, no tensor outliving a request, and a
loading path that needs no settings (so the GPU check runs without pydantic)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import SMALL_REPO
from da3_serverless.inference.cache import ModelCache, estimated_bytes, model_bytes
from da3_serverless.inference.predictor import Predictor
from da3_serverless.model.checkpoint import loaded_bytes
from da3_serverless.model.precision import FP32_MODULES, low_precision_names
from da3_serverless.model.presets import build_network
from paths import IMAGES, REPO

PHOTOS = [IMAGES / "soh-000.png", IMAGES / "soh-010.png"]
# bf16 weights against fp32 on da3-small (random weights, soh-000.png at process_res 280):
# per-pixel depth relative error |bf16 - fp32| / fp32. Measured 0.65 % (p99) and 1.1 % (max)
# on torch 2.13 CPU; bench/bf16.py gives every preset's figure.
BF16_DEPTH_REL_P99 = 0.02
BF16_DEPTH_REL_MAX = 0.05


@pytest.fixture(scope="module")
def fp32(small_snapshot) -> Predictor:
    return Predictor.from_pretrained(small_snapshot, device="cpu")


@pytest.fixture(scope="module")
def bf16(small_snapshot) -> Predictor:
    return Predictor.from_pretrained(small_snapshot, device="cpu", dtype=torch.bfloat16)


def test_cpu_default_is_fp32(fp32):
    assert fp32.dtype == torch.float32
    assert {p.dtype for p in fp32.network.parameters()} == {torch.float32}


def test_bf16_holds_the_backbone_matrices_only(bf16):
    low = low_precision_names(bf16.network)
    for name, tensor in bf16.network.state_dict().items():
        expected = torch.bfloat16 if name in low else torch.float32
        assert tensor.dtype == expected, name
    for module in FP32_MODULES:
        assert {p.dtype for p in getattr(bf16.network, module).parameters()} == {torch.float32}
    # Norms, biases, layer scales, tokens and the position embedding of the backbone stay fp32.
    vit = bf16.network.backbone.pretrained
    assert vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    for tensor in (
        vit.blocks[0].attn.qkv.bias,
        vit.blocks[0].ls1.gamma,
        vit.pos_embed,
        vit.norm.weight,
    ):
        assert tensor.dtype == torch.float32


def test_nested_network_converts_both_backbones_and_no_head():
    with torch.device("meta"):
        nested = build_network("da3nested-giant-large")
    low = low_precision_names(nested)
    assert any(n.startswith("da3.backbone.") for n in low)
    assert any(n.startswith("da3_metric.backbone.") for n in low)
    assert all(".backbone." in f".{n}" and n.endswith(".weight") for n in low)
    assert not [n for n in low if n.split(".")[0] in FP32_MODULES or ".head." in n]


def test_bf16_weights_give_exactly_what_autocast_over_fp32_weights_gives(fp32, bf16):
    """Holding the matrices in bf16 changes no result: autocast casts them there anyway."""
    autocast = Predictor(fp32.network, "da3-small", device="cpu", dtype=torch.bfloat16)
    held, cast = bf16.predict(PHOTOS, process_res=140), autocast.predict(PHOTOS, process_res=140)
    np.testing.assert_array_equal(held.depth, cast.depth)
    np.testing.assert_array_equal(held.extrinsics, cast.extrinsics)


def test_bf16_against_fp32_within_the_stated_tolerance(fp32, bf16):
    reference, low = (
        fp32.predict(PHOTOS[0], process_res=280),
        bf16.predict(PHOTOS[0], process_res=280),
    )
    relative = np.abs(low.depth - reference.depth) / np.abs(reference.depth)
    assert np.percentile(relative, 99) < BF16_DEPTH_REL_P99
    assert relative.max() < BF16_DEPTH_REL_MAX
    assert low.depth.dtype == np.float32 and low.confidence.dtype == np.float32
    np.testing.assert_allclose(low.extrinsics, reference.extrinsics, atol=0.05)


def test_memory_estimate_follows_the_dtype(fp32, bf16):
    assert estimated_bytes(SMALL_REPO) == model_bytes(fp32) == loaded_bytes("da3-small")
    assert estimated_bytes(SMALL_REPO, torch.bfloat16) == model_bytes(bf16)
    assert 0.5 < model_bytes(bf16) / model_bytes(fp32) < 0.75
    assert estimated_bytes("not/a-model", torch.bfloat16) == 0


def test_model_cache_estimates_in_its_dtype(small_snapshot, bf16):
    """A budget that fits one bf16 da3-small but not its fp32 estimate loads it without first
    evicting the model already there; the fp32 cache evicts it before loading."""
    budget = model_bytes(bf16) * 2 + 1

    def load(model_id: str) -> Predictor:
        return Predictor.from_pretrained(small_snapshot, device="cpu", dtype=torch.bfloat16)

    evicted = {}
    for dtype in (torch.bfloat16, torch.float32):
        cache = ModelCache(load, budget, dtype)
        cache.get("first-folder")  # not in the table: no estimate, loads at its real size
        cache.get(SMALL_REPO)
        evicted[dtype] = "first-folder" not in cache.loaded()
    assert evicted == {torch.bfloat16: False, torch.float32: True}


class HostCopies(TorchFunctionMode):
    """Records the size of every tensor copied (`.cpu()`) or read (`.item()`, `.tolist()`) back
    to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.item):
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "views", [PHOTOS[:1], PHOTOS * 2, [PHOTOS[0], PHOTOS[1], IMAGES / "soh-000.png"]]
)
def test_output_maps_come_back_in_one_copy(fp32, monkeypatch, views):
    """Assembling the prediction copies the resized maps of every view to the host once (and
    the two small camera arrays), however many views there are."""
    if len(views) == 3:  # views of different sizes: one resize call per size, still one copy
        from PIL import Image

        views = [Image.open(views[0]), Image.open(views[1]).resize((300, 500)), views[2]]
    original, copies = Predictor._finish, []

    def finish(self, prepared, output, sample):
        with HostCopies() as mode:
            result = original(self, prepared, output, sample)
        copies.append(mode.sizes)
        return result

    monkeypatch.setattr(Predictor, "_finish", finish)
    prediction = fp32.predict(views, process_res=140)
    (sizes,) = copies
    maps = 2 * sum(view.size for view in prediction.depth)  # depth and confidence, every view
    assert sorted(sizes) == sorted([len(views) * 12, len(views) * 9, maps])


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python can still reach (the CPU's memory_allocated)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        try:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # a fake tensor left by an earlier torch.compile test: no memory
            continue
    return sum(storages.values())


def test_no_tensor_outlives_a_request(bf16):
    """After a request the tensors alive are the loaded model's again (on CUDA the same code
    brings torch.cuda.memory_allocated back to its post-load value; bench/gpu.py checks it)."""
    bf16.predict(PHOTOS, process_res=140)  # lazy initialisation, if any
    baseline = live_tensor_bytes()
    prediction = bf16.predict(PHOTOS, process_res=140)
    assert not any(isinstance(v, torch.Tensor) for v in vars(prediction).values())
    # On CPU the host arrays' memory is a torch storage too; on CUDA it is not device memory.
    del prediction
    assert live_tensor_bytes() == baseline


def test_loading_from_a_folder_needs_no_settings(small_snapshot):
    """The GPU check's machine has no pydantic: the network, the predictor and loading from a
    snapshot folder must not import it (nor the servers)."""
    code = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {{"pydantic", "pydantic_settings", "fastapi", "runpod", "httpx"}}:
            raise ImportError(f"{{name}} is not on the GPU machine")
sys.meta_path.insert(0, Refuse())
import torch
from da3_serverless.inference.predictor import Predictor
predictor = Predictor.from_pretrained({str(small_snapshot)!r}, device="cpu", dtype=torch.bfloat16)
print(predictor.predict({str(PHOTOS[0])!r}, process_res=70).depth.shape)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 680, 1208)"
