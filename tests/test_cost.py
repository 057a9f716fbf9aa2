"""The cost model (``bdsweep cost``): job counts agree with Snakemake's plan, and the estimated
work follows the grid and the hyperparameters the way it should."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys

import pytest
import yaml

from bdsweep.cli import main as bdsweep
from bdsweep.config import read_config, validate_config
from bdsweep.cost import (
    MitigationSize,
    Throughput,
    ThroughputError,
    defense_passes,
    estimate,
    job_counts,
    read_throughput,
)
from bdsweep.registry import DEFENSES
from conftest import REPO, place_paper_blended_image

DEMO, PAPER = REPO / "config.yaml", REPO / "workflow" / "presets" / "paper.yaml"
# Our count that each Snakemake rule's job count must equal (runs are no rule's jobs: each model's
# defend_model job makes them).
RULE_COUNTS: dict[str, str] = {}
NOT_COUNTED = {"all", "runs"}


def demo(**changes) -> dict:
    config = read_config(DEMO)
    for key, value in changes.items():
        config[key] = value
    return validate_config(config)


def snakemake_job_counts(directory) -> dict[str, int]:
    """The job-count table of ``snakemake -n`` on the demo configuration."""
    done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--snakefile",
                           str(REPO / "Snakefile"), "--directory", str(directory)],
                          capture_output=True, text=True, check=True)
    table = done.stdout.split("Job stats:", 1)[1].split("total", 1)[0]
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def test_counts_agree_with_snakemakes_plan_of_the_demo(tmp_path):
    planned = snakemake_job_counts(tmp_path)
    counts = job_counts(demo())
    ours = {rule: counts[RULE_COUNTS.get(rule, rule)] for rule in planned if rule not in NOT_COUNTED}
    assert ours == {rule: count for rule, count in planned.items() if rule not in NOT_COUNTED}
    assert set(counts) <= {RULE_COUNTS.get(rule, rule) for rule in planned} | NOT_COUNTED  # nothing we count is extra


def test_lf_without_clean_models_still_trains_its_clean_model():
    config = demo(clean_models=False)
    counts = job_counts(config)
    assert counts["train_model"] == 5 + 1  # badnets, blended, sig, lf, ssba + LF's clean model
    assert counts["defend_model"] == 8  # no runs on that clean model
    assert counts["runs"] == 8 * 5  # none + (FP + FT-SAM) x 2 SPC


@pytest.fixture(scope="module")
def h100():
    return Throughput(read_throughput(), "h100")


def test_doubling_seeds_doubles_runs_of_data_using_defenses_and_nothing_else(h100):
    one, two = demo(), demo()
    two["mitigation"]["seeds"] = 2
    before, after = estimate(one, h100), estimate(two, h100)
    for name, row in before.defenses.items():
        factor = 2 if DEFENSES.get(name).needs_data else 1
        assert after.defenses[name]["runs"] == factor * row["runs"]
        assert after.defenses[name]["gpu_hours"] == pytest.approx(factor * row["gpu_hours"])
    counts_before, counts_after = job_counts(one), job_counts(two)
    assert counts_after.pop("draw_partition") == 2 * counts_before.pop("draw_partition")
    assert counts_after.pop("runs") - counts_before.pop("runs") == sum(
        row["runs"] for name, row in before.defenses.items() if DEFENSES.get(name).needs_data)
    assert counts_after == counts_before
    trained = [s for s in before.stages if s.rule.startswith("train")]
    assert trained == [s for s in after.stages if s.rule.startswith("train")]


EPOCH_FIELDS = sorted((name, f.name) for name in DEFENSES.names() for f in dataclasses.fields(DEFENSES.get(name).params)
                      if "epochs" in f.name or f.name in ("rounds", "iterations"))


@pytest.mark.parametrize(("name", "epochs"), EPOCH_FIELDS, ids=[f"{n}.{e}" for n, e in EPOCH_FIELDS])
def test_a_defenses_cost_grows_linearly_with_its_epochs(name, epochs):
    base = DEFENSES.get(name).params()
    if epochs != "epochs" and hasattr(base, "epochs"):  # e.g. PBE's adversarial epochs, at most its epochs
        base = dataclasses.replace(base, epochs=1000)
    size = MitigationSize(images=100, classes=10)
    start = getattr(base, epochs) + 10
    costs = [defense_passes(name, dataclasses.replace(base, **{epochs: k * start}), size) for k in (1, 2, 3)]
    assert costs[1] - costs[0] > 0
    assert costs[2] - costs[1] == pytest.approx(costs[1] - costs[0])


def test_bnp_measures_only_the_loaders_last_batch_as_the_survey_code_keeps_only_its_statistics():
    params, forward = DEFENSES.get("bnp").params(), 1 / 3
    gtsrb_spc10 = MitigationSize(images=430, classes=43)  # last batch: 430 - 256 = 174 images
    accuracy_checks = 2 * 430 * forward
    assert defense_passes("bnp", params, gtsrb_spc10) == pytest.approx(174 * forward + accuracy_checks)
    full_last_batch = MitigationSize(images=512, classes=10)  # 512 = 2 x 256: the last batch is full
    assert defense_passes("bnp", params, full_last_batch) == pytest.approx((256 + 2 * 512) * forward)
    pooled = dataclasses.replace(params, statistics="all")
    assert defense_passes("bnp", pooled, gtsrb_spc10) == pytest.approx(3 * 430 * forward)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_registered_defense_declares_its_passes_in_its_registration(name):
    declared = DEFENSES.get(name).passes
    assert declared is not None
    assert declared(DEFENSES.get(name).params(), MitigationSize(images=100, classes=10)) >= 0


def test_a_defense_that_declares_no_passes_is_priced_as_fine_tuning_with_a_warning(monkeypatch):
    from bdsweep.defenses import Defense
    from bdsweep.registry import Entry

    @dataclasses.dataclass(frozen=True)
    class Mine:
        epochs: int = 7

    DEFENSES.entries()
    monkeypatch.setitem(DEFENSES._entries, "mine", Entry("mine", Defense("mine", None, Mine, "fine-tuning"), ""))
    with pytest.warns(UserWarning, match="defense 'mine' declares no passes"):
        assert defense_passes("mine", Mine(), MitigationSize(images=50, classes=10)) == 7 * 50


def test_the_paper_preset_prints_its_129600_runs(capsys, paper_workdir):
    assert bdsweep(["cost", str(PAPER), "--device", "h100"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\s+defense runs\s+runs\s+129,600\s", printed, re.MULTILINE)
    assert re.search(r"^nc\s+3,000\s", printed, re.MULTILINE)  # NC on CIFAR-10 only


def test_the_paper_preset_is_priced_before_blendeds_key_image_is_there_and_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/blended/hello_kitty.jpeg here
    assert bdsweep(["cost", str(PAPER), "--device", "h100", "--json"]) == 0
    printed = capsys.readouterr()
    assert "attacks.blended.image = data/blended/hello_kitty.jpeg is not there yet" in printed.err
    without = json.loads(printed.out)
    place_paper_blended_image(tmp_path)
    assert bdsweep(["cost", str(PAPER), "--device", "h100", "--json"]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and json.loads(printed.out) == without  # the file changes no job and no hour


def test_only_declared_input_files_that_are_absent_are_emptied_at_every_override_level(tmp_path):
    from bdsweep.config import without_missing_input_files

    present = tmp_path / "key.png"
    present.write_bytes(b"")
    config = {"attacks": {"blended": {"image": "nowhere.png", "alpha": 0.3,
                                      "by_dataset": {"cifar10": {"image": str(present),
                                                                 "by_architecture": {"vgg19_bn": {"image": "x.png"}}}}},
                          "badnets": {}}}
    changed, emptied = without_missing_input_files(config)
    assert emptied == ["attacks.blended.image = nowhere.png", "attacks.blended.image = x.png"]
    blended = changed["attacks"]["blended"]
    assert blended["image"] == "" and blended["alpha"] == 0.3
    assert blended["by_dataset"]["cifar10"]["image"] == str(present)
    assert blended["by_dataset"]["cifar10"]["by_architecture"]["vgg19_bn"]["image"] == ""
    assert config["attacks"]["blended"]["image"] == "nowhere.png"  # the given config is left alone


def test_json_output_adds_up(capsys):
    assert bdsweep(["cost", str(DEMO), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    hours = [s["gpu_hours"] for s in result["stages"] if s["unit"] == "passes" and s["gpu_hours"] is not None]
    assert result["total_gpu_hours"] == pytest.approx(sum(hours))
    defend = next(s for s in result["stages"] if s["rule"] == "defend_model")
    assert defend["gpu_hours"] == pytest.approx(sum(row["gpu_hours"] for row in result["defenses"].values()))
    assert sum(row["runs"] for row in result["defenses"].values()) == 45  # 9 models x (none + (FP + FT-SAM) x 2 SPC)


def test_a_missing_throughput_entry_names_the_architecture_and_size(tmp_path, capsys):
    table = read_throughput()
    only_32 = copy.deepcopy(table["devices"]["cpu"])
    only_32["images_per_s"] = {"small_cnn": {32: only_32["images_per_s"]["small_cnn"][32]}}
    throughput = tmp_path / "throughput.yaml"
    throughput.write_text(yaml.safe_dump({"devices": {"cpu": only_32}}))
    config = read_config(DEMO)
    config["datasets"]["digits"]["image_size"] = 64  # not listed, but estimated from its registered GFLOPs
    result = estimate(validate_config(config), Throughput(read_throughput(throughput), "cpu"))
    assert any("'small_cnn' at 64 px" in warning and "by forward GFLOPs" in warning for warning in result.warnings)
    config["datasets"]["digits"]["image_size"] = 48  # neither listed nor registered at 48 px: refused
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ThroughputError, match=r"architecture 'small_cnn', 48 px\) on device 'cpu'"):
        estimate(validate_config(config), Throughput(read_throughput(throughput), "cpu"))
    assert bdsweep(["cost", str(tmp_path / "config.yaml"), "--device", "cpu", "--throughput", str(throughput)]) == 1
    assert "(architecture 'small_cnn', 48 px)" in capsys.readouterr().err
    assert bdsweep(["cost", str(DEMO), "--device", "tpu"]) == 1
    assert "has no device 'tpu'" in capsys.readouterr().err


def test_an_npz_datasets_sizes_come_from_its_file(tmp_path):
    import numpy as np

    from bdsweep.cost import DatasetFacts, dataset_facts

    path = tmp_path / "mine.npz"
    np.savez(path, x_train=np.zeros((30, 48, 48, 3), np.uint8), y_train=np.arange(30) % 5,
             x_test=np.zeros((12, 48, 48, 3), np.uint8), y_test=np.arange(12) % 6)
    assert dataset_facts({"source": "npz", "path": str(path)}) == DatasetFacts(30, 12, 6, 48)


def test_an_architecture_the_throughput_file_lacks_is_estimated_from_its_registered_gflops(tmp_path):
    from bdsweep.registry import ARCHITECTURES

    rates = {"devices": {"gpu": {"images_per_s": {"small_cnn": {32: 1000.0}}}}, "path": str(tmp_path)}
    throughput = Throughput(rates, "gpu")
    with pytest.warns(UserWarning, match="estimated from 'small_cnn'"):
        rate = throughput.images_per_s("preact_resnet18", 32)
    flops = {name: ARCHITECTURES.entry(name).facts["forward_gflops"][32] for name in ("small_cnn", "preact_resnet18")}
    assert rate == pytest.approx(1000.0 * flops["small_cnn"] / flops["preact_resnet18"])
    assert throughput.images_per_s("small_cnn", 32) == 1000.0  # a listed rate is used as it is


def test_every_registered_architecture_declares_its_forward_gflops_at_32_and_64_px():
    from bdsweep.registry import ARCHITECTURES

    for entry in ARCHITECTURES.entries():
        assert set(entry.facts.get("forward_gflops", {})) >= {32, 64}, entry.name
