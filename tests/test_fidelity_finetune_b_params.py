"""The paper preset's resolved values of FST, FT-SAM, NAD and PBE per (dataset, architecture), checked
against what the survey's code (FORK = WhoDunnett/BackdoorBenchmark @ 8613640) effectively ran, as
../shared/reference/FIDELITY.md ("Task 2: defense hyperparameters") states it. FORK lets every non-empty
argparse default override its YAML, so the effective values are often the argparse defaults."""

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
CELLS = [(dataset, architecture) for dataset in DATASETS for architecture in ARCHITECTURES]


def paper_params(defense: str, dataset: str, architecture: str):
    entry = yaml.safe_load(PAPER.read_text())["defenses"][defense]
    return resolve(DEFENSES.get(defense).params, method_params(entry, dataset, architecture), defense)


def test_the_preset_covers_the_survey_grid():
    preset = yaml.safe_load(PAPER.read_text())
    assert tuple(preset["datasets"]) == DATASETS and tuple(preset["architectures"]) == ARCHITECTURES


@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_fst(dataset, architecture):
    # FIDELITY: "argparse defaults (fst.py:77-80) override the yaml. Effective 15 ep, lr 0.01, alpha 0.2 on
    # every dataset. Re-inits and regularises all Linear layers of VGG (3) and MBv3 (2) (:223-241); batch 256".
    p = paper_params("fst", dataset, architecture)
    assert (p.epochs, p.lr, p.alpha, p.batch_size, p.momentum, p.weight_decay) == (15, 0.01, 0.2, 256, 0.9, 0.0)
    assert (p.schedule, p.layers) == ("cosine", "all")


@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_ft_sam(dataset, architecture):
    # FIDELITY: "argparse rho_max/min=2, label_smoothing=0.1 (ft-sam.py:203-205) override the yaml. Effective
    # rho 2, ls 0.1 on all datasets. Cosine T_max 100 stepped per batch (:318); batch 256; adaptive".
    p = paper_params("ft-sam", dataset, architecture)
    assert (p.rho, p.label_smoothing, p.batch_size, p.epochs, p.lr) == (2.0, 0.1, 256, 100, 0.01)
    assert (p.schedule, p.momentum, p.weight_decay, p.eta) == ("cosine_per_batch", 0.9, 5e-4, 0.0)


@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_nad(dataset, architecture):
    # FIDELITY: "teacher 10 ep (cosine T_max 100 ~ const), student 10 ep const 0.01. PreAct: layer3 (beta1 500),
    # layer4 (beta2 1000), pooled features (beta3 1000). Other models: only pooled features with beta3
    # (nad.py:290-460); batch 256 (Tiny 128)".
    p = paper_params("nad", dataset, architecture)
    if architecture == "preact_resnet18":
        assert (p.layers, p.betas) == (("layer3", "layer4", "pooled"), (500.0, 1000.0, 1000.0))
    else:
        assert (p.layers, p.betas) == (("pooled",), (1000.0,))
    assert p.batch_size == (128 if dataset == "tiny" else 256)
    assert (p.teacher_epochs, p.epochs, p.lr, p.schedule, p.momentum, p.weight_decay) == (
        10, 10, 0.01, "constant", 0.9, 5e-4)


@pytest.mark.parametrize("dataset, architecture", CELLS)
def test_pbe(dataset, architecture):
    # FIDELITY: "20 x (adversarial pass + clean pass) every epoch (pbe.py:317-320); PGD with random start in the
    # eps ball; eps applied to normalised inputs and clamped to [0,1] in normalised space (:56-75); fresh SGD
    # each pass; batch 256"; config/defense/pbe/default.yaml: 20 epochs, 7 iterations, eps 0.02, alpha scale 5,
    # lr 0.01; the SGD has momentum 0.9 and weight decay 5e-4.
    p = paper_params("pbe", dataset, architecture)
    assert p.passes() == (True, False) * 20
    assert (p.epochs, p.pgd_steps, p.eps, p.alpha_scale, p.lr, p.batch_size) == (20, 7, 0.02, 5.0, 0.01, 256)
    assert (p.random_start, p.space, p.fresh_optimiser, p.attack_mode) == (True, "normalised", True, "train")
    assert (p.momentum, p.weight_decay, p.schedule) == (0.9, 5e-4, "constant")
