"""Build an attack's resource for one dataset (BadNets: its patch and mask)."""

from __future__ import annotations

import json

from ..atomic import write_npz
from ..data.store import PreparedDataset
from ..params import resolve
from ..registry import ATTACKS


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--attack", required=True)
    parser.add_argument("--params", default="{}", type=json.loads, help="attack hyperparameters, JSON")
    parser.add_argument("--out", required=True)


def main(args):
    attack = ATTACKS.get(args.attack)
    params = resolve(attack.params, args.params, f"attack {args.attack!r}")
    write_npz(args.out, **attack.make_resource(PreparedDataset(args.data).info.image_size, params))
