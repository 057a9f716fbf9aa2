"""Pre- and post-defense evaluation: clean test accuracy and the backdoor test set's ASR and RA."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .atomic import check_arrays, load_arrays
from .data.store import PreparedDataset
from .engine import Normalisation, predict
from .metrics import attack_metrics


def normalisation_of(data: PreparedDataset) -> Normalisation:
    return Normalisation(data.info.mean, data.info.std, data.info.hflip)


def load_poison(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A poison file (or a training-time attack's backdoor test set), checked: uint8 images,
    non-negative integer labels and indices, an effective ratio within [0, 1]."""
    return check_arrays(path, load_arrays(path, "poison"), "poison", {"effective_ratio": (0.0, 1.0)})


def evaluate_model(model: nn.Module, data: PreparedDataset, poison: dict[str, np.ndarray] | None, target: int,
                   device: torch.device) -> dict:
    """ACC, ASR and RA; ASR and RA are None without a backdoor test set (a clean model)."""
    normalisation = normalisation_of(data)
    y_test = np.asarray(data.y_test)
    clean = predict(model, data.x_test, normalisation, device)
    if poison is None:
        return {"acc": float(np.mean(clean == y_test)), "asr": None, "ra": None}
    backdoor = predict(model, poison["test_images"], normalisation, device)
    return attack_metrics(clean, y_test, backdoor, y_test[poison["test_indices"]], target)
