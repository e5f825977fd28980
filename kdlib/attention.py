"""Attention while a model trains on the CPU: transformers' eager attention with ``kdlib/dropout.py``'s
cheaper mask on the attention probabilities.

With dropout on the probabilities, ``scaled_dot_product_attention`` takes its unfused math path on
the CPU and draws torch's mask one number per element; for the short sentences of SST-2 (a few
dozen tokens) the eager formula with the cheaper mask is faster: the 3-layer student's step went
from 47-48 to 41-44 ms on a 2-core AMD EPYC (reports/results.md, "A leaner student step"). It is the same
computation: query-key products, additive padding mask, softmax, dropout, products with the values.
Registered with transformers' ``AttentionInterface`` under ``NAME`` and switched on only while
training (``training.lean_steps``), for models whose attention goes through that interface; saved
models keep their own attention setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from kdlib.dropout import fast_dropout

NAME = "kdlib_cpu"


def cpu_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``eager_attention_forward``, [batch, heads, tokens, head size] in, [batch, tokens,
    heads, head size] out, with the cheaper dropout mask."""
    weights = torch.matmul(query, key.transpose(2, 3)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1)
    if module.training and dropout > 0:
        weights = fast_dropout(weights, dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(NAME, cpu_attention)
AttentionMaskInterface.register(NAME, eager_mask)  # the additive float mask the eager formula adds


@contextmanager
def cpu_attention_while(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` attends with ``cpu_attention`` inside the block when it trains on the CPU and its
    attention goes through transformers' ``AttentionInterface``; its own setting comes back on exit."""
    if device.type != "cpu" or not isinstance(model, PreTrainedModel) or not model._can_set_attn_implementation():
        yield
        return
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
