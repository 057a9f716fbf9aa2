"""FT: plain fine-tuning of the whole model on the mitigation data (the survey's fine-tuning
baseline), with the shared engine's SGD recipe and augmentation."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import Recipe, train
from . import defense, run_seed


@dataclass(frozen=True)
class FTParams:
    epochs: int = 100
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: bool = True


@defense("ft", "FT: fine-tune the whole model on the mitigation data", FTParams, family="fine-tuning")
def fine_tune(model, data, params: FTParams, device):
    recipe = Recipe(epochs=params.epochs, batch_size=params.batch_size, lr=params.lr, momentum=params.momentum,
                    weight_decay=params.weight_decay, schedule=params.schedule, augment=params.augment)
    train(model.to(device), data.images, data.labels, recipe, data.normalisation, run_seed(), description="FT")
    return model
