"""The paper preset resolves, per (dataset, architecture), to the values FORK effectively ran for
FT, NC, i-BAU and SAU (../shared/reference/FIDELITY.md, "Defense hyperparameters"; FORK =
WhoDunnett/BackdoorBenchmark @ 8613640, its YAML merged with its non-empty argparse defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bdsweep.config import applies_to, method_params
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
    # config/defense/nc/cifar10.yaml; FORK's quirks by default (nc.py:388-389, :628, :375, :785-829, :235-237)
    "nc": {"cifar10": {"epochs": 80, "mask_lr": 0.1, "init_cost": 1e-3, "cost_multiplier": 2.0, "patience": 5,
                       "early_stop_patience": 25, "success_threshold": 0.98, "early_stop_threshold": 0.99,
                       "anomaly_threshold": 2.0, "unlearn_ratio": 0.2, "unlearn_epochs": 100, "unlearn_lr": 0.01,
                       "batch_size": 256, "unlearn_batch_size": 256, "momentum": 0.9, "weight_decay": 5e-4,
                       "interpolated_median": False, "search_augment": True, "fallback_mask": "first_epoch",
                       "unlearn_split": "position", "trigger_normalisation": "minmax"}},
    # config/defense/i-bau/*.yaml (n_rounds 5, K 5, adam lr 1e-4, batch 256) and i-bau.py: inner SGD 10,
    # regulariser 0.001, fixed-point lr 0.1, int(0.01 x batch), no projection, normalised delta, first batch
    "i-bau": {dataset: {"rounds": 5, "fixed_point_iterations": 5, "lr": 1e-4, "batch_size": 256, "inner_lr": 10.0,
                        "inner_regulariser": 0.001, "fixed_point_lr": 0.1, "perturbed_share": 0.01,
                        "perturb_at_least_one": False, "project_l2": False, "perturbation_space": "normalised",
                        "fixed_point_batch": "first", "amsgrad": True, "augment": True} for dataset in DATASETS},
    # config/defense/sau/*.yaml: n_rounds 100 (tiny 20), adam 1e-4 (amsgrad), wd 0, L_inf 0.2, 5 steps of 0.2,
    # beta 0.01/1, lambda 1/0/1, batch 256
    "sau": {dataset: {"rounds": 20 if dataset == "tiny" else 100, "lr": 1e-4, "amsgrad": True, "weight_decay": 0.0,
                      "trigger_norm": 0.2, "adv_steps": 5, "adv_lr": 0.2, "beta_adv": 0.01, "beta_shared": 1.0,
                      "lambda_clean": 1.0, "lambda_adv": 0.0, "lambda_shared": 1.0, "batch_size": 256,
                      "augment": False, "train_mode": False} for dataset in DATASETS},
}
CASES = [(name, dataset, architecture) for name in sorted(EXPECTED) for dataset in EXPECTED[name]
         for architecture in ARCHITECTURES]


def paper_entry(name: str) -> dict:
    return yaml.safe_load(PAPER.read_text())["defenses"][name]


@pytest.mark.parametrize(("name", "dataset", "architecture"), CASES)
def test_paper_preset_resolves_to_forks_effective_values(name, dataset, architecture):
    params = resolve(DEFENSES.get(name).params, method_params(paper_entry(name), dataset, architecture), name)
    resolved = {key: getattr(params, key) for key in EXPECTED[name][dataset]}
    assert resolved == EXPECTED[name][dataset]


def test_the_paper_runs_nc_on_cifar10_only():
    assert applies_to(paper_entry("nc"), "cifar10") and not applies_to(paper_entry("nc"), "gtsrb")
    assert not applies_to(paper_entry("nc"), "tiny")
