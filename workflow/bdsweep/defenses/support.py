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
    """Some of the SPC images; the spare draw belongs to the whole partition and is dropped."""
    return replace(data, images=data.images[indices], labels=data.labels[indices], spare=None)


# FORK's validation share: ``val_ratio: 0.1`` (config/defense/fp/*.yaml, config/defense/anp/default.yaml).
VALIDATION_RATIO = 0.1


def split_held_out(data: MitigationData, generator: torch.Generator | None = None,
                   val_ratio: float = VALIDATION_RATIO) -> tuple[MitigationData, MitigationData, str | None]:
    """(fit, held_out, note): the validation split FORK makes for FP, ANP and the like, so a
    defense chooses thresholds on mitigation data, never on test data.

    FORK (``utils/bd_dataset_v2.py:405-439``, ``spc_choose_poisoned_sample``): per class,
    ``int(spc * val_ratio)`` images are held out; when that is 0, one is, and the class draws one
    image more (SPC + 1). The held-out images are the first of the class's draw, the rest fit.
    So at val_ratio 0.1: SPC 1 and 2 fit on 1 and 2 images and hold out 1 (the extra draw,
    ``data.spare``, is a fitting image), SPC 10 fits on 9 + 1 held out, SPC 100 on 90 + 10.

    ``generator`` is not used: the split is fixed by the partition's draw order (FORK's by its
    seed), so every defense splitting one partition holds out the same images. It stays in the
    signature for the callers.

    Without a spare image (mitigation data not built by the defend stage), a class that FORK
    would draw an extra image for fits on its other images, and a class with a single image
    shares it between both parts; ``note`` says so, for the result file's details."""
    spare = data.spare
    pooled = data if spare is None else replace(
        data, images=torch.cat([data.images, spare.images]), labels=torch.cat([data.labels, spare.labels]), spare=None)
    held, fit, fewer, shared = [], [], [], []
    for label in torch.unique(data.labels):
        members = torch.nonzero(data.labels == label).flatten()
        held_count = int(len(members) * val_ratio)
        if held_count < 1:
            held_count = 1
            extra = (torch.nonzero(spare.labels == label).flatten()[:1] + len(data) if spare is not None
                     else members[:0])
            if len(extra):
                members = torch.cat([members, extra])
            elif len(members) > 1:
                fewer.append(int(label))
            else:
                shared.append(int(label))
        held.append(members[:held_count])
        fit.append(members[held_count:] if len(members) > held_count else members)
    notes = []
    if fewer:
        notes.append(f"no extra mitigation image for {len(fewer)} class(es): the split fits on one "
                     "image fewer per class than the survey's code")
    if shared:
        notes.append(f"held-out images overlap the fitting images for {len(shared)} class(es) with a single "
                     "mitigation image; thresholds are chosen on data the defense also fits on")
    return subset(pooled, torch.cat(fit)), subset(pooled, torch.cat(held)), "; ".join(notes) or None


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
