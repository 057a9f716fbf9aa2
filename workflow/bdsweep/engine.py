"""The training and inference engine every stage shares.

Images stay uint8 NHWC on the device; each batch is cropped, flipped and normalised there, so no
host-side data loader or per-image Python runs in the loop. Evaluation runs once, in inference
mode, with large batches.
"""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import (
    Checkpoint,
    PhaseCheckpoint,
    defense_phase,
    global_rng_state,
    load_object_state,
    object_state,
    set_global_rng_state,
    sigterm_requests,
    trace,
)
from .errors import Preempted
from .recipe import PRECISIONS, EngineOptions, Recipe


@dataclass(frozen=True)
class Normalisation:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool  # horizontal flips preserve labels on this dataset

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Float NCHW images in [0, 1] -> the model's input scale."""
        mean, std = _channel_stats(self.mean, self.std, images.device)
        return (images - mean) / std

    def apply(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW."""
        return self.normalise(to_unit(batch))


def to_unit(batch: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor, rounding: str = "round") -> torch.Tensor:
    """Float NCHW in [0, 1] -> uint8 NHWC: rounded to the nearest pixel value, or with
    ``rounding="truncate"`` truncated as torchvision's ``ToPILImage`` (``mul(255).byte()``) does."""
    scaled = images.detach().mul(255.0)
    if rounding == "round":
        scaled = scaled.round_()
    elif rounding != "truncate":
        raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}")
    return scaled.clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@functools.cache
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors, made once per device instead of copied every batch.
    Made outside inference mode even when first asked for inside it: cached inference tensors
    could never take part in a later computation that autograd records."""
    with torch.inference_mode(False):
        return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # np.require copies read-only memory maps, which torch cannot wrap.
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).to(device)


_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("bdsweep_precision", default="bf16")
# Device types on which "bf16" autocasts: CUDA only, except where a test asks for the CPU too.
_AUTOCAST_DEVICES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "bdsweep_autocast_devices", default=("cuda",))


@contextmanager
def precision(name: str, on_cpu: bool = False):
    """Within the block, :func:`autocast` runs in ``name``: "bf16" (autocast on CUDA, faster) or
    "fp32" (no autocast, as the survey's toolkit ran: its ``amp`` is off). Every stage that trains,
    evaluates or defends runs inside it (``EngineOptions.precision``). ``on_cpu`` makes "bf16"
    autocast on the CPU as well, where exactly the CUDA path does (for tests only: a dtype error of
    the GPU path then shows up on a machine without one; CPU bf16 is slow, never used for results)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    tokens = _PRECISION.set(name), _AUTOCAST_DEVICES.set(("cuda", "cpu") if on_cpu else ("cuda",))
    try:
        yield
    finally:
        _AUTOCAST_DEVICES.reset(tokens[1])
        _PRECISION.reset(tokens[0])


def autocast(device: torch.device):
    # bf16 keeps the fp32 exponent range, so no loss scaling is needed.
    if device.type in _AUTOCAST_DEVICES.get() and _PRECISION.get() == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def augment_batch(batch: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip for a whole NCHW batch (any
    dtype; differentiable for float input, so a trigger generator trains through it). The random
    draws come from ``generator`` on its own device, so a host generator works for device data."""
    n, c, h, w = batch.shape
    device, draws = batch.device, generator.device
    if padding:
        # Gather whole pixels (channel vectors) through an NHWC view: far cheaper than per element.
        pixels = F.pad(batch, (padding, padding, padding, padding)).permute(0, 2, 3, 1)
        dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=draws, generator=generator).to(device)
        dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=draws, generator=generator).to(device)
        rows = dy + torch.arange(h, device=device).view(1, h, 1)
        cols = dx + torch.arange(w, device=device).view(1, 1, w)
        batch = pixels[torch.arange(n, device=device).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)
    if hflip:
        flip = torch.rand(n, device=draws, generator=generator).to(device) < 0.5
        batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(3), batch)
    return batch


class NonFiniteLoss(ValueError):
    """A loss became NaN or infinite: what the loop learns from then on is meaningless."""


class LossWatch:
    """Notices a non-finite loss without a host sync per step: each step's verdict stays on the
    device (the first bad step's number), and :meth:`check` reads it where the loop syncs anyway
    (an epoch's end, a checkpoint). ``where(step)`` names a step for the error message."""

    def __init__(self, device: torch.device, where: Callable[[int], str]):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.where = where

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self.first_bad.masked_fill_(bad & (self.first_bad < 0), step)

    def check(self) -> None:
        if (step := int(self.first_bad)) >= 0:
            raise NonFiniteLoss(f"non-finite loss (NaN or inf) in {self.where(step)}")


class BatchHook:
    """How a party other than plain cross-entropy takes part in each training batch: a
    training-time attack (poisons the batch) or a defense (adversarial examples, a regulariser,
    a two-pass optimiser step). The engine's loop stays the one loop; a hook only adds to it.

    Per batch: the shuffled batch becomes float NCHW images in [0, 1] and goes to ``transform``
    (triggers and adversarial examples are made before augmentation, as the methods' own code
    does), then is augmented and normalised, then goes to ``after_normalise``; after the forward
    pass ``loss`` turns the
    cross-entropy into the objective; after ``backward`` comes ``after_backward`` (e.g. SAM's
    second pass, which may recompute the gradients), ``before_step``, the optimiser step, then ``step``.
    ``checkpoint_state``/``restore_checkpoint`` carry the hook through a resumed run; by default
    they cover every module, optimiser, scheduler, random generator and number attribute."""

    def transform(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(images, labels, extra loss or None) for this batch; ``indices`` index the training set."""
        return images, labels, None

    def after_normalise(self, inputs: torch.Tensor) -> torch.Tensor:
        """The normalised batch the model will see (e.g. the per-batch augmentation that WaNet's
        and BPP's code applies to normalised tensors)."""
        return inputs

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
             cross_entropy: torch.Tensor) -> torch.Tensor:
        """The objective to minimise, given the normalised inputs the model saw and its logits."""
        return cross_entropy

    def after_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        pass

    def before_step(self, optimiser: torch.optim.Optimizer) -> None:
        """Just before the optimiser steps (e.g. to drop its momentum, as a freshly made one has none)."""

    def step(self) -> None:
        pass

    def end_epoch(self) -> None:
        pass

    def checkpoint_state(self) -> dict:
        return object_state(self)

    def restore_checkpoint(self, state: dict, device: torch.device | None = None) -> None:
        load_object_state(self, state, device)


def batch_count(n: int, batch_size: int) -> int:
    """Batches per epoch. A trailing batch of one image is skipped (a different image each epoch,
    as batches are reshuffled): BatchNorm cannot normalise one sample at a 1x1 feature map."""
    if n < 2:
        raise ValueError(f"training needs at least 2 images, got {n}")
    return n // batch_size + (n % batch_size > 1)


class TrainingLoop:
    """The state of one training run, which is exactly what a checkpoint holds: model,
    optimiser, schedule, random generators, the position inside the epoch and the curve so far."""

    def __init__(self, model: nn.Module, recipe: Recipe, seed: int, device: torch.device,
                 hook: BatchHook | None):
        self.model, self.hook = model, hook
        self.generator = torch.Generator(device=device).manual_seed(seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimiser = (
            torch.optim.Adam(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay,
                             amsgrad=recipe.optimizer == "amsgrad") if recipe.optimizer in ("adam", "amsgrad")
            else torch.optim.SGD(trainable, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay))
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimiser, recipe.epochs)
                          if recipe.schedule in ("cosine", "cosine_per_batch") else None)
        self.per_batch_schedule = recipe.schedule == "cosine_per_batch"
        self.epoch, self.batch, self.order = 0, 0, None
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.curve: list[dict] = []

    def state(self) -> dict:
        return {
            **object_state(self),
            "order": None if self.order is None else self.order.cpu(),
            "loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "curve": self.curve,
            "global_rng": global_rng_state(),
            "hook": None if self.hook is None else self.hook.checkpoint_state(),
        }

    def restore(self, state: dict) -> None:
        device = self.loss_sum.device
        load_object_state(self, {name: state[name] for name in object_state(self)})
        self.order = None if state["order"] is None else state["order"].to(device)
        self.loss_sum, self.correct = state["loss_sum"].to(device), state["correct"].to(device)
        self.curve = list(state["curve"])
        set_global_rng_state(state["global_rng"])
        if self.hook is not None:
            self.hook.restore_checkpoint(state["hook"], device)


def prepare_for_device(model: nn.Module, device: torch.device, options: EngineOptions) -> nn.Module:
    """The module the loop calls: channels-last on CUDA, compiled on request. It shares its
    parameters with ``model``, which stays the one saved."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels once
        if options.channels_last:
            model.to(memory_format=torch.channels_last)
    return torch.compile(model) if options.compile else model


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    normalisation: Normalisation,
    seed: int,
    description: str = "train",
    hook: BatchHook | None = None,
    progress: bool | None = None,
    options: EngineOptions = EngineOptions(),
    checkpoint: Checkpoint | PhaseCheckpoint | None = None,
) -> list[dict]:
    """Train ``model`` in place on uint8 NHWC ``images`` (already on the model's device).

    ``hook`` is an attack's or a defense's part in each batch (see :class:`BatchHook`). With a
    ``checkpoint``, training resumes from it when it holds this job's state, saves it every
    ``options.checkpoint_every`` epochs and at the end, and on SIGTERM saves it after the current
    batch and raises :class:`Preempted`. Inside a defense checkpoint (``checkpoints.defense_checkpoints``)
    a call without a checkpoint is that checkpoint's next phase. A non-finite objective raises
    :class:`NonFiniteLoss` at the end of its epoch (or at the next checkpoint), naming the batch.
    Returns the per-epoch curve (loss, accuracy, learning rate, wall-clock seconds; an epoch cut by
    preemption counts only its resumed part)."""
    from tqdm.auto import tqdm

    device = images.device
    if checkpoint is None:
        checkpoint = defense_phase(description)
    loop = TrainingLoop(model, recipe, seed, device, hook)
    if checkpoint is not None and (saved := checkpoint.load()) is not None:
        loop.restore(saved)
        trace(f"bdsweep: {description} resumes from {checkpoint.path} at epoch {loop.epoch + 1}, "
              f"batch {loop.batch + 1}")
    forward = prepare_for_device(model, device, options)
    channels_last = options.channels_last and device.type == "cuda"
    n, size = len(labels), recipe.batch_size
    batches = batch_count(n, size)
    watch = LossWatch(device, lambda step: f"{description}, epoch {step // batches + 1}, batch {step % batches + 1}")
    model.train()
    bar = tqdm(range(loop.epoch, recipe.epochs), desc=description, initial=loop.epoch, total=recipe.epochs,
               disable=(not progress) if progress is not None else None)
    with sigterm_requests() if checkpoint is not None else nullcontext(lambda: False) as preempted:
        for epoch in bar:
            epoch_started = time.perf_counter()
            if loop.order is None:
                loop.order = torch.randperm(n, device=device, generator=loop.generator)
            while loop.batch < batches:
                index = loop.order[loop.batch * size:(loop.batch + 1) * size]
                x, y, extra_loss = images[index].permute(0, 3, 1, 2), labels[index], None
                with autocast(device):
                    if hook is not None:  # poison first, then augment the float batch
                        x, y, extra_loss = hook.transform(x.float().div_(255.0), y, index)
                    if recipe.augment:
                        x = augment_batch(x, recipe.crop_padding, normalisation.hflip, loop.generator)
                    if hook is None:  # augmenting uint8 is cheaper; convert afterwards
                        x = x.float().div_(255.0)
                    x = normalisation.normalise(x)
                    if hook is not None:
                        x = hook.after_normalise(x)
                    logits = forward(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
                    loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
                    objective = loss if hook is None else hook.loss(x, y, logits, loss)
                    if extra_loss is not None:
                        objective = objective + extra_loss
                watch.observe(objective, loop.epoch * batches + loop.batch)
                loop.optimiser.zero_grad(set_to_none=True)
                objective.backward()
                if hook is not None:
                    hook.after_backward(x, y)
                    hook.before_step(loop.optimiser)
                loop.optimiser.step()
                if loop.per_batch_schedule:
                    loop.scheduler.step()
                if hook is not None:
                    hook.step()
                loop.loss_sum += loss.detach() * len(y)
                loop.correct += (logits.argmax(1) == y).sum()
                loop.batch += 1
                if preempted():
                    watch.check()  # a checkpoint never holds what a non-finite loss made
                    checkpoint.save(loop.state())
                    raise Preempted(f"stopped by SIGTERM in epoch {epoch + 1}; resume from {checkpoint.path}")
            watch.check()
            lr = loop.optimiser.param_groups[0]["lr"]
            if loop.scheduler is not None and not loop.per_batch_schedule:
                loop.scheduler.step()
            if hook is not None:
                hook.end_epoch()
            # One host sync per epoch, not per batch.
            seen = min(n, batches * size)
            row = {"epoch": epoch + 1, "loss": loop.loss_sum.item() / seen, "accuracy": loop.correct.item() / seen,
                   "lr": lr, "seconds": time.perf_counter() - epoch_started}
            loop.curve.append(row)
            loop.epoch, loop.batch, loop.order = epoch + 1, 0, None
            loop.loss_sum.zero_()
            loop.correct.zero_()
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
            if checkpoint is not None and (loop.epoch % options.checkpoint_every == 0 or loop.epoch == recipe.epochs):
                checkpoint.save(loop.state())
        if preempted():  # arrived after the last batch: training is saved, the job still stops
            raise Preempted(f"stopped by SIGTERM after training; resume from {checkpoint.path}")
    model.eval()
    return loop.curve


@torch.inference_mode()
def predict(model: nn.Module, images: np.ndarray | torch.Tensor, normalisation: Normalisation,
            device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Predicted labels for uint8 NHWC ``images`` (host or device), in large inference batches."""
    model.eval()
    predictions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        chunk = chunk.to(device) if isinstance(chunk, torch.Tensor) else as_tensor(chunk, device)
        with autocast(device):
            predictions.append(model(normalisation.apply(chunk)).argmax(1))
    if not predictions:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(predictions).cpu().numpy().astype(np.int64)
