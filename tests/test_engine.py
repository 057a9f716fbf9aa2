"""The training engine: on-device augmentation, determinism, model files."""

from __future__ import annotations

import pytest
import torch

from bdsweep.engine import BatchHook, Normalisation, augment_batch, predict, train
from bdsweep.model_file import load_model, save_model
from bdsweep.models import create_model
from bdsweep.recipe import Recipe

NORMALISATION = Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), hflip=True)


def test_random_crop_shifts_the_image_inside_zero_padding():
    image = torch.arange(1, 8 * 8 + 1, dtype=torch.uint8).view(1, 1, 8, 8).expand(64, 3, 8, 8).contiguous()
    generator = torch.Generator().manual_seed(0)
    cropped = augment_batch(image, padding=2, hflip=False, generator=generator)
    assert cropped.shape == image.shape and cropped.dtype == torch.uint8
    padded = torch.nn.functional.pad(image[0, 0], (2, 2, 2, 2))
    windows = {(dy, dx) for dy in range(5) for dx in range(5)}
    found = set()
    for crop in cropped[:, 0]:
        match = [(dy, dx) for dy, dx in windows if torch.equal(padded[dy:dy + 8, dx:dx + 8], crop)]
        assert len(match) == 1
        found.add(match[0])
    assert len(found) > 10  # offsets vary across the batch


def test_horizontal_flip_flips_about_half_and_only_when_allowed():
    batch = torch.randint(0, 255, (200, 3, 6, 6), dtype=torch.uint8)
    flipped = augment_batch(batch, padding=0, hflip=True, generator=torch.Generator().manual_seed(1))
    is_flipped = (flipped == batch.flip(3)).flatten(1).all(1)
    is_same = (flipped == batch).flatten(1).all(1)
    assert (is_flipped | is_same).all() and 60 < int(is_flipped.sum()) < 140
    assert torch.equal(augment_batch(batch, 0, False, torch.Generator().manual_seed(1)), batch)


def run_training(seed):
    torch.manual_seed(seed)
    model = create_model("small_cnn", 3, 16)
    images = torch.randint(0, 255, (48, 16, 16, 3), dtype=torch.uint8)
    labels = torch.arange(48) % 3
    curve = train(model, images, labels, Recipe(epochs=2, batch_size=16, lr=0.05), NORMALISATION, seed=seed)
    return model, curve, images


def without_timing(curve):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in curve]


def test_same_seed_same_weights_and_curve_on_cpu():
    (a, curve_a, _), (b, curve_b, _) = run_training(3), run_training(3)
    assert without_timing(curve_a) == without_timing(curve_b) and len(curve_a) == 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c, _, _ = run_training(4)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_model_files_carry_metadata_and_load_weights_only(tmp_path):
    model, _, images = run_training(0)
    meta = {"architecture": "small_cnn", "num_classes": 3, "image_size": 16, "attack": "badnets", "ratio": 0.1}
    save_model(tmp_path / "m.pt", model, meta)
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert blob["meta"] == meta
    loaded, loaded_meta = load_model(tmp_path / "m.pt")
    assert loaded_meta == meta
    device = torch.device("cpu")
    assert (predict(loaded, images, NORMALISATION, device) == predict(model, images, NORMALISATION, device)).all()


def test_truncated_model_file_is_an_error_naming_the_path(tmp_path):
    model, _, _ = run_training(0)
    save_model(tmp_path / "m.pt", model, {"architecture": "small_cnn", "num_classes": 3, "image_size": 16})
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"corrupt model file {tmp_path / 'm.pt'}"):
        load_model(tmp_path / "m.pt")


def test_the_attack_hook_takes_part_in_every_training_batch():
    """Training-time attacks poison through this hook; here it relabels every batch to class 2
    and counts the optimiser steps and epochs it is told about."""
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, 16)
    images = torch.randint(0, 255, (48, 16, 16, 3), dtype=torch.uint8)

    class Relabel(BatchHook):
        def __init__(self):
            self.batches, self.steps, self.epochs, self.seen = [], 0, 0, set()

        def transform(self, x, y, indices):
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16) and 0 <= x.min() and x.max() <= 1
            self.batches.append(len(y))
            self.seen.update(indices.tolist())
            return x, torch.full_like(y, 2), None

        def step(self):
            self.steps += 1

        def end_epoch(self):
            self.epochs += 1

    hook = Relabel()
    train(model, images, torch.arange(48) % 3, Recipe(epochs=3, batch_size=16, lr=0.05), NORMALISATION, seed=0,
          hook=hook)
    assert hook.batches == [16] * 9 and hook.steps == 9 and hook.epochs == 3 and hook.seen == set(range(48))
    assert (predict(model, images, NORMALISATION, torch.device("cpu")) == 2).all()


def test_normalising_in_inference_mode_first_does_not_break_autograd_later():
    """The per-device mean/std tensors are cached; made in inference mode, they would poison
    every later differentiable use (defenses that optimise inputs after an evaluation)."""
    normalisation = Normalisation((0.3, 0.2, 0.1), (0.5, 0.6, 0.7), hflip=False)
    with torch.inference_mode():
        normalisation.normalise(torch.rand(1, 3, 4, 4))
    images = torch.rand(1, 3, 4, 4, requires_grad=True)
    normalisation.normalise(images).sum().backward()
    assert torch.allclose(images.grad, 1 / torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1).expand(1, 3, 4, 4))


def test_a_defense_hook_sets_the_objective_and_sees_each_backward_pass():
    """Defenses train through the same loop: ``loss`` replaces the objective (here: only shrink
    the weights, with Adam) and ``after_backward`` sees the inputs the model saw, once per batch."""
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, 16)
    images = torch.randint(0, 255, (32, 16, 16, 3), dtype=torch.uint8)
    norm_before = sum(float(p.detach().norm()) for p in model.parameters())

    class ShrinkWeights(BatchHook):
        def __init__(self):
            self.inputs = []

        def loss(self, inputs, labels, logits, cross_entropy):
            return 0.0 * cross_entropy + sum(p.square().sum() for p in model.parameters())

        def after_backward(self, inputs, labels):
            assert all(p.grad is not None for p in model.parameters())
            self.inputs.append(inputs.shape)

    hook = ShrinkWeights()
    train(model, images, torch.arange(32) % 3, Recipe(epochs=2, batch_size=16, lr=0.01, optimizer="adam"),
          NORMALISATION, seed=0, hook=hook)
    assert hook.inputs == [(16, 3, 16, 16)] * 4
    assert sum(float(p.detach().norm()) for p in model.parameters()) < 0.9 * norm_before
    with pytest.raises(ValueError, match="optimizer"):
        Recipe(optimizer="rmsprop")
