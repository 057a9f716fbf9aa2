"""NAD (Li, Lyu, Koren, Lyu, Li and Ma, ICLR 2021): "Neural Attention Distillation: Erasing Backdoor
Triggers from Deep Neural Networks".

1. Teacher: a copy of the backdoored model fine-tuned with plain cross-entropy on the mitigation data
   (``teacher_epochs``), then frozen in eval mode.
2. Student: the backdoored model itself, trained (``epochs``) on CE + sum_l beta_l * D(A_T^l, A_S^l) over
   the outputs of the distilled layers, where the attention map A = channel-mean of |activation|^p (p = 2),
   flattened and L2-normalised per sample. Both phases: SGD lr 0.01 constant, momentum 0.9, weight decay
   5e-4, crop + flip.

Which activations, as the survey's code ran it (FORK = WhoDunnett/BackdoorBenchmark @ 8613640,
``defense/nad.py``, its ``train_epoch``): on PreAct-ResNet18 the outputs of layer3 (beta 500), layer4
(beta 1000) and the pooled features (beta 1000), ``children()[:-3]``, ``[:-2]`` and ``[:-1]``; on every
other architecture only the pooled features (``children()[:-1]``, beta 1000). ``layers`` names them:
module names, or ``"pooled"`` for the output of the model's last pooling layer (the input of the
classifier, before flattening: ``avgpool`` in every architecture here). The default is FORK's
non-PreAct choice, ``("pooled",)`` with beta 1000; the paper preset sets PreAct's three per architecture.
A pooled map of 1 x 1 has a normalised attention of exactly 1 for every image, so its term is 0 (FORK's
eps of 1e-6 leaves it at about 0): on those architectures FORK's (and this) NAD is a fine-tuned student.
VGG19-BN's ``avgpool`` is adaptive to 7 x 7: at 32 px it copies a 1 x 1 map (term 0 again), at 64 px
(Tiny) it spreads a 2 x 2 map and the term is live.

Interpretations (from the authors' code and the BackdoorBench port the survey used):
- D is the reference code's ``F.mse_loss`` of the normalised maps (the mean over the batch and the h x w
  positions of the squared difference), the scale the betas were tuned for; the paper's Eq. (the mean over
  the batch of the per-sample L2 distance) is ``distance="l2"``. The reference sums |activation|^p over
  channels; the mean is the same map after normalisation.
- The teacher runs in eval mode, the student in training mode (batch statistics), as in the reference.
- The learning rate is constant in both phases: the toolkit's student resets it to 0.01 every epoch, and
  its teacher's cosine runs over 100 epochs of which 10 are used (a 2 % decay). Batch 256 (FORK's
  CIFAR-10/GTSRB YAML; Tiny 128 in the paper preset), weight decay 5e-4 (its ``wd``).

Few data: nothing is held out, so SPC 1 runs as is. With fewer images than ``batch_size`` every epoch is
one batch of all of them (noted); the engine skips a trailing batch of one image; with fewer than 2
images nothing can be trained (BN needs 2) and the model is returned unchanged (noted). A teacher whose
activations are non-finite after fine-tuning is an error, not a teacher.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import BatchHook, autocast, train
from ..params import BatchSize
from ..passes import FORWARD, MitigationSize
from ..recipe import TrainingParams
from . import Defended, MitigationData, defense, run_seed
from .support import batches, batching_notes, layer_outputs, untrainable

DISTANCES = ("mse", "l2")
POOLED = "pooled"
POOLING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)


def pooled_features_layer(model: nn.Module) -> str:
    """The name of the model's last pooling layer (registration order), whose output is the pooled
    feature map FORK distils (``children()[:-1]``: everything before the classifier)."""
    names = [name for name, module in model.named_modules() if isinstance(module, POOLING)]
    if not names:
        raise TypeError("NAD: the model has no pooling layer to take the pooled features from")
    return names[-1]


def distilled_layers(model: nn.Module, layers: tuple[str, ...]) -> tuple[str, ...]:
    """Module names of the activations to distil, ``"pooled"`` resolved; each must exist."""
    names = tuple(pooled_features_layer(model) if layer == POOLED else layer for layer in layers)
    for name in names:
        model.get_submodule(name)  # raises for a name the architecture does not have
    return names


@dataclass(frozen=True)
class NADParams(TrainingParams):
    """The recipe is both phases'; ``epochs`` is the student's."""

    OWNER = "NAD"
    SCHEDULES = ("constant", "cosine")  # "constant" (the reference) or "cosine", both phases

    epochs: int = 10  # student
    batch_size: BatchSize = 256  # FORK's CIFAR-10/GTSRB YAML (Tiny 128)
    teacher_epochs: int = 10
    schedule: str = "constant"
    # The distilled activations: module names, or "pooled" (the last pooling layer's output), each with its
    # beta. FORK: PreAct layer3/layer4/pooled at 500/1000/1000, every other architecture pooled at 1000.
    layers: tuple[str, ...] = (POOLED,)
    betas: tuple[float, ...] = (1000.0,)
    power: float = 2.0  # p in the attention map |activation|^p
    distance: str = "mse"  # "mse" (the reference code) or "l2" (the paper's equation)

    def checks(self) -> dict[str, bool]:
        return {
            "teacher_epochs": self.teacher_epochs >= 1,
            "layers": len(self.layers) >= 1 and len(set(self.layers)) == len(self.layers),
            "betas": len(self.betas) == len(self.layers) and all(b >= 0 for b in self.betas),
            "power": self.power > 0,
            "distance": self.distance in DISTANCES,
        }


def attention_map(features: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """(N, h*w): the channel mean of |features|^p, unit L2 norm per sample (float32: bf16 loses the small
    differences the loss measures). Scaling the features leaves it unchanged."""
    spatial = features.float().abs().pow(power).mean(1).flatten(1)
    return F.normalize(spatial, dim=1)


def attention_distance(student: torch.Tensor, teacher: torch.Tensor, power: float = 2.0, distance: str = "mse"
                       ) -> torch.Tensor:
    difference = attention_map(student, power) - attention_map(teacher, power)
    return difference.pow(2).mean() if distance == "mse" else difference.norm(dim=1).mean()


class AttentionDistillation(BatchHook):
    """Adds the weighted attention distances to the frozen teacher on the same (augmented) inputs. The
    student's layer outputs come from ``student_outputs``, filled by hooks during the engine's forward."""

    def __init__(self, teacher: nn.Module, layers: tuple[str, ...], betas: tuple[float, ...],
                 student_outputs: dict, teacher_outputs: dict, params: NADParams):
        self.teacher, self.layers, self.betas, self.params = teacher, layers, betas, params
        self.student_outputs, self.teacher_outputs = student_outputs, teacher_outputs
        self.attention_sum, self.seen, self.epoch_attention = 0.0, 0, []

    def loss(self, inputs, labels, logits, cross_entropy):
        with torch.no_grad():
            self.teacher(inputs)
        attention = sum(beta * attention_distance(self.student_outputs[name], self.teacher_outputs[name],
                                                  self.params.power, self.params.distance)
                        for name, beta in zip(self.layers, self.betas))
        self.attention_sum = self.attention_sum + attention.detach() * len(labels)  # no host sync per batch
        self.seen += len(labels)
        return cross_entropy + attention

    def end_epoch(self):
        self.epoch_attention.append(float(self.attention_sum) / self.seen)
        self.attention_sum, self.seen = 0.0, 0


@torch.no_grad()
def attention_gaps(student: nn.Module, teacher: nn.Module, data: MitigationData, layers, params: NADParams
                   ) -> dict[str, float]:
    """Per layer, the (unweighted) attention distance to the teacher on the un-augmented mitigation data,
    both models in eval mode: how far distillation has brought the student."""
    was_training, totals = student.training, dict.fromkeys(layers, 0.0)
    student.eval()
    with layer_outputs(student, layers) as s_out, layer_outputs(teacher, layers) as t_out:
        for x, _ in batches(data, 512):
            with autocast(x.device):
                student(x), teacher(x)
            for name in layers:
                totals[name] += len(x) * float(attention_distance(s_out[name], t_out[name], params.power,
                                                                  params.distance))
    student.train(was_training)
    return {name: total / len(data) for name, total in totals.items()}


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: teacher fine-tuning, then student steps with a teacher forward each."""
    return p.teacher_epochs * m.images + p.epochs * m.images * (1 + FORWARD)


@defense("nad", "NAD: distil a fine-tuned teacher's attention maps into the backdoored model", NADParams,
         family="fine-tuning", passes=passes_per_run, featured=True,
         smoke={"teacher_epochs": 1, "epochs": 1, "batch_size": 8})
def neural_attention_distillation(model, data, params: NADParams, device):
    model = model.to(device)
    if (unchanged := untrainable("NAD", model, data)) is not None:
        return unchanged
    notes = batching_notes(len(data), params.batch_size)
    layers, betas = distilled_layers(model, params.layers), params.betas
    seed = run_seed()

    teacher = copy.deepcopy(model)
    teacher_curve = train(teacher, data.images, data.labels, params.recipe(epochs=params.teacher_epochs),
                          data.normalisation, seed, description="NAD teacher")
    teacher.eval().requires_grad_(False)
    gaps_before = attention_gaps(model, teacher, data, layers, params)
    if not all(map(math.isfinite, gaps_before.values())):  # distilling from it would wreck the student
        raise RuntimeError("NAD teacher fine-tuning produced non-finite activations on the mitigation data")

    with layer_outputs(model, layers) as student_outputs, layer_outputs(teacher, layers) as teacher_outputs:
        hook = AttentionDistillation(teacher, layers, betas, student_outputs, teacher_outputs, params)
        curve = train(model, data.images, data.labels, params.recipe(), data.normalisation,
                      seed + 1, description="NAD student", hook=hook)
    gaps_after = attention_gaps(model, teacher, data, layers, params)
    return Defended(model, {
        "layers": list(layers),
        "betas": list(betas),
        "teacher_final_loss": teacher_curve[-1]["loss"],
        "teacher_final_accuracy": teacher_curve[-1]["accuracy"],
        "final_cross_entropy": curve[-1]["loss"],
        "final_accuracy": curve[-1]["accuracy"],
        "attention_loss_per_epoch": hook.epoch_attention,
        "attention_distance_before": gaps_before,  # per layer, unweighted, eval mode
        "attention_distance_after": gaps_after,
        "notes": notes,
    })
