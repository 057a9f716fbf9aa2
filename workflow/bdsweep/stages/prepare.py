"""Prepare a dataset: read it from its source, write the canonical uint8 arrays."""

from __future__ import annotations

import json

from ..data.store import write_dataset
from ..registry import SOURCES


def add_arguments(parser):
    parser.add_argument("--name", required=True, help="dataset name (the config key)")
    parser.add_argument("--options", required=True, type=json.loads, help="the dataset's config entry, JSON")
    parser.add_argument("--out", required=True, help="output directory")


def main(args):
    options = args.options
    source = SOURCES.get(options["source"])
    raw = source.load(options)
    write_dataset(args.out, raw, args.name, mean=options.get("mean", source.mean),
                  std=options.get("std", source.std), hflip=options.get("hflip", source.hflip))
