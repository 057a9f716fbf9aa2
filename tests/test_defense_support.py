"""The helpers defenses share: FORK's validation split of the mitigation data (never test data), batches,
accuracy; and the mitigation data the defend stage hands a defense."""

from __future__ import annotations

import pytest
import torch

from bdsweep.defenses import MitigationData
from bdsweep.defenses.support import accuracy, batches, layer_outputs, split_held_out
from bdsweep.engine import Normalisation
from bdsweep.models import create_model
from bdsweep.partition import draw_partition
from bdsweep.runs import mitigation_data

NORMALISATION = Normalisation((0.5,) * 3, (0.25,) * 3, hflip=True)


def mitigation(spc: int, classes: int = 5, spare: bool = False) -> MitigationData:
    """``spc`` images per class, class by class, each image's first pixel its position in its
    class's draw (so a test can tell which were drawn first); with ``spare``, the extra draw
    (position ``spc``)."""
    labels = torch.arange(classes).repeat_interleave(spc)
    images = torch.randint(0, 256, (len(labels), 8, 8, 3), dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(spc).repeat(classes).to(torch.uint8)
    extra = mitigation(1, classes) if spare else None
    if extra is not None:
        extra.images[:, 0, 0, 0] = spc
    return MitigationData(images, labels, NORMALISATION, 8, classes, spare=extra)


def positions(data: MitigationData) -> dict[int, list[int]]:
    """Draw positions per class."""
    return {c: sorted(data.images[data.labels == c][:, 0, 0, 0].tolist()) for c in data.labels.unique().tolist()}


@pytest.mark.parametrize("spc, fit_positions, held_positions", [
    (1, [1], [0]),  # FORK raises SPC 1 and 2 by one image: 10 % of SPC is under one
    (2, [1, 2], [0]),  # 2 fit + 1 held out, the extra draw fitting
    (10, list(range(1, 10)), [0]),  # 9 + 1
    (100, list(range(10, 100)), list(range(10))),  # 90 + 10
])
def test_the_split_is_forks_first_ten_percent_of_each_class_with_the_extra_draw(spc, fit_positions, held_positions):
    data = mitigation(spc, spare=True)
    fit, held, note = split_held_out(data, torch.Generator().manual_seed(0))
    assert note is None and fit.spare is None and held.spare is None
    assert positions(fit) == {c: fit_positions for c in range(5)}
    assert positions(held) == {c: held_positions for c in range(5)}
    # Fixed by the draw, not by the defense's generator: every defense holds out the same images.
    again, held_again, _ = split_held_out(data, torch.Generator().manual_seed(1))
    assert torch.equal(fit.images, again.images) and torch.equal(held.images, held_again.images)


def test_without_an_extra_image_the_split_fits_on_one_fewer_and_says_so():
    fit, held, note = split_held_out(mitigation(spc=2), torch.Generator().manual_seed(0))
    assert positions(fit) == {c: [1] for c in range(5)} and positions(held) == {c: [0] for c in range(5)}
    assert "no extra mitigation image" in note


def test_a_single_image_class_without_an_extra_image_is_shared_and_the_note_says_so():
    fit, held, note = split_held_out(mitigation(spc=1), torch.Generator().manual_seed(0))
    assert len(fit) == len(held) == 5 and "overlap" in note


def test_the_defend_stage_hands_over_the_spc_images_in_draw_order_and_the_extra_draw(prepared):
    partition = draw_partition(prepared.y_train[:], 4, 2, seed=0, dataset="synthetic")
    data = mitigation_data(prepared, partition, torch.device("cpu"))
    # A defense that does not split (FT) trains on exactly the SPC images, as FORK's val_ratio=0 draw.
    assert torch.equal(data.images, torch.from_numpy(prepared.x_train[partition[:, :2].ravel()]))
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(data.spare.images, torch.from_numpy(prepared.x_train[partition[:, 2]]))
    fit, held, note = split_held_out(data)
    assert note is None
    assert torch.equal(held.images, torch.from_numpy(prepared.x_train[partition[:, 0]]))
    assert torch.equal(fit.images, torch.from_numpy(prepared.x_train[partition[:, 1:].ravel()]))
    assert mitigation_data(prepared, None, torch.device("cpu")).spare is None


def test_batches_cover_the_data_once_normalised_and_accuracy_is_in_eval_mode():
    data = mitigation(spc=3)
    seen = [(x, y) for x, y in batches(data, 4, torch.Generator().manual_seed(1), augment=True)]
    assert [len(y) for _, y in seen] == [4, 4, 4, 3]
    assert sorted(torch.cat([y for _, y in seen]).tolist()) == sorted(data.labels.tolist())
    x, _ = next(batches(data, 15))
    assert torch.allclose(x, (data.images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25)
    model = create_model("small_cnn", 5, 8).train()
    with layer_outputs(model, [model.parts.classifier]) as outputs:
        value = accuracy(model, data)
    assert 0 <= value <= 1 and model.training and outputs[model.parts.classifier].shape == (15, 5)
