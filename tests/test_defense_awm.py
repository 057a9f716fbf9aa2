"""AWM as the survey ran it (FORK's AWN): soft masks on BN neurons stay in [0, 1], the returned model is
the original with every BN weight times its mask, the universal trigger lives in normalised space within
its L1 bound, perturbed images are clamped to [0, 1] in normalised space (FORK's quirk) or to the valid
pixel range, one pass per phase with batches of 256, few data degrade as documented, and it removes a
backdoor."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bdsweep.defenses.awm as awm
from bdsweep.defenses import Defended, MitigationData, run_seed
from bdsweep.defenses.awm import AWMParams, learn_mask, masked_forward, neuron_masks, perturbed, universal_perturbation
from bdsweep.engine import Normalisation
from bdsweep.models import batch_norms, create_model
from bdsweep.registry import DEFENSES
from conftest import defend

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def tiny_data(per_class=2, num_classes=3, size=8, seed=0) -> MitigationData:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randint(0, 120, (len(labels), size, size, 3), generator=generator, dtype=torch.uint8)
    images[..., 0] += (labels * 60).to(torch.uint8).view(-1, 1, 1)  # a learnable class cue
    return MitigationData(images, labels, Normalisation((0.5,) * 3, (0.25,) * 3, False), size, num_classes)


def tiny_model(num_classes=3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, num_classes)).eval()
    with torch.no_grad():
        for _, bn in batch_norms(model):
            bn.bias.uniform_(-0.2, 0.2)
    return model


def test_params_are_forks_effective_values_and_name_the_hyperparameter_out_of_range():
    assert AWMParams() == AWMParams(epochs=20, inner=1, lr=1e-2, momentum=0.0, lr_decay=0.9, alpha=0.9, gamma=1e-7,
                                    trigger_norm=1000.0, trigger_lr=10.0, batch_size=256, augment=True,
                                    clamp_to_unit=True)
    for name, value in (("alpha", 1.5), ("trigger_norm", 0.0), ("lr_decay", 0.0), ("epochs", 0), ("momentum", 1.0)):
        with pytest.raises(ValueError, match=name):
            AWMParams(**{name: value})


def test_the_masks_are_per_bn_neuron_and_stay_in_zero_one_even_under_a_large_step():
    # A large learning rate and sparsity weight push masks far below 0 without the clip.
    params = AWMParams(epochs=2, lr=5.0, gamma=1.0, batch_size=4)
    masks, _, _ = learn_mask(tiny_model(), tiny_data(), params, torch.Generator().manual_seed(0))
    assert {name: tuple(m.shape) for name, m in masks.items()} == {"1": (4,), "4": (4,)}  # BN neurons, nothing else
    values = torch.cat(list(masks.values()))
    assert values.min() >= 0 and values.max() <= 1
    assert (values == 0).any() and (values < 1).float().mean() > 0.5  # it did move, and hit the bound


def test_the_returned_model_is_the_original_with_bn_weights_times_the_mask():
    model, data, params = tiny_model(), tiny_data(), AWMParams(epochs=2, lr=0.3, batch_size=4)
    original = copy.deepcopy(model.state_dict())
    torch.manual_seed(1)
    masks, _, _ = learn_mask(copy.deepcopy(model), data, params, torch.Generator().manual_seed(run_seed()))
    torch.manual_seed(1)  # the defense draws the same seed
    result = DEFENSES.get("awm").run(model, data, params, CPU)
    assert isinstance(result, Defended)
    state = result.model.state_dict()
    assert any((m < 1).any() for m in masks.values())
    weights = {f"{name}.weight": mask for name, mask in masks.items()}
    for name, value in state.items():
        if name in weights:
            assert torch.allclose(value, original[name] * weights[name])
        else:  # convolutions, BN shifts and statistics, the classifier: untouched
            assert torch.equal(value, original[name]), name
    assert all(p.requires_grad for p in result.model.parameters())  # flags restored
    assert result.details["masked_channels"] == 8


def test_one_pass_per_phase_in_batches_of_256_each_augmented(monkeypatch):
    calls = []
    real = awm.batches

    def record(data, batch_size, generator=None, augment=False, **kwargs):
        calls.append((batch_size, augment))
        return real(data, batch_size, generator, augment, **kwargs)

    monkeypatch.setattr(awm, "batches", record)
    data = tiny_data(per_class=100, num_classes=3)  # 300 images: 2 batches of 256 per pass
    DEFENSES.get("awm").run(tiny_model(), data, AWMParams(epochs=2), CPU)
    # per epoch one trigger pass and one mask pass, augmented; then one plain pass for the statistics
    assert calls == [(256, True)] * 4 + [(256, False)]


@pytest.mark.parametrize("trigger_norm", [0.5, 1000.0])
def test_the_universal_trigger_lives_in_normalised_space_within_its_l1_bound_and_hurts_the_model(trigger_norm):
    model, data = tiny_model(), tiny_data()
    masks = neuron_masks(model)
    forward = masked_forward(model.requires_grad_(False), masks)
    params = AWMParams(inner=5, trigger_norm=trigger_norm, batch_size=6, augment=False)
    delta = universal_perturbation(forward, data, params, torch.Generator().manual_seed(0))
    assert delta.shape == (1, 3, 8, 8)  # one trigger shared by every image
    assert delta.abs().sum() <= trigger_norm * (1 + 1e-5)
    if trigger_norm == 0.5:  # the unconstrained search overshoots: scaled onto the ball's surface
        assert delta.abs().sum() == pytest.approx(trigger_norm, rel=1e-5)
    images = data.normalisation.apply(data.images)  # normalised: FORK's loader normalises
    predicted = forward(images).argmax(1)
    loss = torch.nn.functional.cross_entropy
    assert loss(forward(images + delta), predicted) > loss(forward(images), predicted)


def test_perturbed_images_are_clamped_to_unit_in_normalised_space_unless_asked_otherwise():
    data = tiny_data()
    images = data.normalisation.apply(data.images)  # (x - 0.5) / 0.25: values in [-2, 2]
    delta = torch.zeros(1, 3, 8, 8)
    fork = perturbed(images, delta, data, AWMParams())
    assert fork.min() == 0 and fork.max() <= 1 and (images < 0).any()  # FORK's quirk cuts the dark half
    valid = perturbed(images, delta, data, AWMParams(clamp_to_unit=False))
    assert torch.equal(valid, images)  # valid pixels stay as they are
    far = perturbed(images, torch.full_like(delta, 10.0), data, AWMParams(clamp_to_unit=False))
    assert torch.allclose(far, torch.full_like(far, 2.0))  # the normalised image of pixel value 1


def test_spc_one_and_two_run_full_batch_and_say_so():
    for per_class in (1, 2):
        data = tiny_data(per_class=per_class, num_classes=10)
        result = DEFENSES.get("awm").run(tiny_model(10), data, AWMParams(epochs=1), CPU)
        notes = result.details["notes"]
        assert len(notes) == 1 and f"only {len(data)} mitigation images for batch_size 256" in notes[0]
        assert result.details["masked_channels"] == 8
    enough = DEFENSES.get("awm").run(tiny_model(10), data, AWMParams(epochs=1, batch_size=8), CPU)
    assert enough.details["notes"] == []


# vgg19_bn (plain conv-BN stacks, as small_cnn) is left out only for time: building its 139M-parameter
# torchvision classifier takes seconds on a shared CPU.
@pytest.mark.parametrize("architecture", ["small_cnn", "preact_resnet18", "efficientnet_b3", "mobilenet_v3_large"])
def test_every_architecture_runs(architecture):
    torch.manual_seed(0)
    model = create_model(architecture, num_classes=2, image_size=32)
    data = tiny_data(per_class=1, num_classes=2, size=32)
    result = DEFENSES.get("awm").run(model, data, AWMParams(epochs=1), CPU)
    assert result.details["masked_channels"] == sum(bn.num_features for _, bn in batch_norms(model))
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values() if t.is_floating_point())
    assert result.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_awm_removes_the_digits_backdoor_through_the_defend_stage(digits_backdoor):
    params = {"epochs": 5, "inner": 2, "lr": 0.02, "batch_size": 32, "trigger_norm": 100.0}
    record = defend(digits_backdoor, "awm", params)
    assert record["status"] == "ok" and record["family"] == "pruning"
    print(record["pre"], record["post"], record["details"])
    assert record["hyperparameters"]["trigger_norm"] == 100.0 and record["details"]["notes"] == []
    assert 0 < record["details"]["mask_mean"] < 1
    assert record["details"]["trigger_l1"] <= 100.0 * (1 + 1e-5)
    assert record["pre"]["asr"] > 0.7
    assert record["post"]["asr"] < 0.5 * record["pre"]["asr"]
    assert record["post"]["acc"] > 0.75
