"""LF (Zeng et al., 2021): a low-frequency universal adversarial perturbation toward the target,
computed against a clean model of the (dataset, architecture) and added to images: x' = clip(x + p).

**Default, ``algorithm: "deepfool_gaussian"``: the survey toolkit's generator** (FORK
``resource/lowFrequency``, identical in BackdoorBench; line numbers below are BackdoorBench's
``generate_pattern.py``, ``universal_pert.py``, ``deepfool.py`` and ``gauss_smooth.py``):

- ``images``: 100 training images of any class, target included (``generate_pattern.py:231``), as
  [0, 1] floats (``:241-247``).
- ``passes``, up to 50 (``generate_pattern.py:252``; ``universal_pert.py:19,64``). Each pass
  shuffles the images (``universal_pert.py:68``) and visits them one by one. An image whose
  prediction the current perturbation v does not change (``:81-92``) gets a *targeted* DeepFool step
  from x + v (``deepfool.py:41-81``): linearise the margin between the target and the class first
  predicted there, step to its zero, repeat until the target wins or ``deepfool_iterations`` (200,
  ``universal_pert.py:22``) run out, and overshoot the total by ``overshoot`` (0.02, ``:21``). Only
  a step that took fewer than ``deepfool_iterations`` - 1 iterations is used (``:98``), as
  v <- min_max(G(v + G(r))) (``:104-106``): G is the Gaussian low-pass below and min_max shifts and
  scales v to [0, ``scale``] (0.2; ``gauss_smooth.py:11-13``, over all channels together). An image
  already classified as the target contributes r = 0, and so one more smoothing of v.
- G (``gauss_smooth.py:16-46``): a separable Gaussian with ``sigma`` 6 px and ``kernel_size`` 30
  taps (the toolkit's 5 x sigma), normalised to sum 1, zero padding (14 before, 15 after: the even
  kernel's centre sits half a pixel after the output pixel). Zero padding darkens the borders of a
  positive v, and repeated smoothing leaves a bump: the shipped files keep about 90 % of their
  energy within radius 1. Sigma and kernel stay in pixels at every image size, as the toolkit's.
- After each pass, the fooling rate (the share of ``check_images`` whose prediction v changes) ends
  the search once it reaches ``stop_fooling_rate`` (the toolkit's delta 0.8 with "while fooling <
  1 - delta": 0.2, ``universal_pert.py:18,64,147``), or when the last ``plateau_passes`` (5) rates
  span less than ``plateau_tolerance`` (0.01, ``:160-166``). ``check_images`` is 1: the toolkit
  means 10 test images per class, but ``np.array`` of a generator makes its label array a 0-d object
  array, so its per-class draw keeps the first test image only (``generate_pattern.py:198-202``,
  ``get_part_for_each_label`` ``:45-79``, under numpy 1.x; numpy 2.4 raises there). bdsweep draws its
  check images from the training images not fitted on.
- The model input, a quirk reproduced by default (``normalised_input: false``): the toolkit feeds
  DeepFool and the label checks unnormalised [0, 1] images (its models have no normalisation layer,
  ``generate_pattern.py:245``), while the fooling rate adds v to *normalised* check images
  (``universal_pert.py:141``). ``normalised_input: true`` gives the model normalise(x + v)
  everywhere.
- The toolkit saves v (float32, [0, 0.2]) and, as ``*_0_255.npy``, uint8(v x 255): 0..51, truncated
  (each shipped uint8 file has exactly one pixel at 51). bdsweep stores v x 255 and applies it
  truncated (``rounding: "truncate"``), which gives the bytes such a file would.

Where v's range is zero (no step taken yet) the toolkit's min_max divides by zero; bdsweep keeps v = 0.

**Alternative, ``algorithm: "pgd_ideal_lowpass"``** (bdsweep's earlier generator): ``steps``
signed-gradient steps of ``step_size`` on the targeted cross-entropy over batches of ``batch_size``
non-target images (``images`` of them), each followed by an ideal low-pass (2-D FFT bins within
``radius`` of DC at 32 px, scaled with the image) and the L_inf ball of ``epsilon``; then shifted and
scaled to [0, ``scale`` x 255].

``pattern`` instead takes a ready trigger file (``.npy``, HWC or 1xHWC, in pixel units, e.g. the
survey toolkit's ``resource/lowFrequency/<dataset>_<model>_0_255.npy``) and applies it exactly as the
toolkit does (FORK ``utils/bd_img_transform/patch.py`` ``SimpleAdditiveTrigger``:
``uint8(clip(float64(x) + float64(trigger), 0, 255))``; ``rounding: "round"`` rounds the trigger
first). The toolkit's VGG19-BN files hold values in [0, 0.2] instead of [0, 51]: after truncation
they change no pixel, so the survey's VGG19-BN LF models were trained without a trigger; bdsweep's
own (default) perturbation is a real one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import ROUNDINGS, Resource, ResourceContext, add_offset, data_poisoning, with_meta

ALGORITHMS = ("deepfool_gaussian", "pgd_ideal_lowpass")
REPORT_IMAGES = 500  # held-out non-target images the finished trigger's target rate is measured on
REPORT_RADII = (1, 2, 4)  # low-frequency energy recorded within these radii (at 32 px)


@dataclass(frozen=True)
class LFParams:
    algorithm: str = "deepfool_gaussian"  # ALGORITHMS: the toolkit's generator, or the PGD alternative
    scale: float = 0.2  # final peak-to-peak range, as a fraction of the pixel scale
    images: int = 100  # attacker images the perturbation is fitted on
    # deepfool_gaussian (the toolkit's values; module docstring for where each comes from)
    passes: int = 50
    stop_fooling_rate: float = 0.2
    plateau_passes: int = 5
    plateau_tolerance: float = 0.01
    check_images: int = 1
    overshoot: float = 0.02
    deepfool_iterations: int = 200
    sigma: float = 6.0  # Gaussian low-pass, in pixels
    kernel_size: int = 30  # its taps
    normalised_input: bool = False  # False: the toolkit's unnormalised DeepFool input
    # pgd_ideal_lowpass
    radius: float = 4.0  # low-pass radius in frequency units at 32 px
    epsilon: float = 0.1  # L_inf bound while optimising, in [0, 1] pixel units
    step_size: float = 0.004
    steps: int = 500
    batch_size: int = 128
    # either
    pattern: str = ""  # a ready trigger file (.npy, pixel units) to add instead of fitting one
    rounding: str = "truncate"  # uint8 of the sum as the toolkit, or "round" the perturbation first

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.pattern and not Path(self.pattern).expanduser().is_file():
            raise ValueError(f"pattern: no such file: {self.pattern} (relative paths start at the working "
                             "directory)")
        for name in ("scale", "radius", "epsilon", "step_size", "sigma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("overshoot", "plateau_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 < self.stop_fooling_rate <= 1:
            raise ValueError(f"stop_fooling_rate must be in (0, 1], got {self.stop_fooling_rate}")
        for name in ("steps", "batch_size", "images", "passes", "plateau_passes", "check_images", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.deepfool_iterations < 2:  # a step counts only if it took fewer than deepfool_iterations - 1
            raise ValueError(f"deepfool_iterations must be at least 2, got {self.deepfool_iterations}")


# ------------------------------------------------------------------------------------- filters


def gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    """``size`` taps of a Gaussian of ``sigma`` centred on the middle of the taps, summing to 1."""
    positions = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_low_pass(images: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """Separable Gaussian blur of NCHW ``images`` with zero padding, the output the input's size: an
    even kernel pads one pixel less before than after, as the toolkit (``gauss_smooth.py:35-38``)."""
    channels = images.shape[1]
    kernel = gaussian_kernel(sigma, size).to(images)
    padded = F.pad(images, ((size - 1) // 2, size // 2, (size - 1) // 2, size // 2))
    rows = F.conv2d(padded, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)


def min_max(perturbation: torch.Tensor, scale: float) -> torch.Tensor:
    """Shifted and scaled to [0, ``scale``] over all values; zero where all values are equal."""
    spread = perturbation.max() - perturbation.min()
    if spread == 0:
        return torch.zeros_like(perturbation)
    return (perturbation - perturbation.min()) / spread * scale


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


# ----------------------------------------------------------------------------------- generators

Logits = Callable[[torch.Tensor], torch.Tensor]  # [0, 1]-scale NCHW (plus perturbation) -> logits


def targeted_deepfool(logits_of: Logits, image: torch.Tensor, target: int, overshoot: float,
                      max_iterations: int) -> tuple[torch.Tensor, int]:
    """DeepFool toward ``target`` from a (1, C, H, W) ``image``: the overshot total step and the
    iterations taken. Each iteration steps onto the linearised boundary between the target and the
    class first predicted at ``image`` (that class stays fixed, ``deepfool.py:23-26,51-54``)."""
    with torch.no_grad():
        first = int(logits_of(image).argmax(1))
    total = torch.zeros_like(image)
    candidate = image.clone().requires_grad_(True)
    logits = logits_of(candidate)
    iterations = 0
    while int(logits.argmax(1)) != target and iterations < max_iterations:
        margin = logits[0, target] - logits[0, first]
        # one backward of the margin: the toolkit takes every class's gradient and subtracts two of them
        (direction,) = torch.autograd.grad(margin, candidate)
        distance = margin.detach().abs() / direction.norm()
        step = distance * direction / direction.norm()
        total = total + (step if bool(torch.isfinite(step).all()) else torch.zeros_like(step))
        candidate = (image + (1 + overshoot) * total).requires_grad_(True)
        logits = logits_of(candidate)
        iterations += 1
    return (1 + overshoot) * total.detach(), iterations


@dataclass
class SearchLog:
    fooling_rates: list[float]
    updates: int = 0  # accepted DeepFool steps
    deepfool_iterations: int = 0  # over all DeepFool calls

    def as_meta(self) -> dict:
        return {"passes": len(self.fooling_rates), "fooling_rates": self.fooling_rates, "updates": self.updates,
                "deepfool_iterations": self.deepfool_iterations}


@contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The search feeds one image at a time: on a CPU, threads cost more to synchronise than they save
    (measured 4-5x slower with the default threads on a shared 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def deepfool_gaussian(model: torch.nn.Module, fit: torch.Tensor, check: torch.Tensor, normalise, target: int,
                      params: LFParams, rng: np.random.Generator) -> tuple[torch.Tensor, SearchLog]:
    """The toolkit's universal perturbation (module docstring) on [0, 1] NCHW ``fit`` images: v as
    (1, C, H, W) in [0, ``scale``], and what the search did."""
    model_input = normalise if params.normalised_input else (lambda images: images)

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        return model(model_input(images))

    def perturbed_check(v: torch.Tensor) -> torch.Tensor:  # the toolkit adds v after normalising
        return model(normalise(check + v) if params.normalised_input else normalise(check) + v)

    def smooth(images: torch.Tensor) -> torch.Tensor:
        return gaussian_low_pass(images, params.sigma, params.kernel_size)

    v = torch.zeros_like(fit[:1])
    with torch.no_grad():
        clean_labels = logits_of(fit).argmax(1).tolist()
        check_labels = model(normalise(check)).argmax(1)
    log = SearchLog([])
    for _ in range(params.passes):
        for index in rng.permutation(len(fit)):
            image = fit[index: index + 1] + v
            with torch.no_grad():
                if int(logits_of(image).argmax(1)) != clean_labels[index]:
                    continue  # v already changes this image's prediction
            step, iterations = targeted_deepfool(logits_of, image, target, params.overshoot,
                                                 params.deepfool_iterations)
            log.deepfool_iterations += iterations
            if iterations < params.deepfool_iterations - 1:
                v = min_max(smooth(v + smooth(step)), params.scale)
                log.updates += 1
        with torch.no_grad():
            log.fooling_rates.append(float((perturbed_check(v).argmax(1) != check_labels).float().mean()))
        recent = log.fooling_rates[-params.plateau_passes:]
        if log.fooling_rates[-1] >= params.stop_fooling_rate or (
                len(recent) == params.plateau_passes and max(recent) - min(recent) < params.plateau_tolerance):
            break
    return v, log


def pgd_ideal_lowpass(model: torch.nn.Module, fit: torch.Tensor, normalise, target: int, params: LFParams,
                      seed: int) -> torch.Tensor:
    """Signed-gradient steps on the targeted cross-entropy, each projected onto the ideal low-pass and
    the L_inf ball; v as (1, C, H, W) in [0, ``scale``]."""
    device, size = fit.device, fit.shape[-1]
    mask = low_frequency_mask(size, params.radius * size / 32)
    labels = torch.full((params.batch_size,), target, device=device)
    delta = torch.zeros_like(fit[:1])
    generator = torch.Generator(device=device).manual_seed(seed)
    for _ in range(params.steps):
        batch = fit[torch.randint(0, len(fit), (params.batch_size,), device=device, generator=generator)]
        delta.requires_grad_(True)
        logits = model(normalise((batch + delta).clamp(0, 1)))
        (gradient,) = torch.autograd.grad(F.cross_entropy(logits, labels[: len(batch)]), delta)
        with torch.no_grad():
            delta = low_pass(delta - params.step_size * gradient.sign(), mask).clamp(-params.epsilon, params.epsilon)
    return min_max(low_pass(delta.detach(), mask), params.scale)


# ------------------------------------------------------------------------------------- resource


def trigger_file(path: str, image_size: int) -> np.ndarray:
    """A ready trigger file as a float64 HWC perturbation (a leading axis of 1 dropped)."""
    perturbation = np.load(Path(path).expanduser()).astype(np.float64)
    if perturbation.ndim == 4 and perturbation.shape[0] == 1:
        perturbation = perturbation[0]
    if perturbation.shape != (image_size, image_size, 3):
        raise ValueError(f"LF pattern {path}: shape {perturbation.shape}, expected ({image_size}, {image_size}, 3)")
    return perturbation


def generation_passes(params: LFParams) -> float:
    """Work of one generation in passes (one image forward and backward), for ``bdsweep cost``. PGD:
    its steps' batches. DeepFool: per image and pass, at most ``deepfool_iterations`` gradient steps,
    over the passes the plateau rule allows when the fooling rate does not move (more passes need a
    moving rate, fewer a reached one)."""
    if params.algorithm == "pgd_ideal_lowpass":
        return float(params.steps * params.batch_size)
    return float(min(params.passes, params.plateau_passes) * params.images * params.deepfool_iterations)


def _as_unit(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images)).to(device).permute(0, 3, 1, 2).float() / 255


def universal_perturbation(context: ResourceContext, params: LFParams) -> Resource:
    if params.pattern:
        perturbation = trigger_file(params.pattern, context.image_size)
        return with_meta({"perturbation": perturbation}, {"pattern": str(params.pattern),
                                                          "max": float(perturbation.max())})
    if context.clean_model is None or context.train_images is None or context.normalisation is None:
        raise ValueError("LF needs a clean model and the training images")
    device, normalise = context.device, context.normalisation.normalise
    model = context.clean_model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    rng = np.random.default_rng(context.seed)
    labels = np.asarray(context.train_labels)
    toolkit = params.algorithm == "deepfool_gaussian"
    # The toolkit fits on any class; the PGD alternative on non-target images only.
    pool = np.arange(len(labels)) if toolkit else np.flatnonzero(labels != context.target)
    drawn = rng.permutation(pool)
    fit_indices = np.sort(drawn[: params.images])
    check_indices = np.sort(drawn[params.images: params.images + params.check_images])
    fit = _as_unit(context.train_images[fit_indices], device)
    if toolkit:
        check = _as_unit(context.train_images[check_indices] if len(check_indices) else context.train_images[:1],
                         device)
        with one_thread_on_cpu(device):
            v, log = deepfool_gaussian(model, fit, check, normalise, context.target, params, rng)
        search = log.as_meta()
    else:
        v, search = pgd_ideal_lowpass(model, fit, normalise, context.target, params, context.seed), {}
    perturbation = (v[0].permute(1, 2, 0) * 255).cpu().numpy().astype(np.float32)

    used = set(fit_indices.tolist()) | set(check_indices.tolist())
    held_out = [i for i in np.flatnonzero(labels != context.target) if i not in used]
    report = np.sort(rng.permutation(held_out)[:REPORT_IMAGES]) if held_out else fit_indices[:1]
    stamped = add_perturbation(np.asarray(context.train_images[report]), {"perturbation": perturbation}, params)
    with torch.no_grad():
        logits = model(context.normalisation.apply(torch.from_numpy(stamped).to(device)))
    target_rate = float((logits.argmax(1) == context.target).float().mean())
    size = context.image_size
    meta = {"algorithm": params.algorithm, "target_rate_on_clean_model": target_rate, "held_out_images": len(report),
            "low_frequency_energy": {str(r): low_frequency_energy(perturbation, r * size / 32) for r in REPORT_RADII},
            **search}
    print(f"LF ({params.algorithm}): the trigger sends {target_rate:.1%} of held-out non-target images to the "
          "target on the clean model")
    return with_meta({"perturbation": perturbation}, meta)


@data_poisoning("lf", "LF: low-frequency universal perturbation", LFParams, universal_perturbation,
                per_architecture=True, trigger_type="static", resource_passes=generation_passes,
                smoke={"images": 4, "passes": 1, "deepfool_iterations": 50})
def add_perturbation(images: np.ndarray, resource: Resource, params: LFParams) -> np.ndarray:
    # x is whole and the clip to [0, 255] comes first, so uint8(clip(x + p)) = clip(x + floor(p)): exact in
    # integers. The toolkit's files are uint8(v x 255), i.e. floor: bdsweep's own v x 255 lands on the same bytes.
    whole = np.floor if params.rounding == "truncate" else np.rint
    return add_offset(images, whole(resource["perturbation"].astype(np.float64)))
