"""Beam and greedy search: against brute force on a toy Markov model with known log-probs, and
against uncached decoding on a small random Transformer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from polycats.evaluate import beam as beam_module
from polycats.evaluate.beam import max_lengths, search
from polycats.model.transformer import Transformer, TransformerShape

PAD, BOS, EOS = 0, 1, 2
IDS = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)


def beam_search(model, src, **options) -> list[list[int]]:
    """Token ids of the best hypothesis per row."""
    return [hyp.tokens for hyp in search(model, src, **options)]


def greedy_search(model, src, **options) -> list[list[int]]:
    return beam_search(model, src, beam=1, **options)


# ---------------------------------------------------------------------------------------------
# A toy decoder: log p(next | prev, position, sentence) read from a table.


class MarkovCache:
    def __init__(self, table: torch.Tensor, length: int = 0):
        self.table, self.length = table, length

    def select(self, index: torch.Tensor) -> MarkovCache:
        return MarkovCache(self.table.index_select(0, index), self.length)


class MarkovModel:
    """``tables[t, min(position, P - 1), prev, next]`` are logits; the source's first token minus 1
    picks the table ``t``; the source's non-pad length sets the max output length."""

    def __init__(self, tables: torch.Tensor):
        self.tables = tables  # [n_tables, P, vocab, vocab]

    def log_prob(self, table: int, position: int, prev: int, token: int) -> float:
        row = self.tables[table, min(position, self.tables.shape[1] - 1), prev]
        return F.log_softmax(row.double(), dim=-1)[token].item()

    def encode(self, src):
        return src[:, 0] - 1, src != PAD

    def start_cache(self, memory, source_mask):
        return MarkovCache(memory)

    def decode(self, tgt_in, cache):
        positions = (cache.length + torch.arange(tgt_in.shape[1])).clamp(max=self.tables.shape[1] - 1)
        cache.length += tgt_in.shape[1]
        return self.tables[cache.table[:, None], positions[None, :], tgt_in]


def markov_source(table: int, length: int, width: int) -> list[int]:
    return [table + 1] + [3] * (length - 1) + [PAD] * (width - length)


def sequence_score(model: MarkovModel, table: int, tokens: list[int], lenpen: float) -> float:
    total, prev = 0.0, BOS
    for position, token in enumerate([*tokens, EOS]):
        total += model.log_prob(table, position, prev, token)
        prev = token
    return total / (len(tokens) + 1) ** lenpen


def brute_force(model: MarkovModel, table: int, max_len: int, lenpen: float) -> tuple[list[int], float]:
    """The exact optimum over all outputs of 1..max_len tokens (pad and bos are never generated)."""
    vocab = model.tables.shape[-1]
    allowed = [t for t in range(vocab) if t not in (PAD, BOS, EOS)]
    candidates = (list(y) for n in range(1, max_len + 1) for y in itertools.product(allowed, repeat=n))
    return max(((y, sequence_score(model, table, y, lenpen)) for y in candidates), key=lambda ys: ys[1])


def greedy_reference(model: MarkovModel, table: int, max_len: int) -> list[int]:
    out, prev = [], BOS
    for position in range(max_len):
        lp = {t: model.log_prob(table, position, prev, t) for t in range(model.tables.shape[-1]) if t not in (PAD, BOS)}
        if position == 0:
            del lp[EOS]
        token = max(lp, key=lp.get)
        if token == EOS:
            break
        out.append(token)
        prev = token
    return out


def handmade_markov() -> MarkovModel:
    """Greedy follows 'a' (p=.5 first) into a flat continuation; the best outputs start with 'b'.

    Tokens: pad 0, bos 1, eos 2, a 3, b 4, c 5. Best with lenpen 0: "b" (.4 * .5 = .2);
    with lenpen 1: "b c" (.4 * .49 * .98 = .192, 3 tokens with eos)."""
    p = torch.full((6, 6), 1 / 6, dtype=torch.float64)  # rows never reached by a live beam: uniform
    p[BOS] = torch.tensor([0, 0, 0.05, 0.5, 0.4, 0.05])
    p[3] = torch.tensor([0, 0, 0.33, 0.34, 0.32, 0.01])
    p[4] = torch.tensor([0, 0, 0.5, 0.005, 0.005, 0.49])
    p[5] = torch.tensor([0, 0, 0.98, 0.01, 0.005, 0.005])
    return MarkovModel(p.clamp(min=1e-9).log()[None, None])


@pytest.mark.parametrize("lenpen, expected", [(0.0, [4]), (1.0, [4, 5])])
@pytest.mark.parametrize("beam", [2, 3])
def test_beam_finds_the_optimum_where_greedy_does_not(beam, lenpen, expected):
    model = handmade_markov()
    src = torch.tensor([markov_source(0, 5, 5)])
    best, best_score = brute_force(model, 0, max_len=5, lenpen=lenpen)
    assert best == expected
    greedy = greedy_search(model, src, **IDS, max_len_a=1.0, max_len_b=0)[0]
    assert greedy == greedy_reference(model, 0, 5)
    assert sequence_score(model, 0, greedy, lenpen) < best_score - 1e-3

    [hyp] = search(model, src, **IDS, beam=beam, lenpen=lenpen, max_len_a=1.0, max_len_b=0)
    assert hyp.tokens == best
    assert hyp.score == pytest.approx(best_score, abs=1e-9)


@pytest.mark.parametrize("beam", [1, 2, 3])
def test_banned_tokens_are_never_generated(beam):
    """b is the best first token and in every best output; banned, the search finds outputs
    without it and scores them truly (unk and language tags are banned so in translation)."""
    model = handmade_markov()
    src = torch.tensor([markov_source(0, 5, 5)])
    [hyp] = search(model, src, **IDS, beam=beam, lenpen=1.0, max_len_a=1.0, max_len_b=0, banned=[4])
    assert hyp.tokens and 4 not in hyp.tokens
    assert hyp.score == pytest.approx(sequence_score(model, 0, hyp.tokens, 1.0), abs=1e-9)


def random_markov(seed: int, n_tables: int, vocab: int = 5, positions: int = 3, scale: float = 2.0) -> MarkovModel:
    g = torch.Generator().manual_seed(seed)
    return MarkovModel(scale * torch.randn(n_tables, positions, vocab, vocab, generator=g, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    lengths=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    lenpen=st.sampled_from([-0.5, 0.0, 0.6, 1.0, 2.0]),
)
def test_wide_beam_is_exact_search(seed, lengths, lenpen):
    """With 2 content tokens and max_len <= 3, beam 12 keeps every prefix and ranks every eos
    extension in its top 12, so only the stopping rule could lose the optimum — it must not."""
    model = random_markov(seed, n_tables=len(lengths))
    src = torch.tensor([markov_source(i, n, max(lengths)) for i, n in enumerate(lengths)])
    hyps = search(model, src, **IDS, beam=12, lenpen=lenpen, max_len_a=1.0, max_len_b=0)
    for i, (n, hyp) in enumerate(zip(lengths, hyps)):
        best, best_score = brute_force(model, i, max_len=n, lenpen=lenpen)
        assert hyp.score == pytest.approx(best_score, abs=1e-9)
        assert hyp.tokens == best


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    lengths=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    beam=st.integers(1, 4),
    lenpen=st.sampled_from([0.0, 1.0, 1.5]),
)
def test_beam_scores_are_true_scores_and_bounded_by_the_optimum(seed, lengths, beam, lenpen):
    model = random_markov(seed, n_tables=len(lengths), vocab=6)
    src = torch.tensor([markov_source(i, n, max(lengths)) for i, n in enumerate(lengths)])
    hyps = search(model, src, **IDS, beam=beam, lenpen=lenpen, max_len_a=1.0, max_len_b=0)
    for i, (n, hyp) in enumerate(zip(lengths, hyps)):
        assert 1 <= len(hyp.tokens) <= n
        assert all(t not in (PAD, BOS, EOS) for t in hyp.tokens)
        assert hyp.score == pytest.approx(sequence_score(model, i, hyp.tokens, lenpen), abs=1e-9)
        assert hyp.score <= brute_force(model, i, max_len=n, lenpen=lenpen)[1] + 1e-9
        if beam == 1:
            assert hyp.tokens == greedy_reference(model, i, n)


def test_max_length_is_per_sentence_and_forced():
    """A model that never wants eos fills each sentence's budget exactly."""
    tables = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    tables[..., EOS] = -30.0
    model = MarkovModel(tables)
    src = torch.tensor([markov_source(0, n, 5) for n in (1, 3, 5)])
    for beam in (1, 3):
        out = beam_search(model, src, **IDS, beam=beam, max_len_a=1.0, max_len_b=2)
        assert [len(y) for y in out] == [3, 5, 7]
        out = beam_search(model, src, **IDS, beam=beam, max_len_a=1.0, max_len_b=2, max_len_cap=4)
        assert [len(y) for y in out] == [3, 4, 4]
    assert max_lengths(src, pad_id=PAD, max_len_a=1.5, max_len_b=1).tolist() == [2, 5, 8]
    assert max_lengths(src, pad_id=PAD, max_len_a=0.0, max_len_b=0).tolist() == [1, 1, 1]  # min length 1


# ---------------------------------------------------------------------------------------------
# A small random Transformer.

VOCAB = 24


def make_transformer(seed: int = 0, dropout: float = 0.0) -> Transformer:
    torch.manual_seed(seed)
    shape = TransformerShape(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, heads=4, ffn_dim=64,
        dropout=dropout, max_positions=64, pad_id=PAD,
    )
    model = Transformer(shape).double()
    with torch.no_grad():  # make eos likelier so outputs end at varied lengths
        model.embed.weight[EOS] *= 3.0
    return model.eval()


def random_sources(seed: int, lengths: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
    return src


def test_cached_decoding_matches_full_forward():
    model = make_transformer()
    src = random_sources(1, [7, 4, 9])
    tgt_in = torch.cat([torch.full((3, 1), BOS), torch.randint(3, VOCAB, (3, 6))], dim=1)
    with torch.no_grad():
        full = model(src, tgt_in)
        cache = model.start_cache(*model.encode(src))
        steps = [model.decode(tgt_in[:, t : t + 1], cache) for t in range(4)]
        # reorder/duplicate rows mid-way, as beam search does, then keep going
        order = torch.tensor([2, 0, 0, 1])
        cache = cache.select(order)
        rest = [model.decode(tgt_in[order, t : t + 1], cache) for t in range(4, tgt_in.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, :4])
    torch.testing.assert_close(torch.cat(rest, dim=1), full[order, 4:])


def test_beam_rows_share_their_sentence_cross_attention():
    """Blocks of rows per sentence (beam search's selects) keep one copy of each sentence's
    cross-attention keys/values — none at all when no sentence is dropped — and decode as the
    full forward pass of each row's own source and prefix."""
    model = make_transformer()
    src = random_sources(1, [7, 4, 9])
    tgt_in = torch.cat([torch.full((6, 1), BOS), torch.randint(3, VOCAB, (6, 5))], dim=1)  # 2 rows per sentence
    with torch.no_grad():
        cache = model.start_cache(*model.encode(src))
        keys = cache.cross_kv[0][0]
        cache = cache.select(torch.arange(3).repeat_interleave(2))
        assert cache.group == 2 and cache.cross_kv[0][0] is keys
        first = model.decode(tgt_in[:, :2], cache)
        # swap the beams of sentence 0, drop sentence 1, duplicate a beam of sentence 2
        order = torch.tensor([1, 0, 5, 5])
        cache = cache.select(order)
        assert cache.group == 2 and torch.equal(cache.cross_kv[0][0], keys[[0, 2]])
        rest = model.decode(tgt_in[order, 2:], cache)
        full = model(src[order // 2], tgt_in[order])
    torch.testing.assert_close(torch.cat([first[order], rest], dim=1), full)


def uncached_greedy(model: Transformer, src: torch.Tensor, max_len: int) -> list[int]:
    """Greedy by re-running the whole prefix each step (no cache), one sentence."""
    prefix = [BOS]
    with torch.no_grad():
        for step in range(max_len + 1):
            logits = model(src[None], torch.tensor([prefix]))[0, -1].clone()
            logits[[PAD, BOS]] = -math.inf
            if step == 0:
                logits[EOS] = -math.inf
            if step == max_len:
                return prefix[1:]
            token = int(logits.argmax())
            if token == EOS:
                return prefix[1:]
            prefix.append(token)
    raise AssertionError("unreachable")


def test_beam_one_is_greedy():
    model = make_transformer()
    src = random_sources(2, [5, 9, 3, 7, 6, 2])
    limits = dict(max_len_a=1.0, max_len_b=3)
    greedy = greedy_search(model, src, **IDS, **limits)
    assert beam_search(model, src, **IDS, beam=1, lenpen=1.0, **limits) == greedy
    widths = max_lengths(src, pad_id=PAD, **limits).tolist()
    assert greedy == [uncached_greedy(model, src[i][src[i] != PAD], widths[i]) for i in range(len(src))]
    assert len({len(y) for y in greedy}) > 1, "toy setup should give outputs of varied lengths"
    # The general beam machinery with one beam is greedy too (exactly so for lenpen <= 0).
    with torch.inference_mode():
        tokens, lengths, _ = beam_module._beam(
            model, src, max_lengths(src, pad_id=PAD, **limits), beam_module._SpecialIds(BOS, EOS, PAD), 1, 0.0
        )
    assert [tokens[i, : lengths[i]].tolist() for i in range(len(src))] == greedy


@pytest.mark.parametrize("beam", [1, 4])
def test_batch_equals_one_by_one(beam):
    model = make_transformer(seed=3)
    src = random_sources(4, [6, 2, 9, 4, 7])
    settings_ = dict(beam=beam, lenpen=1.0, max_len_a=1.2, max_len_b=2)
    batched = search(model, src, **IDS, **settings_)
    for i, hyp in enumerate(batched):
        [alone] = search(model, src[i : i + 1, : int((src[i] != PAD).sum())], **IDS, **settings_)
        assert alone.tokens == hyp.tokens
        assert alone.score == pytest.approx(hyp.score, abs=1e-9)


def reference_beam(model: Transformer, src: torch.Tensor, max_len: int, beam: int, lenpen: float) -> tuple[list[int], float]:
    """The module docstring's beam search for one sentence, spelled out: no cache (full forward
    per prefix), the whole vocabulary ranked by a Python sort."""
    def next_log_probs(prefix: list[int], step: int) -> torch.Tensor:
        with torch.no_grad():
            lprobs = F.log_softmax(model(src[None], torch.tensor([[BOS, *prefix]]))[0, -1], dim=-1)
        lprobs[[PAD, BOS]] = -math.inf
        if step == 0:
            lprobs[EOS] = -math.inf
        if step == max_len:
            lprobs[torch.arange(VOCAB) != EOS] = -math.inf
        return lprobs

    live, best, best_score = [([], 0.0)], [], -math.inf
    for step in range(max_len + 1):
        extensions = sorted(
            ((raw + float(lp), prefix, token) for prefix, raw in live
             for token, lp in enumerate(next_log_probs(prefix, step))),
            key=lambda e: -e[0],
        )[: 2 * beam]
        for raw, prefix, token in extensions[:beam]:
            if token == EOS and raw > -math.inf and raw / (step + 1) ** lenpen > best_score:
                best, best_score = prefix, raw / (step + 1) ** lenpen
        live = [(prefix + [token], raw) for raw, prefix, token in extensions if token != EOS][:beam]
        bound = max(raw for _, raw in live) / max((step + 2) ** lenpen, (max_len + 1) ** lenpen)
        if step == max_len or best_score >= bound:
            return best, best_score
    raise AssertionError("unreachable")


@pytest.mark.parametrize("beam, lenpen", [(2, 1.0), (2, 0.5), (3, 0.5), (4, 1.0)])
def test_beam_equals_uncached_reference(beam, lenpen):
    """Batched, cached search (sentences finishing at different steps, each beam ranking only its
    own best 2 * beam tokens) finds what the plain reference finds."""
    model = make_transformer(seed=7)
    with torch.no_grad():  # lean the output towards eos, so that outputs end before their limits too
        eos = model.embed.weight[EOS]
        model.decoder_norm.bias += 1.75 * eos / eos.norm()
    src = random_sources(8, [6, 2, 9, 4])
    limits = max_lengths(src, pad_id=PAD, max_len_a=1.0, max_len_b=1).tolist()
    hyps = search(model, src, **IDS, beam=beam, lenpen=lenpen, max_len_a=1.0, max_len_b=1)
    for i, hyp in enumerate(hyps):
        tokens, score = reference_beam(model, src[i][src[i] != PAD], limits[i], beam, lenpen)
        assert hyp.tokens == tokens
        assert hyp.score == pytest.approx(score, abs=1e-9)


def test_search_uses_eval_mode_and_restores_training_mode():
    model = make_transformer(seed=5, dropout=0.5).train()
    src = random_sources(6, [5, 8])
    first = beam_search(model, src, **IDS, beam=3, max_len_a=0, max_len_b=6)
    assert model.training
    assert beam_search(model, src, **IDS, beam=3, max_len_a=0, max_len_b=6) == first  # no dropout
    assert all(1 <= len(y) <= 6 for y in first)


def test_bad_arguments():
    model = make_transformer()
    src = random_sources(0, [3])
    with pytest.raises(ValueError, match="beam"):
        search(model, src, **IDS, beam=0)
    with pytest.raises(ValueError, match="max_len_cap"):
        search(model, src, **IDS, max_len_cap=0)
    with pytest.raises(ValueError, match="eos"):
        search(model, src, **IDS, banned=[EOS])
