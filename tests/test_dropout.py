import pytest
import torch

from kdlib import batching
from kdlib.dropout import FastDropout, cpu_dropout, drop_threshold
from tests.helpers import demo_splits, fit_one_epoch, tiny_classifier

N = 4_000_000


def test_drops_each_element_with_chance_p_and_keeps_the_expectation():
    torch.manual_seed(0)
    out = FastDropout(0.1)(torch.ones(N))
    kept = out > 0
    # 4M Bernoulli(0.9) draws: the kept share's standard deviation is 1.5e-4
    assert kept.float().mean().item() == pytest.approx(0.9, abs=1e-3)
    assert torch.unique(out[kept]).tolist() == pytest.approx([1 / (1 - 6554 / 65536)])
    assert out.mean().item() == pytest.approx(1.0, abs=2e-3)
    assert drop_threshold(0.0) == -32768 and drop_threshold(0.5) == 0 and drop_threshold(1.0) == 32768


def test_neighbouring_elements_are_independent():
    # Four elements share one 64-bit draw: their masks must still be uncorrelated.
    torch.manual_seed(1)
    kept = (FastDropout(0.5)(torch.ones(N)) > 0).float()
    for lag in (1, 2, 3, 4):
        a, b = kept[:-lag] - kept.mean(), kept[lag:] - kept.mean()
        assert abs((a * b).mean().item() / kept.var().item()) < 3e-3  # 4M pairs: noise ~5e-4


def test_repeatable_from_the_seed_and_fresh_on_every_call():
    x = torch.ones(1000, 64)
    torch.manual_seed(3)
    first, second = FastDropout(0.2)(x), FastDropout(0.2)(x)
    torch.manual_seed(3)
    assert torch.equal(FastDropout(0.2)(x), first)
    assert not torch.equal(first, second)


def test_gradient_goes_through_the_kept_elements_only():
    x = torch.randn(300, 40, requires_grad=True)
    out = FastDropout(0.3)(x)
    out.sum().backward()
    scale = 1 / (1 - round(0.3 * 65536) / 65536)
    assert torch.allclose(x.grad, (out != 0).float() * scale)


def test_bf16_activations_keep_their_dtype():
    out = FastDropout(0.1)(torch.ones(5000, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert 0.85 < (out > 0).float().mean().item() < 0.95


def test_identity_when_evaluating():
    x = torch.randn(50, 8)
    assert torch.equal(FastDropout(0.5).eval()(x), x)


def test_swaps_every_dropout_while_training_and_puts_the_originals_back():
    splits = demo_splits(max_train=100, max_eval=20)
    model = tiny_classifier(splits.train.texts).model.eval()
    originals = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    assert originals
    with pytest.raises(RuntimeError, match="stopped"), cpu_dropout(model):
        fast = [m for m in model.modules() if isinstance(m, FastDropout)]
        assert [m.p for m in fast] == [m.p for m in originals]
        assert not any(m.training for m in fast)  # the model's mode carries over
        assert not any(type(m) is torch.nn.Dropout for m in model.modules())
        raise RuntimeError("stopped")  # e.g. a pruned trial
    assert [m for m in model.modules() if type(m) is torch.nn.Dropout] == originals
    assert not any(isinstance(m, FastDropout) for m in model.modules())


def test_fit_trains_with_fast_dropout_and_returns_torch_modules(tmp_path):
    splits = demo_splits(max_train=200, max_eval=50)
    clf = tiny_classifier(splits.train.texts)
    seen = []

    def loss_fn(logits, batch):
        seen.append(sum(isinstance(m, FastDropout) and m.training for m in clf.model.modules()))
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"]), {}

    result = fit_one_epoch(clf, batching.encode(splits.train, clf.tokenizer, 64, tmp_path), loss_fn=loss_fn)
    assert seen and min(seen) > 0
    assert not any(isinstance(m, FastDropout) for m in result.model.modules())
