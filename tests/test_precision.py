"""Precision: bf16 autocast is an engine option; fp32 (the survey's toolkit: amp off) is what the
paper preset trains and defends in, and the train and defend-model stages run inside it."""

from __future__ import annotations

import pytest
import torch
import yaml

from bdsweep.config import validate_config
from bdsweep.engine import autocast, precision
from bdsweep.recipe import EngineOptions
from conftest import REPO

CUDA = torch.device("cuda")


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_follows_the_precision_in_force():
    assert isinstance(autocast(CUDA), torch.autocast)  # bf16 by default
    with precision("fp32"):
        assert not isinstance(autocast(CUDA), torch.autocast)
        with precision("bf16"):
            assert isinstance(autocast(CUDA), torch.autocast)
        assert not isinstance(autocast(CUDA), torch.autocast)
    assert isinstance(autocast(CUDA), torch.autocast)
    assert not isinstance(autocast(torch.device("cpu")), torch.autocast)  # never on CPU ...
    with precision("bf16", on_cpu=True):  # ... unless a test asks (tests/test_contract.py)
        cast = autocast(torch.device("cpu"))
        assert isinstance(cast, torch.autocast) and cast.fast_dtype == torch.bfloat16
        with precision("fp32", on_cpu=True):
            assert not isinstance(autocast(torch.device("cpu")), torch.autocast)
    assert not isinstance(autocast(torch.device("cpu")), torch.autocast)
    with pytest.raises(ValueError, match="precision"):
        EngineOptions(precision="fp16")


def test_the_paper_preset_trains_and_defends_in_fp32(paper_workdir):
    paper = validate_config(yaml.safe_load((REPO / "workflow" / "presets" / "paper.yaml").read_text()))
    demo = validate_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    assert paper["engine"]["precision"] == "fp32" and demo["engine"]["precision"] == "bf16"
    rule = (REPO / "workflow" / "rules" / "defend.smk").read_text()
    assert 'precision=CONFIG["engine"]["precision"]' in rule and "--precision {params.precision}" in rule


def test_the_train_stage_runs_inside_the_configured_precision(monkeypatch):
    from bdsweep import engine
    from bdsweep.stages import train as train_stage

    seen = []
    monkeypatch.setattr(train_stage, "train_stage", lambda args, options: seen.append(engine._PRECISION.get()))
    for name in ("fp32", "bf16"):
        train_stage.main(type("Args", (), {"engine": {"precision": name}})())
    assert seen == ["fp32", "bf16"] and engine._PRECISION.get() == "bf16"


def test_every_defense_run_of_a_model_runs_inside_its_precision(monkeypatch):
    from bdsweep import engine
    from bdsweep.stages import defend_model

    seen = []
    monkeypatch.setattr(defend_model, "run_with_retries", lambda *args: seen.append(engine._PRECISION.get()) or {})
    files = defend_model.ModelFiles("model.pt", "metrics.json", "data", None)
    defend_model._start_worker(files, "cpu", precision="fp32")
    defend_model._worker_state["dataset"] = object()  # not opened: the run is a stand-in
    defend_model._run_in_worker(None, "fingerprint", 100)
    assert seen == ["fp32"] and engine._PRECISION.get() == "bf16"
