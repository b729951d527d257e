"""Loaded models kept in an LRU bounded by a memory budget, so a few can serve side by side."""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from da3_serverless.inference.catalog import lookup_model
from da3_serverless.inference.predictor import Predictor
from da3_serverless.model.checkpoint import loaded_bytes

log = logging.getLogger(__name__)

Loader = Callable[[str], Predictor]


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
    """`get(model_id)` returns a loaded Predictor, loading it (once) when needed and evicting
    the least recently used ones when the budget would be passed. Thread-safe.

    Keys are canonical: an HF repo id, a short name or a preset name of the same release share
    one entry. Loads run one at a time without holding the lock that lookups take, so a long
    load never blocks requests for models already loaded (or `loaded()`).
    """

    def __init__(self, loader: Loader, budget_bytes: int, dtype: torch.dtype = torch.float32):
        self._loader = loader
        self.budget_bytes = budget_bytes
        self.dtype = dtype  # the loader's compute dtype, for estimates before a load
        self._models: OrderedDict[str, Predictor] = OrderedDict()
        self._lock = threading.Lock()  # guards _models
        self._loading = threading.Lock()  # one load at a time: two would pass the budget

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def get(self, model_id: str) -> Predictor:
        key = canonical_model_id(model_id)
        predictor = self._lookup(key)
        if predictor is not None:
            return predictor
        with self._loading:
            predictor = self._lookup(key)  # loaded by another thread meanwhile
            if predictor is not None:
                return predictor
            # Make room before loading (estimate) and again after (actual size), so two models
            # never sit in memory together past the budget.
            estimate = estimated_bytes(key, self.dtype)  # builds on the meta device: unlocked
            with self._lock:
                self._evict_for(estimate, key)
            predictor = self._loader(key)
            with self._lock:
                self._evict_for(model_bytes(predictor), key)
                self._models[key] = predictor
            return predictor

    def _lookup(self, key: str) -> Predictor | None:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            return None

    def evict_all_except(self, keep: str | None = None) -> list[str]:
        """Drop every model but `keep` (after an out-of-memory error); returns what was dropped."""
        keep = canonical_model_id(keep) if keep is not None else None
        with self._lock:
            dropped = [model_id for model_id in self._models if model_id != keep]
            for model_id in dropped:
                del self._models[model_id]
        _free_memory()
        return dropped

    def _evict_for(self, incoming: int, model_id: str) -> None:
        evicted = False
        while self._models and self._used() + incoming > self.budget_bytes:
            dropped, _ = self._models.popitem(last=False)
            log.info("evicted model %s to make room for %s", dropped, model_id)
            evicted = True
        if evicted:
            _free_memory()

    def _used(self) -> int:
        return sum(model_bytes(predictor) for predictor in self._models.values())


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
