"""`bdsweep gpu-check --device cpu --tiny`: the GPU acceptance check's code paths on a small CNN and a few
hundred random images, so the check cannot rot while no GPU is at hand (about a minute on a quiet CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from bdsweep import gpucheck
from bdsweep.cli import main as bdsweep
from bdsweep.cost import Throughput, read_throughput
from bdsweep.registry import DEFENSES

RAN = {"ok", "failed", "skipped", "not implemented", "error"}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    out, work = tmp_path_factory.mktemp("report"), tmp_path_factory.mktemp("work")
    code = bdsweep(["gpu-check", "--device", "cpu", "--tiny", "--out", str(out), "--work", str(work)])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_every_section_is_in_the_report(tiny_report):
    out, report = tiny_report
    assert report["tiny"] and report["budget_s"] == 180 and "finished" in report
    assert set(report["sections"]) == set(gpucheck.SECTIONS)
    failed = {name: section.get("traceback") for name, section in report["sections"].items()
              if section["status"] not in ("ok", "skipped")}
    assert not failed, failed
    markdown = (out / "report.md").read_text()
    for title in ("1. Environment", "3. Training speed", "5. Paper grid, GPU hours", "6. Reference model",
                  "7. Every registered defense", "8. Packing"):
        assert f"## {title}" in markdown


def test_environment_and_speed(tiny_report):
    _, report = tiny_report
    sections = report["sections"]
    assert sections["environment"]["versions"]["torch"] and sections["environment"]["device_type"] == "cpu"
    rows = {row["configuration"]: row for row in sections["speed"]["configurations"]}
    # every precision x channels-last x compile configuration and both references are listed
    assert len(rows) == 10 and {"reference fp32", "reference bf16", "engine bf16 channels-last compiled"} <= set(rows)
    first = rows["engine bf16 channels-last"]  # what the stages run: always measured first
    assert first["status"] == "ok" and first["images_per_s"] > 0
    assert first["seconds_per_epoch"] == pytest.approx(sections["speed"]["images"] / first["images_per_s"])
    assert rows["reference fp32"]["status"] == "ok" and first["ratio_to_reference"] > 0
    assert all(row["status"] in ("ok", "skipped") for row in rows.values())


def test_throughput_file_feeds_the_cost_model(tiny_report, paper_workdir):
    out, report = tiny_report
    table = read_throughput(out / "throughput.yaml")
    measured = Throughput(table, "measured")
    for key in report["sections"]["throughput"]["sources"]:
        architecture, size = key.split("@")
        assert measured.images_per_s(architecture, int(size)) > 0
    assert yaml.safe_load((out / "throughput.yaml").read_text())["devices"]["measured"]["images_per_s"]["small_cnn"]
    cost = report["sections"]["cost"]
    assert cost["shipped"]["device"] == "cpu" and cost["measured"]["device"] == "measured"
    assert cost["shipped"]["total_gpu_hours"] > 0 and cost["measured"]["total_gpu_hours"] > 0
    # `bdsweep cost --throughput FILE` reads the file the check wrote
    assert bdsweep(["cost", str(gpucheck.PAPER_PRESET), "--throughput", str(out / "throughput.yaml"),
                    "--device", "measured"]) == 0


def test_reference_model_beside_the_spec_row(tiny_report):
    _, report = tiny_report
    model = report["sections"]["model"]
    assert 1 <= model["epochs"] <= gpucheck.TINY.max_epochs and model["recipe"]["epochs"] == model["epochs"]
    assert set(model["metrics"]) == {"acc", "asr", "ra"} and model["spec_no_defense"]["acc"] == 0.913


def test_every_registered_defense_has_a_status(tiny_report):
    _, report = tiny_report
    runs = report["sections"]["defenses"]["runs"]
    assert set(runs) == set(DEFENSES.names())  # iterated from the registry: a new defense is checked too
    assert all(row["status"] in RAN for row in runs.values()), {n: r["status"] for n, r in runs.items()}
    broken = {name: row.get("traceback") for name, row in runs.items() if row["status"] in ("failed", "error")}
    assert not broken, broken
    ran = {name: row for name, row in runs.items() if row["status"] == "ok"}
    assert "none" in ran and ran["none"]["acc"] is not None  # the cheapest run first
    for row in ran.values():
        assert row["defense_s"] >= 0 and row["peak_memory_gib"] > 0 and "hyperparameters" in row


def test_packing_runs_the_same_runs_through_defend_model(tiny_report):
    _, report = tiny_report
    packing = report["sections"]["packing"]
    assert packing["runs"] == 8 and len(packing["workers_1"]["defense_s"]) == 8
    assert packing["workers_1"]["statuses"] == ["ok"] and packing["throughput_ratio"] > 0


def test_a_failing_section_is_reported_and_the_check_goes_on(tmp_path):
    report = gpucheck.Report(tmp_path, {"tiny": True, "budget_s": 1.0, "started": "now", "command": "test"})
    budget = gpucheck.Budget(1.0)

    def broken(content):
        content["partial"] = 1
        raise RuntimeError("CUDA error: an illegal memory access")

    gpucheck.run_section(report, "speed", broken, budget)
    gpucheck.run_section(report, "cost", lambda content: content.update(total=1), budget)
    written = json.loads((tmp_path / "report.json").read_text())["sections"]
    assert written["speed"]["status"] == "failed" and written["speed"]["partial"] == 1
    assert "illegal memory access" in written["speed"]["traceback"] and written["cost"]["status"] == "ok"
    assert "CUDA error" in (tmp_path / "report.md").read_text()


def test_capping_scales_every_epoch_like_count_and_keeps_their_order():
    @dataclasses.dataclass(frozen=True)
    class Params:
        epochs: int = 20
        adversarial_epochs: int = 3
        rounds: int = 0
        iterations: int = 2000
        steps: int = 7  # PGD steps: not an epoch count
        lr: float = 0.01

    assert gpucheck.capped(Params(), 1.0) == Params()
    cut = gpucheck.capped(Params(), 0.1)
    assert (cut.epochs, cut.adversarial_epochs, cut.rounds, cut.iterations, cut.steps) == (2, 1, 0, 200, 7)
    least = gpucheck.capped(Params(), 0.0)
    assert (least.epochs, least.adversarial_epochs, least.iterations) == (1, 1, 1)
    assert gpucheck.whole_batches(1000, 128, 256, 50_000) == 896
    assert gpucheck.whole_batches(10**9, 128, 256, 50_000) == 49_920


def test_the_jpeg_archive_is_decoded_when_materialize_refuses(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays, packed = {}, {"class_names": np.array(["a", "b"])}
    for split, count in (("train", 3), ("test", 2)):
        images = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
        blobs = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=75)
            blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
        packed[f"{split}_jpeg"] = np.concatenate(blobs)
        packed[f"{split}_offsets"] = np.cumsum([0, *map(len, blobs)])
        packed[f"{split}_y"] = np.arange(count) % 2
        arrays[split] = np.stack([np.asarray(Image.open(io.BytesIO(b.tobytes())).convert("RGB")) for b in blobs])
    np.savez(tmp_path / "archive.npz", **packed)
    gpucheck.decode_cifar10(tmp_path / "archive.npz", tmp_path / "decoded.npz")
    with np.load(tmp_path / "decoded.npz") as decoded:
        for split in ("train", "test"):
            np.testing.assert_array_equal(decoded[f"x_{split}"], arrays[split])
            assert decoded[f"y_{split}"].dtype == np.int64 and list(decoded[f"y_{split}"]) == list(packed[f"{split}_y"])
