"""FP against the survey's code: the ranking of the first Linear's input on the shared fixture
(fp.npz) and FORK's stop rule on given validation-accuracy sequences (fp_stop_rule.json), with the
corrected rule ("keep the last level that passed") beside it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bdsweep.defenses.fp as fp
from bdsweep.defenses import MitigationData
from bdsweep.engine import Normalisation
from bdsweep.models import create_model
from conftest import SHARED, requires_shared

REFERENCE = SHARED / "reference"
pytestmark = pytest.mark.usefixtures("one_thread")


def stop_cases():
    path = REFERENCE / "fp_stop_rule.json"
    return json.loads(path.read_text())["cases"] if path.exists() else []


@requires_shared(REFERENCE / "fp.npz")
def test_the_ranking_equals_the_survey_code_on_the_fixture():
    fx, golden = np.load(REFERENCE / "small_cnn_fixture.npz"), np.load(REFERENCE / "fp.npz")
    model = create_model("small_cnn", 10, 32)
    model.load_state_dict({k[2:]: torch.from_numpy(fx[k]) for k in fx.files if k.startswith("w/")})
    model.eval()
    rank = golden["rank_idx"]
    data = MitigationData(torch.from_numpy(fx["images"][rank]), torch.from_numpy(fx["labels"][rank]),
                          Normalisation(tuple(fx["normalised_mean"]), tuple(fx["normalised_std"]), True), 32, 10)
    layer = fp.first_linear(model)
    assert layer == str(golden["ranked_layer_input_of"])
    activation = fp.mean_input_activation(model, data, layer)
    np.testing.assert_allclose(activation.numpy(), golden["activation"], rtol=1e-5)
    assert torch.argsort(activation, stable=True).tolist() == golden["seq_sort"].tolist()
    assert len(activation) * float(golden["once_prune_ratio"]) <= int(golden["step"])  # ceil(64 * 0.01) = 1


@requires_shared(REFERENCE / "fp_stop_rule.json")
@pytest.mark.parametrize("case", stop_cases(), ids=lambda case: case["name"][:40])
def test_the_stop_rule_returns_forks_level_and_the_corrected_one(case):
    accuracies = case["val_acc"]
    # the levels tried end where FORK's loop ended: the rule passes each level before the last
    tried = case["levels_tried"]
    assert len(accuracies) == len(tried)
    for level, value in enumerate(accuracies[1:-1], 1):
        assert fp.level_passes(value, accuracies[0], 0.1), level
    fork = fp.returned_level(accuracies, 0.1, "fork")
    assert fork == case["fork_returned_level"]
    assert fp.masked_units(fork, "fork") == case["fork_returned_masked_count"]  # one unit per level here
    seq_sort = json.loads((REFERENCE / "fp_stop_rule.json").read_text())["seq_sort"]
    assert sorted(seq_sort[:fp.masked_units(fork, "fork")]) == case["fork_returned_masked_channels"]
    corrected = fp.returned_level(accuracies, 0.1, "last_passing")
    assert corrected == case["keep_last_satisfying_level"]
    assert fp.masked_units(corrected, "last_passing") == case["keep_last_satisfying_masked_count_intended"]
    if case["fork_stop_level"] is None:
        assert fp.level_passes(accuracies[-1], accuracies[0], 0.1)
    else:
        assert not fp.level_passes(accuracies[-1], accuracies[0], 0.1)
