import pytest
import torch

from kdlib import batching
from kdlib.attention import NAME, cpu_attention_while
from tests.helpers import demo_splits, tiny_classifier

CPU = torch.device("cpu")


@pytest.fixture
def model_and_batch(tmp_path):
    splits = demo_splits(max_train=64, max_eval=8)
    clf = tiny_classifier(splits.train.texts)
    encoded = batching.encode(splits.train, clf.tokenizer, 64, tmp_path)
    # The batch holds sentences of different lengths, so the padding mask matters.
    batch = next(iter(batching.eval_loader(encoded, clf.tokenizer.pad_token_id, 16)))
    assert (batch["attention_mask"] == 0).any()
    return clf.model, batch


def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_computes_what_the_models_own_attention_computes_and_gives_it_back(model_and_batch):
    model, batch = model_and_batch
    before = model.config._attn_implementation
    model.eval()
    with torch.no_grad():
        expected = logits(model, batch)
        with cpu_attention_while(model, CPU):
            assert model.config._attn_implementation == NAME
            got = logits(model, batch)
    assert model.config._attn_implementation == before
    assert torch.allclose(got, expected, atol=1e-5)


def test_drops_attention_probabilities_while_training(model_and_batch):
    model, batch = model_and_batch
    # Only the attention probabilities are dropped: their rate is the attention module's dropout.p.
    attention_dropouts = {id(layer.attention.self.dropout) for layer in model.bert.encoder.layer}
    for module in model.modules():
        if type(module) is torch.nn.Dropout:
            module.p = 0.5 if id(module) in attention_dropouts else 0.0
    with torch.no_grad():
        plain = logits(model.eval(), batch)
        model.train()
        with cpu_attention_while(model, CPU):
            torch.manual_seed(0)
            first = logits(model, batch)
            torch.manual_seed(0)
            again = logits(model, batch)
            second = logits(model, batch)
    assert torch.equal(first, again)  # seeded from torch's generator
    assert not torch.allclose(first, second) and not torch.allclose(first, plain)


def test_leaves_other_devices_alone(model_and_batch):
    model, _ = model_and_batch
    before = model.config._attn_implementation
    with cpu_attention_while(model, torch.device("cuda")):
        assert model.config._attn_implementation == before
