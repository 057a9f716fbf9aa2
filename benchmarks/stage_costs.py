"""Training throughput per (architecture, image size) for the cost model (``bdsweep cost``).

    python benchmarks/stage_costs.py --device cuda --out FILE [--name h100] [--architectures ...]
        [--sizes 32 64] [--images 4096] [--batch-size 128] [--epochs 2] [--repeats 2]
    python benchmarks/stage_costs.py --estimate-tflops 989 [--utilisation 0.15] [--op-overhead-us 10]
        --name h100 --out FILE

Measuring: the real engine (``engine.train``: uint8 images on the device, augmentation there, SGD,
bf16 autocast and channels-last on CUDA) trains each architecture on random images of each size
(10 classes); one untimed warm-up epoch, then ``--epochs`` epochs timed ``--repeats`` times, best
kept. The result, training images per second, is written under ``devices.<name>`` of ``--out``
(other devices already in that file are kept), which ``bdsweep cost --throughput FILE --device
NAME`` reads. Run it once on the cluster's GPU type.

Estimating (``--estimate-tflops``, no timing): a batch takes its compute, 3 x the forward FLOPs
(counted here by torch's FlopCounterMode) at ``--utilisation`` x the peak, plus a fixed
``--op-overhead-us`` per operator dispatched (3 x those of a forward, counted here): what bounds
depthwise networks at 32 px, whose FLOPs alone would promise millions of images per second. The
entry is marked ``measured: false``. This is how the shipped GPU numbers were made, before any GPU was measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from bdsweep.atomic import atomic_path  # noqa: E402
from bdsweep.engine import Normalisation, select_device, train  # noqa: E402
from bdsweep.models import create_model  # noqa: E402
from bdsweep.recipe import Recipe

ARCHITECTURES = ("small_cnn", "preact_resnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large")
CLASSES = 10
NORMALISATION = Normalisation(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), hflip=True)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_rate(architecture: str, size: int, args, device: torch.device) -> float:
    """Training images per second of the engine: best of ``repeats`` timed runs."""
    torch.manual_seed(0)
    model = create_model(architecture, CLASSES, size).to(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, size, size, 3), dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, CLASSES, (args.images,), generator=generator).to(device)

    def run(epochs: int) -> None:
        recipe = Recipe(epochs=epochs, batch_size=args.batch_size)
        train(model, images, labels, recipe, NORMALISATION, seed=0, progress=False)

    clock = time.process_time if args.cpu_time else time.perf_counter
    run(1)  # warm-up: allocator, cuDNN autotuning, first-touch pages
    best = float("inf")
    for _ in range(args.repeats):
        synchronise(device)
        started = clock()
        run(args.epochs)
        synchronise(device)
        best = min(best, clock() - started)
    return args.images * args.epochs / best


def forward_flops(architecture: str, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(architecture, CLASSES, size).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(2, 3, size, size))
    return counter.get_total_flops() // 2


def forward_ops(architecture: str, size: int) -> int:
    """Operators one forward pass dispatches: each costs a launch whatever the batch size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    model = create_model(architecture, CLASSES, size).eval()
    with Count(), torch.no_grad():
        model(torch.zeros(2, 3, size, size))
    return Count.ops


def estimated_rate(architecture: str, size: int, args) -> float:
    """Compute time of a batch at the assumed utilisation, plus a fixed cost per dispatched operator
    (a training step dispatches about 3 x the forward's: forward, backward, optimiser)."""
    compute = args.batch_size * 3 * forward_flops(architecture, size) / (args.utilisation * args.estimate_tflops * 1e12)
    launches = 3 * forward_ops(architecture, size) * args.op_overhead_us * 1e-6
    return args.batch_size / (compute + launches)


def significant(value: float, digits: int = 2) -> float:
    """Round to ``digits`` significant figures: the numbers are not more precise than that."""
    return float(f"{value:.{digits}g}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--name", help="the device's name in the file (default: cpu, or the GPU's name)")
    parser.add_argument("--out", required=True, help="throughput YAML to create or update")
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the best is kept")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU only: time by the process's CPU time, not wall time (a shared machine; 1 thread)")
    parser.add_argument("--estimate-tflops", type=float, help="estimate from FLOPs at this peak, no timing")
    parser.add_argument("--utilisation", type=float, default=0.1, help="share of the peak an estimate assumes")
    parser.add_argument("--op-overhead-us", type=float, default=10.0,
                        help="an estimate's fixed cost per dispatched operator (eager PyTorch: about 10 us)")
    parser.add_argument("--note", default="", help="free text stored with the entry")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    if args.cpu_time and (device.type != "cpu" or args.threads != 1):
        parser.error("--cpu-time needs --device cpu --threads 1 (CPU time of one thread is its work)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.estimate_tflops:
        name = args.name or "estimate"
        note = (f"ESTIMATE, not measured: per batch of {args.batch_size}, 3 x forward FLOPs at {args.utilisation:g} x "
                f"{args.estimate_tflops:g} peak TFLOP/s, plus {args.op_overhead_us:g} us per dispatched operator "
                f"(3 x a forward's). {args.note}").strip()
    else:
        name = args.name or (torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu")
        note = (f"measured by benchmarks/stage_costs.py on {platform.node() or 'this machine'}, {os.cpu_count()} "
                f"CPUs, {torch.get_num_threads()} torch threads, batch {args.batch_size}"
                f"{', timed by CPU time' if args.cpu_time else ''}. {args.note}").strip()
    rates: dict[str, dict[int, float]] = {}
    for architecture in args.architectures:
        for size in args.sizes:
            rate = (estimated_rate(architecture, size, args) if args.estimate_tflops
                    else measured_rate(architecture, size, args, device))
            rates.setdefault(architecture, {})[size] = significant(rate)
            print(f"{name}: {architecture:20} {size:3d} px  {rate:12,.1f} training images/s", flush=True)
    out = Path(args.out)
    content = yaml.safe_load(out.read_text()) if out.exists() else None
    content = content or {"devices": {}}
    entry = content["devices"].setdefault(name, {})
    entry.update(measured=not args.estimate_tflops, note=note, date=datetime.date.today().isoformat())
    for architecture, by_size in rates.items():
        entry.setdefault("images_per_s", {}).setdefault(architecture, {}).update(by_size)
    with atomic_path(out) as tmp:
        tmp.write_text(yaml.safe_dump(content, sort_keys=False, width=100))


if __name__ == "__main__":
    main()
