"""Shared fixtures: tiny synthetic datasets, the shared real datasets (skipped when absent), and
a small backdoored model trained once per session."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))  # importable without installation too

from bdsweep.reproducibility import CPU_ENVIRONMENT  # noqa: E402  (imports no torch)

# Reproducible float arithmetic for every test, whatever the machine, its load or the test order:
# one instruction set for every kernel library and one intra-op thread (float sums, so trained
# weights, depend on the thread count; two xdist workers on two cores are also faster with one
# thread each). Set before torch is first imported; subprocesses (Snakemake jobs) inherit them.
# bdsweep/reproducibility.py says what this guarantees and what it cannot.
if "torch" in sys.modules:
    raise RuntimeError("tests/conftest.py must run before torch is imported (see CPU_ENVIRONMENT)")
os.environ.update({**CPU_ENVIRONMENT, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# BDSWEEP_SHARED points a worktree that is not beside ../shared at the shared folder.
SHARED = Path(os.environ.get("BDSWEEP_SHARED") or REPO.parent / "shared")
SHARED_DATASETS = SHARED / "datasets"
SHARED_RESOURCES = SHARED / "resources"


def requires_shared(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (the development datasets and "
                              "reference resources live in ../shared, which this checkout does not have)")


# The paper preset's Blended key image, relative to the working directory (bdsweep does not ship it).
PAPER_BLENDED_IMAGE = Path("data") / "blended" / "hello_kitty.jpeg"


def place_paper_blended_image(workdir: Path) -> Path:
    """Put the paper preset's Blended key image under ``workdir``: the toolkit's from ../shared when
    present, else a stand-in JPEG (validating and planning only check that the file exists)."""
    import shutil

    from PIL import Image

    path = workdir / PAPER_BLENDED_IMAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    if (SHARED_RESOURCES / "blended" / "hello_kitty.jpeg").exists():
        shutil.copyfile(SHARED_RESOURCES / "blended" / "hello_kitty.jpeg", path)
    else:
        Image.new("RGB", (8, 8), (255, 128, 0)).save(path)
    return path


@pytest.fixture
def paper_workdir(tmp_path, monkeypatch):
    """A working directory (the current one during the test) in which the paper preset validates."""
    place_paper_blended_image(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config):
    """pytest-randomly (a dev dependency) shuffles the test order on every run, which proves that no
    test depends on another; its reseeding of the global RNGs with the run's random seed is turned
    off, as each test is seeded from its own id instead (``independent_of_order``)."""
    if config.pluginmanager.hasplugin("randomly"):
        config.option.randomly_reset_seed = False


END_TO_END = Path(__file__).resolve().parent / "end_to_end"


def pytest_collection_modifyitems(items):
    """Every test under ``tests/end_to_end/`` runs a workflow through Snakemake (minutes on 2 CPUs):
    the folder marks it ``slow`` (``-m "not slow"`` skips them), no test marks itself."""
    for item in items:
        if END_TO_END in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


def seed_of_test(nodeid: str) -> int:
    """A seed from the test's own id, so a test's randomness does not depend on what ran before it."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def independent_of_order(request):
    """Every test starts from the same global state whichever tests ran before it in this worker:
    one torch thread (an in-process defend-model job may have changed it) and the global RNGs of
    torch, numpy and random seeded from the test's id."""
    import torch

    torch.set_num_threads(1)
    seed = seed_of_test(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Kept for the modules that ask for it: every test now runs on one thread (``independent_of_order``)."""
    yield


@pytest.fixture(scope="session")
def materialized(tmp_path_factory):
    """Decode ../shared/datasets once per session; returns a function name -> .npz path."""
    if not (SHARED_DATASETS / "materialize.py").exists():
        pytest.skip(f"{SHARED_DATASETS} is absent: no real CIFAR-10/GTSRB/Tiny-ImageNet copies here")
    out = tmp_path_factory.mktemp("materialized")
    done = set()

    def get(name: str) -> Path:
        if name not in done:
            subprocess.run([sys.executable, str(SHARED_DATASETS / "materialize.py"), "--out", str(out),
                            "--only", name], check=True, capture_output=True)
            done.add(name)
        return out / f"{name}.npz"

    return get


def synthetic_raw(num_classes=4, per_class_train=30, per_class_test=10, size=16, seed=0):
    from bdsweep.data.store import RawDataset

    rng = np.random.default_rng(seed)

    def split(per_class):
        labels = np.repeat(np.arange(num_classes), per_class)
        images = rng.integers(0, 120, size=(len(labels), size, size, 3), dtype=np.uint8)
        images[..., 0] += (labels * 30).astype(np.uint8)[:, None, None]  # a learnable class cue
        return images, labels.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = split(per_class_train), split(per_class_test)
    return RawDataset(x_train, y_train, x_test, y_test, tuple(f"c{i}" for i in range(num_classes)))


# Every architecture but vgg19_bn, which runs through the same code (defenses name no architecture)
# but takes ~10 s just to build on one CPU thread (its 4096-wide classifier).
QUICK_ARCHITECTURES = ["small_cnn", "preact_resnet18", "efficientnet_b3", "mobilenet_v3_large"]

@pytest.fixture
def prepared(tmp_path):
    """A prepared synthetic dataset directory."""
    from bdsweep.data.store import PreparedDataset, write_dataset

    write_dataset(tmp_path / "data", synthetic_raw(), "synthetic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False)
    return PreparedDataset(tmp_path / "data")


@pytest.fixture(scope="session")
def digits_backdoor(tmp_path_factory):
    """A small CNN trained on the real digits with BadNets at 10 %: (dir, paths dict). Every stage
    is seeded from its arguments and runs on one thread, so the model is the same whichever test
    module asks for it first."""
    from bdsweep.cli import main

    root = tmp_path_factory.mktemp("digits_backdoor")
    data, pool, resource, poison = root / "data", root / "pool.npy", root / "badnets.npz", root / "poison.npz"
    steps = [
        ["prepare", "--name", "digits", "--options", '{"source": "digits", "image_size": 16}', "--out", str(data)],
        ["pool", "--data", str(data), "--per-class", "20", "--seed", "0", "--out", str(pool)],
        ["resource", "--data", str(data), "--attack", "badnets", "--out", str(resource)],
        ["poison", "--data", str(data), "--pool", str(pool), "--resource", str(resource), "--attack", "badnets",
         "--ratio", "0.1", "--target", "0", "--seed", "0", "--out", str(poison)],
        ["train", "--data", str(data), "--attack", "badnets", "--poison", str(poison), "--architecture", "small_cnn",
         "--recipe", '{"epochs": 8, "batch_size": 64, "lr": 0.05}', "--target", "0", "--seed", "0",
         "--device", "cpu", "--out-model", str(root / "model.pt"), "--out-metrics", str(root / "metrics.json"),
         "--out-curve", str(root / "curve.csv")],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    for spc in (10,):
        assert main(["partition", "--data", str(data), "--pool", str(pool), "--spc", str(spc), "--seed", "0",
                     "--out", str(root / f"spc{spc}.npy")]) == 0
    return root


def defend(root, name, params=None, partition=True, out="run.json"):
    """Run the defend stage on a model directory such as ``digits_backdoor``'s; the run record."""
    import json

    from bdsweep.cli import main

    argv = ["defend", "--model", str(root / "model.pt"), "--model-metrics", str(root / "metrics.json"),
            "--data", str(root / "data"), "--backdoor", str(root / "poison.npz"), "--defense", name,
            "--params", json.dumps(params or {}), "--device", "cpu", "--out", str(root / out),
            "--coordinates", json.dumps({"dataset": "digits", "spc": 10, "seed": 0})]
    if partition:
        argv += ["--partition", str(root / "spc10.npy")]
    assert main(argv) == 0
    return json.loads((root / out).read_text())


@pytest.fixture
def recorded_reads(monkeypatch):
    """What the defend stage reads, in order, as it reads it: the dataset's arrays by name, and
    "load_poison" and "read_json" for the backdoor test set and the model's record (which names the
    target). A test compares it with what had been read when a defense ran."""
    import bdsweep.runs as stage
    from bdsweep.data.store import PreparedDataset

    loaded = []
    array = PreparedDataset.array
    monkeypatch.setattr(PreparedDataset, "array", lambda self, name: loaded.append(name) or array(self, name))
    for helper in ("load_poison", "read_json"):
        original = getattr(stage, helper)
        monkeypatch.setattr(stage, helper, lambda path, _f=original, _h=helper: loaded.append(_h) or _f(path))
    return loaded


def random_mitigation(n=4, num_classes=2, size=32, seed=0, spare=False):
    """Mitigation data of random images with balanced labels, for mechanism tests of defenses; with
    ``spare``, also the extra image per class that the defend stage hands over (FORK's extra draw)."""
    import torch

    from bdsweep.defenses import MitigationData
    from bdsweep.engine import Normalisation

    generator = torch.Generator().manual_seed(seed)
    normalisation = Normalisation((0.5,) * 3, (0.25,) * 3, True)

    def draw(count):
        images = torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, generator=generator)
        return images, torch.arange(count) % num_classes

    images, labels = draw(n)
    extra = MitigationData(*draw(num_classes), normalisation, size, num_classes) if spare else None
    return MitigationData(images, labels, normalisation, size, num_classes, spare=extra)


def run_defense(name, model, data, **params):
    """Call the registered defense directly on CPU with these hyperparameters, seeded."""
    import torch

    from bdsweep.registry import DEFENSES

    torch.manual_seed(0)
    defense = DEFENSES.get(name)
    return defense.run(model, data, defense.params(**params), torch.device("cpu"))


@pytest.fixture
def digits(digits_backdoor):
    """The backdoored digits model and its SPC-10 mitigation data."""
    import numpy as np

    from bdsweep.data.store import PreparedDataset
    from bdsweep.model_file import load_model
    from bdsweep.runs import mitigation_data

    model, _ = load_model(digits_backdoor / "model.pt")
    data = mitigation_data(PreparedDataset(digits_backdoor / "data"), np.load(digits_backdoor / "spc10.npy"), "cpu")
    return model, data


def same_weights(a, b) -> bool:
    import torch

    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


class SigtermAt:
    """Wraps a function; sends this process SIGTERM (as SLURM would) when its n-th call begins."""

    def __init__(self, function, call: int | None):
        self.function, self.call, self.calls = function, call, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.function(*args, **kwargs)


def sigterm_at_check(monkeypatch, stop_at: int | None = None) -> SigtermAt:
    """Count the SIGTERM checks of every checkpointed loop (``engine.train``'s after each batch, an own
    loop's at each ``boundary()``: every point where a defense can stop and resume), optionally
    sending SIGTERM as check ``stop_at`` begins. Needs no knowledge of the defense, so it works for
    every registered one; ``count_steps`` in test_defense_resume.py counts a defense's own steps."""
    from contextlib import contextmanager

    from bdsweep import checkpoints, engine

    active = []  # the check of the innermost loop running now
    counter = SigtermAt(lambda: active[-1](), stop_at)
    requests = checkpoints.sigterm_requests

    @contextmanager
    def counted_requests():
        with requests() as preempted:
            active.append(preempted)
            try:
                yield counter
            finally:
                active.pop()

    for module in (checkpoints, engine):  # the engine imported it by name
        monkeypatch.setattr(module, "sigterm_requests", counted_requests)
    return counter
