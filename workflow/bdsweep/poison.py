"""The poison stage for data-poisoning attacks: which training images are poisoned, their
poisoned pixels and labels, and the backdoor test set, all computed on whole arrays.

All-to-one: poisoned training images are relabelled to the target. Which images, as the survey's
code draws them (BB ``utils/backdoor_generate_poison_index.py``, which FORK runs unchanged):

- A dirty-label attack poisons ``round(ratio * n_train)`` images drawn without replacement from
  all ``n_train`` training images, target class included (``:44-52``: "NO NEED TO AVOID target
  class img"). A poisoned target-class image keeps its label and only gains the trigger.
- A clean-label attack (SIG) draws ``round(ratio * n_train)`` from the target class (``:53-60``).
  Where the class has fewer images, FORK's draw raises (GTSRB and Tiny-ImageNet at every ratio
  of the survey: the shipped code cannot run those cells); bdsweep poisons the whole class and
  records the effective ratio (docs/deviations.md).
- With ``mitigation.source: reserved_pool`` the reserved images are never poisoned: the draw is
  from the others (a stricter threat model than the survey's).

The backdoor test set is every test image whose label is not the target, with the trigger
(``:38-41``).
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
                   reserved: np.ndarray | None, ratio: float, target: int, seed: int, key: str) -> PoisonedData:
    """``reserved``: the mitigation pool (never poisoned), or None to draw from every image."""
    eligible = np.ones(len(y_train), dtype=bool)
    if reserved is not None:
        eligible[reserved] = False
    if attack.clean_label:
        eligible &= y_train == target
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
