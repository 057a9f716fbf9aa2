import numpy as np
import pytest

from bdsweep.metrics import attack_metrics, removal_metrics


def test_attack_metrics_on_hand_made_predictions():
    clean_labels = [0, 1, 2, 3, 1]
    clean_predictions = [0, 1, 2, 0, 0]  # 3 of 5 right
    backdoor_labels = [1, 2, 3, 3]
    backdoor_predictions = [0, 0, 3, 1]  # two to the target, one kept its label
    m = attack_metrics(clean_predictions, clean_labels, backdoor_predictions, backdoor_labels, target=0)
    assert m == pytest.approx({"acc": 0.6, "asr": 0.5, "ra": 0.25})


def test_target_class_images_do_not_count_towards_asr_or_ra():
    m = attack_metrics([1], [1], backdoor_predictions=[0, 0, 2], backdoor_labels=[0, 1, 2], target=0)
    assert m["asr"] == pytest.approx(0.5)  # the target-class image predicted 0 is not a success
    assert m["ra"] == pytest.approx(0.5)


def test_removal_metrics():
    pre = {"acc": 0.8, "asr": 0.9, "ra": 0.1}
    post = {"acc": 0.6, "asr": 0.1, "ra": 0.7}
    r = removal_metrics(pre, post)
    assert r["arr"] == pytest.approx(0.25)  # (0.8 - 0.6) / 0.8
    assert r["rdr"] == pytest.approx(0.125)  # (0.8 - 0.7) / 0.8
    assert removal_metrics(pre, pre)["arr"] == 0


def test_metrics_reject_empty_or_mismatched_input():
    with pytest.raises(ValueError):
        attack_metrics([], [], [0], [1], target=0)
    with pytest.raises(ValueError):
        attack_metrics([0], [0], [0], [0], target=0)  # no non-target backdoor image
    with pytest.raises(ValueError):
        attack_metrics(np.zeros(2), np.zeros(3), [0], [1], target=0)
