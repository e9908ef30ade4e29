"""The experiment config: YAML validated by pydantic, with ``--set a.b=c`` overrides.

Every section forbids unknown keys, so a typo is an error naming the field, never a silently
ignored setting. ``balancer`` is a union on ``balancer.name``: each method validates its own
options.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from polycats.balancer_config import BALANCER_NAMES, BalancerConfig, ScalarConfig
from polycats.errors import PolycatsError, printable


class Section(BaseModel):
    # strict: a number is a number, never true/false or a string ("de: true" is not 1 pair).
    model_config = ConfigDict(extra="forbid", strict=True)


# Language codes name files (train.xx-en.xx), tags (<2xx>) and tasks (xx-en, split on "-").
LANGUAGE_CODE = re.compile(r"[A-Za-z0-9_]{1,32}")


def check_language_code(code: str, where: str) -> str:
    if not LANGUAGE_CODE.fullmatch(code):
        raise ValueError(
            f"{where} {code!r} is not a language code: use letters, digits and '_' (e.g. de, pt_BR, zh_Hans; "
            "'-' separates the languages of a task)"
        )
    return code


class GroupThresholds(Section):
    """Languages with fewer training pairs than ``lores_below`` are LoRes, at least ``hires_from``
    HiRes, MidRes between (data.md defaults, scaled to the Bible corpus)."""

    lores_below: int = Field(2000, gt=0, description="fewer training pairs than this: LoRes")
    hires_from: int = Field(10000, gt=0, description="at least this many training pairs: HiRes (MidRes between)")

    @model_validator(mode="after")
    def ordered(self) -> GroupThresholds:
        if self.hires_from < self.lores_below:
            raise ValueError("hires_from must be >= lores_below")
        return self

    def group(self, train_pairs: int) -> str:
        if train_pairs < self.lores_below:
            return "LoRes"
        return "HiRes" if train_pairs >= self.hires_from else "MidRes"


class SyntheticConfig(Section):
    """The toy source: each language renames the pivot's words with its own vocabulary; odd-numbered
    languages also reverse word order."""

    words: int = Field(24, ge=2, description="vocabulary size of every language")
    min_words: int = Field(3, ge=1, description="shortest sentence in words")
    max_words: int = Field(8, ge=1, description="longest sentence in words")


class DataConfig(Section):
    source: Literal["bible", "text", "hf_disk", "synthetic"] = Field(
        "bible", description="the offline Bible corpus, text or hf_disk files under data.path, or toy data for tests"
    )
    path: Annotated[Path, Strict(False)] | None = Field(None, description="directory of the corpus (text, hf_disk)")
    direction: Literal["m2o", "o2m"] = Field("m2o", description="m2o: every language → pivot; o2m: pivot → every language")
    pivot: str = Field("en", description="the language every pair shares")
    languages: dict[str, Annotated[int, Field(gt=0)]] = Field(
        ..., description="language code → training pairs, e.g. {de: 8000, sw: 500}: this is how imbalance is made"
    )
    valid_per_lang: int = Field(200, gt=0, description="held-out validation pairs per language (Bible: whole chapters)")
    test_per_lang: int = Field(500, gt=0, description="held-out test pairs per language (the same verses in every language)")
    vocab_size: int = Field(4000, ge=32, description="joint SentencePiece vocabulary (smaller if the corpus cannot fill it)")
    max_len: int = Field(48, gt=0, description="training pairs longer than this many subword tokens are dropped (valid/test never)")
    split_seed: int = Field(1, description="seed of the held-out split, the training subsample and the tokenizer's training text")
    translations: dict[str, str] = Field(
        default_factory=dict, description="bible only: language -> one-character translation code override"
    )
    tokenizer_type: Literal["unigram", "bpe"] = Field("unigram", description="SentencePiece model type")
    tokenizer_temperature: float = Field(5.0, gt=0, description="language mix of the SentencePiece training text")
    tokenizer_sentences: int = Field(200_000, gt=0, description="sentences in the SentencePiece training mix")
    groups: GroupThresholds = GroupThresholds()
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("languages")
    @classmethod
    def not_empty(cls, value: dict[str, int]) -> dict[str, int]:
        if not value:
            raise ValueError("list at least one language, e.g. {de: 8000, sw: 500}")
        for code in value:
            check_language_code(code, "language")
        return value

    @field_validator("pivot")
    @classmethod
    def pivot_code(cls, value: str) -> str:
        return check_language_code(value, "pivot")

    @field_validator("path")
    @classmethod
    def absolute_path(cls, value: Path | None) -> Path | None:
        # Stored absolute: a run's config.yaml must name the same corpus from any working directory.
        return None if value is None else value.expanduser().absolute()

    @model_validator(mode="after")
    def pivot_not_a_language(self) -> DataConfig:
        if self.pivot in self.languages:
            raise ValueError(f"the pivot '{self.pivot}' cannot also be in data.languages")
        if self.source in ("text", "hf_disk") and self.path is None:
            raise ValueError(f"data.path is required for source '{self.source}'")
        return self

    def tasks(self) -> list[str]:
        """Translation directions in config order, e.g. ``["de-en", "sw-en"]``."""
        if self.direction == "m2o":
            return [f"{lang}-{self.pivot}" for lang in self.languages]
        return [f"{self.pivot}-{lang}" for lang in self.languages]

    def task_languages(self) -> dict[str, str]:
        """Each task and the language of ``languages`` it translates, e.g. ``{"sw-en": "sw"}``."""
        return dict(zip(self.tasks(), self.languages))


class SamplingConfig(Section):
    temperature: float = Field(1.0, gt=0, description="p_i ∝ n_i^(1/T): 1 proportional, 5 common, 100 ≈ uniform")
    weights: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="explicit per-language sampling weights (replace the temperature formula)"
    )
    first_stage_updates: int = Field(
        0, ge=0, description="two-stage schedule (Choi et al. 2023): the first N updates sample only "
        "first_stage_languages, then the mix above; 0 = one stage"
    )
    first_stage_languages: list[str] | None = Field(
        None, description="languages of the first stage (their probabilities from the same formula, "
        "renormalised); default: the HiRes group"
    )


class ModelConfig(Section):
    d_model: int = Field(192, gt=0, description="width of the Transformer (embeddings tied with the output)")
    encoder_layers: int = Field(3, ge=1, description="encoder layers")
    decoder_layers: int = Field(3, ge=1, description="decoder layers")
    heads: int = Field(4, ge=1, description="attention heads (must divide d_model)")
    ffn_dim: int = Field(768, gt=0, description="inner width of the feed-forward blocks")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on embeddings and sublayer outputs")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on attention weights (0 keeps the fused CPU kernel)")

    @model_validator(mode="after")
    def heads_divide(self) -> ModelConfig:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        return self


class TrainConfig(Section):
    max_updates: int = Field(1200, gt=0, description="optimiser updates of the run (may be raised to continue a finished run)")
    max_tokens: int = Field(2048, gt=0, description="padded tokens per batch (per micro-batch with update_freq > 1)")
    update_freq: int = Field(
        1, ge=1, description="micro-batches accumulated into one update on each process: an update's batch is "
        "update_freq × processes (torchrun) micro-batches of max_tokens, exact for every balancer"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast of the forward passes: bf16 (CPU, CUDA) or fp16 with a GradScaler; "
        "parameters, per-task gradients and balancer math stay fp32"
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate of Adam")
    warmup_updates: int = Field(500, ge=0, description="linear warm-up, then inverse square root decay")
    adam_betas: Annotated[tuple[float, float], Strict(False)] = Field(  # not strict: YAML gives a list
        (0.9, 0.98), description="Adam's β1, β2, each in [0, 1)"
    )
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay of Adam (torch.optim.Adam's, not AdamW's)")
    clip_norm: float = Field(1.0, ge=0, description="0 disables gradient clipping")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the training loss")
    save_every: int = Field(200, gt=0, description="updates between checkpoints")
    keep_snapshots: bool = Field(True, description="keep the model weights of every checkpoint as update_NNNNNN.pt (analyze's curves)")
    log_every: int = Field(10, gt=0, description="updates between train events in metrics.jsonl (averages over the window)")
    valid_every: int = Field(200, gt=0, description="updates between validations (best.pt by validation NLL)")
    patience: int = Field(0, ge=0, description="stop after this many validations without improvement (0 = off)")
    seed: int = Field(1, description="seed of the model, the batches, dropout and the balancer")
    threads: int = Field(0, ge=0, description="torch threads (0 = torch's default)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model trains and decodes: auto = cuda if torch sees a GPU, else cpu; --device overrides it"
    )
    diagnostics_every: int = Field(0, ge=0, description="updates between logged diagnostics (0 = off)")

    @field_validator("adam_betas")
    @classmethod
    def betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError("both Adam betas must be in [0, 1), e.g. [0.9, 0.98]")
        return value


class EvalConfig(Section):
    beam: int = Field(4, ge=1, description="beam size (1: greedy)")
    lenpen: float = Field(1.0, ge=0, description="length penalty: scores are log-probability / length ** lenpen")
    max_len_a: float = Field(1.5, ge=0, description="at most max_len_a * source length + max_len_b output tokens")
    max_len_b: int = Field(10, ge=1, description="see max_len_a")
    batch_size: int = Field(64, gt=0, description="sentences per decoding batch")
    checkpoint: Literal["best", "last"] = Field("best", description="checkpoint evaluate and translate use by default")


class Config(Section):
    name: str = Field("polycats", description="a label for the run (reports show it)")
    data: DataConfig
    sampling: SamplingConfig = SamplingConfig()
    balancer: BalancerConfig = Field(
        ScalarConfig(), description="how the task losses or gradients are combined: scalar (fixed loss weights), "
        "cats (docs/cats.md) or a peer (docs/peers.md)"
    )
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def fingerprint(self, sections: tuple[str, ...]) -> str:
        dumped = self.model_dump(mode="json")
        blob = json.dumps({key: dumped[key] for key in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RefusedYaml(yaml.MarkedYAMLError):
    """YAML that parses but that a config must not use (duplicate keys, aliases)."""


class YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats that refuses duplicate keys and aliases.

    YAML 1.1 reads no/yes/on/off as booleans, which would turn language codes such as Norwegian
    ``no`` (OPUS-100) into ``False``, and ``1e-3`` as a string (it wants ``1.0e-3``), which the
    strict number fields would refuse. PyYAML keeps the last of duplicate keys without a word.
    Aliases have no use in a config, and a few hundred bytes of nested ones expand to billions of
    values in anything that walks the tree (the "billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RefusedYaml(problem=f"YAML aliases (*{event.anchor}) are not allowed in a config; write the value out",
                              problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: SafeLoader's own error follows
                break
            if duplicate:
                raise RefusedYaml(problem=f"duplicate key {printable(key)!r}; write each key once",
                                  problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# Added after the int resolver, so 10 stays an int; a float has a '.' or an exponent (1e-3, 2.5, .5).
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*(?=[eE]))(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:  # PyYAML's parser recurses once per nesting level
        raise yaml.YAMLError("nested too deeply") from None


def set_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (``3``, ``true``, ``{de: 10}``)."""
    shown = printable(assignment)
    if "=" not in assignment:
        raise PolycatsError(f"--set '{shown}': expected KEY=VALUE, e.g. --set train.max_updates=20")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise PolycatsError(f"--set '{shown}': empty key part in '{printable(key)}'")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise PolycatsError(f"--set '{shown}': '{printable(part)}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = parse_yaml(raw) if raw.strip() else raw
    except yaml.YAMLError:
        node[parts[-1]] = raw


def describe_validation_error(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors()[:3]:
        field = printable(".".join(str(part) for part in item["loc"] if not str(part).startswith("function-")))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see configs/ for the known fields)"
        elif item["type"] == "union_tag_invalid":
            message = f"unknown balancer {item['ctx']['tag']!r}; choose one of: {item['ctx']['expected_tags']}"
        elif item["type"] == "union_tag_not_found":
            message = f"missing 'name'; choose one of: {', '.join(map(repr, BALANCER_NAMES))}"
        got = item.get("input")
        shown = "" if item["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"field '{field}': {message}{shown}")
    more = len(error.errors()) - len(problems)
    return f"invalid config {source}: " + "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def non_finite_numbers(tree: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Where a config holds inf or NaN (YAML's .inf / .nan): no setting means anything by them."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return [".".join(path)]
    if isinstance(tree, dict):
        return [found for key, value in tree.items() for found in non_finite_numbers(value, (*path, str(key)))]
    if isinstance(tree, (list, tuple)):
        return [found for i, value in enumerate(tree) for found in non_finite_numbers(value, (*path, str(i)))]
    return []


def config_from_dict(tree: dict[str, Any], source: str = "") -> Config:
    try:
        non_finite = non_finite_numbers(tree)
        if non_finite:
            fields = ", ".join(f"'{field}'" for field in non_finite[:3])
            raise PolycatsError(f"invalid config {source}: field {fields}: must be a finite number (got inf or nan)")
        return Config.model_validate(tree)
    except ValidationError as error:
        raise PolycatsError(describe_validation_error(error, source)) from None
    except RecursionError:
        raise PolycatsError(f"invalid config {source}: nested too deeply") from None


def read_yaml_file(path: Path, kind: str, hint: str) -> Any:
    """The parsed YAML of ``path`` or a one-line error naming it (``kind``: "config file", "grid
    file"; ``hint``: where to look when it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolycatsError(f"{kind} {path} does not exist; {hint}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PolycatsError(f"cannot read {kind} {path}: {error}") from None
    try:
        return parse_yaml(text)
    except RefusedYaml as error:
        raise PolycatsError(f"{kind} {path} line {error.problem_mark.line + 1}: {error.problem}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        # Marked errors carry a one-line ``problem``; others (e.g. a NUL character) only a multi-line str.
        problem = getattr(error, "problem", None) or (str(error).strip().splitlines() or ["unreadable"])[0]
        raise PolycatsError(f"{kind} {path}{where} is not valid YAML: {problem}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    tree = read_yaml_file(path, "config file", "see configs/ for presets") or {}
    if not isinstance(tree, dict):
        raise PolycatsError(f"config file {path} must be a YAML mapping of sections (data:, train:, ...)")
    for assignment in overrides or []:
        set_override(tree, assignment)
    return config_from_dict(tree, str(path))


def cache_dir() -> Path:
    """Where prepared data (tokenizers, binarised shards) is cached: $POLYCATS_CACHE or ~/.cache/polycats.
    An empty POLYCATS_CACHE is unset, as in a shell (``Path("")`` would be the current directory)."""
    return Path(os.environ.get("POLYCATS_CACHE") or Path.home() / ".cache" / "polycats")


def preset_path(name: str) -> Path:
    """A preset shipped in the repository's configs/ directory."""
    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    if not path.exists():
        raise PolycatsError(f"preset '{name}' not found at {path}; run from a clone of polycats")
    return path
