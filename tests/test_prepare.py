"""prepare: the cache (hit, miss on any data change, nothing left behind on failure), language tags,
length filtering (train only, exact counts), meta.json sizes and groups."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from polycats.config import DataConfig
from polycats.data import prepare as prepare_module
from polycats.data.prepare import EOS, PAD, language_tag, prepare
from polycats.data.sampling import temperature_probabilities
from polycats.errors import PolycatsError


def synthetic(**overrides) -> DataConfig:
    values = {
        "source": "synthetic", "languages": {"de": 120, "sw": 20, "fr": 60}, "valid_per_lang": 6, "test_per_lang": 8,
        "vocab_size": 100, "max_len": 48, "groups": {"lores_below": 30, "hires_from": 120},
        "synthetic": {"words": 10, "min_words": 2, "max_words": 6},
    }
    return DataConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="module")
def prepared(cache_root):
    return prepare(synthetic(), cache_root)


def test_cache_hit_reuses_the_directory(prepared, cache_root, monkeypatch):
    mtime = (prepared.root / "meta.json").stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("a cache hit must not rebuild")

    monkeypatch.setattr(prepare_module, "build", no_build)
    again = prepare(synthetic(), cache_root)
    assert again.root == prepared.root
    assert (again.root / "meta.json").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache_root.iterdir()) == sorted([prepared.root.name, prepare_module.SOURCE_INDEX])


def test_default_root_is_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYCATS_CACHE", str(tmp_path))
    data = prepare(synthetic(languages={"de": 5}, valid_per_lang=2, test_per_lang=2))
    assert data.root.parent == tmp_path / "prepared"


@pytest.mark.parametrize(
    "change",
    [
        {"languages": {"de": 119, "sw": 20, "fr": 60}},
        {"languages": {"sw": 20, "de": 120, "fr": 60}},  # task order is part of the data
        {"vocab_size": 90},
        {"max_len": 47},
        {"split_seed": 2},
        {"direction": "o2m"},
        {"valid_per_lang": 5},
        {"tokenizer_type": "bpe"},
        {"tokenizer_temperature": 2.0},
        {"groups": {"lores_below": 31, "hires_from": 120}},
        {"synthetic": {"words": 11, "min_words": 2, "max_words": 6}},
    ],
)
def test_any_data_change_makes_a_new_directory(prepared, cache_root, change, monkeypatch):
    built = []
    real_build = prepare_module.build
    monkeypatch.setattr(prepare_module, "build", lambda *a: built.append(1) or real_build(*a))
    other = prepare(synthetic(**change), cache_root)
    assert other.root != prepared.root and other.root.parent == cache_root
    assert built == [1]


def test_language_tags_are_single_pieces(prepared):
    tokenizer = prepared.tokenizer
    for lang in ("de", "sw", "fr", "en"):
        tag = language_tag(lang)
        piece = tokenizer.piece_to_id(tag)
        assert piece != tokenizer.unk_id() and tokenizer.id_to_piece(piece) == tag
        assert tag in tokenizer.encode(f"{tag} x", out_type=str)
    for task, arrays in prepared.split("train").items():
        tag = tokenizer.piece_to_id(language_tag(task.split("-")[1]))
        assert all(src[0] == tag and src[-1] == EOS for src in arrays.src)
        assert all(tgt[-1] == EOS and tag not in tgt[:-1] for tgt in arrays.tgt)
        assert all(PAD not in src for src in arrays.src)


def test_o2m_tags_the_target_language(cache_root):
    data = prepare(synthetic(direction="o2m"), cache_root)
    assert data.tasks == ["en-de", "en-sw", "en-fr"]
    for task, arrays in data.split("valid").items():
        tag = data.tokenizer.piece_to_id(language_tag(task.split("-")[1]))
        assert all(src[0] == tag for src in arrays.src)
    references = data.references("valid")
    # o2m: the source is the pivot; the reference is the other language.
    m2o = prepare(synthetic(), cache_root).references("valid")
    assert [r["src"] for r in references["en-de"]] == [r["ref"] for r in m2o["de-en"]]


def test_encode_source_and_decode_roundtrip(prepared):
    refs = prepared.references("test")["de-en"]
    ids = prepared.encode_source([r["src"] for r in refs], "en")
    assert [list(a) for a in prepared.split("test")["de-en"].src] == ids
    assert prepared.decode([list(t[:-1]) for t in prepared.split("test")["de-en"].tgt]) == [r["ref"] for r in refs]


def test_meta_sizes_and_groups(prepared):
    meta = prepared.meta
    assert meta["tasks"] == ["de-en", "sw-en", "fr-en"]
    assert meta["groups"] == {"de-en": "HiRes", "sw-en": "LoRes", "fr-en": "MidRes"}
    assert meta["group_thresholds"] == {"lores_below": 30, "hires_from": 120}
    for task, requested in zip(meta["tasks"], (120, 20, 60)):
        sizes = meta["sizes"][task]
        assert sizes["requested"] == sizes["train"] == requested
        assert (sizes["valid"], sizes["test"]) == (6, 8)
        assert len(prepared.split("train")[task]) == requested
        assert len(prepared.split("valid")[task]) == 6 and len(prepared.references("valid")[task]) == 6
    assert meta["vocab_size"] == prepared.vocab_size <= 100
    assert meta["direction"] == "m2o" and meta["pivot"] == "en" and meta["source"] == "synthetic"


@pytest.mark.parametrize(
    "count, group", [(29, "LoRes"), (30, "MidRes"), (119, "MidRes"), (120, "HiRes"), (121, "HiRes")]
)
def test_group_thresholds(cache_root, count, group):
    data = prepare(synthetic(languages={"sw": count}, valid_per_lang=2, test_per_lang=2), cache_root)
    assert data.meta["groups"] == {"sw-en": group}


# ------------------------------------------------------------------------------ length filter

def write_text_corpus(root: Path) -> None:
    """60 short and 20 long training pairs per language (long on one side only), and long
    sentences in valid/test that must never be filtered."""
    root.mkdir(parents=True, exist_ok=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    for lang in ("de", "sw"):
        pairs = {"train": [], "valid": [], "test": []}
        for i in range(80):
            short = " ".join(words[(i + j) % len(words)] for j in range(3))
            long = " ".join(words[(i + j) % len(words)] for j in range(30))
            if i % 4 == 3:
                pairs["train"].append((long, short) if i % 8 == 3 else (short, long))
            else:
                pairs["train"].append((f"{lang} {short}", short))
        pairs["valid"] = [(" ".join(words * 3), "long " + " ".join(words * 3)), ("kurz", "short")]
        pairs["test"] = [("kurz", "short"), (" ".join(words * 4), " ".join(words * 4))]
        for split, items in pairs.items():
            (root / f"{split}.{lang}-en.{lang}").write_text("".join(s + "\n" for s, _ in items), encoding="utf-8")
            (root / f"{split}.{lang}-en.en").write_text("".join(t + "\n" for _, t in items), encoding="utf-8")


def text_config(root: Path, **overrides) -> DataConfig:
    values = {"source": "text", "path": root, "languages": {"de": 55, "sw": 20}, "valid_per_lang": 5,
              "test_per_lang": 5, "vocab_size": 64, "max_len": 12}
    return DataConfig(**{**values, **overrides})


def test_long_training_pairs_are_filtered_to_exact_counts(tmp_path):
    write_text_corpus(tmp_path / "corpus")
    data = prepare(text_config(tmp_path / "corpus"), tmp_path / "cache")
    train = data.split("train")
    assert {task: len(a) for task, a in train.items()} == {"de-en": 55, "sw-en": 20}
    for arrays in train.values():
        # max_len counts subword tokens without the tag and eos.
        assert max(len(s) - 2 for s in arrays.src) <= 12 and max(len(t) - 1 for t in arrays.tgt) <= 12
    assert data.meta["sizes"]["de-en"]["pool"] == 80
    # valid/test are never filtered, however long.
    for split in ("valid", "test"):
        arrays = data.split(split)
        assert [len(a) for a in arrays.values()] == [2, 2]
        assert max(len(t) for a in arrays.values() for t in a.tgt) > 12 + 1
        assert len(data.references(split)["de-en"]) == 2


def test_unchanged_input_files_hit_without_reading_the_corpus(tmp_path, monkeypatch):
    """The index by the files' size and mtime: no read while they are unchanged; an edit that
    keeps the text (touch) reads again and hits the same directory; a real edit builds anew; a
    damaged index entry is only a slower lookup."""
    corpus, cache = tmp_path / "corpus", tmp_path / "cache"
    write_text_corpus(corpus)
    first = prepare(text_config(corpus), cache)
    reads = []
    real_read = prepare_module.read_corpus
    monkeypatch.setattr(prepare_module, "read_corpus", lambda config: reads.append(1) or real_read(config))
    assert prepare(text_config(corpus), cache).root == first.root and reads == []
    train_de = corpus / "train.de-en.de"
    stat = train_de.stat()
    os.utime(train_de, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert prepare(text_config(corpus), cache).root == first.root and reads == [1]
    assert prepare(text_config(corpus), cache).root == first.root and reads == [1]  # indexed again
    for entry in (cache / prepare_module.SOURCE_INDEX).iterdir():
        entry.write_text("{not json")
    assert prepare(text_config(corpus), cache).root == first.root and reads == [1, 1]
    train_de.write_text(train_de.read_text(encoding="utf-8").replace("alpha", "omega"), encoding="utf-8")
    assert prepare(text_config(corpus), cache).root != first.root and reads == [1, 1, 1]


def test_language_order_is_the_task_order_of_the_cache_entry(tmp_path):
    """Same files, same languages in another order: another entry whose tasks follow the config
    (task indices, sampling weights and tags are matched to data.languages by position)."""
    write_text_corpus(tmp_path / "corpus")
    first = prepare(text_config(tmp_path / "corpus"), tmp_path / "cache")
    swapped = prepare(text_config(tmp_path / "corpus", languages={"sw": 20, "de": 55}), tmp_path / "cache")
    assert first.tasks == ["de-en", "sw-en"] and swapped.tasks == ["sw-en", "de-en"]


def test_too_few_short_pairs_is_an_error_and_leaves_no_cache_entry(tmp_path):
    write_text_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    with pytest.raises(PolycatsError) as caught:
        prepare(text_config(tmp_path / "corpus", languages={"de": 61}), cache)
    message = str(caught.value)
    assert "data.languages.de" in message and "61" in message and "max_len=12" in message
    assert list(cache.iterdir()) == []


def test_failure_inside_build_leaves_nothing(tmp_path, monkeypatch):
    real = prepare_module.atomic_write_json

    def fail(path, obj):
        real(path, obj)
        raise KeyboardInterrupt  # an interrupted prepare: even BaseException cleans up

    monkeypatch.setattr(prepare_module, "atomic_write_json", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare(synthetic(languages={"de": 5}, valid_per_lang=2, test_per_lang=2), tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(prepare_module, "atomic_write_json", real)
    data = prepare(synthetic(languages={"de": 5}, valid_per_lang=2, test_per_lang=2), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([data.root.name, prepare_module.SOURCE_INDEX])


def test_tokenizer_mix_includes_every_language(prepared):
    pieces = {prepared.tokenizer.id_to_piece(i) for i in range(prepared.vocab_size)}
    # Each synthetic language has its own words; each must be encodable without <unk>.
    for task in prepared.tasks:
        for ref in prepared.references("valid")[task]:
            assert prepared.tokenizer.unk_id() not in prepared.tokenizer.encode(ref["src"])
    assert len(pieces) == prepared.vocab_size


def test_temperature_probabilities():
    sizes = {"a": 100, "b": 10, "c": 1}
    assert temperature_probabilities(sizes, 1.0) == pytest.approx({"a": 100 / 111, "b": 10 / 111, "c": 1 / 111})
    uniform = temperature_probabilities(sizes, 1e9)
    assert np.allclose(list(uniform.values()), 1 / 3)


@pytest.mark.parametrize("damage", ["garbage", "foreign", "missing", "meta"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, damage):
    """Issue 17 item 3: every file of an entry has a checksum in meta.json; a corrupt, foreign or
    missing shard (or an unreadable meta.json) is found before use and the entry is rebuilt."""
    import torch

    first = prepare(synthetic(), tmp_path)
    expected = first.split("train")["de-en"].src[0].tolist()
    shard = first.root / "train.pt"
    if damage == "garbage":
        shard.write_bytes(b"\x80\x02 not a torch file" * 8)
    elif damage == "foreign":
        torch.save({"de-en": {"src": torch.zeros(3)}}, shard)
    elif damage == "missing":
        shard.unlink()
    else:
        (first.root / "meta.json").write_text("{")
    with pytest.warns(prepare_module.PreparedDataWarning, match="rebuilding it"):
        again = prepare(synthetic(), tmp_path)
    assert again.root == first.root and again.split("train")["de-en"].src[0].tolist() == expected
    assert prepare_module.damage(again.root) is None


def test_a_damaged_shard_that_escapes_the_check_is_a_one_line_error(tmp_path):
    data = prepare(synthetic(), tmp_path)
    (data.root / "valid.pt").write_bytes(b"garbage")
    with pytest.raises(PolycatsError, match=r"valid\.pt: the prepared data is damaged or not ours .*delete .* and run again"):
        prepare_module.PreparedData(data.root).split("valid")
