"""What a training learns (:class:`Recipe`) and how the engine runs it (:class:`EngineOptions`), and
the base of the defenses' hyperparameters that are such a recipe (:class:`TrainingParams`): plain
frozen parameter classes, kept apart from the engine so that validating a configuration and
estimating its cost never import the training loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .params import BatchSize, check_ranges

SCHEDULES = ("cosine", "constant", "cosine_per_batch")
OPTIMIZERS = ("sgd", "adam", "amsgrad")  # "amsgrad": Adam with amsgrad, as BackdoorBench builds Adam


@dataclass(frozen=True)
class Recipe:
    """A training recipe; the defaults are the survey's backdoored-model recipe."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" (per epoch, to 0), "constant", or "cosine_per_batch" (T_max = epochs
    # optimiser steps, stepped after every batch, as BackdoorBench's FT-SAM: it rises again past T_max)
    crop_padding: int = 4  # random-crop padding; 0 disables cropping
    augment: bool = True
    optimizer: str = "sgd"  # "sgd" (with momentum), "adam" or "amsgrad" (Adam with amsgrad; momentum unused)
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be at least 1 and lr positive")


# Recipe fields a TrainingParams subclass may add, and their ranges.
_OPTIONAL_CHECKS = {
    "crop_padding": lambda value: value >= 0,
    "label_smoothing": lambda value: 0 <= value < 1,
}


@dataclass(frozen=True)
class TrainingParams:
    """Base of the hyperparameters of a defense that trains with a recipe: the recipe fields they share,
    checked in one place, and the :class:`Recipe` they describe (:meth:`recipe`, by field name).

    The defaults are FORK's common defense recipe (``config/defense/<name>/*.yaml``: SGD lr 0.01,
    momentum 0.9, weight decay 5e-4, batch 256, random crop and flip); ``epochs`` has none, as every
    defense states its own. A subclass redeclares the defaults it differs in (the field keeps its place;
    a ``batch_size`` stays a ``BatchSize``), may add the recipe's ``schedule`` (from ``SCHEDULES``),
    ``crop_padding`` and ``label_smoothing``, which are then checked and passed on too, and checks its
    own hyperparameters in :meth:`checks`. Errors name ``OWNER`` and the hyperparameter."""

    OWNER: ClassVar[str] = "training"
    MIN_EPOCHS: ClassVar[int] = 1  # 0 where a defense may skip its training
    SCHEDULES: ClassVar[tuple[str, ...]] = SCHEDULES  # the schedules the defense offers

    epochs: int
    batch_size: BatchSize = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True  # random crop and flip where the dataset allows

    def checks(self) -> dict[str, bool]:
        """{hyperparameter: whether its value is valid} for the subclass's own hyperparameters."""
        return {}

    def __post_init__(self):
        names = {f.name for f in dataclasses.fields(self)}
        shared = {"epochs": self.epochs >= self.MIN_EPOCHS, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0}
        if "schedule" in names:
            shared["schedule"] = self.schedule in self.SCHEDULES
        shared.update({name: valid(getattr(self, name)) for name, valid in _OPTIONAL_CHECKS.items() if name in names})
        check_ranges(self.OWNER, self, {**shared, **self.checks()})

    def recipe(self, **changes) -> Recipe:
        """The recipe of these hyperparameters: every field that is also a :class:`Recipe` field, by name,
        then ``changes``; the Recipe's defaults for the rest."""
        names = {f.name for f in dataclasses.fields(self)}
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(Recipe) if f.name in names}
        return Recipe(**{**own, **changes})


PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs, as opposed to what it learns (the :class:`Recipe`)."""

    compile: bool = False  # torch.compile the model for the training loop
    channels_last: bool = True  # NHWC memory format on CUDA, where convolutions run faster in it
    checkpoint_every: int = 5  # epochs between checkpoints, when training has a checkpoint path
    # "bf16": autocast on CUDA (faster); "fp32": none, as the survey's toolkit trained (amp off). The
    # paper preset sets fp32; training, evaluation and the defenses all follow it (see ``precision``).
    precision: str = "bf16"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")
