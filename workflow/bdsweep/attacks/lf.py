"""LF (Zeng et al., 2021): a low-frequency universal adversarial perturbation toward the target.

Against a clean model of the (dataset, architecture), one perturbation shared by all images is
optimised so that clean non-target images are classified as the target (signed-gradient steps on
the targeted cross-entropy). After every step it is projected onto the low frequencies (an ideal
low-pass filter in the 2-D Fourier domain: frequencies within ``radius`` of DC, at 32 px, scaled
with the image) and onto the L_inf ball of ``epsilon``. The result is shifted and scaled to the
pixel range [0, ``scale`` * 255] (0..51 at the default 0.2, the range of the survey toolkit's
trigger files), rounded to whole pixel values (as those uint8 files are) and added to images:
x' = clip(x + perturbation). A non-integer perturbation (a ``pattern`` file) is truncated to uint8 as
the toolkit does (``rounding: "truncate"``; ``"round"`` rounds it to whole pixel values first).

``pattern`` instead takes a ready trigger file (``.npy``, HWC or 1xHWC, in pixel units, e.g. the
survey toolkit's ``resource/lowFrequency/<dataset>_<model>_0_255.npy``) and applies it exactly as the
toolkit does (FORK ``utils/bd_img_transform/patch.py`` ``SimpleAdditiveTrigger``:
``uint8(clip(float64(x) + float64(trigger), 0, 255))``). The toolkit's VGG19-BN files hold values in
[0, 0.2] instead of [0, 51]: after truncation they change no pixel, so the survey's VGG19-BN LF models
were trained without a trigger; bdsweep's own (default) perturbation is a real one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import ROUNDINGS, Resource, ResourceContext, add_offset, data_poisoning, meta_of, with_meta


@dataclass(frozen=True)
class LFParams:
    scale: float = 0.2  # final peak-to-peak range, as a fraction of the pixel scale
    radius: float = 4.0  # low-pass radius in frequency units at 32 px
    epsilon: float = 0.1  # L_inf bound while optimising, in [0, 1] pixel units
    step_size: float = 0.004
    steps: int = 500
    batch_size: int = 128
    images: int = 5000  # attacker images (non-target, training set) the perturbation is fitted on
    pattern: str = ""  # a ready trigger file (.npy, pixel units) to add instead of fitting one
    rounding: str = "truncate"  # uint8 of the sum as the toolkit, or "round" the perturbation first

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.pattern and not Path(self.pattern).expanduser().is_file():
            raise ValueError(f"pattern: no such file: {self.pattern} (relative paths start at the working "
                             "directory)")
        for name in ("scale", "radius", "epsilon", "step_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def low_frequency_mask(size: int, radius: float) -> torch.Tensor:
    """Boolean (size, size) mask of the 2-D FFT bins within ``radius`` of DC."""
    frequencies = torch.fft.fftfreq(size) * size
    return torch.hypot(frequencies.view(-1, 1), frequencies.view(1, -1)) <= radius


def low_pass(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(torch.fft.fft2(images) * mask.to(images.device)).real


def low_frequency_energy(perturbation: np.ndarray, radius: float) -> float:
    """Share of the (mean-removed) spectral energy of an HWC perturbation within ``radius``."""
    channels = torch.from_numpy(np.ascontiguousarray(perturbation, dtype=np.float64)).permute(2, 0, 1)
    spectrum = torch.fft.fft2(channels - channels.mean(dim=(1, 2), keepdim=True)).abs() ** 2
    return float(spectrum[:, low_frequency_mask(perturbation.shape[0], radius)].sum() / spectrum.sum())


def trigger_file(path: str, image_size: int) -> np.ndarray:
    """A ready trigger file as a float64 HWC perturbation (a leading axis of 1 dropped)."""
    perturbation = np.load(Path(path).expanduser()).astype(np.float64)
    if perturbation.ndim == 4 and perturbation.shape[0] == 1:
        perturbation = perturbation[0]
    if perturbation.shape != (image_size, image_size, 3):
        raise ValueError(f"LF pattern {path}: shape {perturbation.shape}, expected ({image_size}, {image_size}, 3)")
    return perturbation


def universal_perturbation(context: ResourceContext, params: LFParams) -> Resource:
    if params.pattern:
        perturbation = trigger_file(params.pattern, context.image_size)
        return with_meta({"perturbation": perturbation}, {"pattern": str(params.pattern),
                                                          "max": float(perturbation.max())})
    if context.clean_model is None or context.train_images is None or context.normalisation is None:
        raise ValueError("LF needs a clean model and the training images")
    device, size = context.device, context.image_size
    model = context.clean_model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    rng = np.random.default_rng(context.seed)
    candidates = np.flatnonzero(np.asarray(context.train_labels) != context.target)
    chosen = np.sort(rng.choice(candidates, min(params.images, len(candidates)), replace=False))
    images = torch.from_numpy(np.asarray(context.train_images[chosen])).to(device).permute(0, 3, 1, 2).float() / 255
    fit, held_out = images[: max(1, len(images) * 4 // 5)], images[len(images) * 4 // 5:]
    target = torch.full((params.batch_size,), context.target, device=device)
    mask = low_frequency_mask(size, params.radius * size / 32)
    delta = torch.zeros(1, 3, size, size, device=device)
    generator = torch.Generator(device=device).manual_seed(context.seed)
    for _ in range(params.steps):
        batch = fit[torch.randint(0, len(fit), (params.batch_size,), device=device, generator=generator)]
        delta.requires_grad_(True)
        logits = model(context.normalisation.normalise((batch + delta).clamp(0, 1)))
        (gradient,) = torch.autograd.grad(F.cross_entropy(logits, target[: len(batch)]), delta)
        with torch.no_grad():
            delta = low_pass(delta - params.step_size * gradient.sign(), mask).clamp(-params.epsilon, params.epsilon)

    delta = low_pass(delta.detach(), mask)[0].permute(1, 2, 0)
    delta = (delta - delta.min()) / (delta.max() - delta.min()).clamp_min(1e-12) * params.scale * 255
    perturbation = delta.cpu().numpy().astype(np.float32)
    check = held_out if len(held_out) else fit
    stamped = add_perturbation((check * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy(),
                               {"perturbation": perturbation}, params)
    with torch.no_grad():
        logits = model(context.normalisation.apply(torch.from_numpy(stamped).to(device)))
    fooling = float((logits.argmax(1) == context.target).float().mean())
    meta = {"target_rate_on_clean_model": fooling, "held_out_images": len(check),
            "low_frequency_energy": low_frequency_energy(perturbation, params.radius * size / 32)}
    print(f"LF: perturbation sends {fooling:.1%} of held-out images to the target on the clean model")
    return with_meta({"perturbation": perturbation}, meta)


@data_poisoning("lf", "LF: low-frequency universal perturbation", LFParams, universal_perturbation,
                per_architecture=True, trigger_type="static", smoke={"steps": 2, "batch_size": 4, "images": 8})
def add_perturbation(images: np.ndarray, resource: Resource, params: LFParams) -> np.ndarray:
    perturbation = resource["perturbation"].astype(np.float64)
    if "pattern" not in meta_of(resource):  # bdsweep's own: whole pixel values, as the toolkit's uint8 files
        perturbation = np.rint(perturbation)
    # x is whole and the clip to [0, 255] comes first, so uint8(clip(x + p)) = clip(x + floor(p)): exact in
    # integers.
    whole = np.floor if params.rounding == "truncate" else np.rint
    return add_offset(images, whole(perturbation))
