"""Run result files and the results table.

One JSON file per run (written by the defend stage); the aggregate stage turns them into one
Parquet table with one row per run. Table columns:

- schema_version: of the run file (``SCHEMA_VERSION``); files of another version are refused
- grid coordinates: dataset, architecture, attack, attack_type (static or dynamic trigger, as the
  attack registers it; null for clean models), ratio, effective_ratio, target, defense,
  family, featured (one of the defenses the survey discusses), spc, seed (spc/seed are null for defenses
  that use no data)
- pre_acc, pre_asr, pre_ra: the backdoored model before defense; post_acc, post_asr, post_ra:
  after (null when the run failed); arr, rdr: attack-removal metrics (see ``bdsweep.metrics``)
- status ("ok" or "failed"), reason (why it failed), wall_time_s, peak_memory_bytes,
  peak_memory_kind, device
- batch_percent: 100, or the percentage of its batch sizes a run was computed at after running
  out of device memory (``<run>.oom`` beside its file; delete that file to recompute at full size)
- acc_below_gate, asr_below_gate: the backdoored model failed a sanity gate
- hyperparameter_hash, hyperparameters (JSON), details (JSON), versions (JSON), path
- (not in the table) resumed: null, or where the run resumed from an earlier attempt's
  checkpoint (phase number and label, phases saved)
- inputs_fingerprint: what the run depended on (defense, overrides, coordinates, input file
  contents); a run file recording the current fingerprint is up to date (``stages/defend_model``)
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
    def __init__(self, problems: list[str], remedy: str = ""):
        self.problems = problems
        super().__init__(f"{len(problems)} run file(s) cannot be aggregated:\n  " + "\n  ".join(problems)
                         + (f"\n{remedy}" if remedy else ""))


def table_row(record: dict, path: str) -> dict:
    row = {key: value for key, value in record.items()
           if key not in ("pre", "post", "removal", "model_sanity", "resumed", *JSON_COLUMNS)}
    for stage in ("pre", "post"):
        for metric in METRICS:
            row[f"{stage}_{metric}"] = (record[stage] or {}).get(metric)
    row.update(record["removal"] or {"arr": None, "rdr": None})
    row.update(record["model_sanity"])
    for column in JSON_COLUMNS:
        row[column] = json.dumps(record.get(column), sort_keys=True)
    row.setdefault("batch_percent", 100)  # run files written before the column: full batch sizes
    row["path"] = str(path)
    return row


def read_runs(paths: list[str | os.PathLike]) -> pd.DataFrame:
    """The table of exactly ``paths``, in order; unreadable files are reported, never dropped."""
    rows, problems = _read_rows([str(p) for p in paths])
    if problems:
        raise UnreadableRunFiles(problems)
    return _typed(pd.DataFrame(rows))


def _read_rows(paths: list[str], bad: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Rows of ``paths`` and a line per unreadable one (whose path goes to ``bad``)."""
    rows, problems = [], []
    bad = [] if bad is None else bad
    for path in paths:
        try:
            record = read_json(path)
            if record.get("schema_version") != SCHEMA_VERSION:
                problems.append(f"{path}: schema version {record.get('schema_version')!r}, expected {SCHEMA_VERSION}")
                bad.append(path)
                continue
            rows.append(table_row(record, path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            problems.append(f"{path}: {error}")
            bad.append(path)
    return rows, problems


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    for column in ("spc", "seed"):
        if column in table:
            table[column] = table[column].astype("Int64")
    return table


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, engine="pyarrow", index=False)


def _file_stamps(paths: list[str]) -> pd.DataFrame:
    """Size and modification time of each run file: a row read earlier is reused while both match."""
    stamps = [os.stat(path) for path in paths]
    return pd.DataFrame({"path": paths, "file_size": [s.st_size for s in stamps],
                         "file_mtime_ns": [s.st_mtime_ns for s in stamps]})


def _load_cache(cache: Path) -> pd.DataFrame | None:
    try:
        cached = pd.read_parquet(cache)
    except (OSError, ValueError):  # absent, or torn by a crash of an older writer: rebuild
        return None
    if "schema_version" not in cached or not (cached["schema_version"] == SCHEMA_VERSION).all():
        return None
    return cached


def manifest_runs(manifests: list[str | os.PathLike]) -> list[str]:
    """The run files the models' manifests list, in order (the aggregate's inputs)."""
    return list(runs_by_manifest(manifests))


def runs_by_manifest(manifests: list[str | os.PathLike]) -> dict[str, str]:
    """Each run file the models' manifests list, in order, with the manifest that lists it."""
    return {run["path"]: str(manifest) for manifest in manifests for run in read_json(manifest)["runs"]}


def missing_runs(manifest: str | os.PathLike) -> str | None:
    """Why an existing manifest's job must run again although Snakemake sees its output in place:
    a run file it lists is gone, or the manifest cannot be read; None when it is absent (its job
    runs anyway) or every run file it lists exists. Cheap enough for every model at planning: one
    JSON read and one directory listing per defense, not one ``stat`` per run file."""
    try:
        with open(manifest) as handle:
            paths = [run["path"] for run in json.load(handle)["runs"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:  # written atomically, so damaged by hand
        return f"unreadable ({type(error).__name__}: {error})"
    by_directory: dict[str, list[str]] = {}
    for path in paths:
        directory, name = os.path.split(path)
        by_directory.setdefault(directory, []).append(name)
    missing = []
    for directory, names in by_directory.items():
        try:
            present = set(os.listdir(directory or "."))
        except OSError:  # the directory itself is gone
            present = set()
        missing += [os.path.join(directory, name) for name in names if name not in present]
    if not missing:
        return None
    named = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    return f"{len(missing)} of its {len(paths)} run files missing ({named})"


def remake_command(argv: list[str], manifests: list[str]) -> str:
    """The command that recomputes the runs of ``manifests``: the Snakemake command line ``argv``
    (as started) forcing those models' jobs, which recompute every missing, unreadable or stale run
    file of theirs and nothing else."""
    import shlex

    command = ["snakemake", *argv[1:]]
    if "--forcerun" in command:  # an earlier --forcerun with its values: replaced by ours
        start = command.index("--forcerun")
        end = next((i for i in range(start + 1, len(command)) if command[i].startswith("-")), len(command))
        del command[start:end]
    return shlex.join([*command, "--forcerun", *dict.fromkeys(manifests)])


def aggregate(paths: list[str | os.PathLike], out: str | os.PathLike, log: str | os.PathLike | None = None,
              cache: str | os.PathLike | None = None, remedy=None) -> pd.DataFrame:
    """Build the table from exactly ``paths`` (in their order); unreadable files are reported by
    path, never dropped. With ``cache``, rows of run files unchanged since the last aggregation
    (same path, size and modification time) are reused and only new or changed files are read;
    the cache is updated even when some files are unreadable, so their repair costs one reread.
    ``remedy(bad_paths)`` says how to recompute unreadable files; the message goes to ``log`` too."""
    paths = [str(p) for p in paths]
    stamps = _file_stamps(paths) if cache is not None else None
    cached = _load_cache(Path(cache)) if cache is not None else None
    if cached is not None:
        reusable = stamps.merge(cached, on=["path", "file_size", "file_mtime_ns"], how="inner")
        known = set(reusable["path"])
        fresh_paths = [p for p in paths if p not in known]
    else:
        reusable, fresh_paths = None, paths
    bad: list[str] = []
    rows, problems = _read_rows(fresh_paths, bad)
    fresh = pd.DataFrame(rows)
    if stamps is not None and not fresh.empty:
        fresh = fresh.merge(stamps, on="path", how="left")
    parts = [part for part in (reusable, fresh) if part is not None and not part.empty]
    table = _typed(pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())
    if cache is not None and not table.empty:
        write_table(table, cache)
    if problems:
        failure = UnreadableRunFiles(problems, remedy(bad) if remedy is not None else "")
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            Path(log).write_text(f"error: {failure}\n")
        raise failure
    position = pd.Series(range(len(paths)), index=paths)
    table = table.iloc[position[table["path"]].to_numpy().argsort(kind="stable")].reset_index(drop=True)
    table = table.drop(columns=["file_size", "file_mtime_ns"], errors="ignore")
    write_table(table, Path(out))
    if log is not None:
        failures = table.loc[table["status"] != "ok", "defense"].value_counts().to_dict()
        reused = 0 if reusable is None else len(reusable)
        Path(log).write_text(f"{len(table)} runs ({reused} reused from the cache, {len(fresh_paths)} read); "
                             f"failed per defense: {failures or 'none'}\n")
    return table
