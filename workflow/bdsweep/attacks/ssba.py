"""SSBA (Li et al., ICCV 2021): a sample-specific invisible additive trigger made by a steganography encoder.

No pre-generated poisons exist, so the resource stage trains a small StegaStamp-style (Tancik et al., 2020)
U-Net encoder and conv decoder per dataset on random ``secret_bits``-bit secrets (1 bit, as the reference
"b1" data): bit BCE plus an image loss ramped in once the decoder reads the code, the residual bounded by
``max_residual * tanh``, less on flat regions (texture masking). Poisoning stamps the all-ones code, so each
image gets its own content-dependent, near-invisible residual.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine import as_tensor, augment_batch, to_uint8, to_unit
from . import Resource, ResourceContext, apply_in_batches, data_poisoning, scaled, with_meta

ENCODER, DECODER = "encoder.", "decoder."
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
    secret_bits: int = 1  # length of the code; poisoning stamps all ones
    max_residual: float = 0.05  # L_inf bound on the residual, in [0, 1] pixel units (0.05 = 12.75 of 255)
    steps: int = 3000  # encoder/decoder training steps (Adam)
    batch_size: int = 64
    lr: float = 1e-3
    image_loss_weight: float = 1.0  # full weight of the image loss (MSE of the residual in units of the local bound):
    # higher is fainter (a higher PSNR), lower is a stronger trigger, easier for the victim to learn
    image_loss_ramp: float = 0.3  # fraction of the steps over which the image-loss weight rises linearly from 0 to
    # full, while the decoder reads the code (bits alone first, as in StegaStamp) ...
    bit_accuracy_target: float = 0.9  # ... i.e. while the running bit accuracy on training batches is at least
    # this; below it the weight halves: imperceptibility is bought only as far as the code stays readable
    texture_masking: bool = True  # scale the bound by local visibility: the residual hides in edges and texture
    augment: bool = True  # the decoder reads encoded images through random crops (4 px padding at 32 px) and flips,
    # the victim's training augmentation, so the code survives it
    width: int = 32  # channels of the first encoder/decoder stage (doubled at each of two downsamplings)
    train_images: int = 5000  # training images the encoder is trained on (a seeded random subset)
    eval_images: int = 500  # other training images for the reported PSNR and bit accuracy

    def __post_init__(self):
        positive_ints = ("secret_bits", "steps", "batch_size", "width", "train_images", "eval_images")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.max_residual <= 1:
            raise ValueError(f"max_residual must be in (0, 1], got {self.max_residual}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.image_loss_weight >= 0:
            raise ValueError(f"image_loss_weight must be non-negative, got {self.image_loss_weight}")
        if not 0 <= self.image_loss_ramp <= 1:
            raise ValueError(f"image_loss_ramp must be in [0, 1], got {self.image_loss_ramp}")
        if not 0.5 <= self.bit_accuracy_target < 1:
            raise ValueError(f"bit_accuracy_target must be in [0.5, 1), got {self.bit_accuracy_target}")


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


class Encoder(nn.Module):
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


def _encoder(params: SSBAParams) -> Encoder:
    return Encoder(params.secret_bits, params.width, params.max_residual, params.texture_masking)


class Decoder(nn.Module):
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


def train_encoder(context: ResourceContext, params: SSBAParams) -> Resource:
    """Train the encoder and decoder on the dataset's training images; returns both state dicts as
    numpy arrays (keys ``encoder.*``, ``decoder.*``) with the evaluation in the metadata."""
    if context.train_images is None:
        raise ValueError("SSBA needs the dataset's training images (ResourceContext.train_images) to train its encoder")
    started = time.perf_counter()
    device = context.device
    train_index, eval_index = _sample(len(context.train_images), params, context.seed)
    pool = torch.from_numpy(np.ascontiguousarray(context.train_images[train_index])).to(device)  # uint8 NHWC

    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.random.default_generator.manual_seed(context.seed)
        encoder = _encoder(params)
        decoder = Decoder(params.secret_bits, params.width)
    encoder.to(device).train()
    decoder.to(device).train()
    generator = torch.Generator(device=device).manual_seed(context.seed)
    optimiser = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=params.lr)
    bits = params.secret_bits
    padding = scaled(4, context.image_size)
    increment = CHECK_EVERY / max(1.0, params.image_loss_ramp * params.steps)
    share = 0.0  # of the full image-loss weight: additive increase while the code is read, halving when not
    accuracy = torch.zeros((), device=device)  # running (EMA) bit accuracy on training batches
    curve = []

    for step in range(params.steps):
        index = torch.randint(0, len(pool), (params.batch_size,), device=device, generator=generator)
        images = pool[index].permute(0, 3, 1, 2).float().div_(255)
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
        if (step + 1) % max(1, params.steps // 10) == 0 or step + 1 == params.steps:
            curve.append({"step": step + 1, "bit_loss": round(bit_loss.item(), 4),
                          "image_loss": round(image_loss.item(), 4), "running_bit_accuracy": round(accuracy.item(), 4),
                          "image_loss_weight": round(share * params.image_loss_weight, 4)})

    encoder.eval()
    decoder.eval()
    meta = _evaluate(encoder, decoder, context.train_images[eval_index], params, context.seed, device)
    meta.update(secret_bits=bits, steps=params.steps, train_images=len(train_index), image_size=context.image_size,
                max_residual=params.max_residual, curve=curve)
    weak = " (the code is not reliably read: train longer)" if meta["trigger_bit_accuracy"] < 0.9 else ""
    print(f"SSBA encoder: {len(train_index)} images, {params.steps} steps, {time.perf_counter() - started:.1f} s on "
          f"{device}: PSNR {meta['psnr_db']:.2f} dB, bit accuracy {meta['bit_accuracy']:.4f}, trigger decoded "
          f"{meta['trigger_bit_accuracy']:.4f}, max |residual| {meta['max_abs_residual']}/255{weak}", flush=True)
    resource = {ENCODER + k: v.detach().cpu().numpy() for k, v in encoder.state_dict().items()}
    resource.update({DECODER + k: v.detach().cpu().numpy() for k, v in decoder.state_dict().items()})
    return with_meta(resource, meta)


@torch.no_grad()
def _evaluate(encoder: Encoder, decoder: Decoder, clean: np.ndarray, params: SSBAParams, seed: int,
              device: torch.device) -> dict:
    """Held-out PSNR and residual of the trigger (all-ones code) after uint8 rounding, and the
    decoder's bit accuracy on rounded images encoded with random secrets and with the trigger."""
    clean = np.ascontiguousarray(clean)
    poisoned = apply_in_batches(clean, lambda x: encoder(x, _ones(len(x), params, x.device)), device)
    secrets = np.random.default_rng(seed + 1).integers(0, 2, (len(clean), params.secret_bits)).astype(np.float32)
    correct = trigger_correct = 0
    for start in range(0, len(clean), 256):
        images = _to_unit(clean[start:start + 256], device)
        batch_secrets = torch.from_numpy(secrets[start:start + 256]).to(device)
        encoded = to_unit(to_uint8(encoder(images, batch_secrets)))  # rounded as a saved image, on the device
        correct += int(((decoder(encoded) > 0).float() == batch_secrets).sum())
        trigger_correct += int((decoder(_to_unit(poisoned[start:start + 256], device)) > 0).sum())
    residual = poisoned.astype(np.int16) - clean.astype(np.int16)
    total = len(clean) * params.secret_bits
    return {"psnr_db": round(float(_psnr(clean, poisoned).mean()), 4),
            "bit_accuracy": round(correct / total, 6),
            "trigger_bit_accuracy": round(trigger_correct / total, 6),
            "max_abs_residual": int(np.abs(residual).max()),
            "mean_abs_residual": round(float(np.abs(residual).mean()), 4),
            "eval_images": len(clean)}


def _ones(count: int, params: SSBAParams, device: torch.device) -> torch.Tensor:
    return torch.ones(count, params.secret_bits, device=device)


def _load(resource: Resource, prefix: str, module: nn.Module, device: torch.device) -> nn.Module:
    state = {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in resource.items() if k.startswith(prefix)}
    module.load_state_dict(state)  # strict: a resource made with other secret_bits or width fails loudly
    return module.to(device).eval()


def load_encoder(resource: Resource, params: SSBAParams, device: torch.device) -> Encoder:
    return _load(resource, ENCODER, _encoder(params), device)


def load_decoder(resource: Resource, params: SSBAParams, device: torch.device) -> Decoder:
    return _load(resource, DECODER, Decoder(params.secret_bits, params.width), device)


@data_poisoning("ssba", "SSBA: sample-specific invisible trigger from a trained encoder", SSBAParams, train_encoder,
                trigger_type="dynamic",
                smoke={"steps": 2, "batch_size": 4, "train_images": 8, "eval_images": 4, "width": 4})
def encode_trigger(images: np.ndarray, resource: Resource, params: SSBAParams) -> np.ndarray:
    """Encode the all-ones code into every image of a uint8 NHWC array (in batches, float32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_encoder(resource, params, device)
    return apply_in_batches(images, lambda x: encoder(x, _ones(len(x), params, x.device)), device, batch_size=256)


__all__ = ["SSBAParams", "Encoder", "Decoder", "train_encoder", "encode_trigger", "load_encoder", "load_decoder"]
