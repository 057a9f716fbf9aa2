"""Run result files and the results table.

One JSON file per run (written by the defend stage); the aggregate stage turns them into one
Parquet table with one row per run. Table columns:

- schema_version: of the run file (``SCHEMA_VERSION``); files of another version are refused
- grid coordinates: dataset, architecture, attack, ratio, effective_ratio, target, defense,
  family, spc, seed (spc/seed are null for defenses that use no data)
- pre_acc, pre_asr, pre_ra: the backdoored model before defense; post_acc, post_asr, post_ra:
  after (null when the run failed); arr, rdr: attack-removal metrics (see ``bdsweep.metrics``)
- status ("ok" or "failed"), reason (why it failed), wall_time_s, peak_memory_bytes,
  peak_memory_kind, device
- acc_below_gate, asr_below_gate: the backdoored model failed a sanity gate
- hyperparameter_hash, hyperparameters (JSON), details (JSON), versions (JSON), path
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from .atomic import atomic_path, read_json

SCHEMA_VERSION = 1
METRICS = ("acc", "asr", "ra")
JSON_COLUMNS = ("hyperparameters", "details", "versions")


class UnreadableRunFiles(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} run file(s) cannot be aggregated:\n  " + "\n  ".join(problems))


def table_row(record: dict, path: str) -> dict:
    row = {key: value for key, value in record.items()
           if key not in ("pre", "post", "removal", "model_sanity", *JSON_COLUMNS)}
    for stage in ("pre", "post"):
        for metric in METRICS:
            row[f"{stage}_{metric}"] = (record[stage] or {}).get(metric)
    row.update(record["removal"] or {"arr": None, "rdr": None})
    row.update(record["model_sanity"])
    for column in JSON_COLUMNS:
        row[column] = json.dumps(record.get(column), sort_keys=True)
    row["path"] = str(path)
    return row


def read_runs(paths: list[str | os.PathLike]) -> pd.DataFrame:
    rows, problems = [], []
    for path in paths:
        try:
            record = read_json(path)
            if record.get("schema_version") != SCHEMA_VERSION:
                problems.append(f"{path}: schema version {record.get('schema_version')!r}, expected {SCHEMA_VERSION}")
                continue
            rows.append(table_row(record, path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            problems.append(f"{path}: {error}")
    if problems:
        raise UnreadableRunFiles(problems)
    table = pd.DataFrame(rows)
    for column in ("spc", "seed"):
        if column in table:
            table[column] = table[column].astype("Int64")
    return table


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, engine="pyarrow", index=False)


def aggregate(paths: list[str | os.PathLike], out: str | os.PathLike, log: str | os.PathLike | None = None):
    """Build the table from exactly ``paths``; unreadable files are reported, never dropped."""
    table = read_runs(paths)
    write_table(table, Path(out))
    if log is not None:
        failures = table.loc[table["status"] != "ok", "defense"].value_counts().to_dict()
        Path(log).write_text(f"{len(table)} runs; failed per defense: {failures or 'none'}\n")
    return table
