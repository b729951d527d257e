"""Where a model's snapshot (`config.json` + `model.safetensors`) comes from.

Order: a local folder; RunPod's model caches; the workspace's `models/`; the Hugging Face
cache (`HF_HOME`); a download from the hub (skipped offline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from da3_serverless.inference.catalog import lookup_model

if TYPE_CHECKING:  # only `from_settings` needs the settings (and pydantic)
    from da3_serverless.config import Settings

SNAPSHOT_FILES = ("config.json", "model.safetensors")
RUNPOD_HUB_CACHE = Path("/runpod-volume/huggingface-cache/hub")
RUNPOD_PLAIN_CACHE = Path("/runpod/cache")


SMALL_MODEL_ID = "depth-anything/DA3-SMALL"  # the smallest download, for a first try


class ModelNotFoundError(LookupError):
    """No snapshot of the model anywhere we looked. The message has three lines: where we
    looked, what the hub said (not asked, unreachable, refused), and the next steps."""


def is_snapshot(folder: Path) -> bool:
    return all((folder / name).is_file() for name in SNAPSHOT_FILES)


@dataclass
class WeightLocator:
    """Finds (or downloads) a model snapshot folder. Pure paths in, no environment reads."""

    hf_cache: Path  # the hub cache dir, i.e. $HF_HOME/hub
    models_dir: Path | None = None
    runpod_hub_cache: Path = RUNPOD_HUB_CACHE
    runpod_plain_cache: Path = RUNPOD_PLAIN_CACHE
    offline: bool = False
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> WeightLocator:
        from da3_serverless.config import Settings

        settings = settings or Settings()
        return cls(
            hf_cache=settings.cache_dir / "hub",
            models_dir=settings.models_dir,
            offline=settings.hf_hub_offline,
            token=settings.hf_token,
        )

    def resolve_all(self, model_id: str, *, download: bool = True) -> list[Path]:
        """The snapshot folders a model loads: one, or one per network of a pair (a model id
        naming two repositories, `inference/catalog.py`), each found or downloaded on its own."""
        info = lookup_model(model_id)
        parts = info.parts if info is not None and info.parts else (model_id,)
        return [self.resolve(part, download=download) for part in parts]

    def resolve(self, model_id: str, *, download: bool = True) -> Path:
        """A snapshot folder for a local path, an HF repo id or a short name of one network
        (a pair's folders: `resolve_all`).

        Raises ModelNotFoundError naming the repo and every place looked.
        """
        info = lookup_model(model_id)
        if info is not None and info.parts:
            raise ValueError(f"{info.repo_id} is a pair of models: resolve_all gives its folders")
        local = Path(model_id).expanduser()
        # A model id from the table never means a folder of that name in the working directory
        # (write ./da3-small for such a folder).
        if info is None and local.is_dir():
            if is_snapshot(local):
                return local
            raise ModelNotFoundError(
                f"{str(local)!r} is a folder but not a model snapshot: it needs "
                f"{' and '.join(SNAPSHOT_FILES)}"
            )
        repo_id = info.repo_id if info else model_id
        if "/" not in repo_id:
            raise ModelNotFoundError(
                f"{model_id!r} is neither a snapshot folder nor a known model id or HF repo id"
            )
        looked: list[str] = []
        for found in self._cached(repo_id, looked):
            return found
        if self.offline or not download:
            why = " (downloads are off: HF_HUB_OFFLINE=1)" if self.offline else ""
            raise not_found(repo_id, looked, f"the hub was not asked{why}")
        try:
            return self.download(repo_id)
        except OSError as error:  # huggingface_hub's HTTP and cache errors are OSErrors
            raise not_found(repo_id, looked, hub_failure(error)) from None

    def download(self, repo_id: str) -> Path:
        """Download the snapshot files into the HF cache (atomic: huggingface_hub writes
        `.incomplete` files and renames them when complete)."""
        from huggingface_hub import snapshot_download  # slow to import; local folders skip it

        folder = snapshot_download(
            repo_id,
            cache_dir=self.hf_cache,
            allow_patterns=list(SNAPSHOT_FILES),
            token=self.token,
        )
        return Path(folder)

    def _cached(self, repo_id: str, looked: list[str]):
        """Yield snapshot folders already on disk, in resolution order; record each place."""
        org, name = repo_id.split("/", 1)
        looked.append(f"RunPod model cache {self.runpod_hub_cache}")
        yield from _hub_cache_snapshot(repo_id, self.runpod_hub_cache)
        plain = self.runpod_plain_cache / org / name
        looked.append(f"RunPod model cache {plain}/<revision>")
        if plain.is_dir():
            yield from (revision for revision in sorted(plain.iterdir()) if is_snapshot(revision))
        if self.models_dir is not None:
            looked.append(f"workspace models {self.models_dir}/{name}")
            candidate = self.models_dir / name
            if is_snapshot(candidate):
                yield candidate
        looked.append(f"Hugging Face cache {self.hf_cache}")
        yield from _hub_cache_snapshot(repo_id, self.hf_cache)


def not_found(repo_id: str, looked: list[str], hub: str) -> ModelNotFoundError:
    """The three-line message: where we looked, what the hub said, what to do next."""
    steps = [f"`da3-serverless prefetch {repo_id}` where the hub is reachable (same WORKSPACE "
             "or HF_HOME)", "MODEL_ID=<a local snapshot folder with config.json and "
             "model.safetensors>"]  # fmt: skip
    if repo_id != SMALL_MODEL_ID:
        steps.insert(0, f"MODEL_ID={SMALL_MODEL_ID} (the smallest download)")
    return ModelNotFoundError(
        f"model {repo_id!r} not found; looked in: {'; '.join(looked)}\n{hub}\n"
        f"next: {', or '.join(steps)}"
    )


def hub_failure(error: BaseException) -> str:
    """Why the hub gave no snapshot, in one line: unreachable, refused (and the HTTP status),
    or the download's own error. Looks through the exception's causes (huggingface_hub wraps
    a connection error in LocalEntryNotFoundError)."""
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    names = {kind.__name__ for link in chain for kind in type(link).__mro__}
    statuses = [getattr(getattr(link, "response", None), "status_code", None) for link in chain]
    status = next((code for code in statuses if isinstance(code, int)), None)
    if "GatedRepoError" in names:
        return (f"the hub refused (HTTP {status}): the model is gated; set HF_TOKEN to a token "
                "of an account that accepted its terms")  # fmt: skip
    if "RepositoryNotFoundError" in names:
        return f"the hub refused (HTTP {status}): no such repo, or it is private (check the id)"
    if status in (401, 403):
        return f"the hub refused (HTTP {status}): a private or gated repo needs HF_TOKEN"
    if status is not None:
        return f"the hub refused the download (HTTP {status})"
    if names & {"ConnectError", "ConnectionError", "TimeoutException", "TimeoutError",
                "OfflineModeIsEnabled", "LocalEntryNotFoundError"}:  # fmt: skip
        return "the hub was unreachable (no network, a proxy or a firewall in the way)"
    first_line = (str(error).splitlines() or [""])[0][:200]
    return f"the download failed ({type(error).__name__}: {first_line})"


def _hub_cache_snapshot(repo_id: str, cache: Path):
    """The snapshot of `repo_id` in an HF hub cache folder, if complete (yields 0 or 1)."""
    if not cache.is_dir():
        return
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                repo_id, cache_dir=cache, allow_patterns=list(SNAPSHOT_FILES), local_files_only=True
            )
        )
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or a broken cache
        return
    if is_snapshot(folder):
        yield folder
