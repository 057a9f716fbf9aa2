# Configuration, validated before any job runs, and the helpers every rule file uses.
import json
import os
import re
import shlex
import sys

WORKFLOW_DIR = os.path.join(workflow.basedir, "workflow")
sys.path.insert(0, WORKFLOW_DIR)
# Jobs run `python -m bdsweep`; make the package importable there too, installed or not.
# (Snakemake sets OMP_NUM_THREADS to each job's threads, which torch follows.)
shell.prefix(f"export PYTHONPATH={shlex.quote(WORKFLOW_DIR)}; ")

from bdsweep import grid, layout  # noqa: E402
from bdsweep.config import ConfigError, check_class_sizes, validate_config  # noqa: E402
from bdsweep.figures import FIGURES  # noqa: E402
from bdsweep.results import missing_runs  # noqa: E402
from bdsweep.tables import TABLES  # noqa: E402

try:
    CONFIG = validate_config(config)
    check_class_sizes(CONFIG)
except ConfigError as error:
    raise WorkflowError(str(error)) from None

# mitigation.source: by default (train) partitions come from the whole training set and attacks may
# poison any image, so no job needs a pool; with reserved_pool, partitions, poison files and
# training-time attacks read the dataset's pool (dataset_and_pool below).
RESERVED_POOL = CONFIG["mitigation"]["source"] == "reserved_pool"
if (
    RESERVED_POOL
    and max(CONFIG["mitigation"]["spc"]) + 1 >= CONFIG["mitigation"]["pool_per_class"]
):
    logger.warning(
        "bdsweep: the largest SPC (and its extra validation image) takes the whole reserved pool, so "
        "its partitions hold the same images for every seed; raise mitigation.pool_per_class"
    )

RESULTS = CONFIG["results"]
(
    DATA_DIR,
    POOL,
    PARTITION,
    RESOURCE,
    POISON,
    MODEL,
    MODEL_METRICS,
    MODEL_CURVE,
    MODEL_BACKDOOR,
    RUN,
    MANIFEST,
    TABLE,
    FIGURE,
    SUMMARY,
) = (
    layout.under(RESULTS, pattern)
    for pattern in (
        layout.DATA_DIR,
        layout.POOL,
        layout.PARTITION,
        layout.RESOURCE,
        layout.POISON,
        layout.MODEL,
        layout.MODEL_METRICS,
        layout.MODEL_CURVE,
        layout.MODEL_BACKDOOR,
        layout.RUN,
        layout.MANIFEST,
        layout.TABLE,
        layout.FIGURE,
        layout.SUMMARY,
    )
)
LOGS = os.path.join(RESULTS, "logs")
# The runs of each (dataset, architecture)'s models, as the defend_model rule's `--defenses` (equal
# for every model of the pair, so computed once per pair).
DEFENSE_PLANS = {
    (dataset, architecture): json.dumps(
        grid.defense_plan(CONFIG, dataset, architecture), sort_keys=True
    )
    for dataset in CONFIG["datasets"]
    for architecture in CONFIG["architectures"]
}
MODELS = [MODEL.format(**model.wildcards()) for model in grid.models(CONFIG)]
MANIFESTS = [
    MANIFEST.format(**model.wildcards())
    for model in grid.models(CONFIG)
    if DEFENSE_PLANS[model.dataset, model.architecture] != "{}"
]
FIGURE_NAMES = sorted(FIGURES)
SUMMARY_NAMES = sorted(TABLES)
CONDA_ENV = "../../envs/bdsweep.yaml"
# Attacks that poison inside the training loop have a train rule of their own (train.smk).
TRAINING_TIME_ATTACKS = [
    name for name in CONFIG["attacks"] if grid.is_training_time(name)
]
DATA_POISONING_ATTACKS = [
    name for name in CONFIG["attacks"] if name not in TRAINING_TIME_ATTACKS
] + [layout.CLEAN]
ATTACKS_WITH_RESOURCES = DATA_POISONING_ATTACKS[:-1]


wildcard_constraints:
    dataset=r"[^/]+",
    architecture=r"[^/]+",
    attack=r"[^/]+",
    ratio=r"[0-9.e-]+",
    scope=r"[^/]+",
    defense=r"[^/]+",
    mitigation=r"nodata|spc[0-9]+-seed[0-9]+",
    spc=r"[0-9]+",
    seed=r"[0-9]+",
    figure=r"[a-z0-9_]+",
    summary=r"[a-z0-9_]+",


def data_files(dataset):
    """The prepared arrays of ``dataset``; meta.json is written last and marks completeness."""
    return os.path.join(DATA_DIR.format(dataset=dataset), "meta.json")


def dataset_and_pool(wildcards):
    """A job's inputs ``data`` (the prepared dataset) and, with mitigation.source reserved_pool,
    ``pool`` (the dataset's reserved pool); by default no job reads a pool."""
    inputs = {"data": data_files(wildcards.dataset)}
    if RESERVED_POOL:
        inputs["pool"] = POOL.format(dataset=wildcards.dataset)
    return inputs


def params_of(section):
    """Rule params: a method's (or the training recipe's) overrides for the job's dataset (and
    architecture, where the job has one), as JSON."""
    wildcard = {"attacks": "attack", "defenses": "defense"}.get(section)
    return lambda wildcards: grid.params_json(
        CONFIG,
        section,
        wildcards[wildcard] if wildcard else None,
        wildcards.dataset,
        wildcards.get("architecture"),
    )


def model_coordinates(wildcards):
    return json.dumps(
        {
            "dataset": wildcards.dataset,
            "architecture": wildcards.architecture,
            "attack": wildcards.attack,
            "ratio": float(wildcards.ratio),
        }
    )


def one_of(names):
    """A wildcard constraint matching exactly these names."""
    return "|".join(map(re.escape, names)) or "(?!)"


def clean_model(dataset, architecture):
    return MODEL.format(
        dataset=dataset,
        architecture=architecture,
        attack=layout.CLEAN,
        ratio=layout.CLEAN_RATIO,
    )


def poison_file(wildcards):
    """The poison file a data-poisoning attack's model trains on."""
    scope = grid.resource_scope(wildcards.attack, wildcards.architecture)
    return POISON.format(
        dataset=wildcards.dataset,
        scope=scope,
        attack=wildcards.attack,
        ratio=wildcards.ratio,
    )


def backdoor_test_set(wildcards):
    """Where a model's backdoor test set lives: its poison file, or (training-time attacks) the
    file written beside the model; a clean model has none."""
    if wildcards.attack == layout.CLEAN:
        return {}
    if wildcards.attack in TRAINING_TIME_ATTACKS:
        return {"backdoor": MODEL_BACKDOOR.format(**wildcards)}
    return {"backdoor": poison_file(wildcards)}


def resource_inputs(wildcards):
    """A resource's inputs; the clean model for per-architecture resources (scope = architecture)."""
    inputs = {"data": data_files(wildcards.dataset)}
    if wildcards.scope != layout.SHARED_SCOPE:
        inputs["clean_model"] = clean_model(wildcards.dataset, wildcards.scope)
    return inputs


def train_inputs(wildcards):
    """A data-poisoning attack's model trains on its poison file; a clean model on the dataset alone."""
    inputs = {"data": data_files(wildcards.dataset)}
    if wildcards.attack != layout.CLEAN:
        inputs["poison"] = poison_file(wildcards)
    return inputs


def optional_flag(flag, name):
    """Rule params: ``flag <input.name>`` when the job has that input, else nothing."""
    return lambda wildcards, input: (
        f"{flag} {shlex.quote(input[name])}" if name in input.keys() else ""
    )


def defend_model_inputs(wildcards):
    """A model's runs read the model, its record, the dataset, its backdoor test set and every
    partition its data-using defenses draw on."""
    plan = grid.defense_plan(CONFIG, wildcards.dataset, wildcards.architecture)
    tokens = {token for entry in plan.values() for token in entry["mitigations"]}
    partitions = [
        PARTITION.format(dataset=wildcards.dataset, spc=spc, seed=seed)
        for spc, seed in sorted(map(layout.parse_mitigation, tokens - {layout.NO_DATA}))
    ]
    force_if_runs_missing(MANIFEST.format(**wildcards))
    return {
        "data": data_files(wildcards.dataset),
        "model": MODEL.format(**wildcards),
        "metrics": MODEL_METRICS.format(**wildcards),
        **backdoor_test_set(wildcards),
        "partitions": partitions,
    }


# Why each manifest checked so far must be recomputed (None: it need not), so that each is checked
# and reported once per invocation however often Snakemake asks for its job's inputs.
_STALE_MANIFESTS = {}


def force_if_runs_missing(manifest):
    """A deleted run file reruns its model's job, from a plain `snakemake` call, dry runs included.

    Snakemake sees a model's manifest, not its run files (the two levels keep planning fast), so
    while it plans the model's job this checks the run files the manifest lists
    (`bdsweep.results.missing_runs`: one JSON read and a directory listing per defense) and, if one
    is gone or the manifest is unreadable, forces the job exactly as `--forcerun MANIFEST` would:
    the DAG's set of forced files (Snakemake 9's DAG.forcefiles, which `--forcerun` fills and which
    decides "Forced execution" once every job is planned). Not a parameter or an input that
    changes: those would rerun the job a second time once the runs are back. The job then computes
    only the missing runs. Not at parse time: Snakemake hands the workflow its DAG settings
    (`--forcerun` among them) only after the Snakefile is parsed, and a manifest forced there would
    become a target of its own. A cluster job's own Snakemake runs its job anyway: no check there.
    """
    if workflow.remote_exec:
        return
    checked = manifest in _STALE_MANIFESTS
    if not checked:
        _STALE_MANIFESTS[manifest] = missing_runs(manifest)
    reason = _STALE_MANIFESTS[manifest]
    if reason is None:
        return
    forced = getattr(getattr(workflow, "dag", None), "forcefiles", None)
    if isinstance(forced, set):
        forced.add(manifest)
        remedy = "forcing its job, which computes only the missing runs"
    else:  # the internal set is gone in this Snakemake version: say how to do it by hand
        remedy = f"this Snakemake cannot be made to rerun its job: run snakemake --forcerun {manifest}"
    if not checked:
        logger.warning(f"bdsweep: {manifest}: {reason}; {remedy}")


def defense_plan(dataset, architecture):
    return DEFENSE_PLANS[dataset, architecture]
