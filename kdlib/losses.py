"""Logits-based knowledge distillation (Hinton et al., 2015), exactly as the project specifies it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NO_LABEL = -1  # a transfer-set example: the teacher's logits are its only target


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distillation loss and its two parts, each a mean over the batch.

        p_t = softmax(z_t / T),  p_s = softmax(z_s / T)
        L_KL = T^2 * sum_y p_t * log(p_t / p_s)
        L    = alpha * L_KL + (1 - alpha) * CE(z_s, y)   for a labelled example
        L    = L_KL                                      for a transfer example (label NO_LABEL)

    Why T^2: the gradient of the softened KL with respect to the student's logits scales as 1/T^2
    (one 1/T from the softmax, one from the shrinking gap between softened distributions), so
    without the factor raising T would quietly shrink the distillation term relative to the
    cross-entropy and alpha would no longer mean what it says.

    Why a transfer example takes the KL term at full weight: it has no hard label to share the
    weight with (Tang et al. 2019 train on such copies with the distillation loss alone), and
    weighting it by alpha would let a low alpha switch the transfer set off unnoticed.

    Shapes: logits [batch, labels], labels [batch]. Computed in float32 whatever the autocast
    dtype, since log-softmax of bf16 logits at large T loses the small differences KD learns from.
    Returns (loss, L_KL, CE); CE is the mean over the labelled examples (0 if there are none).
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    # KL(p_t || p_s) from log-probabilities: stable for extreme logits, where p_t may underflow to 0.
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="none", log_target=True).sum(-1) * temperature**2
    labelled = labels != NO_LABEL
    ce = F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction="none") * labelled
    per_example = torch.where(labelled, alpha * kl + (1 - alpha) * ce, kl)
    ce_mean = ce.sum() / labelled.sum().clamp(min=1)
    return per_example.mean(), kl.mean(), ce_mean
