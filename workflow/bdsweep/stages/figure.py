"""Draw one figure (PNG and PDF) from the results table."""

from __future__ import annotations

import pandas as pd

from ..figures import draw


def add_arguments(parser):
    parser.add_argument("name", help="figure name, e.g. fig6_boxplots")
    parser.add_argument("--table", required=True, help="results table (Parquet)")
    parser.add_argument("--png", required=True)
    parser.add_argument("--pdf", required=True)


def main(args):
    draw(args.name, pd.read_parquet(args.table), args.png, args.pdf)
