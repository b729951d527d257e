"""Counting a forward's transformer blocks as they finish, for a job's progress ("forward block
k of n"): a forward hook on every `Block` of the network, counting only the calls made in the
thread that installed them (another request's forward, in another thread, is not counted). A
compiled network, or a callable that is not a module, is left alone (a hook would change what
`torch.compile` traced)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from da3_serverless.model.layers import Block


@contextmanager
def block_progress(network: nn.Module, report: Callable[[int, int], None]) -> Iterator[None]:
    """While inside, `report(k, n)` after each of the network's `n` blocks finishes (k counts
    up, at most n)."""
    if not isinstance(network, nn.Module) or hasattr(network, "_orig_mod"):  # compiled, wrapped
        yield
        return
    blocks = [module for module in network.modules() if isinstance(module, Block)]
    thread = threading.get_ident()
    finished = 0

    def hook(module: nn.Module, args: object, output: object) -> None:
        nonlocal finished
        if threading.get_ident() == thread:
            finished += 1
            report(min(finished, len(blocks)), len(blocks))

    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
