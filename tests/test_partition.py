import numpy as np
import pytest

from bdsweep.attacks import ResourceContext
from bdsweep.partition import draw_partition, reserve_pool
from bdsweep.poison import poison_dataset
from bdsweep.registry import ATTACKS

LABELS = np.repeat(np.arange(5), 40)


def test_pool_has_per_class_images_and_is_seeded():
    pool = reserve_pool(LABELS, 5, 12, seed=0, dataset="d")
    assert np.bincount(LABELS[pool]).tolist() == [12] * 5
    assert (pool == reserve_pool(LABELS, 5, 12, seed=0, dataset="d")).all()
    assert not (pool == reserve_pool(LABELS, 5, 12, seed=1, dataset="d")).all()


def test_partitions_are_deterministic_nested_and_seed_dependent():
    pool = reserve_pool(LABELS, 5, 12, seed=0, dataset="d")
    small = draw_partition(pool, LABELS, 5, 2, seed=3, dataset="d")
    large = draw_partition(pool, LABELS, 5, 10, seed=3, dataset="d")
    assert np.bincount(LABELS[small]).tolist() == [2] * 5
    assert set(small) <= set(large) <= set(pool)
    assert (small == draw_partition(pool, LABELS, 5, 2, seed=3, dataset="d")).all()
    assert set(large) != set(draw_partition(pool, LABELS, 5, 10, seed=4, dataset="d"))


def test_too_large_spc_or_pool_is_an_error_naming_the_class():
    pool = reserve_pool(LABELS, 5, 12, seed=0, dataset="d")
    with pytest.raises(ValueError, match="SPC 13"):
        draw_partition(pool, LABELS, 5, 13, seed=0, dataset="d")
    with pytest.raises(ValueError, match="class 0 has 40"):
        reserve_pool(LABELS, 5, 41, seed=0, dataset="d")


def test_attacks_never_poison_the_reserved_pool():
    images = np.zeros((len(LABELS), 8, 8, 3), np.uint8)
    pool = reserve_pool(LABELS, 5, 12, seed=0, dataset="d")
    attack = ATTACKS.get("badnets")
    params = attack.params()
    poisoned = poison_dataset(attack, attack.make_resource(ResourceContext(8), params),
                              params, images, LABELS, images[:20],
                              LABELS[:20], pool, ratio=0.5, target=0, seed=0, key="d/badnets/0.5")
    assert len(poisoned.train_indices) == 100  # round(0.5 * 200)
    assert not set(poisoned.train_indices) & set(pool)
    assert (LABELS[poisoned.train_indices] != 0).all() and (poisoned.train_labels == 0).all()
    assert (LABELS[:20][poisoned.test_indices] != 0).all()
    assert poisoned.effective_ratio == 0.5
    with pytest.raises(ValueError, match="only 112 are eligible"):
        poison_dataset(attack, attack.make_resource(ResourceContext(8), params), params, images, LABELS, images[:20],
                       LABELS[:20], pool, ratio=0.6, target=0, seed=0, key="d/badnets/0.6")
