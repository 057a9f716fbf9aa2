"""NAD: attention maps are unit-norm and scale-free, the distance vanishes only between equal maps,
distillation pulls the student's attention toward the teacher's, every architecture runs, few data
degrade with notes, and the defend stage end to end."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from bdsweep.defenses import Defended, MitigationData
from bdsweep.defenses.nad import (
    AttentionDistillation,
    NADParams,
    attention_distance,
    attention_gaps,
    attention_map,
)
from bdsweep.defenses.support import layer_outputs, subset
from bdsweep.engine import Normalisation, train
from bdsweep.models import create_model
from bdsweep.registry import ARCHITECTURES, DEFENSES
from bdsweep.results import table_row
from conftest import defend

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_params_are_validated_by_name():
    with pytest.raises(ValueError, match="distance"):
        NADParams(distance="cosine")
    with pytest.raises(ValueError, match="betas"):
        NADParams(layers=("a", "b"), betas=(500.0, -1.0))
    with pytest.raises(ValueError, match="betas"):
        NADParams(layers=("a", "b"), betas=(500.0,))  # one beta per layer
    with pytest.raises(ValueError, match="layers"):
        NADParams(layers=("pooled", "pooled"), betas=(1.0, 1.0))
    defaults = NADParams()  # FORK's choice for every non-PreAct architecture; batch 256, constant 0.01
    assert (defaults.layers, defaults.betas, defaults.batch_size, defaults.lr, defaults.schedule) == (
        ("pooled",), (1000.0,), 256, 0.01, "constant")
    assert (defaults.teacher_epochs, defaults.epochs) == (10, 10)


def test_attention_maps_are_unit_norm_per_sample_and_invariant_to_scaling():
    torch.manual_seed(0)
    features = torch.randn(4, 8, 5, 6)
    maps = attention_map(features)
    assert maps.shape == (4, 30)
    assert torch.allclose(maps.norm(dim=1), torch.ones(4))
    assert torch.allclose(attention_map(7.5 * features), maps, atol=1e-6)
    # The channel mean of squares, not of values: sign flips in a channel change nothing.
    assert torch.allclose(attention_map(features * torch.tensor([-1.0, 1] * 4).view(1, 8, 1, 1)), maps)
    expected = features.pow(2).mean(1).flatten(1)
    assert torch.allclose(maps, expected / expected.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("distance", ["mse", "l2"])
def test_the_distance_is_zero_for_equal_attention_and_positive_otherwise(distance):
    torch.manual_seed(0)
    teacher = torch.randn(3, 4, 4, 4)
    assert attention_distance(teacher.clone(), teacher, distance=distance) == 0
    assert attention_distance(2 * teacher, teacher, distance=distance) < 1e-6  # scale-free
    other = teacher.clone()
    other[:, :, 0, 0] += 5.0  # one position lights up
    assert attention_distance(other, teacher, distance=distance) > 1e-3
    difference = attention_map(other) - attention_map(teacher)
    expected = difference.pow(2).mean() if distance == "mse" else difference.norm(dim=1).mean()
    assert torch.isclose(attention_distance(other, teacher, distance=distance), expected)


@pytest.mark.parametrize("betas", [(500.0, 1000.0, 1000.0), (0.0, 0.0, 0.0)])
def test_distillation_pulls_the_students_attention_toward_the_teachers(digits, betas):
    # A teacher whose attention differs a lot (random weights), so the pull is plain to see; betas 0 is
    # plain fine-tuning, which must not bring the student there by itself.
    model, data = digits
    torch.manual_seed(0)
    teacher = create_model("small_cnn", 10, 16).eval().requires_grad_(False)
    stages = model.parts.stages
    params = NADParams(epochs=5, batch_size=32, layers=stages, betas=betas)
    before = attention_gaps(model, teacher, data, stages, params)
    with layer_outputs(model, stages) as student_outputs, layer_outputs(teacher, stages) as teacher_outputs:
        hook = AttentionDistillation(teacher, stages, betas, student_outputs, teacher_outputs, params)
        train(model, data.images, data.labels, params.recipe(), data.normalisation, 0, hook=hook)
    after = attention_gaps(model, teacher, data, stages, params)
    if betas[0]:
        assert all(after[name] < 0.3 * before[name] for name in stages)
        assert hook.epoch_attention == sorted(hook.epoch_attention, reverse=True)  # falls every epoch
    else:
        assert all(after[name] > 0.5 * before[name] for name in stages) and hook.epoch_attention == [0.0] * 5


# vgg19_bn passes too but is left out for time (its 139M-parameter head is slow on one CPU thread).
@pytest.mark.parametrize("architecture", [a for a in ARCHITECTURES.names() if a != "vgg19_bn"])
def test_runs_on_every_architecture_and_leaves_no_hooks(architecture):
    torch.manual_seed(0)
    model = create_model(architecture, 2, 32)
    data = MitigationData(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), torch.tensor([0, 0, 1, 1]),
                          Normalisation((0.5,) * 3, (0.25,) * 3, True), 32, 2)
    # A small lr: one step at 0.01 on an untrained EfficientNet (train-mode loss ~24) makes its eval-mode
    # activations overflow, which the defense refuses (see the next test).
    result = DEFENSES.get("nad").run(model, data, NADParams(teacher_epochs=1, epochs=1, lr=1e-4), CPU)
    pooled = "pool" if architecture == "small_cnn" else "avgpool"  # the last pooling layer
    assert isinstance(result, Defended) and result.details["layers"] == [pooled]
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values() if t.is_floating_point())
    assert not any(m._forward_hooks for m in result.model.modules())
    assert result.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_a_teacher_with_non_finite_activations_is_an_error():
    torch.manual_seed(0)
    model = create_model("efficientnet_b3", 2, 32)
    data = MitigationData(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), torch.tensor([0, 0, 1, 1]),
                          Normalisation((0.5,) * 3, (0.25,) * 3, True), 32, 2)
    with pytest.raises(RuntimeError, match="non-finite"):
        DEFENSES.get("nad").run(model, data, NADParams(teacher_epochs=1, epochs=1), CPU)


def test_few_images_degrade_as_documented(digits):
    model, data = digits
    spc2 = subset(data, torch.cat([torch.nonzero(data.labels == c).flatten()[:2] for c in range(10)]))
    small = NADParams(teacher_epochs=1, epochs=1)
    notes = DEFENSES.get("nad").run(copy.deepcopy(model), spc2, small, CPU).details["notes"]
    assert any("20 mitigation images, fewer than batch_size 256" in n for n in notes)
    spc1 = subset(data, torch.cat([torch.nonzero(data.labels == c).flatten()[:1] for c in range(10)]))
    details = DEFENSES.get("nad").run(copy.deepcopy(model), spc1, small, CPU).details
    assert any("10 mitigation images, fewer than batch_size 256" in n for n in details["notes"])
    assert set(details["attention_distance_after"]) == {"pool"}

    before = {name: t.clone() for name, t in model.state_dict().items()}
    one = DEFENSES.get("nad").run(model, subset(data, torch.tensor([0])), small, CPU)
    assert "cannot train on fewer than 2" in one.details["notes"][0]
    assert all(torch.equal(t, before[name]) for name, t in one.model.state_dict().items())

    with pytest.raises(AttributeError):  # a layer the architecture does not have
        DEFENSES.get("nad").run(copy.deepcopy(model), spc2, replace(small, layers=("layer3",), betas=(1.0,)), CPU)


def test_defend_stage_end_to_end_removes_the_backdoor(digits_backdoor):
    # The reference recipe with twice the epochs and smaller batches (100 images would make one batch), distilling
    # the small CNN's three stages: its pooled map is 1 x 1, whose term is 0 (see the test above).
    params = {"teacher_epochs": 20, "epochs": 20, "batch_size": 32,
              "layers": ["features.5", "features.9", "features.13"], "betas": [500.0, 1000.0, 1000.0]}
    record = defend(digits_backdoor, "nad", params, out="nad.json")
    assert record["status"] == "ok" and record["hyperparameters"]["epochs"] == 20
    table_row(record, "nad.json")  # a valid run record for the aggregate stage
    details = record["details"]
    assert isinstance(details["notes"], list) and details["betas"] == [500.0, 1000.0, 1000.0]
    assert details["layers"] == ["features.5", "features.9", "features.13"]
    assert record["pre"]["asr"] > 0.7
    assert record["post"]["asr"] < 0.5 * record["pre"]["asr"]
    assert record["post"]["acc"] > 0.8
    assert record["post"]["ra"] > record["pre"]["ra"]


def test_a_pooled_one_by_one_map_has_a_zero_term():
    # Why FORK's NAD on 1 x 1 pooled features (every architecture but PreAct's extra layers) is fine-tuning:
    # the normalised attention of a single position is 1 for any activation.
    torch.manual_seed(0)
    assert attention_distance(torch.randn(4, 16, 1, 1), torch.randn(4, 16, 1, 1)) == 0
    copied = torch.randn(4, 16, 1, 1).expand(4, 16, 7, 7)  # VGG's adaptive 7 x 7 pool of a 1 x 1 map (32 px)
    assert attention_distance(copied, torch.randn(4, 16, 1, 1).expand(4, 16, 7, 7)) < 1e-12


PAPER_LAYERS = {"preact_resnet18": (["layer3", "layer4", "avgpool"], [500.0, 1000.0, 1000.0]),
                "vgg19_bn": (["avgpool"], [1000.0]), "efficientnet_b3": (["avgpool"], [1000.0]),
                "mobilenet_v3_large": (["avgpool"], [1000.0])}


@pytest.mark.parametrize("architecture", list(PAPER_LAYERS))
def test_nad_hooks_exactly_the_activations_fork_distils(architecture, monkeypatch):
    # FORK nad.py train_epoch: PreAct children()[:-3], [:-2], [:-1] = layer3, layer4, pooled at beta1/2/3
    # 500/1000/1000; VGG19-BN, EfficientNet-B3, MobileNetV3 children()[:-1] = the pooled features at beta3.
    from test_fidelity_finetune_b_params import paper_params

    import bdsweep.defenses.nad as nad

    params = paper_params("nad", "cifar10", architecture)
    torch.manual_seed(0)
    model = create_model(architecture, 2, 32)
    expected_layers, expected_betas = PAPER_LAYERS[architecture]
    assert list(nad.distilled_layers(model, params.layers)) == expected_layers and list(params.betas) == expected_betas
    if architecture == "vgg19_bn":
        return  # 139 M parameters: too slow to train here; the names above are what it would hook
    hooked, real = [], nad.layer_outputs

    def spy(module, names):
        hooked.append((module, tuple(names)))
        return real(module, names)

    monkeypatch.setattr(nad, "layer_outputs", spy)
    data = MitigationData(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), torch.tensor([0, 0, 1, 1]),
                          Normalisation((0.5,) * 3, (0.25,) * 3, True), 32, 2)
    result = DEFENSES.get("nad").run(model, data, replace(params, teacher_epochs=1, epochs=1, lr=1e-4), CPU)
    assert result.details["layers"] == expected_layers and result.details["betas"] == expected_betas
    assert {names for _, names in hooked} == {tuple(expected_layers)}  # student and teacher, nothing else
    assert any(module is result.model for module, _ in hooked)
