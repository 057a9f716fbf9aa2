"""Parameter tables: ANP, RNP, MM-BD and AWM resolved from the paper preset for every (dataset,
architecture) equal the values the survey's code (FORK = WhoDunnett/BackdoorBenchmark @ 8613640)
effectively ran, as ../shared/reference/FIDELITY.md lists them (YAML merged, then every non-empty
argparse default overriding it)."""

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
CELLS = [(d, a) for d in DATASETS for a in ARCHITECTURES]


def paper_params(name: str, dataset: str, architecture: str):
    config = yaml.safe_load(PAPER.read_text())
    assert config["architectures"] == list(ARCHITECTURES) and list(config["datasets"]) == list(DATASETS)
    entry = config["defenses"][name]
    return resolve(DEFENSES.get(name).params, method_params(entry, dataset, architecture), name)


# FIDELITY.md, "ANP (read)" and Task 2's ANP row; config/defense/anp/default.yaml (one file for all).
ANP = {"eps": 0.4, "steps": 1, "alpha": 0.2, "iterations": 2000, "lr": 0.01, "momentum": 0.9, "batch_size": 256,
       "updates_per_pass": 500, "augment": True, "pruning_step": 0.05, "pruning_max": 0.9,
       "max_accuracy_drop": 0.1, "round_scores": True, "clamp_noise": False, "prune_bias": False,
       "augment_held_out": True, "learning_bn_eps": 1e-5}


@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_anp_paper_values(dataset, architecture):
    params = paper_params("anp", dataset, architecture)
    assert {name: getattr(params, name) for name in ANP} == ANP


# FIDELITY.md, "RNP (read)" and Task 2's RNP row; config/defense/rnp/default.yaml (one file for all).
RNP = {"unlearn_lr": 0.001, "unlearn_epochs": 20, "clean_threshold": 0.2, "momentum": 0.9, "weight_decay": 0.05,
       "recover_lr": 0.2, "recover_epochs": 20, "threshold_step": 0.02, "max_accuracy_drop": 0.02,
       "batch_size": 256, "augment": True, "augment_accuracy": True, "round_scores": True, "unlearn_masks": True,
       "clip_gradients": False, "max_tries": 10, "retry_lr_factor": 0.1, "final_bn_eps": 1e-5,
       "prune_bias": False}


@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_rnp_paper_values(dataset, architecture):
    params = paper_params("rnp", dataset, architecture)
    assert {name: getattr(params, name) for name in RNP} == RNP
    assert not hasattr(params, "alpha")  # FORK's recovery loss has no alpha (rnp.py:179)


# FIDELITY.md, "MM-BD (read; FORK only)" and Task 2's MM-BD row; config/defense/mm-bd/default.yaml and
# mm-bd.py's argparse defaults (equal).
MMBD = {"epochs": 50, "lr": 1e-3, "lam": 0.5, "lambda_factor": 1.2, "lambda_every": 10, "allowed_drop": 0.05,
        "batch_size": 256, "augment": True}


@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_mmbd_paper_values(dataset, architecture):
    params = paper_params("mm-bd", dataset, architecture)
    assert {name: getattr(params, name) for name in MMBD} == MMBD
    assert not hasattr(params, "bounded_stages")  # every activation layer, not the shallowest stages


# FIDELITY.md, Task 2's AWM/AWN row; config/defense/awn/default.yaml overridden by awn.py's argparse
# defaults (hyper_gamma 1e-7 over the YAML's 1e-8); the mask SGD has no momentum.
AWM = {"epochs": 20, "inner": 1, "lr": 0.01, "momentum": 0.0, "lr_decay": 0.9, "alpha": 0.9, "gamma": 1e-7,
       "trigger_norm": 1000.0, "trigger_lr": 10.0, "batch_size": 256, "augment": True, "clamp_to_unit": True}


@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_awm_paper_values(dataset, architecture):
    params = paper_params("awm", dataset, architecture)
    assert {name: getattr(params, name) for name in AWM} == AWM
