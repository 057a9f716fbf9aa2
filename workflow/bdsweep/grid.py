"""The grid a validated configuration spans: backdoored models and defense runs."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from . import attacks
from .config import applies_to, method_params
from .layout import CLEAN, CLEAN_RATIO, NO_DATA, SHARED_SCOPE, mitigation_token, ratio_token
from .registry import ATTACKS, DEFENSES


@dataclass(frozen=True)
class ModelKey:
    dataset: str
    architecture: str
    attack: str
    ratio: str  # as in paths, e.g. "0.1"

    def wildcards(self) -> dict:
        return {"dataset": self.dataset, "architecture": self.architecture, "attack": self.attack,
                "ratio": self.ratio}


def models(config: dict) -> list[ModelKey]:
    """Every backdoored model, then (with ``clean_models``) every clean model."""
    backdoored = [ModelKey(d, a, k, ratio_token(r)) for d, a, k, r in itertools.product(
        config["datasets"], config["architectures"], config["attacks"], config["ratios"])
        if applies_to(config["attacks"][k], d)]
    clean = [ModelKey(d, a, CLEAN, CLEAN_RATIO) for d, a in itertools.product(config["datasets"],
                                                                              config["architectures"])]
    return backdoored + (clean if config.get("clean_models") else [])


def is_training_time(attack: str) -> bool:
    """Whether the attack poisons inside the training loop (and so has no poison file)."""
    return attack != CLEAN and attacks.is_training_time(ATTACKS.get(attack))


# Data-poisoning attacks whose resource is a fixed pattern computed with numpy (a patch, a key
# image, a sinusoid): their jobs need no GPU and little time. Declared, not guessed: any other
# attack's resource (a trained encoder, a perturbation fitted to a model) gets a GPU job.
PATTERN_RESOURCES = frozenset({"badnets", "blended", "sig"})


def resource_needs_gpu(attack: str) -> bool:
    return attack not in PATTERN_RESOURCES


def resource_scope(attack: str, architecture: str) -> str:
    """Where a data-poisoning attack's trigger lives: shared by the dataset, or per architecture."""
    return architecture if ATTACKS.get(attack).per_architecture else SHARED_SCOPE


def mitigations(config: dict, defense: str) -> list[str]:
    """The mitigation tokens a defense runs with: every (SPC, seed), or none if it uses no data."""
    if not DEFENSES.get(defense).needs_data:
        return [NO_DATA]
    mitigation = config["mitigation"]
    return [mitigation_token(spc, seed) for spc in mitigation["spc"] for seed in range(mitigation["seeds"])]


def runs(config: dict) -> list[dict]:
    """Wildcards of every run: (model, defense, mitigation)."""
    return [{**model.wildcards(), "defense": defense, "mitigation": token}
            for model in models(config) for defense, entry in config["defenses"].items()
            if applies_to(entry, model.dataset) for token in mitigations(config, defense)]


def defense_plan(config: dict, dataset: str, architecture: str | None = None) -> dict:
    """The runs of each model of ``(dataset, architecture)``: for every defense that applies to it,
    its overrides and its mitigation tokens (the defend_model rule's ``--defenses``)."""
    return {defense: {"params": method_params(entry, dataset, architecture),
                      "mitigations": mitigations(config, defense)}
            for defense, entry in config["defenses"].items() if applies_to(entry, dataset)}


def params_json(config: dict, section: str, name: str | None, dataset: str, architecture: str | None = None) -> str:
    """The overrides of a method (or of ``training``) for one dataset (and architecture, where the
    job has one), as canonical JSON."""
    entry = config[section] if name is None else config[section][name]
    return json.dumps(method_params(entry, dataset, architecture), sort_keys=True)

