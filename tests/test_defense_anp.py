"""ANP: masks and perturbations stay in their boxes, pruning is permanent and follows the
held-out accuracy rule, it degrades at tiny SPC, runs on every architecture and end to end."""

from __future__ import annotations

import pytest
import torch

from bdsweep.defenses import Defended, MitigationData
from bdsweep.defenses import anp as anp_module
from bdsweep.defenses.anp import ANPParams, NeuronMasks, choose_threshold, prune
from bdsweep.engine import Normalisation
from bdsweep.models import batch_norms, create_model
from bdsweep.registry import ARCHITECTURES, DEFENSES
from conftest import defend

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def mitigation_data(per_class=3, num_classes=4, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randint(0, 120, (len(labels), size, size, 3), generator=generator, dtype=torch.uint8)
    images[..., 0] += (labels * 40).to(torch.uint8).view(-1, 1, 1)  # a learnable class cue
    return MitigationData(images, labels, Normalisation((0.5,) * 3, (0.25,) * 3, False), size, num_classes)


def small_model(num_classes=4, size=16):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes, size)
    with torch.no_grad():  # BN shifts as after training: a zero shift makes its perturbation moot
        for _, bn in batch_norms(model):
            bn.bias.uniform_(-0.2, 0.2)
    return model


def run_anp(model, data, **params):
    torch.manual_seed(0)
    result = DEFENSES.get("anp").run(model, data, ANPParams(**params), CPU)
    assert isinstance(result, Defended)
    return result


def test_params_validate_and_name_the_hyperparameter():
    # FORK's effective values (config/defense/anp/default.yaml; mask lr = args.lr, anp.py:758)
    assert ANPParams() == ANPParams(eps=0.4, steps=1, alpha=0.2, iterations=2000, lr=0.01, batch_size=256,
                                    updates_per_pass=500, pruning_step=0.05, pruning_max=0.9,
                                    max_accuracy_drop=0.1, round_scores=True, clamp_noise=False, prune_bias=False,
                                    augment_held_out=True, learning_bn_eps=1e-5)
    for name, value in (("eps", -0.1), ("alpha", 1.5), ("iterations", 0), ("pruning_max", 1.0)):
        with pytest.raises(ValueError, match=name):
            ANPParams(**{name: value})


def record_forwards(monkeypatch):
    """(mask, noise, is the mask step, batch size) of every forward pass during the optimisation."""
    seen = []
    original = NeuronMasks.forward

    def record(self, x, mask, noise=None, running_stats=None):
        seen.append((mask.detach().clone(), None if noise is None else [n.detach().clone() for n in noise],
                     mask.requires_grad, len(x)))
        return original(self, x, mask, noise, running_stats)

    monkeypatch.setattr(NeuronMasks, "forward", record)
    return seen


@pytest.mark.parametrize("clamp_noise", [False, True])
def test_masks_stay_in_the_unit_interval_and_the_noise_takes_one_unclamped_signed_step(monkeypatch, clamp_noise):
    seen = record_forwards(monkeypatch)
    eps = 0.3
    # A mask learning rate far too large for [0, 1]: only the clipping keeps the masks inside.
    run_anp(small_model(), mitigation_data(), eps=eps, lr=50.0, iterations=6, batch_size=8, pruning_step=0.45,
            clamp_noise=clamp_noise)
    masks = torch.stack([mask for mask, _, _, _ in seen])
    assert masks.min() >= 0 and masks.max() <= 1
    assert (masks == 0).any() or (masks == 1).any() and (masks < 1).any()  # the clip was active
    # Per update: the PGD forward sees the uniform start in [-eps, eps], the mask step's perturbed
    # forward sees it after one signed step of size eps: start +- eps, NOT clamped back (FORK
    # anp.py:145-155), so about half the neurons end beyond eps; clamp_noise keeps them inside.
    starts = [torch.cat(n) for _, n, step, _ in seen if n is not None and not step]
    ends = [torch.cat(n) for _, n, step, _ in seen if n is not None and step]
    assert len(starts) == len(ends) == 6
    start, end = torch.cat(starts), torch.cat(ends)
    assert start.abs().max() <= eps
    if clamp_noise:
        assert end.abs().max() <= eps + 1e-6 and 0.4 < (end.abs() > eps - 1e-6).float().mean() < 0.6
    else:
        step = (end - start).abs()
        moved = (step - eps).abs() < 1e-6
        assert torch.all(moved | (step < 1e-6)) and moved.float().mean() > 0.9  # sign 0 where no gradient
        assert 0.4 < (end.abs() > eps + 1e-6).float().mean() < 0.6 and end.abs().max() > 1.5 * eps


def test_batches_are_drawn_with_replacement_at_full_size_and_augmented(monkeypatch):
    seen = record_forwards(monkeypatch)
    drawn = []
    original = anp_module.sampled_batch

    def record(data, batch_size, generator, augment):
        x, y = original(data, batch_size, generator, augment)
        drawn.append((x, y, data))
        return x, y

    monkeypatch.setattr(anp_module, "sampled_batch", record)
    # 4 classes x 3 images: 8 fit on, 4 held out; FORK draws full batches of 16 anyway.
    run_anp(small_model(), mitigation_data(), iterations=5, batch_size=16, updates_per_pass=2, pruning_step=0.45)
    assert len(drawn) == 5 and {size for *_, size in seen} == {16}
    x, y, fit = drawn[0]
    assert len(fit) == 8 and len(y) == 16  # more images than there are: some drawn twice
    # Each drawn image is a fit image, shifted by a random crop (augmented): never all identical to it.
    plain = fit.normalisation.normalise(fit.images.permute(0, 3, 1, 2).float() / 255)
    exact = [(plain == image).all(dim=(1, 2, 3)).any() for image in x]
    assert not all(exact)
    x2, _ = original(fit, 400, torch.Generator().manual_seed(0), augment=False)
    matches = torch.stack([(plain == image).all(dim=(1, 2, 3)) for image in x2]).float()
    assert torch.equal(matches.sum(1), torch.ones(400))  # un-augmented: each is exactly one fit image
    counts = matches.sum(0)
    assert counts.min() > 0 and counts.max() > 400 / 8 + 10  # uniform with replacement, not a permutation


@pytest.mark.parametrize("augment_held_out", [True, False])
def test_held_out_accuracy_is_measured_on_augmented_images_as_forks_validation_loader(monkeypatch, augment_held_out):
    calls = []
    real = anp_module.batches

    def record(data, batch_size, generator=None, augment=False, **kwargs):
        calls.append((len(data), augment))
        return real(data, batch_size, generator, augment, **kwargs)

    monkeypatch.setattr(anp_module, "batches", record)
    run_anp(small_model(), mitigation_data(), iterations=1, batch_size=4, augment_held_out=augment_held_out)
    # the unpruned model, then each of the 19 thresholds, on the 4 held-out images
    assert calls == ([(4, True)] * 20 if augment_held_out else [])


def test_masks_are_learnt_with_forks_bn_eps_and_the_model_keeps_its_own(monkeypatch):
    model = create_model("mobilenet_v3_large", 2, 32)
    seen = []
    original = NeuronMasks.forward

    def record(self, x, mask, noise=None, running_stats=None):
        seen.append({bn.eps for _, bn in self.layers})
        return original(self, x, mask, noise, running_stats)

    monkeypatch.setattr(NeuronMasks, "forward", record)
    result = run_anp(model, mitigation_data(per_class=2, num_classes=2, size=32), iterations=1, batch_size=4,
                     augment_held_out=False)
    assert seen == [{1e-5}] * 3  # the PGD, clean and perturbed forward of the one update
    assert {bn.eps for _, bn in batch_norms(result.model)} == {1e-3}


def test_learning_leaves_the_model_alone_and_pruning_zeroes_exactly_the_chosen_bn_weights():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Held-out accuracy stays the same at every threshold here: the last one, 0.9, is chosen.
    result = run_anp(model, mitigation_data(seed=2), lr=5.0, iterations=8, batch_size=8, max_accuracy_drop=1.0,
                     augment_held_out=False)
    details = result.details
    assert details["mask_updates"] == 8 and details["threshold"] == pytest.approx(0.9)
    assert 0 < details["pruned_channels"] < details["neurons"]
    after = result.model.state_dict()
    zeroed, bn_weights = 0, set()
    for name, _ in batch_norms(result.model):
        bn_weights.add(f"{name}.weight")
        pruned = after[f"{name}.weight"] == 0
        zeroed += int(pruned.sum())
        assert torch.equal(after[f"{name}.weight"][~pruned], before[f"{name}.weight"][~pruned])
    assert zeroed == details["pruned_channels"]
    # FORK zeroes the BN weight only (anp.py:274-278): shifts, running statistics, all else untouched.
    for key in after.keys() - bn_weights:
        assert torch.equal(after[key], before[key]), key
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in result.model.modules())


def stub_masks(monkeypatch, accuracy_of_pruned):
    """NeuronMasks of the small model with 4 low masks, and held-out accuracy a function of the number
    of zeroed BN weights."""
    masks = NeuronMasks(small_model(), CPU)
    with torch.no_grad():
        masks.mask.fill_(1.0)
        masks.mask[[3, 40, 77, 150]] = torch.tensor([0.02, 0.12, 0.33, 0.61])

    def held_out_accuracy(model, data):
        return accuracy_of_pruned(sum(int((bn.weight == 0).sum()) for _, bn in masks.layers))

    monkeypatch.setattr(anp_module, "accuracy", held_out_accuracy)
    return masks


def test_threshold_rule_is_forks_last_passing_two_sided_strict(monkeypatch):
    masks = stub_masks(monkeypatch, lambda pruned: 1.0 - 0.04 * pruned)
    originals = [(bn.weight.detach().clone(), bn.bias.detach().clone()) for _, bn in masks.layers]
    threshold, before, after, by_threshold = choose_threshold(masks, None, ANPParams())
    # Two pruned neurons cost 8 % (passes), three 12 % (fails): thresholds 0.15 .. 0.30 pass.
    assert threshold == pytest.approx(0.3) and before == 1.0 and after == pytest.approx(0.92)
    assert len(by_threshold) == 19 and by_threshold[0.35] == pytest.approx(0.88)
    weights = torch.cat([bn.weight.detach() for _, bn in masks.layers])
    assert torch.equal(torch.nonzero(weights == 0).flatten(), torch.tensor([3, 40]))
    biases = torch.cat([bn.bias.detach() for _, bn in masks.layers])
    assert torch.equal(biases, torch.cat([b for _, b in originals]))  # weight only
    # prune_bias zeroes the shifts of the same neurons.
    prune(masks, originals, anp_module.mask_scores(masks, ANPParams()), None, False)
    choose_threshold(masks, None, ANPParams(prune_bias=True))
    biases = torch.cat([bn.bias.detach() for _, bn in masks.layers])
    assert torch.equal(torch.nonzero(biases == 0).flatten(), torch.tensor([3, 40]))


def test_threshold_rule_keeps_the_last_pass_after_a_failure_and_fails_rises_and_exact_ten_percent(monkeypatch):
    # pruned neurons -> accuracy: 1 neuron +20 % (fails: two-sided), 2 exactly -10 % (fails: strict),
    # 3 -5 % (passes, after failures), 4 -50 %.
    sequence = {0: 0.5, 1: 0.6, 2: 0.45, 3: 0.475, 4: 0.25}
    masks = stub_masks(monkeypatch, lambda pruned: sequence[pruned])
    originals = [(bn.weight.detach().clone(), bn.bias.detach().clone()) for _, bn in masks.layers]
    threshold, before, after, by_threshold = choose_threshold(masks, None, ANPParams())
    assert before == 0.5 and threshold == pytest.approx(0.6) and after == 0.475
    assert by_threshold[0.05] == 0.6 and by_threshold[0.15] == 0.45 and by_threshold[0.65] == 0.25
    # No threshold passes a strict 0 % rule; an unpruned accuracy of 0 leaves the rule undefined.
    prune(masks, originals, anp_module.mask_scores(masks, ANPParams()), None, False)
    assert choose_threshold(masks, None, ANPParams(max_accuracy_drop=0.0))[0] is None
    assert int(sum((bn.weight == 0).sum() for _, bn in masks.layers)) == 0
    masks = stub_masks(monkeypatch, lambda pruned: 0.0)
    assert choose_threshold(masks, None, ANPParams(max_accuracy_drop=1.0))[0] is None


def test_scores_are_rounded_to_four_decimals_as_fork_writes_them(monkeypatch):
    masks = stub_masks(monkeypatch, lambda pruned: 1.0)
    with torch.no_grad():
        masks.mask[77] = 0.30004  # written as 0.3000: pruned at threshold 0.3
    scores = anp_module.mask_scores(masks, ANPParams())
    assert scores[77].item() == 0.3 and scores.dtype == torch.float64
    grid = anp_module.thresholds(ANPParams())
    assert len(grid) == 19 and grid[6] == pytest.approx(0.3)
    originals = [(bn.weight.detach().clone(), bn.bias.detach().clone()) for _, bn in masks.layers]
    assert prune(masks, originals, scores, grid[6], False) == 3
    raw = anp_module.mask_scores(masks, ANPParams(round_scores=False))
    assert prune(masks, originals, raw, grid[6], False) == 2


def test_too_few_images_degrade_with_notes():
    # SPC 1: the held-out image of each class is also fitted on.
    result = run_anp(small_model(num_classes=3), mitigation_data(per_class=1, num_classes=3),
                     iterations=3, batch_size=2, pruning_step=0.45)
    notes = " ".join(result.details["notes"])
    assert "overlap" in notes and result.details["mask_updates"] == 3
    # A single image: no batch statistics at all, running statistics instead.
    result = run_anp(small_model(num_classes=1), mitigation_data(per_class=1, num_classes=1),
                     iterations=2, pruning_step=0.45)
    assert "running statistics" in " ".join(result.details["notes"]) and result.details["mask_updates"] == 2
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES.names()))
def test_runs_on_every_architecture(architecture):
    torch.manual_seed(0)
    model = create_model(architecture, 2, 32)
    result = run_anp(model, mitigation_data(per_class=2, num_classes=2, size=32), iterations=1, batch_size=4,
                     pruning_step=0.9)
    assert result.details["neurons"] == sum(bn.num_features for _, bn in batch_norms(model))
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_anp_through_the_defend_stage_lowers_asr(digits_backdoor):
    record = defend(digits_backdoor, "anp", {"iterations": 100})
    assert record["status"] == "ok" and record["post"] is not None
    assert record["details"]["mask_updates"] == 100 and record["details"]["threshold"] is not None
    print(record["pre"], record["post"], record["details"]["pruned_channels"])
    assert record["post"]["asr"] < record["pre"]["asr"] - 0.2
