"""SSBA: the default generator is FORK's (BackdoorBench ``resource/ssba``: StegaStamp, 100 bits, L2 ramp), checked
by its facts and one short CPU training; the bounded generator's encoder, trained on real (tiny) images, hides
a sample-specific, near-invisible code that its decoder reads. One short CPU training (16 px digits) of the
bounded generator is shared by the module; the rest is cheap."""

import dataclasses

import numpy as np
import pytest
import torch

from bdsweep.attacks import DataPoisoningAttack, ResourceContext, meta_of
from bdsweep.registry import ATTACKS

SIZE = 16
# A short CPU training of the bounded generator (about 10 s); its defaults (3000 steps, width 32) are for a
# GPU. The tiny decoder reads the code a little less reliably through the augmentation, hence the lower
# accuracy target.
TEST_PARAMS = dict(generator="bounded", steps=400, batch_size=32, lr=2e-3, width=8, train_images=300, eval_images=100,
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


@pytest.mark.parametrize("generator", ["stegastamp", "bounded"])
def test_training_is_seeded_and_leaves_the_global_rng_alone(attack, tmp_path, generator):
    images = digit_images()
    np.save(tmp_path / "x.npy", images[:200])
    memmap = np.load(tmp_path / "x.npy", mmap_mode="r")  # as the pipeline passes training images
    params = attack.params(generator=generator, steps=4, epochs=1, batch_size=8, width=4, train_images=50,
                           eval_images=20)
    state = torch.get_rng_state()
    first = attack.make_resource(ResourceContext(SIZE, seed=3, train_images=memmap), params)
    assert torch.equal(torch.get_rng_state(), state)
    second = attack.make_resource(ResourceContext(SIZE, seed=3, train_images=memmap), params)
    other = attack.make_resource(ResourceContext(SIZE, seed=4, train_images=memmap), params)
    assert first.keys() == second.keys() and any(k.startswith("encoder.") for k in first)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first if k.startswith("encoder."))


@pytest.mark.parametrize("generator", ["stegastamp", "bounded"])
@pytest.mark.parametrize("size", [32, 64])
def test_works_at_the_benchmark_image_sizes(attack, size, generator):
    images = digit_images(size)[:40]
    params = attack.params(generator=generator, steps=2, epochs=1, batch_size=16, width=4, train_images=30,
                           eval_images=10)
    resource = attack.make_resource(ResourceContext(size, train_images=images), params)
    assert meta_of(resource)["image_size"] == size
    poisoned = attack.apply_trigger(images, resource, params)
    assert poisoned.shape == images.shape and poisoned.dtype == np.uint8
    if generator == "bounded":
        assert np.abs(poisoned.astype(np.int16) - images).max() <= round(255 * params.max_residual) + 1


def test_needs_training_images(attack):
    with pytest.raises(ValueError, match="train_images"):
        attack.make_resource(ResourceContext(SIZE), attack.params(steps=1))


@pytest.mark.parametrize("field,value", [("max_residual", 0.0), ("max_residual", -0.1), ("secret_bits", 0),
                                         ("steps", 0), ("lr", 0.0), ("image_loss_weight", -1.0),
                                         ("image_loss_ramp", 1.5), ("generator", "hidden"), ("epochs", 0),
                                         ("train_images", 0), ("l2_loss_weight", -1.0), ("l2_loss_await", -1),
                                         ("l2_loss_ramp", 0)])
def test_bad_hyperparameters_are_named(attack, field, value):
    with pytest.raises(ValueError, match=field):
        attack.params(**{field: value})


def test_hyperparameters_resolve_from_configuration(attack):
    from bdsweep.params import resolve

    params = resolve(attack.params, {"max_residual": 0.03, "steps": 100}, "attack 'ssba'")
    assert params.max_residual == 0.03 and params.steps == 100
    params = resolve(attack.params, {"generator": "bounded", "train_images": None, "lr": 1}, "attack 'ssba'")
    assert params.train_images == 5000 and params.lr == 1.0 and params.secret_bits == 1
    with pytest.raises(TypeError, match="secret_bits"):
        resolve(attack.params, {"secret_bits": "100"}, "attack 'ssba'")
    assert {f.name for f in dataclasses.fields(params)} >= {"secret_bits", "max_residual", "steps", "batch_size",
                                                            "lr", "image_loss_weight", "train_images"}


# --- the default generator: FORK's (BackdoorBench resource/ssba) --------------------------------------------

# BB resource/ssba: train.py:22-32 defaults and the readme's Step 2 example (fingerprint_length 100,
# num_epochs 20, batch_size 64, lr 1e-4, use_residual 0, l2_loss_await/weight/ramp 1000/10/3000), the bit
# accuracy that switches the L2 loss on (train.py:305), the whole training set (train.py:238-242).
FORK_FACTS = {"generator": "stegastamp", "secret_bits": 100, "epochs": 20, "batch_size": 64, "lr": 1e-4,
              "train_images": None, "l2_loss_weight": 10.0, "l2_loss_await": 1000, "l2_loss_ramp": 3000,
              "bit_accuracy_target": 0.9, "width": 32}
# The earlier generator, unchanged when selected.
BOUNDED_DEFAULTS = {"secret_bits": 1, "lr": 1e-3, "train_images": 5000, "steps": 3000, "batch_size": 64,
                    "max_residual": 0.05, "image_loss_weight": 1.0, "image_loss_ramp": 0.3, "width": 32,
                    "bit_accuracy_target": 0.9, "texture_masking": True, "augment": True}
# BB models.py:21,29-50 (encoder) and 87-107 (decoder) at 100 bits, 32 px: (out, in, kernel) of each layer,
# in BB's order; every layer has a bias.
BB_ENCODER = [(768, 100, None), (32, 6, 3), (32, 32, 3), (64, 32, 3), (128, 64, 3), (256, 128, 3), (128, 256, 2),
              (128, 256, 3), (64, 128, 2), (64, 128, 3), (32, 64, 2), (32, 64, 3), (32, 32, 2), (32, 70, 3),
              (32, 32, 3), (3, 32, 1)]
BB_DECODER = [(32, 3, 3), (32, 32, 3), (64, 32, 3), (64, 64, 3), (64, 64, 3), (128, 64, 3), (128, 128, 3),
              (512, 128, None), (100, 512, None)]


def parameter_shapes(module: torch.nn.Module) -> list[tuple]:
    return sorted(tuple(p.shape) for p in module.parameters())


def bb_shapes(layers: list[tuple]) -> list[tuple]:
    shapes = [((out, inp) if k is None else (out, inp, k, k)) for out, inp, k in layers]
    return sorted(shapes + [(out,) for out, _, _ in layers])


@pytest.mark.parametrize("field,value", FORK_FACTS.items())
def test_the_default_generator_has_forks_values(attack, field, value):
    assert getattr(attack.params(), field) == value


@pytest.mark.parametrize("field,value", BOUNDED_DEFAULTS.items())
def test_the_bounded_generator_keeps_its_earlier_defaults(attack, field, value):
    assert getattr(attack.params(generator="bounded"), field) == value


def test_stegastamp_networks_have_bbs_layers():
    from bdsweep.attacks.ssba import StegaStampDecoder, StegaStampEncoder

    assert parameter_shapes(StegaStampEncoder(100)) == bb_shapes(BB_ENCODER)
    assert parameter_shapes(StegaStampDecoder(100, 32)) == bb_shapes(BB_DECODER)
    # BB's dense layer takes resolution^2 * 128 / 32^2 features (models.py:104): 512 at 64 px.
    assert StegaStampDecoder(100, 64).dense[0].in_features == 512


@pytest.mark.parametrize("size", [16, 24, 32])
def test_stegastamp_encoder_outputs_an_image_in_the_unit_range(size):
    from bdsweep.attacks.ssba import StegaStampDecoder, StegaStampEncoder

    torch.manual_seed(0)
    encoder, decoder = StegaStampEncoder(100, width=4), StegaStampDecoder(100, size, width=4)
    images = torch.rand(3, 3, size, size)
    secrets = torch.randint(0, 2, (3, 100)).float()
    with torch.no_grad():
        encoded = encoder(images, secrets)
        flipped = encoder(images, 1 - secrets)
        logits = decoder(encoded)
    assert encoded.shape == images.shape and logits.shape == (3, 100)
    assert encoded.min() > 0 and encoded.max() < 1  # a sigmoid output: the image itself, not bounded near it
    assert not torch.equal(encoded, flipped)  # the secret reaches the output


def test_l2_ramp_follows_bbs_schedule_by_step_and_bit_accuracy():
    from bdsweep.attacks.ssba import L2Ramp

    ramp = L2Ramp(10.0, 1000, 3000, 0.9)
    used = []  # the weight each step's loss uses, steps numbered from 1
    accuracies = [0.5, 0.85, 0.9, 0.95] + [0.1] * 5000  # step 3 is not above 0.9; step 4 activates; then ignored
    for accuracy in accuracies:
        used.append(ramp.weight)
        ramp.after_step(accuracy)
    activation = 4
    assert used[:activation] == [0.0] * activation
    first_positive = next(i for i, w in enumerate(used, 1) if w > 0)
    assert first_positive == activation + 1002  # counter 1001 > await 1000 (train.py:257-265)
    assert used[first_positive - 1] == pytest.approx(10 / 3000)
    assert used[activation + 2500 - 1] == pytest.approx(10 * 1499 / 3000)
    assert used[activation + 4001 - 1] == 10.0 and max(used) == 10.0
    assert used[activation + 4000 - 1] == pytest.approx(10 * 2999 / 3000)
    with pytest.raises(ValueError, match="bit accuracy"):
        L2Ramp(10.0, 1000, 3000, 0.9).after_step(None)  # needed until the switch is on


def test_one_identical_secret_for_every_image(attack):
    from bdsweep.attacks import apply_in_batches
    from bdsweep.attacks.ssba import ENCODER, StegaStampEncoder, load_encoder, trigger_code

    params = attack.params()
    code = trigger_code(params)
    assert code.shape == (100,) and np.array_equal(code, trigger_code(attack.params(epochs=1, lr=1.0)))
    assert 30 <= code.sum() <= 70  # unstructured, as a BCH codeword of text (not all ones)
    torch.manual_seed(0)
    encoder = StegaStampEncoder(100, width=4)
    resource = {ENCODER + k: v.numpy() for k, v in encoder.state_dict().items()}
    params = attack.params(width=4)
    images = digit_images(32)[:6]
    poisoned = attack.apply_trigger(images, resource, params)
    loaded = load_encoder(resource, params, torch.device("cpu"))
    secret = torch.from_numpy(code)
    for i in range(len(images)):  # each image, alone, with the one code: the same bytes (up to batch float noise)
        alone = apply_in_batches(images[i:i + 1], lambda x: loaded(x, secret[None]), torch.device("cpu"))
        assert np.abs(alone.astype(np.int16) - poisoned[i:i + 1]).max() <= 1
    other = apply_in_batches(images, lambda x: loaded(x, 1 - secret.expand(len(x), -1)), torch.device("cpu"))
    assert not np.array_equal(other, poisoned)


def test_a_short_stegastamp_training_reads_the_code_above_chance(attack):
    """FORK's generator on 160 digits at 16 px for 100 steps (about 10 s on one CPU thread). One bit and a
    higher learning rate than FORK's: StegaStamp's decoder starts on a long plateau at chance."""
    images = digit_images()[:160]
    params = attack.params(secret_bits=1, width=4, epochs=10, batch_size=16, lr=3e-3, eval_images=100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resource = attack.make_resource(ResourceContext(SIZE, seed=0, train_images=images), params)
    finally:
        torch.set_num_threads(threads)
    meta = meta_of(resource)
    assert meta["generator"] == "stegastamp" and meta["train_images"] == 160 and meta["steps"] == 100
    assert meta["bit_accuracy"] >= 0.8 and meta["trigger_bit_accuracy"] >= 0.8  # chance: 0.5
    assert meta["curve"][0]["batch_bit_accuracy"] < 0.8  # it was learnt, not there from the start
    assert all(point["l2_loss_weight"] == 0 for point in meta["curve"])  # the L2 loss waits 1000 steps
