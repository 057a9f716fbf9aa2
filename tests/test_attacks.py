"""Exact trigger properties of Blended, SIG, LF, WaNet and BPP (BadNets: test_badnets.py; IAB and
SSBA: their own files), and the poisoning rules every attack shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdsweep.attacks import HookContext, ResourceContext, apply_in_batches, meta_of
from bdsweep.engine import Normalisation
from bdsweep.models import create_model
from bdsweep.poison import poison_dataset
from bdsweep.registry import ATTACKS
from conftest import SHARED_RESOURCES, requires_shared

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
NORMALISATION = Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), hflip=False)


def stamp(name, batch, context=None, **overrides):
    attack = ATTACKS.get(name)
    params = attack.params(**overrides)
    resource = attack.make_resource(context or ResourceContext(batch.shape[1]), params)
    return attack.apply_trigger(batch, resource, params), resource


@pytest.mark.parametrize("alpha", [0.2, 0.25, 0.3, 1 / 3])  # integer and floating-point paths
def test_blended_is_the_alpha_mix_of_image_and_pattern(alpha):
    """Rounded (the corrected behaviour) exactly; truncated (the toolkit's default, golden-tested in
    test_triggers_golden.py) never above it and at most one level below."""
    blended, resource = stamp("blended", IMAGES, alpha=alpha, rounding="round")
    expected = np.rint((1 - alpha) * IMAGES.astype(np.float64) + alpha * resource["pattern"].astype(np.float64))
    assert blended.dtype == np.uint8 and (blended == expected).all()
    truncated, _ = stamp("blended", IMAGES, alpha=alpha)
    exact = (1 - alpha) * IMAGES.astype(np.float64) + alpha * resource["pattern"].astype(np.float64)
    assert (np.abs(truncated - np.floor(exact)) <= 1).all() and (truncated <= blended).all()
    assert (truncated != blended).any()
    again, _ = stamp("blended", IMAGES, alpha=alpha, rounding="round")
    assert (again == blended).all()  # the built-in pattern is deterministic
    assert resource["pattern"].std() > 60  # uniform noise, not a flat image


@requires_shared(SHARED_RESOURCES / "blended" / "hello_kitty.jpeg")
def test_blended_with_the_reference_image_file():
    from PIL import Image

    path = SHARED_RESOURCES / "blended" / "hello_kitty.jpeg"
    blended, resource = stamp("blended", IMAGES, image=str(path), rounding="round")
    with Image.open(path) as image:
        expected_pattern = np.asarray(image.convert("RGB").resize((32, 32), Image.BILINEAR))
    assert (resource["pattern"] == expected_pattern).all()
    assert (blended == np.rint(0.8 * IMAGES + 0.2 * expected_pattern.astype(np.float64))).all()


def test_blended_refuses_a_missing_image_by_path():
    with pytest.raises(ValueError, match="no-such.png"):
        ATTACKS.get("blended").params(image="/nowhere/no-such.png")


def test_sig_adds_the_horizontal_sinusoid():
    flat = np.full((2, 32, 32, 3), 100, np.uint8)
    columns = np.arange(32)
    signal = 40 * np.sin(2 * np.pi * columns * 6 / 32)
    rounded, _ = stamp("sig", flat, rounding="round")
    assert (rounded == np.rint(100 + signal)[None, None, :, None]).all()
    truncated, _ = stamp("sig", flat)  # the toolkit's: uint8 of the float sum, i.e. floor
    assert (truncated == np.floor(100 + signal)[None, None, :, None]).all()
    saturated, _ = stamp("sig", np.full((1, 32, 32, 3), 250, np.uint8))
    assert saturated.max() == 255 and saturated.min() == 250 - 40  # clipped above 255


def test_sig_is_clean_label_and_records_the_effective_ratio():
    attack = ATTACKS.get("sig")
    params = attack.params()
    labels = np.repeat(np.arange(4), 25)
    images = RNG.integers(0, 256, size=(100, 8, 8, 3), dtype=np.uint8)
    reserved = np.array([0, 1, 30])  # two target-class images are in the mitigation pool
    resource = attack.make_resource(ResourceContext(8), params)
    small = poison_dataset(attack, resource, params, images, labels, images[:40], labels[:40], reserved, 0.1, 0, 0,
                           "k")
    assert len(small.train_indices) == 10 and (labels[small.train_indices] == 0).all()
    assert (small.train_labels == 0).all() and not np.isin(small.train_indices, reserved).any()
    whole = poison_dataset(attack, resource, params, images, labels, images[:40], labels[:40], reserved, 0.5, 0, 0,
                           "k")
    assert sorted(whole.train_indices) == list(range(2, 25))  # the whole class outside the pool
    assert whole.effective_ratio == pytest.approx(23 / 100)
    # Without a reserved pool (the survey's way), the whole class; FORK's draw would raise here.
    forked = poison_dataset(attack, resource, params, images, labels, images[:40], labels[:40], None, 0.5, 0, 0, "k")
    assert sorted(forked.train_indices) == list(range(25)) and forked.effective_ratio == 0.25
    assert (labels[:40][whole.test_indices] != 0).all()  # target-class images are not in the test set


@pytest.mark.parametrize("name", ["badnets", "blended", "sig"])
def test_backdoor_test_sets_leave_out_the_target_class(name):
    attack = ATTACKS.get(name)
    params = attack.params()
    labels = np.repeat(np.arange(4), 10)
    images = RNG.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    poisoned = poison_dataset(attack, attack.make_resource(ResourceContext(8), params), params, images, labels,
                              images, labels, np.array([], np.int64), 0.1, 2, 0, name)
    assert sorted(poisoned.test_indices) == sorted(np.flatnonzero(labels != 2))
    resource = attack.make_resource(ResourceContext(8), params)
    assert (poisoned.test_images == attack.apply_trigger(images[labels != 2], resource, params)).all()


def lf_context(image_size=32, count=64):
    torch.manual_seed(0)
    images = RNG.integers(0, 256, size=(count, image_size, image_size, 3), dtype=np.uint8)
    return ResourceContext(image_size, 4, 0, 0, torch.device("cpu"), NORMALISATION, images,
                           np.arange(count) % 4, create_model("small_cnn", 4, image_size))


@pytest.mark.parametrize("algorithm", ["deepfool_gaussian", "pgd_ideal_lowpass"])
@pytest.mark.parametrize("image_size", [32, 64])
def test_lf_perturbation_is_low_frequency_and_in_range(image_size, algorithm):
    from bdsweep.attacks.lf import low_frequency_energy

    fast = {"steps": 5, "batch_size": 16} if algorithm == "pgd_ideal_lowpass" else {"passes": 2}
    stamped, resource = stamp("lf", np.zeros((2, image_size, image_size, 3), np.uint8), lf_context(image_size),
                              algorithm=algorithm, images=16, **fast)
    perturbation = resource["perturbation"]
    assert perturbation.shape == (image_size, image_size, 3)
    assert (stamped == np.floor(perturbation)).all()  # added to the pixels, truncated as the toolkit's files
    assert perturbation.min() == pytest.approx(0, abs=1e-4) and perturbation.max() == pytest.approx(51, abs=1e-3)
    meta = meta_of(resource)
    assert 0 <= meta["target_rate_on_clean_model"] <= 1 and meta["algorithm"] == algorithm
    if algorithm == "pgd_ideal_lowpass":  # an ideal low-pass: nothing beyond its radius
        assert low_frequency_energy(perturbation, 4 * image_size / 32) > 0.999
        assert low_frequency_energy(perturbation, 1) < 0.999  # not a constant shift: it has structure
    else:  # a Gaussian of sigma 6 px: mostly within radius 1 (at 32 px), as the toolkit's files
        assert meta["low_frequency_energy"]["1"] > 0.8


def test_lf_refuses_to_run_without_a_clean_model():
    with pytest.raises(ValueError, match="clean model"):
        stamp("lf", IMAGES, ResourceContext(32))


def hook_context(ratio=0.25, size=16, count=64, pool=()):
    images = torch.from_numpy(RNG.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8))
    poisonable = torch.ones(count, dtype=torch.bool)
    poisonable[list(pool)] = False
    return HookContext(images, torch.arange(count) % 4, poisonable, NORMALISATION, 4, size, 0, ratio, 0)


def make_hook(name, context, **overrides):
    attack = ATTACKS.get(name)
    return attack.make_hook(context, attack.params(**overrides))


def test_wanet_warp_is_the_identity_at_zero_strength():
    context = hook_context()
    images = context.images[:8]
    warped = apply_in_batches(images.numpy(), make_hook("wanet", context, s=0.0).trigger, torch.device("cpu"))
    assert (warped == images.numpy()).all()


def test_wanet_warp_is_small_bounded_and_proportional_to_strength():
    from bdsweep.attacks.wanet import identity_grid

    size = 32
    context = hook_context(size=size)
    displacement = {s: (make_hook("wanet", context, s=s).grid - identity_grid(size)).abs() * (size - 1) / 2
                    for s in (0.25, 0.5)}
    assert 0.05 < displacement[0.5].max() < 1.0  # under one pixel at the default strength
    assert torch.allclose(displacement[0.25], displacement[0.5] / 2, atol=1e-6)


@pytest.mark.parametrize("name, extra_share", [("wanet", 0.5), ("bpp", 0.1)])
def test_training_time_hooks_poison_their_share_and_never_the_pool(name, extra_share):
    context = hook_context(ratio=0.25, pool=range(0, 64, 2))  # every even image is reserved
    hook = make_hook(name, context)
    indices = torch.arange(32)
    images = context.images[indices].permute(0, 3, 1, 2).float() / 255
    labels = context.labels[indices]
    out, new_labels, extra = hook.poison(images, labels, indices)
    changed = (out != images).flatten(1).any(1)
    relabelled = new_labels != labels
    assert extra is None
    assert not changed[::2].any() and not relabelled[::2].any()  # reserved images untouched
    backdoor = torch.arange(1, 2 * int(0.25 * 32), 2)  # the first eight eligible positions
    assert (new_labels[backdoor] == 0).all()
    kept = ~torch.isin(torch.arange(32), backdoor)
    assert (new_labels[kept] == labels[kept]).all()
    others = torch.arange(2 * int(0.25 * 32) + 1, 32, 2)[: int(extra_share * 32)]
    assert changed[others].all()  # cross / negative samples are modified, with their labels kept
    assert hook.effective_ratio == pytest.approx(8 / 32)


def test_bpp_quantises_to_exactly_eight_levels_per_channel():
    context = hook_context()
    ramp = np.tile(np.arange(256, dtype=np.uint8), 4).reshape(4, 16, 16, 1).repeat(3, axis=3)
    quantised = apply_in_batches(ramp, make_hook("bpp", context).trigger, torch.device("cpu"))
    levels = np.rint(np.arange(8) * 255 / 7)
    for channel in range(3):
        assert sorted(np.unique(quantised[..., channel])) == list(levels)
    assert np.abs(quantised.astype(int) - ramp).max() <= 19  # nearest level: at most half a step


def test_bpp_negative_samples_add_another_images_quantisation_residual():
    context = hook_context(ratio=0.0)
    hook = make_hook("bpp", context, negative_ratio=0.5)
    indices = torch.arange(32)
    images = context.images[indices].permute(0, 3, 1, 2).float() / 255
    out, labels, _ = hook.poison(images, context.labels[indices], indices)
    difference = torch.round((out - images)[:16] * 255)
    assert (labels == context.labels[indices]).all()
    assert difference.abs().max() <= 19 and (difference != 0).any() and (out[16:] == images[16:]).all()
