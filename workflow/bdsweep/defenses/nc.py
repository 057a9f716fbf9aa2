"""NC (Wang, Yao, Shan, Li, Viswanath, Zheng and Zhao, "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks", IEEE S&P 2019): reverse-engineer a trigger per class, flag
classes whose trigger is anomalously small, unlearn the flagged triggers.

1. For every class c, with the model frozen in eval mode, a mask m in [0, 1]^{HxW} and a pattern p in
   [0, 1]^{3xHxW} (each ``tanh(w) / 2 + 0.5``) minimise ``CE((1 - m) x + m p, c) + cost_c |m|_1`` with
   Adam (lr 0.1, betas 0.5/0.9), at most 80 epochs. Per epoch: the smallest |m|_1 of an epoch whose
   attack success is >= 0.98 is kept; after ``patience`` (5) successful epochs in a row cost_c is
   doubled, after 5 unsuccessful ones divided by 2^1.5; the class stops once its cost has moved both
   ways and its best norm has not improved by 1 % for 25 epochs.
2. Anomaly index of each class: |norm - median| / (1.4826 MAD); flagged: norm not above the median,
   index > 2.
3. If any class is flagged, the whole model is fine-tuned (SGD 0.01, momentum 0.9, wd 5e-4, cosine,
   batch 256, 100 epochs, crop + flip) on the mitigation data with 20 % of it stamped with a flagged
   class's reversed trigger, true labels kept. If none is flagged, the model is returned unchanged.

Defaults are what the survey's toolkit effectively ran (FORK = WhoDunnett/BackdoorBenchmark @ 8613640,
``defense/nc.py``; its nc config: mask lr, init cost 1e-3, success threshold 98 %, patience 5, early-stop
patience 25 at 0.99, 80 epochs, unlearning ratio 0.2 and the model training recipe for unlearning).
The classes are optimised side by side (one forward pass stamps a batch with every class's trigger; each
class keeps its own cost, Adam moments and stopping, exactly as separate runs would). FORK's quirks are
reproduced by default, each with a parameter for the corrected behaviour:

- the median and the MAD are ``torch.median``'s: the LOWER middle value of an even count (nc.py:388-389);
  ``interpolated_median=True`` takes the mean of the middle two. A zero MAD gives an infinite index
  (flagged if below the median) or NaN (at the median: never flagged), as FORK's division does;
- the trigger search sees augmented images (FORK's loader uses the training transform, nc.py:628:
  random crop, padding 4, and flips where the dataset allows); ``search_augment=False`` turns it off;
- a class that never reaches the success threshold keeps its FIRST epoch's mask (nc.py:375);
  ``fallback_mask="last_epoch"`` keeps its last one;
- unlearning trains on a fixed set (nc.py:785-829): the first 80 % of the mitigation data BY POSITION,
  clean, plus the last 20 % stamped with each flagged class's trigger (once per flagged class, true
  labels; the last 20 % never appear clean). The mitigation data are ordered class by class, so the
  stamped images are those of the last classes. ``unlearn_split="per_batch"`` instead stamps a random
  20 % (at least one image) of every batch, so every image is also seen clean;
- the trigger FORK stamps is read back from the PNG files it saved with ``save_image(normalize=True)``
  (nc.py:235-237): the mask and the trigger (pattern x mask) are each min-max normalised and rounded to
  8 bits, then ``x (1 - mask) + 255 trigger`` is truncated to uint8 with numpy's wrap-around above 255.
  ``trigger_normalisation="none"`` stamps the reversed mask and pattern themselves, rounded and clipped.

Deviation (kind b, docs/deviations.md): when a class is flagged, FORK trains its model but evaluates and
saves a never-trained copy of the backdoored model (nc.py:752, :851-869); bdsweep returns the unlearned
model. (As committed, FORK's unlearning step also reads ``ran_idx``, which only its ratio branch assigns
(nc.py:772, :785), so with ``--spc`` a flagged run stops there with UnboundLocalError.)

Few data: reverse engineering runs on any number of images; with fewer than ``batch_size`` each
epoch is one Adam step on all of them (noted). Unlearning needs 2 images (BN in training mode): with
fewer, flagged or not, the model is returned unchanged (noted). No data at all: unchanged (noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checkpoints import LoopState, checkpointed_steps
from ..engine import BatchHook, LossWatch, autocast, train
from ..params import BatchSize, check_ranges
from ..passes import MitigationSize
from ..recipe import Recipe
from . import Defended, defense, run_seed
from .support import batches, batching_notes

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal distribution's std
TANH_EPSILON = 1e-7  # keeps tanh(w) / (2 + eps) + 0.5 strictly inside (0, 1), as the authors' code


@dataclass(frozen=True)
class NCParams:
    epochs: int = 80  # reverse-engineering epochs per class, at most
    batch_size: BatchSize = 256
    mask_lr: float = 0.1
    init_cost: float = 1e-3
    success_threshold: float = 0.98  # attack success an epoch needs to count as a trigger
    patience: int = 5  # epochs before the cost moves
    cost_multiplier: float = 2.0  # up by this, down by this ** 1.5
    early_stop_patience: int = 25
    early_stop_threshold: float = 0.99  # the best norm must fall below this share of its best to count
    classes_per_pass: int = 10  # classes reverse-engineered side by side (memory: batch x this images)
    anomaly_threshold: float = 2.0
    unlearn_ratio: float = 0.2  # share of every unlearning batch stamped with a reversed trigger
    unlearn_epochs: int = 100
    unlearn_lr: float = 0.01
    unlearn_batch_size: BatchSize = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True  # unlearning: random crop (padding 4) and flip where the dataset allows
    search_augment: bool = True  # trigger search on augmented images too (FORK nc.py:628)
    interpolated_median: bool = False  # FORK: torch.median, the lower middle of an even count (nc.py:388-389)
    fallback_mask: str = "first_epoch"  # a class that never succeeds: "first_epoch" (FORK nc.py:375) or "last_epoch"
    unlearn_split: str = "position"  # "position": FORK's fixed 80/20 set; "per_batch": a share of every batch
    trigger_normalisation: str = "minmax"  # "minmax": FORK's PNG round trip (nc.py:235-237); "none"

    def __post_init__(self):
        check_ranges("NC", self, {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "mask_lr": self.mask_lr > 0,
            "init_cost": self.init_cost > 0, "success_threshold": 0 < self.success_threshold <= 1,
            "patience": self.patience >= 1, "cost_multiplier": self.cost_multiplier > 1,
            "early_stop_patience": self.early_stop_patience >= 1,
            "early_stop_threshold": 0 < self.early_stop_threshold <= 1,
            "classes_per_pass": self.classes_per_pass >= 1, "anomaly_threshold": self.anomaly_threshold > 0,
            "unlearn_ratio": 0 < self.unlearn_ratio <= 1, "unlearn_epochs": self.unlearn_epochs >= 1,
            "unlearn_lr": self.unlearn_lr > 0, "unlearn_batch_size": self.unlearn_batch_size >= 1,
            "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
            "fallback_mask": self.fallback_mask in ("first_epoch", "last_epoch"),
            "unlearn_split": self.unlearn_split in ("position", "per_batch"),
            "trigger_normalisation": self.trigger_normalisation in ("minmax", "none"),
        })


def to_unit_interval(raw: torch.Tensor) -> torch.Tensor:
    return torch.tanh(raw) / (2 + TANH_EPSILON) + 0.5


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (1 - mask) * images + mask * pattern


def _median(values: torch.Tensor, interpolated: bool) -> torch.Tensor:
    return values.quantile(0.5) if interpolated else values.median()  # torch.median: the lower middle


def anomaly_indices(norms: torch.Tensor, interpolated_median: bool = False) -> tuple[torch.Tensor, float, float]:
    """(|norm - median| / (1.4826 MAD) per class, median, MAD), FORK's outlier_detection (nc.py:384-427):
    the lower median of an even count unless ``interpolated_median``; a zero MAD is not guarded, so a
    class off the median gets an infinite index and one at the median NaN (never flagged)."""
    median = _median(norms, interpolated_median)
    deviation = (norms - median).abs()
    mad = MAD_CONSISTENCY * _median(deviation, interpolated_median)
    return deviation / mad, float(median), float(mad)


def flag_classes(norms: torch.Tensor, threshold: float, interpolated_median: bool = False
                 ) -> tuple[list[int], torch.Tensor]:
    """Classes whose trigger is anomalously SMALL (norm not above the median, index > threshold), sorted
    by norm as FORK lists them (ties in class order), and every class's index."""
    index, median, _ = anomaly_indices(norms, interpolated_median)
    candidates = torch.nonzero((norms <= median) & (index > threshold)).flatten().tolist()
    values = norms.tolist()
    return sorted(candidates, key=lambda c: values[c]), index


def _min_max(values: torch.Tensor) -> torch.Tensor:
    """torchvision's ``save_image(normalize=True)`` scaling: to [0, 1] over the whole tensor."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / max(high - low, 1e-5)


def _to_png_levels(values: torch.Tensor) -> torch.Tensor:
    """The 8-bit levels ``save_image`` writes: floor(255 v + 0.5)."""
    return (values * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def trigger_terms(mask: torch.Tensor, pattern: torch.Tensor, normalisation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep (1, H, W), add (3, H, W)) with stamped = x keep + add for x in [0, 1], from a reversed mask
    (1, H, W) and pattern (3, H, W). "none": keep = 1 - m, add = m p. "minmax" is what FORK stamps when it
    unlearns (nc.py:235-237, read back at :798-814): the mask and the trigger (p m) as its PNG files hold
    them, each min-max normalised over the whole tensor and rounded to 8 bits: keep = 1 - mask level / 255,
    add = trigger level / 255, computed in float32 as FORK's numpy does."""
    if normalisation == "minmax":
        mask_levels = _to_png_levels(_min_max(mask.float())).float()
        trigger_levels = _to_png_levels(_min_max((pattern * mask).float())).float()
        return 1 - mask_levels / 255, trigger_levels / 255
    return 1 - mask.float(), (mask * pattern).float()


def stamp_pixels(images: torch.Tensor, keep: torch.Tensor, add: torch.Tensor, wrap: bool) -> torch.Tensor:
    """uint8 NHWC ``images`` stamped as ``x keep + 255 add`` in float32. ``wrap``: cast to uint8 as numpy
    does in FORK (truncation, wrap-around above 255); otherwise rounded and clipped."""
    stamped = images.float() * keep.permute(1, 2, 0) + add.permute(1, 2, 0) * 255
    if wrap:
        return (stamped.floor().long() % 256).to(torch.uint8)
    return stamped.round().clamp(0, 255).to(torch.uint8)


def fork_unlearning_set(data, keep: torch.Tensor, add: torch.Tensor, params: NCParams
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """FORK's unlearning set (nc.py:785-829): the first ``int(n (1 - ratio))`` images by position, clean,
    then the remaining ones stamped with each flagged trigger in turn (``keep``/``add`` stacked per
    trigger), all with their true labels."""
    cut = int(len(data) * (1 - params.unlearn_ratio))
    tail, wrap = data.images[cut:], params.trigger_normalisation == "minmax"
    stamped = [stamp_pixels(tail, k, a, wrap) for k, a in zip(keep, add)]
    images = torch.cat([data.images[:cut], *stamped])
    labels = torch.cat([data.labels[:cut], *[data.labels[cut:]] * len(keep)])
    return images, labels


class TriggerSearch(LoopState):
    """The state of one group's trigger search: the raw trigger variables and their optimiser, the
    per-class cost schedule, early-stopping counters and best triggers so far (what a checkpoint
    between epochs holds); ``step`` counts the epochs run."""

    def __init__(self, k: int, size: int, params: NCParams, generator: torch.Generator, device):
        super().__init__()
        self.raw_mask = torch.ones(k, 1, size, size, device=device, requires_grad=True)  # the authors' initialisation
        self.raw_pattern = torch.ones(k, 3, size, size, device=device, requires_grad=True)
        self.optimiser = torch.optim.Adam([self.raw_mask, self.raw_pattern], lr=params.mask_lr, betas=(0.5, 0.9))
        self.generator = generator
        self.cost = torch.full((k,), params.init_cost, device=device)
        self.best_mask = to_unit_interval(self.raw_mask).detach()
        self.best_pattern = to_unit_interval(self.raw_pattern).detach()
        self.first_mask, self.first_pattern = self.best_mask.clone(), self.best_pattern.clone()  # set after epoch 1
        self.best_norm, self.early_best = (torch.full((k,), float("inf"), device=device) for _ in range(2))
        self.up, self.down, self.stale = (torch.zeros(k, dtype=torch.long, device=device) for _ in range(3))
        self.moved_up, self.moved_down = (torch.zeros(k, dtype=torch.bool, device=device) for _ in range(2))
        self.active, self.epochs_run = torch.ones(k, dtype=torch.bool, device=device), torch.zeros(k, dtype=torch.long)

    def run_epoch(self, model, data, targets: torch.Tensor, params: NCParams, watch: LossWatch, epoch: int) -> None:
        k, device = len(targets), data.images.device
        raw_mask, raw_pattern, optimiser = self.raw_mask, self.raw_pattern, self.optimiser
        hits, norm_sum, steps = torch.zeros(k, device=device), torch.zeros(k, device=device), 0
        kept = (raw_mask.detach().clone(), raw_pattern.detach().clone())
        for x, _ in batches(data, params.batch_size, self.generator, augment=params.search_augment,
                            normalise=False):
            mask, pattern = to_unit_interval(raw_mask), to_unit_interval(raw_pattern)
            stamped = stamp(x[None], mask[:, None], pattern[:, None]).flatten(0, 1)  # (K * B, 3, H, W), class-major
            with autocast(device):
                logits = model(data.normalisation.normalise(stamped)).float()
            wanted = targets.repeat_interleave(len(x))
            cross_entropy = F.cross_entropy(logits, wanted, reduction="none").view(k, -1).mean(1)
            norms = mask.flatten(1).sum(1)
            objective = (cross_entropy + self.cost * norms).sum()  # classes are independent: each gets its own gradient
            watch.observe(objective, epoch)
            optimiser.zero_grad(set_to_none=True)
            objective.backward()
            optimiser.step()
            hits += (logits.argmax(1) == wanted).view(k, -1).float().sum(1).detach()
            norm_sum, steps = norm_sum + norms.detach(), steps + 1
        active = self.active
        with torch.no_grad():  # stopped classes keep their parameters, as if their run had ended
            raw_mask.copy_(torch.where(active.view(-1, 1, 1, 1), raw_mask, kept[0]))
            raw_pattern.copy_(torch.where(active.view(-1, 1, 1, 1), raw_pattern, kept[1]))
        self.epochs_run += active.cpu()
        if epoch == 0:  # FORK keeps this trigger for a class that never succeeds (nc.py:375)
            self.first_mask = to_unit_interval(raw_mask).detach().clone()
            self.first_pattern = to_unit_interval(raw_pattern).detach().clone()
        success, norm = hits / len(data), norm_sum / steps  # per class, over the epoch
        succeeded = success >= params.success_threshold
        improved = active & succeeded & (norm < self.best_norm)
        self.best_norm = torch.where(improved, norm, self.best_norm)
        self.best_mask = torch.where(improved.view(-1, 1, 1, 1), to_unit_interval(raw_mask).detach(), self.best_mask)
        self.best_pattern = torch.where(improved.view(-1, 1, 1, 1), to_unit_interval(raw_pattern).detach(),
                                        self.best_pattern)
        # Early stop: the cost has moved both ways and the best norm has not improved by 1 % for a while.
        found = torch.isfinite(self.best_norm)
        self.stale = torch.where(found & (self.best_norm >= params.early_stop_threshold * self.early_best),
                                 self.stale + 1, 0)
        self.early_best = torch.minimum(self.early_best, self.best_norm)
        self.active = active & ~(self.moved_up & self.moved_down & (self.stale >= params.early_stop_patience))
        # Cost schedule: up after `patience` successful epochs in a row, down after as many failures.
        up, down = torch.where(succeeded, self.up + 1, 0), torch.where(succeeded, 0, self.down + 1)
        raise_cost, lower_cost = self.active & (up >= params.patience), self.active & (down >= params.patience)
        cost = torch.where(raise_cost, self.cost * params.cost_multiplier, self.cost)
        self.cost = torch.where(lower_cost, cost / params.cost_multiplier ** 1.5, cost)
        self.up, self.down = torch.where(raise_cost, 0, up), torch.where(lower_cost, 0, down)
        self.moved_up, self.moved_down = self.moved_up | raise_cost, self.moved_down | lower_cost
        watch.check()


def reverse_engineer(model, data, classes: list[int], params: NCParams, generator: torch.Generator) -> dict:
    """Best masks (K, 1, H, W), patterns (K, 3, H, W), their L1 norms, success and epochs run for ``classes``."""
    search = TriggerSearch(len(classes), data.image_size, params, generator, data.images.device)
    targets = torch.tensor(classes, device=data.images.device)
    label = f"NC trigger search, classes {classes[0]}-{classes[-1]}"
    watch = LossWatch(data.images.device, lambda epoch: f"{label}, epoch {epoch + 1}")
    for epoch in checkpointed_steps(label, search, params.epochs,  # saved between epochs
                                    stop_early=lambda: not search.active.any()):
        search.run_epoch(model, data, targets, params, watch, epoch)
    never = ~torch.isfinite(search.best_norm)  # never reached the threshold: the first or the last trigger
    if params.fallback_mask == "first_epoch":
        fallback_mask, fallback_pattern = search.first_mask, search.first_pattern
    else:
        fallback_mask = to_unit_interval(search.raw_mask).detach()
        fallback_pattern = to_unit_interval(search.raw_pattern).detach()
    best_mask = torch.where(never.view(-1, 1, 1, 1), fallback_mask, search.best_mask)
    best_pattern = torch.where(never.view(-1, 1, 1, 1), fallback_pattern, search.best_pattern)
    return {"masks": best_mask, "patterns": best_pattern, "norms": best_mask.flatten(1).sum(1),
            "reached": (~never).cpu(), "epochs": search.epochs_run}


class StampReversedTriggers(BatchHook):
    """Stamps a random share of every batch with one flagged class's reversed trigger, labels unchanged
    (``unlearn_split="per_batch"``). ``keep``/``add``: per trigger, see :func:`trigger_terms`; the
    stamped images are clipped to [0, 1]."""

    def __init__(self, keep: torch.Tensor, add: torch.Tensor, ratio: float, generator: torch.Generator):
        self.keep, self.add, self.ratio, self.generator = keep, add, ratio, generator

    def transform(self, images, labels, indices):
        n, draws = len(images), self.generator.device
        chosen = torch.randperm(n, generator=self.generator, device=draws)[:max(1, round(self.ratio * n))]
        trigger = torch.randint(len(self.keep), (len(chosen),), generator=self.generator, device=draws)
        chosen, trigger = chosen.to(images.device), trigger.to(images.device)
        images = images.clone()
        images[chosen] = (images[chosen] * self.keep[trigger] + self.add[trigger]).clamp(0, 1)
        return images, labels, None


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: every class's trigger on every image, each epoch; unlearning counted as if flagged."""
    return p.epochs * m.classes * m.images + p.unlearn_epochs * m.images


@defense("nc", "NC: reverse-engineer a trigger per class, flag small-trigger outliers (MAD), unlearn them",
         NCParams, family="fine-tuning", passes=passes_per_run,
         smoke={"epochs": 1, "batch_size": 8, "unlearn_epochs": 1, "unlearn_batch_size": 8})
def neural_cleanse(model, data, params: NCParams, device):
    model = model.to(device).eval()
    n, notes = len(data), []
    if n == 0:
        return Defended(model, {"flagged_classes": [], "notes": ["no mitigation data: model returned unchanged"]})
    if n < params.batch_size:
        notes.append(f"{n} mitigation images < batch_size {params.batch_size}: "
                     "one Adam step per reverse-engineering epoch")
    generator = torch.Generator(device=data.images.device).manual_seed(run_seed())
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    groups = [list(range(data.num_classes))[i:i + params.classes_per_pass]
              for i in range(0, data.num_classes, params.classes_per_pass)]
    parts = [reverse_engineer(model, data, group, params, generator) for group in groups]
    for p in trainable:
        p.requires_grad_(True)
    masks, patterns = torch.cat([r["masks"] for r in parts]), torch.cat([r["patterns"] for r in parts])
    norms = torch.cat([r["norms"] for r in parts])
    reached = torch.cat([r["reached"] for r in parts])
    flagged, index = flag_classes(norms, params.anomaly_threshold, params.interpolated_median)
    _, median, mad = anomaly_indices(norms, params.interpolated_median)
    if not reached.all():
        which = "first" if params.fallback_mask == "first_epoch" else "last"
        notes.append(f"classes {torch.nonzero(~reached).flatten().tolist()} never reached attack success "
                     f"{params.success_threshold}: their {which} epoch's mask is used")
    details = {"mask_l1_norms": norms.tolist(), "anomaly_indices": index.tolist(), "median_norm": median, "mad": mad,
               "flagged_classes": flagged, "reverse_epochs": torch.cat([r["epochs"] for r in parts]).tolist(),
               "notes": notes}
    if not flagged:
        notes.append(f"no class flagged (anomaly index <= {params.anomaly_threshold} or norm not below the median): "
                     "model returned unchanged")
        return Defended(model, details)
    if n < 2:
        notes.append(f"classes {flagged} flagged, but {n} mitigation image cannot train BN: model returned unchanged")
        return Defended(model, details)
    terms = [trigger_terms(masks[c], patterns[c], params.trigger_normalisation) for c in flagged]
    keep, add = torch.stack([k for k, _ in terms]), torch.stack([a for _, a in terms])
    images, labels, hook = data.images, data.labels, None
    if params.unlearn_split == "position":
        images, labels = fork_unlearning_set(data, keep, add, params)
    else:
        hook = StampReversedTriggers(keep, add, params.unlearn_ratio, generator)
    notes += [f"unlearning: {note}" for note in batching_notes(len(images), params.unlearn_batch_size)]
    recipe = Recipe(epochs=params.unlearn_epochs, batch_size=params.unlearn_batch_size, lr=params.unlearn_lr,
                    momentum=params.momentum, weight_decay=params.weight_decay, schedule="cosine",
                    augment=params.augment)
    curve = train(model, images, labels, recipe, data.normalisation, run_seed(), description="NC unlearn",
                  hook=hook)
    details.update(unlearn_final_loss=curve[-1]["loss"], unlearn_final_accuracy=curve[-1]["accuracy"])
    return Defended(model, details)
