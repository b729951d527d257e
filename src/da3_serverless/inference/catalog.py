"""The model table: every released DA3 checkpoint, its network preset, capabilities and license."""

from __future__ import annotations

from dataclasses import dataclass

HF_ORG = "depth-anything"


@dataclass(frozen=True)
class ModelInfo:
    """One released checkpoint.

    `repo_id` is the Hugging Face repo; `preset` the network it holds (see model/presets.py).
    """

    repo_id: str
    preset: str
    license: str
    metric: bool  # gives meters by itself
    needs_focal: bool  # gives meters only with a focal length (DA3METRIC-LARGE)
    camera: bool  # predicts pose + intrinsics
    confidence: bool
    sky: bool
    params_m: int  # parameters, millions
    gpu_memory_gb: float  # estimated VRAM for one 504 px view in bf16, weights included
    # The release's checkpoint holds the 3D-Gaussian head (`model/presets.py: GAUSSIAN_RELEASES`).
    # A loaded model says what its own file holds: `Predictor.capabilities`.
    gaussians: bool = False
    # A pair of releases loaded together (any-view network, metric network): the repos, each
    # downloaded and cached on its own; `repo_id` then names both, joined by "+".
    parts: tuple[str, ...] = ()
    alias: str = ""  # the short name, where the repo's own name would not do

    @property
    def short_name(self) -> str:
        return self.alias or self.repo_id.split("/", 1)[1].lower()

    @property
    def can_give_meters(self) -> bool:
        return self.metric or self.needs_focal


_APACHE = "Apache-2.0"
_NC = "CC BY-NC 4.0"


def _any_view(
    name: str, preset: str, license: str, params_m: int, gpu_gb: float, gaussians: bool = False
) -> ModelInfo:
    return ModelInfo(
        f"{HF_ORG}/{name}", preset, license, metric=False, needs_focal=False, camera=True,
        confidence=True, sky=False, params_m=params_m, gpu_memory_gb=gpu_gb, gaussians=gaussians,
    )  # fmt: skip


METRIC_REPO = f"{HF_ORG}/DA3METRIC-LARGE"


def _apache_pair(name: str, preset: str, params_m: int, gpu_gb: float) -> ModelInfo:
    """An Apache-2.0 any-view network with DA3METRIC-LARGE, aligned as the nested model aligns
    its two networks: metric multi-view depth, cameras and scene for commercial use."""
    return ModelInfo(
        f"{HF_ORG}/{name}+{METRIC_REPO}", f"{preset}+da3metric-large", _APACHE, metric=True,
        needs_focal=False, camera=True, confidence=True, sky=True, params_m=params_m + 350,
        gpu_memory_gb=gpu_gb + 2.5, parts=(f"{HF_ORG}/{name}", METRIC_REPO),
        alias=f"{preset}-metric",
    )  # fmt: skip


MODELS: tuple[ModelInfo, ...] = (
    _any_view("DA3-SMALL", "da3-small", _APACHE, 26, 1.5),
    _any_view("DA3-BASE", "da3-base", _APACHE, 120, 2.0),
    _any_view("DA3-LARGE", "da3-large", _NC, 350, 3.0),
    _any_view("DA3-LARGE-1.1", "da3-large", _NC, 350, 3.0),
    _any_view("DA3-GIANT", "da3-giant", _NC, 1150, 6.0, gaussians=True),
    _any_view("DA3-GIANT-1.1", "da3-giant", _NC, 1150, 6.0, gaussians=True),
    ModelInfo(
        f"{HF_ORG}/DA3MONO-LARGE", "da3mono-large", _APACHE, metric=False, needs_focal=False,
        camera=False, confidence=False, sky=True, params_m=350, gpu_memory_gb=2.5,
    ),
    ModelInfo(
        f"{HF_ORG}/DA3METRIC-LARGE", "da3metric-large", _APACHE, metric=False, needs_focal=True,
        camera=False, confidence=False, sky=True, params_m=350, gpu_memory_gb=2.5,
    ),
    ModelInfo(
        f"{HF_ORG}/DA3NESTED-GIANT-LARGE", "da3nested-giant-large", _NC, metric=True,
        needs_focal=False, camera=True, confidence=True, sky=True, params_m=1500,
        gpu_memory_gb=8.0, gaussians=True,
    ),
    ModelInfo(
        f"{HF_ORG}/DA3NESTED-GIANT-LARGE-1.1", "da3nested-giant-large", _NC, metric=True,
        needs_focal=False, camera=True, confidence=True, sky=True, params_m=1500,
        gpu_memory_gb=8.0, gaussians=True,
    ),
    _apache_pair("DA3-SMALL", "da3-small", 26, 1.5),
    _apache_pair("DA3-BASE", "da3-base", 120, 2.0),
)  # fmt: skip

_BY_KEY: dict[str, ModelInfo] = {}
for _info in MODELS:
    _BY_KEY[_info.repo_id.lower()] = _info
    _BY_KEY[_info.short_name] = _info


def valid_model_ids() -> list[str]:
    return [info.repo_id for info in MODELS]


def lookup_model(model_id: str) -> ModelInfo | None:
    """The table entry for an HF repo id or a short name (case-insensitive), or None.

    A preset name (`da3nested-giant-large`, `da3-large`) picks the newest release of that
    network; other short names are the repo names (`da3-large-1.1`, `da3nested-giant-large`
    is the preset, so the first release needs its full repo id).
    """
    key = model_id.strip().lower()
    releases = [info for info in MODELS if info.preset == key]
    if releases:
        return releases[-1]
    return _BY_KEY.get(key)
