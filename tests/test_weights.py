"""Where weights come from: every place in the resolution order, on real snapshot folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import SMALL_REPO, place_in_hf_cache
from da3_serverless.config import Settings
from da3_serverless.inference.weights import ModelNotFoundError, WeightLocator


def locator(tmp_path: Path, **overrides) -> WeightLocator:
    values = dict(
        hf_cache=tmp_path / "hf-home" / "hub",
        models_dir=tmp_path / "workspace" / "models",
        runpod_hub_cache=tmp_path / "runpod-volume" / "huggingface-cache" / "hub",
        runpod_plain_cache=tmp_path / "runpod" / "cache",
        offline=True,
    )
    return WeightLocator(**{**values, **overrides})


def copy_snapshot(snapshot: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(snapshot / name, target / name)
    return target


def test_a_local_folder_is_used_as_is(small_snapshot, tmp_path):
    assert locator(tmp_path).resolve(str(small_snapshot)) == small_snapshot
    with pytest.raises(ModelNotFoundError, match="not a model snapshot"):
        locator(tmp_path).resolve(str(tmp_path))


def test_runpod_model_cache_comes_first(small_snapshot, tmp_path):
    weights = locator(tmp_path)
    place_in_hf_cache(small_snapshot, tmp_path / "hf-home", SMALL_REPO)
    runpod_hub = place_in_hf_cache(
        small_snapshot, tmp_path / "runpod-volume" / "huggingface-cache", SMALL_REPO
    )
    assert runpod_hub == weights.runpod_hub_cache
    assert weights.resolve("da3-small").is_relative_to(runpod_hub)


def test_runpod_plain_cache_then_workspace_models_then_hf_cache(small_snapshot, tmp_path):
    weights = locator(tmp_path)
    place_in_hf_cache(small_snapshot, tmp_path / "hf-home", SMALL_REPO)
    assert weights.resolve(SMALL_REPO).is_relative_to(weights.hf_cache)
    manual = copy_snapshot(small_snapshot, weights.models_dir / "DA3-SMALL")
    assert weights.resolve(SMALL_REPO) == manual
    plain = copy_snapshot(small_snapshot, weights.runpod_plain_cache / SMALL_REPO / "abc123")
    assert weights.resolve("DA3-small") == plain  # short names, any case


def test_offline_miss_says_where_it_looked_why_and_what_next_in_three_lines(tmp_path):
    with pytest.raises(ModelNotFoundError) as error:
        locator(tmp_path).resolve("da3-giant")
    where, hub, steps = str(error.value).split("\n")
    assert "depth-anything/DA3-GIANT-1.1" in where
    for place in ("RunPod model cache", "workspace models", "Hugging Face cache"):
        assert place in where
    assert str(tmp_path / "hf-home" / "hub") in where
    assert hub.startswith("the hub was not asked") and "HF_HUB_OFFLINE=1" in hub
    for step in ("MODEL_ID=depth-anything/DA3-SMALL",
                 "`da3-serverless prefetch depth-anything/DA3-GIANT-1.1`",
                 "MODEL_ID=<a local snapshot folder"):  # fmt: skip
        assert step in steps
    assert len(hub) <= 100 and len(steps) <= 300  # short enough to read at a glance


def test_an_incomplete_snapshot_is_not_used(small_snapshot, tmp_path):
    weights = locator(tmp_path)
    partial = copy_snapshot(small_snapshot, weights.models_dir / "DA3-SMALL")
    (partial / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError):
        weights.resolve(SMALL_REPO)


def test_unknown_names_are_refused_without_looking(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a snapshot folder"):
        locator(tmp_path).resolve("midas")


def test_settings_place_the_caches_in_the_workspace(tmp_path):
    settings = Settings(workspace=tmp_path / "ws", hf_hub_offline=True, hf_home=None)
    weights = WeightLocator.from_settings(settings)
    assert weights.hf_cache == tmp_path / "ws" / "cache" / "hub"
    assert weights.models_dir == tmp_path / "ws" / "models"
    assert weights.offline


def test_a_folder_named_like_a_model_id_does_not_shadow_it(small_snapshot, tmp_path, monkeypatch):
    weights = locator(tmp_path)
    place_in_hf_cache(small_snapshot, tmp_path / "hf-home", SMALL_REPO)
    monkeypatch.chdir(tmp_path)
    copy_snapshot(small_snapshot, tmp_path / "depth-anything" / "DA3-SMALL")
    assert weights.resolve(SMALL_REPO).is_relative_to(weights.hf_cache)
    assert weights.resolve("./depth-anything/DA3-SMALL") == Path("depth-anything/DA3-SMALL")
