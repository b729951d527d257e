"""Chunk planning: which frames each chunk runs, and which frames each chunk owns (writes)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Chunk:
    """Frames [start, stop) run together; the first `overlap` of them (none for the first
    chunk) were run by the chunk before too and are what aligns this one to it. A chunk owns
    (writes the outputs of) its frames after the overlap, so every frame is written once."""

    index: int
    start: int
    stop: int
    overlap: int

    @property
    def owned(self) -> range:
        return range(self.start + self.overlap, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


def default_overlap(chunk_size: int) -> int:
    """Half a chunk, as DA3-Streaming (120 frames overlapping by 60)."""
    return chunk_size // 2


def plan_chunks(frames: int, chunk_size: int, overlap: int | None = None) -> list[Chunk]:
    """Chunks of at most `chunk_size` frames covering `frames` in order, each after the first
    starting `overlap` frames (default half a chunk) before the previous one's end. Raises
    ValueError for sizes that cannot make progress."""
    overlap = default_overlap(chunk_size) if overlap is None else overlap
    if frames < 1 or chunk_size < 1:
        raise ValueError(f"need at least one frame and chunk_size >= 1, got {frames}, {chunk_size}")
    if frames > chunk_size and not 1 <= overlap < chunk_size:
        raise ValueError(
            f"overlap must be at least 1 and less than chunk_size ({chunk_size}), got {overlap}"
        )
    chunks = [Chunk(0, 0, min(chunk_size, frames), 0)]
    while chunks[-1].stop < frames:
        start = chunks[-1].stop - overlap
        chunks.append(Chunk(len(chunks), start, min(start + chunk_size, frames), overlap))
    return chunks


def windows(items: Iterable[T], chunk_size: int, overlap: int) -> Iterator[tuple[Chunk, list[T]]]:
    """The chunks of `plan_chunks` over a stream whose length is not known in advance (video
    frames decoded lazily), each with its items; only one chunk's items are held at a time."""
    if chunk_size < 1 or not 0 < overlap < chunk_size:
        raise ValueError(f"need 0 < overlap ({overlap}) < chunk_size ({chunk_size})")
    iterator = iter(items)
    held: list[T] = []
    index, start = 0, 0
    for item in iterator:
        held.append(item)
        if len(held) == chunk_size:
            yield Chunk(index, start, start + len(held), overlap if index else 0), held
            held = held[-overlap:]
            index, start = index + 1, start + chunk_size - overlap
    if len(held) > (overlap if index else 0):
        yield Chunk(index, start, start + len(held), overlap if index else 0), held
