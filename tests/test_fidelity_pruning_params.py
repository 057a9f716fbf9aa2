"""The paper preset's values for CLP, BNP, FP and NPD, resolved per (dataset, architecture), equal
the survey code's effective values (FORK's YAML after its argparse overrides) as listed in
../shared/reference/FIDELITY.md. FORK file:line for each value is in the defense's docstring."""

from __future__ import annotations

import itertools

import pytest
import yaml

from bdsweep.config import method_params
from bdsweep.params import resolve
from bdsweep.registry import DEFENSES
from conftest import REPO

PAPER = yaml.safe_load((REPO / "workflow" / "presets" / "paper.yaml").read_text())
DATASETS = ("cifar10", "gtsrb", "tiny")
ARCHITECTURES = ("preact_resnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large")
CELLS = list(itertools.product(DATASETS, ARCHITECTURES))


def resolved(name: str, dataset: str, architecture: str):
    return resolve(DEFENSES.get(name).params, method_params(PAPER["defenses"][name], dataset, architecture), name)


def test_the_preset_covers_the_grid_this_table_checks():
    assert set(PAPER["datasets"]) == set(DATASETS) and PAPER["architectures"] == list(ARCHITECTURES)


# FIDELITY.md: "u = 3 for all datasets (FORK clp/tiny.yaml:24)", sigma without eps (FORK clp.py:62).
@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_clp(dataset, architecture):
    params = resolved("clp", dataset, architecture)
    assert (params.u, params.bn_eps) == (3.0, False)


# FIDELITY.md: u 3 (Tiny 4); FORK's KL without the 1/2 (bnp.py:108) on the last batch (256) of the
# augmented SPC loader (mbns_batchnorm.py:23).
@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_bnp(dataset, architecture):
    params = resolved("bnp", dataset, architecture)
    assert params.u == (4.0 if dataset == "tiny" else 3.0)
    assert (params.exact_kl, params.statistics, params.loader_batch, params.augment) == (False, "last_batch", 256, True)
    assert params.copy_bn_eps == 1e-5  # FORK's MBNS copies: eps 1e-5 on every architecture (model_structure.json)


# FIDELITY.md: once_prune 1 %, acc_ratio 0.1 (two-sided, strict), FORK's stop rule (k-1 units, the
# breaking level returned), 100 epochs of fine-tuning at SGD 0.01 / 0.9 / 5e-4, cosine, batch 256,
# ranking and validation on augmented images (config/defense/fp/*.yaml; fp.py:248-404).
@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_fp(dataset, architecture):
    params = resolved("fp", dataset, architecture)
    assert (params.step, params.max_relative_change, params.stop_rule, params.augment_selection) == (
        0.01, 0.1, "fork", True)
    assert (params.epochs, params.lr, params.momentum, params.weight_decay) == (100, 0.01, 0.9, 5e-4)
    assert (params.schedule, params.batch_size, params.augment, params.crop_padding) == ("cosine", 256, True, 4)


# FIDELITY.md: GTSRB norm 5 with lambda 1/0.5/0.5/0.5; Tiny norm 3.0 with lambda .4; CIFAR 3, .4
# (FORK config/defense/npd/<dataset>_<arch>.yaml); the rest as SPEC (50 ep, SGD 0.01, warm-up 5 at
# 1e-4, adv lr 0.1, 2 steps, batch 128).
NPD = {"cifar10": (3.0, 1.0, 0.4), "gtsrb": (5.0, 1.0, 0.5), "tiny": (3.0, 1.0, 0.4)}


@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_npd(dataset, architecture):
    params = resolved("npd", dataset, architecture)
    norm, clean, others = NPD[dataset]
    assert params.trigger_norm == norm and params.lambda_clean == clean
    assert params.lambda_adv == params.lambda_other == params.lambda_target == others
    assert (params.epochs, params.lr, params.warmup_epochs, params.warmup_lr) == (50, 0.01, 5, 1e-4)
    assert (params.adv_lr, params.inner_steps, params.batch_size) == (0.1, 2, 128)
