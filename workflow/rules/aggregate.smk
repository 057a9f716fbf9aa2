# Stage 7: one Parquet table, one row per run, from the run files the models' manifests list.
# In-process: it needs no GPU, and the list of run files would not fit on a command line at the
# full grid's size. The cache (outside the rule's outputs, which Snakemake deletes before a rerun)
# lets a rerun read only changed files.
from bdsweep.results import aggregate, remake_command, runs_by_manifest


localrules:
    aggregate_runs,


rule aggregate_runs:
    input:
        MANIFESTS,
    output:
        TABLE,
    log:
        os.path.join(LOGS, "aggregate.log"),
    run:
        owners = runs_by_manifest(input)
        # An unreadable run file: the message (and the log) gives the command that recomputes it,
        # this Snakemake command line forcing its model's job.
        aggregate(
            list(owners),
            output[0],
            log[0],
            cache=os.path.join(RESULTS, ".cache", "runs.parquet"),
            remedy=lambda bad: "Recompute them with:\n  "
            + remake_command(sys.argv, [owners[path] for path in bad]),
        )
