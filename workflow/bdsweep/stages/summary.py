"""Write one summary table (CSV and Markdown) from the results table."""

from __future__ import annotations

import pandas as pd

from ..tables import write


def add_arguments(parser):
    parser.add_argument("name", help="summary table name, e.g. medians_by_spc")
    parser.add_argument("--table", required=True, help="results table (Parquet)")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--md", required=True)


def main(args):
    write(args.name, pd.read_parquet(args.table), args.csv, args.md)
