"""Mitigation data: the clean training images a defense is given, per (dataset, SPC, seed).

Where they come from (``mitigation.source``):

- ``train`` (default, as the survey's code): the whole clean training set. FORK draws SPC images
  per class from ``attack_result['clean_train']``, the unpoisoned training set, so an image whose
  poisoned copy the model trained on can be drawn, and the defense gets its clean copy (FORK
  ``defense/fp.py`` ``defense()``, ``defense/ft.py`` ``mitigation()``, through
  ``utils/bd_dataset_v2.py:405-439`` ``spc_choose_poisoned_sample``).
- ``reserved_pool`` (a stricter threat model): once per dataset a seeded pool of
  ``pool_per_class`` training images per class is reserved, no attack poisons it (the poison stage
  and training-time attacks leave it out), and partitions are drawn from it.

How a partition is drawn, as FORK draws it: per class, a seeded draw without replacement
(FORK ``prepro_cls_DatasetBD_v2.get_sample_by_class``: ``np.random.choice(class indices, k,
replace=False)``, which is the first k of a permutation of the class). One generator per (dataset,
seed) permutes each class in turn, so the draw of one seed is the prefix of one fixed order per
class: partitions are nested across SPC (SPC 2 within SPC 10 within SPC 100), independent across
seeds, and identical for every model of the dataset (they depend on the labels alone).

The partition file is an int64 array of shape (num_classes, spc + 1): row c is class c's draw, in
draw order. Its first ``spc`` columns are the SPC images every defense gets. The last column is
FORK's extra draw: where a defense splits off validation data and 10 % of SPC is under one image
(``spc_choose_poisoned_sample`` then draws ``spc + 1`` images per class), the split fits on the
extra image too (see ``bdsweep.defenses.support.split_held_out``); no other defense sees it. A
class needs more than SPC images, the condition FORK's draw checks (``len(index_list) >
samples_per_class``).
"""

from __future__ import annotations

import numpy as np

from .params import stable_seed

SOURCES = ("train", "reserved_pool")
DEFAULT_SOURCE = "train"


def reserve_pool(labels: np.ndarray, num_classes: int, per_class: int, seed: int, dataset: str) -> np.ndarray:
    """``per_class`` training images per class that no attack may poison (``reserved_pool`` only)."""
    rng = np.random.default_rng(stable_seed("pool", dataset, seed))
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"dataset {dataset!r}: class {label} has {len(members)} training images, "
                             f"fewer than mitigation.pool_per_class = {per_class}")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def draw_partition(labels: np.ndarray, num_classes: int, spc: int, seed: int, dataset: str,
                   pool: np.ndarray | None = None) -> np.ndarray:
    """The (num_classes, spc + 1) draw of partition (SPC, seed): indices into the training set,
    from the whole training set, or from ``pool`` when one is given (``reserved_pool``)."""
    labels = np.asarray(labels)
    candidates = np.arange(len(labels)) if pool is None else np.sort(np.asarray(pool, dtype=np.int64))
    where = "training images" if pool is None else "reserved images (raise mitigation.pool_per_class)"
    rng = np.random.default_rng(stable_seed("partition", dataset, seed))
    rows = []
    for label in range(num_classes):
        members = candidates[labels[candidates] == label]
        if len(members) <= spc:
            raise ValueError(f"dataset {dataset!r}: SPC {spc} needs more than {spc} images of class {label} "
                             f"(SPC and one more for a validation split), it has {len(members)} {where}")
        rows.append(rng.permutation(members)[:spc + 1])
    return np.stack(rows).astype(np.int64)
