"""CLP against the survey's code: FORK's scores and pruned sets on the shared fixture (clp.npz, with
and without eps), u = 3 everywhere, and a finite answer where FORK crashes (zero running variance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bdsweep.defenses.clp import CLPParams, channel_lipschitz, channel_lipschitz_pruning
from bdsweep.models import conv_bn_pairs, create_model
from conftest import SHARED, requires_shared

REFERENCE = SHARED / "reference"
pytestmark = pytest.mark.usefixtures("one_thread")


def fixture_model():
    fx = np.load(REFERENCE / "small_cnn_fixture.npz")
    model = create_model("small_cnn", 10, 32)
    model.load_state_dict({k[2:]: torch.from_numpy(fx[k]) for k in fx.files if k.startswith("w/")})
    return model.eval()


@requires_shared(REFERENCE / "clp.npz")
@pytest.mark.parametrize("u", [3.0, 2.5])
@pytest.mark.parametrize("bn_eps", [False, True])
def test_clp_equals_the_survey_code_on_the_fixture(u, bn_eps):
    golden = np.load(REFERENCE / "clp.npz")
    prefix = "eps/" if bn_eps else ""
    model = fixture_model()
    for conv, bn, name in conv_bn_pairs(model):
        scores = channel_lipschitz(conv, bn, bn_eps).detach().numpy()
        np.testing.assert_allclose(scores, golden[f"{prefix}scores/{name}"], rtol=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = channel_lipschitz_pruning(model, None, CLPParams(u=u, bn_eps=bn_eps), torch.device("cpu"))
    pruned = result.details["pruned"]
    tag = "u3" if u == 3.0 else "u2.5"
    for name in golden["layers"]:
        expected = golden[f"{prefix}pruned_{tag}/{name}"].tolist()
        assert pruned.get(str(name), []) == expected, name
        bn = result.model.get_submodule(str(name))
        zeroed = torch.nonzero((bn.weight == 0) & (bn.bias == 0)).flatten().tolist()
        assert zeroed == expected
        keep = [k for k in range(len(bn.weight)) if k not in expected]
        assert torch.equal(bn.weight[keep], before[f"{name}.weight"][keep])
    # the one eps-sensitive channel: FORK prunes features.12 channel 7, the eps variant channel 42
    if u == 3.0:
        assert pruned["features.12"] == ([4, 42] if bn_eps else [4, 7])


def test_the_default_is_forks_formula_with_u_3():
    assert CLPParams() == CLPParams(u=3.0, bn_eps=False)


def test_a_zero_variance_channel_scores_finitely_with_sigma_sqrt_eps_and_is_pruned_not_crashing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].running_var[3] = 0.0  # a dead channel: FORK divides by zero and torch.svd raises
        model[1].running_var[9] = 0.0
        model[1].weight[9] = 0.0  # dead and switched off: 0, not NaN
    conv, bn = model[0], model[1]
    scores = channel_lipschitz(conv, bn).detach()
    assert torch.isfinite(scores).all()
    expected = torch.linalg.matrix_norm(conv.weight[3].reshape(3, -1) * bn.weight[3].abs() / bn.eps ** 0.5, ord=2)
    assert float(scores[3]) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert scores[9] == 0
    others = [k for k in range(16) if k not in (3, 9)]
    assert torch.allclose(scores[others], channel_lipschitz(conv, bn, bn_eps=True).detach()[others], rtol=1e-3)
    result = channel_lipschitz_pruning(model, None, CLPParams(), torch.device("cpu"))
    assert result.details["pruned"] == {"1": [3]}  # |gamma| / sqrt(1e-5) stands far above the rest
    assert result.details["zero_variance_channels"] == 2 and result.details["notes"]
    assert torch.isfinite(result.model(torch.randn(2, 3, 8, 8))).all()
