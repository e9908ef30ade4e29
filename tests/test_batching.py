"""Sampling probabilities and the training batch stream: token budget, task ids, task frequencies,
determinism, exact resume, per-task sub-batches; fixed (validation) batches cover every sentence once."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polycats.data.batching import Batch, BatchStream, collate, fixed_batches
from polycats.data.sampling import sampling_probabilities
from polycats.data.prepare import BOS, EOS, PAD, TaskArrays

# ------------------------------------------------------------------------------ probabilities


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=10**7), min_size=1, max_size=8),
    temperature=st.sampled_from([1.0, 5.0, 100.0]),
)
def test_sampling_probabilities_follow_the_formula(sizes, temperature):
    named = {f"t{i}-en": n for i, n in enumerate(sizes)}
    p = sampling_probabilities(named, temperature)
    expected = np.array(sizes, dtype=float) ** (1 / temperature)
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-9)
    assert p.sum() == pytest.approx(1.0)
    # Larger tasks are never sampled less; a higher temperature flattens towards uniform.
    order = np.argsort(sizes, kind="stable")
    assert np.all(np.diff(p[order]) >= -1e-15)
    flatter = sampling_probabilities(named, temperature * 2)
    assert flatter.max() <= p.max() + 1e-12 and flatter.min() >= p.min() - 1e-12


def test_sampling_probabilities_known_values():
    sizes = {"de-en": 8000, "sw-en": 500}
    np.testing.assert_allclose(sampling_probabilities(sizes, 1.0), [8000 / 8500, 500 / 8500])
    r = (8000 / 500) ** (1 / 5)
    np.testing.assert_allclose(sampling_probabilities(sizes, 5.0), [r / (r + 1), 1 / (r + 1)])
    assert abs(sampling_probabilities(sizes, 100.0)[0] - 0.5) < 0.01


@settings(deadline=None)
@given(
    weights=st.lists(st.floats(min_value=0.01, max_value=100), min_size=1, max_size=6),
    temperature=st.sampled_from([1.0, 5.0, 100.0]),
)
def test_explicit_weights_override_the_formula(weights, temperature):
    names = [f"t{i}-en" for i in range(len(weights))]
    sizes = {name: 10 ** (i + 1) for i, name in enumerate(names)}
    p = sampling_probabilities(sizes, temperature, dict(zip(reversed(names), reversed(weights))))
    np.testing.assert_allclose(p, np.array(weights) / sum(weights))


# ------------------------------------------------------------------------------ fixtures

def make_data(sizes: dict[str, int], seed: int = 0, max_len: int = 14) -> dict[str, TaskArrays]:
    """Each sentence is recognisable: source = [tag, id, id, ..., eos], target = [id, ..., eos] with
    id = 1000 * (task + 1) + sentence index."""
    rng = np.random.default_rng(seed)
    data = {}
    for t, (task, size) in enumerate(sizes.items()):
        src, tgt = [], []
        for i in range(size):
            ident = 1000 * (t + 1) + i
            src.append(np.array([5 + t] + [ident] * int(rng.integers(1, max_len)) + [EOS], dtype=np.int32))
            tgt.append(np.array([ident] * int(rng.integers(1, max_len)) + [EOS], dtype=np.int32))
        data[task] = TaskArrays(src, tgt)
    return data


def identify(batch: Batch, data: dict[str, TaskArrays]) -> list[tuple[int, int]]:
    """(task, sentence) of each row, checking the row holds exactly that sentence."""
    arrays = list(data.values())
    rows = []
    for r in range(batch.src.shape[0]):
        task = int(batch.task[r])
        sentence = int(batch.src[r, 1]) - 1000 * (task + 1)
        assert int(batch.src[r, 0]) == 5 + task, "the row's task id matches its tokens"
        src, tgt = arrays[task].src[sentence], arrays[task].tgt[sentence]
        assert batch.src[r, : len(src)].tolist() == src.tolist() and (batch.src[r, len(src):] == PAD).all()
        assert batch.tgt_out[r, : len(tgt)].tolist() == tgt.tolist() and (batch.tgt_out[r, len(tgt):] == PAD).all()
        assert batch.tgt_in[r, : len(tgt)].tolist() == [BOS, *tgt[:-1].tolist()]
        assert (batch.tgt_in[r, len(tgt):] == PAD).all()
        rows.append((task, sentence))
    return rows


def padded_size(batch: Batch) -> int:
    return batch.src.shape[0] * max(batch.src.shape[1], batch.tgt_out.shape[1])


def as_lists(batch: Batch) -> tuple:
    return batch.src.tolist(), batch.tgt_in.tolist(), batch.tgt_out.tolist(), batch.task.tolist()


SIZES = {"de-en": 300, "fr-en": 120, "sw-en": 15}


@pytest.fixture(scope="module")
def data():
    return make_data(SIZES)


def stream_for(data, temperature=1.0, max_tokens=96, seed=3) -> BatchStream:
    probabilities = sampling_probabilities({t: len(a) for t, a in data.items()}, temperature)
    return BatchStream(data, probabilities, max_tokens, seed)


# ------------------------------------------------------------------------------ BatchStream

def test_batches_fit_the_budget_and_rows_are_right(data):
    stream = stream_for(data)
    for _ in range(300):
        batch = stream.next()
        identify(batch, data)
        assert padded_size(batch) <= 96
        assert batch.target_tokens == int((batch.tgt_out != PAD).sum()) > 0


def test_a_sentence_over_the_budget_comes_alone():
    data = make_data({"de-en": 40, "sw-en": 5}, max_len=6)
    long = np.array([1000] + [7] * 80 + [EOS], dtype=np.int32)
    data["de-en"].src[0], data["de-en"].tgt[0] = np.array([5, 1000] + [7] * 80 + [EOS], dtype=np.int32), long
    stream = BatchStream(data, np.array([0.5, 0.5]), max_tokens=32, seed=0)
    seen_long = 0
    for _ in range(200):
        batch = stream.next()
        if batch.src.shape[1] > 32:
            assert batch.src.shape[0] == 1
            seen_long += 1
        else:
            assert padded_size(batch) <= 32
    assert seen_long > 0


@pytest.mark.parametrize("temperature", [1.0, 5.0, 100.0])
def test_task_frequencies_match_the_probabilities(data, temperature):
    stream = stream_for(data, temperature, max_tokens=128)
    counts = np.zeros(len(data))
    while stream.chunk < 12:  # whole chunks: each sentence's task is an independent draw
        batch = stream.next()
        if stream.chunk < 12:
            counts += np.bincount(batch.task.numpy(), minlength=len(data))
    total = counts.sum()
    assert total > 3000
    p = stream.probabilities
    tolerance = 5 * np.sqrt(p * (1 - p) / total) + 1e-3
    np.testing.assert_array_less(np.abs(counts / total - p), tolerance)


def test_each_task_is_read_in_epochs_without_replacement(data):
    stream = stream_for(data, temperature=100.0)
    seen = {t: np.zeros(n, dtype=int) for t, n in enumerate(SIZES.values())}
    while stream.chunk < 6:
        batch = stream.next()
        if stream.chunk < 6:
            for task, sentence in identify(batch, data):
                seen[task][sentence] += 1
    for task, counts in seen.items():
        assert counts.max() - counts.min() <= 1, f"task {task}: every sentence once per epoch"
    assert seen[2].min() >= 2  # the small task went through several epochs


def test_deterministic_for_a_seed(data):
    a, b, c = stream_for(data, seed=11), stream_for(data, seed=11), stream_for(data, seed=12)
    first = [as_lists(a.next()) for _ in range(40)]
    assert first == [as_lists(b.next()) for _ in range(40)]
    assert first != [as_lists(c.next()) for _ in range(40)]


def batches_per_chunk(data) -> int:
    stream = stream_for(data)
    stream.next()
    return len(stream._batches)


@pytest.mark.parametrize("where", ["start", "mid_chunk", "chunk_end", "later_chunk"])
def test_state_dict_resumes_the_identical_sequence(data, where):
    per_chunk = batches_per_chunk(data)
    consumed = {"start": 0, "mid_chunk": per_chunk // 2, "chunk_end": per_chunk, "later_chunk": 2 * per_chunk + 3}[where]
    original = stream_for(data)
    for _ in range(consumed):
        original.next()
    state = original.state_dict()
    # The state survives a checkpoint round trip (plain ints, weights_only load).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    expected = [as_lists(original.next()) for _ in range(2 * per_chunk + 5)]  # crosses chunk boundaries
    resumed = stream_for(data, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert [as_lists(resumed.next()) for _ in range(len(expected))] == expected


def test_loading_state_into_a_used_stream(data):
    a = stream_for(data)
    for _ in range(7):
        a.next()
    state = a.state_dict()
    expected = [as_lists(a.next()) for _ in range(30)]
    b = stream_for(data)
    for _ in range(50):  # b has its own chunk cached; loading must discard it
        b.next()
    b.load_state_dict(state)
    assert [as_lists(b.next()) for _ in range(30)] == expected


def test_a_stage_change_draws_only_the_new_stages_tasks_and_resumes_exactly(data):
    """Two-stage sampling: task 0 only, then the mix, switching mid-chunk; a checkpoint taken
    before the switch (mid-chunk, so the resumed stream must rebuild the chunk it was in) or after
    it replays the same batches."""
    tasks = len(data)
    first = np.eye(tasks)[0]
    mix = sampling_probabilities({t: len(a) for t, a in data.items()}, 100.0)
    switch = batches_per_chunk(data) // 2

    def run(stream, start, count):
        seen = []
        for step in range(start, start + count):
            stream.set_probabilities(first if step < switch else mix)
            seen.append(as_lists(stream.next()))
        return seen

    original = BatchStream(data, first, 96, 3)
    states = {}
    batches = []
    for step in range(3 * switch + 4):
        states[step] = original.state_dict()
        batches += run(original, step, 1)
    assert all(set(batch[3]) == {0} for batch in batches[:switch])
    assert set().union(*(batch[3] for batch in batches[switch:])) == set(range(tasks))
    for step in (switch - 1, switch, switch + 1):
        resumed = BatchStream(data, first, 96, 999)
        resumed.load_state_dict(states[step])
        assert run(resumed, step, len(batches) - step) == batches[step:], step


def test_by_task_sub_batches_reassemble_the_batch(data):
    stream = stream_for(data, temperature=5.0)
    for _ in range(40):
        batch = stream.next()
        subs = batch.by_task(len(data))
        assert len(subs) == len(data)
        rows = []
        for task, sub in enumerate(subs):
            present = (batch.task == task).any().item()
            assert (sub is not None) == present
            if sub is None:
                continue
            assert (sub.task == task).all()
            assert sub.src.shape[1] == int((sub.src != PAD).sum(1).max())  # padding trimmed
            assert sub.tgt_out.shape[1] == int((sub.tgt_out != PAD).sum(1).max())
            rows += identify(sub, data)
        assert sorted(rows) == sorted(identify(batch, data))
        assert sum(sub.target_tokens for sub in subs if sub is not None) == batch.target_tokens


def test_collate_shapes():
    batch = collate([np.array([9, 8, EOS]), np.array([9, EOS])], [np.array([4, EOS]), np.array([4, 5, 6, EOS])], [1, 0])
    assert batch.src.tolist() == [[9, 8, EOS], [9, EOS, PAD]]
    assert batch.tgt_in.tolist() == [[BOS, 4, PAD, PAD], [BOS, 4, 5, 6]]
    assert batch.tgt_out.tolist() == [[4, EOS, PAD, PAD], [4, 5, 6, EOS]]
    assert batch.task.tolist() == [1, 0] and batch.target_tokens == 6


# ------------------------------------------------------------------------------ fixed_batches

@pytest.mark.parametrize("max_tokens", [16, 64, 500])
def test_fixed_batches_cover_every_sentence_once(data, max_tokens):
    batches = fixed_batches(data, max_tokens)
    rows = []
    for batch in batches:
        assert len(set(batch.task.tolist())) == 1, "one task per validation batch"
        assert padded_size(batch) <= max_tokens or batch.src.shape[0] == 1
        rows += identify(batch, data)
    assert sorted(rows) == sorted((t, i) for t, n in enumerate(SIZES.values()) for i in range(n))
    assert fixed_batches(data, max_tokens)[0].src.tolist() == batches[0].src.tolist()  # deterministic


def test_the_sampling_schedule_is_the_first_stage_then_the_mix():
    from polycats.config import SamplingConfig
    from polycats.data.sampling import SamplingSchedule, Task
    from polycats.errors import PolycatsError

    tasks = [Task("de-en", "de", "HiRes", 800), Task("fr-en", "fr", "MidRes", 400), Task("sw-en", "sw", "LoRes", 100)]
    one = SamplingSchedule.from_config(SamplingConfig(), tasks)
    assert one.first_stage is None and one.at(0) is one.at(10**6) is one.probabilities
    np.testing.assert_allclose(one.probabilities, [800 / 1300, 400 / 1300, 100 / 1300])
    two = SamplingSchedule.from_config(SamplingConfig(first_stage_updates=5, first_stage_languages=["fr", "sw"]), tasks)
    np.testing.assert_allclose(two.at(4), [0.0, 0.8, 0.2])
    assert two.at(5) is two.probabilities
    weighted = SamplingSchedule.from_config(SamplingConfig(weights={"de": 1.0, "fr": 0.0, "sw": 3.0}), tasks)
    np.testing.assert_allclose(weighted.probabilities, [0.25, 0.0, 0.75])
    with pytest.raises(PolycatsError, match="sampling.weights has no weight for fr, sw"):
        SamplingSchedule.from_config(SamplingConfig(weights={"de": 1.0}), tasks)
