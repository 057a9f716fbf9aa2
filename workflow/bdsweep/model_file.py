"""Model files: weights plus JSON-able metadata, written atomically, loadable with
``torch.load(weights_only=True)`` so that opening a model never executes code from it."""

from __future__ import annotations

import os
import pickle
import zipfile

import torch
from torch import nn

from .atomic import REMAKE, atomic_path
from .models import create_model


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict) -> None:
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    # Through a file handle: torch.save names the archive's records after a path it is given
    # (here a random temporary name), so equal weights would give different bytes.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save({"state_dict": state, "meta": meta}, handle)


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["state_dict"], blob["meta"]
    except FileNotFoundError:
        raise FileNotFoundError(f"missing model file: {path}") from None
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        # OSError: a truncated archive can make the reader seek past the end ([Errno 22]).
        raise ValueError(f"corrupt model file {path} (truncated or damaged: {error}); {REMAKE}") from None


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Build the architecture named in the file's metadata and load its weights."""
    state, meta = read_model_file(path)
    model = create_model(meta["architecture"], meta["num_classes"], meta["image_size"])
    model.load_state_dict(state)
    return model.eval(), meta
