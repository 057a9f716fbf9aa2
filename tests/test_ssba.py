"""SSBA: an encoder trained on real (tiny) images hides a sample-specific, near-invisible code that its
decoder reads. One short CPU training (16 px digits) is shared by the module; the rest is cheap."""

import dataclasses

import numpy as np
import pytest
import torch

from bdsweep.attacks import DataPoisoningAttack, ResourceContext, meta_of
from bdsweep.registry import ATTACKS

SIZE = 16
# A short CPU training (about 10 s); the defaults (3000 steps, width 32) are for a GPU. The tiny decoder
# reads the code a little less reliably through the augmentation, hence the lower accuracy target.
TEST_PARAMS = dict(steps=400, batch_size=32, lr=2e-3, width=8, train_images=300, eval_images=100,
                   bit_accuracy_target=0.85)


def digit_images(size: int = SIZE) -> np.ndarray:
    """The real 8x8 handwritten digits, upscaled to ``size`` px and tinted per image, in 30..240 so that
    clipping at 0 or 255 cannot make the residual depend on the image by itself."""
    from sklearn.datasets import load_digits

    digits = load_digits().images  # (1797, 8, 8), 0..16
    factor = size // 8
    grey = 40 + 10.5 * np.kron(digits, np.ones((1, factor, factor)))
    tint = np.random.default_rng(0).uniform(0.75, 1.15, size=(len(digits), 1, 1, 3))
    return np.clip(np.rint(grey[..., None] * tint), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def attack():
    return ATTACKS.get("ssba")


@pytest.fixture(scope="module")
def trained(attack):
    """(params, resource, held-out clean images, their poisoned copies)."""
    images = digit_images()
    params = attack.params(**TEST_PARAMS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster, and robust on a busy machine
    try:
        resource = attack.make_resource(ResourceContext(SIZE, seed=0, train_images=images[:1000]), params)
        held_out = images[1000:1200]
        return params, resource, held_out, attack.apply_trigger(held_out, resource, params)
    finally:
        torch.set_num_threads(threads)


def psnr(clean: np.ndarray, poisoned: np.ndarray) -> np.ndarray:
    mse = ((poisoned.astype(np.float64) - clean) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))


def test_registered_as_a_dirty_label_per_dataset_data_poisoning_attack(attack):
    assert isinstance(attack, DataPoisoningAttack)
    assert not attack.clean_label and not attack.per_architecture
    defaults = attack.params()
    assert defaults.secret_bits == 1 and 0 < defaults.max_residual <= 0.1


def test_trigger_is_a_small_bounded_residual(trained):
    params, resource, clean, poisoned = trained
    assert poisoned.dtype == np.uint8 and poisoned.shape == clean.shape
    residual = poisoned.astype(np.int16) - clean
    assert np.abs(residual).max() <= round(255 * params.max_residual) + 1
    assert np.abs(residual).mean() >= 0.3  # but a trigger is there
    meta = meta_of(resource)
    assert psnr(clean, poisoned).mean() > 30
    assert meta["psnr_db"] > 30
    assert meta["max_abs_residual"] <= round(255 * params.max_residual) + 1


def test_trigger_is_sample_specific_and_follows_the_image_content(trained):
    from bdsweep.attacks.ssba import visibility

    _, _, clean, poisoned = trained
    residual = (poisoned.astype(np.int16) - clean).astype(np.float64)
    flat = residual.reshape(len(residual), -1)
    size = np.abs(flat).mean()
    # Not one additive pattern (as BadNets, Blended or SIG): residuals of different images differ by a
    # large part of their size, and the common (mean) pattern explains only part of them.
    assert np.median(np.abs(flat[:-1] - flat[1:]).mean(1)) > 0.5 * size
    common = flat.mean(0)
    assert 1 - ((flat - common) ** 2).sum() / (flat**2).sum() < 0.8
    # It follows the content: strong on the strokes' texture, weak on the flat background.
    mask = visibility(torch.from_numpy(clean).permute(0, 3, 1, 2).float() / 255)[:, 0].numpy()
    strength = np.abs(residual).mean(3)
    low, high = np.quantile(mask, [0.25, 0.75])
    assert strength[mask >= high].mean() > 2 * strength[mask <= low].mean()


def test_decoder_reads_the_code(trained):
    from bdsweep.attacks.ssba import load_decoder
    from bdsweep.engine import to_unit

    params, resource, _, poisoned = trained
    meta = meta_of(resource)
    assert meta["bit_accuracy"] >= 0.9 and meta["trigger_bit_accuracy"] >= 0.85
    assert meta["secret_bits"] == 1 and meta["steps"] == params.steps and meta["train_images"] == 300
    decoder = load_decoder(resource, params, torch.device("cpu"))
    with torch.no_grad():
        logits = decoder(to_unit(torch.from_numpy(poisoned)))
    assert (logits > 0).float().mean() >= 0.85  # the all-ones code, on images the encoder never saw


def test_trigger_is_deterministic_and_the_resource_round_trips_through_npz(trained, attack, tmp_path):
    params, resource, clean, poisoned = trained
    np.savez(tmp_path / "ssba.npz", **resource)
    with np.load(tmp_path / "ssba.npz") as stored:  # no pickle needed
        loaded = dict(stored)
    assert meta_of(loaded) == meta_of(resource)
    assert np.array_equal(attack.apply_trigger(clean, loaded, params), poisoned)
    assert np.array_equal(attack.apply_trigger(clean, resource, params), poisoned)
    # Per-image: an image's trigger does not depend on the batch it is stamped with.
    assert np.array_equal(attack.apply_trigger(clean[5:7], resource, params), poisoned[5:7])


def test_training_is_seeded_and_leaves_the_global_rng_alone(attack, tmp_path):
    images = digit_images()
    np.save(tmp_path / "x.npy", images[:200])
    memmap = np.load(tmp_path / "x.npy", mmap_mode="r")  # as the pipeline passes training images
    params = attack.params(steps=4, batch_size=8, width=4, train_images=50, eval_images=20)
    state = torch.get_rng_state()
    first = attack.make_resource(ResourceContext(SIZE, seed=3, train_images=memmap), params)
    assert torch.equal(torch.get_rng_state(), state)
    second = attack.make_resource(ResourceContext(SIZE, seed=3, train_images=memmap), params)
    other = attack.make_resource(ResourceContext(SIZE, seed=4, train_images=memmap), params)
    assert first.keys() == second.keys() and any(k.startswith("encoder.") for k in first)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first if k.startswith("encoder."))


@pytest.mark.parametrize("size", [32, 64])
def test_works_at_the_benchmark_image_sizes(attack, size):
    images = digit_images(size)[:40]
    params = attack.params(steps=2, batch_size=4, width=4, train_images=30, eval_images=10)
    resource = attack.make_resource(ResourceContext(size, train_images=images), params)
    assert meta_of(resource)["image_size"] == size
    poisoned = attack.apply_trigger(images, resource, params)
    assert poisoned.shape == images.shape and poisoned.dtype == np.uint8
    assert np.abs(poisoned.astype(np.int16) - images).max() <= round(255 * params.max_residual) + 1


def test_needs_training_images(attack):
    with pytest.raises(ValueError, match="train_images"):
        attack.make_resource(ResourceContext(SIZE), attack.params(steps=1))


@pytest.mark.parametrize("field,value", [("max_residual", 0.0), ("max_residual", -0.1), ("secret_bits", 0),
                                         ("steps", 0), ("lr", 0.0), ("image_loss_weight", -1.0),
                                         ("image_loss_ramp", 1.5)])
def test_bad_hyperparameters_are_named(attack, field, value):
    with pytest.raises(ValueError, match=field):
        attack.params(**{field: value})


def test_hyperparameters_resolve_from_configuration(attack):
    from bdsweep.params import resolve

    params = resolve(attack.params, {"max_residual": 0.03, "steps": 100}, "attack 'ssba'")
    assert params.max_residual == 0.03 and params.steps == 100
    assert {f.name for f in dataclasses.fields(params)} >= {"secret_bits", "max_residual", "steps", "batch_size",
                                                            "lr", "image_loss_weight", "train_images"}
