"""Training-time attacks train with the survey toolkit's recipe: a constant learning rate; WaNet and
BPP without the per-image crop and flip but with its per-batch transform of the normalised batch
(crop after zero padding 5 with p 0.8, rotation up to 10 degrees with p 0.5, flip where the dataset
allows it); IAB augmenting before it poisons, on normalised images. Each has a parameter that
selects the training section's recipe instead."""

from __future__ import annotations

import pytest
import torch

from bdsweep.attacks import HookContext, per_batch_augment
from bdsweep.engine import BatchHook, Normalisation, train
from bdsweep.models import create_model
from bdsweep.recipe import Recipe
from bdsweep.registry import ATTACKS

NORMALISATION = Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), hflip=True)
RECIPE = Recipe(epochs=3, batch_size=8, lr=0.05)  # cosine, engine augmentation on


def context(ratio=0.25, n=16, size=16, hflip=True):
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    normalisation = Normalisation(NORMALISATION.mean, NORMALISATION.std, hflip=hflip)
    return HookContext(images, torch.arange(n) % 4, torch.ones(n, dtype=torch.bool), normalisation, 4, size, 0,
                       ratio, 0, progress=False)


def hook(name, ctx=None, **overrides):
    attack = ATTACKS.get(name)
    return attack.make_hook(ctx or context(), attack.params(**overrides))


@pytest.mark.parametrize("name", ["wanet", "bpp"])
def test_wanet_and_bpp_use_a_constant_rate_and_their_own_per_batch_transform(name):
    recipe = hook(name).training_recipe(RECIPE)
    assert recipe.schedule == "constant" and not recipe.augment
    assert (recipe.epochs, recipe.lr, recipe.batch_size) == (RECIPE.epochs, RECIPE.lr, RECIPE.batch_size)
    assert hook(name, schedule="training", post_transform=False).training_recipe(RECIPE) == RECIPE
    plain = hook(name, post_transform=False)
    batch = torch.randn(4, 3, 16, 16)
    assert torch.equal(plain.after_normalise(batch), batch)


@pytest.mark.filterwarnings("ignore::UserWarning")  # IAB's tiny generators at 16 px
def test_iab_uses_a_constant_rate_and_augments_before_poisoning():
    small = {"mask_epochs": 1, "generator_channels": 4, "generator_depth": 1}
    recipe = hook("iab", **small).training_recipe(RECIPE)
    assert recipe.schedule == "constant" and not recipe.augment  # the hook augments, before it poisons
    assert hook("iab", schedule="training", augment_first=False, **small).training_recipe(RECIPE) == RECIPE
    clean = torch.rand(8, 3, 16, 16)
    unpoisoned = hook("iab", context(ratio=0.0), **small)
    out, _, _ = unpoisoned.transform(clean, torch.zeros(8, dtype=torch.long), torch.arange(8))
    assert not torch.equal(out, clean)  # augmented (crops shift the image) although nothing is poisoned
    untouched = hook("iab", context(ratio=0.0), augment_first=False, **small)
    out, _, _ = untouched.transform(clean, torch.zeros(8, dtype=torch.long), torch.arange(8))
    assert torch.equal(out, clean)


def test_iab_generators_see_normalised_images():
    small = {"mask_epochs": 0, "generator_channels": 4, "generator_depth": 1}
    normalised, pixels = hook("iab", **small), hook("iab", normalised=False, **small)
    images = torch.rand(2, 3, 16, 16)
    assert torch.allclose(normalised.view(images), NORMALISATION.normalise(images))
    assert torch.equal(pixels.view(images), images)


def test_the_per_batch_transform_draws_once_per_batch_with_the_toolkits_odds():
    batch = torch.randn(1, 3, 48, 48).repeat(4, 1, 1, 1)
    cropped = rotated = 0
    draws = 300
    for seed in range(draws):
        # The same draws with and without rotation: they differ exactly where a rotation acted.
        crop_only = per_batch_augment(batch, torch.Generator().manual_seed(seed), 5, 0.0, hflip=False)
        both = per_batch_augment(batch, torch.Generator().manual_seed(seed), 5, 10.0, hflip=False)
        assert both.shape == batch.shape and all(torch.equal(both[0], both[i]) for i in range(4))  # one draw a batch
        cropped += not torch.equal(crop_only, batch)
        rotated += not torch.equal(both, crop_only)
    assert abs(cropped / draws - 0.8 * 120 / 121) < 0.07  # p 0.8, and 1 offset in 121 lands in place
    assert abs(rotated / draws - 0.5 * 0.95) < 0.08  # p 0.5 (the smallest angles move no pixel at 48 px)
    padded = per_batch_augment(torch.ones(2, 3, 16, 16), torch.Generator().manual_seed(3), 5, 0.0, hflip=False)
    assert set(padded.unique().tolist()) <= {0.0, 1.0}  # zero padding (the normalised mean), no interpolation


def test_flips_only_where_the_dataset_allows_them():
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    flips = [torch.equal(per_batch_augment(ramp, torch.Generator().manual_seed(seed), 0, 0.0, hflip=True),
                         ramp.flip(3)) for seed in range(40)]
    assert 5 < sum(flips) < 35
    assert not any(torch.equal(per_batch_augment(ramp, torch.Generator().manual_seed(seed), 0, 0.0, hflip=False),
                               ramp.flip(3)) for seed in range(40))


class Recorder(BatchHook):
    def __init__(self):
        self.seen = []

    def after_normalise(self, inputs):
        self.seen.append(inputs.detach().clone())
        return inputs * 0  # what the model sees from here on

    def loss(self, inputs, labels, logits, cross_entropy):
        assert torch.equal(inputs, torch.zeros_like(inputs))
        return cross_entropy


def test_the_engine_hands_the_normalised_batch_to_the_hook():
    torch.manual_seed(0)
    images = torch.full((6, 16, 16, 3), 255, dtype=torch.uint8)
    recorder = Recorder()
    train(create_model("small_cnn", 2, 16), images, torch.arange(6) % 2, Recipe(epochs=1, batch_size=3, augment=False),
          NORMALISATION, seed=0, hook=recorder, progress=False)
    assert len(recorder.seen) == 2 and all(torch.allclose(x, torch.full_like(x, 2.0)) for x in recorder.seen)


def test_a_constant_schedule_keeps_the_rate_through_training():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    recipe = hook("wanet", context(n=8)).training_recipe(Recipe(epochs=3, batch_size=4, lr=0.05))
    curve = train(create_model("small_cnn", 4, 16), images, torch.arange(8) % 4, recipe, NORMALISATION, seed=0,
                  hook=hook("wanet", context(n=8)), progress=False)
    assert [row["lr"] for row in curve] == [0.05] * 3
