"""Mitigation data: the reserved pool and the per-(SPC, seed) partitions drawn from it.

Once per dataset a seeded pool of ``pool_per_class`` training images per class is reserved; no
attack ever poisons them (the poison stage draws from the rest). A partition takes, for each
class, the first SPC images of that class's pool in an order shuffled by the partition seed. So
partitions are deterministic in (dataset, seed), identical for every model of the dataset, and
nested: for one seed, the SPC-2 partition is contained in the SPC-10 one.
"""

from __future__ import annotations

import numpy as np

from .params import stable_seed


def reserve_pool(labels: np.ndarray, num_classes: int, per_class: int, seed: int, dataset: str) -> np.ndarray:
    rng = np.random.default_rng(stable_seed("pool", dataset, seed))
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"dataset {dataset!r}: class {label} has {len(members)} training images, "
                             f"fewer than mitigation.pool_per_class = {per_class}")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def draw_partition(pool: np.ndarray, labels: np.ndarray, num_classes: int, spc: int, seed: int,
                   dataset: str) -> np.ndarray:
    """Indices (into the training set) of ``spc`` pool images per class, class by class."""
    rng = np.random.default_rng(stable_seed("partition", dataset, seed))
    pool_labels = labels[pool]
    chosen = []
    for label in range(num_classes):
        members = pool[pool_labels == label]
        if len(members) < spc:
            raise ValueError(f"dataset {dataset!r}: SPC {spc} exceeds the {len(members)} reserved "
                             f"images of class {label} (raise mitigation.pool_per_class)")
        chosen.append(rng.permutation(members)[:spc])
    return np.concatenate(chosen).astype(np.int64)
