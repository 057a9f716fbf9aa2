"""MM-BD as the survey's code set it up: bounds on exactly FORK's layers per architecture, one
layer-wide initial bound, no projection, all images, FORK's lambda rule, the final bounds returned;
on the digits backdoor model and tiny models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bdsweep.defenses.mmbd as mmbd
from bdsweep.data.store import PreparedDataset
from bdsweep.defenses import MitigationData
from bdsweep.defenses.mmbd import ActivationBound, MMBDParams, bounded_layers, update_lambda
from bdsweep.engine import Normalisation
from bdsweep.model_file import load_model
from bdsweep.models import create_model
from bdsweep.registry import DEFENSES
from bdsweep.runs import mitigation_data
from conftest import defend

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def digits_model_and_data(root, per_class=10):
    model, _ = load_model(root / "model.pt")
    indices = np.load(root / "spc10.npy")
    labels = np.load(root / "data" / "y_train.npy")[indices]
    indices = np.concatenate([indices[labels == c][:per_class] for c in np.unique(labels)])
    return model, mitigation_data(PreparedDataset(root / "data"), indices, CPU)


def run(model, data, **params):
    torch.manual_seed(0)
    return DEFENSES.get("mm-bd").run(model, data, MMBDParams(**params), CPU)


def clamps(model):
    return [m for m in model.modules() if isinstance(m, ActivationBound)]


def fork_layers(model, architecture):
    """FORK's bounded layers, transcribed per architecture from mm-bd.py's setup_mask_* functions
    (their intent: setup_mask_mobilenet's ReLUs included)."""
    modules = list(model.named_modules())
    of = lambda kind: [name for name, m in modules if isinstance(m, kind)]  # noqa: E731
    if architecture == "vgg19_bn":
        return of(nn.ReLU)[:-2]  # the two head ReLUs dropped
    if architecture == "efficientnet_b3":
        return of(nn.SiLU)
    if architecture == "mobilenet_v3_large":
        hardswish, relu = of(nn.Hardswish)[:-1], of(nn.ReLU)  # the head's Hardswish dropped
        return [name for name, _ in modules if name in set(hardswish) | set(relu)]
    if architecture == "preact_resnet18":
        return of(nn.BatchNorm2d)  # every BN, bounded after a ReLU
    if architecture == "small_cnn":  # not in FORK: conv-BN-ReLU blocks, the VGG rule
        return of(nn.ReLU)
    raise AssertionError(architecture)


@pytest.mark.parametrize("architecture", ["small_cnn", "preact_resnet18", "vgg19_bn", "efficientnet_b3",
                                          "mobilenet_v3_large"])
def test_the_bounded_layers_are_exactly_forks_on_every_architecture(architecture):
    model = create_model(architecture, num_classes=3, image_size=32)
    names, relu_first = bounded_layers(model, torch.zeros(1, 3, 32, 32))
    expected = fork_layers(model, architecture)
    assert names == expected and relu_first == (architecture == "preact_resnet18")
    counts = {"vgg19_bn": 16, "preact_resnet18": 16, "small_cnn": 4}  # PreAct: FORK's 16 BN layers
    if architecture in counts:
        assert len(names) == counts[architecture]


def tiny_data(model, n=3, size=32, classes=3):
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    normalisation = Normalisation((0.5,) * 3, (0.25,) * 3, False)
    with torch.no_grad():  # label the images as the random model does, so there is something to fit
        labels = model.eval()(normalisation.apply(images)).argmax(1)
    return MitigationData(images, labels, normalisation, size, classes)


@pytest.mark.parametrize("architecture", ["small_cnn", "preact_resnet18", "efficientnet_b3", "mobilenet_v3_large"])
def test_every_architecture_gets_its_bounds_inserted_and_runs(architecture):
    torch.manual_seed(0)
    model = create_model(architecture, num_classes=3, image_size=32).eval()
    expected = fork_layers(model, architecture)
    data = tiny_data(model)
    result = run(model, data, epochs=1, lr=0.01, batch_size=2)
    assert result.details["bounded_layers"] == expected and len(clamps(result.model)) == len(expected)
    with torch.no_grad():
        assert torch.isfinite(result.model(data.normalisation.apply(data.images))).all()


def test_one_layer_wide_initial_bound_and_the_clamp_holds(digits_backdoor):
    model, data = digits_model_and_data(digits_backdoor)
    names, _ = bounded_layers(model, data.normalisation.apply(data.images[:1]))
    plain = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: plain.__setitem__(n, o.amax()))
             for n in names]
    with torch.no_grad():
        model(data.normalisation.apply(data.images))
    for hook in hooks:
        hook.remove()
    result = run(copy.deepcopy(model), data, epochs=1, lr=1e-12, augment=False)  # a step too small to move them
    initial = result.details["initial_bounds"]
    for name, top in zip(names, initial):  # the largest output of the layer, over all channels and images
        assert top == pytest.approx(float(plain[name]), rel=1e-6)
    for clamp, top in zip(clamps(result.model), initial):
        assert torch.allclose(clamp.bound, torch.full_like(clamp.bound, top), rtol=1e-6)  # one value per layer
    # Inputs far outside the data drive activations over the bounds: the clamp holds them at it.
    seen = []
    hooks = [c.register_forward_hook(lambda m, i, o: seen.append((i[0], o, m.bound))) for c in clamps(result.model)]
    with torch.no_grad():
        result.model(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 20)
    for hook in hooks:
        hook.remove()
    assert any((before > bound.view(1, -1, 1, 1)).any() for before, _, bound in seen)
    for before, after, bound in seen:
        assert torch.equal(after, torch.clamp(before, max=bound.view(1, -1, 1, 1)))


def test_bounds_are_not_projected_and_the_final_ones_are_returned(digits_backdoor, monkeypatch):
    model, data = digits_model_and_data(digits_backdoor)
    per_epoch = []
    real = mmbd.fit_epoch

    def record(model, reference, data, progress, params, watch):
        accuracy = real(model, reference, data, progress, params, watch)
        per_epoch.append([c.bound.detach().clone() for c in progress.clamps])
        return accuracy

    monkeypatch.setattr(mmbd, "fit_epoch", record)
    # No penalty: the MSE alone can only push clipped bounds UP; with a large step some rise above the start.
    result = run(copy.deepcopy(model), data, epochs=3, lr=0.5, lam=0.0)
    initial = result.details["initial_bounds"]
    assert any((b > top + 1e-3).any() for b, top in zip(per_epoch[-1], initial))
    assert all(torch.equal(c.bound, b) for c, b in zip(clamps(result.model), per_epoch[-1]))
    # A strong penalty shrinks them far, and the last epoch's bounds are returned even if accuracy suffers.
    per_epoch.clear()
    result = run(copy.deepcopy(model), data, epochs=10, lr=1.0, lam=50.0)
    assert all(torch.equal(c.bound, b) for c, b in zip(clamps(result.model), per_epoch[-1]))
    assert result.details["channels_reduced_below_half"] > 0


def test_lambda_rule_is_forks():
    params = MMBDParams()
    # 0-based epochs 10, 20, 30, 40 only; strictly above initial - 0.05 grows, equal shrinks.
    assert update_lambda(0.5, 0, 1.0, 0.9, params) == 0.5 and update_lambda(0.5, 9, 1.0, 0.9, params) == 0.5
    assert update_lambda(0.5, 10, 0.86, 0.9, params) == pytest.approx(0.6)
    assert update_lambda(0.5, 20, 0.85, 0.9, params) == pytest.approx(0.5 / 1.2)
    assert update_lambda(0.5, 30, 0.80, 0.9, params) == pytest.approx(0.5 / 1.2)


def test_lambda_updates_follow_the_training_accuracy_and_all_images_are_used(digits_backdoor):
    model, data = digits_model_and_data(digits_backdoor, per_class=2)
    wrong = MitigationData(data.images, (data.labels + 1) % data.num_classes, data.normalisation, data.image_size,
                           data.num_classes)  # labels the model never predicts: FORK uses them all the same
    for mitigation in (data, wrong):
        result = run(copy.deepcopy(model), mitigation, epochs=7, lr=1e-9, lambda_every=3, augment=False)
        # lr ~0: training accuracy = initial accuracy (> initial - 0.05) after 0-based epochs 3 and 6
        assert result.details["lambda_final"] == pytest.approx(0.5 * 1.2 ** 2)
        assert len(result.details["train_accuracy_by_epoch"]) == 7
    broken = run(copy.deepcopy(model), data, epochs=7, lr=1.0, lam=50.0, lambda_every=3, allowed_drop=0.0)
    assert broken.details["lambda_final"] < 50.0
    with pytest.raises(ValueError, match="allowed_drop"):
        MMBDParams(allowed_drop=1.5)


def test_few_images_are_noted(digits_backdoor):
    model, data = digits_model_and_data(digits_backdoor, per_class=1)  # SPC 1
    result = run(copy.deepcopy(model), data, epochs=2, lr=0.01)
    assert len(clamps(result.model)) == 4
    assert any("one full-batch step per epoch" in note for note in result.details["notes"])


def test_mm_bd_through_the_defend_stage_lowers_asr(digits_backdoor):
    # No projection and the last bounds returned: a narrow window on this model. Measured at lr 0.1 with the
    # defend stage's seeds for coordinates seed 0-2 (one thread; pre ASR 0.92, ACC 0.95): 30 epochs leave ASR
    # at 0.51-0.57; 35 give ASR 0.27-0.33 and ACC 0.929-0.933; 38 give ASR 0.14-0.17, ACC 0.90-0.93; 45 cost
    # 40 points of accuracy. At 35 both bounds below keep a margin of at least 0.07 (issue 23).
    record = defend(digits_backdoor, "mm-bd", {"epochs": 35, "lr": 0.1}, out="mmbd.json")
    assert record["status"] == "ok" and record["defense"] == "mm-bd" and record["family"] == "pruning"
    print(record["pre"], record["post"], record["details"]["lambda_final"])
    assert record["hyperparameters"]["lr"] == 0.1 and record["details"]["bounded_channels"] > 0
    assert record["pre"]["asr"] > 0.7
    assert record["post"]["asr"] < 0.5 * record["pre"]["asr"]
    assert record["post"]["acc"] > record["pre"]["acc"] - 0.1
