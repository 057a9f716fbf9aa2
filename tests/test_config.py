"""Configuration validation: every bad input is refused before any job, naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from bdsweep.config import ConfigError, validate_config
from bdsweep.grid import models, runs

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config.yaml").read_text())
PAPER = yaml.safe_load((REPO / "workflow" / "presets" / "paper.yaml").read_text())


def changed(**edits):
    """The demo config with dotted keys set (value None deletes the key)."""
    config = copy.deepcopy(DEMO)
    for dotted, value in edits.items():
        *parents, last = dotted.split("__")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return config


def test_demo_and_paper_presets_are_valid(paper_workdir):
    demo = validate_config(DEMO)
    assert len(models(demo)) == 8 + 1 and len(runs(demo)) == 9 * (1 + 2 * 2)  # none + (FP + FT-SAM) x 2 SPC
    paper = validate_config(PAPER)
    assert paper["mitigation"]["seeds"] == 10 and paper["ratios"] == [0.01, 0.05, 0.1]
    assert set(paper["defenses"]) >= {"ft", "clp", "none"}


def test_paper_preset_blends_with_the_surveys_key_image_and_says_where_to_get_it(tmp_path, monkeypatch):
    """The paper preset names the Hello Kitty image by path; without the file, validation (which
    runs before any job: ``bdsweep validate`` and Snakemake's parsing) refuses it and says where
    the image is published."""
    assert PAPER["attacks"]["blended"]["image"] == "data/blended/hello_kitty.jpeg"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        validate_config(PAPER)
    message = str(error.value)
    assert message.startswith("attacks.blended: image: no such file: data/blended/hello_kitty.jpeg")
    assert "SCLBD/BackdoorBench" in message and "resource/blended/hello_kitty.jpeg" in message


def test_paper_preset_names_every_method_of_the_spec():
    assert set(PAPER["attacks"]) == {"badnets", "blended", "sig", "lf", "ssba", "iab", "bpp", "wanet"}
    assert set(PAPER["defenses"]) == {"none", "fp", "bnp", "clp", "anp", "awm", "rnp", "mm-bd", "npd", "ft", "fst",
                                      "ft-sam", "nad", "nc", "pbe", "i-bau", "sau"}
    assert set(PAPER["architectures"]) == {"preact_resnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large"}
    assert set(PAPER["datasets"]) == {"cifar10", "gtsrb", "tiny"}


def test_defaults_are_filled_in():
    config = validate_config(changed(mitigation=None, sanity=None))
    assert config["mitigation"] == {"spc": [2, 10, 100], "seeds": 10, "source": "train", "pool_per_class": 100}
    assert config["sanity"] == {"min_acc": 0.0, "min_asr": 0.0}


def test_the_pool_size_binds_only_with_the_reserved_pool_source():
    # By default (the survey's way) partitions come from the whole training set: no pool to exceed.
    assert validate_config(changed(mitigation__spc=[2, 50]))["mitigation"]["source"] == "train"
    validate_config(changed(mitigation__source="reserved_pool", mitigation__spc=[2, 19]))


BAD = {
    "unknown attack": (changed(attacks={"badnetz": {}}), "attacks: unknown attack 'badnetz'"),
    "unknown defense": (changed(defenses={"fine-tune": {}}), "defenses: unknown defense 'fine-tune'"),
    "unknown architecture": (changed(architectures=["resnet9000"]), "architectures: unknown architecture"),
    "unknown dataset source": (changed(datasets={"d": {"source": "mnist"}}), "datasets.d.source: unknown"),
    "bad attack hyperparameter value": (changed(attacks={"sig": {"delta": -4}}), "attacks.sig: delta and frequency"),
    "missing blended image": (changed(attacks={"blended": {"image": "/nowhere/key.png"}}),
                              "attacks.blended: image: no such file: /nowhere/key.png"),
    "attack hyperparameter of another attack": (changed(attacks={"wanet": {"alpha": 0.1}}),
                                                "attacks.wanet has no hyperparameter 'alpha'; it has: k, s,"),
    "unknown engine option": (changed(engine={"amp": True}), "engine: Additional properties are not allowed"),
    "checkpoint every zero epochs": (changed(engine={"checkpoint_every": 0}),
                                     "engine.checkpoint_every: 0 is less than the minimum of 1"),
    "ratio zero": (changed(ratios=[0]), "ratios[0]: 0 is less than or equal to the minimum of 0"),
    "ratio above one": (changed(ratios=[1.5]), "ratios[0]: 1.5 is greater than the maximum of 1"),
    "ratio negative": (changed(ratios=[-0.1]), "ratios[0]"),
    "ratio as text": (changed(ratios=["ten"]), "ratios[0]: 'ten' is not of type 'number'"),
    "no ratios": (changed(ratios=[]), "ratios: [] should be non-empty"),
    "spc zero": (changed(mitigation__spc=[0]), "mitigation.spc[0]: 0 is less than the minimum of 1"),
    "spc reaching the reserved pool": (changed(mitigation__source="reserved_pool", mitigation__spc=[2, 20, 50]),
                                       "mitigation.spc: [20, 50] reach mitigation.pool_per_class = 20"),
    "unknown mitigation source": (changed(mitigation__source="test"), "mitigation.source: 'test' is not one of"),
    "spc fractional": (changed(mitigation__spc=[2.5]), "mitigation.spc[0]: 2.5 is not of type 'integer'"),
    "zero seeds": (changed(mitigation__seeds=0), "mitigation.seeds: 0 is less than the minimum of 1"),
    "negative seeds": (changed(mitigation__seeds=-3), "mitigation.seeds: -3 is less than the minimum of 1"),
    "seeds as text": (changed(mitigation__seeds="10"), "mitigation.seeds: '10' is not of type 'integer'"),
    "unknown top-level key": (changed(defences={"ft": {}}), "Additional properties are not allowed ('defences'"),
    "unknown mitigation key": (changed(mitigation__spcs=[2]), "mitigation: Additional properties"),
    "unknown dataset option": (changed(datasets__digits__folder="x"), "datasets.digits: Additional properties"),
    "option of another source": (changed(datasets__digits__root="/tmp"), "datasets.digits.root: not an option"),
    "unknown defense hyperparameter": (changed(defenses__ft__epochz=3), "defenses.ft has no hyperparameter 'epochz'"),
    "defense hyperparameter by dataset": (changed(defenses__clp__by_dataset={"digits": {"v": 1}}),
                                          "defenses.clp has no hyperparameter 'v'"),
    "hyperparameter of the wrong type": (changed(defenses__ft__epochs="ten"),
                                         "defenses.ft: hyperparameter 'epochs' must be int"),
    "boolean for an integer": (changed(defenses__ft__epochs=True), "hyperparameter 'epochs' must be int"),
    "unknown schedule": (changed(training__schedule="step"), "training: schedule must be one of"),
    "zero epochs": (changed(defenses__ft__epochs=0), "defenses.ft: epochs and batch_size must be at least 1"),
    "empty only_datasets": (changed(defenses__ft__only_datasets=[]), "defenses.ft.only_datasets: [] should be"),
    "only_datasets in training": (changed(training__only_datasets=["digits"]), "training.only_datasets: only"),
    "unknown recipe key": (changed(training__epoch=3), "training has no hyperparameter 'epoch'"),
    "unknown attack hyperparameter": (changed(attacks={"badnets": {"sise": 4}}), "attacks.badnets has no"),
    "missing dataset root": (changed(datasets={"c": {"source": "cifar10", "root": "/nonexistent/cifar"}}),
                             "datasets.c.root: path does not exist: /nonexistent/cifar"),
    "missing npz path": (changed(datasets={"u": {"source": "npz", "path": "/nonexistent/u.npz"}}),
                         "datasets.u.path: path does not exist"),
    "npz without path": (changed(datasets={"u": {"source": "npz"}}), "datasets.u.path: required by source 'npz'"),
    "dataset without source": (changed(datasets={"u": {"root": "/tmp"}}), "datasets.u: 'source' is a required"),
    "no datasets": (changed(datasets={}), "datasets: {} should be non-empty"),
    "missing defenses": (changed(defenses=None), "'defenses' is a required property"),
    "negative target": (changed(target=-1), "target: -1 is less than the minimum of 0"),
    "sanity gate above one": (changed(sanity__min_acc=2), "sanity.min_acc: 2 is greater than the maximum of 1"),
    "image size too small": (changed(datasets__digits__image_size=2), "datasets.digits.image_size"),
    "mean of two channels": (changed(datasets__digits__mean=[0.5, 0.5]), "datasets.digits.mean"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_configuration_is_refused_naming_the_key(case):
    config, message = BAD[case]
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert message in str(error.value)


def test_the_catalogue_is_large():
    assert len(BAD) >= 25


def test_only_datasets_restricts_a_method_to_some_datasets():
    two = {"digits": DEMO["datasets"]["digits"], "more": {"source": "digits", "image_size": 16}}
    config = validate_config(changed(datasets=two, defenses__ft__only_datasets=["more"]))
    ft_datasets = {run["dataset"] for run in runs(config) if run["defense"] == "ft"}
    fp_datasets = {run["dataset"] for run in runs(config) if run["defense"] == "fp"}
    assert ft_datasets == {"more"} and fp_datasets == {"digits", "more"}
    assert PAPER["defenses"]["nc"]["only_datasets"] == ["cifar10"]


def test_by_dataset_overrides_reach_the_job_params():
    from bdsweep.grid import params_json

    config = validate_config(changed(defenses__clp={"u": 3.0, "by_dataset": {"digits": {"u": 5.0}}}))
    assert params_json(config, "defenses", "clp", "digits") == '{"u": 5.0}'
    assert params_json(config, "defenses", "clp", "other") == '{"u": 3.0}'


def test_by_architecture_overrides_reach_the_job_params_most_specific_last():
    from bdsweep.grid import defense_plan, params_json

    config = validate_config(changed(defenses__clp={
        "u": 3.0, "by_architecture": {"small_cnn": {"u": 4.0}},
        "by_dataset": {"digits": {"u": 5.0, "by_architecture": {"small_cnn": {"u": 6.0}}}}}))
    assert params_json(config, "defenses", "clp", "other", "other_arch") == '{"u": 3.0}'
    assert params_json(config, "defenses", "clp", "other", "small_cnn") == '{"u": 4.0}'
    assert params_json(config, "defenses", "clp", "digits", "other_arch") == '{"u": 5.0}'
    assert params_json(config, "defenses", "clp", "digits", "small_cnn") == '{"u": 6.0}'
    assert defense_plan(config, "digits", "small_cnn")["clp"]["params"] == {"u": 6.0}


def test_a_bad_by_architecture_override_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="defenses.clp.*'v'"):
        validate_config(changed(defenses__clp={"by_architecture": {"small_cnn": {"v": 1}}}))
