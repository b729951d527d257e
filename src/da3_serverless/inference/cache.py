"""Loaded models kept in an LRU bounded by a memory budget, so a few can serve side by side;
models in use are pinned (docs/ARCHITECTURE.md §3)."""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from da3_serverless.inference.catalog import lookup_model
from da3_serverless.inference.predictor import Predictor
from da3_serverless.model.checkpoint import loaded_bytes

log = logging.getLogger(__name__)

Loader = Callable[[str], Predictor]
# How often a caller waiting for memory looks at its cancel check.
CHECK_EVERY_S = 0.2


def model_bytes(predictor: Predictor) -> int:
    """Bytes held by the network's parameters and buffers."""
    tensors = [*predictor.network.parameters(), *predictor.network.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def canonical_model_id(model_id: str) -> str:
    """The table's repo id for any name of a released model; other ids (folders) unchanged."""
    info = lookup_model(model_id)
    return info.repo_id if info else model_id


def estimated_bytes(model_id: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a model of the table will hold once loaded with compute dtype `dtype` (its backbone
    matrices in `dtype`, the rest fp32; 0 when unknown, e.g. a local folder)."""
    info = lookup_model(model_id)
    return loaded_bytes(info.preset, dtype) if info else 0


def default_budget_bytes(device: torch.device) -> int:
    """Half the device's memory: the rest is for activations of the request in flight."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class ModelCache:
    """`use(model_id)` lends a loaded Predictor for the length of a `with` block, loading it
    when needed; a model in use is pinned and never evicted. Thread-safe.

    Memory: the models loaded stay within `budget_bytes` (a single model larger than the whole
    budget may still load when nothing else is in use). To make room, the least recently used
    idle models are evicted; when the room can only come from models in use, the caller waits
    until they are released instead of loading past the budget (`waiting` counts such callers,
    so a transport can bound them). At most one model loads at a time, without holding the
    lock that lookups take, so a long load never blocks requests for models already loaded.

    Keys are canonical: an HF repo id, a short name or a preset name of the same release share
    one entry.
    """

    def __init__(self, loader: Loader, budget_bytes: int, dtype: torch.dtype = torch.float32):
        self._loader = loader
        self.budget_bytes = budget_bytes
        self.dtype = dtype  # the loader's compute dtype, for estimates before a load
        self._models: OrderedDict[str, Predictor] = OrderedDict()
        self._users: Counter[str] = Counter()  # requests using each model now
        self._changed = threading.Condition()  # guards everything above; notified on change
        self._loading: str | None = None  # the one model being loaded
        self.waiting = 0  # callers waiting for memory or for another model's load

    def loaded(self) -> list[str]:
        with self._changed:
            return list(self._models)

    def in_use(self) -> dict[str, int]:
        """Models in use now, with how many requests use each."""
        with self._changed:
            return dict(self._users)

    @contextmanager
    def use(self, model_id: str, check: Callable[[], None] | None = None) -> Iterator[Predictor]:
        """The loaded model, pinned until the block ends (loaded first when needed). `check`
        (raises to stop: a cancelled job) is called while waiting for memory."""
        key = canonical_model_id(model_id)
        predictor = self._acquire(key, check)
        try:
            yield predictor
        finally:
            with self._changed:
                self._users[key] -= 1
                if self._users[key] <= 0:
                    del self._users[key]
                self._changed.notify_all()

    def get(self, model_id: str) -> Predictor:
        """The loaded model, not pinned (it may be evicted once this returns): for callers
        that run no request alongside, such as a warmup."""
        with self.use(model_id) as predictor:
            return predictor

    def _acquire(self, key: str, check: Callable[[], None] | None = None) -> Predictor:
        """Pin `key`, loading it when it is not loaded; waits while it does not fit."""
        estimate = estimated_bytes(key, self.dtype)  # builds on the meta device: unlocked
        with self._changed:
            while key not in self._models:
                if self._loading is None and self._fits(estimate):
                    break
                self.waiting += 1
                try:
                    self._changed.wait(None if check is None else CHECK_EVERY_S)
                    if check is not None:
                        check()
                finally:
                    self.waiting -= 1
            else:
                self._models.move_to_end(key)
                self._users[key] += 1
                return self._models[key]
            self._evict_idle_for(estimate, key)
            self._loading = key
        return self._load(key)

    def _load(self, key: str) -> Predictor:
        try:
            predictor = self._loader(key)
        except BaseException:
            with self._changed:
                self._loading = None
                self._changed.notify_all()
            raise
        with self._changed:
            self._loading = None
            # Again with the actual size: the estimate may have been low (or 0 for a folder).
            self._evict_idle_for(model_bytes(predictor), key)
            self._models[key] = predictor
            self._users[key] += 1
            self._changed.notify_all()
        return predictor

    def _fits(self, incoming: int) -> bool:
        """Whether `incoming` bytes fit once every idle model is evicted. With no model in
        use it always fits (alone, even past the budget: the model must be servable). A model
        of unknown size (estimate 0, a local folder) loads only when no other model is in use."""
        busy = sum(model_bytes(p) for k, p in self._models.items() if self._users[k] > 0)
        if busy == 0:
            return True
        return incoming > 0 and busy + incoming <= self.budget_bytes

    def evict_all_except(self, keep: str | None = None) -> list[str]:
        """Drop every idle model but `keep` (after an out-of-memory error); returns what was
        dropped. Models in use stay."""
        keep = canonical_model_id(keep) if keep is not None else None
        with self._changed:
            dropped = [m for m in self._models if m != keep and self._users[m] <= 0]
            for model_id in dropped:
                del self._models[model_id]
            self._changed.notify_all()
        _free_memory()
        return dropped

    def _evict_idle_for(self, incoming: int, model_id: str) -> None:
        """Evict least recently used idle models until `incoming` bytes fit (or none is idle)."""
        evicted = False
        while self._used() + incoming > self.budget_bytes:
            idle = next((k for k in self._models if self._users[k] <= 0), None)
            if idle is None:
                break
            del self._models[idle]
            log.info("evicted model %s to make room for %s", idle, model_id)
            evicted = True
        if evicted:
            _free_memory()
            self._changed.notify_all()

    def _used(self) -> int:
        return sum(model_bytes(predictor) for predictor in self._models.values())


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
