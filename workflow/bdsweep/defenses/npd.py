"""NPD (Zhu, Wei, Zha and Wu, NeurIPS 2023): "Neural Polarizer: A Lightweight and Effective Backdoor
Defense via Purifying Poisoned Features".

A polarizer, a 1x1 convolution from C to C channels followed by batch norm, initialised to the
identity, is inserted after the convolution ``model.parts.polarizer``; every other weight is frozen.
After a short clean warm-up, each batch alternates (bi-level): inner, targeted L2 PGD moves every
image toward its estimated target label (the largest logit other than the true label: the
second-largest when the model is right); outer, the polarizer minimises
``l1 CE(x, y) + l2 CE(x_adv, y) + l3 -log(1 - max_{k != y} p_k(x_adv)) + l4 -log(1 - p_target(x_adv))``.
The returned model contains the polarizer as a module (the host conv becomes ``Sequential(conv, polarizer)``).

Interpretations, as the survey's toolkit does unless noted: PGD starts at zero, takes sign steps of
``adv_lr`` in pixel space ([0, 1]) projected onto the L2 ball of radius ``trigger_norm``, and stops
early once over 60 % of the batch reaches its target; the learning rate is constant (the toolkit's
scheduler is not attached to the polarizer's optimiser). Deviation: the toolkit warms up with the
polarizer's BN in training mode (re-estimating its statistics from batches); here its statistics
stay frozen at the identity, so the polarizer is a learned linear map of the features and starts
exactly as the identity. Deviation: the toolkit's hook transforms the named layer's input; as
``ModelParts`` documents, the polarizer here follows that conv (C = its out_channels). The second
term uses the true label, as the paper does (the toolkit uses the clean prediction).

Too few data: nothing is held out, so SPC 1 runs as is; with fewer images than ``batch_size``
every epoch is a single batch (noted); with no images the identity polarizer is returned
untrained (noted).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import LoopState, checkpointed_steps
from ..engine import LossWatch, autocast
from ..models import insert_after
from ..params import BatchSize
from ..passes import MitigationSize
from ..recipe import TrainingParams
from . import Defended, defense, run_seed
from .support import batches

EARLY_STOP_SUCCESS = 0.6  # inner PGD stops once this share of the batch reaches its target (toolkit)


@dataclass(frozen=True)
class NPDParams(TrainingParams):
    """The recipe is the polarizer training's (SGD, constant lr); the warm-up has its own lr."""

    OWNER = "NPD"
    MIN_EPOCHS = 0

    epochs: int = 50
    batch_size: BatchSize = 128
    warmup_epochs: int = 5
    warmup_lr: float = 1e-4
    trigger_norm: float = 3.0  # L2 bound in [0, 1] pixel units (FORK npd/<dataset>_<arch>.yaml: GTSRB 5, Tiny 3)
    adv_lr: float = 0.1
    inner_steps: int = 2
    lambda_clean: float = 1.0  # CE on clean images
    lambda_adv: float = 0.4  # CE of adversarial images with their true label (FORK GTSRB yaml lmd2-4: 0.5)
    lambda_other: float = 0.4  # push down the top wrong class on adversarial images
    lambda_target: float = 0.4  # push down the estimated target on adversarial images

    def checks(self) -> dict[str, bool]:
        positive = ("warmup_lr", "trigger_norm", "adv_lr")
        return {"warmup_epochs": self.warmup_epochs >= 0, "inner_steps": self.inner_steps >= 1,
                **{name: getattr(self, name) > 0 for name in positive},
                **{f.name: getattr(self, f.name) >= 0 for f in fields(self) if f.name.startswith("lambda_")}}


def make_polarizer(channels: int) -> nn.Sequential:
    """1x1 conv + BN that is exactly the identity in eval mode (running_var = 1 - eps)."""
    conv, bn = nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        bn.running_var.fill_(1 - bn.eps)
    return nn.Sequential(conv, bn)


def insert_polarizer(model: nn.Module) -> nn.Sequential:
    """Replace the host conv by ``Sequential(host, polarizer)``; returns the polarizer (in the
    model's mode: a new module would otherwise be in training mode and normalise by the batch)."""
    host = model.get_submodule(model.parts.polarizer)
    polarizer = make_polarizer(host.out_channels).to(host.weight.device).train(model.training)
    return insert_after(model, model.parts.polarizer, polarizer)


def estimated_target(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The largest logit other than the true label's (the second-largest when the model is right)."""
    return logits.scatter(1, labels[:, None], float("-inf")).argmax(1)


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return delta * (radius / norms).clamp(max=1.0)


def targeted_pgd(forward, images: torch.Tensor, targets: torch.Tensor, params: NPDParams) -> torch.Tensor:
    """Perturbed images in [0, 1] (each within ``trigger_norm`` in L2) pushed toward ``targets``."""
    delta = torch.zeros_like(images)
    for _ in range(params.inner_steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(forward((images + delta).clamp(0, 1)), targets)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project_l2(delta.detach() - params.adv_lr * grad.sign(), params.trigger_norm)
        with torch.no_grad():
            if (forward((images + delta).clamp(0, 1)).argmax(1) == targets).float().mean() > EARLY_STOP_SUCCESS:
                break
    return (images + delta).clamp(0, 1).detach()


def polarizer_loss(clean_logits, adv_logits, labels, targets, params: NPDParams) -> torch.Tensor:
    probs = adv_logits.float().softmax(1)
    top_wrong = probs.scatter(1, labels[:, None], 0.0).amax(1)
    # 1e-4 keeps the log finite when a probability reaches 1, as the toolkit's 1.0001 does.
    return (params.lambda_clean * F.cross_entropy(clean_logits, labels)
            + params.lambda_adv * F.cross_entropy(adv_logits, labels)
            + params.lambda_other * -torch.log(1.0001 - top_wrong).mean()
            + params.lambda_target * -torch.log(1.0001 - probs.gather(1, targets[:, None])).mean())


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: per step: the PGD steps, then the clean and adversarial batches."""
    return p.warmup_epochs * m.images + p.epochs * m.images * (p.inner_steps + 2)


@defense("npd", "NPD: train an inserted 1x1 conv+BN polarizer against targeted L2 perturbations", NPDParams,
         family="pruning", passes=passes_per_run, featured=True,
         smoke={"warmup_epochs": 1, "epochs": 1, "batch_size": 8, "inner_steps": 1})
def neural_polarizer(model, data, params: NPDParams, device):
    model = model.to(device).eval()  # everything, the polarizer's BN included, stays in eval mode
    polarizer = insert_polarizer(model)
    notes, n = [], len(data)
    if n == 0:
        return Defended(model, {"notes": ["no mitigation data: the identity polarizer is returned untrained"]})
    if n < params.batch_size:
        notes.append(f"{n} mitigation images < batch_size {params.batch_size}: one batch per epoch")
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in polarizer.parameters():
        p.requires_grad_(True)
    generator = torch.Generator(device=data.images.device).manual_seed(run_seed())
    norm = data.normalisation

    def forward(unit_images):
        with autocast(device):
            return model(norm.normalise(unit_images))

    def epoch_batches():
        return batches(data, params.batch_size, generator, augment=params.augment, normalise=False)

    per_epoch = -(-n // params.batch_size)

    def checkpointed_epochs(stage: str, state: LoopState, epochs: int, train_batch) -> None:
        """``epochs`` epochs of ``train_batch(x, y)`` (which returns the loss), a phase of the defense
        checkpoint saved between epochs; losses are checked for NaN at each epoch's end. ``state``
        holds everything the epochs change (the polarizer: every other weight is frozen)."""
        watch = LossWatch(data.images.device, lambda step: f"NPD {stage} epoch {step // per_epoch + 1}, "
                          f"batch {step % per_epoch + 1}")
        for epoch in checkpointed_steps(f"NPD {stage}", state, epochs):
            for step, (x, y) in enumerate(epoch_batches(), epoch * per_epoch):
                watch.observe(train_batch(x, y), step)
            watch.check()

    warmup = LoopState(polarizer=polarizer, optimiser=torch.optim.SGD(polarizer.parameters(), lr=params.warmup_lr),
                       generator=generator)

    def warmup_batch(x, y):
        loss = F.cross_entropy(forward(x), y)
        warmup.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        warmup.optimiser.step()
        return loss

    checkpointed_epochs("warm-up", warmup, params.warmup_epochs, warmup_batch)

    optimiser = torch.optim.SGD(polarizer.parameters(), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    # The counts are the last epoch's perturbation outcomes.
    progress = LoopState(polarizer=polarizer, optimiser=optimiser, generator=generator, hit_target=0, hit_label=0,
                         seen=0)

    def polarizer_batch(x, y):
        with torch.no_grad():
            targets = estimated_target(forward(x), y)
        adversarial = targeted_pgd(forward, x, targets, params)
        clean_logits, adv_logits = forward(x), forward(adversarial)
        loss = polarizer_loss(clean_logits, adv_logits, y, targets, params)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if progress.step == params.epochs - 1:  # how the perturbations fared in the last epoch
            predicted = adv_logits.detach().argmax(1)
            progress.hit_target += int((predicted == targets).sum())
            progress.hit_label += int((predicted == y).sum())
            progress.seen += len(y)
        return loss

    checkpointed_epochs("polarizer", progress, params.epochs, polarizer_batch)

    for p in frozen:
        p.requires_grad_(True)
    details = {"polarizer_after": model.parts.polarizer, "channels": polarizer[0].out_channels,
               "polarizer_updates": params.epochs * per_epoch, "notes": notes}
    if progress.seen:
        details.update(last_epoch_adv_target_rate=progress.hit_target / progress.seen,
                       last_epoch_adv_accuracy=progress.hit_label / progress.seen)
    return Defended(model, details)
