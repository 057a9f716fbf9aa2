"""The paper preset resolves, per (dataset, architecture), to the values FORK effectively ran for
FT, NC, i-BAU and SAU (../shared/reference/FIDELITY.md, "Defense hyperparameters"; FORK =
WhoDunnett/BackdoorBenchmark @ 8613640, its YAML merged with its non-empty argparse defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bdsweep.config import method_params
from bdsweep.params import resolve
from bdsweep.registry import DEFENSES

PAPER = Path(__file__).resolve().parents[1] / "workflow" / "presets" / "paper.yaml"
DATASETS = ("cifar10", "gtsrb", "tiny")
ARCHITECTURES = ("preact_resnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large")

# FIDELITY.md's effective FORK values; the same on every architecture.
EXPECTED = {
    # config/defense/ft/default.yaml (the only FT config): 100 ep, SGD 0.01, momentum 0.9, wd 5e-4, cosine, 256
    "ft": {dataset: {"epochs": 100, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine",
                     "batch_size": 256, "optimizer": "sgd", "augment": True} for dataset in DATASETS},
}


def paper_entry(name: str) -> dict:
    return yaml.safe_load(PAPER.read_text())["defenses"][name]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_preset_resolves_to_forks_effective_values(name, dataset, architecture):
    params = resolve(DEFENSES.get(name).params, method_params(paper_entry(name), dataset, architecture), name)
    resolved = {key: getattr(params, key) for key in EXPECTED[name][dataset]}
    assert resolved == EXPECTED[name][dataset]
