"""The four paper architectures are built as the survey's toolkit builds them: parameter counts at
10, 43 and 200 classes, the BN layers in order (name, channels, eps, momentum), the convolution
CLP pairs each BN with, and the width FP ranks, against ``../shared/reference/model_structure.json``
(FORK's ``generate_cls_model``)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bdsweep.models import batch_norms, conv_bn_pairs, create_model
from conftest import SHARED, requires_shared

REFERENCE = SHARED / "reference" / "model_structure.json"
pytestmark = requires_shared(REFERENCE)

# bdsweep's registry name -> the toolkit's model name.
FORK_NAMES = {"preact_resnet18": "preactresnet18", "vgg19_bn": "vgg19_bn",
              "efficientnet_b3": "efficientnet_b3", "mobilenet_v3_large": "mobilenet_v3_large"}


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())["architectures"]


@pytest.fixture(scope="module", params=list(FORK_NAMES))
def built(request, reference):
    """Each architecture built once (VGG19-BN takes ~10 s) at 10 classes, with its reference entry."""
    torch.manual_seed(0)
    return create_model(request.param, 10, 32), reference[FORK_NAMES[request.param]]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_at_10_43_and_200_classes(built):
    model, expected = built
    assert count(model) == expected["num_parameters"]["10"]
    # Only the final linear depends on the class count: swap it for a wider one.
    classifier = model.get_submodule(model.parts.classifier)
    head = count(classifier)
    for classes in ("43", "200"):
        width = (classifier.in_features + 1) * int(classes)
        assert count(model) - head + width == expected["num_parameters"][classes], classes


def test_other_class_counts_build_the_same_body(reference):
    """The swap above is what create_model does: a real 43- and 200-class build (the cheap ones)."""
    for name in ("preact_resnet18", "mobilenet_v3_large"):
        for classes in (43, 200):
            assert count(create_model(name, classes, 32)) == reference[FORK_NAMES[name]]["num_parameters"][str(classes)]


def test_batch_norm_layers_in_order_with_channels_eps_and_momentum(built):
    model, expected = built
    ours = [{"name": name, "channels": bn.num_features, "eps": bn.eps, "momentum": bn.momentum}
            for name, bn in batch_norms(model)]
    theirs = [{key: bn[key] for key in ("name", "channels", "eps", "momentum")} for bn in expected["batchnorm"]]
    assert len(ours) == expected["num_batchnorm"]
    assert ours == theirs


def test_each_bn_pairs_with_the_convolution_the_toolkits_clp_pairs_it_with(built):
    model, expected = built
    names = {id(module): name for name, module in model.named_modules()}
    ours = [(bn_name, names[id(conv)]) for conv, bn, bn_name in conv_bn_pairs(model)]
    assert ours == [(bn["name"], bn["clp_conv"]) for bn in expected["batchnorm"]]


def test_convolution_count_and_the_width_fp_ranks(built):
    model, expected = built
    modules = list(model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in modules) == expected["num_conv2d"]
    first_linear = next(m for m in modules if isinstance(m, nn.Linear))
    assert first_linear.in_features == expected["fp_first_linear_in_features"]
    assert sum(b.numel() for b in model.buffers()) == expected["buffers_numel"]
