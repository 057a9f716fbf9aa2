"""Defenses: the API guard, and each mechanism's real behaviour on small models."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch
from torch import nn

from bdsweep.defenses import Defended, MitigationData, defense
from bdsweep.defenses.clp import channel_lipschitz
from bdsweep.engine import Normalisation
from bdsweep.errors import RETRY_EXIT_CODE
from bdsweep.params import BatchSize, scale_batch_sizes
from bdsweep.registry import DEFENSES
from bdsweep.runs import recordable
from conftest import defend


@pytest.fixture
def temporary_defense():
    """Register a defense for one test, remove it afterwards."""
    names = []

    def register(name, run, params, needs_data=True):
        names.append(name)
        defense(name, "test double", params, family="fine-tuning", needs_data=needs_data)(run)

    yield register
    for name in names:
        DEFENSES._entries.pop(name, None)


@dataclass(frozen=True)
class SpyParams:
    strength: float = 1.0


def test_a_defense_sees_only_model_mitigation_data_params_and_device(digits_backdoor, temporary_defense,
                                                                     recorded_reads):
    loaded = recorded_reads  # everything the process reads, in order
    seen = {}

    def spy(model, data, params, device):
        seen.update(loaded=list(loaded), model=model, data=data, params=params, device=device)
        return model

    temporary_defense("spy", spy, SpyParams)
    record = defend(digits_backdoor, "spy", {"strength": 2.0})

    # What had been read when the defense ran: training arrays only; no test set, no poison file,
    # no model metrics (which name the target).
    assert set(seen["loaded"]) <= {"x_train", "y_train"}
    assert {"x_test", "y_test", "load_poison", "read_json"} <= set(loaded)  # read afterwards, to evaluate
    # The arguments: exactly these four, with nothing more in them.
    assert list(inspect.signature(DEFENSES.get("spy").run).parameters) == ["model", "data", "params", "device"]
    assert {f.name for f in fields(MitigationData)} == {"images", "labels", "normalisation", "image_size",
                                                         "num_classes", "spare"}
    # The SPC training images of the partition, and its extra draw per class (training images too).
    partition = np.load(digits_backdoor / "spc10.npy")
    x_train = np.load(digits_backdoor / "data" / "x_train.npy")
    assert torch.equal(seen["data"].images, torch.from_numpy(x_train[partition[:, :10].ravel()]))
    assert torch.equal(seen["data"].spare.images, torch.from_numpy(x_train[partition[:, 10]]))
    assert np.bincount(seen["data"].labels.numpy()).tolist() == [10] * 10
    assert seen["params"] == SpyParams(strength=2.0)
    model_state = {k for k, _ in seen["model"].named_modules()} | set(vars(seen["model"]))
    assert not [k for k in model_state if any(w in k.lower() for w in ("target", "trigger", "poison", "meta"))]
    assert record["hyperparameters"] == {"strength": 2.0} and record["status"] == "ok"


def test_mitigation_data_refuses_float_images():
    with pytest.raises(TypeError):
        MitigationData(torch.zeros(2, 8, 8, 3), torch.zeros(2, dtype=torch.long),
                       Normalisation((0,) * 3, (1,) * 3, False), 8, 2)


def test_a_defense_that_breaks_the_model_is_recorded_as_failed(digits_backdoor, temporary_defense):
    def poison_weights(model, data, params, device):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model

    temporary_defense("nan-defense", poison_weights, SpyParams)
    record = defend(digits_backdoor, "nan-defense")
    assert record["status"] == "failed" and "non-finite" in record["reason"]
    assert record["post"] is None and record["pre"]["asr"] > 0.5


def test_none_leaves_the_model_as_it_is(digits_backdoor):
    record = defend(digits_backdoor, "none", partition=False)
    assert record["post"] == pytest.approx(record["pre"])
    assert record["removal"]["arr"] == pytest.approx(0) and record["spc"] == 10


def test_fine_tuning_on_clean_data_removes_a_planted_backdoor(digits_backdoor):
    record = defend(digits_backdoor, "ft", {"epochs": 30, "lr": 0.1, "batch_size": 32})
    assert record["pre"]["asr"] > 0.7
    assert record["post"]["asr"] < 0.3 * record["pre"]["asr"]
    assert record["post"]["acc"] > 0.85
    assert record["post"]["ra"] > record["pre"]["ra"]


def test_clp_runs_without_data_and_prunes(digits_backdoor):
    # CLP is deterministic (no data, no randomness). On this four-conv model with the survey's formula it
    # barely touches the backdoor: measured u 2.0-3.0 prune 3-1 channels, ASR 0.92 -> 0.89-0.93, ACC 0.95 ->
    # 0.79-0.84 (u 1.5 prunes 14 and ruins the model). So this checks the data-free path and the pruning, at
    # the default u = 3 (issue 23: an earlier model of this fixture lost 0.1 of ASR at 2.5; this one does not).
    record = defend(digits_backdoor, "clp", {}, partition=False)
    assert record["status"] == "ok" and record["hyperparameters"]["u"] == 3.0
    assert record["details"]["pruned_channels"] >= 1
    assert record["post"]["asr"] < record["pre"]["asr"] and record["post"]["acc"] > 0.8


def conv_bn(out_channels=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, out_channels, 3, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.1, 0.1)
    return model


def test_channel_lipschitz_is_the_top_singular_value_of_the_scaled_kernel():
    model = conv_bn()
    conv, bn = model[0], model[1]
    for bn_eps, eps in ((False, 0.0), (True, bn.eps)):  # FORK's sigma (no eps) by default; eps on request
        ours = channel_lipschitz(conv, bn, bn_eps).detach().numpy()
        scale = (bn.weight / torch.sqrt(bn.running_var + eps)).abs().detach().numpy()
        for k in range(8):
            kernel = conv.weight[k].detach().numpy().reshape(3, -1) * scale[k]
            assert ours[k] == pytest.approx(np.linalg.svd(kernel, compute_uv=False)[0], rel=1e-5)


def test_clp_prunes_exactly_the_channels_above_mean_plus_u_std_and_needs_no_data():
    model = conv_bn(out_channels=16)
    with torch.no_grad():
        model[0].weight[5] *= 40  # a planted high-Lipschitz channel
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lipschitz = channel_lipschitz(model[0], model[1]).detach()
    expected = set(torch.nonzero(lipschitz > lipschitz.mean() + 3 * lipschitz.std()).flatten().tolist())
    assert expected == {5}
    no_data = MitigationData(torch.zeros(0, 8, 8, 3, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                             Normalisation((0,) * 3, (1,) * 3, False), 8, 2)
    result = DEFENSES.get("clp").run(model, no_data, DEFENSES.get("clp").params(), torch.device("cpu"))
    assert isinstance(result, Defended) and result.details["pruned_channels"] == 1
    bn = result.model[1]
    assert bn.weight[5] == 0 and bn.bias[5] == 0
    keep = [k for k in range(16) if k != 5]
    assert torch.equal(bn.weight[keep], before["1.weight"][keep])
    assert torch.equal(result.model[0].weight, before["0.weight"])


@dataclass(frozen=True)
class BatchedParams:
    batch_size: BatchSize = 128
    unlearn_batch_size: BatchSize = 64
    epochs: int = 3


def test_out_of_memory_fails_the_job_without_a_run_file_and_the_retry_halves_the_batches(
        digits_backdoor, temporary_defense):
    """Simulated on CPU: a defense that needs batches of at most 32 to fit in "device memory"."""
    seen = []

    def needs_small_batches(model, data, params, device):
        seen.append((params.batch_size, params.unlearn_batch_size, params.epochs))
        if params.batch_size > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model

    temporary_defense("memory-hungry", needs_small_batches, BatchedParams)
    from bdsweep.cli import main

    out = digits_backdoor / "oom.json"
    argv = ["defend", "--model", str(digits_backdoor / "model.pt"), "--model-metrics",
            str(digits_backdoor / "metrics.json"), "--data", str(digits_backdoor / "data"), "--backdoor",
            str(digits_backdoor / "poison.npz"), "--partition", str(digits_backdoor / "spc10.npy"),
            "--defense", "memory-hungry", "--device", "cpu", "--out", str(out)]
    attempts = [100, 50, 25]  # by hand (`bdsweep defend --batch-percent`); defend-model halves per run itself
    assert [main([*argv, "--batch-percent", str(p)]) for p in attempts[:2]] == [RETRY_EXIT_CODE] * 2
    assert not out.exists()  # a job failure, not a result
    assert main([*argv, "--batch-percent", str(attempts[2])]) == 0
    assert seen == [(128, 64, 3), (64, 32, 3), (32, 16, 3)]  # every batch size scaled, nothing else
    record = json.loads(out.read_text())
    assert record["status"] == "ok" and record["hyperparameters"]["batch_size"] == 32
    assert any("scaled to 25 %" in note for note in record["details"]["notes"])


def test_batch_scaling_keeps_at_least_one_image():
    assert scale_batch_sizes(BatchedParams(batch_size=3, unlearn_batch_size=1), 25) == BatchedParams(1, 1, 3)


def test_smoke_settings_name_hyperparameters_and_default_to_none(temporary_defense):
    with pytest.raises(ValueError, match=r"smoke names no hyperparameter \['epochs'\]"):
        defense("smoky", "test double", SpyParams, family="fine-tuning", smoke={"epochs": 1})
    assert "smoky" not in DEFENSES.names()
    temporary_defense("plain", lambda model, data, params, device: model, SpyParams)
    assert DEFENSES.get("plain").smoke == {}


def test_non_finite_details_are_recorded_as_strings_the_run_file_can_hold():
    details = {"anomaly_indices": [float("nan"), 0.5, float("inf")], "mad": 0.0, "limits": (float("-inf"), 1)}
    recorded = recordable(details)
    assert recorded == {"anomaly_indices": ["nan", 0.5, "inf"], "mad": 0.0, "limits": ("-inf", 1)}
    json.dumps(recorded, allow_nan=False)
