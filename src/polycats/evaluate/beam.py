"""Batched beam search and greedy search over a key/value-cached decoder.

Both searches feed only the newest token at each step (the decoder cache holds the rest), work on
a whole batch of source sentences at once, and drop sentences from the batch as soon as their
search is over. They need nothing but the small :class:`Seq2SeqDecoder` protocol, which
:class:`polycats.model.transformer.Transformer` satisfies, so tests can plug in a toy model with
known log-probabilities.

What is searched for
--------------------
A hypothesis is ``y_1 .. y_L`` followed by ``eos``. Its score is fairseq's length-normalised
log-probability::

    score(y) = (log p(y_1) + ... + log p(y_L) + log p(eos | y)) / (L + 1) ** lenpen

where ``L + 1`` counts the generated tokens *including* eos (bos is not counted). ``lenpen = 0``
ranks by total log-probability (favours short outputs), ``lenpen = 1`` by mean log-probability per
token; ``lenpen > 1`` favours longer outputs still.

Rules on every step (log-probabilities come from a log-softmax over the full vocabulary; banned
tokens are then set to -inf without renormalising, as fairseq does):

- ``pad`` is never generated, and neither is ``bos`` (unless it is the same id as ``eos``) or
  any id in ``banned`` (for a translation model: unk and the target-language tags);
- min length 1: ``eos`` is banned at the first step, so outputs are never empty;
- max length ``floor(max_len_a * src_len + max_len_b)`` tokens before eos, where ``src_len``
  counts the non-pad source tokens of *that* sentence (optionally capped by ``max_len_cap``);
  at that length eos is forced.

Beam search keeps ``beam`` live (eos-free) hypotheses per sentence. On each step it ranks the
``beam x vocab`` extensions; an extension ending in eos is stored as finished when it ranks among
the top ``beam`` extensions (fairseq's rule), and the live beams become the best ``beam``
extensions that do not end in eos. A sentence's search stops when no live hypothesis can still
beat its best finished one, or at its max length. The bound is exact: further tokens only lower a
raw score ``S <= 0``, so a live hypothesis with ``t`` tokens ends with at most
``S / max((t + 1) ** lenpen, (max_len + 1) ** lenpen)``.

``beam == 1`` is plain greedy search (argmax per step, stop at the first eos), served by a cheaper
dedicated path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DecoderCacheLike",
    "Hypothesis",
    "Seq2SeqDecoder",
    "max_lengths",
    "search",
]


class DecoderCacheLike(Protocol):
    def select(self, index: Tensor) -> Self:
        """A cache holding the batch rows ``index`` (in that order) of this one."""
        ...


class Seq2SeqDecoder(Protocol):
    """What a model must offer to be searched (``polycats.model.Transformer`` does)."""

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """``src`` [batch, src_len] -> (memory, source mask)."""
        ...

    def start_cache(self, memory: Tensor, source_mask: Tensor) -> DecoderCacheLike: ...

    def decode(self, tgt_in: Tensor, cache: DecoderCacheLike) -> Tensor:
        """Logits [batch, tgt_len, vocab] for ``tgt_in``; extends ``cache`` in place."""
        ...


@dataclass(frozen=True)
class Hypothesis:
    """The best output for one sentence: token ids (no bos/eos/pad) and its length-penalised
    log-probability (see the module docstring)."""

    tokens: list[int]
    score: float


def max_lengths(
    src: Tensor, *, pad_id: int, max_len_a: float, max_len_b: int, max_len_cap: int | None = None
) -> Tensor:
    """Per-sentence output budget (tokens before eos): ``floor(a * src_len + b)``, at least 1."""
    src_len = (src != pad_id).sum(dim=1).to(torch.float64)
    limit = torch.floor(max_len_a * src_len + max_len_b).long().clamp(min=1)
    if max_len_cap is not None:
        if max_len_cap < 1:
            raise ValueError(f"max_len_cap must be >= 1, got {max_len_cap}")
        limit = limit.clamp(max=max_len_cap)
    return limit


def search(
    model: Seq2SeqDecoder,
    src: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beam: int = 5,
    lenpen: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    max_len_cap: int | None = None,
    banned: Sequence[int] = (),
) -> list[Hypothesis]:
    """Best hypothesis (tokens and score) per source row of ``src`` [batch, src_len].

    ``src`` is right-padded with ``pad_id`` and lives on the model's device. ``max_len_cap``
    bounds the output length whatever the source length; for a model with a fixed position table
    pass ``max_positions - 1`` (bos plus ``max_len`` tokens are fed). ``banned``: ids never
    generated (eos cannot be one of them: every hypothesis ends with it). The model is put in eval
    mode for the search (and put back in training mode afterwards if it was) and everything runs
    under ``torch.inference_mode()``.

    >>> from polycats.model.transformer import Transformer, TransformerShape
    >>> model = Transformer(TransformerShape(vocab_size=20, d_model=16, heads=2, ffn_dim=32))
    >>> src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    >>> hyps = search(model, src, bos_id=1, eos_id=2, pad_id=0, beam=3, max_len_a=0, max_len_b=4)
    >>> [1 <= len(h.tokens) <= 4 for h in hyps]
    [True, True]
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if src.dim() != 2 or src.shape[0] == 0:
        raise ValueError(f"src must be a non-empty [batch, src_len] tensor, got shape {tuple(src.shape)}")
    if eos_id in banned:
        raise ValueError(f"eos ({eos_id}) cannot be banned: every hypothesis ends with it")
    limits = max_lengths(src, pad_id=pad_id, max_len_a=max_len_a, max_len_b=max_len_b, max_len_cap=max_len_cap)
    ids = _SpecialIds(bos=bos_id, eos=eos_id, pad=pad_id, banned=tuple(banned))
    with _inference(model):
        if beam == 1:
            tokens, lengths, scores = _greedy(model, src, limits, ids, lenpen)
        else:
            tokens, lengths, scores = _beam(model, src, limits, ids, beam, lenpen)
    tokens, lengths, scores = tokens.cpu(), lengths.tolist(), scores.tolist()
    return [Hypothesis(tokens[i, : lengths[i]].tolist(), scores[i]) for i in range(len(lengths))]


# --------------------------------------------------------------------------------------------
# Internals. Both searches return (tokens [batch, T] padded, lengths [batch], scores [batch]).


@dataclass(frozen=True)
class _SpecialIds:
    bos: int
    eos: int
    pad: int
    banned: tuple[int, ...] = ()


@contextmanager
def _inference(model: object) -> Iterator[None]:
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _log_probs(logits: Tensor, step: int, at_limit: Tensor, ids: _SpecialIds) -> Tensor:
    """Next-token log-probs [rows, vocab] with banned tokens at -inf.

    ``at_limit`` [rows] marks rows that reached their max length: only eos is allowed there.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    lprobs = F.log_softmax(logits, dim=-1)
    lprobs[:, ids.pad] = -math.inf
    if ids.bos != ids.eos:
        lprobs[:, ids.bos] = -math.inf
    if ids.banned:
        lprobs[:, list(ids.banned)] = -math.inf
    if step == 0:  # min length 1
        lprobs[:, ids.eos] = -math.inf
    # Rows at their limit are rare (the last step of a sentence): touch only those rows.
    limited = at_limit.nonzero().squeeze(1)
    if limited.numel():
        eos = lprobs[limited, ids.eos]
        lprobs[limited] = -math.inf
        lprobs[limited, ids.eos] = eos
    return lprobs


def _normalise(raw: Tensor, length: int | Tensor, lenpen: float) -> Tensor:
    return raw / torch.as_tensor(length, dtype=raw.dtype, device=raw.device) ** lenpen


def _greedy(
    model: Seq2SeqDecoder, src: Tensor, limits: Tensor, ids: _SpecialIds, lenpen: float
) -> tuple[Tensor, Tensor, Tensor]:
    batch, device = src.shape[0], src.device
    limits = limits.to(device)
    width = int(limits.max())
    out = torch.full((batch, width), ids.pad, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    raw = torch.zeros(batch, dtype=torch.float64, device=device)

    cache = model.start_cache(*model.encode(src))
    active = torch.arange(batch, device=device)  # original row of each row still decoding
    last = torch.full((batch, 1), ids.bos, dtype=torch.long, device=device)
    for step in range(width + 1):
        logits = model.decode(last, cache)[:, -1]
        lprobs = _log_probs(logits, step, step >= limits[active], ids)
        best_lp, token = lprobs.max(dim=-1)
        raw[active] += best_lp.to(raw.dtype)
        finished = token == ids.eos
        if step < width:
            out[active, step] = token.masked_fill(finished, ids.pad)
        lengths[active[finished]] = step
        keep = (~finished).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < active.numel():
            active, token, cache = active[keep], token[keep], cache.select(keep)
        last = token[:, None]
    return out, lengths, _normalise(raw, lengths + 1, lenpen)


def _beam(
    model: Seq2SeqDecoder, src: Tensor, limits: Tensor, ids: _SpecialIds, beam: int, lenpen: float
) -> tuple[Tensor, Tensor, Tensor]:
    batch, device = src.shape[0], src.device
    limits = limits.to(device)
    width = int(limits.max())
    # Best finished hypothesis per original sentence.
    best_tokens = torch.full((batch, width), ids.pad, dtype=torch.long, device=device)
    best_length = torch.zeros(batch, dtype=torch.long, device=device)
    best_score = torch.full((batch,), -math.inf, dtype=torch.float64, device=device)

    memory, source_mask = model.encode(src)
    cache = model.start_cache(memory, source_mask).select(
        torch.arange(batch, device=device).repeat_interleave(beam)
    )
    active = torch.arange(batch, device=device)  # original sentence of each sentence still searched
    # Live hypotheses, row = sentence * beam + b: tokens (bos first) and raw summed log-probs.
    # All beams start as the same bos prefix; only beam 0 may expand on the first step.
    tokens = torch.full((batch * beam, 1), ids.bos, dtype=torch.long, device=device)
    raw = torch.full((batch, beam), -math.inf, dtype=torch.float64, device=device)
    raw[:, 0] = 0.0
    beam_offsets = torch.arange(beam, device=device)
    candidate_rank = torch.arange(2 * beam, device=device)

    for step in range(width + 1):
        n = active.numel()
        logits = model.decode(tokens[:, -1:], cache)[:, -1]
        vocab = logits.shape[-1]
        at_limit = (step >= limits[active]).repeat_interleave(beam)
        lprobs = _log_probs(logits, step, at_limit, ids)
        # Only a beam's own best 2 * beam tokens can rank among its sentence's best 2 * beam
        # extensions: add the float64 scores to those, not to the whole vocabulary.
        per_beam = min(2 * beam, vocab)
        beam_lprobs, beam_token = lprobs.topk(per_beam, dim=1)
        extended = (raw.view(n * beam, 1) + beam_lprobs.to(raw.dtype)).view(n, beam * per_beam)
        top_raw, top_index = extended.topk(min(2 * beam, beam * per_beam), dim=1)
        top_origin = top_index // per_beam
        top_token = beam_token.view(n, beam * per_beam).gather(1, top_index)
        top_is_eos = top_token == ids.eos

        # Finished: eos extensions ranked within the top `beam` (and reachable at all).
        # Each has `step` tokens plus eos, so length step + 1.
        finishing = top_is_eos[:, :beam] & torch.isfinite(top_raw[:, :beam])
        finished_score = _normalise(top_raw[:, :beam], step + 1, lenpen).masked_fill(~finishing, -math.inf)
        candidate_score, candidate = finished_score.max(dim=1)
        improves = candidate_score > best_score[active]
        if step > 0:
            origin = top_origin.gather(1, candidate[:, None]).squeeze(1)
            prefix = tokens.view(n, beam, -1)[torch.arange(n, device=device), origin, 1:]
            best_tokens[active, :step] = torch.where(improves[:, None], prefix, best_tokens[active, :step])
        best_length[active] = torch.where(improves, step, best_length[active])
        best_score[active] = torch.where(improves, candidate_score, best_score[active])

        # Live: the best `beam` extensions that do not end in eos (there are at least `beam`
        # among the top 2 * beam, as each beam contributes one eos extension).
        live = (top_is_eos.long() * (2 * beam) + candidate_rank[: top_raw.shape[1]]).topk(
            beam, dim=1, largest=False
        ).indices
        raw = top_raw.gather(1, live)
        rows = (torch.arange(n, device=device)[:, None] * beam + top_origin.gather(1, live)).view(-1)
        tokens = torch.cat([tokens[rows], top_token.gather(1, live).view(-1, 1)], dim=1)

        # A live hypothesis with step + 1 tokens ends with length L in [step + 2, limit + 1].
        best_denominator = torch.maximum(
            torch.tensor(float(step + 2), dtype=raw.dtype, device=device) ** lenpen,
            (limits[active] + 1).to(raw.dtype) ** lenpen,
        )
        live_bound = raw.max(dim=1).values / best_denominator
        done = (step >= limits[active]) | (best_score[active] >= live_bound)
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < n:
            rows = (rows.view(n, beam)[keep]).view(-1)
            keep_rows = (keep[:, None] * beam + beam_offsets).view(-1)
            active, raw, tokens = active[keep], raw[keep], tokens[keep_rows]
        cache = cache.select(rows)
    return best_tokens, best_length, best_score
