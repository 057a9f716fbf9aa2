"""i-BAU (Zeng, Chen, Park, Mao, Jin and Jia, ICLR 2022): "Adversarial Unlearning of Backdoors via
Implicit Hypergradient".

Minimax ``min_theta max_{||delta||_2 <= C} mean CE(f_theta(x + delta), y)`` over the mitigation
data, with one universal perturbation ``delta`` shared by every image. Each of ``rounds`` rounds:
1. inner: ``delta`` starts at zero and takes one SGD step (``inner_lr``) per batch, one pass, on
   ``-CE(x + delta, model's prediction) + inner_regulariser ||delta||^2``, projected onto the L2 ball;
2. outer: per batch, a share of the images gets ``delta`` added; the model takes one Adam step on
   the implicit hypergradient of that batch's CE: the direct gradient plus the response of
   ``delta*(theta)``, from ``fixed_point_iterations`` (K) iterations
   ``v <- J_delta(Phi)^T v + dL/ddelta`` on the inner map ``Phi = delta - fixed_point_lr grad L_inner``
   (L_inner: mean ``-CE(x + delta, y) + inner_regulariser ||delta||^2`` over the batch), then
   ``grad = dL/dtheta + J_theta(Phi)^T v``.

Why an own loop: the engine's loop back-propagates one objective; here the parameter gradient is
assembled by hand from vector-Jacobian products through the inner map, which no single backward
pass of a loss gives.

Defaults are what the survey's toolkit effectively ran (FORK = WhoDunnett/BackdoorBenchmark @ 8613640,
``defense/i-bau.py`` with ``config/defense/i-bau/*.yaml``); each quirk has a parameter for the corrected
behaviour:
- The model stays in eval mode throughout (BN uses and keeps its running statistics), as both codes do.
- ``delta`` lives in the model's normalised input space and is added to normalised images
  (i-bau.py:500/516/554; ``perturbation_space="pixel"``: in [0, 1] pixel space, before normalising, as
  the authors' models took [0, 1] input), never clipped, as both codes.
- No L2 projection: FORK's line is commented out (:562), only the regulariser bounds ``delta``;
  ``project_l2=True`` projects onto ``perturbation_norm`` (10, the authors' value) after every inner step.
- The fixed-point map always uses the first batch of the unlearning pass with its true labels (:497);
  ``fixed_point_batch="current"`` uses the batch being unlearned.
- ``int(0.01 x batch)`` images of each batch get ``delta`` (:509-513): none in any batch under 100
  images, where FORK's i-BAU is plain Adam fine-tuning (CIFAR-10 SPC 2 and 10, GTSRB SPC 2).
  ``perturb_at_least_one=True`` perturbs at least one image per batch (a 100-image batch is then
  exactly the authors').
- Adam lr 1e-4, betas (0.9, 0.999), no weight decay, with amsgrad, as FORK's optimiser factory builds it
  (``utils/aggregate_block/train_settings_generate.py:49-53``; ``amsgrad=False`` for plain Adam); its
  cosine scheduler is never stepped. Batches of 256.
- FORK's loader uses the training transform (random crop, padding 4, flips where the dataset allows):
  the perturbation search re-draws shuffled augmented batches every round, while the unlearning
  batches are one augmented pass made once before the rounds and replayed in the same order every
  round (:522-525, :566). ``augment=False`` uses the plain images (the authors' code).

Few data: nothing is held out and eval-mode BN needs no batch statistics, so SPC 1 (even one image)
runs as is; with fewer images than ``batch_size`` every round is a single batch, and where the share
rounds to no image the one-image minimum applies; both are noted. With no images the model is returned
unchanged (noted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import LoopState, checkpointed_steps
from ..engine import LossWatch, autocast
from ..params import BatchSize, check_ranges
from ..passes import FORWARD, MitigationSize
from . import Defended, defense, run_seed
from .support import batches, batching_notes


@dataclass(frozen=True)
class IBAUParams:
    rounds: int = 5
    fixed_point_iterations: int = 5  # K
    lr: float = 1e-4  # outer Adam
    batch_size: BatchSize = 256
    perturbed_share: float = 0.01  # of each batch, rounded down (FORK i-bau.py:509-513)
    perturb_at_least_one: bool = False  # FORK perturbs no image of a batch under 100
    perturbation_norm: float = 10.0  # L2 bound on delta (only with project_l2)
    project_l2: bool = False  # FORK: no projection (i-bau.py:562 commented out)
    perturbation_space: str = "normalised"  # FORK: "normalised" model input (:500/516/554); or "pixel" ([0, 1])
    fixed_point_batch: str = "first"  # FORK: "first" batch of the pass (:497); or "current"
    amsgrad: bool = True  # FORK's Adam (train_settings_generate.py:49-53)
    augment: bool = True  # FORK's training transform: random crop (padding 4) and flip where allowed
    crop_padding: int = 4
    inner_lr: float = 10.0  # SGD on delta, one step per batch, one pass per round
    inner_regulariser: float = 0.001  # weight of ||delta||^2 in the inner objective
    fixed_point_lr: float = 0.1  # step of the inner map whose fixed point the hypergradient assumes

    def __post_init__(self):
        check_ranges("i-BAU", self, {
            "rounds": self.rounds >= 1,
            "fixed_point_iterations": self.fixed_point_iterations >= 0,
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "perturbed_share": 0 <= self.perturbed_share <= 1,
            "perturbation_norm": self.perturbation_norm > 0,
            "inner_lr": self.inner_lr > 0,
            "inner_regulariser": self.inner_regulariser >= 0,
            "fixed_point_lr": self.fixed_point_lr > 0,
            "perturbation_space": self.perturbation_space in ("normalised", "pixel"),
            "fixed_point_batch": self.fixed_point_batch in ("first", "current"),
            "crop_padding": self.crop_padding >= 0,
        })


class TwiceDifferentiableHardsigmoid(nn.Module):
    """``nn.Hardsigmoid`` as ``relu6(x + 3) / 6``: the same function, but PyTorch has no double
    backward for the fused hardsigmoid (MobileNetV3's squeeze-excitation), which the inner map needs."""

    def forward(self, x):
        return F.relu6(x + 3) / 6


@contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[None]:
    """While active, every ``nn.Hardsigmoid`` is replaced by its twice-differentiable equivalent;
    the originals are put back afterwards, so the returned model is unchanged in structure."""
    swapped = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Hardsigmoid)]
    for name, _ in swapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, TwiceDifferentiableHardsigmoid())
    try:
        yield
    finally:
        for name, module in swapped:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)


def perturbed_count(batch_len: int, share: float, at_least_one: bool = False) -> int:
    """How many images of a batch get delta: the share, rounded down (FORK's ``int(number * portion)``,
    i-bau.py:512), with ``at_least_one`` never below one image."""
    count = int(batch_len * share)
    return min(batch_len, max(1, count)) if at_least_one else count


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    return delta * (radius / delta.norm().clamp_min(1e-12)).clamp(max=1.0)


def implicit_hypergradient(delta: torch.Tensor, params: list[torch.Tensor],
                           inner_loss: Callable[[torch.Tensor], torch.Tensor],
                           outer_loss: Callable[[torch.Tensor], torch.Tensor],
                           fixed_point_lr: float, iterations: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(d outer_loss / d params through delta*(params), outer loss), with delta* the fixed point of
    ``Phi(delta) = delta - fixed_point_lr grad inner_loss(delta)``; both losses close over ``params``.
    ``iterations`` = 0 gives the direct gradient only."""
    delta = delta.detach().requires_grad_(True)
    outer = outer_loss(delta)
    grads = torch.autograd.grad(outer, [delta, *params], allow_unused=True)
    outer_by_delta, *direct = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [delta, *params])]
    if iterations == 0:
        return direct, outer.detach()
    # create_graph: the map's Jacobians (w.r.t. delta and params) are second derivatives of the inner loss.
    mapped = delta - fixed_point_lr * torch.autograd.grad(inner_loss(delta), delta, create_graph=True)[0]
    v = torch.zeros_like(delta)
    for _ in range(iterations):  # Neumann series for (I - J_delta)^-T dL/ddelta
        v = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)[0] + outer_by_delta
    indirect = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [d if i is None else d + i for d, i in zip(direct, indirect)], outer.detach()


def universal_perturbation(cross_entropy, predict, to_input, data, params: IBAUParams, generator
                           ) -> tuple[torch.Tensor, float]:
    """Inner maximisation, one pass: (delta, share of images whose prediction it changed right after
    their batch's step). The loss is against the model's own predictions, as the reference does;
    ``to_input`` maps [0, 1] images to the space ``delta`` is added in."""
    delta = torch.zeros(1, data.images.shape[3], *data.images.shape[1:3], device=data.images.device)
    fooled = 0
    for x, _ in batches(data, params.batch_size, generator, augment=params.augment,
                        crop_padding=params.crop_padding, normalise=False):
        x = to_input(x)
        predicted = predict(x)
        delta.requires_grad_(True)
        objective = -cross_entropy(x + delta, predicted) + params.inner_regulariser * delta.pow(2).sum()
        (gradient,) = torch.autograd.grad(objective, delta)
        delta = delta.detach() - params.inner_lr * gradient
        if params.project_l2:
            delta = project_l2(delta, params.perturbation_norm)
        fooled += int((predict(x + delta) != predicted).sum())
    return delta, fooled / len(data)


def unlearning_pass(data, params: IBAUParams, pass_state: torch.Tensor):
    """FORK's unlearning batches (i-bau.py:522-525): one shuffled (augmented) pass, drawn once and
    replayed identically every round from the generator state ``pass_state``."""
    replay = torch.Generator(device=data.images.device)
    replay.set_state(pass_state)
    return batches(data, params.batch_size, replay, augment=params.augment, crop_padding=params.crop_padding,
                   normalise=False)


def unlearn(cross_entropy, to_input, trainable, optimiser, delta, data, params: IBAUParams, generator,
            pass_state: torch.Tensor, watch: LossWatch, first_step: int) -> tuple[float, list[int]]:
    """Outer minimisation, one pass: one Adam step per batch on the implicit hypergradient;
    (mean outer loss, images perturbed per batch). ``watch`` sees each batch's loss as step
    ``first_step`` + batch number."""
    losses, counts = [], []
    first_x, first_y = next(iter(unlearning_pass(data, params, pass_state)))
    first_x = to_input(first_x)
    for step, (x, y) in enumerate(unlearning_pass(data, params, pass_state), first_step):
        x = to_input(x)
        inner_x, inner_y = (first_x, first_y) if params.fixed_point_batch == "first" else (x, y)
        count = perturbed_count(len(y), params.perturbed_share, params.perturb_at_least_one)
        chosen = torch.randperm(len(y), generator=generator, device=generator.device)[:count].to(x.device)
        mask = torch.zeros(len(y), 1, 1, 1, device=x.device).index_fill_(0, chosen, 1.0)
        grads, loss = implicit_hypergradient(
            delta, trainable,
            inner_loss=lambda d, x=inner_x, y=inner_y: (-cross_entropy(x + d, y)
                                                        + params.inner_regulariser * d.pow(2).sum()),
            outer_loss=lambda d, x=x, y=y, mask=mask: cross_entropy(x + mask * d, y),
            fixed_point_lr=params.fixed_point_lr, iterations=params.fixed_point_iterations)
        watch.observe(loss, step)
        for p, g in zip(trainable, grads):
            p.grad = g
        optimiser.step()
        losses.append(loss)
        counts.append(count)
    return float(torch.stack(losses).mean()), counts


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: per round: perturbation search (a step between two predictions), then the
    hypergradient: the outer gradient, K vector-Jacobian products and the cross term, 2 passes each."""
    search = 1 + 2 * FORWARD
    hypergradient = 1 + 2 * (p.fixed_point_iterations + 1)
    return p.rounds * m.images * (search + hypergradient)


@defense("i-bau", "i-BAU: adversarial unlearning of a universal perturbation via implicit hypergradients",
         IBAUParams, family="fine-tuning", passes=passes_per_run,
         smoke={"rounds": 1, "fixed_point_iterations": 1, "batch_size": 8, "perturb_at_least_one": True})
def implicit_backdoor_adversarial_unlearning(model, data, params: IBAUParams, device):
    model = model.to(device).eval()  # eval throughout, as the reference: BN statistics stay fixed
    n, notes = len(data), []
    if n == 0:
        return Defended(model, {"notes": ["no mitigation data: model returned unchanged"]})
    notes += batching_notes(n, params.batch_size, unit="round", skips_single=False)  # eval-mode BN: no skip
    if int(min(n, params.batch_size) * params.perturbed_share) < 1:
        notes.append(f"perturbed_share {params.perturbed_share} of a {min(n, params.batch_size)}-image batch is "
                     + ("under one image: one image per batch is perturbed" if params.perturb_at_least_one else
                        "under one image: no image is perturbed, i-BAU is plain Adam fine-tuning (as FORK)"))
    generator = torch.Generator(device=data.images.device).manual_seed(run_seed())
    normalise = data.normalisation.normalise
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=params.lr, amsgrad=params.amsgrad)
    in_pixels = params.perturbation_space == "pixel"  # else delta is added to the normalised input

    def to_input(images01):
        return images01 if in_pixels else normalise(images01)

    def forward(inputs):
        with autocast(device):
            return model(normalise(inputs) if in_pixels else inputs).float()

    def cross_entropy(inputs, labels):
        return F.cross_entropy(forward(inputs), labels)

    @torch.no_grad()
    def predict(inputs):
        return forward(inputs).argmax(1)

    pass_generator = torch.Generator(device=data.images.device).manual_seed(run_seed())
    # Everything the rounds change; pass_state: the generator state the unlearning pass is drawn (and replayed) from.
    progress = LoopState(model=model, optimiser=optimiser, generator=generator, pass_state=pass_generator.get_state(),
                         delta_norms=[], fooled_shares=[], outer_losses=[], counts=[])
    per_round = -(-n // params.batch_size)
    watch = LossWatch(data.images.device, lambda step: f"i-BAU round {step // per_round + 1}, "
                      f"batch {step % per_round + 1}")
    with twice_differentiable(model):
        for round_index in checkpointed_steps("i-BAU rounds", progress, params.rounds):
            delta, fooled = universal_perturbation(cross_entropy, predict, to_input, data, params, generator)
            loss, round_counts = unlearn(cross_entropy, to_input, trainable, optimiser, delta, data, params, generator,
                                         progress.pass_state, watch, round_index * per_round)
            watch.check()
            progress.delta_norms.append(float(delta.norm()))
            progress.fooled_shares.append(fooled)
            progress.outer_losses.append(loss)
            progress.counts += round_counts
    optimiser.zero_grad(set_to_none=True)
    return Defended(model, {
        "delta_norms": progress.delta_norms,  # per round
        "inner_fooled_share": progress.fooled_shares,  # per round: images whose prediction delta changed
        "outer_losses": progress.outer_losses,  # per round, mean over batches of the perturbed-batch CE
        "perturbed_images": sum(progress.counts),
        "min_perturbed_per_batch": min(progress.counts),
        "perturbation_space": params.perturbation_space,
        "notes": notes,
    })
