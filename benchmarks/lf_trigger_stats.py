"""LF trigger statistics on real CIFAR-10: bdsweep's generated triggers against the survey toolkit's
shipped file, in the columns of FIDELITY.md's LF table (docs/deviations.md, LF rows).

A small CNN is trained briefly on CPU as the clean model (the toolkit fits its trigger on a trained
clean model of the paper's architectures; this is a CPU stand-in). Then the default generator (the
toolkit's DeepFool + Gaussian algorithm) and, for comparison, the PGD/ideal-low-pass alternative fit
a trigger against it. For each trigger: range, mean and std (pixel units, as applied), the share of
mean-removed spectral energy within radius 1, 2 and 4 (``lf.low_frequency_energy``), mean |x' - x|
and the share of values changed on the first 64 test images, and the share of 1,000 non-target test
images the clean model then classifies as the target.

    python ../shared/datasets/materialize.py --out /tmp/lfdata --only cifar10
    python benchmarks/lf_trigger_stats.py --data /tmp/lfdata/cifar10.npz \\
        --shipped ../shared/resources/lowFrequency/cifar10_preactresnet18_0_255.npy
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bdsweep.attacks import ResourceContext, meta_of
from bdsweep.attacks.lf import REPORT_RADII, low_frequency_energy
from bdsweep.engine import Normalisation, Recipe, train
from bdsweep.models import create_model
from bdsweep.registry import ATTACKS

CIFAR10 = Normalisation((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), hflip=True)
TARGET = 0
# The PGD alternative at the budget of FIDELITY.md's earlier row (CPU-sized: 100 steps of 64 on 2,000 images).
PGD = {"algorithm": "pgd_ideal_lowpass", "steps": 100, "batch_size": 64, "images": 2000}


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        predictions = torch.cat([model(CIFAR10.apply(torch.from_numpy(images[i: i + 500]))).argmax(1)
                                 for i in range(0, len(images), 500)])
    return float((predictions.numpy() == labels).mean())


def statistics(name: str, stamp, model, probe: np.ndarray, victims: np.ndarray, applied: np.ndarray) -> dict:
    """``applied``: the whole-pixel offset the trigger adds (before clipping)."""
    stamped = stamp(probe).astype(np.int16)
    with torch.no_grad():
        fooled = model(CIFAR10.apply(torch.from_numpy(stamp(victims)))).argmax(1)
    return {"trigger": name, "range": f"{applied.min():g}-{applied.max():g}", "mean": float(applied.mean()),
            "std": float(applied.std()), **{f"E(r<={r})": low_frequency_energy(applied, r) for r in REPORT_RADII},
            "mean \\|x'-x\\|": float(np.abs(stamped - probe).mean()),
            "values changed": float((stamped != probe).mean()),
            "target rate": float((fooled == TARGET).float().mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="materialize.py's cifar10.npz")
    parser.add_argument("--shipped", required=True, help="the toolkit's cifar10_<model>_0_255.npy")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=50000, help="the clean model's training images")
    parser.add_argument("--clean-model", help="a state dict: loaded when it exists, else trained and saved there")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = np.load(args.data)
    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]

    started = time.perf_counter()
    model = create_model("small_cnn", 10, 32)
    if args.clean_model and Path(args.clean_model).is_file():
        model.load_state_dict(torch.load(args.clean_model))
    else:
        count = args.train_images
        train(model, torch.from_numpy(x_train[:count]), torch.from_numpy(y_train[:count]).long(),
              Recipe(epochs=args.epochs, lr=0.05), CIFAR10, args.seed, progress=False)
        if args.clean_model:
            torch.save(model.state_dict(), args.clean_model)
    model.eval()
    torch.set_num_threads(1)  # DeepFool works on one image at a time: threads only add overhead
    print(f"clean small_cnn: test accuracy {accuracy(model, x_test[:2000], y_test[:2000]):.3f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    attack = ATTACKS.get("lf")
    context = ResourceContext(32, 10, TARGET, args.seed, torch.device("cpu"), CIFAR10, x_train, y_train, model)
    probe, victims = x_test[:64], x_test[y_test != TARGET][:1000]
    rows = []
    shipped = attack.params(pattern=args.shipped)
    resource = attack.make_resource(context, shipped)
    rows.append(statistics(f"toolkit file {args.shipped.rsplit('/', 1)[-1]}",
                           lambda x: attack.apply_trigger(x, resource, shipped), model, probe, victims,
                           np.floor(resource["perturbation"])))
    generators = (("bdsweep default (toolkit's DeepFool + Gaussian)", {}), ("bdsweep pgd_ideal_lowpass", PGD))
    for label, overrides in generators:
        params = attack.params(**overrides)
        started = time.perf_counter()
        resource = attack.make_resource(context, params)
        seconds = time.perf_counter() - started
        search = {k: v for k, v in meta_of(resource).items() if k in ("passes", "updates", "fooling_rates",
                                                                      "deepfool_iterations")}
        print(f"{label}: {seconds:.0f} s {search}", flush=True)
        rows.append(statistics(label, lambda x, r=resource, p=params: attack.apply_trigger(x, r, p), model, probe,
                               victims, np.floor(resource["perturbation"])))

    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
