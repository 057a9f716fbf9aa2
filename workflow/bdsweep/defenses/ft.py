"""FT: plain fine-tuning of the whole model on the mitigation data (the survey's fine-tuning
baseline). Its hyperparameters are a training recipe; the defaults are FORK's
(``config/defense/ft/default.yaml``, the only FT config, used for every dataset): 100 epochs, SGD
lr 0.01, momentum 0.9, weight decay 5e-4, CosineAnnealingLR, batch 256, random crop + flip."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import train
from ..params import BatchSize
from ..passes import epochs_over_images
from ..recipe import Recipe
from . import defense, run_seed


@dataclass(frozen=True)
class FTParams(Recipe):
    batch_size: BatchSize = 256  # FORK config/defense/ft/default.yaml:15 (the engine's recipe default is 128)


@defense("ft", "FT: fine-tune the whole model on the mitigation data", FTParams,
         family="fine-tuning", passes=epochs_over_images("epochs"), smoke={"epochs": 1, "batch_size": 8})
def fine_tune(model, data, params: FTParams, device):
    train(model.to(device), data.images, data.labels, params, data.normalisation, run_seed(), description="FT")
    return model
