"""A seeded random stream that ``torch.compile`` traces: a generator's state held as a tensor.

``torch.rand(..., generator=g)`` cannot enter a compiled graph (dynamo has no graph value for a
``torch.Generator``): every seeded draw split the graph. Here the stream's state is a plain
tensor, and one custom op (``distalex::uniform_``) draws from it and advances it in place. The
compiler sees an op with a declared in-place argument, so the draw stays inside the one graph,
runs once per call in program order, and is never recomputed (an opaque op is saved for the
backward, not replayed). Eager and compiled code run the same op and get the same numbers,
which are also those of ``torch.rand(..., generator=g)`` for a generator in that state.

The state is what ``torch.Generator.get_state`` returns (a CPU uint8 tensor: mt19937 on the CPU,
seed and offset on CUDA), so checkpoints store and restore it like any generator's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_generators: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    """One scratch generator per device: its state is overwritten before every draw."""
    if device not in _generators:
        _generators[device] = torch.Generator(device=device)
    return _generators[device]


@torch.library.custom_op("distalex::uniform_", mutates_args=("state",))
def _uniform(state: Tensor, size: Sequence[int], device: torch.device) -> Tensor:
    g = _generator(device)
    g.set_state(state)
    out = torch.rand(size, generator=g, device=device)
    state.copy_(g.get_state())
    return out


@_uniform.register_fake
def _(state: Tensor, size: Sequence[int], device: torch.device) -> Tensor:
    return torch.empty(size, device=device)


class RandomStream:
    """Uniform [0, 1) noise from a seeded stream on ``device``; ``get_state``/``set_state`` as a
    ``torch.Generator`` has them (the same bytes)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.device = self.resolve(device)
        self.state = torch.Generator(device=self.device).manual_seed(seed).get_state()

    @staticmethod
    def resolve(device: torch.device | str) -> torch.device:
        """``device`` with its index (``cuda`` is the current GPU), as tensors report theirs."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def uniform(self, size: Sequence[int]) -> Tensor:
        """``torch.rand(size)`` from this stream, which advances."""
        return _uniform(self.state, list(size), self.device)

    def get_state(self) -> Tensor:
        return self.state.clone()

    def set_state(self, state: Tensor) -> None:
        if state.shape != self.state.shape:
            raise ValueError(f"random stream on {self.device}: a state of {tuple(state.shape)} bytes, expected {tuple(self.state.shape)}")
        self.state.copy_(state)
