import math

import numpy as np
import pytest
import torch

from kdlib import batching
from kdlib.config import TrainConfig
from kdlib.errors import KDError
from kdlib.metrics import classification_metrics
from kdlib.training import NonFiniteLoss, fit, make_accelerator, predict_logits
from tests.helpers import demo_splits, fit_one_epoch, tiny_classifier

CFG = TrainConfig(learning_rate=3e-3, epochs=3, batch_size=16, eval_batch_size=64, mixed_precision="no", log_every=5, seed=7)


def run(tmp_path, cfg=CFG, **kwargs):
    splits = demo_splits()
    clf = tiny_classifier(splits.train.texts)
    train = batching.encode(splits.train, clf.tokenizer, 64, tmp_path)
    dev = batching.encode(splits.eval, clf.tokenizer, 64, tmp_path)
    pad = clf.tokenizer.pad_token_id
    result = fit(
        clf.model,
        batching.train_loader(train, pad, cfg.batch_size, cfg.seed),
        batching.eval_loader(dev, pad, cfg.eval_batch_size),
        lambda logits: classification_metrics(logits, dev.labels),
        cfg,
        **kwargs,
    )
    return result, clf, dev


def test_learns_and_reports_every_epoch(tmp_path):
    seen = []
    result, clf, dev = run(tmp_path, on_epoch_end=lambda epoch, m: seen.append((epoch, m)))
    assert [e for e, _ in seen] == [1, 2, 3]
    for _, metrics in seen:
        assert {"train_loss", "val_accuracy", "val_loss", "train_examples_per_s"} <= set(metrics)
        assert all(math.isfinite(v) for v in metrics.values())
    assert seen[-1][1]["train_loss"] < seen[0][1]["train_loss"]
    assert seen[-1][1]["val_accuracy"] > 0.7  # the demo task: chance is ~0.5
    # The returned model is unwrapped and in agreement with the last evaluation.
    logits = predict_logits(result.model, batching.eval_loader(dev, clf.tokenizer.pad_token_id, 64), make_accelerator("no"))
    assert classification_metrics(logits, dev.labels)["accuracy"] == pytest.approx(seen[-1][1]["val_accuracy"])


def test_same_seed_same_result(tmp_path):
    a, _, _ = run(tmp_path)
    b, _, _ = run(tmp_path)
    assert [m["val_loss"] for m in a.history] == [m["val_loss"] for m in b.history]


def test_bf16_and_accumulation_run(tmp_path):
    result, clf, dev = run(tmp_path, cfg=TrainConfig(**{**CFG.__dict__, "mixed_precision": "bf16", "grad_accum_steps": 2, "epochs": 1}))
    assert math.isfinite(result.history[0]["train_loss"])
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # master weights stay fp32
    # The trained model comes back unwrapped; scored later (evaluation split, teacher logits) it still
    # runs in bf16, as its validation did: the same loss to the last digit, which fp32 would not give.
    loader = batching.eval_loader(dev, clf.tokenizer.pad_token_id, 64)
    in_bf16 = classification_metrics(predict_logits(result.model, loader, make_accelerator("bf16")), dev.labels)["loss"]
    in_fp32 = classification_metrics(predict_logits(result.model, loader, make_accelerator("no")), dev.labels)["loss"]
    assert in_bf16 == pytest.approx(result.history[0]["val_loss"], rel=1e-6)
    assert in_fp32 != pytest.approx(in_bf16, rel=1e-6)


def test_eval_logits_come_back_in_example_order(tmp_path):
    result, clf, dev = run(tmp_path, cfg=TrainConfig(**{**CFG.__dict__, "epochs": 1}))
    sorted_logits = predict_logits(result.model, batching.eval_loader(dev, clf.tokenizer.pad_token_id, 7), make_accelerator("no"))
    one_by_one = []
    result.model.eval()
    with torch.no_grad():
        for ids in dev.input_ids[:20]:
            ids = torch.as_tensor(ids[None], dtype=torch.long, device=result.model.device)  # fit leaves it on the GPU if there is one
            one_by_one.append(result.model(input_ids=ids).logits[0].cpu())
    assert torch.allclose(torch.from_numpy(sorted_logits[:20]), torch.stack(one_by_one), atol=1e-4)


def test_non_finite_loss_stops_training(tmp_path):
    def nan_loss(logits, batch):
        return logits.sum() * float("nan"), {}

    with pytest.raises(NonFiniteLoss, match="training loss became nan in epoch 1"):
        run(tmp_path, loss_fn=nan_loss)


def test_fp16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(KDError, match="'fp16' needs a CUDA GPU"):
        make_accelerator("fp16")


def test_frozen_word_embeddings_stay_as_loaded_while_the_rest_trains(tmp_path):
    splits = demo_splits(max_train=300, max_eval=50)
    clf = tiny_classifier(splits.train.texts)
    before = {name: p.detach().clone() for name, p in clf.model.named_parameters()}
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 1, "word_embeddings": "frozen"})
    result = fit_one_epoch(clf, batching.encode(splits.train, clf.tokenizer, 64, tmp_path), cfg)
    after = dict(result.model.named_parameters())
    words = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(after[words], before[words])
    assert not torch.equal(after["bert.embeddings.position_embeddings.weight"], before["bert.embeddings.position_embeddings.weight"])
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])


@pytest.mark.parametrize(
    "word_embeddings, grad_accum_steps",
    [("lazy", 1), ("lazy", 2), ("auto", 1), ("dense", 1)],  # 2: lazy updates only when two batches' gradients sync; auto is lazy on a CPU
)
def test_lazy_word_embeddings_move_only_the_rows_that_training_sentences_use(tmp_path, word_embeddings, grad_accum_steps):
    splits = demo_splits(max_train=300, max_eval=50)
    clf = tiny_classifier(splits.train.texts)
    encoded = batching.encode(splits.train, clf.tokenizer, 64, tmp_path)
    before = clf.model.get_input_embeddings().weight.detach().clone()
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 1, "word_embeddings": word_embeddings, "grad_accum_steps": grad_accum_steps})
    after = fit_one_epoch(clf, encoded, cfg).model.get_input_embeddings().weight
    moved = set(torch.nonzero((after != before).any(dim=1)).flatten().tolist())
    # The padding row, which batches also use, is all zeros with no gradient: it stays zero.
    used = set(np.concatenate(encoded.input_ids).tolist())
    assert len(used) < len(before) - 10
    if word_embeddings == "dense":  # AdamW's momentum and weight decay move rows that no sentence used
        assert moved > used - {clf.tokenizer.pad_token_id}
    else:
        assert moved == used
