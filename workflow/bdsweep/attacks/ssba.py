"""SSBA (Li et al., ICCV 2021): a sample-specific invisible trigger made by a StegaStamp (Tancik et al., 2020)
steganography encoder.

The survey's code ("FORK") reads SSBA's poisoned images from pre-generated arrays that are not public
(``attack_train_replace_imgs_path``). They come from BackdoorBench's ``resource/ssba`` (BB, commit 59f6cdaa
for ``train.py`` and ``models.py``), so the resources stage trains that generator itself, per dataset, with
``generator`` choosing which:

``"stegastamp"`` (default: FORK's generator, as far as its files tell)
    BB ``models.py:7-79``: the secret goes through a dense layer (bits -> 16 x 16 x 3, ReLU), is upsampled
    (nearest) to the image size and concatenated before the image; a U-Net (3x3 convs, ReLU, channels
    32-32-64-128-256 down with four stride-2 convs, up by x2 nearest upsampling, a zero pad right and bottom
    and a 2x2 conv, skips concatenated, the input again at full size) ends in a 1x1 conv and a sigmoid: the
    encoder outputs the image itself, no residual and no bound (``use_residual 0``, readme Step 2). Decoder
    (``models.py:82-113``): seven 3x3 convs (five stride 2), a 512-unit dense layer, one logit per bit.
    Training (``train.py:22-32`` defaults, readme Step 2, loop ``train.py:238-309``): 100-bit secrets drawn
    at random per image, 20 epochs over the whole training set (shuffled, the last partial batch kept),
    batch 64, one Adam at 1e-4 for both networks, loss BCE(bits) + w * MSE(encoded, clean) on the encoded
    float images (no noise, crop or rounding layers), ``w`` from :class:`L2Ramp`. Poisoning (readme Step 3,
    ``embed_fingerprints.py --identical_fingerprints --encode_method bch``) embeds one identical secret in
    every image; saved as PNG, i.e. rounded to uint8.
``"bounded"`` (bdsweep's earlier generator)
    A small U-Net encoder and GAP decoder on random ``secret_bits``-bit secrets (1 bit, as the reference
    "b1" file names): bit BCE plus an image loss ramped in while the decoder reads the code, the residual
    bounded by ``max_residual * tanh``, less on flat regions (texture masking), the decoder reading through
    rounding noise and the victim's crop/flip. Poisoning stamps the all-ones code. A near-invisible trigger
    that a small CPU budget can train (the demo's and the tests').

What still differs from FORK (docs/deviations.md): the arrays themselves (weights, seeds); the secret is
:func:`trigger_code` (100 seeded bits), not the BCH codeword of FORK's unknown ``--secret`` string
(``generate_fingerprints.py:10-34``: 7 UTF-8 bytes + 5 BCH(t=5, poly 137) parity bytes + 4 zero bits);
sizes that are not multiples of 16 (32 for the decoder) run here, where BB's fixed upsampling factors fail.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine import as_tensor, augment_batch, to_uint8, to_unit
from . import (
    Resource,
    ResourceContext,
    apply_in_batches,
    data_poisoning,
    meta_of,
    not_in_classifier_passes,
    scaled,
    with_meta,
)

ENCODER, DECODER = "encoder.", "decoder."
GENERATORS = ("stegastamp", "bounded")
# Generator-specific defaults of the fields left None: StegaStamp's are BB train.py:22,26 and the readme's
# example (``--fingerprint_length 100``); the whole training set (train.py:238-242 iterates the image folder).
GENERATOR_DEFAULTS = {"stegastamp": {"secret_bits": 100, "lr": 1e-4, "train_images": None},
                      "bounded": {"secret_bits": 1, "lr": 1e-3, "train_images": 5000}}
TRIGGER_CODE_SEED = 20210  # the StegaStamp trigger's bits: a fixed draw, the same for every dataset and run
CURVE_POINTS = 10  # training-curve entries in the resource's metadata

# The bounded generator's constants.
OUT_GAIN = 10.0  # output layer's initial weights x this: a residual the decoder can see from the start
SETTLE = 0.1  # the last fraction of the steps only lowers the image-loss weight: the code ends readable
CHECK_EVERY = 10  # steps between updates of the image-loss weight (one host sync each)
SATURATION = 2.0  # |pre-tanh residual| above this is penalised (tanh(2) = 0.96 of the bound)
# Visibility (texture masking): a change is harder to see where the image has edges and texture. The local
# threshold is taken as proportional to FLOOR + local activity (mean |gradient| of the grey image, 3x3), and
# the residual may use the whole bound only where the activity reaches FULL (0.2 of it on flat regions).
MASK_FLOOR, MASK_FULL = 0.05, 0.25


@dataclass(frozen=True)
class SSBAParams:
    generator: str = "stegastamp"  # "stegastamp": FORK's (BB resource/ssba); "bounded": bdsweep's earlier one
    secret_bits: int | None = None  # code length; None: 100 (stegastamp, BB readme) or 1 (bounded)
    lr: float | None = None  # Adam's; None: 1e-4 (stegastamp, BB train.py:26) or 1e-3 (bounded)
    train_images: int | None = None  # a seeded random subset of the training set; None: all of it
    # (stegastamp, BB trains on the whole image folder) or 5000 (bounded)
    batch_size: int = 64  # BB train.py:25
    width: int = 32  # channels of the first stage (BB models.py:29: 32; both generators double them per level)
    eval_images: int = 500  # images for the reported PSNR and bit accuracy (stegastamp: seen in training, as
    # BB's ``embed_fingerprints.py --check`` measures on the training images; bounded: held out)
    # stegastamp only (BB train.py:24,30-32; the bit-accuracy threshold train.py:305)
    epochs: int = 20
    l2_loss_weight: float = 10.0
    l2_loss_await: int = 1000  # steps after the first batch read with bit accuracy > bit_accuracy_target ...
    l2_loss_ramp: int = 3000  # ... then the L2 weight rises linearly to l2_loss_weight over this many steps
    # both: stegastamp switches its L2 ramp on at the first batch above it; bounded ramps its image loss
    # while the running accuracy is at least this
    bit_accuracy_target: float = 0.9
    # bounded only
    steps: int = 3000  # encoder/decoder training steps (Adam)
    max_residual: float = 0.05  # L_inf bound on the residual, in [0, 1] pixel units (0.05 = 12.75 of 255)
    image_loss_weight: float = 1.0  # full weight of the image loss (MSE of the residual in units of the local bound):
    # higher is fainter (a higher PSNR), lower is a stronger trigger, easier for the victim to learn
    image_loss_ramp: float = 0.3  # fraction of the steps over which the image-loss weight rises linearly from 0 to
    # full, while the decoder reads the code (bits alone first, as in StegaStamp), below it the weight halves
    texture_masking: bool = True  # scale the bound by local visibility: the residual hides in edges and texture
    augment: bool = True  # the decoder reads encoded images through random crops (4 px padding at 32 px) and flips,
    # the victim's training augmentation, so the code survives it

    def __post_init__(self):
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {', '.join(GENERATORS)}, got {self.generator!r}")
        for name, default in GENERATOR_DEFAULTS[self.generator].items():
            if getattr(self, name) is None:  # frozen: the generator's default is filled in once, here
                object.__setattr__(self, name, default)
        positive_ints = ("secret_bits", "steps", "batch_size", "width", "eval_images", "epochs", "l2_loss_ramp")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.train_images is not None and self.train_images < 1:
            raise ValueError(f"train_images must be at least 1, got {self.train_images}")
        if not 0 < self.max_residual <= 1:
            raise ValueError(f"max_residual must be in (0, 1], got {self.max_residual}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("image_loss_weight", "l2_loss_weight", "l2_loss_await"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0 <= self.image_loss_ramp <= 1:
            raise ValueError(f"image_loss_ramp must be in [0, 1], got {self.image_loss_ramp}")
        if not 0.5 <= self.bit_accuracy_target < 1:
            raise ValueError(f"bit_accuracy_target must be in [0.5, 1), got {self.bit_accuracy_target}")


def trigger_code(params: SSBAParams) -> np.ndarray:
    """The one secret every poisoned image carries, (secret_bits,) float32 in {0, 1}. StegaStamp: a fixed
    seeded draw (FORK embeds one identical BCH codeword, ``embed_fingerprints.py --identical_fingerprints``,
    of a string its files do not give; a BCH codeword of text is as unstructured to the encoder, trained on
    random secrets); bounded: all ones."""
    if params.generator == "bounded":
        return np.ones(params.secret_bits, np.float32)
    return np.random.default_rng(TRIGGER_CODE_SEED).integers(0, 2, params.secret_bits).astype(np.float32)


def _codes(count: int, params: SSBAParams, device: torch.device) -> torch.Tensor:
    """The trigger code, once per image: (count, secret_bits)."""
    return torch.from_numpy(trigger_code(params)).to(device).expand(count, -1)


# --- StegaStamp (BB resource/ssba/models.py) ---------------------------------------------------------------


class _UpStage(nn.Module):
    """x2 nearest upsampling (to the skip's size), zero pad right and bottom, 2x2 conv, ReLU (BB models.py:34-36,
    63): the size of the skip it is concatenated with."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 2, 1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.relu(self.conv(F.pad(F.interpolate(x, size=size, mode="nearest"), (0, 1, 0, 1))))


class StegaStampEncoder(nn.Module):
    """(image, secret) -> encoded image in (0, 1): BB ``models.py:7-79`` with ``return_residual=0``, channels
    scaled by ``width / 32``. The nearest upsampling goes to the sizes it must match (the image's, the
    skips'), which equals BB's fixed factors (``resolution // 16``, 2) where the size is a multiple of 16."""

    def __init__(self, secret_bits: int, width: int = 32, channels: int = 3):
        super().__init__()
        w = width
        self.channels = channels
        self.secret_dense = nn.Linear(secret_bits, 16 * 16 * channels)
        inputs = 2 * channels
        self.down = nn.ModuleList([nn.Conv2d(inputs, w, 3, 1, 1), nn.Conv2d(w, w, 3, 2, 1),
                                   nn.Conv2d(w, 2 * w, 3, 2, 1), nn.Conv2d(2 * w, 4 * w, 3, 2, 1),
                                   nn.Conv2d(4 * w, 8 * w, 3, 2, 1)])
        self.up = nn.ModuleList([_UpStage(8 * w, 4 * w), _UpStage(4 * w, 2 * w), _UpStage(2 * w, w), _UpStage(w, w)])
        self.merge = nn.ModuleList([nn.Conv2d(8 * w, 4 * w, 3, 1, 1), nn.Conv2d(4 * w, 2 * w, 3, 1, 1),
                                    nn.Conv2d(2 * w, w, 3, 1, 1), nn.Conv2d(2 * w + inputs, w, 3, 1, 1)])
        self.last = nn.Conv2d(w, w, 3, 1, 1)
        self.output = nn.Conv2d(w, channels, 1)

    def forward(self, images: torch.Tensor, secrets: torch.Tensor) -> torch.Tensor:
        """Float NCHW [0, 1] images and (N, bits) {0, 1} secrets -> encoded images (sigmoid output)."""
        code = F.relu(self.secret_dense(secrets)).view(-1, self.channels, 16, 16)
        inputs = torch.cat([F.interpolate(code, size=images.shape[-2:], mode="nearest"), images], 1)
        skips = [inputs]
        for conv in self.down:
            skips.append(F.relu(conv(skips[-1])))
        x = skips.pop()  # the deepest features; skips[1:] are the other levels, finest first
        for up, merge in zip(self.up, self.merge):
            skip = skips.pop()
            extra = [inputs] if len(skips) == 1 else []  # the last merge also sees the input (models.py:73)
            x = F.relu(merge(torch.cat([skip, up(x, skip.shape[-2:]), *extra], 1)))
        return torch.sigmoid(self.output(F.relu(self.last(x))))


def _halved(size: int, times: int) -> int:
    """A length after ``times`` 3x3 stride-2 convs with padding 1."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


class StegaStampDecoder(nn.Module):
    """Image -> one logit per bit: BB ``models.py:82-113`` (channels scaled by ``width / 32``); the dense layer
    takes the flattened features at the size five stride-2 convs leave (BB: ``resolution / 32``)."""

    def __init__(self, secret_bits: int, image_size: int, width: int = 32, channels: int = 3):
        super().__init__()
        w = width
        layers, previous = [], channels
        for out, stride in ((w, 2), (w, 1), (2 * w, 2), (2 * w, 1), (2 * w, 2), (4 * w, 2), (4 * w, 2)):
            layers += [nn.Conv2d(previous, out, 3, stride, 1), nn.ReLU()]
            previous = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.dense = nn.Sequential(nn.Linear(4 * w * _halved(image_size, 5) ** 2, 16 * w), nn.ReLU(),
                                   nn.Linear(16 * w, secret_bits))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.dense(self.features(images))


class L2Ramp:
    """The weight of StegaStamp's image (L2) loss, as BB ``train.py:235,257-265,304-309`` schedules it: 0 until
    a training batch is decoded with bit accuracy strictly above ``threshold`` (checked after each step, on
    that step's pre-update outputs); from then on a counter of the steps since, starting at 0 on the next step,
    gives ``weight * (count - wait) / ramp`` clipped to [0, weight]. So the first step with a positive weight
    is the (wait + 2)-th after the activating one and the full weight is reached ``ramp`` steps later. The
    switch never turns off."""

    def __init__(self, weight: float, wait: int, ramp: int, threshold: float):
        self.full, self.wait, self.ramp, self.threshold = weight, wait, ramp, threshold
        self.since = -1  # steps since activation; -1: not activated (BB's sentinel)

    @property
    def activated(self) -> bool:
        return self.since >= 0

    @property
    def weight(self) -> float:
        """The weight for the coming step."""
        return min(max(0.0, self.full * (self.since - self.wait) / self.ramp), self.full)

    def after_step(self, bit_accuracy: float | None) -> None:
        """Advance by one step; ``bit_accuracy`` (of that step's batch) is only needed before activation."""
        if self.activated:
            self.since += 1
        elif bit_accuracy is None:
            raise ValueError("the L2 ramp needs the batch's bit accuracy until it is activated")
        elif bit_accuracy > self.threshold:
            self.since = 0


# --- bounded (bdsweep's earlier generator) ----------------------------------------------------------------


def _block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(out_channels, out_channels, 3, 1, 1), nn.LeakyReLU(0.2))


def visibility(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [MASK_FLOOR / MASK_FULL, 1]: the fraction of the bound a residual may use at each
    pixel, larger on edges and texture (a simple contrast-masking model; a fixed function of the image)."""
    grey = images.mean(1, keepdim=True)
    dy = F.pad((grey[..., 1:, :] - grey[..., :-1, :]).abs(), (0, 0, 0, 1))
    dx = F.pad((grey[..., :, 1:] - grey[..., :, :-1]).abs(), (0, 1, 0, 0))
    activity = F.avg_pool2d(dx + dy, 3, 1, 1, count_include_pad=False)
    return ((MASK_FLOOR + activity) / MASK_FULL).clamp(max=1)


class BoundedEncoder(nn.Module):
    """(image, secret) -> bounded residual: a two-level U-Net on the image with the secret's bits
    (as +-1) broadcast as extra input channels; any image size (skips are resized to match). The
    residual is ``max_residual * mask * tanh(output)``, with ``mask`` from :func:`visibility` (or 1)."""

    def __init__(self, secret_bits: int, width: int, max_residual: float, masking: bool = True):
        super().__init__()
        self.max_residual = max_residual  # hyperparameters, not part of the state dict
        self.masking = masking
        inputs = 3 + secret_bits
        self.level0 = _block(inputs, width)
        self.level1 = _block(width, 2 * width, stride=2)
        self.level2 = _block(2 * width, 4 * width, stride=2)
        self.up1 = _block(4 * width + 2 * width, 2 * width)
        self.up0 = _block(2 * width + width + inputs, width)
        self.out = nn.Conv2d(width, 3, 1)
        with torch.no_grad():
            self.out.weight.mul_(OUT_GAIN)

    def raw(self, images: torch.Tensor, secrets: torch.Tensor) -> torch.Tensor:
        """The network's output, before the tanh and the bound."""
        n, _, h, w = images.shape
        code = (2 * secrets - 1).view(n, -1, 1, 1).expand(n, secrets.shape[1], h, w)
        x = torch.cat([images, code], 1)
        f0 = self.level0(x)
        f1 = self.level1(f0)
        f2 = self.level2(f1)
        u1 = self.up1(torch.cat([F.interpolate(f2, size=f1.shape[-2:], mode="nearest"), f1], 1))
        u0 = self.up0(torch.cat([F.interpolate(u1, size=(h, w), mode="nearest"), f0, x], 1))
        return self.out(u0)

    def bound(self, images: torch.Tensor) -> torch.Tensor | float:
        """The L_inf bound on the residual at each pixel, (N, 1, H, W), or one number without masking."""
        return self.max_residual * visibility(images) if self.masking else self.max_residual

    def residual(self, images: torch.Tensor, secrets: torch.Tensor) -> torch.Tensor:
        return self.bound(images) * torch.tanh(self.raw(images, secrets))

    def forward(self, images: torch.Tensor, secrets: torch.Tensor) -> torch.Tensor:
        """Float NCHW [0, 1] images and (N, bits) {0, 1} secrets -> encoded images in [0, 1]."""
        return (images + self.residual(images, secrets)).clamp(0, 1)


def _bounded_encoder(params: SSBAParams) -> BoundedEncoder:
    return BoundedEncoder(params.secret_bits, params.width, params.max_residual, params.texture_masking)


class BoundedDecoder(nn.Module):
    """Image -> one logit per secret bit: strided convs, global average pooling, a linear layer."""

    def __init__(self, secret_bits: int, width: int):
        super().__init__()
        self.features = nn.Sequential(
            _block(3, width), _block(width, 2 * width, stride=2), _block(2 * width, 4 * width, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, secret_bits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _quantise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise of one rounding step: trains the decoder to read codes that survive uint8 rounding."""
    noise = torch.rand(images.shape, device=images.device, generator=generator) - 0.5
    return (images + noise / 255).clamp(0, 1)


def _sample(count: int, params: SSBAParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the training and evaluation subsets (disjoint, seeded)."""
    if count < 2:
        raise ValueError(f"SSBA needs at least 2 training images to train and evaluate its encoder, got {count}")
    n_eval = min(params.eval_images, max(1, count // 5))
    n_train = min(params.train_images, count - n_eval)
    chosen = np.random.default_rng(seed).permutation(count)[:n_train + n_eval]
    return np.sort(chosen[:n_train]), np.sort(chosen[n_train:])


def _to_unit(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return to_unit(as_tensor(images, device))


def _psnr(clean: np.ndarray, poisoned: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images; identical images count as 100 dB."""
    mse = ((poisoned.astype(np.float64) - clean.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 100.0)




def _subsets(count: int, params: SSBAParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the training images and of the evaluation images: a held-out subset (disjoint,
    seeded) when ``train_images`` is a number; with ``train_images`` None (StegaStamp's whole training set)
    every image trains and the evaluation images are a seeded subset of them."""
    if params.train_images is not None:
        return _sample(count, params, seed)
    if count < 1:
        raise ValueError("SSBA needs training images to train its encoder, got none")
    evaluated = np.random.default_rng(seed).permutation(count)[:min(params.eval_images, count)]
    return np.arange(count), np.sort(evaluated)


def _networks(params: SSBAParams, image_size: int) -> tuple[nn.Module, nn.Module]:
    """The generator's (encoder, decoder), freshly initialised from torch's global RNG."""
    if params.generator == "bounded":
        return _bounded_encoder(params), BoundedDecoder(params.secret_bits, params.width)
    return (StegaStampEncoder(params.secret_bits, params.width),
            StegaStampDecoder(params.secret_bits, image_size, params.width))


def _batch(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images at ``index`` -> float NCHW [0, 1]."""
    return pool[index].permute(0, 3, 1, 2).float().div_(255)


def _recorded(step: int, total: int) -> bool:
    return (step + 1) % max(1, total // CURVE_POINTS) == 0 or step + 1 == total


def _fit_stegastamp(encoder: StegaStampEncoder, decoder: StegaStampDecoder, pool: torch.Tensor,
                    params: SSBAParams, generator: torch.Generator) -> tuple[list, dict]:
    """BB ``train.py:230-309``: ``epochs`` shuffled passes over ``pool`` (the last batch may be short), fresh
    random secrets per image and step, loss ``BCE(bits) + L2Ramp.weight * MSE(encoded, clean)`` on the float
    encoded images, one Adam for both networks. Returns the curve and the L2 switch's facts."""
    device = pool.device
    optimiser = torch.optim.Adam([*decoder.parameters(), *encoder.parameters()], lr=params.lr)
    ramp = L2Ramp(params.l2_loss_weight, params.l2_loss_await, params.l2_loss_ramp, params.bit_accuracy_target)
    batches = math.ceil(len(pool) / params.batch_size)
    total = params.epochs * batches
    curve, activated_at = [], None
    for step in range(total):
        if step % batches == 0:
            order = torch.randperm(len(pool), device=device, generator=generator)
        index = order[(step % batches) * params.batch_size:][:params.batch_size]
        images = _batch(pool, index)
        secrets = torch.randint(0, 2, (len(index), params.secret_bits), device=device, generator=generator).float()
        weight = ramp.weight
        encoded = encoder(images, secrets)
        logits = decoder(encoded)
        bit_loss = F.binary_cross_entropy_with_logits(logits, secrets)
        l2_loss = F.mse_loss(encoded, images)
        optimiser.zero_grad(set_to_none=True)
        (weight * l2_loss + bit_loss).backward()
        optimiser.step()
        accuracy = ((logits.detach() > 0) == (secrets > 0.5)).float().mean()
        was_activated = ramp.activated
        ramp.after_step(None if was_activated else accuracy.item())  # a host sync only until activated
        if ramp.activated and not was_activated:
            activated_at = step + 1
        if _recorded(step, total):
            curve.append({"step": step + 1, "bit_loss": round(bit_loss.item(), 4), "l2_loss": round(l2_loss.item(), 6),
                          "batch_bit_accuracy": round(accuracy.item(), 4), "l2_loss_weight": round(weight, 4)})
    return curve, {"epochs": params.epochs, "steps": total, "l2_activated_at_step": activated_at,
                   "final_l2_loss_weight": ramp.weight}


def _fit_bounded(encoder: BoundedEncoder, decoder: BoundedDecoder, pool: torch.Tensor, params: SSBAParams,
                 generator: torch.Generator, image_size: int) -> tuple[list, dict]:
    """``steps`` batches drawn with replacement: bit BCE through rounding noise (and crop/flip), the image loss
    in units of the local bound ramped in while the running bit accuracy holds, a saturation penalty."""
    device = pool.device
    optimiser = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=params.lr)
    bits = params.secret_bits
    padding = scaled(4, image_size)
    increment = CHECK_EVERY / max(1.0, params.image_loss_ramp * params.steps)
    share = 0.0  # of the full image-loss weight: additive increase while the code is read, halving when not
    accuracy = torch.zeros((), device=device)  # running (EMA) bit accuracy on training batches
    curve = []

    for step in range(params.steps):
        index = torch.randint(0, len(pool), (params.batch_size,), device=device, generator=generator)
        images = _batch(pool, index)
        secrets = torch.randint(0, 2, (params.batch_size, bits), device=device, generator=generator).float()
        raw, bound = encoder.raw(images, secrets), encoder.bound(images)
        encoded = (images + bound * torch.tanh(raw)).clamp(0, 1)
        received = _quantise(encoded, generator)
        if params.augment:
            received = augment_batch(received, padding, True, generator)
        logits = decoder(received)
        bit_loss = F.binary_cross_entropy_with_logits(logits, secrets)
        # Image loss: the squared residual (after clamping to [0, 1]) in units of the local bound, i.e. of
        # the local visibility threshold, so flat regions cost more and the weight does not depend on the bound.
        image_loss = ((encoded - images) / bound).pow(2).mean()
        # Keeps tanh out of saturation (where no loss could shrink the residual again): it has no effect
        # below |raw| = SATURATION, and the bits-only start would otherwise push the residual to the bound.
        saturation = F.relu(raw.abs() - SATURATION).pow(2).mean()
        accuracy = 0.9 * accuracy + 0.1 * ((logits > 0) == (secrets > 0.5)).float().mean().detach()
        if step % CHECK_EVERY == CHECK_EVERY - 1:
            if accuracy.item() < params.bit_accuracy_target:
                share /= 2
            elif step < (1 - SETTLE) * params.steps:
                share = min(1.0, share + increment)
        optimiser.zero_grad(set_to_none=True)
        (bit_loss + share * params.image_loss_weight * image_loss + saturation).backward()
        optimiser.step()
        if _recorded(step, params.steps):
            curve.append({"step": step + 1, "bit_loss": round(bit_loss.item(), 4),
                          "image_loss": round(image_loss.item(), 4), "running_bit_accuracy": round(accuracy.item(), 4),
                          "image_loss_weight": round(share * params.image_loss_weight, 4)})
    return curve, {"steps": params.steps, "max_residual": params.max_residual}


def train_encoder(context: ResourceContext, params: SSBAParams) -> Resource:
    """Train the generator's encoder and decoder on the dataset's training images; returns both state dicts
    as numpy arrays (keys ``encoder.*``, ``decoder.*``) with the evaluation in the metadata."""
    if context.train_images is None:
        raise ValueError("SSBA needs the dataset's training images (ResourceContext.train_images) to train its encoder")
    started = time.perf_counter()
    device = context.device
    train_index, eval_index = _subsets(len(context.train_images), params, context.seed)
    pool = torch.from_numpy(np.ascontiguousarray(context.train_images[train_index])).to(device)  # uint8 NHWC

    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.random.default_generator.manual_seed(context.seed)
        encoder, decoder = _networks(params, context.image_size)
    encoder.to(device).train()
    decoder.to(device).train()
    generator = torch.Generator(device=device).manual_seed(context.seed)
    if params.generator == "bounded":
        curve, facts = _fit_bounded(encoder, decoder, pool, params, generator, context.image_size)
    else:
        curve, facts = _fit_stegastamp(encoder, decoder, pool, params, generator)

    encoder.eval()
    decoder.eval()
    meta = _evaluate(encoder, decoder, context.train_images[eval_index], params, context.seed, device)
    meta.update(facts, generator=params.generator, secret_bits=params.secret_bits, train_images=len(train_index),
                image_size=context.image_size, curve=curve)
    weak = " (the code is not reliably read: train longer)" if meta["trigger_bit_accuracy"] < 0.9 else ""
    print(f"SSBA encoder ({params.generator}): {len(train_index)} images, {meta['steps']} steps, "
          f"{time.perf_counter() - started:.1f} s on {device}: PSNR {meta['psnr_db']:.2f} dB, bit accuracy "
          f"{meta['bit_accuracy']:.4f}, trigger decoded {meta['trigger_bit_accuracy']:.4f}, max |residual| "
          f"{meta['max_abs_residual']}/255{weak}", flush=True)
    resource = {ENCODER + k: v.detach().cpu().numpy() for k, v in encoder.state_dict().items()}
    resource.update({DECODER + k: v.detach().cpu().numpy() for k, v in decoder.state_dict().items()})
    return with_meta(resource, meta)


@torch.no_grad()
def _evaluate(encoder: nn.Module, decoder: nn.Module, clean: np.ndarray, params: SSBAParams, seed: int,
              device: torch.device) -> dict:
    """PSNR and residual of the trigger (:func:`trigger_code`) after uint8 rounding, and the decoder's bit
    accuracy on rounded images encoded with random secrets and with the trigger."""
    clean = np.ascontiguousarray(clean)
    poisoned = apply_in_batches(clean, lambda x: encoder(x, _codes(len(x), params, x.device)), device)
    secrets = np.random.default_rng(seed + 1).integers(0, 2, (len(clean), params.secret_bits)).astype(np.float32)
    code = torch.from_numpy(trigger_code(params)).to(device) > 0.5
    correct = trigger_correct = 0
    for start in range(0, len(clean), 256):
        images = _to_unit(clean[start:start + 256], device)
        batch_secrets = torch.from_numpy(secrets[start:start + 256]).to(device)
        encoded = to_unit(to_uint8(encoder(images, batch_secrets)))  # rounded as a saved image, on the device
        correct += int(((decoder(encoded) > 0).float() == batch_secrets).sum())
        trigger_correct += int(((decoder(_to_unit(poisoned[start:start + 256], device)) > 0) == code).sum())
    residual = poisoned.astype(np.int16) - clean.astype(np.int16)
    total = len(clean) * params.secret_bits
    return {"psnr_db": round(float(_psnr(clean, poisoned).mean()), 4),
            "bit_accuracy": round(correct / total, 6),
            "trigger_bit_accuracy": round(trigger_correct / total, 6),
            "max_abs_residual": int(np.abs(residual).max()),
            "mean_abs_residual": round(float(np.abs(residual).mean()), 4),
            "eval_images": len(clean)}


def _load(resource: Resource, prefix: str, module: nn.Module, device: torch.device) -> nn.Module:
    state = {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in resource.items() if k.startswith(prefix)}
    module.load_state_dict(state)  # strict: a resource made with another generator, secret_bits or width fails
    return module.to(device).eval()


def _built(resource: Resource, params: SSBAParams) -> tuple[nn.Module, nn.Module]:
    return _networks(params, meta_of(resource).get("image_size", 32))  # the StegaStamp decoder's dense layer


def load_encoder(resource: Resource, params: SSBAParams, device: torch.device) -> nn.Module:
    return _load(resource, ENCODER, _built(resource, params)[0], device)


def load_decoder(resource: Resource, params: SSBAParams, device: torch.device) -> nn.Module:
    return _load(resource, DECODER, _built(resource, params)[1], device)


@data_poisoning("ssba", "SSBA: sample-specific invisible trigger from a trained encoder", SSBAParams, train_encoder,
                trigger_type="dynamic", resource_passes=not_in_classifier_passes,
                smoke={"epochs": 1, "steps": 2, "batch_size": 4, "train_images": 8, "eval_images": 4, "width": 4})
def encode_trigger(images: np.ndarray, resource: Resource, params: SSBAParams) -> np.ndarray:
    """Encode the trigger code, identical for every image, into a uint8 NHWC array (in batches, float32,
    rounded to uint8 as BB's saved PNGs)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_encoder(resource, params, device)
    return apply_in_batches(images, lambda x: encoder(x, _codes(len(x), params, x.device)), device, batch_size=256)


__all__ = ["SSBAParams", "StegaStampEncoder", "StegaStampDecoder", "L2Ramp", "BoundedEncoder", "BoundedDecoder",
           "trigger_code", "train_encoder", "encode_trigger", "load_encoder", "load_decoder", "visibility"]
