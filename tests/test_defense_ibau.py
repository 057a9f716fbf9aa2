"""i-BAU: the perturbed share (FORK's int(0.01 x batch): none below 100 images; at least one on
request), the L2 budget of the universal perturbation when projected (FORK never projects), delta in
the normalised input space, the fixed point on the first batch of a replayed unlearning pass, Adam
with amsgrad, the implicit hypergradient against a closed form and against FORK's golden vectors
(../shared/reference/ibau.npz), every architecture (MobileNetV3's hardsigmoid included), few data with
notes, and the defend stage end to end."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bdsweep.defenses.ibau as ibau
from bdsweep.defenses import Defended, MitigationData
from bdsweep.defenses.ibau import (
    IBAUParams,
    implicit_hypergradient,
    perturbed_count,
    twice_differentiable,
    universal_perturbation,
)
from bdsweep.engine import Normalisation
from bdsweep.models import create_model
from bdsweep.registry import DEFENSES
from bdsweep.results import table_row
from conftest import SHARED, defend, requires_shared

IBAU_GOLDEN = SHARED / "reference" / "ibau.npz"
FIXTURE = SHARED / "reference" / "small_cnn_fixture.npz"

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
NORMALISATION = Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True)


def random_data(per_class=2, classes=10, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = per_class * classes
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)
    return MitigationData(images, torch.arange(classes).repeat(per_class), NORMALISATION, size, classes)


def small_model(classes=10, size=16):
    torch.manual_seed(0)
    return create_model("small_cnn", classes, size)


def run(model, data, **overrides):
    torch.manual_seed(0)  # run_seed() draws from torch's global generator, as the defend stage seeds it
    return DEFENSES.get("i-bau").run(model, data, IBAUParams(**overrides), CPU)


def test_params_are_validated_by_name():
    with pytest.raises(ValueError, match="perturbed_share"):
        IBAUParams(perturbed_share=1.5)
    with pytest.raises(ValueError, match="fixed_point_iterations"):
        IBAUParams(fixed_point_iterations=-1)


def test_the_perturbed_share_is_rounded_down_as_fork_and_at_least_one_image_on_request():
    assert perturbed_count(100, 0.01) == 1  # the authors' batches: exactly their one image
    assert perturbed_count(256, 0.01) == 2  # the toolkit's batches
    assert perturbed_count(99, 0.01) == 0 and perturbed_count(20, 0.01) == 0  # FORK's int(0.2) = 0: none
    assert perturbed_count(20, 0.01, at_least_one=True) == 1 and perturbed_count(5, 0.0, at_least_one=True) == 1
    assert perturbed_count(10, 0.35) == 3 and perturbed_count(3, 1.0) == 3


def test_the_hypergradient_matches_the_implicit_gradient_of_a_quadratic_inner_problem():
    # Inner: 0.5 d'Ad - d'B theta, minimised at d* = A^-1 B theta. Outer: 0.5|d - c|^2 + 0.5|theta|^2,
    # whose total derivative through d*(theta) is theta + (A^-1 B)'(d* - c).
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([1.0, 1.3, 1.6, 2.0], dtype=torch.float64)) @ q.T
    b, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    optimum = torch.linalg.solve(a, b @ theta.detach())
    exact = theta.detach() + torch.linalg.solve(a, b).T @ (optimum - c)

    def hypergradient(iterations):
        grads, _ = implicit_hypergradient(
            optimum, [theta], inner_loss=lambda d: 0.5 * d @ a @ d - d @ (b @ theta),
            outer_loss=lambda d: 0.5 * (d - c).pow(2).sum() + 0.5 * theta.pow(2).sum(),
            fixed_point_lr=0.5, iterations=iterations)  # |I - 0.5 A| <= 0.5: the series converges
        return grads[0]

    assert torch.allclose(hypergradient(80), exact, atol=1e-10)
    assert torch.equal(hypergradient(0), theta.detach())  # K = 0: the direct gradient only
    # K = 5 is the Neumann series cut after five terms: close, not exact, and better than K = 0.
    error_5, error_0 = (hypergradient(5) - exact).norm(), (hypergradient(0) - exact).norm()
    assert 0 < error_5 < 0.05 * error_0


def test_on_a_network_the_implicit_term_changes_the_gradient_and_stays_finite():
    model, data = small_model().eval(), random_data(per_class=1)
    x = data.images.permute(0, 3, 1, 2).float() / 255
    y = data.labels
    params = [p for p in model.parameters()]
    delta = 0.5 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(len(y), 1, 1, 1)
    mask[0] = 1

    def ce(images):
        return nn.functional.cross_entropy(model(NORMALISATION.normalise(images)), y)

    def gradient(iterations):
        grads, _ = implicit_hypergradient(delta, params, lambda d: -ce(x + d) + 1e-3 * d.pow(2).sum(),
                                          lambda d: ce(x + mask * d), fixed_point_lr=0.1, iterations=iterations)
        return torch.cat([g.flatten() for g in grads])

    direct, implicit = gradient(0), gradient(5)
    assert torch.isfinite(implicit).all() and torch.isfinite(direct).all()
    # The direct parts are computed identically, so any difference is the implicit term: small on an
    # untrained net (about 1e-4 of the direct gradient here), far above float round-off.
    assert (implicit - direct).norm() > 1e-5 * direct.norm()


def test_the_universal_perturbation_stays_within_its_l2_budget():
    model, data = small_model().eval(), random_data(per_class=3)
    params = IBAUParams(batch_size=8, perturbation_norm=0.5, inner_lr=1e3, project_l2=True)  # steps far past it

    def ce(inputs, labels):
        return nn.functional.cross_entropy(model(inputs), labels)

    def predict(inputs):
        with torch.no_grad():
            return model(inputs).argmax(1)

    delta, _ = universal_perturbation(ce, predict, NORMALISATION.normalise, data, params,
                                      torch.Generator().manual_seed(0))
    assert delta.shape == (1, 3, 16, 16)
    assert float(delta.norm()) == pytest.approx(0.5, rel=1e-5)  # it reached the boundary, and stopped there
    result = run(small_model(), data, rounds=2, batch_size=8, perturbation_norm=0.5, inner_lr=1e3, project_l2=True)
    assert all(0 < norm <= 0.5 * (1 + 1e-5) for norm in result.details["delta_norms"])
    unbounded = run(small_model(), data, rounds=2, batch_size=8, perturbation_norm=0.5, inner_lr=1e3)
    assert all(norm > 4 * 0.5 for norm in unbounded.details["delta_norms"])  # FORK's default: no projection


def spy_on_hypergradients(monkeypatch):
    """Per call of the hypergradient: (whether delta moved the outer loss, the inner loss at delta)."""
    calls = []
    original = ibau.implicit_hypergradient

    def spy(delta, params, inner_loss, outer_loss, fixed_point_lr, iterations):
        with torch.no_grad():
            calls.append((float(outer_loss(delta)) != float(outer_loss(torch.zeros_like(delta))),
                          float(inner_loss(delta))))
        return original(delta, params, inner_loss, outer_loss, fixed_point_lr, iterations)

    monkeypatch.setattr(ibau, "implicit_hypergradient", spy)
    return calls


def test_below_a_batch_of_100_fork_perturbs_no_image_and_at_least_one_on_request(monkeypatch):
    data = random_data(per_class=2)  # 20 images: batches of 8, 8, 4
    calls = spy_on_hypergradients(monkeypatch)
    result = run(small_model(), data, rounds=2, batch_size=8, inner_lr=1e3)  # a delta large enough to show
    assert [moved for moved, _ in calls] == [False] * 6  # 3 batches x 2 rounds: plain Adam fine-tuning
    assert result.details["perturbed_images"] == 0 and result.details["min_perturbed_per_batch"] == 0
    assert any("no image is perturbed" in note for note in result.details["notes"])
    calls.clear()
    result = run(small_model(), data, rounds=2, batch_size=8, inner_lr=1e3, perturb_at_least_one=True)
    assert [moved for moved, _ in calls] == [True] * 6  # each loss moved by delta
    assert result.details["min_perturbed_per_batch"] == 1 and result.details["perturbed_images"] == 6
    assert any("one image per batch is perturbed" in note for note in result.details["notes"])


def test_the_fixed_point_uses_the_first_batch_of_one_pass_replayed_every_round(monkeypatch):
    data = random_data(per_class=2)
    calls = spy_on_hypergradients(monkeypatch)
    run(small_model(), data, rounds=2, batch_size=8, lr=1e-12, perturb_at_least_one=True)  # the model stays put
    inner = [loss for _, loss in calls]  # per round, the same first batch (one delta per round)
    assert inner[0] == inner[1] == inner[2] and inner[3] == inner[4] == inner[5]
    calls.clear()
    run(small_model(), data, rounds=2, batch_size=8, lr=1e-12, fixed_point_batch="current", perturb_at_least_one=True)
    assert len({round(loss, 6) for _, loss in calls[:3]}) == 3  # each batch its own inner problem


def test_the_unlearning_pass_is_replayed_identically_and_the_search_pass_redrawn():
    data = random_data(per_class=2)
    params = IBAUParams(batch_size=8)
    state = torch.Generator().manual_seed(5).get_state()
    first = [x for x, _ in ibau.unlearning_pass(data, params, state)]
    again = [x for x, _ in ibau.unlearning_pass(data, params, state)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    plain = torch.cat([x for x, _ in ibau.unlearning_pass(data, IBAUParams(batch_size=8, augment=False), state)])
    pixels = data.images.permute(0, 3, 1, 2).float() / 255
    assert not all(any(torch.equal(x, p) for p in pixels) for x in torch.cat(first))  # augmented (crops)
    assert all(any(torch.equal(x, p) for p in pixels) for x in plain)


def test_delta_lives_in_the_normalised_input_space_and_adam_uses_amsgrad(monkeypatch):
    seen = {}
    original = ibau.universal_perturbation

    def spy(cross_entropy, predict, to_input, data, params, generator):
        seen[params.perturbation_space] = to_input(torch.full((1, 3, 2, 2), 0.5))
        return original(cross_entropy, predict, to_input, data, params, generator)

    monkeypatch.setattr(ibau, "universal_perturbation", spy)
    adams = []
    monkeypatch.setattr(torch.optim, "Adam", lambda *args, **kwargs: adams.append(kwargs) or torch.optim.SGD(
        args[0], lr=kwargs["lr"]))
    data = random_data(per_class=1)
    run(small_model(), data, rounds=1)
    run(small_model(), data, rounds=1, perturbation_space="pixel", amsgrad=False)
    assert torch.equal(seen["normalised"], torch.zeros(1, 3, 2, 2))  # (0.5 - 0.5) / 0.25: FORK's Normalize
    assert torch.equal(seen["pixel"], torch.full((1, 3, 2, 2), 0.5))
    assert [kwargs["amsgrad"] for kwargs in adams] == [True, False]


def load_fixture_model():
    fx = np.load(FIXTURE)
    model = create_model("small_cnn", 10, 32)
    model.load_state_dict({k[2:]: torch.from_numpy(fx[k]) for k in fx.files if k.startswith("w/")})
    return model.eval()


@requires_shared(IBAU_GOLDEN)
@pytest.mark.parametrize("case", ["mlp", "small_cnn"])
def test_the_hypergradient_equals_forks_golden_vectors(case):
    golden = np.load(IBAU_GOLDEN)
    if case == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.Tanh(), nn.Linear(8, 3))
        model.load_state_dict({k[len("mlp/w/"):]: torch.from_numpy(golden[k]) for k in golden.files
                               if k.startswith("mlp/w/")})
        model.eval()
    else:
        model = load_fixture_model()
    params = list(model.parameters())
    assert [name for name, _ in model.named_parameters()] == list(golden[f"{case}/param_names"])
    inner_x, inner_y = torch.from_numpy(golden[f"{case}/inner_x"]), torch.from_numpy(golden[f"{case}/inner_y"])
    outer_x, outer_y = torch.from_numpy(golden[f"{case}/outer_x"]), torch.from_numpy(golden[f"{case}/outer_y"])
    rows = torch.from_numpy(golden[f"{case}/outer_perturbed_idx"])
    mask = torch.zeros(len(outer_y), 1, 1, 1).index_fill_(0, rows, 1.0)
    regulariser, fixed_point_lr = float(golden["regulariser"]), float(golden["fixed_point_lr"])

    def inner(d):  # i-bau.py:495-505: mean(-CE) + 0.001 ||d||^2 on the first batch
        return (-nn.functional.cross_entropy(model(inner_x + d), inner_y, reduction="none")).mean() \
            + regulariser * d.norm().pow(2)

    def outer(d):  # :507-520: CE with d added to the chosen rows only
        return nn.functional.cross_entropy(model(outer_x + mask * d), outer_y)

    delta = torch.from_numpy(golden[f"{case}/delta"])
    for k in (5, 0):
        grads, loss = implicit_hypergradient(delta, params, inner, outer, fixed_point_lr, k)
        assert float(loss) == pytest.approx(float(golden[f"{case}/outer_loss"][0]), rel=1e-5)
        for (name, _), grad in zip(model.named_parameters(), grads, strict=True):
            want = torch.from_numpy(golden[f"{case}/K{k}/{name}"])
            assert torch.allclose(grad, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), (case, k, name)
    k5 = torch.cat([torch.from_numpy(golden[f"{case}/K5/{n}"]).flatten() for n, _ in model.named_parameters()])
    k0 = torch.cat([torch.from_numpy(golden[f"{case}/K0/{n}"]).flatten() for n, _ in model.named_parameters()])
    assert (k5 - k0).abs().max() > 1e-4  # the tolerance tells K = 5 from K = 0


@pytest.mark.parametrize("per_class", [1, 0])
def test_spc1_runs_and_no_data_returns_the_model_unchanged(per_class):
    data = random_data(per_class=per_class)
    model = small_model()
    before = copy.deepcopy(model.state_dict())
    result = run(model, data, rounds=1)
    assert isinstance(result, Defended) and result.details["notes"]
    changed = any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())
    assert changed == (per_class > 0)
    if per_class:
        assert "one batch per round" in result.details["notes"][0]
        assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.parametrize("architecture", ["small_cnn", "preact_resnet18", "mobilenet_v3_large"])
def test_every_architecture_unlearns_with_finite_weights_and_keeps_its_structure(architecture):
    torch.manual_seed(0)
    model = create_model(architecture, 4, 32)
    modules = [(name, type(module)) for name, module in model.named_modules()]
    before = copy.deepcopy(model.state_dict())
    data = MitigationData(torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8), torch.tensor([0, 1, 2]),
                          NORMALISATION, 32, 4)
    result = run(model, data, rounds=1, fixed_point_iterations=1, lr=1e-2)
    assert [(name, type(module)) for name, module in result.model.named_modules()] == modules  # hardsigmoid back
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())


def test_twice_differentiable_swaps_hardsigmoid_only_while_active():
    model = nn.Sequential(nn.Linear(3, 3), nn.Hardsigmoid())
    x = torch.randn(4, 3, requires_grad=True)
    with twice_differentiable(model):
        assert not isinstance(model[1], nn.Hardsigmoid)
        assert torch.allclose(model(x), nn.functional.hardsigmoid(model[0](x)))
        (gradient,) = torch.autograd.grad(model(x * x).sum(), x, create_graph=True)
        torch.autograd.grad(gradient.sum(), x)  # fused hardsigmoid raises here
    assert isinstance(model[1], nn.Hardsigmoid)


def test_defend_stage_end_to_end_lowers_asr(digits_backdoor):
    # One round; batches of 10 give ten inner steps and ten outer steps. FORK would perturb no image of a
    # 10-image batch (plain Adam fine-tuning), so the method is checked with one perturbed image per batch.
    record = defend(digits_backdoor, "i-bau", {"rounds": 1, "batch_size": 10, "perturb_at_least_one": True})
    assert record["status"] == "ok" and record["hyperparameters"]["rounds"] == 1
    table_row(record, "ibau.json")  # a valid run record for the aggregate stage
    assert record["pre"]["asr"] > 0.7
    assert record["post"]["asr"] < 0.7 * record["pre"]["asr"] and record["post"]["acc"] > 0.85
    assert record["details"]["min_perturbed_per_batch"] == 1 and record["details"]["delta_norms"][0] > 0
