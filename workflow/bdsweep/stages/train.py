"""Train a model of one (dataset, architecture, attack, ratio) and record its pre-defense metrics.

Three cases: a data-poisoning attack trains on the poisoned training set of the poison stage; a
training-time attack poisons inside the training loop through its hook and then writes its
backdoor test set next to the model; attack ``clean`` trains on clean data (the "no attack"
model, also the model LF's trigger is computed against)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from ..atomic import REMAKE, atomic_path, read_npy, write_json, write_npz
from ..attacks import HookContext, apply_in_batches, is_training_time
from ..checkpoints import Checkpoint, fingerprint
from ..data.store import PreparedDataset
from ..engine import as_tensor, precision, select_device, train
from ..evaluate import evaluate_model, load_poison, normalisation_of
from ..layout import CLEAN
from ..model_file import save_model
from ..models import create_model
from ..params import as_dict, resolve
from ..poison import backdoor_test_indices
from ..provenance import device_name, versions
from ..recipe import EngineOptions, Recipe
from ..registry import ATTACKS


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--attack", required=True, help=f"an attack name, or {CLEAN!r} for a clean model")
    parser.add_argument("--poison", help="poison file of a data-poisoning attack")
    parser.add_argument("--attack-params", default="{}", type=json.loads,
                        help="hyperparameters of a training-time attack, JSON")
    parser.add_argument("--ratio", type=float, default=0.0, help="poisoning ratio of a training-time attack")
    parser.add_argument("--pool", help="reserved mitigation pool, never poisoned by a training-time attack "
                        "(mitigation.source: reserved_pool; default: any training image may be)")
    parser.add_argument("--architecture", required=True)
    parser.add_argument("--recipe", default="{}", type=json.loads, help="training recipe overrides, JSON")
    parser.add_argument("--sanity", default="{}", type=json.loads, help='{"min_acc": .., "min_asr": ..}')
    parser.add_argument("--coordinates", default="{}", type=json.loads, help="grid coordinates to record")
    parser.add_argument("--target", required=True, type=int)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="{}", type=json.loads,
                        help="engine options (bdsweep.engine.EngineOptions), JSON")
    parser.add_argument("--checkpoint", help="training checkpoint (default: beside --out-model, as .ckpt)")
    parser.add_argument("--out-model", required=True)
    parser.add_argument("--out-metrics", required=True)
    parser.add_argument("--out-curve", required=True)
    parser.add_argument("--out-backdoor", help="backdoor test set written by a training-time attack")


def poisoned_training_set(data: PreparedDataset, poison: dict, path: str = "poison") -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.array(data.x_train), np.array(data.y_train)
    for key, bound in (("train_labels", data.info.num_classes), ("train_indices", len(labels))):
        if poison[key].size and poison[key].max() >= bound:  # load_poison checked dtypes and signs
            raise ValueError(f"poison file {path}: {key} reach {poison[key].max()}, beyond {bound - 1} of dataset "
                             f"{data.info.name!r}; {REMAKE}")
    images[poison["train_indices"]] = poison["train_images"]
    labels[poison["train_indices"]] = poison["train_labels"]
    return images, labels


def write_curve(path, curve: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve[0]) if curve else ["epoch"])
        writer.writeheader()
        writer.writerows(curve)


def sanity_flags(metrics: dict, gates: dict) -> dict:
    """Which gates the model fails; None where a gate does not apply (ASR of a clean model)."""
    asr = metrics["asr"]
    return {"acc_below_gate": metrics["acc"] < gates["min_acc"],
            "asr_below_gate": None if asr is None else asr < gates["min_asr"]}


def training_checkpoint(args, options: EngineOptions) -> Checkpoint:
    """The job's checkpoint, tied to everything its training depends on: the arguments (not where
    outputs go, the device or engine options) and the input files."""
    path = Path(args.checkpoint) if args.checkpoint else Path(args.out_model).with_suffix(".ckpt")
    arguments = {key: value for key, value in vars(args).items()
                 if not key.startswith("out_") and key not in ("device", "engine", "checkpoint", "handler")}
    inputs = [Path(args.data) / "meta.json", *(path for path in (args.poison, args.pool) if path)]
    return Checkpoint(path, fingerprint(arguments, inputs), options.checkpoint_every)


def main(args):
    options = resolve(EngineOptions, args.engine, "engine")
    with precision(options.precision):  # IAB's mask pre-training and the evaluation too, not only training
        train_stage(args, options)


def train_stage(args, options: EngineOptions):
    device = select_device(args.device)
    torch.manual_seed(args.seed)
    data = PreparedDataset(args.data)
    recipe = resolve(Recipe, args.recipe, "training")
    checkpoint = training_checkpoint(args, options)
    attack = None if args.attack == CLEAN else ATTACKS.get(args.attack)
    in_the_loop = attack is not None and is_training_time(attack)
    hook = poison = None
    if in_the_loop and not args.out_backdoor:
        raise ValueError(f"training-time attack {args.attack!r} needs --out-backdoor")
    if attack is None or in_the_loop:
        images, labels = np.array(data.x_train), np.array(data.y_train)
    elif args.poison:
        poison = load_poison(args.poison)
        images, labels = poisoned_training_set(data, poison, args.poison)
    else:
        raise ValueError(f"data-poisoning attack {args.attack!r} needs --poison")
    images, labels = as_tensor(images, device), as_tensor(labels, device)
    if in_the_loop:
        # Any image of a batch, as FORK's in-the-loop attacks take the first of every shuffled batch;
        # with a reserved pool, never its images.
        poisonable = torch.ones(len(labels), dtype=torch.bool, device=device)
        if args.pool:
            poisonable[as_tensor(read_npy(args.pool, "mitigation pool"), device)] = False
        context = HookContext(images, labels, poisonable, normalisation_of(data), data.info.num_classes,
                              data.info.image_size, args.target, args.ratio, args.seed)
        hook = attack.make_hook(context, resolve(attack.params, args.attack_params, f"attack {args.attack!r}"))
        recipe = hook.training_recipe(recipe)
    model = create_model(args.architecture, data.info.num_classes, data.info.image_size).to(device)

    curve = train(model, images, labels, recipe, normalisation_of(data), args.seed,
                  description=f"train {args.architecture} {args.attack}", hook=hook, options=options,
                  checkpoint=checkpoint)
    train_seconds = sum(row["seconds"] for row in curve)
    del images, labels
    if hook is not None:
        test_indices = backdoor_test_indices(data.y_test, args.target)
        poison = {"test_indices": test_indices,
                  "test_images": apply_in_batches(np.asarray(data.x_test[test_indices]), hook.trigger, device,
                                                  rounding=hook.rounding)}
        write_npz(args.out_backdoor, **poison, **{f"trigger.{k}": v for k, v in hook.state().items()})
    metrics = evaluate_model(model, data, poison, args.target, device)

    gates = {"min_acc": 0.0, "min_asr": 0.0, **args.sanity}
    effective_ratio = (0.0 if attack is None else hook.effective_ratio if hook is not None
                       else float(poison["effective_ratio"]))
    meta = {**args.coordinates, "architecture": args.architecture, "num_classes": data.info.num_classes,
            "image_size": data.info.image_size, "attack": args.attack,
            "attack_type": None if attack is None else attack.trigger_type, "target": args.target, "seed": args.seed,
            "recipe": as_dict(recipe), "effective_ratio": effective_ratio, "versions": versions()}
    save_model(args.out_model, model, meta)
    write_curve(args.out_curve, curve)
    write_json(args.out_metrics, {**meta, "metrics": metrics, "sanity": sanity_flags(metrics, gates),
                                  "sanity_gates": gates, "train_seconds": train_seconds, "device": device_name(device)})
    checkpoint.remove()  # every output is written: the checkpoint has served its purpose
