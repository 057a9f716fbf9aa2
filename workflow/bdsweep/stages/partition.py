"""Draw one mitigation partition (SPC images per class, plus FORK's extra draw) from the whole
training set, or from the reserved pool when ``--pool`` is given (``mitigation.source:
reserved_pool``). See ``bdsweep.partition``."""

from __future__ import annotations

from ..atomic import read_npy, write_npy
from ..data.store import PreparedDataset
from ..partition import draw_partition


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--pool", help="reserved mitigation pool to draw from (default: the whole training set)")
    parser.add_argument("--spc", required=True, type=int)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--out", required=True)


def main(args):
    data = PreparedDataset(args.data)
    pool = read_npy(args.pool, "mitigation pool") if args.pool else None
    write_npy(args.out, draw_partition(data.y_train[:], data.info.num_classes, args.spc, args.seed, data.info.name,
                                       pool))
