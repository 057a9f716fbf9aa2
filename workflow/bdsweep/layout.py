"""Where every stage's files live, as Snakemake path patterns under the results directory."""

from __future__ import annotations

import re

DATA_DIR = "{results}/data/{dataset}"
POOL = "{results}/partitions/{dataset}/pool.npy"
PARTITION = "{results}/partitions/{dataset}/spc{spc}/seed{seed}.npy"
# {scope}: SHARED_SCOPE for triggers made once per dataset, else the architecture they were
# computed against (LF), so a per-architecture trigger never overwrites another.
RESOURCE = "{results}/resources/{dataset}/{scope}/{attack}.npz"
POISON = "{results}/poison/{dataset}/{scope}/{attack}/{ratio}.npz"
MODEL_DIR = "{results}/models/{dataset}/{architecture}/{attack}/{ratio}"
MODEL, MODEL_METRICS, MODEL_CURVE, MODEL_BACKDOOR = (
    f"{MODEL_DIR}/{name}" for name in ("model.pt", "metrics.json", "curve.csv", "backdoor_test.npz"))
RUN = "{results}/runs/{dataset}/{architecture}/{attack}/{ratio}/{defense}/{mitigation}.json"
# One per model: its run files and their status, written by the job that runs them (the DAG's unit).
MANIFEST = "{results}/manifests/{dataset}/{architecture}/{attack}/{ratio}.json"
TABLE = "{results}/table/runs.parquet"
FIGURE = "{results}/figures/{figure}.{ext}"
SUMMARY = "{results}/tables/{summary}.{ext}"

SHARED_SCOPE = "all"
CLEAN, CLEAN_RATIO = "clean", "0"  # the attack and ratio tokens of a dataset's clean (unpoisoned) models
NO_DATA = "nodata"  # the mitigation wildcard of defenses that use no data
MITIGATION = re.compile(r"spc(?P<spc>\d+)-seed(?P<seed>\d+)")


def under(results: str, pattern: str) -> str:
    """``pattern`` with the results directory filled in and the other wildcards left open."""
    return pattern.replace("{results}", results.rstrip("/"))


def ratio_token(ratio: float) -> str:
    return f"{ratio:g}"


def mitigation_token(spc: int, seed: int) -> str:
    return f"spc{spc}-seed{seed}"


def parse_mitigation(token: str) -> tuple[int | None, int | None]:
    if token == NO_DATA:
        return None, None
    match = MITIGATION.fullmatch(token)
    if not match:
        raise ValueError(f"bad mitigation token {token!r}")
    return int(match["spc"]), int(match["seed"])
