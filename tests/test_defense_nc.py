"""NC: the MAD anomaly index equals FORK's on the golden norm sets (../shared/reference/nc.json) and
flags only small-norm outliers, the trigger search augments, a class that never succeeds keeps its
first-epoch trigger, FORK's unlearning set (80/20 by position, min-max normalised 8-bit triggers),
reversed masks and patterns stay in [0, 1], the planted target of the digits model is flagged, an
unflagged model comes back unchanged, per-batch unlearning stamps a share of each batch and keeps its
labels, every architecture runs, few data degrade with notes, and the defend stage end to end."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import bdsweep.defenses.nc as nc
from bdsweep.defenses import Defended, MitigationData
from bdsweep.defenses.nc import (
    NCParams,
    StampReversedTriggers,
    anomaly_indices,
    flag_classes,
    fork_unlearning_set,
    reverse_engineer,
    stamp_pixels,
    trigger_terms,
)
from bdsweep.engine import Normalisation
from bdsweep.models import create_model
from bdsweep.registry import ARCHITECTURES, DEFENSES
from conftest import SHARED, defend, requires_shared

NC_GOLDEN = SHARED / "reference" / "nc.json"

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
# Three images per class in batches of three: enough Adam steps for the 3x3 trigger to stand out. On
# 16-px digits the clean classes' own minimal triggers are small and widely spread (L1 ~15-50 of 256
# pixels), so the planted class's MAD index is only ~1.5-1.9: the tests flag at 1.2 instead of 2.
FAST = NCParams(epochs=30, batch_size=3, anomaly_threshold=1.2, unlearn_epochs=5)


def run(model, data, params):
    return DEFENSES.get("nc").run(model, data, params, CPU)


def random_data(n, num_classes, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % num_classes
    return MitigationData(images, labels, Normalisation((0.5,) * 3, (0.25,) * 3, True), size, num_classes)


def test_params_are_validated_by_name():
    with pytest.raises(ValueError, match="unlearn_ratio"):
        NCParams(unlearn_ratio=0.0)
    with pytest.raises(ValueError, match="cost_multiplier"):
        NCParams(cost_multiplier=1.0)


def test_the_anomaly_index_is_the_mad_score_and_flags_only_the_small_outlier():
    norms = torch.tensor([10.0, 11.0, 9.0, 10.0, 12.0, 8.0, 1.0, 40.0])
    index, median, mad = anomaly_indices(norms)
    assert median == pytest.approx(10.0)  # lower middle of 1 8 9 10 | 10 11 12 40 (torch.median, as FORK)
    assert mad == pytest.approx(1.4826 * 1.0)  # |norm - 10| = 0 0 1 1 | 2 2 9 30: the lower middle is 1
    assert index[6] == pytest.approx(9 / 1.4826) and index[7] == pytest.approx(30 / 1.4826)
    flagged, _ = flag_classes(norms, 2.0)
    assert flagged == [6]  # the large outlier (class 7) has an even larger index but is never flagged
    assert flag_classes(torch.tensor([10.0, 11.0, 9.0, 10.5]), 2.0)[0] == []
    _, median, mad = anomaly_indices(norms, interpolated_median=True)
    assert median == pytest.approx(10.0) and mad == pytest.approx(1.4826 * 1.5)  # the mean of the middle two


def test_flagging_differs_between_the_lower_and_the_interpolated_median():
    norms = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 5.4])
    # lower: median 13, MAD 1.4826 x 2, index of 5.4 = 7.6 / 2.97 = 2.56; interpolated: median 13.5,
    # MAD 1.4826 x 2.5, index 8.1 / 3.71 = 2.19
    assert flag_classes(norms, 2.3)[0] == [9] and flag_classes(norms, 2.3, interpolated_median=True)[0] == []


def golden_value(value):
    return float(value) if isinstance(value, str) else value  # "inf" / "nan" as FORK's division gives them


@requires_shared(NC_GOLDEN)
def test_anomaly_index_and_flags_equal_forks_on_every_golden_norm_set():
    cases = json.loads(NC_GOLDEN.read_text())["cases"]
    assert len(cases) == 17
    for case in cases:
        norms = torch.tensor(case["norms"], dtype=torch.float32)
        index, median, mad = anomaly_indices(norms)
        flagged, _ = flag_classes(norms, 2.0)
        assert flagged == case["flagged"], case["name"]  # the list, in FORK's order (by norm)
        assert median == pytest.approx(case["median"], rel=1e-6), case["name"]
        assert mad == pytest.approx(case["mad"], rel=1e-6, abs=0.0), case["name"]
        expected = [golden_value(v) for v in case["anomaly_index"]]
        for got, want in zip(index.tolist(), expected, strict=True):
            if math.isnan(want):
                assert math.isnan(got), case["name"]
            else:
                assert got == pytest.approx(want, rel=1e-6), case["name"]
        minimum = golden_value(case["anomaly_index_of_min"])
        assert float(index[norms.argmin()]) == pytest.approx(minimum, rel=1e-6) or math.isnan(minimum)
        interpolated = case["contrast_not_toolkit"]
        _, median, mad = anomaly_indices(norms, interpolated_median=True)
        assert median == pytest.approx(interpolated["interpolated_median"], rel=1e-5), case["name"]
        assert mad == pytest.approx(interpolated["interpolated_mad"], rel=1e-5), case["name"]


def test_reversed_masks_and_patterns_stay_in_the_unit_interval():
    data = random_data(8, 4, size=8)
    model = create_model("small_cnn", 4, 8).eval().requires_grad_(False)
    # A huge step saturates tanh, so the parametrisation is what keeps the values in [0, 1].
    result = reverse_engineer(model, data, [0, 1, 2, 3], NCParams(epochs=3, batch_size=4, mask_lr=50.0),
                              torch.Generator().manual_seed(0))
    masks, patterns = result["masks"], result["patterns"]
    assert masks.shape == (4, 1, 8, 8) and patterns.shape == (4, 3, 8, 8)
    for values in (masks, patterns):
        assert values.min() >= 0 and values.max() <= 1 and (values < 0.01).any() and (values > 0.99).any()
    assert torch.allclose(result["norms"], masks.flatten(1).sum(1))


def test_the_planted_target_class_has_the_smallest_trigger_and_is_flagged(digits):
    model, data = digits
    result = run(copy.deepcopy(model), data, FAST)
    details = result.details
    norms = details["mask_l1_norms"]
    assert details["flagged_classes"] == [0]  # BadNets target of the fixture
    assert norms[0] == min(norms) and norms[0] < 15  # near the 9-pixel 3x3 trigger
    below_median = [details["anomaly_indices"][c] for c in range(10) if norms[c] < np.median(norms)]
    assert details["anomaly_indices"][0] == max(below_median)
    assert details["anomaly_indices"][0] > FAST.anomaly_threshold and len(details["anomaly_indices"]) == 10
    assert "unlearn_final_loss" in details and all(p.requires_grad for p in result.model.parameters())
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_no_flagged_class_returns_the_model_unchanged_with_a_note(digits):
    model, data = digits
    before = {name: t.clone() for name, t in model.state_dict().items()}
    result = run(model, data, replace(FAST, epochs=2, anomaly_threshold=1e9))
    assert isinstance(result, Defended) and result.model is model and result.details["flagged_classes"] == []
    assert any("no class flagged" in note and "unchanged" in note for note in result.details["notes"])
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again after reverse engineering
    assert "unlearn_final_loss" not in result.details


def test_per_batch_unlearning_stamps_a_share_of_each_batch_and_keeps_the_true_labels():
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :2, :2] = 1.0  # each trigger replaces the top-left 2x2 corner...
    patterns = torch.stack([torch.full((3, 4, 4), 1.0), torch.full((3, 4, 4), 0.5)])  # ...by white or grey
    terms = [trigger_terms(m, p, "none") for m, p in zip(masks, patterns)]
    keep, add = torch.stack([k for k, _ in terms]), torch.stack([a for _, a in terms])
    hook = StampReversedTriggers(keep, add, 0.2, torch.Generator().manual_seed(0))
    images, labels = torch.zeros(20, 3, 4, 4), torch.arange(20)
    stamped, kept, extra = hook.transform(images, labels, torch.arange(20))
    changed = (stamped != images).flatten(1).any(1)
    assert int(changed.sum()) == 4 and torch.equal(kept, labels) and extra is None
    assert torch.equal(images, torch.zeros(20, 3, 4, 4))  # the engine's batch is not modified in place
    corners = stamped[changed][:, :, :2, :2]
    assert ((corners == 1.0) | (corners == 0.5)).all() and (stamped[changed][:, :, 2:, 2:] == 0).all()
    one = hook.transform(torch.zeros(2, 3, 4, 4), torch.arange(2), torch.arange(2))[0]
    assert int((one != 0).flatten(1).any(1).sum()) == 1  # at least one image of a small batch


def forks_numpy_stamp(image: np.ndarray, mask_levels: np.ndarray, trigger_levels: np.ndarray) -> np.ndarray:
    """FORK's stamp as its numpy code computes it from the PNG levels (nc.py:799-814): matplotlib reads a
    PNG as float32 level / 255; the trigger is multiplied back by 255; the float32 sum is cast to uint8."""
    mask_image = np.divide(mask_levels, 255, dtype=np.float32)
    signal = np.divide(trigger_levels, 255, dtype=np.float32) * 255
    with np.errstate(invalid="ignore"):
        return (image * (1 - mask_image) + signal).astype("uint8")


def test_forks_trigger_is_min_max_normalised_rounded_to_8_bits_and_wraps_above_255():
    mask = torch.tensor([[[0.1, 0.3], [0.5, 0.6]]])  # min 0.1, max 0.6: normalised 0, 0.4, 0.8, 1
    pattern = torch.tensor([[0.0, 1.0], [0.5, 0.01]]).expand(3, 2, 2)  # trigger p m: 0, .3, .25, .006
    keep, add = trigger_terms(mask, pattern, "minmax")
    mask_levels = np.array([[0, 102], [204, 255]], dtype=np.uint8)  # floor(255 v + 0.5), as save_image
    trigger_levels = np.array([[0, 255], [213, 5]], dtype=np.uint8)  # min-max of the trigger: 0 1 .833 .02
    assert np.array_equal(np.rint((1 - keep[0].numpy()) * 255), mask_levels)
    assert np.array_equal(np.rint(add.numpy() * 255), np.broadcast_to(trigger_levels, (3, 2, 2)))
    image = torch.tensor([[[200, 10], [100, 250]]], dtype=torch.uint8)[..., None].expand(1, 2, 2, 3)
    stamped = stamp_pixels(image, keep, add, wrap=True)
    expected = forks_numpy_stamp(image[0].numpy(), mask_levels[..., None], trigger_levels[..., None])
    assert np.array_equal(stamped[0].numpy(), expected)
    # (0, 1): 10 x (1 - 102/255) + 255 = 261 wraps to 5 as numpy's cast does (FORK clips only afterwards)
    assert int(stamped[0, 0, 1, 0]) == 5 and int(stamp_pixels(image, keep, add, wrap=False)[0, 0, 1, 0]) == 255
    keep, add = trigger_terms(mask, pattern, "none")
    assert torch.allclose(keep, 1 - mask) and torch.allclose(add, mask * pattern)


def test_forks_unlearning_set_is_the_first_80_percent_clean_and_the_rest_stamped_once_per_flagged_class():
    data = random_data(20, 10, size=4)
    keep = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])  # trigger 0 replaces all, trigger 1 nothing
    add = torch.stack([torch.full((3, 4, 4), 0.5), torch.zeros(3, 4, 4)])
    images, labels = fork_unlearning_set(data, keep, add, NCParams())
    assert len(images) == 16 + 2 * 4  # int(20 x 0.8) clean, then positions 16-19 once per trigger
    assert torch.equal(images[:16], data.images[:16]) and torch.equal(labels[:16], data.labels[:16])
    assert (images[16:20] == 127).all()  # 0.5 x 255 = 127.5, truncated as numpy's cast
    assert torch.equal(images[20:], data.images[16:])  # keep 1, add 0: the image itself
    assert torch.equal(labels[16:], torch.cat([data.labels[16:]] * 2))  # true labels
    assert not any(torch.equal(images[i], data.images[16]) for i in range(16))  # the tail is never seen clean


def test_a_class_that_never_succeeds_keeps_its_first_epoch_trigger():
    data = random_data(8, 4, size=8)
    model = create_model("small_cnn", 4, 8).eval().requires_grad_(False)
    model.classifier.weight.zero_()  # the model always predicts class 3: no trigger for 0 or 1 succeeds, and
    model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # only the L1 cost moves the masks
    never = NCParams(epochs=3, batch_size=4)
    first = reverse_engineer(model, data, [0, 1], replace(never, epochs=1), torch.Generator().manual_seed(0))
    later = reverse_engineer(model, data, [0, 1], never, torch.Generator().manual_seed(0))
    last = reverse_engineer(model, data, [0, 1], replace(never, fallback_mask="last_epoch"),
                            torch.Generator().manual_seed(0))
    assert not later["reached"].any() and later["epochs"].tolist() == [3, 3]
    assert torch.equal(later["masks"], first["masks"]) and torch.equal(later["patterns"], first["patterns"])
    assert not torch.allclose(last["masks"], first["masks"])  # two more Adam steps moved the last one


def test_the_trigger_search_sees_augmented_images(monkeypatch):
    seen = []
    real = nc.batches
    monkeypatch.setattr(nc, "batches", lambda *args, **kwargs: seen.append(kwargs["augment"]) or real(*args, **kwargs))
    data = random_data(4, 2, size=8)
    model = create_model("small_cnn", 2, 8).eval().requires_grad_(False)
    for params in (NCParams(epochs=1), NCParams(epochs=1, search_augment=False)):
        reverse_engineer(model, data, [0, 1], params, torch.Generator().manual_seed(0))
    assert seen == [True, False]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES.names()))
def test_every_architecture_runs_at_spc_1_and_unlearns_a_flagged_class(architecture, monkeypatch):
    # After one Adam step every mask has moved alike, so flagging is forced to reach unlearning; VGG19-BN's
    # 140M parameters make an SGD step slow on a CPU, so it only reverse-engineers (same code path).
    unlearn = architecture != "vgg19_bn"
    monkeypatch.setattr(nc, "flag_classes", lambda norms, threshold, *_: ([0] if unlearn else [], norms * 0))
    torch.manual_seed(0)
    model = create_model(architecture, 4, 32)
    result = run(model, random_data(4, 4), NCParams(epochs=1, unlearn_epochs=1))  # one image per class
    details = result.details
    assert len(details["mask_l1_norms"]) == 4 and details["flagged_classes"] == ([0] if unlearn else [])
    assert any("batch_size" in note for note in details["notes"]) and ("unlearn_final_loss" in details) == unlearn
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in result.model.modules())


def test_too_few_images_to_unlearn_return_the_model_unchanged_with_notes(monkeypatch):
    monkeypatch.setattr(nc, "flag_classes", lambda norms, threshold, *_: ([0], norms * 0))
    model = create_model("small_cnn", 2, 16)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    result = run(model, random_data(1, 2, size=16), NCParams(epochs=1))
    assert result.details["flagged_classes"] and any("cannot train BN" in n for n in result.details["notes"])
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    empty = run(model, random_data(0, 2, size=16), NCParams())
    assert empty.details["flagged_classes"] == [] and "no mitigation data" in empty.details["notes"][0]


def test_defend_stage_end_to_end(digits_backdoor):
    # FORK's defaults (lower median, augmented search, first-epoch fallback, 80/20 set by position with
    # min-max triggers). Measured on this model with the defend stage's seeds for coordinates seed 0-3 (one
    # thread, issue 23): the target 0 always has the smallest mask norm (index 1.33-3.37); class 8 also
    # reaches 1.37-2.12 in three of the four (so "exactly [0]" held on one model and broke on the next);
    # ASR 0.92 -> at most 0.07, ACC 0.95 -> at least 0.93.
    params = {"epochs": 12, "batch_size": 5, "anomaly_threshold": 0.9, "unlearn_epochs": 20, "unlearn_batch_size": 32}
    record = defend(digits_backdoor, "nc", params, out="nc.json")
    assert record["status"] == "ok" and record["pre"]["asr"] > 0.7
    details = record["details"]
    assert len(details["mask_l1_norms"]) == 10 and isinstance(details["notes"], list)
    norms = details["mask_l1_norms"]
    assert min(range(10), key=norms.__getitem__) == 0  # the target's reversed trigger is the smallest
    assert details["flagged_classes"][0] == 0 and "unlearn_final_loss" in details  # flagged first, by norm
    assert record["post"]["asr"] < 0.5 * record["pre"]["asr"] and record["post"]["acc"] > 0.85
