"""Dropout with a cheaper random mask on the CPU, swapped into a model while it trains.

torch's CPU dropout draws one random number per element on one thread: 0.77 ms for one 449 x 384
activation of the 3-layer student on a 2-core AMD EPYC, and a step has seven such masks (and one small) outside the
attention (about 8% of the step; measured with torch.profiler, reports/results.md "A leaner student step").
``FastDropout`` draws one 64-bit number per four elements and compares each 16-bit quarter with the
keep threshold: the same independent Bernoulli mask, its drop chance rounded to a multiple of 1/65536
(0.1 becomes 0.100006), scaled by the exact 1 / (1 - p) of that chance. Draws come from torch's global
generator, so ``set_seed`` still makes a run repeatable. Elsewhere than the CPU it is torch's dropout.

``cpu_dropout`` swaps ``torch.nn.Dropout`` modules; the attention probabilities' dropout, a function
call inside the attention, gets the same mask from ``kdlib/attention.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

LEVELS = 1 << 16  # one 16-bit quarter of a 64-bit draw decides one element


def drop_threshold(p: float) -> int:
    """Quarters (signed 16-bit, uniform on [-32768, 32767]) below this are dropped: round(p * 65536) of the 65536 values."""
    return -(LEVELS // 2) + round(p * LEVELS)


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-time dropout of a CPU tensor with the cheaper mask (0 < p < 1)."""
    dropped = round(p * LEVELS) / LEVELS
    n = x.numel()
    # high is exclusive, so one of the 2**64 values never comes: a bias of 2**-64
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    keep = words.view(torch.int16)[:n].view(x.shape) >= drop_threshold(p)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - dropped) if dropped < 1 else 0.0)


class FastDropout(torch.nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        return fast_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextmanager
def cpu_dropout(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` with every ``torch.nn.Dropout`` replaced by a ``FastDropout`` of the same p; the
    originals come back on exit (also when training stops with an exception), so a saved or logged
    model holds only torch's own modules."""
    swapped = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.Dropout:
                swapped.append((parent, name, child))
                setattr(parent, name, FastDropout(child.p).train(child.training))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
