"""The word-embedding gradient as the rows a batch used, added into one dense buffer kept across steps.

A dense embedding backward makes a fresh gradient as large as the whole table on every step (BERT's
30,522 words x 384 = 47 MB for the MiniLM students). On the CPU glibc serves a block that large with
its own mmap() and unmaps it when freed, so every step faults in ~11,500 new pages and fills them
with zeros, only to add a few hundred rows: about a sixth of the 3-layer student's step on a 2-core
AMD EPYC (README, "A leaner student step"). Inside ``row_gradient`` the embedding's backward is
sparse (the batch's rows) and autograd adds it into a dense ``.grad`` that training zeroes in place
(``zero_grad(set_to_none=False)``), so the optimizer and gradient clipping see the same dense
gradient as before, value for value, from memory that stays mapped. GPUs keep their blocks in
torch's caching allocator, so elsewhere than the CPU nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def row_gradient(model: torch.nn.Module, device: torch.device) -> Iterator[bool]:
    """Yields whether the word embeddings now get row gradients; if so, the caller must zero
    gradients with ``set_to_none=False``, or the next backward leaves a sparse ``.grad``. The
    embedding's dense backward comes back on exit; its ``.grad`` stays a dense tensor."""
    embeddings = model.get_input_embeddings()
    if device.type != "cpu" or not isinstance(embeddings, torch.nn.Embedding) or not embeddings.weight.requires_grad:
        yield False
        return
    if embeddings.weight.grad is None:
        embeddings.weight.grad = torch.zeros_like(embeddings.weight)
    embeddings.sparse = True
    try:
        yield True
    finally:
        embeddings.sparse = False
