"""The survey's metrics.

ACC: accuracy on the clean test set. ASR: on the backdoor test set (test images whose true label
is not the target, with the trigger applied), the fraction predicted as the target. RA: the same
images, the fraction predicted as their true label. ARR = (ACC_pre - ACC_post) / ACC_pre and
RDR = (ACC_pre - RA_post) / ACC_pre, where pre is the backdoored model before defense.
"""

from __future__ import annotations

import numpy as np


def attack_metrics(clean_predictions, clean_labels, backdoor_predictions, backdoor_labels, target: int) -> dict:
    clean_predictions, clean_labels = np.asarray(clean_predictions), np.asarray(clean_labels)
    backdoor_predictions, backdoor_labels = np.asarray(backdoor_predictions), np.asarray(backdoor_labels)
    if clean_predictions.shape != clean_labels.shape or backdoor_predictions.shape != backdoor_labels.shape:
        raise ValueError("predictions and labels differ in length")
    non_target = backdoor_labels != target  # images of the target class cannot show an attack
    if not len(clean_labels) or not non_target.any():
        raise ValueError("cannot compute metrics on an empty test set")
    return {
        "acc": float(np.mean(clean_predictions == clean_labels)),
        "asr": float(np.mean(backdoor_predictions[non_target] == target)),
        "ra": float(np.mean(backdoor_predictions[non_target] == backdoor_labels[non_target])),
    }


def removal_metrics(pre: dict, post: dict) -> dict:
    if pre["acc"] <= 0:
        return {"arr": None, "rdr": None}
    return {
        "arr": (pre["acc"] - post["acc"]) / pre["acc"],
        "rdr": None if post["ra"] is None else (pre["acc"] - post["ra"]) / pre["acc"],
    }
