"""Poison a dataset with a data-poisoning attack at one ratio."""

from __future__ import annotations

import json

import numpy as np

from ..atomic import check_arrays, load_arrays, read_npy, write_npz
from ..data.store import PreparedDataset
from ..params import resolve
from ..poison import poison_dataset
from ..registry import ATTACKS

# Resource arrays in pixel values (a trigger image, offsets added to images): outside these the
# poisoned images would be clipped or wrapped silently. Every floating array must be finite.
RESOURCE_RANGES = {"pattern": (0, 255), "signal": (-255, 255), "perturbation": (-255, 255)}


def load_resource(path: str) -> dict:
    """An attack's resource file, checked for finite values and pixel ranges (errors name it)."""
    return check_arrays(path, load_arrays(path, "attack resource"), "attack resource", RESOURCE_RANGES)


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--pool", help="reserved mitigation pool, never poisoned (mitigation.source: reserved_pool; "
                        "default: every training image may be poisoned)")
    parser.add_argument("--resource", required=True, help="the attack's resource file (resources stage)")
    parser.add_argument("--attack", required=True)
    parser.add_argument("--params", default="{}", type=json.loads, help="attack hyperparameters, JSON")
    parser.add_argument("--ratio", required=True, type=float)
    parser.add_argument("--target", required=True, type=int)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--out", required=True)


def main(args):
    data = PreparedDataset(args.data)
    attack = ATTACKS.get(args.attack)
    params = resolve(attack.params, args.params, f"attack {args.attack!r}")
    key = f"{data.info.name}/{args.attack}/{args.ratio:g}"
    reserved = read_npy(args.pool, "mitigation pool") if args.pool else None
    poisoned = poison_dataset(attack, load_resource(args.resource), params,
                              data.x_train, data.y_train[:], data.x_test, data.y_test[:],
                              reserved, args.ratio, args.target, args.seed, key)
    write_npz(args.out, **poisoned.arrays(), effective_ratio=np.float64(poisoned.effective_ratio))
