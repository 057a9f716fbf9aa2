"""FT: plain fine-tuning of the whole model on the mitigation data (the survey's fine-tuning
baseline). Its hyperparameters are a training recipe; the defaults (100 epochs, SGD lr 0.01,
momentum 0.9, weight decay 5e-4, batch 128, cosine, random crop + flip) are the reference's."""

from __future__ import annotations

from ..engine import Recipe, train
from . import defense, run_seed


@defense("ft", "FT: fine-tune the whole model on the mitigation data", Recipe, family="fine-tuning")
def fine_tune(model, data, params: Recipe, device):
    train(model.to(device), data.images, data.labels, params, data.normalisation, run_seed(), description="FT")
    return model
