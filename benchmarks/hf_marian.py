"""Our Transformer vs Hugging Face's MarianMTModel of the same size, on CPU.

Both models are built from the demo preset's ``model`` section (random init, nothing downloaded)
and take turns in one process on identical inputs, so other load on the machine slows both alike;
every ratio is the median of per-batch ratios.

- ``throughput_rows``: training updates (forward, label-smoothed loss, backward, clipping, Adam)
  on the demo preset's own token-budget batches; target tokens per second.
- ``beam_rows``: decoding demo test sentences with our ``polycats.evaluate.beam.search`` and with
  HF ``generate`` at the same beam size, length penalty, stopping rule and length limit.

Outputs cannot be compared token for token: Marian is a post-norm Transformer (LayerNorm after
each residual, no final encoder/decoder norm) and ``MarianConfig`` has no pre-norm option, while
ours is pre-norm, so no weight copy makes the two compute the same function. The decoding rows
report each model's decoder steps per sentence instead, so one can see both did the same amount of work.

``--quick`` checks the harness only: ``tiny.py``'s toy model on synthetic data.

    python benchmarks/hf_marian.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time

import torch

import tiny

PRESET = "demo"


@functools.cache
def demo_data(overrides: tuple[str, ...] = ()):
    """The demo preset's config, with ``--set`` overrides, and its prepared data (a cache hit after
    ``polycats prepare``)."""
    from polycats.config import load_config, preset_path
    from polycats.data.prepare import prepare

    config = load_config(preset_path(PRESET), list(overrides))
    return config, prepare(config.data)


def models(config, vocab_size: int):
    """Ours and a MarianMTModel of the same dimensions, embeddings shared by encoder input,
    decoder input and output projection in both."""
    from transformers import MarianConfig, MarianMTModel

    from polycats.data.prepare import BOS, EOS, PAD
    from polycats.run.build import build_model

    torch.manual_seed(0)
    ours = build_model(config, vocab_size)
    m, shape = config.model, ours.shape
    marian = MarianMTModel(MarianConfig(
        vocab_size=vocab_size, d_model=m.d_model, encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers,
        encoder_attention_heads=m.heads, decoder_attention_heads=m.heads, encoder_ffn_dim=m.ffn_dim,
        decoder_ffn_dim=m.ffn_dim, activation_function="relu", dropout=m.dropout,
        attention_dropout=m.attention_dropout, activation_dropout=m.dropout,  # ours drops after the FFN's relu too
        scale_embedding=True, max_position_embeddings=shape.max_positions, share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS, forced_eos_token_id=None,
        decoder_start_token_id=BOS, attn_implementation="sdpa",
    ))
    return ours, marian


def parameters(model: torch.nn.Module) -> int:
    """Trained parameters (Marian's sinusoidal position tables are frozen parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def use_all_cores() -> int:
    """Both models at their best setting: one torch thread per core."""
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def interleaved(steps: dict[str, callable], inputs: list, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per input of each step function, alternating the functions (and which goes first)
    on each input; the first ``warmup`` inputs are run but not timed."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for index, item in enumerate(inputs):
        for repeat in range(repeats):
            order = list(steps) if (index + repeat) % 2 == 0 else list(reversed(steps))
            for name in order:
                started = time.perf_counter()
                steps[name](item)
                if index >= warmup:
                    seconds[name].append(time.perf_counter() - started)
    return seconds


def ratio(seconds: dict[str, list[float]]) -> float:
    """How many times faster ours is: median over inputs of HF seconds / our seconds."""
    return statistics.median(hf / ours for ours, hf in zip(seconds["ours"], seconds["HF"]))


def throughput_rows(quick: bool) -> list[dict]:
    if quick:
        return training_rows(updates=2, warmup=1, overrides=tuple(tiny.OVERRIDES))
    return training_rows(updates=30, warmup=3)


def training_rows(updates: int, warmup: int, overrides: tuple[str, ...] = ()) -> list[dict]:
    from polycats.data.batching import BatchStream
    from polycats.data.prepare import PAD
    from polycats.data.sampling import SamplingSchedule
    from polycats.model.transformer import token_losses

    threads = use_all_cores()
    config, data = demo_data(overrides)
    t = config.train
    train = data.split("train")
    stream = BatchStream(train, SamplingSchedule.from_config(config.sampling, data.task_table).at(0), t.max_tokens, t.seed)
    batches = [stream.next() for _ in range(warmup + updates)]
    ours, marian = models(config, data.vocab_size)

    def trainer(losses, model: torch.nn.Module):
        """One update with the trainer's loss, clipping and optimiser; ``losses`` gives token losses."""
        optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, betas=t.adam_betas)
        model.train()

        def step(batch) -> None:
            optimizer.zero_grad(set_to_none=True)
            (losses(batch).sum() / batch.target_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
            optimizer.step()
        return step

    def on_logits(logits, batch):
        return token_losses(logits, batch.tgt_out, PAD, t.label_smoothing)[0]

    # Two copies of our model: "ours" is the trainer's path (vocabulary projection at target tokens
    # only); "ours, all positions" projects padding too, as HF does — their ratio is that optimisation's.
    ours_all_positions = copy.deepcopy(ours)
    steps = {
        "ours": trainer(lambda b: ours.losses(b.src, b.tgt_in, b.tgt_out, t.label_smoothing)[0], ours),
        "ours, all positions": trainer(lambda b: on_logits(ours_all_positions(b.src, b.tgt_in), b), ours_all_positions),
        "HF": trainer(lambda b: on_logits(
            marian(input_ids=b.src, attention_mask=b.src != PAD, decoder_input_ids=b.tgt_in).logits, b), marian),
    }
    seconds = interleaved(steps, batches, repeats=1, warmup=warmup)
    tokens = sum(b.target_tokens for b in batches[warmup:])
    padding = 1 - sum(b.target_tokens for b in batches) / sum(b.tgt_out.numel() for b in batches)
    m = config.model
    return [{
        "benchmark": f"train d{m.d_model} L{m.encoder_layers}+{m.decoder_layers} H{m.heads} F{m.ffn_dim} V{data.vocab_size}, "
                     f"{updates} demo batches of {t.max_tokens} tokens",
        "threads": threads,
        "norm (ours / HF)": "pre / post",
        "ours params": parameters(ours),
        "HF params": parameters(marian),
        "ours tok/s": tokens / sum(seconds["ours"]),
        "HF tok/s": tokens / sum(seconds["HF"]),
        "ratio": ratio(seconds),
        "padding": padding,
        "target-only projection speed-up": statistics.median(
            full / only for only, full in zip(seconds["ours"], seconds["ours, all positions"])),
    }]


def source_batches(data, sentences: int, batch_size: int) -> list[torch.Tensor]:
    """The first test sentences of every task, length-sorted and cut into right-padded batches."""
    from polycats.data.batching import collate

    test = data.split("test")
    per_task = -(-sentences // len(test))
    sources = sorted((s for arrays in test.values() for s in arrays.src[:per_task]), key=len)[:sentences]
    # collate wants targets; one-token dummies, as in polycats.evaluate.run.translate_lines.
    return [collate(chunk, [s[:1] for s in chunk], [0] * len(chunk)).src
            for chunk in (sources[start : start + batch_size] for start in range(0, len(sources), batch_size))]


def beam_rows(quick: bool) -> list[dict]:
    if quick:
        return decoding_rows(sentences=10, max_len=12, repeats=1, batch_size=10, overrides=tuple(tiny.OVERRIDES))
    return decoding_rows(sentences=200, max_len=48, repeats=3, batch_size=demo_data()[0].eval.batch_size)


def decoding_rows(sentences: int, max_len: int, repeats: int, batch_size: int,
                  overrides: tuple[str, ...] = ()) -> list[dict]:
    from polycats.data.prepare import BOS, EOS, PAD
    from polycats.evaluate.beam import search

    threads = use_all_cores()
    config, data = demo_data(overrides)
    ours, marian = models(config, data.vocab_size)
    marian.eval()  # generate() leaves the mode alone; our search sets eval itself
    batches = source_batches(data, sentences, batch_size)
    lenpen = config.eval.lenpen
    rows = []
    for beam in (1, 4):
        # Decoder steps per sentence: tokens plus eos (ours forces eos at the limit, HF stops there).
        steps: dict[str, list[int]] = {"ours": [], "HF": []}

        def ours_step(src: torch.Tensor) -> None:
            hyps = search(ours, src, bos_id=BOS, eos_id=EOS, pad_id=PAD, beam=beam, lenpen=lenpen,
                          max_len_a=0, max_len_b=max_len)
            steps["ours"] += [len(h.tokens) + 1 for h in hyps]

        def hf_step(src: torch.Tensor) -> None:
            # Our limit counts tokens before eos, HF's max_new_tokens counts eos too; "never" is
            # HF's exact stopping rule, the one our search uses.
            stopping = {"early_stopping": "never"} if beam > 1 else {}
            out = marian.generate(input_ids=src, attention_mask=src != PAD, num_beams=beam, do_sample=False,
                                  max_new_tokens=max_len + 1, length_penalty=lenpen, **stopping)
            steps["HF"] += (out[:, 1:] != PAD).sum(1).tolist()

        # The first batch runs once more, untimed, to warm both up (allocator, kernel selection).
        seconds = interleaved({"ours": ours_step, "HF": hf_step}, batches[:1] + batches, repeats, warmup=1)
        rows.append({
            "benchmark": f"{'greedy' if beam == 1 else f'beam {beam}'}, {sentences} test sentences in batches of "
                         f"{batch_size}, max {max_len} tokens, lenpen {lenpen}",
            "threads": threads,
            "ours sent/s": sentences * repeats / sum(seconds["ours"]),
            "HF sent/s": sentences * repeats / sum(seconds["HF"]),
            "ratio": ratio(seconds),
            "ours steps/sent": statistics.mean(steps["ours"][-sentences * repeats:]),
            "HF steps/sent": statistics.mean(steps["HF"][-sentences * repeats:]),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["train", "beam"])
    args = parser.parse_args()
    from benchmarks_table import print_rows

    if args.only != "beam":
        print_rows("Training throughput vs HF Marian", throughput_rows(args.quick))
    if args.only != "train":
        print_rows("Decoding vs HF Marian", beam_rows(args.quick))


if __name__ == "__main__":
    main()
