"""The results table, from hand-made run files."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pytest

from bdsweep.figures import draw
from bdsweep.results import SCHEMA_VERSION, UnreadableRunFiles, aggregate

COLUMNS = {"schema_version", "dataset", "architecture", "attack", "ratio", "effective_ratio", "target", "defense",
           "family", "spc", "seed", "pre_acc", "pre_asr", "pre_ra", "post_acc", "post_asr", "post_ra", "arr", "rdr",
           "status", "reason", "wall_time_s", "peak_memory_bytes", "peak_memory_kind", "device", "acc_below_gate",
           "asr_below_gate", "batch_percent", "hyperparameter_hash", "hyperparameters", "details", "versions", "path"}


def record(defense="ft", family="fine-tuning", spc=10, seed=0, post_asr=0.1, status="ok", ratio=0.1):
    post = None if status != "ok" else {"acc": 0.85, "asr": post_asr, "ra": 0.8}
    return {
        "schema_version": SCHEMA_VERSION, "dataset": "digits", "architecture": "small_cnn", "attack": "badnets",
        "ratio": ratio, "spc": spc, "seed": seed, "defense": defense, "family": family, "target": 0,
        "effective_ratio": ratio, "hyperparameters": {"epochs": 3}, "hyperparameter_hash": "abc",
        "pre": {"acc": 0.9, "asr": 0.95, "ra": 0.05}, "post": post,
        "removal": {"arr": (0.9 - 0.85) / 0.9, "rdr": (0.9 - 0.8) / 0.9} if post else None,
        "status": status, "reason": None if status == "ok" else "boom", "details": {}, "wall_time_s": 1.0,
        "peak_memory_bytes": 10, "peak_memory_kind": "process_rss", "device": "cpu",
        "model_sanity": {"acc_below_gate": False, "asr_below_gate": False}, "versions": {"torch": "x"},
    }


def write_runs(tmp_path, records):
    paths = []
    for i, rec in enumerate(records):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(rec))
        paths.append(path)
    return paths


def test_table_has_one_row_per_run_and_the_documented_columns(tmp_path):
    records = [record(), record(seed=1, post_asr=0.3), record("clp", "pruning", None, None), record(status="failed")]
    table = aggregate(write_runs(tmp_path, records), tmp_path / "t.parquet", tmp_path / "log")
    assert len(table) == 4 and set(table.columns) == COLUMNS
    read = pd.read_parquet(tmp_path / "t.parquet")
    assert read["post_asr"].tolist()[:2] == [0.1, 0.3] and pd.isna(read["post_asr"].iloc[3])
    assert read["spc"].isna().tolist() == [False, False, True, False]
    assert json.loads(read["hyperparameters"].iloc[0]) == {"epochs": 3}
    assert "failed per defense: {'ft': 1}" in (tmp_path / "log").read_text()


def test_the_table_reads_in_duckdb_with_its_types(tmp_path):
    records = [record(), record(seed=1, post_asr=0.3), record("clp", "pruning", None, None)]
    aggregate(write_runs(tmp_path, records), tmp_path / "t.parquet")
    path = tmp_path / "t.parquet"
    rows = duckdb.sql(f"SELECT defense, spc, post_asr FROM '{path}' ORDER BY defense, post_asr").fetchall()
    assert rows == [("clp", None, 0.1), ("ft", 10, 0.1), ("ft", 10, 0.3)]
    types = {row[0]: row[1] for row in duckdb.sql(f"DESCRIBE SELECT spc, seed, post_asr FROM '{path}'").fetchall()}
    assert types == {"spc": "BIGINT", "seed": "BIGINT", "post_asr": "DOUBLE"}


def test_unreadable_or_foreign_run_files_are_reported_by_path(tmp_path):
    paths = write_runs(tmp_path, [record(), {**record(), "schema_version": 0}])
    (tmp_path / "broken.json").write_text('{"dataset": "dig')
    paths.append(tmp_path / "broken.json")
    with pytest.raises(UnreadableRunFiles) as error:
        aggregate(paths, tmp_path / "t.parquet")
    assert str(paths[1]) in str(error.value) and str(paths[2]) in str(error.value)
    assert str(paths[0]) not in str(error.value)
    assert not (tmp_path / "t.parquet").exists()


def test_aggregation_rereads_only_new_or_changed_run_files(tmp_path):
    paths = write_runs(tmp_path, [record(seed=s) for s in range(3)])
    cache, log = tmp_path / "cache.parquet", tmp_path / "log"
    first = aggregate(paths, tmp_path / "t.parquet", log, cache)
    assert "(0 reused from the cache, 3 read)" in log.read_text()
    paths[1].write_text(json.dumps(record(seed=1, post_asr=0.7)) + " ")  # changed: another size
    new = tmp_path / "new.json"
    new.write_text(json.dumps(record(seed=9)))
    second = aggregate([new, *paths], tmp_path / "t.parquet", log, cache)
    assert "(2 reused from the cache, 2 read)" in log.read_text()
    assert second["seed"].tolist() == [9, 0, 1, 2] and second["post_asr"].tolist() == [0.1, 0.1, 0.7, 0.1]
    assert set(second.columns) == set(first.columns) == COLUMNS
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), second)


def test_an_unreadable_run_file_keeps_the_rest_cached(tmp_path):
    paths = write_runs(tmp_path, [record(seed=s) for s in range(3)])
    cache, log = tmp_path / "cache.parquet", tmp_path / "log"
    paths[2].write_text("{torn")
    with pytest.raises(UnreadableRunFiles, match="run2.json"):
        aggregate(paths, tmp_path / "t.parquet", log, cache)
    paths[2].write_text(json.dumps(record(seed=2)))
    assert len(aggregate(paths, tmp_path / "t.parquet", log, cache)) == 3
    assert "(2 reused from the cache, 1 read)" in log.read_text()
    cache.write_bytes(b"not parquet")  # a damaged cache is rebuilt, not trusted
    assert len(aggregate(paths, tmp_path / "t.parquet", log, cache)) == 3
    assert "(0 reused from the cache, 3 read)" in log.read_text()


def test_a_table_without_successful_runs_is_an_error(tmp_path):
    table = aggregate(write_runs(tmp_path, [record(status="failed")]), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="no successful runs"):
        draw("fig6_boxplots", table, tmp_path / "f.png", tmp_path / "f.pdf")


def test_a_manifest_is_stale_when_a_run_file_it_lists_is_gone_or_it_cannot_be_read(tmp_path, monkeypatch):
    from bdsweep.results import missing_runs

    monkeypatch.chdir(tmp_path)  # manifests list paths relative to the working directory, as the workflow's
    runs = [f"runs/m/{defense}/{token}.json" for defense in ("ft", "clp") for token in ("a", "b")]
    for run in runs:
        (tmp_path / run).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / run).write_text("{}")
    manifest = tmp_path / "manifest.json"
    assert missing_runs(manifest) is None  # absent: Snakemake runs its job anyway
    manifest.write_text(json.dumps({"runs": [{"path": run} for run in runs]}))
    assert missing_runs(manifest) is None
    (tmp_path / runs[1]).unlink()
    assert missing_runs(manifest) == f"1 of its 4 run files missing ({runs[1]})"
    for run in runs[2:]:
        (tmp_path / run).unlink()
    (tmp_path / "runs/m/clp").rmdir()  # a whole defense's directory gone
    assert missing_runs(manifest).startswith(f"3 of its 4 run files missing ({runs[1]}, {runs[2]}, {runs[3]})")
    for damaged in ("", '{"runs": [{"pa', '{"runs": [{"file": "x"}]}', "[]"):
        manifest.write_text(damaged)
        assert missing_runs(manifest).startswith("unreadable")
