"""SAU (Wei, Zhang, Zha and Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared
Adversarial Examples", NeurIPS 2023): adversarial examples that the backdoored model and the model being
purified misclassify to the SAME label behave like poisoned images; unlearning them removes the backdoor.

A frozen copy of the original model is the reference. Each batch (both models in eval mode):
1. Shared L-inf PGD (``adv_steps`` sign steps of ``adv_lr``, starting at +``trigger_norm`` everywhere, as
   the toolkit's "max" init) minimises ``beta_adv * L_adv + beta_shared * L_js``: L_adv is minus the
   cross-entropy (true label) of each model on the examples whose prediction has not yet left that
   model's clean prediction; L_js the Jensen-Shannon divergence between the two models' outputs on the
   examples not yet shared (both moved off their clean prediction, to one label). It stops early once
   every example is shared. Both sums are divided by the batch size (and L_adv by 2 models).
2. One Adam step on ``lambda_clean CE(x, y) + lambda_adv CE(x_adv, y) + lambda_shared L_sar``, with
   L_sar = sum over the unlearned examples of ``-log(1 - p_model(y_ref | x_adv))`` / batch size, where
   y_ref is the reference's label of x_adv: pushing the model off the reference's wrong label breaks
   the sharing (or the misclassification).

Interpretations, from the authors' BackdoorBench code (the survey's toolkit): the unlearned examples are
those the REFERENCE misclassifies (its label of x_adv differs from y and from its clean prediction); the
paper's relaxation leaves the "both models agree" part to the soft -log(1 - p) term. ``shared_only=True``
instead keeps only the examples both models misclassify to the same label (the survey's wording). p is
clamped to >= 0.001 (no gradient below 0.1 %) and 1 - p to >= 1e-6, as the toolkit does. Batch 256, Adam
lr 1e-4, betas (0.9, 0.999), no weight decay, WITH amsgrad: FORK's sau.py builds its optimiser with the
generic factory (``argparser_opt_scheduler``; ``config/defense/sau/*.yaml``: ``client_optimizer: adam``),
which sets amsgrad for Adam (``utils/aggregate_block/train_settings_generate.py:49-53``); ``amsgrad=False``
for plain Adam. Constant lr (the toolkit builds a cosine scheduler but never steps it), no augmentation (its
loader uses test transforms); the update runs in eval mode (its ``train_mode`` False, BN statistics fixed).
FORK's quirks, reproduced by default (docs/deviations.md): adversarial pixels may leave [0, 1]
(``clip_to_image=True`` keeps valid images) and the PGD takes its step before it checks that every
example is shared, so one step more than needed (``step_when_shared=False`` stops before it).

Too few data: nothing is held out, so SPC 1 and 2 run as is; with fewer images than ``batch_size`` every
round is one batch (noted); the engine skips a trailing batch of one image (noted); with fewer than 2
images nothing can be trained and the model is returned unchanged (noted).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import BatchHook, augment_batch, train
from ..params import BatchSize, check_ranges
from ..passes import FORWARD, MitigationSize
from ..recipe import Recipe
from . import Defended, MitigationData, defense, run_seed
from .support import accuracy, batching_notes, untrainable


@dataclass(frozen=True)
class SAUParams:
    rounds: int = 100  # epochs over the mitigation data (Tiny-ImageNet: 20)
    batch_size: BatchSize = 256
    lr: float = 1e-4  # Adam
    amsgrad: bool = True  # FORK's Adam (train_settings_generate.py:49-53)
    weight_decay: float = 0.0
    trigger_norm: float = 0.2  # L-inf bound in [0, 1] pixel units
    adv_lr: float = 0.2
    adv_steps: int = 5
    beta_adv: float = 0.01  # PGD: weight of the (negated) adversarial cross-entropy
    beta_shared: float = 1.0  # PGD: weight of the Jensen-Shannon agreement term
    lambda_clean: float = 1.0
    lambda_adv: float = 0.0  # vanilla adversarial training term (off by default)
    lambda_shared: float = 1.0
    shared_only: bool = False  # unlearn only examples both models misclassify to one label
    # FORK's PGD lets adversarial pixels leave [0, 1] (its start is x + eps everywhere, its steps clamp
    # only delta); True keeps every adversarial image a valid image.
    clip_to_image: bool = False
    # FORK checks "every example shared" after its step, so it takes one step more than needed; False
    # stops before that step.
    step_when_shared: bool = True
    train_mode: bool = False  # BN in training mode for the update (the toolkit's default: eval)
    augment: bool = False  # random crop (padding 4) and flip, before the attack
    crop_padding: int = 4

    def __post_init__(self):
        check_ranges("SAU", self, {
            "rounds": self.rounds >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0, "trigger_norm": 0 < self.trigger_norm <= 1,
            "adv_lr": self.adv_lr > 0, "adv_steps": self.adv_steps >= 1,
            "beta_adv": self.beta_adv >= 0, "beta_shared": self.beta_shared >= 0,
            "lambda_clean": self.lambda_clean >= 0, "lambda_adv": self.lambda_adv >= 0,
            "lambda_shared": self.lambda_shared >= 0, "crop_padding": self.crop_padding >= 0,
        })


def shared_mistakes(logits, reference_logits, labels, reference_labels):
    """Examples both models get wrong (each against its own labels) with the SAME predicted label."""
    predicted, reference_predicted = logits.argmax(1), reference_logits.argmax(1)
    return (predicted != labels) & (reference_predicted != reference_labels) & (predicted == reference_predicted)


def jensen_shannon(logits, reference_logits):
    """Per-example JS divergence of the two softmax outputs (probabilities floored at 1e-8 for the logs)."""
    p, q = logits.float().softmax(1).clamp_min(1e-8), reference_logits.float().softmax(1).clamp_min(1e-8)
    mixture = 0.5 * (p + q)
    return 0.5 * ((p * (p.log() - mixture.log())).sum(1) + (q * (q.log() - mixture.log())).sum(1))


def shared_pgd(model, reference, images, labels, params: SAUParams):
    """Images in [0, 1] within ``trigger_norm`` (L-inf) of ``images`` that both models misclassify alike;
    ``model`` and ``reference`` map [0, 1] images to logits. Returns (adversarial images, steps taken)."""
    with torch.no_grad():
        clean_prediction, reference_clean_prediction = model(images).argmax(1), reference(images).argmax(1)
    n, eps = len(images), params.trigger_norm
    delta = (images + eps).clamp(0, 1) - images if params.clip_to_image else torch.full_like(images, eps)
    steps = 0
    while steps < params.adv_steps:
        delta.requires_grad_(True)
        logits, reference_logits = model(images + delta).float(), reference(images + delta).float()
        moved = logits.argmax(1) != clean_prediction
        reference_moved = reference_logits.argmax(1) != reference_clean_prediction
        shared = shared_mistakes(logits, reference_logits, clean_prediction, reference_clean_prediction)
        if shared.all() and not params.step_when_shared:
            break
        # Raise the true label's loss only where a model still predicts as on the clean image.
        adversarial = -(F.cross_entropy(logits, labels, reduction="none")[~moved].sum()
                        + F.cross_entropy(reference_logits, labels, reduction="none")[~reference_moved].sum()) / (2 * n)
        agreement = jensen_shannon(logits, reference_logits)[~shared].sum() / n
        (grad,) = torch.autograd.grad(params.beta_adv * adversarial + params.beta_shared * agreement, delta)
        delta = (delta.detach() - params.adv_lr * grad.sign()).clamp(-eps, eps)
        if params.clip_to_image:
            delta = (images + delta).clamp(0, 1) - images  # stay a valid image
        steps += 1
        if shared.all():  # FORK's order: the step, then the check (step_when_shared)
            break
    return (images + delta).detach(), steps


def unlearning_mask(reference_adv_logits, reference_clean_logits, labels, adv_logits=None, shared_only=False):
    """Which adversarial examples to unlearn: those the reference misclassifies (off the true label and
    off its clean prediction); with ``shared_only``, also misclassified alike by the model (``adv_logits``)."""
    reference_predicted = reference_adv_logits.argmax(1)
    mask = (reference_predicted != labels) & (reference_predicted != reference_clean_logits.argmax(1))
    if shared_only:
        mask &= adv_logits.argmax(1) == reference_predicted
    return mask


def shared_unlearning_loss(adv_logits, reference_adv_logits, mask):
    """Sum over ``mask`` of -log(1 - p_model(reference's label | x_adv)), divided by the batch size."""
    p = adv_logits.float().softmax(1).gather(1, reference_adv_logits.argmax(1)[:, None]).squeeze(1)
    return -torch.log((1 - p.clamp_min(1e-3)).clamp_min(1e-6))[mask].sum() / len(adv_logits)


class SharedAdversarialUnlearning(BatchHook):
    """Makes the shared adversarial examples in ``transform`` and adds their terms in ``loss``; the engine's
    own forward pass is the clean batch, so its curve is the clean loss and accuracy."""

    def __init__(self, model: nn.Module, reference: nn.Module, data: MitigationData, params: SAUParams,
                 generator: torch.Generator):
        self.model, self.reference, self.data, self.params, self.generator = model, reference, data, params, generator
        self.stats = self.last_round = None

    def forward(self, network, images01):
        return network(self.data.normalisation.normalise(images01))

    def transform(self, images, labels, indices):
        if self.params.augment:
            images = augment_batch(images, self.params.crop_padding, self.data.normalisation.hflip, self.generator)
        self.model.eval()  # the attack sees the model as it predicts
        adversarial, steps = shared_pgd(lambda x: self.forward(self.model, x),
                                        lambda x: self.forward(self.reference, x), images, labels, self.params)
        with torch.no_grad():
            self.reference_clean = self.forward(self.reference, images).float()
            self.reference_adv = self.forward(self.reference, adversarial).float()
        self.model.train(self.params.train_mode)  # the engine's forward (and ours in loss) run in this mode
        self.adversarial, self.steps = adversarial, steps
        return images, labels, None

    def loss(self, inputs, labels, logits, cross_entropy):
        adv_logits = self.forward(self.model, self.adversarial).float()
        mask = unlearning_mask(self.reference_adv, self.reference_clean, labels, adv_logits, self.params.shared_only)
        shared_loss = shared_unlearning_loss(adv_logits, self.reference_adv, mask)
        adv_loss = F.cross_entropy(adv_logits, labels)
        p = self.params
        with torch.no_grad():  # summed on the device: one host sync per round, in end_epoch
            shared = shared_mistakes(adv_logits, self.reference_adv, labels, labels)
            batch = torch.stack([torch.tensor(float(len(labels)), device=labels.device), shared.sum().float(),
                                 mask.sum().float(), shared_loss * len(labels),
                                 (adv_logits.argmax(1) == labels).sum().float()])
            self.stats = batch if self.stats is None else self.stats + batch
        return p.lambda_clean * cross_entropy + p.lambda_adv * adv_loss + p.lambda_shared * shared_loss

    def end_epoch(self):
        seen, shared, unlearned, loss, correct = self.stats.tolist()
        self.last_round = {"shared_rate": shared / seen, "unlearned_rate": unlearned / seen,
                           "shared_loss": loss / seen + 0.0, "adversarial_accuracy": correct / seen,
                           "pgd_steps_last_batch": self.steps}
        self.stats = None


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: per step: clean predictions of both models, PGD through both, the reference on clean
    and adversarial images, then the training step and the adversarial forward and backward."""
    return p.rounds * m.images * (2 * FORWARD + 2 * p.adv_steps + 2 * FORWARD + 2)


@defense("sau", "SAU: unlearn adversarial examples shared by the model and its frozen original", SAUParams,
         family="fine-tuning", passes=passes_per_run, featured=True,
         smoke={"rounds": 1, "adv_steps": 1, "batch_size": 8})
def shared_adversarial_unlearning(model, data, params: SAUParams, device):
    model = model.to(device)
    if (unchanged := untrainable("SAU", model, data)) is not None:
        return unchanged
    notes = batching_notes(len(data), params.batch_size, unit="round")
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # the original backdoored model, frozen
    seed = run_seed()
    hook = SharedAdversarialUnlearning(model, reference, data, params,
                                       torch.Generator(device=data.images.device).manual_seed(seed))
    recipe = Recipe(epochs=params.rounds, batch_size=params.batch_size, lr=params.lr, weight_decay=params.weight_decay,
                    schedule="constant", optimizer="amsgrad" if params.amsgrad else "adam",
                    augment=False)  # the hook augments, before its attack
    curve = train(model, data.images, data.labels, recipe, data.normalisation, seed, description="SAU", hook=hook)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("SAU unlearning produced non-finite weights")
    return Defended(model, {
        "final_training_loss": curve[-1]["loss"], "final_training_accuracy": curve[-1]["accuracy"],
        **{f"last_round_{key}": value for key, value in hook.last_round.items()},
        "mitigation_accuracy_after": accuracy(model, data), "notes": notes})
