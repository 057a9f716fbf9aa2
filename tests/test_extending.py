"""One method = one file: a throw-away defense, attack, architecture and dataset source, each
registered by importing one temporary module and by nothing else, go through validation, the
grid's plan, `bdsweep cost`, the defend stage and the figures without any other file changing."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pandas as pd
import pytest
import yaml

from bdsweep.config import validate_config
from bdsweep.registry import ARCHITECTURES, ATTACKS, DEFENSES, SOURCES
from conftest import REPO, defend

MODULE = textwrap.dedent('''
    """A new method of every kind, in one file each would be the same: this module stands for them."""
    from dataclasses import dataclass

    import numpy as np
    from torch import nn

    from bdsweep.attacks import data_poisoning
    from bdsweep.data.sources import Sizes, Source
    from bdsweep.data.store import RawDataset
    from bdsweep.defenses import Defended, defense
    from bdsweep.models import ModelParts
    from bdsweep.passes import epochs_over_images
    from bdsweep.registry import ARCHITECTURES, SOURCES


    @dataclass(frozen=True)
    class ShrinkParams:
        factor: float = 0.5
        epochs: int = 3


    @defense("shrink", "scales the classifier's weights", ShrinkParams, family="pruning",
             passes=epochs_over_images("epochs"), featured=True)
    def shrink(model, data, params, device):
        classifier = model.get_submodule(model.parts.classifier)
        classifier.weight.data.mul_(params.factor)
        return Defended(model, {"images_seen": len(data)})


    @dataclass(frozen=True)
    class CornerParams:
        value: int = 255


    def corner_resource(context, params):
        return {"value": np.array(params.value, dtype=np.uint8)}


    @data_poisoning("corner", "one white top-left pixel", CornerParams, corner_resource, trigger_type="static")
    def corner(images, resource, params):
        images = images.copy()
        images[:, 0, 0] = resource["value"]
        return images


    class Tiny(nn.Module):
        def __init__(self, num_classes, image_size):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Linear(4, num_classes)
            self.parts = ModelParts(classifier="classifier", last_conv="features.0", stages=("features.2",),
                                    polarizer="features.0")

        def forward(self, x):
            return self.classifier(self.features(x))


    ARCHITECTURES.register("tiny_net", "four channels", forward_gflops={32: 0.0004})(Tiny)


    def load_stripes(options):
        rng = np.random.default_rng(0)
        labels = np.arange(40) % 2
        images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
        return RawDataset(images[:30], labels[:30], images[30:], labels[30:], ("a", "b"))


    SOURCES.register("stripes", "random images, two classes")(
        Source(load=load_stripes, sizes=lambda options: Sizes(30, 10, 2, 32)))
''')
NAMES = {DEFENSES: "shrink", ATTACKS: "corner", ARCHITECTURES: "tiny_net", SOURCES: "stripes"}


@pytest.fixture
def new_methods(tmp_path):
    for registry in NAMES:
        registry.entries()  # load the built-in methods first
    path = tmp_path / "my_methods.py"
    path.write_text(MODULE)
    spec = importlib.util.spec_from_file_location("my_methods", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["my_methods"] = module
    spec.loader.exec_module(module)
    yield
    for registry, name in NAMES.items():
        registry._entries.pop(name, None)
    sys.modules.pop("my_methods", None)


def config_with_new_methods() -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["datasets"]["stripes"] = {"source": "stripes"}
    config["architectures"] = ["small_cnn", "tiny_net"]
    config["attacks"]["corner"] = {}
    config["defenses"]["shrink"] = {"factor": 0.25}
    return config


def test_new_methods_are_validated_planned_and_priced_without_touching_another_file(new_methods):
    from bdsweep.cost import Throughput, estimate, read_throughput
    from bdsweep.grid import runs

    config = validate_config(config_with_new_methods())
    planned = pd.DataFrame(runs(config))
    new = planned[(planned.defense == "shrink") & (planned.attack == "corner") & (planned.architecture == "tiny_net")
                  & (planned.dataset == "stripes")]
    assert len(new) == len(config["mitigation"]["spc"]) * config["mitigation"]["seeds"]
    result = estimate(config, Throughput(read_throughput(), "cpu"))
    assert any("'tiny_net'" in warning and "GFLOPs" in warning for warning in result.warnings)  # from its registration
    assert any("shrink" in name for name in result.defenses)
    assert not any("declares no passes" in warning for warning in result.warnings)
    assert result.total_gpu_hours > 0


def test_a_new_defense_runs_through_the_defend_stage_and_records_its_facts(new_methods, digits_backdoor):
    record = defend(digits_backdoor, "shrink", {"factor": 0.5}, out="shrink.json")
    assert record["status"] == "ok" and record["family"] == "pruning" and record["featured"] is True
    assert record["attack_type"] == "static" and record["details"]["images_seen"] > 0


def test_new_methods_appear_in_the_figures_from_the_table_alone(new_methods, tmp_path):
    from bdsweep.figures import FIGURES, draw

    rows = [{"dataset": "stripes", "architecture": "tiny_net", "attack": "corner", "attack_type": "static",
             "ratio": 0.1, "target": 0, "defense": defense, "family": family, "featured": featured, "spc": spc,
             "seed": seed, "pre_acc": 0.9, "pre_asr": 0.95, "post_acc": 0.85, "post_asr": asr, "rdr": 0.5,
             "arr": 0.4, "status": "ok", "reason": None}
            for defense, family, featured in (("shrink", "pruning", True), ("ft", "fine-tuning", False))
            for spc in (2, 10) for seed in (0, 1) for asr in (0.2, 0.6)]
    table = pd.DataFrame(rows).astype({"spc": "Int64", "seed": "Int64"})
    for name in FIGURES:
        draw(name, table, tmp_path / f"{name}.png", tmp_path / f"{name}.pdf")
        assert (tmp_path / f"{name}.png").stat().st_size > 0
