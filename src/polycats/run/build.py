"""What a run is built from its config: the device, the model, the balancer, torch's threads."""

from __future__ import annotations

import torch

from polycats.balance.base import Balancer
from polycats.balance.build import balancer_from_config
from polycats.config import Config
from polycats.data.prepare import PAD
from polycats.errors import PolycatsError
from polycats.model.transformer import Transformer, TransformerShape


def resolve_device(name: str) -> torch.device:
    """``train.device`` (or a command's ``--device``) as a torch device: ``auto`` is CUDA when
    torch sees a CUDA device, else the CPU; ``cuda`` is the current CUDA device (respects
    ``CUDA_VISIBLE_DEVICES``) and an error when there is none."""
    if name not in ("auto", "cpu", "cuda"):
        raise PolycatsError(f"device must be auto, cpu or cuda, not '{name}'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise PolycatsError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def build_model(config: Config, vocab_size: int) -> Transformer:
    m = config.model
    return Transformer(TransformerShape(
        vocab_size=vocab_size, d_model=m.d_model, encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers,
        heads=m.heads, ffn_dim=m.ffn_dim, dropout=m.dropout, attention_dropout=m.attention_dropout,
        pad_id=PAD,
    ))


def build_balancer(config: Config, tasks: list[str], probabilities=None) -> Balancer:
    """The configured balancer; ``probabilities`` (the sampler's, in task order) is needed by dro."""
    return balancer_from_config(config.balancer, tasks, list(config.data.languages), probabilities)


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
