"""LF's default generator, the survey toolkit's DeepFool universal perturbation with a Gaussian low-pass
(``bdsweep.attacks.lf``): the filter, the DeepFool step, the search and the trigger it makes. The ready
trigger files (``pattern``) are golden-tested in test_triggers_golden.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdsweep.attacks import ResourceContext, meta_of
from bdsweep.attacks.lf import (
    LFParams,
    gaussian_kernel,
    gaussian_low_pass,
    low_frequency_energy,
    min_max,
    targeted_deepfool,
)
from bdsweep.engine import Normalisation
from bdsweep.registry import ATTACKS
from conftest import SHARED_RESOURCES, requires_shared

NORMALISATION = Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), hflip=False)
SIZE = 32
SHIPPED = SHARED_RESOURCES / "lowFrequency" / "cifar10_preactresnet18_0_255.npy"


def test_gaussian_kernel_is_the_toolkits_sigma_6_over_30_taps():
    kernel = gaussian_kernel(6.0, 30).double()
    positions = torch.arange(30, dtype=torch.float64) - 14.5
    assert kernel.sum() == pytest.approx(1, abs=1e-6) and torch.equal(kernel, kernel.flip(0))
    # exp(-x^2 / (2 sigma^2)): the log-ratio of any tap to the central ones (x = 0.5) gives 1 / sigma^2
    outer = positions.abs() > 1
    inverse_variance = -2 * torch.log(kernel[outer] / kernel[14]) / (positions[outer] ** 2 - 0.25)
    assert torch.allclose(inverse_variance, torch.full_like(inverse_variance, 1 / 36), rtol=1e-4)


def test_gaussian_low_pass_is_the_zero_padded_separable_blur():
    impulse = torch.zeros(1, 3, 64, 64)
    impulse[0, :, 30, 40] = 1
    blurred = gaussian_low_pass(impulse, 6.0, 30)[0, 0]
    kernel = gaussian_kernel(6.0, 30)
    # the even kernel pads 14 before and 15 after: pixel i sees taps k[i - c + 15], a half-pixel shift
    expected = torch.zeros(64, 64)
    rows, cols = torch.arange(15, 45), torch.arange(25, 55)
    expected[15:45, 25:55] = torch.outer(kernel[rows - 30 + 15], kernel[cols - 40 + 15])
    assert blurred.shape == (64, 64) and torch.allclose(blurred, expected, atol=1e-7)
    flat = gaussian_low_pass(torch.ones(1, 3, 64, 64), 6.0, 30)[0, 0]
    assert flat[20:44, 20:44].allclose(torch.ones(24, 24))
    # zero padding darkens the borders: the corner keeps the taps that land inside, on both axes
    assert flat[0, 0] == pytest.approx(float(kernel[14:].sum()) ** 2, rel=1e-5) and flat[0, 0] < 0.35


def test_min_max_spans_zero_to_scale_and_keeps_a_flat_input_at_zero():
    values = torch.randn(1, 3, 8, 8)
    scaled = min_max(values, 0.2)
    assert scaled.min() == 0 and scaled.max() == pytest.approx(0.2) and (scaled.argmax() == values.argmax())
    assert (min_max(torch.full((1, 3, 8, 8), 5.0), 0.2) == 0).all()


class Linear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
        self.inputs: list[torch.Tensor] = []

    def forward(self, images):
        self.inputs.append(images.detach())
        return images.flatten(1) @ self.weight.T + self.bias


def test_deepfool_on_a_linear_model_steps_onto_the_boundary_with_the_overshoot_in_one_iteration():
    torch.manual_seed(0)
    model = Linear(torch.randn(4, 3 * 8 * 8), torch.zeros(4))
    image = torch.rand(1, 3, 8, 8)
    first = int(model(image).argmax())
    target = (first + 1) % 4
    step, iterations = targeted_deepfool(model, image, target, 0.02, 200)
    direction = (model.weight[target] - model.weight[first]).detach().view(1, 3, 8, 8)
    margin = (model(image)[0, target] - model(image)[0, first]).detach()
    assert iterations == 1 and torch.allclose(step, 1.02 * margin.abs() * direction / direction.norm() ** 2,
                                              rtol=1e-5, atol=1e-7)
    assert int(model(image + step).argmax()) == target
    none, zero_iterations = targeted_deepfool(model, image, first, 0.02, 200)  # already the target
    assert zero_iterations == 0 and (none == 0).all()


def bump_model(target: int = 0) -> Linear:
    """A linear model whose target logit rises with a smooth bright bump in the red channel and falls
    with one in green; the others are small noise. Clean random images are almost never the target."""
    grid = torch.arange(SIZE, dtype=torch.float32) - (SIZE - 1) / 2
    bump = torch.exp(-(grid.view(-1, 1) ** 2 + grid.view(1, -1) ** 2) / (2 * 8.0**2))
    weight = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 0.01
    weight[target] = 0.1 * torch.stack([bump, -bump, torch.zeros_like(bump)])
    return Linear(weight.flatten(1), torch.tensor([-2.0, 0.0, 0.0, 0.0]))


def lf_resource(model, count=60, seed=0, **overrides):
    images = np.random.default_rng(0).integers(0, 256, size=(count, SIZE, SIZE, 3), dtype=np.uint8)
    context = ResourceContext(SIZE, 4, 0, seed, torch.device("cpu"), NORMALISATION, images, np.arange(count) % 4,
                              model)
    attack = ATTACKS.get("lf")
    params = attack.params(images=20, **overrides)
    return attack.make_resource(context, params), images, params


def test_the_trigger_is_low_frequency_in_the_toolkits_range_and_sends_images_to_the_target():
    model = bump_model()
    resource, images, params = lf_resource(model)
    perturbation, meta = resource["perturbation"], meta_of(resource)
    assert perturbation.shape == (SIZE, SIZE, 3) and perturbation.dtype == np.float32
    assert perturbation.min() == 0 and np.floor(perturbation).max() == 51  # uint8(v x 255) of v in [0, 0.2]
    assert low_frequency_energy(perturbation, 1) > 0.85 and meta["low_frequency_energy"]["1"] > 0.85
    red, green, _ = perturbation.mean(axis=(0, 1))
    assert red > green + 10  # the direction the target's weights reward, found by DeepFool
    with torch.no_grad():
        clean = model(NORMALISATION.apply(torch.from_numpy(images[images.shape[0] // 2:]))).argmax(1)
    assert (clean == 0).float().mean() <= 0.2 and meta["target_rate_on_clean_model"] > 0.8
    assert meta["updates"] >= 1 and 1 <= meta["passes"] <= params.passes
    stamped = ATTACKS.get("lf").apply_trigger(np.zeros((1, SIZE, SIZE, 3), np.uint8), resource, params)
    assert (stamped[0] == np.floor(perturbation)).all()
    rounded = ATTACKS.get("lf").apply_trigger(np.zeros((1, SIZE, SIZE, 3), np.uint8), resource,
                                              LFParams(rounding="round"))
    assert (rounded[0] == np.rint(perturbation)).all()


def test_the_trigger_is_deterministic_for_a_seed():
    first, _, _ = lf_resource(bump_model(), seed=3)
    again, _, _ = lf_resource(bump_model(), seed=3)
    other, _, _ = lf_resource(bump_model(), seed=4)
    assert np.array_equal(first["perturbation"], again["perturbation"])
    assert meta_of(first) == meta_of(again) and meta_of(first)["fooling_rates"] == meta_of(again)["fooling_rates"]
    assert not np.array_equal(first["perturbation"], other["perturbation"])  # other images, other order


def test_the_search_stops_on_a_plateau_or_at_the_pass_limit():
    """A model that no perturbation moves (constant logits): DeepFool never converges, so no step is
    used and v stays 0; the check rate stays 0, so the toolkit's rule ends the search after
    ``plateau_passes`` passes; ``passes`` caps it earlier."""
    constant = Linear(torch.zeros(4, 3 * SIZE * SIZE), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    plateau, _, _ = lf_resource(constant, deepfool_iterations=3)
    assert meta_of(plateau)["fooling_rates"] == [0.0] * 5 and meta_of(plateau)["updates"] == 0
    assert (plateau["perturbation"] == 0).all()
    capped, _, _ = lf_resource(constant, passes=2, deepfool_iterations=3)
    assert meta_of(capped)["passes"] == 2
    reached, _, _ = lf_resource(bump_model(), check_images=10, stop_fooling_rate=0.1)
    assert meta_of(reached)["fooling_rates"][-1] >= 0.1


def test_deepfool_sees_unnormalised_images_by_default_as_the_toolkit():
    default = bump_model()
    lf_resource(default)
    corrected = bump_model()
    lf_resource(corrected, normalised_input=True)
    assert default.inputs[0].min() >= 0  # the first call classifies the fitted images as they are
    assert corrected.inputs[0].min() < -1  # normalise(x) with mean 0.5 and std 0.25


@pytest.mark.parametrize("overrides, message", [
    ({"algorithm": "fft"}, "algorithm"), ({"deepfool_iterations": 1}, "deepfool_iterations"),
    ({"stop_fooling_rate": 0}, "stop_fooling_rate"), ({"sigma": 0}, "sigma"), ({"kernel_size": 0}, "kernel_size"),
    ({"overshoot": -0.1}, "overshoot"), ({"check_images": 0}, "check_images")])
def test_bad_parameters_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        LFParams(**overrides)


@requires_shared(SHIPPED)
def test_the_generated_triggers_spectrum_is_the_shipped_files():
    """The toolkit's shipped CIFAR-10 PreAct trigger and bdsweep's, each within radius 1, 2 and 4."""
    resource, _, _ = lf_resource(bump_model())
    shipped = np.load(SHIPPED).astype(np.float64)
    ours = meta_of(resource)["low_frequency_energy"]
    for radius in (1, 2, 4):
        assert ours[str(radius)] == pytest.approx(low_frequency_energy(shipped, radius), abs=0.05)
