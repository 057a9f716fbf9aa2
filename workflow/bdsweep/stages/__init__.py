"""Stage entry points: ``python -m bdsweep <stage> ...``, one module per Snakemake rule family.

Each module defines ``add_arguments(parser)`` and ``main(args)``. Rules pass grid coordinates
and resolved hyperparameters as JSON, so Snakemake reruns a job when they change. Only the
invoked stage's module is imported: a job that needs no torch does not pay its import.
"""

STAGES = {
    "prepare": "prepare a dataset: canonical uint8 arrays from its source",
    "resource": "build an attack's resource for one dataset",
    "pool": "reserve a dataset's mitigation pool, never poisoned (mitigation.source: reserved_pool)",
    "partition": "draw one mitigation partition from the training set (or the reserved pool)",
    "poison": "poison a dataset with a data-poisoning attack at one ratio",
    "train": "train a backdoored model and record its pre-defense metrics",
    "defend": "run one defense on one model and partition; write the run's result file",
    "defend-model": "run every defense run of one model (the runs whose files are missing or stale)",
    "figure": "draw one figure (PNG and PDF) from the results table",
    "summary": "write one summary table (CSV and Markdown) from the results table",
}
