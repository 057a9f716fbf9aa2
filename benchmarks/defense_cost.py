"""Per-run cost of every defense: seconds per run (and ACC / ASR / RA before and after) on one
CPU-sized backdoored model, so that the cost of a whole grid can be extrapolated from it.

    python benchmarks/defense_cost.py [--dataset cifar10|digits] [--train-images 5000]
        [--test-images 1000] [--architecture small_cnn] [--epochs 20] [--spc 10]
        [--defenses fp bnp ...] [--set ft.epochs=10 ...] [--device auto] [--work DIR] [--out FILE.json]

The model is built by the pipeline's own stages (prepare, pool, resource, poison, train, partition)
with BadNets at 10 %, on the first ``--train-images`` / ``--test-images`` images of CIFAR-10 from
../shared/datasets (materialised into ``--work``), or on scikit-learn's digits at 32 px when that
folder is absent or ``--dataset digits`` is given. Every defense then runs through the defend stage
at its reference defaults (``--set name.key=value`` overrides one), on the same model and the same
SPC partition, one after the other in this process. Seconds are the defense's own wall time as the
run file records it (model loading and evaluation excluded). The work directory is reused: a model
already trained there is not trained again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from bdsweep.cli import main as bdsweep  # noqa: E402
from bdsweep.registry import DEFENSES  # noqa: E402

SHARED_DATASETS = REPO.parent / "shared" / "datasets"
CIFAR10 = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261], "hflip": True}


def run(*argv: str) -> None:
    if bdsweep(list(argv)) != 0:
        raise SystemExit(f"bdsweep {' '.join(argv[:1])} failed")


def dataset_options(args, work: Path) -> dict:
    if args.dataset == "digits" or not (SHARED_DATASETS / "materialize.py").exists():
        return {"source": "digits", "image_size": 32}
    subset = work / f"cifar10_{args.train_images}_{args.test_images}.npz"
    if not subset.exists():
        subprocess.run([sys.executable, str(SHARED_DATASETS / "materialize.py"), "--out", str(work), "--only",
                        "cifar10"], check=True, capture_output=True)
        with np.load(work / "cifar10.npz") as full:
            np.savez(subset, x_train=full["x_train"][:args.train_images], y_train=full["y_train"][:args.train_images],
                     x_test=full["x_test"][:args.test_images], y_test=full["y_test"][:args.test_images])
    return {"source": "npz", "path": str(subset), **CIFAR10}


def backdoored_model(args, work: Path) -> Path:
    """Run the pipeline's stages up to a BadNets model and an SPC partition; returns the model dir."""
    data, pool, resource, poison = work / "data", work / "pool.npy", work / "badnets.npz", work / "poison.npz"
    model_dir = work / "model" / args.architecture
    if not (data / "meta.json").exists():
        run("prepare", "--name", args.dataset, "--options", json.dumps(dataset_options(args, work)), "--out", str(data))
    if not pool.exists():
        run("pool", "--data", str(data), "--per-class", str(max(args.spc, 20)), "--seed", "0", "--out", str(pool))
    if not resource.exists():
        run("resource", "--data", str(data), "--attack", "badnets", "--out", str(resource))
    if not poison.exists():
        run("poison", "--data", str(data), "--pool", str(pool), "--resource", str(resource), "--attack", "badnets",
            "--ratio", "0.1", "--target", "0", "--seed", "0", "--out", str(poison))
    if not (model_dir / "model.pt").exists():
        recipe = {"epochs": args.epochs, "batch_size": 128, "lr": 0.05}
        run("train", "--data", str(data), "--attack", "badnets", "--poison", str(poison), "--architecture",
            args.architecture, "--recipe", json.dumps(recipe), "--target", "0", "--seed", "0", "--device", args.device,
            "--coordinates", json.dumps({"dataset": args.dataset, "ratio": 0.1}),
            "--out-model", str(model_dir / "model.pt"), "--out-metrics", str(model_dir / "metrics.json"),
            "--out-curve", str(model_dir / "curve.csv"))
    partition = work / f"spc{args.spc}.npy"
    if not partition.exists():
        run("partition", "--data", str(data), "--pool", str(pool), "--spc", str(args.spc), "--seed", "0",
            "--out", str(partition))
    return model_dir


def overrides(settings: list[str]) -> dict[str, dict]:
    """``name.key=value`` (value as JSON, else a string) -> {name: {key: value}}."""
    result: dict[str, dict] = {}
    for setting in settings:
        target, _, value = setting.partition("=")
        name, _, key = target.partition(".")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        result.setdefault(name, {})[key] = parsed
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", choices=("cifar10", "digits"))
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--architecture", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of the backdoored model")
    parser.add_argument("--spc", type=int, default=10)
    parser.add_argument("--defenses", nargs="+", help="default: every implemented defense")
    parser.add_argument("--set", nargs="*", default=[], help="hyperparameter overrides, name.key=value")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:0, ...")
    parser.add_argument("--work", default="/tmp/bdsweep-defense-cost")
    parser.add_argument("--out", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = backdoored_model(args, work)
    names = args.defenses or DEFENSES.names()
    params = overrides(args.set)
    rows = []
    for name in names:
        out = work / "runs" / f"{name}.json"
        argv = ["defend", "--model", str(model_dir / "model.pt"), "--model-metrics", str(model_dir / "metrics.json"),
                "--data", str(work / "data"), "--backdoor", str(work / "poison.npz"), "--defense", name,
                "--params", json.dumps(params.get(name, {})), "--device", args.device, "--out", str(out),
                "--coordinates", json.dumps({"spc": args.spc, "seed": 0})]
        if DEFENSES.get(name).needs_data:
            argv += ["--partition", str(work / f"spc{args.spc}.npy")]
        run(*argv)
        record = json.loads(out.read_text())
        rows.append({"defense": name, "family": record["family"], "status": record["status"],
                     "seconds": record["wall_time_s"], "pre": record["pre"], "post": record["post"],
                     "hyperparameters": record["hyperparameters"], "reason": record["reason"]})
        print_row(rows[-1])
    if args.out:
        Path(args.out).write_text(json.dumps({"setup": vars(args), "rows": rows}, indent=1))


def print_row(row: dict) -> None:
    def pct(metrics, key):
        return "   -" if metrics is None or metrics[key] is None else f"{100 * metrics[key]:4.1f}"

    pre, post = row["pre"], row["post"]
    changes = "   ".join(f"{key.upper()} {pct(pre, key)} -> {pct(post, key)}" for key in ("acc", "asr", "ra"))
    print(f"{row['defense']:8} {row['family']:12} {row['seconds']:8.1f} s   {changes}   {row['status']}", flush=True)


if __name__ == "__main__":
    main()
