"""MM-BD mitigation (Wang, Xiang, Miller & Kesidis, IEEE S&P 2024, "MM-BD: Post-Training Detection of
Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic").

Backdoor triggers drive abnormally large internal activations, hence abnormally large classification
margins. The mitigation learns a per-channel upper bound B on internal activations, clamping them
(min(a, B)), by minimising  mean (f_B(x) - f(x))^2 + lambda * sum_l ||B_l||_2  over the clean images
the model classifies correctly (Adam on B only, weights frozen): the bounds shrink as far as the
clean logits allow. Every ``lambda_every`` epochs lambda is multiplied by ``lambda_factor`` if the
bounded model's accuracy on those images is still >= 1 - ``allowed_drop``, and divided by it otherwise.

Interpretations (the authors' code bounds the stem, layer1 and layer2 outputs of a ResNet-18, each
initialised to the constant 8): we bound the outputs of the ``bounded_stages`` shallowest entries of
``model.parts.stages`` (no architecture-independent "stem" exists), and start every bound at its
channel's observed maximum on those images, so the initial bounds change nothing on them and a scale
constant is not needed; bounds are projected so they never rise above that start. The accuracy
constraint is enforced, not just steered: the returned bounds are the last end-of-epoch bounds
meeting it (the starting bounds meet it by construction). The maximum margin is not estimated by
optimising inputs: as in the authors' code, it is limited indirectly, through the bounds. Batch size
200 is the authors' code's; lr 1e-3 is the survey's (their code uses Adam 0.1 on bounds near 8).
There is no held-out split (the authors measure the constraint on the images they fit on), so SPC 1
and 2 run unchanged; with fewer images than a batch each epoch is a single step (noted), and if the
model classifies no mitigation image correctly nothing can be fitted: it is returned as is (noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine import LossWatch
from ..models import insert_after
from ..params import check_ranges
from ..resume import loop_checkpoint
from . import Defended, defense, run_seed
from .support import accuracy, layer_outputs, subset


@dataclass(frozen=True)
class MMBDParams:
    epochs: int = 50
    lr: float = 1e-3
    lam: float = 0.5  # weight of the bounds' L2 norms
    lambda_factor: float = 1.2
    lambda_every: int = 10  # epochs between lambda updates
    allowed_drop: float = 0.05  # allowed accuracy reduction on the fitting images
    batch_size: int = 200
    bounded_stages: int = 2  # how many of the shallowest stages get bounded outputs

    def __post_init__(self):
        checks = {
            "epochs": self.epochs >= 1, "lr": self.lr > 0, "lam": self.lam >= 0,
            "lambda_factor": self.lambda_factor >= 1, "lambda_every": self.lambda_every >= 1,
            "allowed_drop": 0 <= self.allowed_drop < 1, "batch_size": self.batch_size >= 1,
            "bounded_stages": self.bounded_stages >= 1,
        }
        check_ranges("MM-BD", self, checks)


class ActivationBound(nn.Module):
    """Clamps each channel (dimension 1) of its input from above at ``bound``."""

    def __init__(self, bound: torch.Tensor):
        super().__init__()
        self.bound = nn.Parameter(bound.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x, self.bound.view(1, -1, *([1] * (x.ndim - 2))).to(x.dtype))


def insert_bound(model: nn.Module, name: str, bound: torch.Tensor) -> ActivationBound:
    """Replace the layer ``name`` by Sequential(layer, clamp) in place, so the clamp is part of the
    returned model (the layer's own parameters are then named ``name.0.*``)."""
    return insert_after(model, name, ActivationBound(bound))


@torch.no_grad()
def logits_of(model: nn.Module, data) -> torch.Tensor:
    """Full-precision logits (eval mode), so the constraint is checked exactly as the bounds were fitted."""
    chunks = [model(data.normalisation.apply(data.images[s:s + 256])).float() for s in range(0, len(data), 256)]
    return torch.cat(chunks) if chunks else torch.zeros(0, data.num_classes, device=data.labels.device)


def exact_accuracy(model: nn.Module, data) -> float:
    return (logits_of(model, data).argmax(1) == data.labels).float().mean().item()


@torch.no_grad()
def channel_maxima(model: nn.Module, names: list[str], data) -> list[torch.Tensor]:
    """Each named layer's per-channel maximum output over ``data`` (eval mode)."""
    maxima = [None] * len(names)
    with layer_outputs(model, names) as outputs:
        for start in range(0, len(data), 256):
            model(data.normalisation.apply(data.images[start:start + 256]))
            for i, name in enumerate(names):
                out = outputs[name].float().transpose(0, 1).flatten(1).amax(1)
                maxima[i] = out if maxima[i] is None else torch.maximum(maxima[i], out)
    return maxima


class Progress:
    """Everything the epochs change (the bounds, not the frozen weights): what a checkpoint between
    epochs holds. ``kept`` are the last bounds that met the accuracy constraint."""

    def __init__(self, clamps: list[ActivationBound], optimiser: torch.optim.Optimizer, generator: torch.Generator,
                 lam: float, initial: list[torch.Tensor]):
        self.clamps = nn.ModuleList(clamps)  # the model's own clamps: restored in place
        self.optimiser, self.generator, self.lam = optimiser, generator, lam
        self.kept, self.kept_epoch, self.last_accuracy = [b.clone() for b in initial], 0, 1.0
        self.epoch = 0


def fit_epoch(model: nn.Module, fit, reference: torch.Tensor, progress: Progress, initial: list[torch.Tensor],
              params: MMBDParams, watch: LossWatch) -> None:
    """One shuffled pass of Adam steps on the bounds, each projected back under its starting value;
    ``watch`` sees the losses as steps of epoch ``progress.epoch``."""
    clamps = progress.clamps
    order = torch.randperm(len(fit), generator=progress.generator).to(reference.device)
    for start in range(0, len(fit), params.batch_size):
        index = order[start:start + params.batch_size]
        logits = model(fit.normalisation.apply(fit.images[index])).float()
        loss = (logits - reference[index]).pow(2).mean() + progress.lam * sum(c.bound.norm() for c in clamps)
        watch.observe(loss, progress.epoch)
        progress.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        progress.optimiser.step()
        with torch.no_grad():  # a bound above the observed maximum would only let triggers through
            for clamp, top in zip(clamps, initial):
                clamp.bound.copy_(torch.minimum(clamp.bound, top))


@defense("mm-bd", "MM-BD: learned per-channel activation upper bounds (margin limiting)", MMBDParams,
         family="pruning")
def mm_bd(model, data, params: MMBDParams, device):
    model = model.to(device).eval()
    notes = []
    reference = logits_of(model, data)  # the unbounded model's logits: what the bounded one should reproduce
    correct = torch.nonzero(reference.argmax(1) == data.labels).flatten()
    details = {"images_used": len(correct), "mitigation_images": len(data), "notes": notes}
    if len(correct) == 0:
        notes.append("the model classifies no mitigation image correctly: no bounds learned, model unchanged")
        return Defended(model, details)
    fit, reference = subset(data, correct), reference[correct]
    names = list(model.parts.stages[:params.bounded_stages])
    if params.bounded_stages > len(model.parts.stages):
        notes.append(f"bounded_stages={params.bounded_stages} but the model has {len(names)} stages: all bounded")
    if len(fit) < params.batch_size:
        notes.append(f"{len(fit)} fitting images < batch size {params.batch_size}: one full-batch step per epoch")

    initial = channel_maxima(model, names, fit)
    clamps = [insert_bound(model, name, bound) for name, bound in zip(names, initial)]
    frozen = [p for p in model.parameters() if p.requires_grad and not any(p is c.bound for c in clamps)]
    for p in frozen:
        p.requires_grad_(False)  # only the bounds learn
    optimiser = torch.optim.Adam([c.bound for c in clamps], lr=params.lr)
    generator = torch.Generator().manual_seed(run_seed())
    floor = 1 - params.allowed_drop
    progress = Progress(clamps, optimiser, generator, params.lam, initial)
    watch = LossWatch(fit.images.device, lambda epoch: f"MM-BD epoch {epoch + 1}")
    with loop_checkpoint("MM-BD bounds", progress) as checkpoint:  # saved between epochs
        while progress.epoch < params.epochs:
            fit_epoch(model, fit, reference, progress, initial, params, watch)
            watch.check()
            progress.epoch += 1
            epoch, progress.last_accuracy = progress.epoch, exact_accuracy(model, fit)
            if progress.last_accuracy >= floor:
                progress.kept, progress.kept_epoch = [c.bound.detach().clone() for c in clamps], epoch
            if epoch % params.lambda_every == 0 and epoch < params.epochs:
                if progress.last_accuracy >= floor:
                    progress.lam *= params.lambda_factor
                else:
                    progress.lam /= params.lambda_factor
            checkpoint.boundary(finished=epoch == params.epochs)
    kept, kept_epoch, last_accuracy, lam = progress.kept, progress.kept_epoch, progress.last_accuracy, progress.lam

    with torch.no_grad():
        for clamp, bound in zip(clamps, kept):
            clamp.bound.copy_(bound)
            clamp.bound.requires_grad_(False)
    for p in frozen:
        p.requires_grad_(True)
    if kept_epoch < params.epochs:
        notes.append(f"final bounds broke the accuracy constraint ({last_accuracy:.3f} < {floor:.3f}): "
                     f"kept those of epoch {kept_epoch}")
    ratio = torch.cat([(b / t)[t > 0] for b, t in zip(kept, initial)])
    details.update({
        "bounded_layers": names, "bounded_channels": sum(len(b) for b in kept), "kept_epoch": kept_epoch,
        "lambda_final": lam, "fit_accuracy": exact_accuracy(model, fit), "mitigation_accuracy": accuracy(model, data),
        "mean_bound_ratio": float(ratio.mean()) if len(ratio) else float("nan"),
        "channels_reduced_below_half": int((ratio < 0.5).sum()),
    })
    return Defended(model, details)
