"""What several defenses share: splitting held-out data off the mitigation data, batches of it,
accuracy on it, and reading a layer's output. Everything here works from ``MitigationData``
alone, so no helper can reach test or poisoned data either."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from ..engine import augment_batch, autocast
from . import MitigationData


def subset(data: MitigationData, indices: torch.Tensor) -> MitigationData:
    return replace(data, images=data.images[indices], labels=data.labels[indices])


def split_held_out(data: MitigationData, generator: torch.Generator
                   ) -> tuple[MitigationData, MitigationData, str | None]:
    """(fit, held_out, note): one image of every class is held out to choose thresholds on, so
    a defense never needs test data. A class with a single image (SPC 1) cannot spare it: then
    that image is in both parts, and ``note`` says so, for the result file's details."""
    held, fit, shared = [], [], []
    for label in torch.unique(data.labels):
        members = torch.nonzero(data.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator, device="cpu").to(members.device)]
        held.append(members[:1])
        fit.append(members[1:] if len(members) > 1 else members)
        if len(members) == 1:
            shared.append(int(label))
    note = None
    if shared:
        note = (f"held-out images overlap the fitting images for {len(shared)} class(es) with a single "
                "mitigation image; thresholds are chosen on data the defense also fits on")
    return subset(data, torch.cat(fit)), subset(data, torch.cat(held)), note


def batches(data: MitigationData, batch_size: int, generator: torch.Generator | None = None,
            augment: bool = False, crop_padding: int = 4, normalise: bool = True
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over the mitigation data: float NCHW batches (normalised, or in [0, 1] with
    ``normalise=False`` for defenses that perturb pixels) and labels; shuffled when a generator is
    given (on any device), randomly cropped and flipped (as the dataset allows) when ``augment``."""
    n = len(data)
    order = torch.arange(n, device=data.images.device)
    if generator is not None:
        order = order[torch.randperm(n, generator=generator, device=generator.device).to(order.device)]
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        x = data.images[index].permute(0, 3, 1, 2)
        if augment:
            x = augment_batch(x, crop_padding, data.normalisation.hflip,
                              generator if generator is not None else torch.Generator())
        x = x.float().div_(255.0)
        yield (data.normalisation.normalise(x) if normalise else x), data.labels[index]


@torch.inference_mode()
def accuracy(model: nn.Module, data: MitigationData, batch_size: int = 512) -> float:
    """Clean accuracy on (a part of) the mitigation data, in eval mode."""
    if len(data) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in batches(data, batch_size):
        with autocast(x.device):
            correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(data)


@contextmanager
def layer_outputs(model: nn.Module, names: list[str] | tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, every forward pass stores the outputs of the named layers in the yielded dict."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, inputs, output, name=name: outputs.__setitem__(name, output)) for name in names]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def untrainable(name: str, model: nn.Module, data: MitigationData, minimum: int = 2):
    """``Defended(model unchanged, note)`` when there are fewer images than a defense can train on
    (BatchNorm in training mode needs 2), else None."""
    from . import Defended

    if len(data) >= minimum:
        return None
    return Defended(model, {"notes": [f"only {len(data)} mitigation image(s): {name} cannot train on fewer than "
                                      f"{minimum}; model returned unchanged"]})


def batching_notes(n: int, batch_size: int, unit: str = "epoch", skips_single: bool = True) -> list[str]:
    """What small mitigation sets do to a defense's batches, for ``details["notes"]``."""
    notes = []
    if n < batch_size:
        notes.append(f"{n} mitigation images, fewer than batch_size {batch_size}: one batch per {unit}")
    if skips_single and n % batch_size == 1:  # see engine.batch_count
        notes.append(f"a trailing batch of one image is skipped every {unit} (BatchNorm cannot train on it; "
                     f"a different image each {unit})")
    return notes
