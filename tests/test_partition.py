"""Mitigation partitions as the survey's code draws them (from the whole clean training set, nested
across SPC, independent across seeds, with FORK's extra validation draw), the reserved-pool
option, and which training images the poison stage poisons."""

import itertools

import numpy as np
import pytest

from bdsweep.attacks import ResourceContext
from bdsweep.cli import main
from bdsweep.partition import draw_partition, reserve_pool
from bdsweep.poison import poison_dataset
from bdsweep.registry import ATTACKS
from conftest import SHARED_DATASETS, requires_shared

LABELS = np.repeat(np.arange(5), 40)
CIFAR10_LABELS = SHARED_DATASETS / "cifar10_jpeg_all.npz"


def test_partitions_draw_spc_and_one_more_per_class_from_the_whole_training_set():
    draw = draw_partition(LABELS, 5, 2, seed=3, dataset="d")
    assert draw.shape == (5, 3) and draw.dtype == np.int64
    assert (LABELS[draw] == np.arange(5)[:, None]).all()  # row c: class c
    assert (draw == draw_partition(LABELS, 5, 2, seed=3, dataset="d")).all()  # seeded
    # Any training image can be drawn: over many seeds the draws cover (nearly) every image.
    drawn = {int(i) for seed in range(100) for i in draw_partition(LABELS, 5, 10, seed, "d").ravel()}
    assert len(drawn) > 0.95 * len(LABELS)


def test_partitions_are_nested_across_spc_and_differ_across_seeds_and_datasets():
    large = draw_partition(LABELS, 5, 30, seed=3, dataset="d")
    for spc in (1, 2, 10):  # SPC 2 (and its extra image) inside SPC 10 inside SPC 30, class by class
        assert (draw_partition(LABELS, 5, spc, seed=3, dataset="d") == large[:, :spc + 1]).all()
    assert not (large == draw_partition(LABELS, 5, 30, seed=4, dataset="d")).all()
    assert not (large == draw_partition(LABELS, 5, 30, seed=3, dataset="e")).all()


def mean_pairwise_overlap(labels, num_classes, spc, seeds, dataset):
    """Mean number of SPC images two partitions of different seeds share."""
    sets = [set(draw_partition(labels, num_classes, spc, seed, dataset)[:, :spc].ravel()) for seed in range(seeds)]
    return np.mean([len(a & b) for a, b in itertools.combinations(sets, 2)])


def test_seeds_overlap_as_little_as_independent_draws():
    labels = np.repeat(np.arange(10), 500)
    # Independent draws of 50 of 500 per class share 50 * 50 / 500 = 5 per class: 50 of 500.
    assert 40 < mean_pairwise_overlap(labels, 10, 50, 10, "d") < 60


@requires_shared(CIFAR10_LABELS)
def test_cifar10_spc100_partitions_of_ten_seeds_share_about_twenty_images():
    """The survey's grid on real CIFAR-10 labels: independent draws of 100 of 5,000 per class share
    2 per class, 20 of 1,000 (with the former reserved pool of 150 per class it was 667)."""
    with np.load(CIFAR10_LABELS) as archive:
        labels = archive["train_y"]
    assert 15 < mean_pairwise_overlap(labels, 10, 100, 10, "cifar10") < 25


def test_a_class_needs_more_images_than_spc():
    with pytest.raises(ValueError, match="SPC 40 needs more than 40 images of class 0"):
        draw_partition(LABELS, 5, 40, seed=0, dataset="d")


def test_the_reserved_pool_option_draws_partitions_from_the_pool_only():
    pool = reserve_pool(LABELS, 5, 12, seed=0, dataset="d")
    assert np.bincount(LABELS[pool]).tolist() == [12] * 5
    assert (pool == reserve_pool(LABELS, 5, 12, seed=0, dataset="d")).all()
    assert not (pool == reserve_pool(LABELS, 5, 12, seed=1, dataset="d")).all()
    small = draw_partition(LABELS, 5, 2, seed=3, dataset="d", pool=pool)
    large = draw_partition(LABELS, 5, 10, seed=3, dataset="d", pool=pool)
    assert (small == large[:, :3]).all() and set(large.ravel()) <= set(pool)
    with pytest.raises(ValueError, match="SPC 12 needs more than 12 images of class 0.*raise mitigation.pool"):
        draw_partition(LABELS, 5, 12, seed=0, dataset="d", pool=pool)
    with pytest.raises(ValueError, match="class 0 has 40"):
        reserve_pool(LABELS, 5, 41, seed=0, dataset="d")


def test_the_partition_stage_draws_from_the_training_set_or_the_given_pool(prepared, tmp_path):
    data = str(prepared.directory)
    assert main(["partition", "--data", data, "--spc", "3", "--seed", "1", "--out", str(tmp_path / "p.npy")]) == 0
    expected = draw_partition(prepared.y_train[:], 4, 3, 1, prepared.info.name)
    assert (np.load(tmp_path / "p.npy") == expected).all()
    assert main(["pool", "--data", data, "--per-class", "6", "--seed", "0", "--out", str(tmp_path / "pool.npy")]) == 0
    assert main(["partition", "--data", data, "--pool", str(tmp_path / "pool.npy"), "--spc", "3", "--seed", "1",
                 "--out", str(tmp_path / "q.npy")]) == 0
    assert set(np.load(tmp_path / "q.npy").ravel()) <= set(np.load(tmp_path / "pool.npy"))


def badnets_poison(labels, reserved, ratio, target=0):
    attack = ATTACKS.get("badnets")
    params = attack.params()
    images = np.zeros((len(labels), 8, 8, 3), np.uint8)
    return poison_dataset(attack, attack.make_resource(ResourceContext(8), params), params, images, labels,
                          images[:20], labels[:20], reserved, ratio=ratio, target=target, seed=0,
                          key=f"d/badnets/{ratio}")


def test_dirty_label_attacks_draw_from_every_training_image_target_class_included():
    poisoned = badnets_poison(LABELS, None, 0.5)
    assert len(poisoned.train_indices) == 100  # round(0.5 * 200), from all 200 images
    assert (LABELS[poisoned.train_indices] == 0).any()  # the target class is not avoided
    assert (poisoned.train_labels == 0).all() and poisoned.effective_ratio == 0.5
    assert (LABELS[:20][poisoned.test_indices] != 0).all()
    # The whole training set can be poisoned, as FORK's np.random.choice over all N allows.
    assert sorted(badnets_poison(LABELS, None, 1.0).train_indices) == list(range(len(LABELS)))
    # The target class is drawn about as often as its share of the training set (1/5).
    assert 0.1 < np.mean(LABELS[poisoned.train_indices] == 0) < 0.3


def test_attacks_never_poison_the_reserved_pool():
    pool = reserve_pool(LABELS, 5, 12, seed=0, dataset="d")
    poisoned = badnets_poison(LABELS, pool, 0.5)
    assert len(poisoned.train_indices) == 100
    assert not set(poisoned.train_indices) & set(pool)
    with pytest.raises(ValueError, match="only 140 are eligible"):
        badnets_poison(LABELS, pool, 0.75)



@pytest.mark.parametrize("with_pool", [False, True])
def test_training_time_attacks_may_poison_any_image_unless_a_pool_is_reserved(prepared, tmp_path, monkeypatch,
                                                                               with_pool):
    import bdsweep.stages.train as train_stage

    contexts = []
    original = train_stage.HookContext
    monkeypatch.setattr(train_stage, "HookContext", lambda *args: contexts.append(original(*args)) or contexts[-1])
    data, pool = str(prepared.directory), tmp_path / "pool.npy"
    assert main(["pool", "--data", data, "--per-class", "6", "--seed", "0", "--out", str(pool)]) == 0
    out = tmp_path / "model"
    argv = ["train", "--data", data, "--attack", "bpp", "--ratio", "0.1", "--architecture", "small_cnn",
            "--recipe", '{"epochs": 1, "batch_size": 32}', "--target", "0", "--seed", "0", "--device", "cpu",
            "--out-model", str(out / "model.pt"), "--out-metrics", str(out / "metrics.json"),
            "--out-curve", str(out / "curve.csv"), "--out-backdoor", str(out / "backdoor.npz")]
    assert main(argv + (["--pool", str(pool)] if with_pool else [])) == 0
    poisonable = contexts[0].poisonable.numpy()
    if with_pool:
        assert not poisonable[np.load(pool)].any() and poisonable.sum() == len(poisonable) - 24
    else:
        assert poisonable.all()
