"""Up to `max_points` items (scene points, 3D Gaussians) spread evenly over a sequence's frames
whose count is known only at the end, in memory bounded by `max_points`, not by the sequence.

Each chunk's items (fused and filtered as a single request of its frames would be, at most
`max_points`) are thinned at once to the chunk's share, `max_points` x its owned frames / the
frames seen so far with it (so a stream of unknown length is never starved by a generous
planned count), evenly per frame; what is kept grows past `max_points` as frames come, and
once it holds more than `HOLD` x `max_points` it is thinned to `max_points`, evenly per frame.
`final` thins once more to `max_points` over every frame. Thinning is deterministic (the same
chunks keep the same items): every frame keeps an equal count, frames with fewer keep all
theirs and leave the rest to the others (water filling), and a frame's kept items are a
regular subsample of its items in their order (raster order for points and Gaussians, so a
regular pixel subsample). Used by `sequence/scene.py` (points) and `sequence/gaussians.py`
(Gaussians)."""

from __future__ import annotations

import numpy as np

# What is kept is thinned back to max_points once it passes HOLD x max_points: between chunks
# it holds at most HOLD x max_points items; while a chunk joins, at most (HOLD + 2) x
# max_points (its share, and what a thinning picks before it frees), besides the chunk's own
# fused items (at most max_points, priced with the chunk's pixels or cells).
HOLD = 2


class EvenShare:
    """The kept items of every chunk: named columns (arrays of one length) and each item's
    frame number; `thinned` counts the items thinning dropped."""

    def __init__(self, max_points: int):
        self.max_points = max_points
        self.bound = HOLD * max_points
        self.seen = 0
        self.parts: list[dict[str, np.ndarray]] = []
        self.frames: list[np.ndarray] = []
        self.thinned = 0

    def add(self, columns: dict[str, np.ndarray], frame: np.ndarray, owned: int) -> None:
        """A chunk's items (named columns), `frame` each item's frame number, `owned` the
        count of frames the chunk owns (some may have no item): up to its share, `max_points`
        x `owned` / the frames seen with it, evenly per frame."""
        self.seen += owned
        share = max(1, round(self.max_points * owned / self.seen))
        keep = even_per_frame(np.asarray(frame, np.int64), share)
        self.thinned += len(frame) - len(keep)
        self.parts.append({name: values[keep] for name, values in columns.items()})
        self.frames.append(np.asarray(frame, np.int64)[keep])
        if self.held > self.bound:
            self._thin(self.max_points)

    @property
    def held(self) -> int:
        """How many items are kept now."""
        return sum(len(frame) for frame in self.frames)

    def final(self) -> dict[str, np.ndarray] | None:
        """Every kept item, at most `max_points`, spread evenly over the frames (None: none
        was added). Later adds start from this."""
        if not self.parts:
            return None
        self._thin(self.max_points)
        if len(self.parts) > 1:
            names = self.parts[0].keys()
            merged = {name: np.concatenate([part[name] for part in self.parts]) for name in names}
            self.parts, self.frames = [merged], [np.concatenate(self.frames)]
        return self.parts[0]

    def _thin(self, budget: int) -> None:
        """Keep `budget` items evenly per frame; each part is cut on its own (no copy of all
        that is held), so thinning holds at most `budget` items more than before."""
        keep = even_per_frame(np.concatenate(self.frames), budget)
        self.thinned += self.held - len(keep)
        start = 0
        for index, frame in enumerate(self.frames):
            stop = start + len(frame)
            mine = keep[(keep >= start) & (keep < stop)] - start
            part = self.parts[index]
            self.parts[index] = {name: values[mine] for name, values in part.items()}
            self.frames[index] = frame[mine]
            start = stop


def even_per_frame(frame: np.ndarray, budget: int) -> np.ndarray:
    """The ascending indices of at most `budget` items whose frame numbers are `frame`: the
    largest equal count per frame that fits (a frame with fewer items keeps them all), the
    remainder one more each to the first frames that have more; within a frame a regular
    subsample of its items in their order. All items when they fit."""
    if len(frame) <= budget:
        return np.arange(len(frame))
    order = np.argsort(frame, kind="stable")
    _, counts = np.unique(frame[order], return_counts=True)
    quota = water_fill(counts, budget)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    owner = np.repeat(np.arange(len(counts)), quota)  # the frame of each kept item
    rank = np.arange(len(owner)) - np.repeat(np.cumsum(quota) - quota, quota)
    picked = starts[owner] + rank * counts[owner] // quota[owner]
    return np.sort(order[picked])


def water_fill(counts: np.ndarray, budget: int) -> np.ndarray:
    """Per frame how many of its `counts` items to keep: min(count, level) at the largest
    level whose sum fits `budget`, then one more to each of the first frames still over the
    level until the sum is `budget` (or every item is kept)."""
    counts = np.asarray(counts, np.int64)
    if counts.sum() <= budget:
        return counts
    low, high = 0, int(counts.max())  # sum(min(counts, low)) <= budget < sum at high
    while high - low > 1:
        middle = (low + high) // 2
        if np.minimum(counts, middle).sum() <= budget:
            low = middle
        else:
            high = middle
    quota = np.minimum(counts, low)
    spare = budget - int(quota.sum())
    over = np.flatnonzero(counts > low)[:spare]
    quota[over] += 1
    return quota
