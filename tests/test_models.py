import pytest
import torch

from kdlib.batching import tokenizer_fingerprint
from kdlib.config import ModelConfig
from kdlib.errors import KDError
from kdlib.models import cut_from_teacher, load_classifier
from tests.helpers import LABELS, demo_splits, tiny_classifier


def test_scratch_model_and_tokenizer_are_deterministic():
    texts = demo_splits().train.texts
    a, b = tiny_classifier(texts, seed=1), tiny_classifier(texts, seed=1)
    assert tokenizer_fingerprint(a.tokenizer) == tokenizer_fingerprint(b.tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True))
    ids = a.tokenizer("the film was great")["input_ids"]
    assert ids[0] == a.tokenizer.cls_token_id and ids[-1] == a.tokenizer.sep_token_id
    assert a.model.config.id2label == {0: "negative", 1: "positive"}


def test_saved_folder_loads_back(tmp_path):
    clf = tiny_classifier(demo_splits().train.texts)
    clf.model.save_pretrained(tmp_path / "m")
    clf.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_classifier("teacher", ModelConfig(name_or_path=str(tmp_path / "m")), LABELS, [], 64, 0)
    assert tokenizer_fingerprint(loaded.tokenizer) == tokenizer_fingerprint(clf.tokenizer)
    assert torch.equal(loaded.model.classifier.weight, clf.model.classifier.weight)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(KDError, match="teacher.name_or_path: .* is not a model folder \\(no config.json\\)"):
        load_classifier("teacher", ModelConfig(name_or_path=str(tmp_path / "notes")), LABELS, [], 64, 0)


def test_missing_folder_and_offline_hub_name(tmp_path):
    with pytest.raises(KDError, match="does not exist"):
        load_classifier("student", ModelConfig(name_or_path="./no-such-model"), LABELS, [], 64, 0)
    with pytest.raises(
        KDError, match="'bert-base-uncased' is not a local folder and the Hugging Face Hub is offline .* point student.name_or_path at a local copy"
    ):
        load_classifier("student", ModelConfig(name_or_path="bert-base-uncased"), LABELS, [], 64, 0)


def test_max_length_above_model_limit(tmp_path):
    clf = tiny_classifier(demo_splits().train.texts)
    clf.model.save_pretrained(tmp_path / "m")
    clf.tokenizer.save_pretrained(tmp_path / "m")
    limit = clf.model.config.max_position_embeddings
    with pytest.raises(KDError, match=f"data.max_length = {limit + 1} is above the teacher model's limit of {limit} positions"):
        load_classifier("teacher", ModelConfig(name_or_path=str(tmp_path / "m")), LABELS, [], limit + 1, 0)


def test_cut_from_teacher_copies_chosen_layers():
    teacher = tiny_classifier(
        demo_splits().train.texts,
        cfg=ModelConfig(name_or_path="scratch", hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, vocab_size=200),
    )
    student = cut_from_teacher(teacher, (1, 3))
    assert student.model.config.num_hidden_layers == 2
    assert teacher.model.config.num_hidden_layers == 4
    t, s = teacher.model.bert.encoder.layer, student.model.bert.encoder.layer
    assert torch.equal(s[0].attention.self.query.weight, t[1].attention.self.query.weight)
    assert torch.equal(s[1].output.dense.weight, t[3].output.dense.weight)
    assert torch.equal(student.model.bert.embeddings.word_embeddings.weight, teacher.model.bert.embeddings.word_embeddings.weight)
    with pytest.raises(KDError, match="must name layers of the teacher, which has layers 0..3"):
        cut_from_teacher(teacher, (0, 4))
