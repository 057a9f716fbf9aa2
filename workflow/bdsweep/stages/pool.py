"""Reserve a dataset's mitigation pool: training images no attack may poison (only with
``mitigation.source: reserved_pool``; by default partitions come from the whole training set)."""

from __future__ import annotations

from ..atomic import write_npy
from ..data.store import PreparedDataset
from ..partition import reserve_pool


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--per-class", required=True, type=int)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--out", required=True)


def main(args):
    data = PreparedDataset(args.data)
    pool = reserve_pool(data.y_train[:], data.info.num_classes, args.per_class, args.seed, data.info.name)
    write_npy(args.out, pool)
