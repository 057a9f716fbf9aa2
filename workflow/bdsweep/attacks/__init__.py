"""Attacks, one module each, registered in ``bdsweep.registry.ATTACKS``. There are two kinds.

A **data-poisoning** attack (BadNets, Blended, SIG, LF, SSBA) changes training images before
training. ``make_resource(context, params)`` builds what its trigger needs once (the attack-resources
stage: BadNets' patch, Blended's image, LF's perturbation against a clean model, SSBA's trained
encoder); ``apply_trigger(images, resource, params)`` stamps a whole uint8 NHWC array at once. The
poison stage (``bdsweep.poison``) chooses which training images receive the trigger and builds the
backdoor test set, identically for every such attack. A resource is per dataset, or per (dataset,
architecture) when ``per_architecture`` is set (LF: it is computed against that architecture).

A **training-time** attack (IAB, WaNet, BPP) poisons inside the training loop, as its paper does:
``make_hook(context, params)`` returns a :class:`TrainingHook` that the engine calls on every batch;
after training, the hook's ``trigger`` makes the backdoor test set.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine import BatchHook, Normalisation, as_tensor, to_uint8, to_unit
from ..recipe import Recipe
from ..registry import ATTACKS, smoke_settings

Resource = dict[str, np.ndarray]
# How a trigger's float result becomes uint8: "truncate" (the survey's toolkit: numpy astype / PIL's
# ToPILImage, i.e. floor for non-negative values) or "round" (to the nearest value).
ROUNDINGS = ("truncate", "round")
META = "meta"  # a resource's optional JSON metadata entry (e.g. SSBA's PSNR and bit accuracy)


def with_meta(resource: Resource, meta: dict) -> Resource:
    """``resource`` plus JSON metadata stored as a string array (npz-safe, no pickle)."""
    return {**resource, META: np.array(json.dumps(meta, sort_keys=True))}


def meta_of(resource: Resource) -> dict:
    return json.loads(str(resource[META])) if META in resource else {}


@dataclass(frozen=True)
class ResourceContext:
    """What building a trigger resource may use: the dataset's training images (the attacker's
    data), a clean model of the architecture for per-architecture resources, and where to compute."""

    image_size: int
    num_classes: int = 0
    target: int = 0
    seed: int = 0
    device: torch.device = torch.device("cpu")
    normalisation: Normalisation | None = None
    train_images: np.ndarray | None = None  # uint8 NHWC (a memory map; index it, do not copy it whole)
    train_labels: np.ndarray | None = None
    clean_model: torch.nn.Module | None = None


@dataclass(frozen=True)
class DataPoisoningAttack:
    params: type  # frozen dataclass of defaults
    make_resource: Callable[[ResourceContext, Any], Resource]
    apply_trigger: Callable[[np.ndarray, Resource, Any], np.ndarray]  # uint8 NHWC -> uint8 NHWC
    clean_label: bool = False  # poisons only target-class images and keeps their labels
    per_architecture: bool = False  # the resource is computed against a clean model of the architecture
    trigger_type: str = "static"  # TRIGGER_TYPES: the survey's Table III grouping (a column of the results)
    smoke: dict = field(default_factory=dict, hash=False)  # for tests only (registry.smoke_settings)


TRIGGER_TYPES = ("static", "dynamic")  # the same trigger on every image, or one that depends on the image


def _check_trigger_type(name: str, trigger_type: str) -> str:
    if trigger_type not in TRIGGER_TYPES:
        raise ValueError(f"attack {name!r}: trigger_type must be one of {TRIGGER_TYPES}, got {trigger_type!r}")
    return trigger_type


def no_model_passes(params) -> float:
    """The resource of a pattern, patch or signal: numpy work, no pass through a model."""
    return 0.0


def not_in_classifier_passes(params) -> None:
    """A resource made by networks of its own (SSBA's encoder and decoder): ``bdsweep cost`` lists its
    jobs without hours, as the classifier throughputs do not price it."""
    return None


def data_poisoning(name: str, description: str, params: type, make_resource, *, trigger_type: str,
                   clean_label: bool = False, per_architecture: bool = False,
                   resource_passes: Callable[[Any], float | None] = no_model_passes, smoke: dict | None = None):
    """Register ``apply_trigger(images, resource, params)`` as the attack ``name``; ``trigger_type``
    says whether its trigger is the same on every image (static) or depends on it (dynamic);
    ``resource_passes(params)`` is the work of making its resource in passes through the classifier
    (``bdsweep cost``; None: work it cannot price in those units); ``smoke``: the tests' tiny
    settings (``registry.smoke_settings``)."""

    def decorate(apply_trigger):
        attack = DataPoisoningAttack(params, make_resource, apply_trigger, clean_label, per_architecture,
                                     _check_trigger_type(name, trigger_type),
                                     smoke_settings("attack", name, params, smoke))
        ATTACKS.register(name, description, resource_passes=resource_passes)(attack)
        return apply_trigger

    return decorate


@dataclass(frozen=True)
class HookContext:
    """What a training-time attack knows when training starts."""

    images: torch.Tensor  # the whole training set, uint8 NHWC on the training device
    labels: torch.Tensor
    poisonable: torch.Tensor  # bool per training image: False for the reserved mitigation pool, if any
    normalisation: Normalisation
    num_classes: int
    image_size: int
    target: int
    ratio: float
    seed: int
    progress: bool | None = None

    @property
    def device(self) -> torch.device:
        return self.images.device


class TrainingHook(BatchHook):
    """A training-time attack's state during and after training.

    Subclasses implement ``poison`` (what the engine calls as :meth:`BatchHook.transform`) and
    ``trigger``; they count what they poison through :meth:`split` so the effective ratio is
    measured, not assumed."""

    rounding = "round"  # how the backdoor test set becomes uint8 (see ROUNDINGS); hooks take it from their params

    def __init__(self, context: HookContext):
        self.context = context
        self.seen = 0
        self.poisoned = 0

    def split(self, indices: torch.Tensor, *shares: float) -> list[torch.Tensor]:
        """Positions in the batch for each share of it, in order (e.g. backdoor, cross), taken
        from the front of the (already shuffled) batch among images outside the reserved pool, if any.
        The first share is the poisoned one and is counted; counts are int(share * batch size),
        as the attacks' own code computes them."""
        return self.split_counts(indices, *(int(share * len(indices)) for share in shares))

    def split_counts(self, indices: torch.Tensor, *counts: int) -> list[torch.Tensor]:
        """:meth:`split` with the number of images of each part given (at most what is eligible)."""
        eligible = torch.nonzero(self.context.poisonable[indices]).flatten()
        positions, start = [], 0
        for wanted in counts:
            count = min(wanted, len(eligible) - start)
            positions.append(eligible[start:start + count])
            start += count
        self.seen += len(indices)
        self.poisoned += len(positions[0])
        return positions

    @property
    def effective_ratio(self) -> float:
        return self.poisoned / self.seen if self.seen else 0.0

    def transform(self, images, labels, indices):
        return self.poison(images, labels, indices)

    def training_recipe(self, recipe: Recipe) -> Recipe:
        """The recipe this attack trains with, given the configured one (its own code may fix the
        schedule or the augmentation, e.g. WaNet's constant learning rate)."""
        return recipe

    def poison(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def trigger(self, images: torch.Tensor) -> torch.Tensor:
        """The backdoor trigger on float NCHW images in [0, 1] (no gradient); for the test set."""
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that define the trained trigger (warp field, generator weights), saved with the
        backdoor test set so the trigger can be inspected or reused."""
        return {}


SCHEDULES = ("constant", "training")  # a training-time attack's learning-rate schedule: the toolkit's, or the recipe's


def toolkit_recipe(recipe: Recipe, schedule: str, augment: bool) -> Recipe:
    """``recipe`` with a training-time attack's choices: ``schedule`` "constant" (the toolkit's:
    its attack configs' MultiStepLR milestones, 100 and beyond, are never reached in 100 epochs) or
    "training" (keep the recipe's), and the engine's per-image augmentation on or off."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    changes = {"augment": augment and recipe.augment}
    if schedule == "constant":
        changes["schedule"] = "constant"
    return dataclasses.replace(recipe, **changes)


def per_batch_augment(inputs: torch.Tensor, generator: torch.Generator, crop_padding: int, rotation: float,
                      hflip: bool) -> torch.Tensor:
    """WaNet's and BPP's ``PostTensorTransform`` (FORK ``attack/wanet.py`` and ``attack/bpp.py``): on a
    whole normalised NCHW batch, one draw per batch: with p 0.8 a random crop after zero padding of
    ``crop_padding``; with p 0.5 a rotation by an angle uniform in +-``rotation`` degrees (nearest
    neighbour, zero fill, as torchvision's ``RandomRotation``); where ``hflip`` (FORK: CIFAR-10 only)
    a horizontal flip with p 0.5. ``generator`` is a host generator (no device sync per batch)."""
    crop, rotate, flip, angle, dy, dx = torch.rand(6, generator=generator).tolist()
    n, c, h, w = inputs.shape
    if crop < 0.8 and crop_padding:
        span = 2 * crop_padding + 1
        top, left = int(dy * span), int(dx * span)
        padded = torch.nn.functional.pad(inputs, (crop_padding,) * 4)
        inputs = padded[:, :, top:top + h, left:left + w]
    if rotate < 0.5 and rotation:
        from torchvision.transforms.functional import InterpolationMode
        from torchvision.transforms.functional import rotate as rotate_images

        inputs = rotate_images(inputs, (2 * angle - 1) * rotation, InterpolationMode.NEAREST, fill=[0.0])
    if hflip and flip < 0.5:
        inputs = inputs.flip(3)
    return inputs


@dataclass(frozen=True)
class TrainingTimeAttack:
    params: type
    make_hook: Callable[[HookContext, Any], TrainingHook]
    trigger_type: str = "dynamic"  # TRIGGER_TYPES
    smoke: dict = field(default_factory=dict, hash=False)  # for tests only (registry.smoke_settings)


def training_time(name: str, description: str, params: type, *, trigger_type: str, smoke: dict | None = None):
    """Register ``make_hook(context, params) -> TrainingHook`` as the attack ``name`` (``trigger_type``
    and ``smoke`` as for :func:`data_poisoning`)."""

    def decorate(make_hook):
        attack = TrainingTimeAttack(params, make_hook, _check_trigger_type(name, trigger_type),
                                    smoke_settings("attack", name, params, smoke))
        ATTACKS.register(name, description)(attack)
        return make_hook

    return decorate


def is_training_time(attack) -> bool:
    return isinstance(attack, TrainingTimeAttack)


@torch.no_grad()
def apply_in_batches(images: np.ndarray, function: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                     batch_size: int = 512, rounding: str = "round") -> np.ndarray:
    """uint8 NHWC array -> ``function`` on float NCHW [0, 1] batches on ``device`` -> uint8 NHWC array
    (``rounding``: see :data:`ROUNDINGS`)."""
    out = np.empty_like(images)
    for start in range(0, len(images), batch_size):
        batch = to_unit(as_tensor(np.asarray(images[start:start + batch_size]), device))
        out[start:start + batch_size] = to_uint8(function(batch), rounding).cpu().numpy()
    return out


CHUNK = 64  # images per step of a whole-array trigger: intermediates stay in cache and memory stays bounded


def in_chunks(images: np.ndarray, function: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``function`` over consecutive chunks of a uint8 NHWC array (no per-image Python)."""
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        out[start:start + CHUNK] = function(np.asarray(images[start:start + CHUNK]))
    return out


def add_offset(images: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """clip(x + offset) for an integer offset broadcastable to HWC: exact, in int16."""
    offset = np.asarray(offset, dtype=np.int16)
    return in_chunks(images, lambda chunk: np.clip(chunk.astype(np.int16) + offset, 0, 255).astype(np.uint8))


def scaled(size: int, image_size: int, reference: int = 32) -> int:
    """A length defined at 32 px, scaled with the image (at least 1)."""
    return max(1, round(size * image_size / reference))



class PostTransformHook(TrainingHook):
    """What WaNet and BPP share: their rounding of stored images, the toolkit's recipe, and its
    per-batch transform of the normalised batch (:func:`per_batch_augment`). Their params carry
    ``rounding``, ``schedule``, ``post_transform``, ``crop_padding`` and ``rotation``; ``batch_random``
    is the host generator of the per-batch draws."""

    def start_post_transform(self, seed: int) -> None:
        self.batch_random = torch.Generator().manual_seed(seed + 2)  # per-batch augmentation draws

    @property
    def rounding(self) -> str:
        return self.params.rounding

    def training_recipe(self, recipe):
        return toolkit_recipe(recipe, self.params.schedule, augment=not self.params.post_transform)

    def after_normalise(self, inputs):
        if not self.params.post_transform:
            return inputs
        return per_batch_augment(inputs, self.batch_random, self.params.crop_padding, self.params.rotation,
                                 self.context.normalisation.hflip)

__all__ = ["Resource", "ROUNDINGS", "META", "with_meta", "meta_of", "ResourceContext", "DataPoisoningAttack",
           "data_poisoning",
           "HookContext", "TrainingHook", "TrainingTimeAttack", "training_time", "is_training_time", "apply_in_batches",
           "in_chunks", "add_offset", "scaled", "SCHEDULES", "toolkit_recipe", "per_batch_augment", "TRIGGER_TYPES",
           "PostTransformHook"]
