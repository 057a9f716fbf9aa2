"""What a training learns (:class:`Recipe`) and how the engine runs it (:class:`EngineOptions`): plain
frozen parameter classes, kept apart from the engine so that validating a configuration and
estimating its cost never import the training loop."""

from __future__ import annotations

from dataclasses import dataclass

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
