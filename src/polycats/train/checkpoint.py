"""Checkpoints: plain dicts of tensors and numbers, written atomically, read with
``torch.load(weights_only=True)`` (never unpickling arbitrary objects)."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from polycats.errors import PolycatsError
from polycats.io import atomic_torch_save

CHECKPOINT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_torch_save({"version": CHECKPOINT_VERSION, **state}, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PolycatsError(f"checkpoint {path} does not exist") from None
    except OSError as error:  # a directory, no permission, an I/O error
        raise PolycatsError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as error:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch's messages carry terminal colours
        first_line = message.splitlines()[0] if message else type(error).__name__
        raise PolycatsError(
            f"checkpoint {path} is corrupt or not a safe polycats checkpoint ({first_line[:160]}); "
            "delete it or point to another checkpoint"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise PolycatsError(f"checkpoint {path} has no 'model' weights; it was not written by polycats")
    if state.get("version", CHECKPOINT_VERSION) > CHECKPOINT_VERSION:
        raise PolycatsError(f"checkpoint {path} was written by a newer polycats (format {state['version']}); upgrade polycats")
    return state
