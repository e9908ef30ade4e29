"""`--quick` sizes: ``--set`` overrides that shrink the demo preset to a toy run.

Quick mode only checks the harness (the test suite runs it in CI on a fresh machine with an empty
data cache and 2 cores), so its data must cost no tokenizer training to speak of and its model no
real training: the synthetic source, a few hundred pairs, a d_model 16 model with one encoder
and one decoder layer. Full mode never reads this module's settings.
"""

from __future__ import annotations

# Everything but the languages, so that a benchmark choosing its own languages (the K sweep) can
# still use the rest: later overrides win, and these come after a method's options.
SETTINGS = [
    "data.source=synthetic",
    "data.synthetic={words: 12, min_words: 3, max_words: 6}",
    "data.valid_per_lang=20",
    "data.test_per_lang=20",
    "data.vocab_size=80",
    "model={d_model: 16, encoder_layers: 1, decoder_layers: 1, heads: 2, ffn_dim: 32, dropout: 0.1}",
    "train.max_tokens=256",
]
# One torch thread: a d_model 16 model gains nothing from two, and two threads on a busy 2-core
# machine spin-wait on each other (the peer benchmark measured 10-20x slower with two).
THREADS = 1
HIRES_PAIRS, LORES_PAIRS = 200, 40
# The demo preset's four languages and its HiRes/LoRes split, at toy sizes.
OVERRIDES = [*SETTINGS, f"data.languages={{de: {HIRES_PAIRS}, fr: {HIRES_PAIRS}, sw: {LORES_PAIRS}, tl: {LORES_PAIRS}}}"]
