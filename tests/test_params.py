"""Hyperparameter classes: batch sizes are declared (so an out-of-memory retry scales every one that
holds images in device memory, and only those), and TrainingParams checks and builds the recipe of the
defenses that train with one."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from bdsweep.params import BatchSize, FixedBatchSize, batch_size_fields, resolve, scale_batch_sizes
from bdsweep.recipe import Recipe, TrainingParams
from bdsweep.registry import DEFENSES

DEFENSE_PARAMS = {entry.name: entry.obj.params for entry in DEFENSES.entries()}


@pytest.mark.parametrize("name", sorted(DEFENSE_PARAMS))
def test_every_batch_field_of_a_defense_is_declared(name):
    params_class = DEFENSE_PARAMS[name]
    hints = typing.get_type_hints(params_class)
    batch_fields = {f.name for f in dataclasses.fields(params_class) if "batch" in f.name and hints[f.name] is int}
    declared = set(batch_size_fields(params_class)) | set(batch_size_fields(params_class, FixedBatchSize))
    assert batch_fields == declared, f"{name}: declare each batch size as BatchSize or FixedBatchSize"


@pytest.mark.parametrize("name", sorted(DEFENSE_PARAMS))
def test_scaling_changes_exactly_the_declared_batch_sizes(name):
    defaults = DEFENSE_PARAMS[name]()
    scaled = scale_batch_sizes(defaults, 50)
    changed = {f.name for f in dataclasses.fields(defaults) if getattr(scaled, f.name) != getattr(defaults, f.name)}
    assert changed == set(batch_size_fields(type(defaults)))
    assert all(getattr(scaled, key) == max(1, getattr(defaults, key) // 2) for key in changed)


def test_the_declared_batch_sizes():
    assert {name: batch_size_fields(cls) for name, cls in DEFENSE_PARAMS.items() if batch_size_fields(cls)} == {
        **dict.fromkeys(["anp", "awm", "fp", "fst", "ft", "ft-sam", "i-bau", "mm-bd", "nad", "npd", "pbe", "rnp",
                         "sau"], ("batch_size",)),
        "nc": ("batch_size", "unlearn_batch_size"),
    }
    assert batch_size_fields(DEFENSE_PARAMS["bnp"], FixedBatchSize) == ("loader_batch",)  # not a memory knob
    assert scale_batch_sizes(DEFENSE_PARAMS["bnp"](), 25) == DEFENSE_PARAMS["bnp"]()


def test_a_batch_size_is_an_int_to_configuration():
    @dataclasses.dataclass(frozen=True)
    class Params:
        batch_size: BatchSize = 8
        named_otherwise: BatchSize = 4
        mini_batch: int = 2  # undeclared: left alone

    assert resolve(Params, {"batch_size": 16}, "test").batch_size == 16
    with pytest.raises(TypeError, match="batch_size"):
        resolve(Params, {"batch_size": 1.5}, "test")
    assert scale_batch_sizes(Params(), 25) == Params(2, 1, 2)


@dataclasses.dataclass(frozen=True)
class ExampleParams(TrainingParams):
    OWNER = "Example"
    SCHEDULES = ("constant", "cosine")

    epochs: int = 7
    batch_size: BatchSize = 32
    schedule: str = "constant"
    crop_padding: int = 2
    alpha: float = 0.5

    def checks(self):
        return {"alpha": 0 <= self.alpha <= 1}


def test_training_params_builds_the_recipe_by_field_name():
    recipe = ExampleParams(lr=0.1, momentum=0.5).recipe()
    assert recipe == Recipe(epochs=7, batch_size=32, lr=0.1, momentum=0.5, weight_decay=5e-4, schedule="constant",
                            crop_padding=2, augment=True)
    assert ExampleParams().recipe(epochs=3, augment=False) == Recipe(
        epochs=3, batch_size=32, lr=0.01, weight_decay=5e-4, schedule="constant", crop_padding=2, augment=False)
    assert batch_size_fields(ExampleParams) == ("batch_size",)  # redeclared with its kind


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("momentum", 1.0),
                                          ("weight_decay", -1e-4), ("schedule", "cosine_per_batch"),
                                          ("crop_padding", -1), ("alpha", 2.0)])
def test_training_params_checks_shared_and_own_fields_once(field, value):
    with pytest.raises(ValueError, match=f"Example hyperparameter '{field}' is out of range"):
        ExampleParams(**{field: value})


def test_training_params_fields_are_shared_where_they_mean_the_recipe():
    shared = {f.name for f in dataclasses.fields(TrainingParams)}
    for name in ("fp", "fst", "ft-sam", "nad", "npd", "pbe"):
        assert issubclass(DEFENSE_PARAMS[name], TrainingParams)
        assert shared <= {f.name for f in dataclasses.fields(DEFENSE_PARAMS[name])}
