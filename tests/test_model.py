"""The Transformer: shapes, causality, source padding invariance, no key bias (and why), every
parameter trained, the loss (label smoothing, padding). Cached incremental decoding against the full
forward pass is in test_beam.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polycats.model.transformer import (
    Attention,
    Dropout,
    Transformer,
    TransformerShape,
    sinusoidal_positions,
    token_losses,
)

PAD, BOS, EOS = 0, 2, 3
VOCAB = 37


def make_model(seed: int = 0, dropout: float = 0.0, **shape) -> Transformer:
    torch.manual_seed(seed)
    values = {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "heads": 4,
              "ffn_dim": 64, "dropout": dropout, "max_positions": 64, "pad_id": PAD}
    model = Transformer(TransformerShape(**{**values, **shape}))
    return model.eval()


def tokens(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(4, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_output_shapes():
    model = make_model()
    src, tgt = tokens(0, (3, 7)), tokens(1, (3, 5))
    logits = model(src, tgt)
    assert logits.shape == (3, 5, VOCAB)
    memory, mask = model.encode(src)
    assert memory.shape == (3, 7, 32) and mask.shape == (3, 1, 1, 7) and mask.dtype == torch.bool
    assert torch.isfinite(logits).all()


def test_output_projection_is_tied_and_pad_embedding_is_zero():
    model = make_model()
    assert model.embed.weight[PAD].abs().sum() == 0
    assert sum(p.shape == (VOCAB, 32) for p in model.parameters()) == 1


@pytest.mark.parametrize("position", [0, 2, 5])
def test_causal_mask(position):
    model = make_model()
    src, tgt = tokens(0, (2, 6)), tokens(1, (2, 6))
    changed = tgt.clone()
    changed[:, position] = (changed[:, position] + 1 - 4) % (VOCAB - 4) + 4
    with torch.no_grad():
        a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :position], b[:, :position])
    assert not torch.allclose(a[:, position:], b[:, position:])


def test_target_right_padding_does_not_change_real_positions():
    model = make_model()
    src, tgt = tokens(0, (1, 6)), tokens(1, (1, 4))
    padded = torch.cat([tgt, torch.full((1, 3), PAD)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(src, padded)[:, :4], model(src, tgt))


def test_source_padding_does_not_change_outputs():
    model = make_model()
    short, long = tokens(0, (1, 4)), tokens(1, (1, 9))
    tgt = tokens(2, (2, 5))
    batch = torch.full((2, 9), PAD)
    batch[0, :4], batch[1] = short[0], long[0]
    with torch.no_grad():
        together = model(batch, tgt)
        alone = model(short, tgt[:1])
        extra_padding = model(torch.cat([short, torch.full((1, 20), PAD)], dim=1), tgt[:1])
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(extra_padding, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1:], model(long, tgt[1:]), atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training_mode():
    model = make_model(dropout=0.3)
    src, tgt = tokens(0, (2, 6)), tokens(1, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), model(src, tgt))
        model.train()
        assert not torch.allclose(model(src, tgt), model(src, tgt))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_drops_at_its_rate_and_keeps_the_expectation(p):
    dropout = Dropout(p).train()
    x = torch.ones(1_000_003)  # not a multiple of 4: the last 64-bit draw is cut
    torch.manual_seed(0)
    y = dropout(x)
    kept = y != 0
    rounded = round(p * 65536) / 65536
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - rounded)))
    # Each of the four 16-bit pieces of a draw is uniform (a biased bit, e.g. an int64 draw's
    # always-zero sign bit, would show in one of them): 5 standard deviations.
    for piece in range(4):
        rate = kept[piece::4].double().mean()
        assert abs(rate - (1 - rounded)) < 5 * math.sqrt(rounded * (1 - rounded) / kept[piece::4].numel())
    assert abs(float(y.double().mean()) - 1) < 5 * math.sqrt(rounded / (1 - rounded) / x.numel())


def test_dropout_gradient_is_the_forward_mask_and_follows_the_seed():
    dropout = Dropout(0.3).train()
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach() / x.detach())
    torch.manual_seed(1)
    torch.testing.assert_close(dropout(x), y)
    assert dropout.eval()(x) is x and Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_too_long_sequence_is_a_clear_error():
    model = make_model(max_positions=8)
    with pytest.raises(ValueError, match="max_positions"):
        model(tokens(0, (1, 9)), tokens(1, (1, 3)))


def test_sinusoidal_positions():
    table = sinusoidal_positions(5, 6)
    assert table.shape == (5, 6)
    assert table[0].tolist() == [0, 1, 0, 1, 0, 1]
    assert table[3, 2] == pytest.approx(math.sin(3 / 10000 ** (2 / 6)), abs=1e-6)
    assert table[3, 3] == pytest.approx(math.cos(3 / 10000 ** (2 / 6)), abs=1e-6)


def test_cached_decode_of_several_tokens_at_once():
    model = make_model()
    src, tgt = tokens(0, (2, 5)), tokens(1, (2, 6))
    with torch.no_grad():
        full = model(src, tgt)
        cache = model.start_cache(*model.encode(src))
        first = model.decode(tgt[:, :2], cache)
        rest = model.decode(tgt[:, 2:], cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ no key bias

ATTENTION_CASES = ["self, padding mask", "self, causal", "cross, padding mask", "cached decode"]


def attention_case(case: str, dtype: torch.dtype):
    """An attention module and its inputs as the model calls it: (query, memory, mask, causal)."""
    torch.manual_seed(0)
    attention = Attention(16, heads=4, dropout=0.0).to(dtype)
    query = torch.randn(3, 6, 16, dtype=dtype)
    memory = query if case.startswith("self") else torch.randn(3, 9, 16, dtype=dtype)
    mask, causal = None, False
    if case.endswith("padding mask"):
        lengths = torch.tensor([memory.shape[1], 4, 1])  # every row keeps at least one key
        mask = (torch.arange(memory.shape[1]) < lengths[:, None])[:, None, None, :]
    elif case == "self, causal":
        causal = True
    else:  # two new positions after seven cached ones: position i sees the past and new <= i
        query, memory = query[:, :2], torch.randn(3, 9, 16, dtype=dtype)
        mask = torch.ones(2, 9, dtype=torch.bool).tril(7)
    return attention, query, memory, mask, causal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_a_key_bias_does_not_change_attention(case, dtype):
    """Why the key projection has no bias: a bias ``b`` adds ``q . b`` to every logit of a query
    row, and softmax over the keys is invariant to that, whatever the mask, so its gradient is zero
    and what an optimiser stores for it is round-off. A vector that differs between keys does
    change the output (the check can fail)."""
    attention, query, memory, mask, causal = attention_case(case, dtype)
    assert attention.k_proj.bias is None
    keys = attention.k_proj(memory)
    values = attention.split_heads(attention.v_proj(memory))
    bias = 3 * torch.randn(16, dtype=dtype)

    def attend(keys):
        with torch.no_grad():
            return attention(query, attention.split_heads(keys), values, mask=mask, causal=causal)

    plain = attend(keys)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(attend(keys + bias), plain, **tolerance)
    assert not torch.allclose(attend(keys + 0.1 * torch.randn_like(keys)), plain, **tolerance)


def test_a_key_bias_does_not_change_the_model():
    """The same through the whole model: encoder self-attention with source padding, causal
    decoder self-attention, cross-attention, cached decoding in two pieces."""
    model = make_model().double()
    src, tgt = tokens(0, (3, 7)), tokens(1, (3, 6))
    src[1, 4:], src[2, 2:], tgt[2, 4:] = PAD, PAD, PAD

    def outputs():
        with torch.no_grad():
            cache = model.start_cache(*model.encode(src))
            return model(src, tgt), torch.cat([model.decode(tgt[:, :3], cache), model.decode(tgt[:, 3:], cache)], 1)

    plain = outputs()
    generator = torch.Generator().manual_seed(1)
    hooks = [module.k_proj.register_forward_hook(
                 lambda module, inputs, output, b=torch.randn(32, generator=generator, dtype=torch.float64): output + b)
             for module in model.modules() if isinstance(module, Attention)]
    try:
        biased = outputs()
    finally:
        for hook in hooks:
            hook.remove()
    for a, b in zip(biased, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_checkpoints_with_a_key_bias_still_load():
    """Models saved before the key bias was dropped load (the bias is dropped: it had no effect)."""
    model = make_model()
    state = model.state_dict()
    names = [f"{name}.k_proj.bias" for name, module in model.named_modules() if isinstance(module, Attention)]
    assert len(names) == 6
    old = {**state, **{name: torch.randn(32) for name in names}}
    other = make_model(seed=1)
    other.load_state_dict(old)
    src, tgt = tokens(0, (2, 5)), tokens(1, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(other(src, tgt), model(src, tgt))
    assert names[0] not in other.state_dict()


def test_every_parameter_gets_a_gradient_in_float64():
    """No parameter is dead weight whose gradient is only round-off, as the key bias's was (2e-19
    to 4e-18 of the model's gradient norm here). The embedding's padding row is the one exception
    inside a tensor (``padding_idx``) and is not checked."""
    model = make_model().double().train()
    src, tgt = tokens(0, (4, 7)), tokens(1, (4, 6))
    src[1, 4:], tgt[2, 3:] = PAD, PAD
    logits = model(src, tgt[:, :-1])
    F.cross_entropy(logits.reshape(-1, VOCAB), tgt[:, 1:].reshape(-1), ignore_index=PAD).backward()
    total = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    relative = {name: float(p.grad.norm() / total) for name, p in model.named_parameters()}
    assert not {name: r for name, r in relative.items() if r < 1e-8}, relative


# ------------------------------------------------------------------------------ token_losses

def test_token_losses_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 1.0, -1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 3.0, 0.0, 0.0]]])
    target = torch.tensor([[2, 3, 0]])  # the last position is padding (pad id 0)
    eps = 0.1
    loss, nll = token_losses(logits, target, pad_id=0, label_smoothing=eps)
    expected_loss, expected_nll = [], []
    for row, t in zip(logits[0].tolist(), target[0].tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        if t == 0:
            expected_loss.append(0.0)
            expected_nll.append(0.0)
            continue
        expected_nll.append(-log_p[t])
        # (1 - eps) * NLL + eps * mean over the vocabulary of -log p (torch's label smoothing)
        expected_loss.append((1 - eps) * -log_p[t] + eps * sum(-v for v in log_p) / len(row))
    torch.testing.assert_close(nll[0], torch.tensor(expected_nll))
    torch.testing.assert_close(loss[0], torch.tensor(expected_loss))
    assert nll[0, 1].item() == pytest.approx(math.log(4))  # uniform logits


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_token_losses_match_torch_cross_entropy(eps):
    logits = torch.randn(3, 5, VOCAB, generator=torch.Generator().manual_seed(0))
    target = tokens(1, (3, 5))
    target[0, 3:] = PAD
    target[2, 1:] = PAD
    loss, nll = token_losses(logits, target, PAD, eps)
    reference = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=PAD,
                                label_smoothing=eps, reduction="none").view_as(target)
    torch.testing.assert_close(loss, reference)
    assert loss.shape == nll.shape == target.shape
    assert (loss[target == PAD] == 0).all() and (nll[target == PAD] == 0).all()
    assert (nll[target != PAD] > 0).all()


def test_no_gradient_from_padding():
    logits = torch.randn(2, 4, VOCAB, requires_grad=True)
    target = tokens(0, (2, 4))
    target[1, 2:] = PAD
    loss, _ = token_losses(logits, target, PAD, 0.1)
    loss.sum().backward()
    assert logits.grad[1, 2:].abs().sum() == 0
    assert logits.grad[0].abs().sum() > 0


def test_loss_is_computed_in_float32():
    logits = torch.randn(1, 3, VOCAB).to(torch.bfloat16)
    loss, nll = token_losses(logits, tokens(0, (1, 3)), PAD, 0.1)
    assert loss.dtype == nll.dtype == torch.float32


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_losses_skip_padding_and_equal_the_full_computation(smoothing):
    """model.losses projects only target tokens; values and gradients equal token_losses on the
    full logits (double precision: any difference would be the skipped rows leaking in)."""
    model = make_model().double()
    src, tgt_in, tgt_out = tokens(0, (4, 6)), tokens(1, (4, 5)), tokens(2, (4, 5))
    tgt_out[1, 3:] = PAD
    tgt_out[3, 1:] = PAD
    full_loss, full_nll = token_losses(model(src, tgt_in), tgt_out, PAD, smoothing)
    full_grads = torch.autograd.grad(full_loss.sum(), list(model.parameters()))
    loss, nll = model.losses(src, tgt_in, tgt_out, smoothing)
    grads = torch.autograd.grad(loss.sum(), list(model.parameters()))
    assert loss.shape == nll.shape == tgt_out.shape and bool((loss[tgt_out == PAD] == 0).all())
    torch.testing.assert_close(loss, full_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nll, full_nll, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
