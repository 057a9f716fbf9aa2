"""Reproducibility on CPU (bdsweep/reproducibility.py): a short training repeats bit for bit with
the same thread count, differs only in float rounding between thread counts, and the test harness
starts every test from the same global state whatever ran before it."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from bdsweep.engine import Normalisation, train
from bdsweep.models import create_model
from bdsweep.recipe import Recipe
from bdsweep.reproducibility import CPU_ENVIRONMENT


@pytest.fixture
def restore_one_thread():
    yield
    torch.set_num_threads(1)


def short_training(threads: int, architecture: str = "small_cnn") -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(architecture, 4, 16)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (24, 16, 16, 3), dtype=torch.uint8, generator=generator)
    labels = torch.arange(24) % 4
    recipe = Recipe(epochs=2, batch_size=8, lr=0.05)
    train(model, images, labels, recipe, Normalisation((0.5,) * 3, (0.25,) * 3, True), seed=3, progress=False)
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("threads", [1, 2])
def test_a_short_training_repeats_bit_for_bit_with_the_same_thread_count(threads, restore_one_thread):
    first, second = short_training(threads), short_training(threads)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_one_and_two_threads_differ_only_by_float_rounding(restore_one_thread):
    """Where bit-identity cannot hold: ATen/oneDNN reductions are split over threads. Measured on
    this training: at most 9e-5 apart (weights of order 0.1); anything near 1e-2 would be a bug."""
    one, two = short_training(1), short_training(2)
    largest = max((one[name].double() - two[name].double()).abs().max().item() for name in one)
    assert largest < 1e-2


def test_the_harness_pins_the_kernels_and_one_thread():
    for name, value in CPU_ENVIRONMENT.items():
        assert os.environ[name] == value
    assert torch.get_num_threads() == 1


def test_every_test_starts_from_its_own_seed_not_from_what_ran_before():
    from conftest import seed_of_test

    drawn = (torch.rand(3), np.random.rand(3), random.random())
    seed = seed_of_test(os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    assert torch.equal(drawn[0], torch.rand(3))
    assert np.array_equal(drawn[1], np.random.rand(3))
    assert drawn[2] == random.random()
