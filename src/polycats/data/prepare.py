"""prepare: corpus → splits → joint SentencePiece → binarised shards, cached.

The prepared directory is keyed by a hash of the data config and of the corpus text itself, so a
second ``prepare`` (or ``train``) with the same data is a cache hit, and any change to the data or
the tokenizer settings makes a new directory; an index by the input files' size and modification
time finds it without reading the corpus again. It is built in a temporary directory and renamed into
place, so an interrupted prepare never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from polycats.config import DataConfig, cache_dir
from polycats.data import corpus as corpus_module
from polycats.data.corpus import SPLITS, ParallelCorpus, read_corpus, source_files
from polycats.data.sampling import Task, temperature_probabilities
from polycats.errors import PolycatsError
from polycats.io import atomic_write_json, staging_directory

PAD, UNK, BOS, EOS = 0, 1, 2, 3
FORMAT_VERSION = 2  # 2: meta.json holds a checksum of every file
EVAL_TOKEN_LIMIT = 1024  # valid/test sentences are cut to this many pieces (the model has 4096 positions)
TOKENIZER_SENTENCE_BYTES = 4192  # SentencePiece's default max_sentence_length


def language_tag(language: str) -> str:
    return f"<2{language}>"


def task_languages(task: str) -> tuple[str, str]:
    src, tgt = task.split("-")
    return src, tgt


def corpus_digest(corpus: ParallelCorpus) -> str:
    digest = hashlib.sha256()
    for split in SPLITS:
        for lang in sorted(corpus.pairs[split]):
            digest.update(f"\x00{split}\x00{lang}\x00".encode())
            for src, tgt in corpus.pairs[split][lang]:
                digest.update(src.encode())
                digest.update(b"\x01")
                digest.update(tgt.encode())
                digest.update(b"\x02")
    return digest.hexdigest()


def tokenizer_training_text(corpus: ParallelCorpus, config: DataConfig) -> list[str]:
    """A temperature-sampled mix of every language's training text, so LoRes scripts get pieces."""
    drawn = {lang: pairs[: config.languages[lang]] for lang, pairs in corpus.pairs["train"].items()}
    texts = {lang: [src for src, _ in pairs] for lang, pairs in drawn.items()}
    texts[corpus.pivot] = sorted({tgt for pairs in drawn.values() for _, tgt in pairs})
    probabilities = temperature_probabilities({lang: len(t) for lang, t in texts.items()}, config.tokenizer_temperature)
    budget = min(config.tokenizer_sentences, sum(len(t) for t in texts.values()))
    rng = random.Random(f"{config.split_seed}/tokenizer")
    mix: list[str] = []
    for lang in sorted(texts):
        count = max(1, round(budget * probabilities[lang]))
        pool = texts[lang]
        mix.extend(rng.sample(pool, count) if count <= len(pool) else rng.choices(pool, k=count))
    rng.shuffle(mix)
    return mix


def train_tokenizer(sentences: list[str], languages: list[str], config: DataConfig, model_path: Path) -> None:
    import io

    # SentencePiece skips longer training sentences, and aborts when it has none left.
    usable = [sentence for sentence in sentences if len(sentence.encode("utf-8")) <= TOKENIZER_SENTENCE_BYTES]
    if not usable:
        raise PolycatsError(
            f"every sentence of the tokenizer's training text is longer than {TOKENIZER_SENTENCE_BYTES} bytes; "
            "split the corpus into sentences (one per line)"
        )
    model = io.BytesIO()
    try:
        train_sentencepiece(usable, languages, config, model)
    except RuntimeError as error:  # SentencePiece's own checks, e.g. too few distinct characters
        first_line = (str(error).strip().splitlines() or ["unknown error"])[0]
        raise PolycatsError(f"SentencePiece could not train a tokenizer on this corpus: {first_line[:200]}") from None
    model_path.write_bytes(model.getvalue())


def train_sentencepiece(sentences: list[str], languages: list[str], config: DataConfig, model) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=config.tokenizer_type,
        vocab_size=config.vocab_size,
        character_coverage=0.9995,
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
        user_defined_symbols=[language_tag(lang) for lang in sorted(languages)],
        # Small corpora (tests, synthetic data) may not support the requested size; take what fits.
        hard_vocab_limit=False,
        num_threads=2,
        minloglevel=2,
        max_sentence_length=TOKENIZER_SENTENCE_BYTES,
    )


@dataclass
class TaskArrays:
    """Token ids of one task's sentences: source (tag + tokens + eos), target (tokens + eos)."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.src)


def pack(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    flat = torch.tensor([t for s in sequences for t in s], dtype=torch.int32)
    return {"flat": flat, "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])}


def unpack(packed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    flat, offsets = packed["flat"].numpy(), packed["offsets"].tolist()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


class PreparedData:
    """A prepared directory: tokenizer, binarised splits, raw references and meta.json."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.tokenizer = spm.SentencePieceProcessor(model_file=str(self.root / "spm.model"))
        self._splits: dict[str, dict[str, TaskArrays]] = {}

    @property
    def tasks(self) -> list[str]:
        return self.meta["tasks"]

    @property
    def task_table(self) -> list[Task]:
        """Each task with its language (of ``data.languages``), group and training pairs."""
        pick = 0 if self.meta["direction"] == "m2o" else 1
        return [Task(task, task_languages(task)[pick], self.meta["groups"][task], self.meta["sizes"][task]["train"])
                for task in self.tasks]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_piece_size()

    def split(self, name: str) -> dict[str, TaskArrays]:
        if name not in self._splits:
            if not (self.root / f"{name}.pt").exists():
                raise PolycatsError(f"{self.root} has no {name} split (a run's copy holds only what evaluate and "
                                    "translate need); make the corpus readable again (data.path, POLYCATS_CACHE)")
            try:
                shards = torch.load(self.root / f"{name}.pt", weights_only=True)
            except Exception as error:  # torch raises several types for a damaged or foreign file
                raise PolycatsError(f"{self.root / f'{name}.pt'}: the prepared data is damaged or not ours "
                                    f"({type(error).__name__}); delete {self.root} and run again") from None
            self._splits[name] = {task: TaskArrays(unpack(s["src"]), unpack(s["tgt"])) for task, s in shards.items()}
        return self._splits[name]

    def references(self, name: str) -> dict[str, list[dict[str, str]]]:
        return json.loads((self.root / f"{name}.text.json").read_text(encoding="utf-8"))

    def encode_source(self, sentences: list[str], target_language: str) -> list[list[int]]:
        tag = self.tokenizer.piece_to_id(language_tag(target_language))
        return [[tag, *ids, EOS] for ids in self.tokenizer.encode(sentences)]

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.tokenizer.decode(ids)


def oriented(corpus: ParallelCorpus, config: DataConfig, split: str) -> dict[str, list[tuple[str, str]]]:
    """task -> (source sentence, target sentence), in the configured direction."""
    result = {}
    for task, lang in config.task_languages().items():
        pairs = corpus.pairs[split][lang]
        result[task] = pairs if config.direction == "m2o" else [(tgt, src) for src, tgt in pairs]
    return result


def take_short_pairs(tokenizer, pool: list[tuple[str, str]], wanted: int, max_len: int):
    """The first ``wanted`` pairs of the seeded pool with at most ``max_len`` tokens per side, so
    the requested imbalance is exact after filtering (encoded in chunks: pools can be large)."""
    kept, src_ids, tgt_ids = [], [], []
    start, chunk = 0, max(256, 2 * wanted)
    while len(kept) < wanted and start < len(pool):
        piece = pool[start : start + chunk]
        start += chunk
        for pair, src, tgt in zip(piece, tokenizer.encode([s for s, _ in piece]), tokenizer.encode([t for _, t in piece])):
            if len(src) <= max_len and len(tgt) <= max_len:
                kept.append(pair)
                src_ids.append(src)
                tgt_ids.append(tgt)
                if len(kept) == wanted:
                    break
    return kept, src_ids, tgt_ids


def build(corpus: ParallelCorpus, config: DataConfig, directory: Path) -> None:
    languages = [*config.languages, config.pivot]
    train_tokenizer(tokenizer_training_text(corpus, config), languages, config, directory / "spm.model")
    tokenizer = spm.SentencePieceProcessor(model_file=str(directory / "spm.model"))
    tasks = config.tasks()
    sizes: dict[str, dict[str, int]] = {task: {"requested": config.languages[lang]} for task, lang in config.task_languages().items()}
    for split in SPLITS:
        pairs = oriented(corpus, config, split)
        shards, texts = {}, {}
        for task, lang in config.task_languages().items():
            _, tgt_lang = task_languages(task)
            tag = tokenizer.piece_to_id(language_tag(tgt_lang))
            if split == "train":
                kept, src_ids, tgt_ids = take_short_pairs(tokenizer, pairs[task], config.languages[lang], config.max_len)
                if len(kept) < config.languages[lang]:
                    raise PolycatsError(
                        f"data.languages.{lang} asks for {config.languages[lang]} training pairs but only {len(kept)} "
                        f"have at most data.max_len={config.max_len} tokens per side; lower the count or raise max_len"
                    )
                sizes[task]["pool"] = len(pairs[task])
            else:  # never filter valid/test: scores must cover the whole test set
                kept = pairs[task]
                # Cut (never drop) pathological lines so every sentence fits the model's positions.
                src_ids = [ids[:EVAL_TOKEN_LIMIT] for ids in tokenizer.encode([src for src, _ in kept])]
                tgt_ids = [ids[:EVAL_TOKEN_LIMIT] for ids in tokenizer.encode([tgt for _, tgt in kept])]
                texts[task] = [{"src": src, "ref": tgt} for src, tgt in kept]
            sizes[task][split] = len(kept)
            shards[task] = {"src": pack([[tag, *ids, EOS] for ids in src_ids]), "tgt": pack([[*ids, EOS] for ids in tgt_ids])}
        torch.save(shards, directory / f"{split}.pt")
        if split != "train":
            (directory / f"{split}.text.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    groups = {task: config.groups.group(config.languages[lang]) for task, lang in config.task_languages().items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "source": config.source,
        "direction": config.direction,
        "pivot": config.pivot,
        "tasks": tasks,
        "groups": groups,
        "group_thresholds": config.groups.model_dump(),
        "sizes": sizes,
        "vocab_size": tokenizer.get_piece_size(),
        "notes": corpus.notes,
        "checksums": file_checksums(directory),
    }
    atomic_write_json(directory / "meta.json", meta)


class PreparedDataWarning(UserWarning):
    """A damaged prepared-data cache entry was found and is being rebuilt, or a run falls back to
    its own copy of the data because the corpus cannot be read."""


#: What evaluate and translate read: a run keeps a copy of these (``RUN/data/``), so it can be
#: evaluated and used after its corpus or the cache has moved.
EVALUATION_FILES = ("meta.json", "spm.model", "valid.pt", "test.pt", "valid.text.json", "test.text.json")


def copy_for_evaluation(data: PreparedData, target: Path) -> None:
    """Copy :data:`EVALUATION_FILES` of ``data`` to ``target`` (complete or absent: staged, then
    renamed); an existing copy of the same data is kept."""
    target = Path(target)
    if (target / "meta.json").is_file() and (target / "meta.json").read_bytes() == (data.root / "meta.json").read_bytes():
        return
    staging = staging_directory(target.parent, f".{target.name}.")
    try:
        for name in EVALUATION_FILES:
            shutil.copyfile(data.root / name, staging / name)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def file_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file of a prepared directory but meta.json (which holds them)."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.iterdir()) if path.is_file() and path.name != "meta.json"}


def damage(directory: Path) -> str | None:
    """What is wrong with a prepared directory, or None when every file matches its checksum."""
    try:
        expected = json.loads((directory / "meta.json").read_text())["checksums"]
        found = file_checksums(directory)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable meta.json or files ({type(error).__name__})"
    wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    return f"{', '.join(wrong)} changed since it was built" if wrong else None


def usable(directory: Path) -> bool:
    """True for an intact prepared directory; a damaged one is removed (with a warning) so that
    it is rebuilt."""
    if not (directory / "meta.json").exists():
        return False
    problem = damage(directory)
    if problem is None:
        return True
    warnings.warn(f"prepared data {directory}: {problem}; rebuilding it", PreparedDataWarning, stacklevel=3)
    shutil.rmtree(directory, ignore_errors=True)
    return False


SOURCE_INDEX = ".by-source"  # in the cache root: input files' stat → the key of their prepared directory


def source_key(config: DataConfig) -> str | None:
    """A key from the config, the input files' paths, sizes and modification times and the reading
    code itself: equal keys mean reading the corpus again would give the same text."""
    files = source_files(config)
    if files is None:
        return None
    digest = hashlib.sha256(json.dumps({
        "config": config.model_dump(mode="json"), "tasks": config.tasks(), "format": FORMAT_VERSION,
        "files": [[str(path.resolve()), (stat := path.stat()).st_size, stat.st_mtime_ns] for path in files],
    }, sort_keys=True).encode())
    for module in (corpus_module, sys.modules[__name__]):  # a reader change must re-read
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:20]


def prepare(config: DataConfig, root: Path | None = None) -> PreparedData:
    """The prepared directory of ``config``'s data, built only on a cache miss.

    A second call with unchanged input files finds it through their size and modification time
    without reading the corpus (near-instant); otherwise the corpus is read and its text hashed,
    so an edit that keeps the text the same still hits."""
    root = Path(root) if root is not None else cache_dir() / "prepared"
    fast_key = source_key(config)
    index = root / SOURCE_INDEX / f"{fast_key}.json"
    if fast_key is not None and index.exists():
        try:
            directory = root / json.loads(index.read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            directory = None  # a damaged index entry is rewritten below
        if directory is not None and usable(directory):
            return PreparedData(directory)
    corpus = read_corpus(config)
    # sort_keys loses the order of data.languages, which is the task order: "tasks" keeps it.
    key_source = json.dumps({"config": config.model_dump(mode="json"), "tasks": config.tasks(),
                             "corpus": corpus_digest(corpus), "format": FORMAT_VERSION}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:20]
    directory = root / key
    if not usable(directory):
        root.mkdir(parents=True, exist_ok=True)
        staging = staging_directory(root, f".{key}.")
        try:
            build(corpus, config, staging)
            try:
                staging.rename(directory)
            except OSError:  # another process finished the same key first; theirs is identical
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if fast_key is not None:
        index.parent.mkdir(exist_ok=True)
        atomic_write_json(index, {"key": key})
    return PreparedData(directory)
