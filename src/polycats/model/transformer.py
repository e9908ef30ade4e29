"""A pre-norm Transformer encoder-decoder for translation, in one file.

Read top to bottom: attention, feed-forward, encoder layer, decoder layer, the model.
Embeddings are shared between encoder input, decoder input and the output projection (one joint
SentencePiece vocabulary). The target-language tag ``<2xx>`` is the first source token, so one
model serves many-to-one, one-to-many and many-to-many directions.

Decoding uses a key/value cache (``DecoderCache``) so each new token costs one position, not the
whole prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TransformerShape:
    vocab_size: int
    d_model: int = 192
    encoder_layers: int = 3
    decoder_layers: int = 3
    heads: int = 4
    ffn_dim: int = 768
    dropout: float = 0.1
    # Attention-weight dropout; 0 (fairseq's default) lets CPU SDPA use its fused kernel.
    attention_dropout: float = 0.0
    max_positions: int = 4096
    pad_id: int = 0


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class Dropout(nn.Module):
    """Inverted dropout like ``nn.Dropout``, with a CPU mask at a sixth of its cost.

    ``nn.Dropout`` on CPU draws its mask with ``bernoulli_``: 12.5 ms for a 2048 x 512 activation
    on two cores, 18% of a demo training step (torch.profiler). Here one 64-bit draw from torch's
    generator (``random_`` over the whole int64 range, so every bit is uniform) gives four 16-bit
    uniforms, compared with a threshold: 1.9 ms. The drop probability is rounded to a multiple of
    2^-16 (0.1 -> 0.1000061) and the kept values are scaled by the rounded one, so the expectation
    is exact. Other devices keep ``F.dropout`` (their kernels are fused already).
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 65536) - 32768  # P(int16 uniform < threshold) = rounded p
        self.scale = 1 / (1 - round(p * 65536) / 65536)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        words = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= self.threshold
        return x * torch.where(keep, self.scale, 0.0).to(x.dtype)


class TiedProjection(nn.Module):
    """``F.linear(states, weight)`` as a module, so that hooks see the output projection (its
    weight belongs to the embeddings; see ``polycats.ops.task_split``)."""

    def forward(self, states: Tensor, weight: Tensor) -> Tensor:
        return F.linear(states, weight)


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        assert d_model % heads == 0, "d_model must be divisible by heads"
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        # No key bias: it adds q . b to every logit of a query row, which softmax ignores, so its
        # gradient is zero and training it only accumulates round-off (tests/test_model.py).
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.register_load_state_dict_pre_hook(self._drop_key_bias)

    @staticmethod
    def _drop_key_bias(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        """Checkpoints from before the key bias was dropped still load: the bias had no effect."""
        state_dict.pop(prefix + "k_proj.bias", None)

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

    def project_keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.k_proj(memory)), self.split_heads(self.v_proj(memory))

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor,
        mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        q = self.split_heads(self.q_proj(query))
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(shape.d_model)
        self.self_attn = Attention(shape.d_model, shape.heads, shape.attention_dropout)
        self.ffn_norm = nn.LayerNorm(shape.d_model)
        self.ffn = FeedForward(shape.d_model, shape.ffn_dim, shape.dropout)
        self.dropout = Dropout(shape.dropout)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        h = self.self_attn_norm(x)
        k, v = self.self_attn.project_keys_values(h)
        x = x + self.dropout(self.self_attn(h, k, v, mask=key_mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


@dataclass
class DecoderCache:
    """Per-layer keys/values: self-attention grows by one position per step; cross-attention
    keys/values of the encoder output are computed once.

    Decoder rows come in groups of equal size, one group per row of ``cross_kv``: rows
    ``i * group .. (i + 1) * group - 1`` read source sentence ``i`` (``group`` is the ratio of
    the row counts). Beam search keeps ``beam`` rows per sentence, so the sentence's keys/values
    are stored once, not copied for every beam and every step.
    """

    self_kv: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)
    cross_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    source_mask: Tensor | None = None
    length: int = 0
    group: int = 1

    def select(self, index: Tensor) -> DecoderCache:
        """Keep (and reorder) the decoder rows in ``index`` — used by beam search."""
        pick = lambda kv, rows: (kv[0].index_select(0, rows), kv[1].index_select(0, rows))  # noqa: E731
        sentence = torch.div(index, self.group, rounding_mode="floor")  # cross_kv row of each new row
        kept = sentence.unique()  # sorted
        group = index.numel() // kept.numel()
        if index.numel() == group * kept.numel() and torch.equal(sentence, kept.repeat_interleave(group)):
            # Each kept sentence still owns a block of `group` rows (beam reordering within a
            # sentence, finished sentences dropped): only dropped sentences leave cross_kv.
            cross_rows = None if kept.numel() == self.cross_kv[0][0].shape[0] else kept
        else:
            cross_rows, group = sentence, 1
        return DecoderCache(
            self_kv=[None if kv is None else pick(kv, index) for kv in self.self_kv],
            cross_kv=self.cross_kv if cross_rows is None else [pick(kv, cross_rows) for kv in self.cross_kv],
            source_mask=(self.source_mask if cross_rows is None or self.source_mask is None
                         else self.source_mask.index_select(0, cross_rows)),
            length=self.length,
            group=group,
        )


class DecoderLayer(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(shape.d_model)
        self.self_attn = Attention(shape.d_model, shape.heads, shape.attention_dropout)
        self.cross_attn_norm = nn.LayerNorm(shape.d_model)
        self.cross_attn = Attention(shape.d_model, shape.heads, shape.attention_dropout)
        self.ffn_norm = nn.LayerNorm(shape.d_model)
        self.ffn = FeedForward(shape.d_model, shape.ffn_dim, shape.dropout)
        self.dropout = Dropout(shape.dropout)

    def forward(
        self,
        x: Tensor,
        cross_kv: tuple[Tensor, Tensor],
        source_mask: Tensor,
        past_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h = self.self_attn_norm(x)
        k, v = self.self_attn.project_keys_values(h)
        past = 0 if past_kv is None else past_kv[0].shape[2]
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        # Right padding: a real target position only sees earlier real positions under the causal
        # mask, so no target padding mask is needed. New position i sees the past and new <= i.
        new = x.shape[1]
        mask = torch.ones(new, past + new, dtype=torch.bool, device=x.device).tril(past) if past and new > 1 else None
        x = x + self.dropout(self.self_attn(h, k, v, mask=mask, causal=past == 0 and new > 1))
        # The rows of one source sentence (beams, see DecoderCache) attend to the same keys: fold
        # them into the query length, one attention per sentence instead of one per row.
        rows, _, dim = x.shape
        h = self.cross_attn_norm(x).reshape(cross_kv[0].shape[0], -1, dim)
        x = x + self.dropout(self.cross_attn(h, *cross_kv, mask=source_mask).view(rows, new, dim))
        return x + self.dropout(self.ffn(self.ffn_norm(x))), (k, v)


class Transformer(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.d_model, padding_idx=shape.pad_id)
        nn.init.normal_(self.embed.weight, std=shape.d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[shape.pad_id].zero_()
        self.register_buffer("positions", sinusoidal_positions(shape.max_positions, shape.d_model), persistent=False)
        self.embed_dropout = Dropout(shape.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(shape) for _ in range(shape.encoder_layers))
        self.encoder_norm = nn.LayerNorm(shape.d_model)
        self.decoder_layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.decoder_layers))
        self.decoder_norm = nn.LayerNorm(shape.d_model)
        self.output_projection = TiedProjection()

    def embed_tokens(self, tokens: Tensor, offset: int = 0) -> Tensor:
        length = tokens.shape[1]
        if offset + length > self.shape.max_positions:
            raise ValueError(f"sequence of {offset + length} tokens exceeds max_positions={self.shape.max_positions}")
        x = self.embed(tokens) * math.sqrt(self.shape.d_model) + self.positions[offset : offset + length]
        return self.embed_dropout(x)

    def source_mask(self, src: Tensor) -> Tensor:
        """Boolean [batch, 1, 1, src_len] mask, True where a key may be attended to."""
        return (src != self.shape.pad_id)[:, None, None, :]

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.source_mask(src)
        x = self.embed_tokens(src)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def start_cache(self, memory: Tensor, source_mask: Tensor) -> DecoderCache:
        return DecoderCache(
            self_kv=[None] * len(self.decoder_layers),
            cross_kv=[layer.cross_attn.project_keys_values(memory) for layer in self.decoder_layers],
            source_mask=source_mask,
        )

    def decoder_states(self, tgt_in: Tensor, cache: DecoderCache) -> Tensor:
        """Final decoder states for ``tgt_in`` given the cache; the cache is extended in place."""
        x = self.embed_tokens(tgt_in, offset=cache.length)
        for i, layer in enumerate(self.decoder_layers):
            x, cache.self_kv[i] = layer(x, cache.cross_kv[i], cache.source_mask, cache.self_kv[i])
        cache.length += tgt_in.shape[1]
        return self.decoder_norm(x)

    def output_logits(self, states: Tensor) -> Tensor:
        return self.output_projection(states, self.embed.weight)  # tied to the embeddings

    def decode(self, tgt_in: Tensor, cache: DecoderCache) -> Tensor:
        """Logits for ``tgt_in`` given the cache; the cache is extended in place."""
        return self.output_logits(self.decoder_states(tgt_in, cache))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, mask = self.encode(src)
        return self.decode(tgt_in, self.start_cache(memory, mask))

    def losses(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        """``token_losses(self(src, tgt_in), tgt_out, ...)`` with the vocabulary projection and
        softmax — the largest cost of a step — computed only at target tokens, not at padding."""
        memory, mask = self.encode(src)
        states = self.decoder_states(tgt_in, self.start_cache(memory, mask))
        keep = tgt_out != self.shape.pad_id
        loss, nll = token_losses(self.output_logits(states[keep]), tgt_out[keep], self.shape.pad_id, label_smoothing)
        padded = torch.zeros(tgt_out.shape, dtype=loss.dtype, device=loss.device)
        return padded.masked_scatter(keep, loss), padded.masked_scatter(keep, nll)


def token_losses(logits: Tensor, target: Tensor, pad_id: int, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-token training loss (label-smoothed) and NLL, both [batch, tgt_len], zero at padding."""
    flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    log_probs = F.log_softmax(flat_logits.float(), dim=-1)
    nll = F.nll_loss(log_probs, flat_target, ignore_index=pad_id, reduction="none")
    if label_smoothing > 0:
        smooth = -log_probs.mean(dim=-1) * (flat_target != pad_id)
        loss = (1 - label_smoothing) * nll + label_smoothing * smooth
    else:
        loss = nll
    return loss.view_as(target), nll.view_as(target)
