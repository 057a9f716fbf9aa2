# Configuration, validated before any job runs, and the helpers every rule file uses.
import json
import os
import shlex
import sys

WORKFLOW_DIR = os.path.join(workflow.basedir, "workflow")
sys.path.insert(0, WORKFLOW_DIR)
# Jobs run `python -m bdsweep`; make the package importable there too, installed or not.
# (Snakemake sets OMP_NUM_THREADS to each job's threads, which torch follows.)
shell.prefix(f"export PYTHONPATH={shlex.quote(WORKFLOW_DIR)}; ")

from bdsweep import grid, layout  # noqa: E402
from bdsweep.config import ConfigError, unimplemented, validate_config  # noqa: E402
from bdsweep.figures import FIGURES  # noqa: E402

# Without --configfile: config.yaml of the working directory, else the workflow's own (the demo).
if "datasets" not in config:
    configfile: "config.yaml" if os.path.exists("config.yaml") else os.path.join(workflow.basedir, "config.yaml")


try:
    CONFIG = validate_config(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None
_skipped = unimplemented(config)
if _skipped:
    logger.warning(f"bdsweep: not implemented yet, left out of the grid: {', '.join(_skipped)}")

if max(CONFIG["mitigation"]["spc"]) >= CONFIG["mitigation"]["pool_per_class"]:
    logger.warning("bdsweep: the largest SPC takes the whole reserved pool, so its partitions are identical "
                   "for every seed; raise mitigation.pool_per_class above it for distinct partitions")

RESULTS = CONFIG["results"]
DATA_DIR, POOL, PARTITION, RESOURCE, POISON, MODEL, MODEL_METRICS, MODEL_CURVE, RUN, TABLE, FIGURE = (
    layout.under(RESULTS, pattern)
    for pattern in (layout.DATA_DIR, layout.POOL, layout.PARTITION, layout.RESOURCE, layout.POISON, layout.MODEL,
                    layout.MODEL_METRICS, layout.MODEL_CURVE, layout.RUN, layout.TABLE, layout.FIGURE)
)
LOGS = os.path.join(RESULTS, "logs")
RUN_FILES = [RUN.format(**run) for run in grid.runs(CONFIG)]
FIGURE_NAMES = sorted(FIGURES)
CONDA_ENV = "../../envs/bdsweep.yaml"


wildcard_constraints:
    dataset=r"[^/]+",
    architecture=r"[^/]+",
    attack=r"[^/]+",
    ratio=r"[0-9.e-]+",
    defense=r"[^/]+",
    mitigation=r"nodata|spc[0-9]+-seed[0-9]+",
    spc=r"[0-9]+",
    seed=r"[0-9]+",
    figure=r"[a-z0-9_]+",


def data_files(dataset):
    """The prepared arrays of ``dataset``; meta.json is written last and marks completeness."""
    return os.path.join(DATA_DIR.format(dataset=dataset), "meta.json")


def params_of(section):
    """Rule params: a method's (or the training recipe's) overrides for the job's dataset, as JSON."""
    wildcard = {"attacks": "attack", "defenses": "defense"}.get(section)
    return lambda wildcards: grid.params_json(
        CONFIG, section, wildcards[wildcard] if wildcard else None, wildcards.dataset
    )


def model_coordinates(wildcards):
    return json.dumps({"dataset": wildcards.dataset, "architecture": wildcards.architecture,
                       "attack": wildcards.attack, "ratio": float(wildcards.ratio)})


def defend_inputs(wildcards):
    """A run's inputs; the partition only for defenses that use mitigation data."""
    inputs = {
        "data": data_files(wildcards.dataset),
        "model": MODEL.format(**wildcards),
        "metrics": MODEL_METRICS.format(**wildcards),
        "poison": POISON.format(**wildcards),
    }
    spc, seed = layout.parse_mitigation(wildcards.mitigation)
    if spc is not None:
        inputs["partition"] = PARTITION.format(dataset=wildcards.dataset, spc=spc, seed=seed)
    return inputs


def run_coordinates(wildcards):
    spc, seed = layout.parse_mitigation(wildcards.mitigation)
    return json.dumps({"dataset": wildcards.dataset, "architecture": wildcards.architecture,
                       "attack": wildcards.attack, "ratio": float(wildcards.ratio), "spc": spc, "seed": seed})
