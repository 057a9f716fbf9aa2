"""MM-BD mitigation (Wang, Xiang, Miller & Kesidis, IEEE S&P 2024, "MM-BD: Post-Training Detection of
Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic"), with the
structure and values of the survey's code (FORK = WhoDunnett/BackdoorBenchmark @ 8613640,
``defense/mm-bd.py``, ``config/defense/mm-bd/default.yaml``; FORK only, BB has no MM-BD).

Backdoor triggers drive abnormally large internal activations, hence abnormally large classification
margins. The mitigation learns a per-channel upper bound B on internal activations, clamping them
(``clamp(a, max=B)``), by minimising  mse(f_B(x), f(x)) + lambda * sum_l ||B_l||_2  (Adam lr 1e-3 on B
only, weights frozen, 50 epochs, eval mode) over ALL mitigation images (batches of 256, shuffled and
augmented as FORK's training loader; FORK does not restrict them to correctly classified ones).

As FORK sets it up (`mm-bd.py:146-304`):
- bounded layers: every activation module (ReLU, SiLU, Hardswish) that acts on a feature map, i.e.
  not in the classifier head: every conv ReLU on VGG19-BN (FORK drops the 2 head ReLUs), every SiLU on
  EfficientNet-B3, every Hardswish but the head's and every ReLU on MobileNetV3; a model without
  activation modules (PreAct-ResNet18, whose ReLUs are functional) gets a bound on every BatchNorm2d
  output, applied after a ReLU (FORK's ``apply_relu_first``);
- initial bound: ONE value per layer, the largest output of that layer over the data in eval mode on
  the unbounded model (`:124`, `:195`), repeated over the layer's channels, which then learn apart;
- no projection: a bound may rise above its start;
- lambda: after 0-based epochs 10, 20, 30 and 40 (``epoch % 10 == 0 and epoch != 0``), lambda x 1.2 if
  the accuracy of the bounded model's training-step predictions during that epoch is STRICTLY above
  the unbounded model's initial accuracy - 0.05, else / 1.2 (`:592-593`);
- the final (last-epoch) bounds are returned, whatever their accuracy.

Deviation (kind b): FORK removes every bound's forward hook right after measuring its initial value
(``hook_token.remove()`` in each ``setup_mask_*``) and never registers it again, so its bounds never act:
its training reproduces the unbounded logits and it evaluates and saves the unchanged backdoored
model. The survey's MM-BD numbers are therefore those of the undefended model (bdsweep's ``none``).
Here the bounds act during training and are part of the returned model, as the method intends. (For
the same reason FORK's MobileNetV3 ReLU bounds, lost to an exhausted ``named_modules()`` generator in
``setup_mask_mobilenet``, are kept here: they shaped no survey number.)

Minor: FORK measures each layer's initial maximum in its own pass over freshly augmented data; here
one augmented pass measures all of them (each layer's maximum has the same distribution either way, at
a fraction of the cost on EfficientNet's ~80 SiLU layers). SPC 1 runs unchanged (no held-out split); with fewer images
than a batch each epoch is a single step (noted).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import LoopState, checkpointed_steps
from ..engine import LossWatch, augment_batch
from ..models import insert_after
from ..params import BatchSize, check_ranges
from ..passes import FORWARD, MitigationSize
from . import Defended, MitigationData, defense, run_seed
from .support import accuracy

ACTIVATIONS = (nn.ReLU, nn.SiLU, nn.Hardswish)  # FORK's get_relu_layers / get_silu_layers / get_hardswish_layers


@dataclass(frozen=True)
class MMBDParams:
    epochs: int = 50  # FORK training_epochs
    lr: float = 1e-3  # FORK training_lr (Adam)
    lam: float = 0.5  # FORK lambda_hyper: weight of the bounds' L2 norms
    lambda_factor: float = 1.2  # FORK alpha
    lambda_every: int = 10  # FORK lambda_reduction_num
    allowed_drop: float = 0.05  # FORK accuracy_reduction
    batch_size: BatchSize = 256
    augment: bool = True  # FORK's loader uses the training transform

    def __post_init__(self):
        checks = {
            "epochs": self.epochs >= 1, "lr": self.lr > 0, "lam": self.lam >= 0,
            "lambda_factor": self.lambda_factor >= 1, "lambda_every": self.lambda_every >= 1,
            "allowed_drop": 0 <= self.allowed_drop < 1, "batch_size": self.batch_size >= 1,
        }
        check_ranges("MM-BD", self, checks)


class ActivationBound(nn.Module):
    """Clamps each channel (dimension 1) of its input from above at ``bound`` (after a ReLU with
    ``relu_first``, FORK's bound on a PreAct BN output)."""

    def __init__(self, bound: torch.Tensor, relu_first: bool = False):
        super().__init__()
        self.bound = nn.Parameter(bound.clone())
        self.relu_first = relu_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu_first:
            x = F.relu(x)
        return torch.clamp(x, max=self.bound.view(1, -1, *([1] * (x.ndim - 2))).to(x.dtype))


@torch.no_grad()
def bounded_layers(model: nn.Module, example: torch.Tensor) -> tuple[list[str], bool]:
    """(names, relu_first): the layers FORK bounds, found from module types and one forward pass of
    ``example`` (normalised NCHW): every ReLU/SiLU/Hardswish module whose output is a 4-D feature map;
    if the model has no such module, every BatchNorm2d, bounded after a ReLU."""
    shapes = {}
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, ACTIVATIONS)]
    handles = [m.register_forward_hook(lambda module, i, o, name=name: shapes.__setitem__(name, o.ndim))
               for name, m in candidates]
    was_training = model.training
    try:
        model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    names = [name for name, _ in candidates if shapes.get(name) == 4]
    if names:
        return names, False
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)], True


def loader(data: MitigationData, params: MMBDParams, generator: torch.Generator):
    """One shuffled pass in batches of ``batch_size``: (normalised, augmented with ``augment``) images, labels."""
    order = torch.randperm(len(data), generator=generator).to(data.images.device)
    for start in range(0, len(data), params.batch_size):
        index = order[start:start + params.batch_size]
        x = data.images[index].permute(0, 3, 1, 2)
        if params.augment:
            x = augment_batch(x, 4, data.normalisation.hflip, generator)
        yield data.normalisation.normalise(x.float().div_(255.0)), data.labels[index]


@torch.no_grad()
def layer_maxima(model: nn.Module, names: list[str], data: MitigationData, params: MMBDParams,
                 generator: torch.Generator) -> list[float]:
    """Each named layer's largest output over one pass of ``data`` (eval mode, unbounded model):
    FORK's one layer-wide initial bound (`mm-bd.py:124`, `:195`)."""
    maxima = {name: -float("inf") for name in names}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, i, o, name=name: maxima.__setitem__(name, max(maxima[name], float(o.float().max()))))
        for name in names]
    try:
        for x, _ in loader(data, params, generator):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [maxima[name] for name in names]


@torch.no_grad()
def loader_accuracy(model: nn.Module, data: MitigationData, params: MMBDParams, generator: torch.Generator) -> float:
    """Eval-mode accuracy over one pass of FORK's loader (the initial accuracy, `mm-bd.py:560-572`)."""
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader(data, params, generator))
    return correct / len(data)


def fit_epoch(model: nn.Module, reference: nn.Module, data: MitigationData, progress: LoopState, params: MMBDParams,
              watch: LossWatch) -> float:
    """One shuffled pass of Adam steps on the bounds; the accuracy of the bounded model's predictions
    at those steps (FORK's training accuracy). ``watch`` sees the losses as steps of epoch ``progress.step``."""
    correct = torch.zeros((), dtype=torch.long, device=data.labels.device)
    for x, y in loader(data, params, progress.generator):
        with torch.no_grad():
            target = reference(x).float()
        logits = model(x).float()
        loss = F.mse_loss(logits, target) + progress.lam * sum(torch.norm(c.bound, p=2) for c in progress.clamps)
        watch.observe(loss, progress.step)
        progress.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        progress.optimiser.step()
        correct += (logits.argmax(1) == y).sum()
    return correct.item() / len(data)


def update_lambda(lam: float, epoch: int, train_accuracy: float, initial_accuracy: float, params: MMBDParams) -> float:
    """FORK's rule after the 0-based ``epoch`` (`mm-bd.py:592-593`): at every ``lambda_every``-th
    epoch but the first, x factor if the training accuracy is strictly above initial - allowed_drop,
    else / factor."""
    if epoch % params.lambda_every != 0 or epoch == 0:
        return lam
    if train_accuracy > initial_accuracy - params.allowed_drop:
        return lam * params.lambda_factor
    return lam / params.lambda_factor


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: passes for the layer maxima, the initial and the final accuracy, then per batch the
    unbounded reference's forward and the bounded model's step."""
    return 3 * m.images * FORWARD + p.epochs * m.images * (1 + FORWARD)


@defense("mm-bd", "MM-BD: learned per-channel activation upper bounds (margin limiting)", MMBDParams,
         family="pruning", passes=passes_per_run, smoke={"epochs": 1, "batch_size": 8})
def mm_bd(model, data, params: MMBDParams, device):
    model = model.to(device).eval()
    notes = []
    if len(data) < params.batch_size:
        notes.append(f"{len(data)} mitigation images < batch size {params.batch_size}: one full-batch step per epoch")
    generator = torch.Generator().manual_seed(run_seed())
    example = data.normalisation.apply(data.images[:2])
    names, relu_first = bounded_layers(model, example)
    if not names:
        notes.append("the model has no activation or BatchNorm2d layer to bound: model unchanged")
        return Defended(model, {"bounded_layers": [], "bounded_channels": 0, "notes": notes})
    reference = copy.deepcopy(model).requires_grad_(False).eval()  # the unbounded model: what to reproduce
    initial = layer_maxima(model, names, data, params, generator)
    initial_accuracy = loader_accuracy(model, data, params, generator)
    with torch.no_grad():
        channels = {}
        with_hooks = [model.get_submodule(name).register_forward_hook(
            lambda module, i, o, name=name: channels.__setitem__(name, o.shape[1])) for name in names]
        model(example)
        for handle in with_hooks:
            handle.remove()
    clamps = [insert_after(model, name, ActivationBound(torch.full((channels[name],), top, device=example.device),
                                                        relu_first))
              for name, top in zip(names, initial)]
    frozen = [p for p in model.parameters() if p.requires_grad and not any(p is c.bound for c in clamps)]
    for p in frozen:
        p.requires_grad_(False)  # only the bounds learn
    optimiser = torch.optim.Adam([c.bound for c in clamps], lr=params.lr)
    # What the epochs change (the bounds, not the frozen weights); the clamps are the model's own, restored in
    # place. lambdas: lambda after each update.
    progress = LoopState(clamps=nn.ModuleList(clamps), optimiser=optimiser, generator=generator, lam=params.lam,
                         train_accuracies=[], lambdas=[])
    watch = LossWatch(data.images.device, lambda epoch: f"MM-BD epoch {epoch + 1}")
    for epoch in checkpointed_steps("MM-BD bounds", progress, params.epochs):  # saved between epochs
        train_accuracy = fit_epoch(model, reference, data, progress, params, watch)
        watch.check()
        progress.lam = update_lambda(progress.lam, epoch, train_accuracy, initial_accuracy, params)
        progress.train_accuracies = [*progress.train_accuracies, train_accuracy]
        progress.lambdas = [*progress.lambdas, progress.lam]
    del reference
    for clamp in clamps:
        clamp.bound.requires_grad_(False)
    for p in frozen:
        p.requires_grad_(True)
    bounds = [c.bound.detach() for c in clamps]
    ratio = torch.cat([b / t for b, t in zip(bounds, initial) if t > 0]) if bounds else torch.zeros(0)
    return Defended(model, {
        "bounded_layers": names, "bounds_after_relu": relu_first,
        "bounded_channels": sum(len(b) for b in bounds), "initial_bounds": initial,
        "initial_accuracy": initial_accuracy, "train_accuracy_by_epoch": progress.train_accuracies,
        "lambda_final": progress.lam, "mitigation_accuracy": accuracy(model, data),
        "mean_bound_ratio": float(ratio.mean()) if len(ratio) else float("nan"),
        "channels_reduced_below_half": int((ratio < 0.5).sum()),
        "notes": notes,
    })
