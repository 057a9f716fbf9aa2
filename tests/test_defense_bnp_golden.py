"""BNP against the survey's code: FORK's score and pruned sets, and the exact KL with and without eps,
on the shared fixture (bnp.npz); FORK's last-batch statistics; zero variances without infinities."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bdsweep.defenses.bnp as bnp
from bdsweep.defenses import MitigationData
from bdsweep.engine import Normalisation
from bdsweep.models import batch_norms, create_model
from conftest import SHARED, requires_shared

REFERENCE = SHARED / "reference"
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def fixture():
    fx = np.load(REFERENCE / "small_cnn_fixture.npz")
    model = create_model("small_cnn", 10, 32)
    model.load_state_dict({k[2:]: torch.from_numpy(fx[k]) for k in fx.files if k.startswith("w/")})
    data = MitigationData(torch.from_numpy(fx["images"]), torch.from_numpy(fx["labels"]),
                          Normalisation(tuple(fx["normalised_mean"]), tuple(fx["normalised_std"]), True), 32, 10)
    return model.eval(), data


@requires_shared(REFERENCE / "bnp.npz")
def test_the_moments_and_both_scores_equal_the_survey_code_on_the_fixture():
    golden = np.load(REFERENCE / "bnp.npz")
    model, data = fixture()
    layers = batch_norms(model)
    moments = bnp.bn_input_moments(model, data, layers)
    for name, bn in layers:
        np.testing.assert_allclose(moments[name].mean.numpy(), golden[f"batch_mean/{name}"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(moments[name].variance().numpy(), golden[f"batch_var/{name}"], rtol=1e-5)
        # the formulas alone, on the stored statistics
        mean, var = torch.from_numpy(golden[f"batch_mean/{name}"]), torch.from_numpy(golden[f"batch_var/{name}"])
        fork = bnp.fork_kl(mean, var, bn.running_mean, bn.running_var)
        np.testing.assert_allclose(fork.numpy(), golden[f"scores/{name}"], rtol=1e-5, atol=1e-6)
        exact = bnp.gaussian_kl(mean, var, bn.running_mean, bn.running_var)
        np.testing.assert_allclose(exact.numpy(), golden[f"exact/scores/{name}"], rtol=1e-5, atol=1e-6)
        exact_eps = bnp.gaussian_kl(mean, var + bn.eps, bn.running_mean, bn.running_var + bn.eps)
        np.testing.assert_allclose(exact_eps.numpy(), golden[f"exact_eps/scores/{name}"], rtol=1e-5, atol=1e-6)
        # and through channel_kl, from our own moments
        np.testing.assert_allclose(bnp.channel_kl(bn, moments[name], exact=False).numpy(), golden[f"scores/{name}"],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(bnp.channel_kl(bn, moments[name]).numpy(), golden[f"exact_eps/scores/{name}"],
                                   rtol=1e-4, atol=1e-6)


@requires_shared(REFERENCE / "bnp.npz")
@pytest.mark.parametrize("mode", ["fork", "exact"])
def test_the_pruned_sets_equal_the_survey_code_on_the_fixture(mode):
    """The golden vector is one unaugmented batch of the 100 images: FORK's last-batch rule with
    100 <= 256 images is that batch, so only the augmentation is switched off for FORK mode."""
    golden = np.load(REFERENCE / "bnp.npz")
    model, data = fixture()
    params = bnp.BNPParams(u=3.0, augment=False) if mode == "fork" else bnp.BNPParams(
        u=3.0, exact_kl=True, statistics="all", augment=False)
    result = bnp.batch_norm_pruning(model, data, params, CPU)
    prefix = "" if mode == "fork" else "exact_eps/"
    for name in golden["layers"]:
        name = str(name)
        expected = golden[f"{prefix}pruned_u3/{name}"].tolist()
        assert result.details["pruned"].get(name, []) == expected, name
        bn = result.model.get_submodule(name)
        assert torch.nonzero((bn.weight == 0) & (bn.bias == 0)).flatten().tolist() == expected
    fork_sets = {"features.1": [4, 16], "features.4": [31], "features.8": [4, 32], "features.12": [4]}
    exact_sets = {"features.1": [16], "features.4": [6], "features.8": [4], "features.12": [4]}
    assert result.details["pruned"] == (fork_sets if mode == "fork" else exact_sets)


def test_the_defaults_are_forks():
    params = bnp.BNPParams()
    assert (params.u, params.exact_kl, params.statistics, params.loader_batch, params.augment, params.copy_bn_eps) == (
        3.0, False, "last_batch", 256, True, 1e-5)


def test_mobilenets_bn_eps_becomes_that_of_forks_copy_unless_switched_off():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = MitigationData(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=generator),
                          torch.arange(4) % 2, Normalisation((0.5,) * 3, (0.25,) * 3, False), 32, 2)
    model = create_model("mobilenet_v3_large", 2, 32)
    assert {bn.eps for _, bn in batch_norms(model)} == {1e-3}
    kept = bnp.batch_norm_pruning(copy.deepcopy(model), data, bnp.BNPParams(copy_bn_eps=0.0), CPU).model
    assert {bn.eps for _, bn in batch_norms(kept)} == {1e-3}
    result = bnp.batch_norm_pruning(model, data, bnp.BNPParams(), CPU)
    assert {bn.eps for _, bn in batch_norms(result.model)} == {1e-5}
    assert any("BN eps set to 1e-05 in 46 layer(s)" in note for note in result.details["notes"])


def test_fork_statistics_come_from_the_last_batch_of_a_shuffle_only():
    data = MitigationData(torch.zeros(300, 2, 2, 3, dtype=torch.uint8), torch.arange(300),
                          Normalisation((0,) * 3, (1,) * 3, False), 2, 300)
    last = bnp.last_batch(data, 256, torch.Generator().manual_seed(0))
    assert len(last) == 300 - 256  # the trailing batch, as DataLoader(shuffle=True) without drop_last
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(last.labels, order[256:])
    assert len(bnp.last_batch(data, 512, torch.Generator().manual_seed(0))) == 300  # one batch: all images


def test_the_default_measures_only_the_last_batch_and_says_how_many_images():
    torch.manual_seed(0)
    model = create_model("small_cnn", 2, 8)
    generator = torch.Generator().manual_seed(0)
    data = MitigationData(torch.randint(0, 256, (300, 8, 8, 3), dtype=torch.uint8, generator=generator),
                          torch.arange(300) % 2, Normalisation((0.5,) * 3, (0.25,) * 3, False), 8, 2)
    result = bnp.batch_norm_pruning(model, data, bnp.BNPParams(), CPU)
    assert result.details["images"] == 300 and result.details["images_measured"] == 44
    result = bnp.batch_norm_pruning(model, data, bnp.BNPParams(statistics="all"), CPU)
    assert result.details["images_measured"] == 300


def zero_variance_case(channel_running_var_zero: bool):
    """A conv-BN model whose running statistics are the data's own (all scores about 0), except one
    channel: channel 3 constant on the data (its conv is 0) but varied in training (running var 1),
    or channel 9 with a zero running variance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2)).eval()
    generator = torch.Generator().manual_seed(0)
    data = MitigationData(torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8, generator=generator),
                          torch.arange(8) % 2, Normalisation((0.5,) * 3, (0.25,) * 3, False), 8, 2)
    with torch.no_grad():
        if not channel_running_var_zero:
            model[0].weight[3] = 0
        moments = bnp.bn_input_moments(model, data, batch_norms(model))["1"]
        model[1].running_mean.copy_(moments.mean)
        model[1].running_var.copy_(moments.variance())
        if channel_running_var_zero:
            model[1].running_var[9] = 0
        else:
            model[1].running_var[3] = 1.0
    return model, data, bnp.bn_input_moments(model, data, batch_norms(model))["1"]


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("channel, running_var_zero", [(3, False), (9, True)])
def test_zero_variances_score_finitely_and_their_channel_is_pruned(exact, channel, running_var_zero):
    model, data, moments = zero_variance_case(running_var_zero)
    assert (moments.variance()[3] == 0) != running_var_zero
    assert torch.isfinite(bnp.channel_kl(model[1], moments, exact)).all()
    # FORK's formula itself is not finite there (log(var_r / 0), or x / 0): the layer mean becomes inf or NaN
    raw = bnp.fork_kl(moments.mean, moments.variance(), model[1].running_mean.double(), model[1].running_var.double())
    assert not torch.isfinite(raw).all()
    params = bnp.BNPParams(exact_kl=exact, statistics="all", augment=False)
    result = bnp.batch_norm_pruning(model, data, params, CPU)
    assert result.details["pruned"] == {"1": [channel]}
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values() if t.is_floating_point())
