"""The transfer set: augmentation, embedding neighbours, the KD-only loss of its examples, and its cache."""

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from kdlib import transfer
from kdlib.config import TransferConfig
from kdlib.configure import build_config, parse_overrides, replace
from kdlib.errors import KDError
from kdlib.losses import NO_LABEL, kd_loss
from kdlib.models import train_wordpiece
from search.baseline import PLAIN
from tests.conftest import SMOKE

TEXTS = ["a gorgeous and witty film", "the plot is dull", "moving", "an often tedious mess of a script"]
NEIGHBOURS = {"gorgeous": ["lovely", "stunning"], "dull": ["flat"], "film": ["movie"]}


def test_copies_are_seeded_per_sentence_and_never_repeat_their_sentence():
    cfg = TransferConfig(copies=4, p_mask=0.3, p_replace=0.3, p_ngram=0.5, seed=3)
    texts, sources = transfer.augment(TEXTS, cfg, NEIGHBOURS)
    again, again_sources = transfer.augment(TEXTS, cfg, NEIGHBOURS)
    assert again == texts and again_sources.tolist() == sources.tolist()
    assert len(TEXTS) < len(texts) <= 4 * len(TEXTS)
    for source in range(len(TEXTS)):
        own = [t for t, s in zip(texts, sources, strict=True) if s == source]
        assert TEXTS[source] not in own and len(set(own)) == len(own)  # no copy repeats its sentence or another copy
    # Changing one sentence leaves the other sentences' copies as they were.
    changed, changed_sources = transfer.augment(["something else entirely here", *TEXTS[1:]], cfg, NEIGHBOURS)
    assert [t for t, s in zip(changed, changed_sources, strict=True) if s > 0] == [t for t, s in zip(texts, sources, strict=True) if s > 0]
    other_seed = TransferConfig(copies=4, p_mask=0.3, p_replace=0.3, p_ngram=0.5, seed=4)
    assert transfer.augment(TEXTS, other_seed, NEIGHBOURS)[0] != texts


def test_each_operation_does_what_it_says():
    masked, _ = transfer.augment(TEXTS[:2], TransferConfig(copies=1, p_mask=1.0, p_replace=0.0, p_ngram=0.0), NEIGHBOURS)
    assert masked == [" ".join([transfer.MASK] * len(t.split())) for t in TEXTS[:2]]
    swapped, _ = transfer.augment(TEXTS[:2], TransferConfig(copies=1, p_mask=0.0, p_replace=1.0, p_ngram=0.0), NEIGHBOURS)
    assert swapped[0].split()[1] in NEIGHBOURS["gorgeous"] and swapped[0].split()[4] == "movie" and swapped[1] == "the plot is flat"
    cut, sources = transfer.augment(TEXTS, TransferConfig(copies=3, p_mask=0.0, p_replace=0.0, p_ngram=1.0, seed=1), NEIGHBOURS)
    for text, source in zip(cut, sources, strict=True):
        words, original = text.split(), TEXTS[source].split()
        assert 1 <= len(words) <= transfer.NGRAM_MAX
        assert any(original[i : i + len(words)] == words for i in range(len(original)))  # a contiguous n-gram
    assert transfer.augment(TEXTS, TransferConfig(copies=0), NEIGHBOURS)[0] == []


def test_neighbours_come_from_the_teachers_input_embeddings():
    tokenizer = train_wordpiece(["good great bad awful film movie"] * 3, vocab_size=200)
    vocab = tokenizer.get_vocab()
    embeddings = torch.randn(len(vocab), 8) * 0.01
    for group, direction in ((("good", "great"), 0), (("bad", "awful"), 1), (("film", "movie"), 2)):
        for word in group:
            embeddings[vocab[word], direction] = 1.0
    found = transfer.embedding_neighbours(tokenizer, embeddings, {"good", "bad", "film", "nonword"}, k=1)
    assert found == {"good": ["great"], "bad": ["awful"], "film": ["movie"]}


def test_each_model_reads_its_own_mask_token():
    texts = [f"a {transfer.MASK} film"]
    assert transfer.for_model(texts, SimpleNamespace(mask_token="[MASK]", unk_token="[UNK]")) == texts
    assert transfer.for_model(texts, SimpleNamespace(mask_token="<mask>", unk_token="<unk>")) == ["a <mask> film"]
    assert transfer.for_model(texts, SimpleNamespace(mask_token=None, unk_token="<unk>")) == ["a <unk> film"]


def test_transfer_examples_carry_the_kl_term_only():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    labels = torch.tensor([0, 1, NO_LABEL, 1, NO_LABEL, 0])
    T, alpha = 3.0, 0.25
    loss, kl, ce = kd_loss(student, teacher, labels, T, alpha)
    per_kl = (torch.softmax(teacher / T, -1) * (torch.log_softmax(teacher / T, -1) - torch.log_softmax(student / T, -1))).sum(-1) * T**2
    per_ce = torch.nn.functional.cross_entropy(student, labels.clamp(min=0), reduction="none")
    labelled = labels != NO_LABEL
    expected = torch.where(labelled, alpha * per_kl + (1 - alpha) * per_ce, per_kl).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl.item() == pytest.approx(per_kl.mean().item(), rel=1e-5)
    assert ce.item() == pytest.approx(per_ce[labelled].mean().item(), rel=1e-5)
    # A batch of transfer examples alone: no cross-entropy, and alpha plays no part.
    only, _, none = kd_loss(student, teacher, torch.full((6,), NO_LABEL), T, alpha=0.0)
    assert none.item() == 0.0 and only.item() == pytest.approx(per_kl.mean().item(), rel=1e-5)


FAST = ["data.max_train_examples=600", "data.max_eval_examples=100", "train.epochs=1", "distill.train.epochs=1", "distill.transfer.copies=2"]


def test_the_set_is_labelled_once_cached_on_the_teachers_run_and_refused_when_made_for_other_settings(tmp_path, monkeypatch):
    from kdlib.distill import run_distill
    from kdlib.teacher import run_teacher

    cfg = build_config(SMOKE, parse_overrides(FAST))
    teacher = run_teacher(cfg)
    first, _, _ = run_distill(cfg)
    client = MlflowClient()
    (folder,) = client.list_artifacts(teacher.run_id, transfer.ARTIFACT_DIR)
    params = client.get_run(first.run_id).data.params
    assert params["transfer.digest"] == folder.path.rpartition("/")[2]
    examples = int(params["transfer.examples"])
    assert 540 < examples <= 2 * 540  # copies per training sentence (600 minus 60 carved for validation), repeats dropped
    assert 0.0 <= float(params["transfer.label_flip_rate"]) < 0.5
    # Students train on the copies: more tokens than a student of the training split alone.
    plain, _, _ = run_distill(replace(cfg, {"distill.transfer.copies": 0}))
    plain_params = client.get_run(plain.run_id).data.params
    assert "transfer.digest" not in plain_params
    assert int(params["train_tokens"]) > 1.5 * int(plain_params["train_tokens"])
    # Unlabelled sentences of another split join the set as they are, labelled by the teacher alone.
    raw = replace(cfg, {"distill.transfer.copies": 0, "distill.transfer.unlabelled_split": "test", "distill.transfer.unlabelled_max": 100})
    unlabelled, _, _ = run_distill(raw)
    raw_params = client.get_run(unlabelled.run_id).data.params
    assert (raw_params["transfer.examples"], raw_params["transfer.unlabelled"], raw_params["transfer.copies"]) == ("100", "100", "0")
    assert raw_params["transfer.digest"] != params["transfer.digest"] and int(raw_params["train_tokens"]) > int(plain_params["train_tokens"])
    assert not replace(raw, PLAIN).distill.transfer.enabled  # the sweep's plain twin has no transfer set
    with pytest.raises(KDError, match=r"distill.transfer.unlabelled_split = 'nope' cannot be read: .*no split 'nope'"):
        run_distill(replace(raw, {"distill.transfer.unlabelled_split": "nope"}))
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'")

    # A second student reads the cached set: nothing is labelled again. The set is made to look as one
    # cached before unlabelled sentences existed (no separate counts): it counts as copies only.
    older = Path(mlflow.artifacts.download_artifacts(run_id=teacher.run_id, artifact_path=folder.path, dst_path=str(tmp_path / "old")))
    info = json.loads((older / "info.json").read_text())
    (older / "info.json").write_text(json.dumps({k: v for k, v in info.items() if k not in ("copies", "unlabelled")}))
    client.log_artifacts(teacher.run_id, str(older), folder.path)
    monkeypatch.setattr(transfer, "make", lambda *a, **k: pytest.fail("the cached transfer set was labelled again"))
    second, _, _ = run_distill(cfg)
    second_params = client.get_run(second.run_id).data.params
    assert second_params["transfer.digest"] == params["transfer.digest"]
    assert (second_params["transfer.copies"], second_params["transfer.unlabelled"]) == (str(examples), "0")

    # A cache whose key says other settings is refused with one line naming them; no run is left open.
    local = mlflow.artifacts.download_artifacts(run_id=teacher.run_id, artifact_path=folder.path, dst_path=str(tmp_path / "dl"))
    key = json.loads(Path(local, "key.json").read_text())
    key["transfer.p_mask"] = 0.5
    Path(local, "key.json").write_text(json.dumps(key))
    client.log_artifacts(teacher.run_id, local, folder.path)
    with pytest.raises(KDError, match=r"transfer-set cache at .* was made for other inputs \(transfer.p_mask: cached 0.5, needed 0.1\)"):
        run_distill(cfg)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'")
    assert np.isfinite(first.eval_accuracy)
