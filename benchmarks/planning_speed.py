"""How long Snakemake takes to plan the real workflow, and how much memory, for a configuration
(default: the paper's full grid), and how long a rerun with nothing to do takes.

    python benchmarks/planning_speed.py                      # this checkout, paper preset
    python benchmarks/planning_speed.py --reference b1a88a2  # side by side with a past design

1. Dry run: ``snakemake -n --quiet rules`` in an empty directory: wall time and peak memory (the
   child's maximum resident set, from ``wait4``).
2. No-op rerun: every output of the DAG (listed by ``snakemake --summary``) is created with one
   modification time, empty but for the models' manifests, which list their run files (created
   empty too) as a finished workflow's do, then ``snakemake --cores 1`` must find nothing to do;
   its wall time, which includes checking that every run file a manifest lists exists.

Files a configuration names (a key image, a trigger pattern) are created empty in the scratch
directory: planning checks only that they exist.

``--reference REV`` runs the same measurements on the workflow of git revision REV (extracted
with ``git archive``), e.g. the one-job-per-run design this repository had before the two-level
one, and prints the ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def measured(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run ``command``; its wall seconds, peak resident memory in GB and output."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, output


def snakemake(snakefile: Path, config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--configfile", str(config), *args]


def named_files(config: dict) -> list[str]:
    """The files the attacks' parameters name (Blended's key image, LF's pattern)."""
    return [value for params in (config.get("attacks") or {}).values() if isinstance(params, dict)
            for key, value in params.items() if key in ("image", "pattern") and value]


def finish_manifests(workdir: Path, config: Path, outputs: list[str]) -> None:
    """Write each manifest among ``outputs`` as its model's job would, listing its run files, and
    create those: the no-op rerun checks that every listed run file exists."""
    import json

    sys.path.insert(0, str(REPO / "workflow"))
    from bdsweep import grid, layout
    from bdsweep.config import validate_config

    here = Path.cwd()
    os.chdir(workdir)  # relative paths in the configuration start at the working directory
    try:
        settings = validate_config(yaml.safe_load(config.read_text()))
    finally:
        os.chdir(here)
    manifest_pattern, run_pattern = (layout.under(settings["results"], pattern)
                                     for pattern in (layout.MANIFEST, layout.RUN))
    wanted = set(outputs)
    for model in grid.models(settings):
        manifest = manifest_pattern.format(**model.wildcards())
        if manifest not in wanted:
            continue
        runs = [{"defense": defense, "mitigation": token, "fingerprint": "0" * 12, "batch_percent": 100,
                 "computed": True, "path": run_pattern.format(**model.wildcards(), defense=defense, mitigation=token)}
                for defense, entry in grid.defense_plan(settings, model.dataset, model.architecture).items()
                for token in entry["mitigations"]]  # as stages/defend_model.py writes them
        for run in runs:
            (workdir / run["path"]).parent.mkdir(parents=True, exist_ok=True)
            (workdir / run["path"]).touch()
        (workdir / manifest).parent.mkdir(parents=True, exist_ok=True)
        (workdir / manifest).write_text(json.dumps({"coordinates": model.wildcards(), "runs": runs,
                                                    "computed": len(runs), "reused": 0}))


def measure(snakefile: Path, config: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bdsweep-plan-") as scratch:
        workdir = Path(scratch)
        for name in named_files(yaml.safe_load(config.read_text())):
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (workdir / name).touch()
        plan_s, plan_gb, output = measured(snakemake(snakefile, config, "-n", "--quiet", "rules"), workdir)
        jobs = next(int(line.split()[-1]) for line in output.splitlines() if line.startswith("total"))

        _, _, summary = measured(snakemake(snakefile, config, "--summary"), workdir)
        outputs = [line.split("\t")[0] for line in summary.splitlines()[1:] if "\t" in line]
        finish_manifests(workdir, config, outputs)
        stamp = time.time_ns()
        for name in outputs:  # one modification time for all: no input is newer than its outputs
            path = workdir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            os.utime(path, ns=(stamp, stamp))
        noop_s, noop_gb, output = measured(snakemake(snakefile, config, "--cores", "1"), workdir)
        if "Nothing to be done" not in output:
            sys.exit(f"the no-op rerun found work to do:\n{output[-3000:]}")
    return {"jobs": jobs, "outputs": len(outputs), "plan_s": plan_s, "plan_gb": plan_gb, "noop_s": noop_s,
            "noop_gb": noop_gb}


def reference_checkout(revision: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "Snakefile"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "workflow" / "presets" / "paper.yaml"))
    parser.add_argument("--reference", metavar="REV", help="also measure the workflow of this git revision")
    args = parser.parse_args()
    config = Path(args.config).resolve()

    rows = [("this checkout", measure(REPO / "Snakefile", config))]
    if args.reference:
        with tempfile.TemporaryDirectory(prefix="bdsweep-reference-") as scratch:
            snakefile = reference_checkout(args.reference, Path(scratch))
            rows.append((f"reference {args.reference}", measure(snakefile, config)))

    print(f"config: {config}")
    print(f"{'workflow':<24}{'jobs':>9}{'outputs':>10}{'plan s':>9}{'plan GB':>9}{'no-op s':>9}{'no-op GB':>10}")
    for name, row in rows:
        print(f"{name:<24}{row['jobs']:>9,}{row['outputs']:>10,}{row['plan_s']:>9.1f}{row['plan_gb']:>9.2f}"
              f"{row['noop_s']:>9.1f}{row['noop_gb']:>10.2f}")
    if len(rows) == 2:
        ours, reference = rows[0][1], rows[1][1]
        print(f"speed-up: plan {reference['plan_s'] / ours['plan_s']:.1f}x, no-op rerun "
              f"{reference['noop_s'] / ours['noop_s']:.1f}x; memory {reference['plan_gb'] / ours['plan_gb']:.1f}x less")


if __name__ == "__main__":
    main()
