"""Draw one mitigation partition (SPC images per class) from the reserved pool."""

from __future__ import annotations

from ..atomic import read_npy, write_npy
from ..data.store import PreparedDataset
from ..partition import draw_partition


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--spc", required=True, type=int)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--out", required=True)


def main(args):
    data = PreparedDataset(args.data)
    pool = read_npy(args.pool, "mitigation pool")
    write_npy(args.out, draw_partition(pool, data.y_train[:], data.info.num_classes, args.spc, args.seed,
                                       data.info.name))
