"""The word-embedding gradient as the rows a batch used, added into one dense buffer kept across steps.

A dense embedding backward makes a fresh gradient as large as the whole table on every step (BERT's
30,522 words x 384 = 47 MB for the MiniLM students). On the CPU glibc serves a block that large with
its own mmap() and unmaps it when freed, so every step faults in ~11,500 new pages and fills them
with zeros, only to add a few hundred rows: about a sixth of the 3-layer student's step on a 2-core
AMD EPYC (reports/results.md, "A leaner student step"). Inside ``row_gradient`` the embedding's backward is
sparse (the batch's rows) and autograd adds it into a dense ``.grad`` that stays mapped. Every other
row of that buffer is zero, so gradient clipping reads and scales only the rows the step's batches
used, and clearing the gradient zeroes only those: the optimizer sees the same dense gradient as
before, value for value. GPUs keep their blocks in torch's caching allocator, so elsewhere than the
CPU nothing changes, unless the table's updates are lazy.

``LazyAdamW`` (``word_embeddings: lazy``) goes one step further and changes the optimizer: AdamW over
the table's 11.7M parameters reads and writes ~330 MB per step (seven float32 reads and writes per
parameter), and it must, because AdamW moves every row's moments and weights whether the batch used
the row or not. The lazy update moves only the used rows, as TensorFlow's LazyAdam and torch's
``SparseAdam`` do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.optim.adamw import adamw


class RowGradient:
    """The word-embedding table's dense gradient and the rows that training forwards used since it was last cleared."""

    def __init__(self, embeddings: torch.nn.Embedding):
        self.weight = embeddings.weight
        self._ids: list[torch.Tensor] = []
        self._used: torch.Tensor | None = None  # the rows of ``_ids``, found once per step for clipping and clearing
        self._hook = embeddings.register_forward_pre_hook(self._record)

    def _record(self, module: torch.nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():  # a training forward: scoring leaves no gradient
            self._ids.append(args[0].flatten())
            self._used = None

    def used(self) -> torch.Tensor:
        """The table rows that training forwards used since the gradient was last cleared."""
        if self._used is None:
            self._used = torch.unique(torch.cat(self._ids)) if self._ids else torch.empty(0, dtype=torch.long, device=self.weight.device)
        return self._used

    def clip_(self, parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over ``parameters`` (the table among them), reading and
        scaling only the table's used rows; returns the total norm."""
        rows = self.used()
        grads = [p.grad for p in parameters if p.grad is not None and p is not self.weight]
        used = self.weight.grad.index_select(0, rows)
        norm = torch.nn.utils.get_total_norm([*grads, used])
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # torch.nn.utils.clip_grads_with_norm_'s factor
        torch._foreach_mul_([*grads, used], factor)
        self.weight.grad.index_copy_(0, rows, used)
        return norm

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Free every other gradient; zero the table's used rows in place, so its buffer stays mapped."""
        grad = self.weight.grad
        optimizer.zero_grad(set_to_none=True)
        grad.index_fill_(0, self.used(), 0)
        self.weight.grad = grad
        self._ids.clear()
        self._used = None

    def close(self) -> None:
        """Stop recording the rows forwards use."""
        self._hook.remove()


class LazyAdamW:
    """AdamW for the word-embedding table that updates, at each step, only the rows the step's batches
    used: their weights, moments and weight decay, with the step count of the whole table for the bias
    correction. A row no batch used stays as it is, moments included, until a batch uses it again.

    The hyperparameters (learning rate as the schedule sets it, betas, eps, weight decay) come with
    each step: those of the optimizer's group that the table would belong to. The update itself is
    torch's functional AdamW on the gathered rows. torch's ``SparseAdam`` is the same idea, but wants a
    sparse gradient and has no weight decay; here the rows are at hand in ``RowGradient``'s dense buffer.
    """

    def __init__(self, weight: torch.nn.Parameter):
        self.weight = weight
        self.state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # moments and step count

    def step(self, rows: torch.Tensor, group: dict) -> None:
        if self.state is None:  # made at the first step, as torch's optimizers do: the table is on its device by then
            self.state = (torch.zeros_like(self.weight), torch.zeros_like(self.weight), torch.zeros((), device=self.weight.device))
        exp_avg, exp_avg_sq, steps = self.state
        tables = (self.weight.data, exp_avg, exp_avg_sq)
        param, avg, avg_sq = (table.index_select(0, rows) for table in tables)
        adamw(
            [param],
            [self.weight.grad.index_select(0, rows)],
            [avg],
            [avg_sq],
            [],
            [steps],
            foreach=group["foreach"],
            fused=group["fused"],
            amsgrad=False,
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        for table, part in zip(tables, (param, avg, avg_sq), strict=True):
            table.index_copy_(0, rows, part)


@contextmanager
def row_gradient(model: torch.nn.Module, device: torch.device, lazy: bool = False) -> Iterator[RowGradient | None]:
    """Yields the word embeddings' ``RowGradient``, or None where they keep the dense path (frozen,
    not a plain ``nn.Embedding``, or not on the CPU unless ``lazy``: ``LazyAdamW`` needs the rows on
    every device). With one, steps must clip and clear gradients through it. The embedding's dense
    backward comes back on exit; its ``.grad`` stays a dense tensor."""
    embeddings = model.get_input_embeddings()
    if (device.type != "cpu" and not lazy) or not isinstance(embeddings, torch.nn.Embedding) or not embeddings.weight.requires_grad:
        yield None
        return
    if embeddings.weight.grad is None:
        embeddings.weight.grad = torch.zeros_like(embeddings.weight)
    rows = RowGradient(embeddings)
    embeddings.sparse = True
    try:
        yield rows
    finally:
        embeddings.sparse = False
        rows.close()
