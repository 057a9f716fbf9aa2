"""Training throughput: the engine (uint8 images kept on the device, whole batches augmented there)
vs the standard torchvision recipe (a Dataset whose per-image PIL transform crops, flips, converts
and normalises, fed through a DataLoader). Same model, same initial weights, same SGD recipe.
Reports images per second and seconds per epoch for both, and their ratio.

    python benchmarks/engine_throughput.py [--model small_cnn] [--width 8 32] [--images 4096] [--size 32]
        [--epochs 2] [--repeats 3] [--workers 2] [--device auto|cpu|cuda] [--out FILE.json]

Data are synthetic random uint8 images (10 classes), so no dataset is needed. Each pipeline trains
one untimed warm-up epoch, then ``--epochs`` epochs are timed ``--repeats`` times and the best is kept.
``--workers`` may list several DataLoader worker counts (e.g. ``--workers 0 2``); each is timed and
the fastest is the comparison. Workers are not persistent, as in the standard recipe, so each epoch
pays their start-up. Torch's thread count is left at its default: on the 2-core CPU machine the
DataLoader's worker processes compete with the training threads for the cores, which is part of
the reference's real cost there. On CUDA the engine also uses its own speed settings (bf16
autocast, channels-last), which the plain reference loop does not, so the ratio there includes them.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from bdsweep.engine import Normalisation, augment_batch, select_device, train  # noqa: E402
from bdsweep.models import create_model  # noqa: E402
from bdsweep.models.small_cnn import SmallCNN  # noqa: E402
from bdsweep.recipe import Recipe

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's
BATCH_SIZE, LR, MOMENTUM, WEIGHT_DECAY, PADDING = 128, 0.01, 0.9, 5e-4, 4
NUM_CLASSES = 10


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def train_reference(model, loader, epochs: int, device: torch.device) -> None:
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        scheduler.step()


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(train_epochs, epochs: int, repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` runs of ``epochs`` epochs, after one untimed warm-up epoch
    (which pays for allocator growth, cuDNN autotuning and first-touch page faults)."""
    train_epochs(1)
    best = float("inf")
    for _ in range(repeats):
        synchronise(device)
        started = time.perf_counter()
        train_epochs(epochs)
        synchronise(device)  # kernels are asynchronous on CUDA: wait before reading the clock
        best = min(best, time.perf_counter() - started)
    return best


def input_pipelines_alone(args, images: np.ndarray, labels: np.ndarray, device: torch.device) -> dict:
    """Images per second of the input pipelines without a model: how much of the gap is data."""
    normalisation = Normalisation(mean=MEAN, std=STD, hflip=True)
    device_images = torch.from_numpy(images).to(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def ours(epochs):
        for _ in range(epochs):
            order = torch.randperm(len(labels), device=device, generator=generator)
            for start in range(0, len(labels), BATCH_SIZE):
                batch = device_images[order[start:start + BATCH_SIZE]].permute(0, 3, 1, 2)
                normalisation.normalise(augment_batch(batch, PADDING, True, generator).float().div_(255.0))

    rates = {"ours": len(labels) * args.epochs / best_seconds(ours, args.epochs, args.repeats, device)}
    for workers in args.workers:
        loader = torch.utils.data.DataLoader(PILDataset(images, labels, reference_transform(args.size)),
                                             batch_size=BATCH_SIZE, shuffle=True, num_workers=workers)

        run = functools.partial(load_batches, loader, device=device)
        rates[f"reference W={workers}"] = len(labels) * args.epochs / best_seconds(run, args.epochs,
                                                                                  args.repeats, device)
    return rates


def load_batches(loader, epochs: int, device: torch.device) -> None:
    for _ in range(epochs):
        for x, _ in loader:
            x.to(device, non_blocking=True)


def reference_transform(size: int):
    return transforms.Compose([transforms.RandomCrop(size, padding=PADDING), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def make_model(name: str, width: int | None, size: int) -> torch.nn.Module:
    if name == "small_cnn":
        return SmallCNN(NUM_CLASSES, size, width=width)
    return create_model(name, NUM_CLASSES, size)


def measure(args, name: str, width: int | None, images: np.ndarray, labels: np.ndarray,
            device: torch.device) -> dict:
    torch.manual_seed(0)
    initial = make_model(name, width, args.size).to(device)  # both pipelines start from these weights

    def throughput(seconds: float) -> dict:
        return {"images_per_s": len(labels) * args.epochs / seconds, "seconds_per_epoch": seconds / args.epochs}

    ours_model = copy.deepcopy(initial)
    device_images, device_labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    normalisation = Normalisation(mean=MEAN, std=STD, hflip=True)

    def ours(epochs):
        recipe = Recipe(epochs=epochs, batch_size=BATCH_SIZE, lr=LR)
        train(ours_model, device_images, device_labels, recipe, normalisation, 0, description="ours", progress=False)

    row = {"model": name, "width": width}
    row["ours"] = throughput(best_seconds(ours, args.epochs, args.repeats, device))

    dataset = PILDataset(images, labels, reference_transform(args.size))
    row["reference"] = {}
    for workers in args.workers:
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers,
                                             drop_last=False, pin_memory=device.type == "cuda")
        run = functools.partial(train_reference, copy.deepcopy(initial), loader, device=device)
        row["reference"][workers] = throughput(best_seconds(run, args.epochs, args.repeats, device))
    row["best_workers"] = max(row["reference"], key=lambda w: row["reference"][w]["images_per_s"])
    row["ratio"] = row["ours"]["images_per_s"] / row["reference"][row["best_workers"]]["images_per_s"]
    return row


def print_table(rows: list[dict], workers: list[int]) -> None:
    header = f"{'model':20} {'ours img/s':>11} {'ours s/ep':>10}"
    header += "".join(f" {f'ref W={w} img/s':>15}" for w in workers)
    print(header + f" {'best ref s/ep':>14} {'ratio':>7}")
    for row in rows:
        best = row["reference"][row["best_workers"]]
        label = row["model"] + (f" w{row['width']}" if row["width"] is not None else "")
        line = f"{label:20} {row['ours']['images_per_s']:11.0f} {row['ours']['seconds_per_epoch']:10.2f}"
        line += "".join(f" {row['reference'][w]['images_per_s']:15.0f}" for w in workers)
        print(line + f" {best['seconds_per_epoch']:14.2f} {row['ratio']:6.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn", help="an architecture name, e.g. preact_resnet18")
    parser.add_argument("--width", type=int, nargs="+", default=[8, 32], help="small_cnn widths, one row each")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="DataLoader worker counts to time")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", help="also write the results as JSON")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=args.images, dtype=np.int64)
    widths = args.width if args.model == "small_cnn" else [None]
    rows = [measure(args, args.model, width, images, labels, device) for width in widths]
    print(f"device {device}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"{args.images} images of {args.size} px, best of {args.repeats} x {args.epochs} epochs")
    print_table(rows, args.workers)
    pipelines = input_pipelines_alone(args, images, labels, device)
    print("input pipeline alone (no model), images/s: "
          + ", ".join(f"{name} {rate:,.0f}" for name, rate in pipelines.items()))
    if args.out:
        setup = {key: getattr(args, key) for key in ("images", "size", "epochs", "repeats", "workers")}
        Path(args.out).write_text(json.dumps({"device": str(device), "cpus": os.cpu_count(),
                                              "torch_threads": torch.get_num_threads(), **setup, "rows": rows,
                                              "input_pipelines_alone": pipelines},
                                             indent=2))


if __name__ == "__main__":
    main()
