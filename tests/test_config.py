import dataclasses
from pathlib import Path

import pytest

from kdlib.config import DistillConfig, ExperimentConfig, SearchConfig, SearchParam, TrainConfig
from kdlib.configure import build_config, flatten, parse_overrides, settings, settings_table
from kdlib.errors import KDError
from tests.conftest import ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "name: mine\ntrain:\n  learning_rate: 3e-5\n  epochs: 2\n")
    cfg = build_config(path, parse_overrides(["train.epochs=5", "--data.max_length", "64"]))
    assert cfg.name == "mine"
    assert cfg.train.learning_rate == 3e-5  # YAML's "3e-5" string read as a number
    assert cfg.train.epochs == 5  # override beats YAML
    assert cfg.data.max_length == 64
    assert cfg.train.batch_size == TrainConfig().batch_size  # untouched default
    assert build_config(None) == ExperimentConfig()


def test_shipped_experiments_load():
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        build_config(path)
    minilm = build_config(ROOT / "experiments" / "sst2-minilm.yaml")
    assert minilm.student.teacher_layers == (0, 2, 4)
    assert build_config(ROOT / "experiments" / "sst2-bert.yaml").teacher.name_or_path == "bert-large-uncased"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=0", "train.learning_rate = 0.0 is out of range; expected a number > 0"),
        ("train.learning_rate=-1e-5", "train.learning_rate = -1e-05 is out of range"),
        ("train.epochs=0", "train.epochs = 0 is out of range; expected an integer >= 1"),
        ("train.batch_size=0", "train.batch_size = 0 is out of range; expected an integer >= 1"),
        ("train.epochs=three", "train.epochs = 'three' has the wrong type; expected an integer"),
        ("train.epochs=2.5", "train.epochs = '2.5' has the wrong type; expected an integer"),
        ("train.mixed_precision=fp8", "train.mixed_precision = 'fp8' is out of range; expected one of"),
        (
            "distill.train.word_embeddings=sparse",
            "distill.train.word_embeddings = 'sparse' is out of range; expected one of ('auto', 'dense', 'lazy', 'frozen')",
        ),
        ("export.int8_scheme=static", "export.int8_scheme = 'static' is out of range; expected one of ('dynamic', 'blockwise')"),
        ("train.learnin_rate=1", "unknown key 'train.learnin_rate'"),
        ("colour=red", "unknown key 'colour'"),
        ("teacher.hidden_size=0", "teacher.hidden_size = 0 is out of range"),
        ("data.label_names=only", "data.label_names = ('only',) is out of range; expected at least two"),
        ("train=3", "train = '3' has the wrong type; expected a mapping"),
        ("distill.train=3", "distill.train = '3' has the wrong type; expected a mapping of its fields"),
        ("distill.transfer.copies=-1", "distill.transfer.copies = -1 is out of range; expected an integer >= 0"),
        ("distill.transfer.p_mask=1.5", "distill.transfer.p_mask = 1.5 is out of range; expected a probability in [0, 1]"),
        ("distill.transfer.p_ngram=-0.1", "distill.transfer.p_ngram = -0.1 is out of range; expected a probability in [0, 1]"),
        ("data.validation_size=0", "data.validation_size = 0.0 is out of range; expected a share in (0, 1) or a whole number of sentences >= 1"),
        ("data.validation_size=2.5", "data.validation_size = 2.5 is out of range"),
        ("data.validation_split=validation", "data.validation_split = 'validation' is out of range; expected a split other than eval_split"),
        ("distill.transfer.unlabelled_max=0", "distill.transfer.unlabelled_max = 0 is out of range; expected an integer >= 1 or null"),
        (
            "distill.transfer.unlabelled_max=5",
            "distill.transfer.unlabelled_max = 5 is out of range; expected null unless unlabelled_split names a split",
        ),
        (
            "distill.transfer.unlabelled_split=validation",
            "distill.transfer.unlabelled_split = 'validation' is out of range; expected a split other than 'validation'",
        ),
    ],
)
def test_bad_override_names_key_and_expectation(override, message):
    with pytest.raises(KDError, match=None) as err:
        build_config(None, parse_overrides([override]))
    assert message in str(err.value)


def test_yaml_wrong_type_and_unknown_key(tmp_path):
    with pytest.raises(KDError, match=r"train.batch_size = \[32\] has the wrong type"):
        build_config(write(tmp_path, "train:\n  batch_size: [32]\n"))
    with pytest.raises(KDError, match="unknown key 'data.sentence_col'"):
        build_config(write(tmp_path, "data:\n  sentence_col: text\n"))


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    with pytest.raises(KDError, match="not valid YAML"):
        build_config(write(tmp_path, "name: !!python/object/apply:os.system ['true']\n"))


def test_bad_experiment_files(tmp_path):
    with pytest.raises(KDError, match="does not exist"):
        build_config(tmp_path / "missing.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(KDError, match="not UTF-8"):
        build_config(latin1)
    with pytest.raises(KDError, match="must hold a mapping"):
        build_config(write(tmp_path, "- a\n- b\n"))


def test_override_syntax_errors():
    with pytest.raises(KDError, match="not of the form key=value"):
        parse_overrides(["train.epochs"])
    with pytest.raises(KDError, match="has no value"):
        parse_overrides(["--train.epochs"])


def test_flatten_gives_dotted_params():
    flat = flatten(build_config(None, {"student.teacher_layers": "0,2"}))
    assert flat["student.teacher_layers"] == "0,2"
    assert flat["train.learning_rate"] == TrainConfig().learning_rate


def _sections(cfg, prefix=""):
    """(dotted path, default instance) of every nested config section."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield f"{prefix}{f.name}", value
            yield from _sections(value, f"{prefix}{f.name}.")


@pytest.mark.parametrize("section", [path for path, _ in _sections(ExperimentConfig())])
def test_setting_one_key_keeps_the_sections_own_defaults(section):
    """Regression: setting any key of a section used to rebuild it from the class defaults, so
    ``distill.train.epochs=2`` silently reset the student's learning rate to the teacher's."""
    default = dict(_sections(ExperimentConfig()))[section]
    first = dataclasses.fields(default)[0].name
    value = getattr(default, first)
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    assert build_config(None, {f"{section}.{first}": shown or "[]"}) == ExperimentConfig()


def test_nested_defaults_survive_overrides_and_yaml(tmp_path):
    assert build_config(None, {"distill.train.epochs": "2"}).distill.train.learning_rate == DistillConfig().train.learning_rate == 1e-4
    minilm = build_config(ROOT / "experiments" / "sst2-minilm.yaml", {"distill.train.epochs": "2"})
    assert minilm.student.name_or_path == ExperimentConfig().student.name_or_path == "bert-base-uncased"
    assert minilm.distill.train.learning_rate == 1e-4
    assert minilm.train.learning_rate == 1e-4  # the YAML's own teacher setting


def test_search_space_entries_merge_field_by_field():
    cfg = build_config(None, {"search.space.distill.alpha.high": "0.5", "search.space.distill.temperature": "null"})
    assert cfg.search.space["distill.alpha"] == SearchParam(0.0, 0.5)
    assert "distill.temperature" not in cfg.search.space
    assert cfg.search.space["distill.train.epochs"] == SearchConfig().space["distill.train.epochs"]


def test_every_setting_has_a_meaning():
    for key, _type, _default, meaning in settings():
        assert meaning, f"{key} has no help line in its class docstring"


def test_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- settings: generated")[1].split("-->", 1)[1].split("<!-- /settings -->")[0].strip()
    assert table == settings_table()


def test_null_words_clear_only_nullable_settings():
    cfg = build_config(None, parse_overrides(["search.pruner=none", "search.timeout=null", "data.max_train_examples=~"]))
    assert cfg.search.pruner == "none"  # a choice, not "unset"
    assert cfg.search.timeout is None and cfg.data.max_train_examples is None


def test_file_errors_are_one_line_with_the_true_position(tmp_path):
    late = tmp_path / "late.yaml"
    late.write_bytes(b"# " + b"x" * 9000 + b"\nname: caf\xe9\n")  # the bad byte lies past the first 8 KiB chunk
    with pytest.raises(KDError) as err:
        build_config(late)
    assert "at byte 9012, line 2" in str(err.value)
    with pytest.raises(KDError) as err:
        build_config(write(tmp_path, "name: smoke\ntrain:\n  epochs: [2\n"))
    assert "\n" not in str(err.value) and "not valid YAML at line " in str(err.value)
