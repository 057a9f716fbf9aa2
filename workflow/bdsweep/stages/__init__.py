"""Stage entry points: ``python -m bdsweep <stage> ...``, one module per Snakemake rule family.

Each module defines ``add_arguments(parser)`` and ``main(args)``. Rules pass grid coordinates
and resolved hyperparameters as JSON, so Snakemake reruns a job when they change.
"""

STAGES = ("prepare", "resource", "pool", "partition", "poison", "train", "defend", "figure")
