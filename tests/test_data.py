import json
from types import SimpleNamespace

import datasets
import numpy as np
import pandas as pd
import pytest

from kdlib.config import DataConfig
from kdlib.data import load_split, load_splits, load_unlabelled
from kdlib.errors import KDError
from tests.conftest import write_tsv

TRAIN = [("a gorgeous film", 1), ("a tedious mess", 0), ("witty and warm", 1)]
DEV = [("dull", 0), ("moving", 1)]


def read(cfg: DataConfig) -> SimpleNamespace:
    """The train and eval splits as the readers return them (these files are too small to carve validation from)."""
    return SimpleNamespace(train=load_split(cfg, cfg.train_split), eval=load_split(cfg, cfg.eval_split))


def glue(folder):
    write_tsv(folder / "train.tsv", TRAIN)
    write_tsv(folder / "dev.tsv", DEV)
    return folder


def test_glue_folder(tmp_path):
    splits = read(DataConfig(source=str(glue(tmp_path / "glue"))))
    assert splits.train.texts == [s for s, _ in TRAIN]
    assert splits.train.labels.tolist() == [1, 0, 1]
    assert splits.eval.texts == ["dull", "moving"]
    assert splits.train.fingerprint != splits.eval.fingerprint


def test_tsv_keeps_quotes_and_null_like_words(tmp_path):
    folder = tmp_path / "q"
    write_tsv(folder / "train.tsv", [('he said "no" , then left', 0), ("NA", 1)])
    write_tsv(folder / "dev.tsv", DEV)
    assert read(DataConfig(source=str(folder))).train.texts == ['he said "no" , then left', "NA"]


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_file_formats_with_custom_columns_and_label_names(tmp_path, suffix):
    folder = tmp_path / suffix
    folder.mkdir()
    for split, rows in (("train", TRAIN), ("validation", DEV)):
        frame = pd.DataFrame({"text": [s for s, _ in rows], "sentiment": [["neg", "pos"][y] for _, y in rows]})
        path = folder / f"{split}.{suffix}"
        if suffix == "csv":
            frame.to_csv(path, index=False)
        elif suffix == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
        else:
            frame.to_parquet(path)
    cfg = DataConfig(source=str(folder), text_column="text", label_column="sentiment", label_names=("neg", "pos"))
    splits = read(cfg)
    assert splits.train.texts == [s for s, _ in TRAIN]
    assert splits.train.labels.tolist() == [y for _, y in TRAIN]
    assert splits.eval.labels.tolist() == [y for _, y in DEV]


def test_save_to_disk_folder(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"sentence": [s for s, _ in TRAIN], "label": [y for _, y in TRAIN]}),
            "validation": datasets.Dataset.from_dict({"sentence": [s for s, _ in DEV], "label": [y for _, y in DEV]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    splits = read(DataConfig(source=str(tmp_path / "saved")))
    assert splits.train.labels.tolist() == [1, 0, 1]
    assert splits.eval.texts == ["dull", "moving"]


def test_same_content_same_fingerprint_and_order_matters(tmp_path):
    a = read(DataConfig(source=str(glue(tmp_path / "a"))))
    b = read(DataConfig(source=str(glue(tmp_path / "b"))))
    assert a.train.fingerprint == b.train.fingerprint
    write_tsv(tmp_path / "c" / "train.tsv", list(reversed(TRAIN)))
    write_tsv(tmp_path / "c" / "dev.tsv", DEV)
    assert read(DataConfig(source=str(tmp_path / "c"))).train.fingerprint != a.train.fingerprint


def test_builtin_sample_is_deterministic_and_balanced():
    first = load_splits(DataConfig(source="builtin:sentiment"))
    second = load_splits(DataConfig(source="builtin:sentiment"))
    assert first.train.fingerprint == second.train.fingerprint
    assert len(first.train) > len(first.eval) > 100
    assert 0.4 < first.train.labels.mean() < 0.6
    assert not set(first.train.texts) & {"a gorgeous film"}


def test_max_examples_takes_a_stable_subset():
    full = load_splits(DataConfig(source="builtin:sentiment"))
    part = load_splits(DataConfig(source="builtin:sentiment", max_train_examples=100))
    again = load_splits(DataConfig(source="builtin:sentiment", max_train_examples=100))
    assert len(part.train) + len(part.validation) == 100  # the validation split is carved after the limit
    assert part.train.fingerprint == again.train.fingerprint != full.train.fingerprint
    assert set(part.train.texts) <= set(full.train.texts + full.validation.texts)
    assert len(part.eval) == len(full.eval)


def test_validation_is_carved_from_train_stratified_seeded_and_disjoint():
    source = load_split(DataConfig(source="builtin:sentiment"), "train")
    splits = load_splits(DataConfig(source="builtin:sentiment", validation_size=300))
    assert len(splits.validation) == 300 and len(splits.train) == len(source) - 300
    # Every training sentence lands on exactly one side (sentences can repeat, so count by position).
    assert sorted(splits.train.texts + splits.validation.texts) == sorted(source.texts)
    assert abs(splits.validation.labels.mean() - source.labels.mean()) < 0.01  # stratified by label
    again = load_splits(DataConfig(source="builtin:sentiment", validation_size=300))
    other = load_splits(DataConfig(source="builtin:sentiment", validation_size=300, split_seed=1))
    assert again.validation.fingerprint == splits.validation.fingerprint != other.validation.fingerprint
    share = load_splits(DataConfig(source="builtin:sentiment", validation_size=0.2))
    assert len(share.validation) == round(0.2 * len(source))
    assert splits.eval.texts == load_split(DataConfig(source="builtin:sentiment"), "validation").texts  # evaluation is untouched


def test_a_named_validation_split(tmp_path):
    folder = glue(tmp_path / "g")
    write_tsv(folder / "val.tsv", [("fine", 1), ("flat", 0)])
    splits = load_splits(DataConfig(source=str(folder), validation_split="val"))
    assert splits.validation.texts == ["fine", "flat"] and splits.train.texts == [s for s, _ in TRAIN]


@pytest.mark.parametrize(
    ("settings", "fragments"),
    [
        ({"validation_size": 3000}, ("data.validation_size = 3000 leaves no training sentences", "fewer than the 3000 sentences")),
        ({"validation_size": 1}, ("data.validation_size = 1 cannot be carved",)),
        ({"validation_split": "val"}, ("data.validation_split = 'val' cannot be read", "has no split 'val'")),
    ],
)
def test_bad_validation_settings_name_the_key(settings, fragments):
    expect_error(DataConfig(source="builtin:sentiment", **settings), *fragments)


def test_unlabelled_sentences_leave_out_every_scored_sentence_and_repeats(tmp_path):
    folder = glue(tmp_path / "g")
    # Raw text with no label column, as unlabelled data comes; it repeats a training and an evaluation sentence.
    raw = ["a gorgeous film", "moving", "new words here", "more new words", "new words here", "a third one"]
    (folder / "raw.tsv").write_text("sentence\n" + "".join(f"{t}\n" for t in raw), encoding="utf-8")
    cfg = DataConfig(source=str(folder), validation_split="val")
    write_tsv(folder / "val.tsv", [("a third one", 1), ("flat", 0)])
    splits = load_splits(cfg)
    assert load_unlabelled(cfg, "raw", splits, None, seed=0) == ["new words here", "more new words"]
    one = load_unlabelled(cfg, "raw", splits, 1, seed=0)
    assert len(one) == 1 and one == load_unlabelled(cfg, "raw", splits, 1, seed=0)
    assert {tuple(load_unlabelled(cfg, "raw", splits, 1, seed=s)) for s in range(8)} == {("new words here",), ("more new words",)}


def test_unlabelled_sentences_from_the_training_split_are_those_outside_the_subset():
    cfg = DataConfig(source="builtin:sentiment", max_train_examples=1000)
    splits = load_splits(cfg)
    pool = load_unlabelled(cfg, "train", splits, None, seed=0)
    scored = set(splits.train.texts + splits.validation.texts + splits.eval.texts)
    everything = set(load_split(cfg, "train").texts)
    assert pool and not scored & set(pool) and set(pool) == everything - scored and len(set(pool)) == len(pool)


@pytest.mark.parametrize(
    ("split", "fragments"),
    [
        ("nope", ("distill.transfer.unlabelled_split = 'nope' cannot be read", "no file for split 'nope'")),
        ("dev", ("distill.transfer.unlabelled_split = 'dev' holds no sentence outside", "expected a split with other sentences")),
    ],
)
def test_bad_unlabelled_split_names_the_key(tmp_path, split, fragments):
    folder = glue(tmp_path / "g")
    cfg = DataConfig(source=str(folder), validation_split="dev2")
    write_tsv(folder / "dev2.tsv", [("fine", 1), ("flat", 0)])
    with pytest.raises(KDError) as err:
        load_unlabelled(cfg, split, load_splits(cfg), None, seed=0)
    for fragment in fragments:
        assert fragment in str(err.value)


def expect_error(cfg, *fragments):
    with pytest.raises(KDError) as err:
        load_splits(cfg)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_missing_path(tmp_path):
    expect_error(DataConfig(source=str(tmp_path / "nope")), "does not exist", "expected a folder")


def test_missing_split_file(tmp_path):
    write_tsv(tmp_path / "d" / "train.tsv", TRAIN)
    expect_error(
        DataConfig(source=str(tmp_path / "d")), "no file for split 'validation'", "dev.tsv" if False else "validation.tsv", "found: train.tsv"
    )


def test_non_utf8_file(tmp_path):
    folder = glue(tmp_path / "d")
    (folder / "train.tsv").write_bytes("sentence\tlabel\ncaf\xe9 cr\xe8me\t1\n".encode("latin-1"))
    expect_error(DataConfig(source=str(folder)), "train.tsv is not UTF-8", "expected a UTF-8 file")


def test_unparseable_file(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "train.parquet").write_bytes(b"this is not parquet")
    write_tsv(folder / "dev.tsv", DEV)
    expect_error(DataConfig(source=str(folder)), "train.parquet cannot be parsed as parquet")


def test_missing_columns(tmp_path):
    folder = glue(tmp_path / "d")
    expect_error(DataConfig(source=str(folder), text_column="text"), "has no column 'text'", "columns: sentence, label", "data.text_column")
    expect_error(DataConfig(source=str(folder), label_column="y"), "has no column 'y'", "data.label_column")


def test_label_outside_label_set_names_the_line(tmp_path):
    folder = glue(tmp_path / "d")
    write_tsv(folder / "train.tsv", [("fine", 1), ("odd", 2)])
    expect_error(DataConfig(source=str(folder)), "train.tsv line 3: label '2' is not in the label set", "0..1", "negative")


def test_empty_split_and_empty_sentence(tmp_path):
    folder = glue(tmp_path / "d")
    write_tsv(folder / "dev.tsv", [])
    expect_error(DataConfig(source=str(folder)), "dev.tsv is empty", "split 'validation'")
    write_tsv(folder / "dev.tsv", [("ok", 1), ("  ", 0)])
    expect_error(DataConfig(source=str(folder)), "dev.tsv line 3: sentence '  ' is empty")


def test_a_file_as_source(tmp_path):
    folder = glue(tmp_path / "d")
    expect_error(DataConfig(source=str(folder / "train.tsv")), "is a file", "train.tsv and dev.tsv")


def test_hub_name_offline_says_how_to_point_at_a_local_copy():
    expect_error(
        DataConfig(source="stanfordnlp/sst2"), "'stanfordnlp/sst2' is not a local path", "HF_HUB_OFFLINE=1", "point data.source at a local copy"
    )


def test_labels_are_int64_ids():
    assert load_splits(DataConfig(source="builtin:sentiment")).train.labels.dtype == np.int64


def test_a_split_with_one_label_is_refused(tmp_path):
    write_tsv(tmp_path / "d" / "train.tsv", [("good", 1), ("bad", 0)])
    write_tsv(tmp_path / "d" / "dev.tsv", [("fine", 1), ("great", 1)])
    with pytest.raises(
        KDError, match=r"split 'validation' of .* holds only the label 'positive'; expected at least two of \['negative', 'positive'\]"
    ):
        load_splits(DataConfig(source=str(tmp_path / "d")))
