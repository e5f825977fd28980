import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlib.losses import kd_loss


def reference(zs, zt, y, T, alpha):
    """Independent float64 NumPy version of the formula in kd_loss's docstring."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pt, ps = softmax(zt / T), softmax(zs / T)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(-1).mean() * T**2
    p = softmax(zs)
    ce = -np.log(p[np.arange(len(y)), y]).mean()
    return alpha * kl + (1 - alpha) * ce


def batch(seed=0, n=16, k=3, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale, torch.randn(n, k, generator=g) * scale, torch.randint(0, k, (n,), generator=g)


def test_zero_kl_for_equal_logits():
    zs, _, y = batch()
    _, kl, _ = kd_loss(zs, zs.clone(), y, temperature=4.0, alpha=0.5)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)


def test_alpha_zero_is_plain_cross_entropy():
    zs, zt, y = batch()
    loss, _, _ = kd_loss(zs, zt, y, temperature=7.0, alpha=0.0)
    assert torch.allclose(loss, F.cross_entropy(zs, y))


def test_alpha_one_is_t_squared_kl():
    zs, zt, y = batch()
    T = 3.0
    loss, _, _ = kd_loss(zs, zt, y, temperature=T, alpha=1.0)
    expected = F.kl_div(F.log_softmax(zs / T, -1), F.softmax(zt / T, -1), reduction="batchmean") * T**2
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize(("T", "alpha", "seed"), [(1.0, 0.3, 0), (2.5, 0.9, 1), (20.0, 0.5, 2), (0.5, 0.1, 3)])
def test_matches_float64_reference(T, alpha, seed):
    zs, zt, y = batch(seed)
    loss, _, _ = kd_loss(zs, zt, y, temperature=T, alpha=alpha)
    assert loss.item() == pytest.approx(reference(zs.numpy(), zt.numpy(), y.numpy(), T, alpha), rel=1e-5)


@pytest.mark.parametrize("T", [0.05, 1.0, 20.0, 100.0])
def test_finite_gradients_for_extreme_logits(T):
    zs, zt, y = batch(scale=1e4)
    zs.requires_grad_(True)
    loss, _, _ = kd_loss(zs, zt, y, temperature=T, alpha=0.7)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


def test_bf16_inputs_are_computed_in_float32():
    zs, zt, y = batch()
    loss32, _, _ = kd_loss(zs, zt, y, 2.0, 0.5)
    loss16, _, _ = kd_loss(zs.bfloat16(), zt.bfloat16(), y, 2.0, 0.5)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
