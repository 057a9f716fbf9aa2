"""The poison stage for data-poisoning attacks: which training images are poisoned, their
poisoned pixels and labels, and the backdoor test set, all computed on whole arrays.

All-to-one: poisoned training images are relabelled to the target. A dirty-label attack poisons
``round(ratio * n_train)`` images drawn from non-target images outside the reserved mitigation
pool (as the survey's toolkit draws them). A clean-label attack poisons target-class images only
and, when the ratio asks for more than there are, all of them; the effective ratio is recorded.
The backdoor test set is every test image whose label is not the target, with the trigger.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attacks import DataPoisoningAttack
from .params import stable_seed


@dataclass(frozen=True)
class PoisonedData:
    train_indices: np.ndarray
    train_images: np.ndarray
    train_labels: np.ndarray
    test_indices: np.ndarray
    test_images: np.ndarray
    effective_ratio: float

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("train_indices", "train_images", "train_labels",
                                              "test_indices", "test_images")}


def backdoor_test_indices(y_test, target: int) -> np.ndarray:
    """Test images that can show an attack: every one whose true label is not the target."""
    return np.flatnonzero(np.asarray(y_test) != target).astype(np.int64)


def poison_dataset(attack: DataPoisoningAttack, resource, params, x_train, y_train, x_test, y_test,
                   reserved: np.ndarray, ratio: float, target: int, seed: int, key: str) -> PoisonedData:
    eligible = np.ones(len(y_train), dtype=bool)
    eligible[reserved] = False
    eligible &= (y_train == target) if attack.clean_label else (y_train != target)
    candidates = np.flatnonzero(eligible)
    wanted = round(ratio * len(y_train))
    if attack.clean_label:
        wanted = min(wanted, len(candidates))
    elif wanted > len(candidates):
        raise ValueError(f"{key}: ratio {ratio} needs {wanted} poisoned images, only {len(candidates)} are eligible")
    rng = np.random.default_rng(stable_seed("poison", key, seed))
    indices = np.sort(rng.choice(candidates, wanted, replace=False)).astype(np.int64)
    test_indices = backdoor_test_indices(y_test, target)
    return PoisonedData(
        train_indices=indices,
        train_images=attack.apply_trigger(np.asarray(x_train[indices]), resource, params),
        train_labels=np.full(len(indices), target, dtype=np.int64),
        test_indices=test_indices,
        test_images=attack.apply_trigger(np.asarray(x_test[test_indices]), resource, params),
        effective_ratio=len(indices) / len(y_train),
    )
