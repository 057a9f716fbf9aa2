"""Train a backdoored model on a poisoned training set; record its pre-defense metrics."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import torch

from ..atomic import atomic_path, write_json
from ..checkpoint import save_model
from ..data.store import PreparedDataset
from ..engine import Recipe, as_tensor, select_device, train
from ..evaluate import evaluate_model, load_poison, normalisation_of
from ..models import create_model
from ..params import as_dict, resolve
from ..provenance import device_name, versions


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--poison", required=True, help="poison file of the (dataset, attack, ratio)")
    parser.add_argument("--architecture", required=True)
    parser.add_argument("--recipe", default="{}", type=json.loads, help="training recipe overrides, JSON")
    parser.add_argument("--sanity", default="{}", type=json.loads, help='{"min_acc": .., "min_asr": ..}')
    parser.add_argument("--coordinates", default="{}", type=json.loads, help="grid coordinates to record")
    parser.add_argument("--target", required=True, type=int)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-model", required=True)
    parser.add_argument("--out-metrics", required=True)
    parser.add_argument("--out-curve", required=True)


def poisoned_training_set(data: PreparedDataset, poison: dict) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.array(data.x_train), np.array(data.y_train)
    images[poison["train_indices"]] = poison["train_images"]
    labels[poison["train_indices"]] = poison["train_labels"]
    return images, labels


def write_curve(path, curve: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve[0]) if curve else ["epoch"])
        writer.writeheader()
        writer.writerows(curve)


def main(args):
    device = select_device(args.device)
    torch.manual_seed(args.seed)
    data = PreparedDataset(args.data)
    poison = load_poison(args.poison)
    recipe = resolve(Recipe, args.recipe, "training")
    images, labels = poisoned_training_set(data, poison)
    model = create_model(args.architecture, data.info.num_classes, data.info.image_size).to(device)

    started = time.perf_counter()
    curve = train(model, as_tensor(images, device), as_tensor(labels, device), recipe, normalisation_of(data),
                  args.seed, description=f"train {args.architecture}")
    train_seconds = time.perf_counter() - started
    metrics = evaluate_model(model, data, poison, args.target, device)

    gates = {"min_acc": 0.0, "min_asr": 0.0, **args.sanity}
    sanity = {"acc_below_gate": metrics["acc"] < gates["min_acc"], "asr_below_gate": metrics["asr"] < gates["min_asr"]}
    meta = {**args.coordinates, "architecture": args.architecture, "num_classes": data.info.num_classes,
            "image_size": data.info.image_size, "target": args.target, "seed": args.seed,
            "recipe": as_dict(recipe), "effective_ratio": float(poison["effective_ratio"]), "versions": versions()}
    save_model(args.out_model, model, meta)
    write_curve(args.out_curve, curve)
    write_json(args.out_metrics, {**meta, "metrics": metrics, "sanity": sanity, "sanity_gates": gates,
                                  "train_seconds": train_seconds, "device": device_name(device)})
