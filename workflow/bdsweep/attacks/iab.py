"""IAB, the Input-Aware dynamic Backdoor (Nguyen & Tran, NeurIPS 2020): every image gets its own trigger.

A mask generator M is pre-trained alone (sparse masks, with a diversity loss so different images get
different masks), then frozen while a pattern generator G trains with the classifier: poisoned images
become x + (G(x) - x) * M(x) labelled as the target, and "cross" images carry another image's pattern
and mask but keep their label, so a trigger only works on the image it was generated for."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine import augment_batch, autocast, to_unit
from ..params import check_ranges
from . import ROUNDINGS, SCHEDULES, HookContext, TrainingHook, toolkit_recipe, training_time

EPSILON = 1e-7


@dataclass(frozen=True)
class IABParams:
    mask_epochs: int = 25  # mask-generator pre-training epochs over the training set
    lr: float = 0.01  # Adam, both generators
    betas: tuple[float, float] = (0.5, 0.9)
    lambda_norm: float = 100.0  # weight of the mask-density penalty
    mask_density: float = 0.032  # mask values above this are penalised
    lambda_div: float = 1.0  # weight of the diversity losses (mask pre-training and pattern training)
    cross_ratio: float = 1.0  # cross samples per poisoned sample
    generator_channels: int = 32  # width of the generators' first encoder stage (doubles per stage)
    generator_depth: int = 3  # max-pool down-sampling steps of the generators (the paper's 3 at 32 px)
    mask_batch_size: int = 128  # batch size of the mask pre-training
    mask_milestones: tuple[int, ...] = (10, 20)  # mask pre-training epochs where its learning rate drops
    mask_gamma: float = 0.1  # ... by this factor
    # Per-epoch factor on the pattern generator's learning rate; 1 keeps it constant, as the toolkit does
    # (its first drop is at epoch 200).
    generator_decay: float = 1.0
    # Backdoor test images: "truncate" to uint8 as the toolkit stores them (ToPILImage), or "round".
    rounding: str = "truncate"
    # The classifier's learning rate: constant as the toolkit (FORK config/attack/inputaware: schedulerC
    # milestones 100 and beyond are never reached), or "training": the training section's schedule.
    schedule: str = "constant"
    # The toolkit augments (its train transform: crop after zero padding of 4, flip on CIFAR-10) before
    # it poisons; False: the engine augments the poisoned batch (bdsweep's earlier recipe).
    augment_first: bool = True
    # The generators see normalised images and the diversity losses compare normalised images and
    # patterns, as the toolkit (FORK attack/inputaware.py create_bd, train_step, train_mask_step);
    # False: images in [0, 1].
    normalised: bool = True

    def __post_init__(self):
        checks = {
            "rounding": self.rounding in ROUNDINGS,
            "schedule": self.schedule in SCHEDULES,
            "mask_epochs": self.mask_epochs >= 0,
            "lr": self.lr > 0,
            "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "lambda_norm": self.lambda_norm >= 0,
            "mask_density": 0 < self.mask_density < 1,
            "lambda_div": self.lambda_div >= 0,
            "cross_ratio": self.cross_ratio >= 0,
            "generator_channels": self.generator_channels >= 1,
            "generator_depth": self.generator_depth >= 1,
            "mask_batch_size": self.mask_batch_size >= 1,
            "mask_milestones": all(isinstance(m, int) and m >= 1 for m in self.mask_milestones),
            "mask_gamma": 0 < self.mask_gamma <= 1,
            "generator_decay": 0 < self.generator_decay <= 1,
        }
        check_ranges("IAB", self, checks)


def _block(in_channels: int, channels: int, activate: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(in_channels, channels, 3, 1, 1), nn.BatchNorm2d(channels, momentum=0.05)]
    return layers + [nn.ReLU(inplace=True)] if activate else layers


class Generator(nn.Module):
    """Encoder-decoder of conv-BN-ReLU blocks: ``depth`` stages of two blocks and a 2x max-pool
    (width doubling from ``channels``), a middle block, then ``depth`` stages of bilinear 2x
    up-sampling and two blocks (width halving); the last block has no ReLU and ``out_channels``.
    The output is squashed into (0, 1) with tanh, so patterns are pixel values."""

    def __init__(self, out_channels: int, channels: int, depth: int):
        super().__init__()
        layers, current, width = [], 3, channels
        for step in range(depth):
            layers += [*_block(current, width), *_block(width, width), nn.MaxPool2d(2)]
            current, width = width, width * 2 if step < depth - 1 else width
        layers += _block(current, current)
        for step in range(depth):
            last = step == depth - 1
            out = out_channels if last else max(1, current // 2)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       *_block(current, current), *_block(current, out, activate=not last)]
            current = out
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.shape[-2:] != x.shape[-2:]:  # sizes not divisible by 2**depth
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.tanh(y) / (2 + EPSILON) + 0.5


def threshold(mask: torch.Tensor) -> torch.Tensor:
    """The paper's steep soft threshold at 0.5, making masks near-binary."""
    return torch.tanh(mask * 20 - 10) / (2 + EPSILON) + 0.5


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance between two NCHW batches (in float32; the clamp keeps the
    gradient finite when a pair is the same image)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(EPSILON ** 2).sqrt()


def diversity_loss(inputs: torch.Tensor, partners: torch.Tensor, outputs: torch.Tensor,
                   partner_outputs: torch.Tensor) -> torch.Tensor:
    """Mean ratio of input distance to output distance: small when different inputs get different outputs."""
    return (rms_distance(inputs, partners) / (rms_distance(outputs, partner_outputs) + EPSILON)).mean()


def _seeded_generator(seed: int, out_channels: int, params: IABParams) -> Generator:
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return Generator(out_channels, params.generator_channels, params.generator_depth)


class IABHook(TrainingHook):
    def __init__(self, context: HookContext, params: IABParams):
        super().__init__(context)
        if context.image_size < 2 ** params.generator_depth:
            raise ValueError(f"IAB hyperparameter 'generator_depth' ({params.generator_depth}) is too deep for "
                             f"{context.image_size} px images")
        self.params = params
        device = context.device
        self.random = torch.Generator(device=device).manual_seed(context.seed)
        self.host_random = torch.Generator().manual_seed(context.seed)  # no device sync per batch
        self.augment_random = torch.Generator(device=device).manual_seed(context.seed + 3)
        self.mask = _seeded_generator(context.seed + 1, 1, params).to(device)
        self.pretrain_mask()
        self.mask.eval().requires_grad_(False)
        self.pattern = _seeded_generator(context.seed + 2, 3, params).to(device)
        self.optimiser = torch.optim.Adam(self.pattern.parameters(), lr=params.lr, betas=params.betas)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimiser, params.generator_decay)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """What the generators see and the diversity losses compare: normalised images (the toolkit's)
        or images in [0, 1]."""
        return self.context.normalisation.normalise(images) if self.params.normalised else images

    def masks(self, images: torch.Tensor) -> torch.Tensor:
        """Masks of images in [0, 1]."""
        return threshold(self.mask(self.view(images)))

    def patterns(self, images: torch.Tensor) -> torch.Tensor:
        """Patterns (pixel values in (0, 1)) of images in [0, 1]."""
        return self.pattern(self.view(images))

    def training_recipe(self, recipe):
        return toolkit_recipe(recipe, self.params.schedule, augment=not self.params.augment_first)

    @property
    def rounding(self) -> str:
        return self.params.rounding

    def pretrain_mask(self) -> None:
        from tqdm.auto import tqdm

        params, images, device = self.params, self.context.images, self.context.device
        optimiser = torch.optim.Adam(self.mask.parameters(), lr=params.lr, betas=params.betas)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, list(params.mask_milestones), params.mask_gamma)
        n = len(images)
        batches = math.ceil(n / params.mask_batch_size)
        self.mask.train()
        progress = self.context.progress
        for _ in tqdm(range(params.mask_epochs), desc="IAB mask generator",
                      disable=(not progress) if progress is not None else None):
            first = torch.randperm(n, device=device, generator=self.random)
            second = torch.randperm(n, device=device, generator=self.random)
            for b in range(batches):
                part = slice(b * params.mask_batch_size, (b + 1) * params.mask_batch_size)
                x1, x2 = to_unit(images[first[part]]), to_unit(images[second[part]])
                with autocast(device):
                    m1, m2 = self.masks(x1), self.masks(x2)
                norm = F.relu(m1.float() - params.mask_density).mean()
                diversity = diversity_loss(self.view(x1), self.view(x2), m1, m2)
                loss = params.lambda_norm * norm + params.lambda_div * diversity
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            scheduler.step()

    def poison(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.params.augment_first:  # as the toolkit's train transform, before poisoning
            images = augment_batch(images, 4, self.context.normalisation.hflip, self.augment_random)
        ratio = self.context.ratio
        backdoor, cross = self.split(indices, ratio, ratio * self.params.cross_ratio)
        n_bd, n_cross = len(backdoor), len(cross)
        if n_bd + n_cross == 0:
            return images, labels, None
        # Cross samples take the pattern and mask of another image of the batch (never their own).
        offset = int(torch.randint(1, max(2, len(images)), (1,), generator=self.host_random))
        partners = (cross + offset) % len(images)
        sources = images[torch.cat([backdoor, partners])]
        patterns = self.patterns(sources)
        with torch.no_grad():
            masks = self.masks(sources)
        targets = torch.cat([images[backdoor], images[cross]])
        out = images.clone()
        out[torch.cat([backdoor, cross])] = (targets + (patterns - targets) * masks).to(out.dtype)
        labels = labels.clone()
        labels[backdoor] = self.context.target
        if len(sources) < 2 or self.params.lambda_div == 0:
            return out, labels, None
        # Each generated pattern is compared with that of the image half the set away: with
        # cross_ratio 1 that pairs every poisoned image with a cross partner, as in the paper.
        shift = len(sources) // 2
        seen, drawn = self.view(sources), self.view(patterns)
        loss = diversity_loss(seen, seen.roll(shift, 0), drawn, drawn.roll(shift, 0))
        return out, labels, self.params.lambda_div * loss

    def step(self) -> None:
        self.optimiser.step()
        self.optimiser.zero_grad(set_to_none=True)

    def end_epoch(self) -> None:
        self.scheduler.step()

    @torch.no_grad()
    def trigger(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.pattern.training
        self.pattern.eval()
        try:
            patterns, masks = self.patterns(images).float(), self.masks(images).float()
        finally:
            self.pattern.train(was_training)
        return (images + (patterns - images) * masks).clamp(0, 1)

    def state(self) -> dict[str, np.ndarray]:
        return {f"{prefix}.{key}": value.detach().cpu().numpy()
                for prefix, network in (("pattern", self.pattern), ("mask", self.mask))
                for key, value in network.state_dict().items()}


@training_time("iab", "IAB: input-aware dynamic trigger generator", IABParams, trigger_type="dynamic",
               smoke={"mask_epochs": 1, "generator_channels": 4, "generator_depth": 2, "mask_batch_size": 8})
def make_hook(context: HookContext, params: IABParams) -> IABHook:
    return IABHook(context, params)
