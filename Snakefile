# bdsweep: backdoor-mitigation defenses benchmarked over a grid of datasets, architectures,
# attacks, poisoning ratios and mitigation-data sizes. Stages live in workflow/rules/.
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"


report: "workflow/report/workflow.rst"


# The run files are targets too: a deleted run file is recomputed (alone), then the table and
# figures are rebuilt from it.
rule all:
    input:
        RUN_FILES,
        TABLE,
        expand(FIGURE, figure=FIGURE_NAMES, ext=("png", "pdf")),
        expand(SUMMARY, summary=SUMMARY_NAMES, ext=("csv", "md")),
    default_target: True


include: "workflow/rules/data.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/partition.smk"
include: "workflow/rules/poison.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/defend.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/figures.smk"
