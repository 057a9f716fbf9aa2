# bdsweep: backdoor-mitigation defenses benchmarked over a grid of datasets, architectures,
# attacks, poisoning ratios and mitigation-data sizes. Stages live in workflow/rules/, one file each.
import os

from snakemake.utils import min_version

min_version("9.0")


# Without --configfile: config.yaml of the working directory, else the workflow's own (the demo).
if "datasets" not in config:

    configfile:
        "config.yaml"
        if os.path.exists("config.yaml")
        else os.path.join(workflow.basedir, "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/poison.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/partition.smk"
include: "workflow/rules/defend.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/figures.smk"


report: "workflow/report/workflow.rst"


# `snakemake table`: the models, their runs and the results table, without figures. Models are
# targets so that a deleted model is retrained (and its runs redone); one manifest per model
# stands for its runs (workflow/rules/defend.smk).
rule table:
    input:
        MODELS,
        MANIFESTS,
        TABLE,


# Everything: the results (above), every figure and every summary table.
rule all:
    default_target: True
    input:
        rules.table.input,
        expand(FIGURE, figure=FIGURE_NAMES, ext=("png", "pdf")),
        expand(SUMMARY, summary=SUMMARY_NAMES, ext=("csv", "md")),
