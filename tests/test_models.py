"""Every architecture builds at 32 and 64 px, trains a step, and describes the parts defenses use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdsweep.engine import Normalisation, train
from bdsweep.models import batch_norms, conv_bn_pairs, create_model, penultimate_features
from bdsweep.recipe import Recipe
from bdsweep.registry import ARCHITECTURES

PAPER_ARCHITECTURES = ["preact_resnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large"]


def test_the_papers_four_architectures_are_registered():
    assert set(PAPER_ARCHITECTURES) <= set(ARCHITECTURES.names())


def stage_shapes(model: nn.Module, images: torch.Tensor) -> list[torch.Size]:
    shapes = []
    handles = [model.get_submodule(name).register_forward_hook(lambda m, i, o: shapes.append(o.shape))
               for name in model.parts.stages]
    model(images)
    for handle in handles:
        handle.remove()
    return shapes


@pytest.mark.parametrize("name", ["small_cnn", *PAPER_ARCHITECTURES])
@pytest.mark.parametrize("size", [32, 64])
def test_architecture_runs_and_its_parts_are_where_defenses_look(name, size):
    torch.manual_seed(0)
    model = create_model(name, 7, size).eval()
    images = torch.randn(2, 3, size, size)
    features, logits = penultimate_features(model, images)
    parts, modules = model.parts, dict(model.named_modules())
    assert logits.shape == (2, 7)
    classifier = modules[parts.classifier]
    assert isinstance(classifier, nn.Linear) and classifier.out_features == 7
    assert features.shape == (2, classifier.in_features)
    # The final linear is the last one: nothing after it changes the logits.
    assert torch.allclose(classifier(features), logits)
    assert isinstance(modules[parts.last_conv], nn.Conv2d) and isinstance(modules[parts.polarizer], nn.Conv2d)
    assert [n for n, m in modules.items() if isinstance(m, nn.Conv2d)][-1] == parts.last_conv
    shapes = stage_shapes(model, images)
    assert len(shapes) == len(parts.stages) >= 3
    assert all(s[2] >= t[2] for s, t in zip(shapes, shapes[1:]))  # deeper stages, coarser maps
    assert len({s[2] for s in shapes}) >= 3  # one stage per resolution, not several at one
    # Every BN layer has the convolution it normalises, so BN-based defenses see all of them.
    assert len(conv_bn_pairs(model)) == len(batch_norms(model)) > 0


@pytest.mark.parametrize("name", PAPER_ARCHITECTURES)
def test_architecture_trains_through_the_engine(name):
    """One SGD epoch on a few images changes the weights, including a trailing one-image batch,
    which BN at a 1x1 feature map (EfficientNet and MobileNet at 32 px) could not normalise."""
    torch.manual_seed(0)
    model = create_model(name, 3, 32)
    before = model.get_submodule(model.parts.classifier).weight.detach().clone()
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    curve = train(model, images, torch.arange(5) % 3, Recipe(epochs=1, batch_size=4, lr=0.01),
                  Normalisation((0.5,) * 3, (0.25,) * 3, hflip=True), seed=0, progress=False)
    assert len(curve) == 1 and curve[0]["loss"] > 0
    assert not torch.equal(model.get_submodule(model.parts.classifier).weight, before)
