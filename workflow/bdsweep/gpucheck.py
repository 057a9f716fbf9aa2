"""``bdsweep gpu-check``: one command, one time budget, one report of what a GPU does with bdsweep.

    bdsweep gpu-check --out DIR [--budget 480] [--device auto] [--datasets DIR] [--tiny]

Sections, each written to ``DIR/report.json`` and ``DIR/report.md`` (atomically) as soon as it
finishes, so a run cut short still leaves every finished section:

1. ``environment``: device, driver, torch/CUDA/cuDNN versions, free memory at the start.
2. ``data``: CIFAR-10 from the shared datasets (``materialize.py``) when found, else random images of
   its shape; then the pipeline's own stages (prepare, pool, BadNets resource, poison, partitions).
3. ``speed``: training images/s and s/epoch of the architecture on the full training set at the
   paper recipe, through ``engine.train``: fp32 and bf16, channels-last and ``torch.compile`` on and
   off; beside it the plain torchvision pipeline (per-image PIL transforms, a DataLoader) as the
   reference, and each configuration's ratio to the reference of its precision.
4. ``throughput``: training images/s per (architecture, image size) of the paper grid in the format
   of ``throughput.yaml`` (``DIR/throughput.yaml``), measured where the budget allows, else the
   shipped figure scaled by the measured/shipped ratio of the first measured entry (marked so).
5. ``cost``: the paper grid's GPU hours with the shipped throughputs and with the measured ones.
6. ``model``: a BadNets 10 % model trained at the paper recipe for as many epochs as fit; ACC, ASR,
   RA beside SPEC section 8's no-defense row.
7. ``defenses``: every registered defense once on that model at SPC 10 with the paper preset's
   parameters, its epoch-like parameters scaled down to fit its share of the budget: status,
   seconds, peak memory, ACC/ASR/RA after; a failure is recorded with its traceback.
8. ``packing``: the same 8 short runs through ``defend-model`` with 1 and with N workers.

The budget is respected by measuring instead of guessing: each section gets a share of the time
left, and every epoch count, timed image count and capped defense schedule is derived from rates
measured earlier in the same run. ``--tiny`` runs the same code on a small CNN and a few hundred
random images (the CPU test, ``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_path, read_json, write_json

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parents[1]
PAPER_PRESET = PACKAGE.parent / "presets" / "paper.yaml"
DATASET = "cifar10"  # the paper preset's key: its by_dataset entries apply
CIFAR10_NORMALISATION = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261], "hflip": True}
# SPEC section 8 (/work/shared/SPEC.md): PreAct-ResNet18, CIFAR-10, BadNets 10 %, no defense, 100 epochs.
SPEC_NO_DEFENSE = {"attack": "badnets", "ratio": 0.1, "acc": 0.913, "asr": 0.950, "ra": 0.047, "epochs": 100}
EPOCH_LIKE = ("rounds", "iterations")  # besides every field with "epochs" in its name (as tests/test_cost.py)
SECTIONS = ("environment", "data", "speed", "throughput", "cost", "model", "defenses", "packing")
# Shares of the time left when a section starts (sections without a weight take what they need: seconds).
WEIGHTS = {"speed": 0.25, "throughput": 0.07, "model": 0.28, "defenses": 0.28, "packing": 0.12}
PACK_RUNS = 8


@dataclass(frozen=True)
class Setup:
    """What the full check and ``--tiny`` differ in: sizes only, never the code they run."""

    architecture: str
    image_size: int
    train_images: int
    test_images: int
    pool_per_class: int
    max_epochs: int  # of the reference model (the paper's 100)
    loader_workers: int  # DataLoader workers of the reference pipeline
    pack_workers: int
    compile_seconds: float  # what one torch.compile is assumed to cost before one was measured
    measured_architectures: tuple[str, ...] | None  # None: every architecture of the paper preset
    least_work: bool = False  # every measurement at its least (2 batches, 1 epoch), the budget only a guard
    classes: int = 10
    spc: int = 10
    batch_size: int = 128


FULL = Setup("preact_resnet18", 32, 50_000, 10_000, 150, 100, min(8, os.cpu_count() or 1), 4, 60.0, None)
# --tiny: one packing worker (each worker process starts its own Python and torch: tens of seconds on
# a busy 2-core CPU); --pack-workers 2 takes the worker-process path too.
TINY = Setup("small_cnn", 32, 640, 200, 20, 1, 1, 1, 60.0, ("small_cnn",), least_work=True, batch_size=64)


def add_parser(commands) -> None:
    """Register the ``gpu-check`` subcommand (torch is imported only when it runs)."""
    parser = commands.add_parser("gpu-check", help="one-command GPU acceptance check: speed, a reference model, "
                                 "every defense, packing, measured throughputs (report: JSON + Markdown)")
    parser.add_argument("--out", required=True, help="report directory (report.json, report.md, throughput.yaml)")
    parser.add_argument("--budget", type=float, help="seconds the whole check may take (default 480; --tiny, "
                        "where every measurement is at its least and the budget only a guard: 180)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:1, cpu")
    parser.add_argument("--tiny", action="store_true", help="small CNN, a few hundred random images: the CPU test")
    parser.add_argument("--datasets", help="folder with materialize.py and the CIFAR-10 archive "
                        "(default: ../shared/datasets, else shared/datasets, beside/inside the repository)")
    parser.add_argument("--cifar10", help="an already materialised cifar10.npz (x_train, y_train, x_test, y_test)")
    parser.add_argument("--work", help="scratch folder for data, model and runs (default: a folder in /tmp)")
    parser.add_argument("--defenses", nargs="+", help="only these defenses (default: every registered one)")
    parser.add_argument("--pack-defense", default="ft", help="the defense of the packing runs (default: ft)")
    parser.add_argument("--pack-workers", type=int, help="workers of the packed run (default 4; --tiny: 1)")
    parser.add_argument("--throughput-name", default="measured", help="the device's name in throughput.yaml")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile configurations")
    parser.set_defaults(handler=main)


# ---------------------------------------------------------------------------------------------- report


def _finite(value):
    """JSON without NaN/inf (write_json refuses them): None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Report:
    """report.json and report.md, rewritten (atomically) after every section and every defense."""

    def __init__(self, out: Path, header: dict):
        self.out = out
        self.data = {**header, "sections": {}}
        self.write()

    def put(self, name: str, content: dict) -> None:
        self.data["sections"][name] = content
        self.write()

    def write(self) -> None:
        self.data["updated"] = _now()
        write_json(self.out / "report.json", _finite(self.data))
        with atomic_path(self.out / "report.md") as tmp:
            tmp.write_text(markdown(self.data))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Budget:
    """The time left, shared out between the sections still to come by their weights."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, time.perf_counter()
        self.pending = [name for name in SECTIONS if name in WEIGHTS]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def deadline(self, section: str) -> float:
        """perf_counter() time by which ``section`` should end."""
        weights = sum(WEIGHTS[name] for name in self.pending)
        share = WEIGHTS[section] / weights if weights else 1.0
        if section in self.pending:
            self.pending.remove(section)
        return time.perf_counter() + max(0.0, self.left()) * share


def run_section(report: Report, name: str, work: Callable[[dict], None], budget: Budget) -> dict:
    """Run one section; its failure is recorded with the traceback and never stops the check.
    ``work`` fills the dict it is given (written even when it fails halfway)."""
    content: dict = {"status": "running", "started_at_s": round(budget.elapsed(), 1)}
    report.put(name, content)
    started = time.perf_counter()
    try:
        work(content)
        content["status"] = content.get("status") if content.get("status") != "running" else "ok"
    except Exception as error:  # the check goes on: a report with the reason is its purpose
        content.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    content["seconds"] = round(time.perf_counter() - started, 2)
    report.put(name, content)
    print(f"gpu-check: {name}: {content['status']} in {content['seconds']:.1f} s "
          f"(elapsed {budget.elapsed():.0f} of {budget.seconds:.0f} s)", flush=True)
    return content


# ---------------------------------------------------------------------------------------------- helpers


def stage(*argv: str) -> None:
    """Run a bdsweep stage in this process (exceptions propagate, unlike ``cli.main``)."""
    from .cli import build_parser

    args = build_parser(argv[0]).parse_args(list(argv))
    args.handler(args)


def synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def precision(name: str):
    """bf16: the engine as it is (bf16 autocast on CUDA). fp32: the engine with autocast off, by
    swapping ``engine.autocast`` for the measurement (the engine has no switch for it)."""
    from . import engine

    if name == "bf16":
        yield
        return
    original = engine.autocast
    engine.autocast = lambda device: nullcontext()
    try:
        yield
    finally:
        engine.autocast = original


def paper_preset() -> dict:
    from .config import read_config

    return read_config(PAPER_PRESET)


def paper_recipe(preset: dict, architecture: str, **changes):
    from .config import method_params
    from .params import resolve
    from .recipe import Recipe

    recipe = resolve(Recipe, method_params(preset.get("training"), DATASET, architecture), "training")
    return dataclasses.replace(recipe, **changes)


def gib(value: float | None) -> float | None:
    return None if value is None else round(value / 2**30, 3)


# ---------------------------------------------------------------------------------------------- 1. environment


def driver_version() -> str | None:
    try:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20, check=True)
        return answer.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def host_memory_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def environment(content: dict, device) -> None:
    import torch

    from .provenance import device_name, versions

    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    content.update(device=device_name(device), device_type=device.type, versions=versions(),
                   torch_cuda=torch.version.cuda, cudnn=cudnn,
                   host=platform.node(), cpus=os.cpu_count(), host_memory_available_gib=gib(host_memory_available()))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        properties = torch.cuda.get_device_properties(device)
        content.update(driver=driver_version(), gpu_memory_free_gib=gib(free), gpu_memory_total_gib=gib(total),
                       compute_capability=f"{properties.major}.{properties.minor}",
                       multiprocessors=properties.multi_processor_count,
                       tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)


# ---------------------------------------------------------------------------------------------- 2. data


def shared_datasets(option: str | None) -> Path | None:
    candidates = [Path(option)] if option else [REPO.parent / "shared" / "datasets", REPO / "shared" / "datasets"]
    return next((path for path in candidates if (path / "materialize.py").exists()), None)


def random_images(setup: Setup, path: Path) -> None:
    import numpy as np

    from .atomic import write_npz

    rng = np.random.default_rng(0)
    shape = (setup.image_size, setup.image_size, 3)
    write_npz(path, x_train=rng.integers(0, 256, (setup.train_images, *shape), dtype=np.uint8),
              y_train=np.arange(setup.train_images, dtype=np.int64) % setup.classes,
              x_test=rng.integers(0, 256, (setup.test_images, *shape), dtype=np.uint8),
              y_test=np.arange(setup.test_images, dtype=np.int64) % setup.classes)


def decode_cifar10(archive: Path, out: Path) -> None:
    """The shared folder's JPEG archive (train/test_jpeg bytes, *_offsets, *_y) decoded to uint8 arrays."""
    import io

    import numpy as np
    from PIL import Image

    from .atomic import write_npz

    if out.exists():
        return
    with np.load(archive) as packed:
        arrays = {}
        for split in ("train", "test"):
            buffer, offsets = packed[f"{split}_jpeg"], packed[f"{split}_offsets"]
            arrays[f"x_{split}"] = np.stack([np.asarray(Image.open(io.BytesIO(buffer[a:b].tobytes())).convert("RGB"))
                                             for a, b in zip(offsets[:-1], offsets[1:])])
            arrays[f"y_{split}"] = packed[f"{split}_y"].astype(np.int64)
    write_npz(out, **arrays)


def source_images(args, setup: Setup, work: Path, content: dict) -> Path:
    """CIFAR-10 as an .npz: given, materialised from the shared datasets, or random images of its shape."""
    if not args.tiny:
        if args.cifar10:
            content["source"] = f"CIFAR-10 from {args.cifar10}"
            return Path(args.cifar10)
        folder = shared_datasets(args.datasets)
        if folder is not None:
            try:
                if not (work / "cifar10.npz").exists():
                    subprocess.run([sys.executable, str(folder / "materialize.py"), "--out", str(work), "--only",
                                    "cifar10"], check=True, capture_output=True, text=True, timeout=600)
                content["source"] = f"CIFAR-10 (JPEG-75 copy) materialised from {folder}"
                return work / "cifar10.npz"
            except (OSError, subprocess.SubprocessError) as error:
                detail = getattr(error, "stderr", "") or ""
                content["materialize_error"] = f"{type(error).__name__}: {error} {detail[-2000:]}".strip()
            try:  # e.g. another libjpeg than materialize.py's digests were recorded with: pixels may differ by a level
                decode_cifar10(folder / "cifar10_jpeg_all.npz", work / "cifar10_decoded.npz")
                content["source"] = f"CIFAR-10 (JPEG-75 copy) decoded here from {folder}, without the digest check"
                return work / "cifar10_decoded.npz"
            except Exception as error:
                content["decode_error"] = f"{type(error).__name__}: {error}"
        content.setdefault("notes", []).append("no CIFAR-10 copy found or usable: random images of its shape "
                                               "(ACC/ASR then say nothing about the recipe)")
    path = work / f"random_{setup.train_images}_{setup.image_size}.npz"
    if not path.exists():
        random_images(setup, path)
    content["source"] = content.get("source") if args.cifar10 else f"random uint8 images {path.name}"
    return path


@dataclass(frozen=True)
class Files:
    """What the pipeline's stages made in the work folder."""

    work: Path

    data = property(lambda self: self.work / "data")
    pool = property(lambda self: self.work / "pool.npy")
    resource = property(lambda self: self.work / "badnets.npz")
    poison = property(lambda self: self.work / "poison.npz")
    model_dir = property(lambda self: self.work / "model")
    model = property(lambda self: self.work / "model" / "model.pt")
    metrics = property(lambda self: self.work / "model" / "metrics.json")

    def partition(self, spc: int, seed: int) -> Path:
        return self.work / "partitions" / f"spc{spc}-seed{seed}.npy"


def prepare_data(args, setup: Setup, files: Files, content: dict) -> None:
    npz = source_images(args, setup, files.work, content)
    made_from = files.work / "data_source.json"  # the images the prepared dataset was made from
    if not (files.data / "meta.json").exists() or not made_from.exists() or read_json(made_from) != str(npz):
        options = {"source": "npz", "path": str(npz), **CIFAR10_NORMALISATION}
        stage("prepare", "--name", DATASET, "--options", json.dumps(options), "--out", str(files.data))
        write_json(made_from, str(npz))
        for path in (files.pool, files.resource, files.poison, *files.work.glob("partitions/*.npy")):
            path.unlink(missing_ok=True)  # made from other images
    if not files.pool.exists():
        stage("pool", "--data", str(files.data), "--per-class", str(setup.pool_per_class), "--seed", "0",
              "--out", str(files.pool))
    if not files.resource.exists():
        stage("resource", "--data", str(files.data), "--attack", "badnets", "--out", str(files.resource))
    if not files.poison.exists():
        stage("poison", "--data", str(files.data), "--pool", str(files.pool), "--resource", str(files.resource),
              "--attack", "badnets", "--ratio", "0.1", "--target", "0", "--seed", "0", "--out", str(files.poison))
    for seed in range(PACK_RUNS):
        if not files.partition(setup.spc, seed).exists():
            stage("partition", "--data", str(files.data), "--pool", str(files.pool), "--spc", str(setup.spc),
                  "--seed", str(seed), "--out", str(files.partition(setup.spc, seed)))
    from .data.store import PreparedDataset

    data = PreparedDataset(files.data)
    content.update(train_images=int(len(data.y_train)), test_images=int(len(data.y_test)),
                   image_size=data.info.image_size, classes=data.info.num_classes, work=str(files.work))


# ---------------------------------------------------------------------------------------------- 3. speed


@dataclass(frozen=True)
class SpeedConfig:
    pipeline: str  # "engine" or "reference"
    precision: str  # "bf16" or "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        if self.pipeline == "reference":
            return f"reference {self.precision}"
        return (f"engine {self.precision}{' channels-last' if self.channels_last else ''}"
                f"{' compiled' if self.compile else ''}")


def speed_configs(with_compile: bool) -> list[SpeedConfig]:
    """In order of importance: what the stages run (bf16, channels-last, eager), the references,
    fp32, the same compiled, the other layouts; each compiled one pays a compilation first."""
    configs = [SpeedConfig("engine", "bf16", True), SpeedConfig("reference", "fp32"),
               SpeedConfig("engine", "fp32", True), SpeedConfig("reference", "bf16"),
               SpeedConfig("engine", "bf16", True, True), SpeedConfig("engine", "bf16", False),
               SpeedConfig("engine", "fp32", False), SpeedConfig("engine", "fp32", True, True),
               SpeedConfig("engine", "bf16", False, True), SpeedConfig("engine", "fp32", False, True)]
    return [config for config in configs if with_compile or not config.compile]


def whole_batches(n: float, batch: int, least: int, most: int) -> int:
    """``n`` rounded down to whole batches, within [least, most] (whole batches: a compiled model
    would recompile for a different last-batch shape)."""
    most = max(batch, most // batch * batch)
    return int(min(most, max(least, int(n) // batch * batch)))


def engine_rate(model, images, labels, recipe, normalisation, options, seconds: float, device) -> dict:
    """Images/s of ``engine.train`` on ``model``: one warm-up run (cuDNN autotuning, compilation),
    a probe of two batches, then as many whole batches as fill ``seconds`` (at most one epoch)."""
    from .engine import train

    def timed(n: int) -> float:
        synchronise(device)
        started = time.perf_counter()
        train(model, images[:n], labels[:n], dataclasses.replace(recipe, epochs=1), normalisation, seed=0,
              description="gpu-check speed", progress=False, options=options)
        synchronise(device)
        return time.perf_counter() - started

    batch = recipe.batch_size
    warm_up = timed(2 * batch)
    probe = timed(2 * batch)
    n = whole_batches(seconds * 2 * batch / probe, batch, 2 * batch, len(labels))
    elapsed = timed(n) if n > 2 * batch else probe
    n = max(n, 2 * batch)
    return {"images_per_s": n / elapsed, "timed_images": n, "timed_s": elapsed, "warm_up_s": warm_up}


def reference_rate(model, host_images, host_labels, recipe, workers: int, precision_name: str, seconds: float,
                   device) -> dict:
    """The plain torchvision recipe: a Dataset whose per-image PIL transform crops, flips, converts
    and normalises, a shuffling DataLoader, SGD with momentum, a loop over batches (bf16: under
    autocast). Timed from the loader's first batch request (its workers start then, every epoch) to
    the end of the batch that fills ``seconds``, after a warm-up of two batches."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms

    size = host_images.shape[1]
    transform = transforms.Compose([transforms.RandomCrop(size, padding=recipe.crop_padding),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(CIFAR10_NORMALISATION["mean"], CIFAR10_NORMALISATION["std"])])

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(host_labels)

        def __getitem__(self, index):
            return transform(Image.fromarray(host_images[index])), int(host_labels[index])

    loader = torch.utils.data.DataLoader(Images(), batch_size=recipe.batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    optimiser = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if precision_name == "bf16" and device.type == "cuda" \
        else nullcontext()
    model.train()

    def run(stop_after: float | None, max_batches: int | None) -> tuple[int, float]:
        synchronise(device)
        started, seen, batches = time.perf_counter(), 0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with cast:
                loss = F.cross_entropy(model(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            seen, batches = seen + len(y), batches + 1
            if max_batches is not None and batches >= max_batches:
                break
            if stop_after is not None and batches % 4 == 0:
                synchronise(device)
                if time.perf_counter() - started >= stop_after:
                    break
        synchronise(device)
        return seen, time.perf_counter() - started

    run(None, 2)
    seen, elapsed = run(seconds, None)
    return {"images_per_s": seen / elapsed, "timed_images": seen, "timed_s": elapsed, "loader_workers": workers}


def measure_speed(content: dict, args, setup: Setup, files: Files, preset: dict, device, deadline: float) -> None:
    import numpy as np
    import torch

    from .data.store import PreparedDataset
    from .engine import as_tensor
    from .evaluate import normalisation_of
    from .models import create_model
    from .recipe import EngineOptions

    data = PreparedDataset(files.data)
    host_images, host_labels = np.asarray(data.x_train), np.asarray(data.y_train, dtype=np.int64)
    images, labels = as_tensor(host_images, device), as_tensor(host_labels, device)
    normalisation = normalisation_of(data)
    recipe = paper_recipe(preset, setup.architecture, batch_size=setup.batch_size) if args.tiny \
        else paper_recipe(preset, setup.architecture)
    configs = speed_configs(not args.no_compile)
    content.update(architecture=setup.architecture, images=len(host_labels), image_size=data.info.image_size,
                   recipe=dataclasses.asdict(recipe), configurations=[])
    compile_seconds = setup.compile_seconds
    for index, config in enumerate(configs):
        left = deadline - time.perf_counter()
        remaining = configs[index:]
        # The compilations still to come get their time first, up to half of what is left.
        compilations = sum(c.compile for c in remaining) * compile_seconds
        slice_s = max(0.0, left - min(compilations, left / 2)) / len(remaining)
        row = {"configuration": config.name, **dataclasses.asdict(config)}
        content["configurations"].append(row)
        if config.compile and left < compile_seconds + slice_s / 2:
            row.update(status="skipped", reason=f"{left:.0f} s left of the section; a compilation takes about "
                       f"{compile_seconds:.0f} s")
            continue
        if left <= 0 and not setup.least_work:
            row.update(status="skipped", reason="out of the section's time")
            continue
        torch.manual_seed(0)
        model = create_model(setup.architecture, data.info.num_classes, data.info.image_size).to(device)
        try:
            with precision(config.precision):
                if config.pipeline == "engine":
                    options = EngineOptions(compile=config.compile, channels_last=config.channels_last)
                    row.update(engine_rate(model, images, labels, recipe, normalisation, options,
                                           slice_s * 0.6, device))
                    if config.compile:
                        compile_seconds = row["warm_up_s"]
                else:
                    row.update(reference_rate(model, host_images, host_labels, recipe, setup.loader_workers,
                                              config.precision, slice_s * 0.8, device))
            row.update(status="ok", seconds_per_epoch=len(host_labels) / row["images_per_s"])
        except Exception as error:
            row.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    references = {row["precision"]: row["images_per_s"] for row in content["configurations"]
                  if row["pipeline"] == "reference" and row.get("status") == "ok"}
    for row in content["configurations"]:
        # Against the reference of the same precision; without it, the plain fp32 loop (the standard recipe).
        against = row["precision"] if row["precision"] in references else "fp32"
        if row["pipeline"] == "engine" and row.get("status") == "ok" and against in references:
            row.update(ratio_to_reference=row["images_per_s"] / references[against], reference=f"reference {against}")
    if device.type != "cuda":
        content.setdefault("notes", []).append("on a CPU the engine's autocast is off and channels-last unused: the "
                                               "bf16 and fp32 rows run the same arithmetic")


def engine_default(speed: dict) -> dict | None:
    """The configuration the pipeline's stages run (bf16, channels-last, not compiled), if measured."""
    for row in speed.get("configurations", []):
        if (row["pipeline"], row["precision"], row["channels_last"], row["compile"]) == ("engine", "bf16", True, False):
            return row if row.get("status") == "ok" else None
    return None


# ---------------------------------------------------------------------------------------------- 4-5. throughput, cost


def grid_shapes(preset: dict, setup: Setup) -> list[tuple[str, int]]:
    """(architecture, image size) of the paper grid, the check's own architecture at 32 px first."""
    from .cost import dataset_facts

    sizes = sorted({dataset_facts(options).size for options in preset["datasets"].values()})
    architectures = [setup.architecture] + [a for a in preset["architectures"] if a != setup.architecture]
    return [(architecture, size) for architecture in architectures for size in sizes]


def measure_throughput(content: dict, args, setup: Setup, preset: dict, speed: dict, device, deadline: float,
                       out: Path) -> None:
    """Training images/s per (architecture, size) in throughput.yaml's format: the engine's default
    configuration on random images; shapes the budget leaves unmeasured are the shipped figure of
    the comparison device scaled by the measured/shipped ratio of the first measured shape."""
    import torch
    import yaml

    from .cost import read_throughput
    from .engine import Normalisation
    from .models import create_model
    from .recipe import EngineOptions

    compare = "h100" if device.type == "cuda" else "cpu"
    shipped = read_throughput()["devices"].get(compare, {}).get("images_per_s", {})
    shapes = grid_shapes(preset, setup)
    measurable = set(setup.measured_architectures or [a for a, _ in shapes])
    rates: dict[tuple[str, int], float] = {}
    sources: dict[str, str] = {}
    default = engine_default(speed)
    if default is not None and setup.image_size == 32:
        rates[(setup.architecture, 32)] = default["images_per_s"]
        sources[f"{setup.architecture}@32"] = "measured (speed section, full training set)"
    recipe = paper_recipe(preset, setup.architecture, batch_size=setup.batch_size)
    normalisation = Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True)
    for index, (architecture, size) in enumerate(shapes):
        if (architecture, size) in rates or architecture not in measurable:
            continue
        left = deadline - time.perf_counter()
        todo = [s for s in shapes[index:] if s not in rates and s[0] in measurable]
        if left < 2 and not setup.least_work:
            break
        try:
            generator = torch.Generator().manual_seed(0)
            n = 32 * recipe.batch_size
            images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator).to(device)
            labels = torch.randint(0, setup.classes, (n,), generator=generator).to(device)
            torch.manual_seed(0)
            model = create_model(architecture, setup.classes, size).to(device)
            row = engine_rate(model, images, labels, recipe, normalisation, EngineOptions(),
                              max(0.0, left) / len(todo) * 0.5, device)
            rates[(architecture, size)] = row["images_per_s"]
            sources[f"{architecture}@{size}"] = f"measured ({row['timed_images']} random images)"
        except Exception as error:
            sources[f"{architecture}@{size}"] = f"failed: {type(error).__name__}: {error}"
    anchor = next(((a, s) for a, s in shapes if (a, s) in rates and (shipped.get(a) or {}).get(s)), None)
    scale = rates[anchor] / shipped[anchor[0]][anchor[1]] if anchor else None
    for architecture, size in shapes:
        if (architecture, size) not in rates and scale is not None and (shipped.get(architecture) or {}).get(size):
            rates[(architecture, size)] = shipped[architecture][size] * scale
            sources[f"{architecture}@{size}"] = (f"scaled: shipped {compare} figure x {scale:.3g} (measured/shipped "
                                                 f"of {anchor[0]}@{anchor[1]})")
    table: dict[str, dict[int, float]] = {}
    for (architecture, size), rate in rates.items():
        table.setdefault(architecture, {})[size] = float(f"{rate:.3g}")
    from .provenance import device_name

    scaled = sorted(key for key, source in sources.items() if source.startswith("scaled"))
    note = (f"measured by bdsweep gpu-check on {device_name(device)}: engine.train (bf16 autocast and channels-last "
            f"on CUDA, not compiled), batch {recipe.batch_size}." + (f" Scaled, not measured: {', '.join(scaled)}."
                                                                     if scaled else ""))
    entry = {"measured": not scaled, "note": note, "date": datetime.date.today().isoformat(), "images_per_s": table}
    path = out / "throughput.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump({"devices": {args.throughput_name: entry}}, sort_keys=False, width=100))
    content.update(file=str(path), device_name=args.throughput_name, compared_with=compare, sources=sources,
                   images_per_s={f"{a}@{s}": r for (a, s), r in rates.items()},
                   shipped_images_per_s={f"{a}@{s}": (shipped.get(a) or {}).get(s) for a, s in shapes})


def grid_cost(content: dict, args, throughput_file: Path, compare: str) -> None:
    from .config import validate_config, without_missing_input_files
    from .cost import Throughput, estimate, read_throughput

    preset, emptied = without_missing_input_files(paper_preset())
    if emptied:  # an input file (Blended's key image) changes no job and no pass count
        content["note"] = f"absent input files, priced with the built-in patterns: {'; '.join(emptied)}"
    config = validate_config(preset)
    for label, table, device in (("shipped", read_throughput(), compare),
                                 ("measured", read_throughput(throughput_file), args.throughput_name)):
        result = estimate(config, Throughput(table, device))
        content[label] = {"device": device, "file": table["path"], "total_gpu_hours": result.total_gpu_hours,
                          "stages": {s.rule: s.gpu_hours for s in result.stages if s.gpu_hours is not None},
                          "defenses": {name: row["gpu_hours"] for name, row in result.defenses.items()},
                          "warnings": result.warnings}
    content["command"] = f"bdsweep cost {PAPER_PRESET} --throughput {throughput_file} --device {args.throughput_name}"


# ---------------------------------------------------------------------------------------------- 6. model


def train_reference_model(content: dict, args, setup: Setup, files: Files, preset: dict, speed: dict, device,
                          deadline: float) -> None:
    from .atomic import read_json as read

    default = engine_default(speed)
    left = deadline - time.perf_counter()
    if default is not None:
        per_epoch = default["seconds_per_epoch"] * 1.05  # the stage's epochs also reshuffle and sync
        epochs = int(max(1, min(setup.max_epochs, (left - 10) // per_epoch)))
        content["epoch_estimate_s"] = per_epoch
    else:
        epochs = 1
        content.setdefault("notes", []).append("no measured speed: one epoch")
    recipe = paper_recipe(preset, setup.architecture, epochs=epochs)
    if args.tiny:
        recipe = dataclasses.replace(recipe, batch_size=setup.batch_size)
    overrides = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}
    for path in (files.model, files.metrics):
        path.unlink(missing_ok=True)
    started = time.perf_counter()
    stage("train", "--data", str(files.data), "--attack", "badnets", "--poison", str(files.poison),
          "--architecture", setup.architecture, "--recipe", json.dumps(overrides), "--target", "0", "--seed", "0",
          "--device", str(device), "--coordinates", json.dumps({"dataset": DATASET, "ratio": 0.1}),
          "--out-model", str(files.model), "--out-metrics", str(files.metrics),
          "--out-curve", str(files.model_dir / "curve.csv"))
    record = read(files.metrics)
    content.update(architecture=setup.architecture, attack="badnets", ratio=0.1, epochs=epochs,
                   recipe=record["recipe"], metrics=record["metrics"], train_seconds=record["train_seconds"],
                   seconds_per_epoch=record["train_seconds"] / epochs, stage_seconds=time.perf_counter() - started,
                   effective_ratio=record["effective_ratio"], spec_no_defense=SPEC_NO_DEFENSE,
                   model_file=str(files.model))


# ---------------------------------------------------------------------------------------------- 7. defenses


def epoch_fields(params) -> list[str]:
    return [f.name for f in dataclasses.fields(params)
            if ("epochs" in f.name or f.name in EPOCH_LIKE) and isinstance(getattr(params, f.name), int)
            and not isinstance(getattr(params, f.name), bool)]


def capped(params, fraction: float):
    """``params`` with every epoch-like count scaled by ``fraction`` (rounded up, at least 1; a
    count of 0 stays 0). Rounding up keeps orderings such as PBE's adversarial epochs <= epochs."""
    if fraction >= 1:
        return params
    changes = {name: max(1, math.ceil(getattr(params, name) * fraction))
               for name in epoch_fields(params) if getattr(params, name) > 0}
    return dataclasses.replace(params, **changes)


class RunTimer:
    """Predicts a defense run's seconds from its cost-model passes and the measured training rate,
    and learns from each run: seconds = overhead + slowdown x passes / rate. ``overhead`` (model
    loading, evaluation) comes from the runs with little work, ``slowdown`` (small batches run below
    the rate of batch 128) from the others."""

    def __init__(self, rate: float, device_type: str):
        self.rate = rate
        self.overhead = 2.0 if device_type == "cuda" else 1.0
        self.slowdown = 4.0 if device_type == "cuda" else 1.5
        self.observed: list[float] = []

    def seconds(self, passes: float | None) -> float:
        return self.overhead + self.slowdown * (passes or 0.0) / self.rate

    def learn(self, passes: float | None, seconds: float) -> None:
        work = self.slowdown * (passes or 0.0) / self.rate
        if work < self.overhead or passes is None:
            self.overhead = max(0.2, 0.5 * self.overhead + 0.5 * seconds)
        else:
            self.observed.append(max(0.1, seconds - self.overhead) * self.rate / passes)
            self.slowdown = sorted(self.observed)[len(self.observed) // 2]


def estimated_passes(name: str, params, setup: Setup) -> float | None:
    import warnings

    from .cost import MitigationSize, defense_passes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(defense_passes(name, params, MitigationSize(setup.spc * setup.classes, setup.classes)))
        except Exception:  # a parameter class the cost model does not know yet
            return None


def plan_defense(name: str, preset: dict, setup: Setup, timer: RunTimer, slot_s: float) -> dict:
    """The paper preset's parameters of ``name`` for (cifar10, architecture), epoch-like counts
    scaled down so the predicted run fits ``slot_s``; returns the overrides to run with."""
    from .config import method_params
    from .params import resolve
    from .registry import DEFENSES

    defense = DEFENSES.get(name)
    entry = (preset.get("defenses") or {}).get(name)
    paper = method_params(entry, DATASET, setup.architecture)
    params = resolve(defense.params, paper, f"defense {name!r}")
    passes = estimated_passes(name, params, setup)
    fraction = 1.0
    if passes is None:
        fraction = 0.0  # no cost model: one epoch of each kind, the least that runs the code
    elif timer.seconds(passes) > slot_s and passes > 0:
        fraction = max(0.0, (slot_s - timer.overhead) / (timer.seconds(passes) - timer.overhead))
    used = capped(params, fraction)
    changed = {key: [getattr(params, key), getattr(used, key)] for key in epoch_fields(params)
               if getattr(params, key) != getattr(used, key)}
    overrides = {**paper, **{key: new for key, (_, new) in changed.items()}}
    used_passes = estimated_passes(name, used, setup)
    return {"in_paper_preset": entry is not None, "paper_overrides": paper, "overrides": overrides,
            "capped": changed, "passes": used_passes, "paper_passes": passes,
            "predicted_s": timer.seconds(used_passes), "needs_data": defense.needs_data, "family": defense.family}


def registered_defenses(only: list[str] | None) -> list:
    from .registry import DEFENSES

    entries = DEFENSES.entries()
    if only:
        unknown = sorted(set(only) - {entry.name for entry in entries})
        if unknown:
            raise ValueError(f"unknown defense(s) {', '.join(unknown)}; known: {', '.join(DEFENSES.names())}")
        entries = [entry for entry in entries if entry.name in only]
    return entries


def run_defenses(content: dict, report: Report, args, setup: Setup, files: Files, preset: dict, speed: dict,
                 device, deadline: float, budget_left: Callable[[], float]) -> None:
    import torch

    from .data.store import PreparedDataset
    from .runs import ModelFiles, RunSpec, defend, file_digest, inputs_fingerprint, model_digests

    if not files.model.exists():
        raise FileNotFoundError(f"no reference model ({files.model}): the model section failed")
    default = engine_default(speed)
    timer = RunTimer(default["images_per_s"] if default else 1000.0, device.type)
    model_files = ModelFiles(str(files.model), str(files.metrics), str(files.data), str(files.poison))
    digests = model_digests(model_files)
    partition = str(files.partition(setup.spc, 0))
    digests[partition] = file_digest(partition)
    dataset = PreparedDataset(files.data)
    entries = registered_defenses(args.defenses)
    rows: dict[str, dict] = {entry.name: {"status": "pending"} for entry in entries}
    content.update(spc=setup.spc, partition=partition, runs=rows)
    plans = {}
    for entry in entries:
        try:
            plans[entry.name] = plan_defense(entry.name, preset, setup, timer, float("inf"))
        except Exception as error:
            rows[entry.name] = {"status": "failed", "reason": f"parameters: {type(error).__name__}: {error}",
                                "traceback": traceback.format_exc()}
    order = sorted(plans, key=lambda name: (plans[name]["passes"] is None, plans[name]["passes"] or 0.0))
    for index, name in enumerate(order):
        # Past the section's share, the rest still run at their least (one epoch of each kind), until
        # the whole budget is spent.
        if budget_left() <= 0:
            rows[name] = {"status": "skipped", "reason": "the check's time budget is spent"}
            report.write()
            continue
        left = deadline - time.perf_counter()
        plan = plan_defense(name, preset, setup, timer, max(0.0, left) / (len(order) - index))
        row = rows[name] = {"status": "running", **plan}
        report.write()
        run = RunSpec(name, plan["overrides"], {"dataset": DATASET, "architecture": setup.architecture,
                                                "attack": "badnets", "ratio": 0.1, "spc": setup.spc, "seed": 0},
                      partition if plan["needs_data"] else None, str(files.work / "runs" / f"{name}.json"))
        started = time.perf_counter()
        try:
            record = defend(run, model_files, device, inputs_fingerprint(run, digests), dataset=dataset)
            post = record["post"] or {}
            row.update(status=record["status"], reason=record["reason"], defense_s=record["wall_time_s"],
                       peak_memory_gib=gib(record["peak_memory_bytes"]), peak_memory_kind=record["peak_memory_kind"],
                       acc=post.get("acc"), asr=post.get("asr"), ra=post.get("ra"), pre=record["pre"],
                       hyperparameters=record["hyperparameters"])
            if "traceback" in record["details"]:
                row["traceback"] = record["details"]["traceback"]
        except Exception as error:  # out of memory (RetryWithLess), a CUDA error, ...: a result here
            row.update(status="error", reason=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["total_s"] = time.perf_counter() - started
        timer.learn(plan["passes"], row.get("defense_s", row["total_s"]))
        print(f"gpu-check: defense {name}: {row['status']} in {row['total_s']:.1f} s"
              + (f" (capped {row['capped']})" if row.get("capped") else ""), flush=True)
        report.write()
    counts: dict[str, int] = {}
    for row in rows.values():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    content.update(statuses=counts, run_timer={"overhead_s": timer.overhead, "slowdown": timer.slowdown})
    if any(row["status"] in ("failed", "error") for row in rows.values()):
        content["status"] = "failures"


# ---------------------------------------------------------------------------------------------- 8. packing


def pack_runs(content: dict, args, setup: Setup, files: Files, preset: dict, defenses: dict, speed: dict, device,
              deadline: float) -> None:
    from .atomic import read_json as read
    from .registry import DEFENSES

    workers = args.pack_workers or setup.pack_workers
    implemented = [entry.name for entry in DEFENSES.entries() if entry.obj.needs_data]
    name = args.pack_defense if args.pack_defense in implemented else implemented[0]
    default = engine_default(speed)
    timer = RunTimer(default["images_per_s"] if default else 1000.0, device.type)
    learnt = defenses.get("run_timer")
    if learnt:
        timer.overhead, timer.slowdown = learnt["overhead_s"], learnt["slowdown"]
    left = deadline - time.perf_counter()
    if left < 1 and not setup.least_work:
        content.update(status="skipped", reason="the budget is spent")
        return
    startup = 15.0 if device.type == "cuda" else 8.0  # the workers' Python, torch and CUDA start-up
    # One worker runs the 8 runs one after the other; N workers about 8 / N of that plus start-up.
    slot = max(0.0, (left - startup) / (PACK_RUNS * (1 + 1 / workers)) * 0.8)
    plan = plan_defense(name, preset, setup, timer, slot)
    tokens = [f"spc{setup.spc}-seed{seed}" for seed in range(PACK_RUNS)]
    content.update(defense=name, runs=PACK_RUNS, mitigations=tokens, overrides=plan["overrides"],
                   capped=plan["capped"], predicted_run_s=plan["predicted_s"], workers=workers)
    for count in sorted({1, workers}):
        folder = files.work / "packing" / f"workers{count}"
        for path in folder.glob("*/*.json"):
            path.unlink()  # a rerun computes them again rather than finding them up to date
        started = time.perf_counter()
        stage("defend-model", "--model", str(files.model), "--model-metrics", str(files.metrics),
              "--data", str(files.data), "--backdoor", str(files.poison),
              "--defenses", json.dumps({name: {"params": plan["overrides"], "mitigations": tokens}}),
              "--coordinates", json.dumps({"dataset": DATASET, "architecture": setup.architecture, "attack": "badnets",
                                           "ratio": 0.1}),
              "--partitions", str(files.work / "partitions" / "spc{spc}-seed{seed}.npy"),
              "--runs", str(folder / "{defense}" / "{mitigation}.json"), "--workers", str(count),
              "--device", str(device), "--out", str(folder / "manifest.json"))
        seconds = time.perf_counter() - started
        records = [read(folder / name / f"{token}.json") for token in tokens]
        content[f"workers_{count}"] = {
            "seconds": seconds, "runs_per_hour": PACK_RUNS / seconds * 3600,
            "statuses": sorted({record["status"] for record in records}),
            "defense_s": [round(record["wall_time_s"], 3) for record in records],
            "peak_memory_gib": max(gib(record["peak_memory_bytes"]) or 0 for record in records)}
    content["throughput_ratio"] = content["workers_1"]["seconds"] / content[f"workers_{workers}"]["seconds"]


# ---------------------------------------------------------------------------------------------- markdown


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(report: dict) -> str:
    sections = report["sections"]
    lines = [f"# bdsweep GPU acceptance check{' (tiny)' if report.get('tiny') else ''}", "",
             f"Started {report['started']}, updated {report['updated']}; budget {report['budget_s']:.0f} s. "
             f"Command: `{report['command']}`", ""]

    def heading(name: str, title: str) -> dict | None:
        content = sections.get(name)
        lines.extend([f"## {title}", ""])
        if content is None:
            lines.extend(["not reached", ""])
            return None
        lines.append(f"status **{content['status']}**" + (f", {content['seconds']:.1f} s" if "seconds" in content
                                                          else ""))
        lines.append("")
        if content.get("error"):
            lines.extend(["```", content.get("traceback", content["error"]).rstrip(), "```", ""])
        for note in content.get("notes", []):
            lines.append(f"note: {note}")
        return content

    env = heading("environment", "1. Environment")
    if env:
        keys = ("device", "driver", "torch_cuda", "cudnn", "gpu_memory_free_gib", "gpu_memory_total_gib",
                "compute_capability", "multiprocessors", "cpus", "host_memory_available_gib")
        lines += ["| | |", "|---|---|", *(f"| {key} | {env[key]} |" for key in keys if key in env),
                  *(f"| {key} | {value} |" for key, value in env.get("versions", {}).items()), ""]
    data = heading("data", "2. Data")
    if data:
        lines += [f"{data.get('source', '-')}: {data.get('train_images', '-')} training and "
                  f"{data.get('test_images', '-')} test images of {data.get('image_size', '-')} px", ""]
    speed = heading("speed", "3. Training speed")
    if speed and speed.get("configurations"):
        lines += [f"{speed.get('architecture')}, {speed.get('images')} images, batch "
                  f"{speed.get('recipe', {}).get('batch_size')}", "",
                  "| configuration | status | images/s | s/epoch | x reference (which) | timed images | warm-up s |",
                  "|---|---|---|---|---|---|---|"]
        for row in speed["configurations"]:
            ratio = row.get("ratio_to_reference")
            which = "-" if ratio is None else f"{ratio:.2f} ({row['reference']})"
            lines.append(f"| {row['configuration']} | {row.get('status', '-')} | {_num(row.get('images_per_s'), 0)} | "
                         f"{_num(row.get('seconds_per_epoch'), 2)} | {which} | "
                         f"{row.get('timed_images', '-')} | {_num(row.get('warm_up_s'), 1)} |")
        lines += [f"- {row['configuration']}: {row.get('reason') or row.get('error')}"
                  for row in speed["configurations"] if row.get("status") != "ok"]
        lines.append("")
    throughput = heading("throughput", "4. Throughputs (throughput.yaml format)")
    if throughput and "sources" in throughput:
        lines += [f"`{throughput['file']}`, device `{throughput['device_name']}`", "",
                  f"| architecture@size | images/s | shipped {throughput['compared_with']} | source |",
                  "|---|---|---|---|"]
        for key, source in throughput["sources"].items():
            lines.append(f"| {key} | {_num(throughput['images_per_s'].get(key), 0)} | "
                         f"{_num(throughput['shipped_images_per_s'].get(key), 0)} | {source} |")
        lines.append("")
    cost = heading("cost", "5. Paper grid, GPU hours")
    if cost and "measured" in cost:
        shipped, measured = cost["shipped"], cost["measured"]
        lines += [f"`{cost['command']}`", "", f"| stage | shipped `{shipped['device']}` | measured |", "|---|---|---|"]
        for rule, hours in shipped["stages"].items():
            if hours:
                lines.append(f"| {rule} | {_num(hours)} | {_num(measured['stages'].get(rule))} |")
        lines += [f"| **total** | **{_num(shipped['total_gpu_hours'])}** | **{_num(measured['total_gpu_hours'])}** |",
                  "", "per defense (shipped / measured): " + ", ".join(
                      f"{name} {_num(hours)} / {_num(measured['defenses'].get(name))}"
                      for name, hours in sorted(shipped["defenses"].items(), key=lambda item: -item[1])), ""]
    model = heading("model", "6. Reference model")
    if model and "metrics" in model:
        metrics, spec = model["metrics"], model["spec_no_defense"]
        lines += ["| | epochs | ACC | ASR | RA | s/epoch |", "|---|---|---|---|---|---|",
                  f"| this check ({model['architecture']}, BadNets 10 %) | {model['epochs']} | "
                  f"{_pct(metrics['acc'])} | "
                  f"{_pct(metrics['asr'])} | {_pct(metrics['ra'])} | {_num(model['seconds_per_epoch'], 2)} |",
                  f"| SPEC section 8, no defense | {spec['epochs']} | {_pct(spec['acc'])} | {_pct(spec['asr'])} | "
                  f"{_pct(spec['ra'])} | |", ""]
        if model["epochs"] < spec["epochs"]:
            lines += [f"{model['epochs']} of the paper's {spec['epochs']} epochs (cosine schedule over the epochs "
                      "run): expect a lower ACC than SPEC's row", ""]
    defenses = heading("defenses", "7. Every registered defense (SPC 10, paper preset)")
    if defenses and "runs" in defenses:
        lines += ["| defense | status | defense s | total s | peak GiB | ACC | ASR | RA | capped (paper -> used) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, row in defenses["runs"].items():
            caps = ", ".join(f"{k} {a}->{b}" for k, (a, b) in (row.get("capped") or {}).items()) or "-"
            lines.append(f"| {name} | {row['status']} | {_num(row.get('defense_s'))} | {_num(row.get('total_s'))} | "
                         f"{_num(row.get('peak_memory_gib'), 2)} | {_pct(row.get('acc'))} | {_pct(row.get('asr'))} | "
                         f"{_pct(row.get('ra'))} | {caps} |")
        lines.append("")
        for name, row in defenses["runs"].items():
            if row.get("traceback"):
                lines += [f"**{name}**: {row.get('reason')}", "", "```", row["traceback"].rstrip(), "```", ""]
            elif row["status"] not in ("ok", "pending", "running") and row.get("reason"):
                lines += [f"- {name}: {row['reason']}"]
        lines.append("")
    packing = heading("packing", "8. Packing: defend-model with 1 and N workers")
    if packing and "throughput_ratio" in packing:
        many = packing[f"workers_{packing['workers']}"]
        lines += [f"{packing['runs']} runs of {packing['defense']} (capped {packing['capped'] or '-'}): 1 worker "
                  f"{packing['workers_1']['seconds']:.1f} s, {packing['workers']} workers {many['seconds']:.1f} s: "
                  f"**{packing['throughput_ratio']:.2f}x** the throughput", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def command_line(args) -> str:
    """The command as given (options at their defaults left out)."""
    parts = ["bdsweep", "gpu-check"]
    for key, value in vars(args).items():
        if key in ("command", "handler") or value in (None, False) or (key, value) in (
                ("device", "auto"), ("pack_defense", "ft"), ("throughput_name", "measured")):
            continue
        option = "--" + key.replace("_", "-")
        values = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        parts += [option] if value is True else [option, *values]
    return " ".join(parts)


def main(args) -> None:
    import torch

    from .engine import select_device

    setup = TINY if args.tiny else FULL
    budget = Budget(args.budget if args.budget is not None else 180.0 if args.tiny else 480.0)
    # --tiny: no section fills its share; each measures the least it can.
    deadline = (lambda section: time.perf_counter()) if setup.least_work else budget.deadline
    device = select_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or f"/tmp/bdsweep-gpu-check{'-tiny' if args.tiny else ''}")
    work.mkdir(parents=True, exist_ok=True)
    files = Files(work)
    report = Report(out, {"schema": 1, "tiny": bool(args.tiny), "budget_s": budget.seconds, "started": _now(),
                          "command": command_line(args),
                          "architecture": setup.architecture, "device": str(device)})
    preset = paper_preset()
    torch.manual_seed(0)
    sections = report.data["sections"]

    run_section(report, "environment", lambda c: environment(c, device), budget)
    run_section(report, "data", lambda c: prepare_data(args, setup, files, c), budget)
    speed = run_section(report, "speed", lambda c: measure_speed(c, args, setup, files, preset, device,
                                                                 deadline("speed")), budget)
    run_section(report, "throughput", lambda c: measure_throughput(c, args, setup, preset, speed, device,
                                                                   deadline("throughput"), out), budget)
    compare = sections["throughput"].get("compared_with", "h100" if device.type == "cuda" else "cpu")
    run_section(report, "cost", lambda c: grid_cost(c, args, out / "throughput.yaml", compare), budget)
    run_section(report, "model", lambda c: train_reference_model(c, args, setup, files, preset, speed, device,
                                                                 deadline("model")), budget)
    defenses = run_section(report, "defenses", lambda c: run_defenses(c, report, args, setup, files, preset, speed,
                                                                      device, deadline("defenses"),
                                                                      budget.left), budget)
    run_section(report, "packing", lambda c: pack_runs(c, args, setup, files, preset, defenses, speed, device,
                                                       deadline("packing")), budget)
    report.data["finished"] = _now()
    report.data["elapsed_s"] = round(budget.elapsed(), 1)
    report.write()
    print(f"gpu-check: done in {budget.elapsed():.0f} s (budget {budget.seconds:.0f} s): {out / 'report.md'}",
          flush=True)
