# Stage 8: figures and summary tables from the results table only, so redrawing never touches a
# model or a GPU. The `code` param fingerprints each figure's drawing code: editing one plotting
# function redraws only the figures that use it. Captions go into `snakemake --report`.
from bdsweep.figures import code_digest


rule figure:
    input:
        TABLE,
    output:
        png=report(
            FIGURE.replace("{ext}", "png"),
            caption="../report/caption.rst",
            category="Figures",
        ),
        pdf=FIGURE.replace("{ext}", "pdf"),
    log:
        os.path.join(LOGS, "figures/{figure}.log"),
    conda:
        CONDA_ENV
    threads: 1
    params:
        code=lambda wildcards: code_digest(wildcards.figure),
        caption=lambda wildcards: FIGURES[wildcards.figure].caption,
    shell:
        "python -m bdsweep figure {wildcards.figure} --table {input} --png {output.png} --pdf {output.pdf} > {log} 2>&1"


rule summary_table:
    input:
        TABLE,
    output:
        csv=report(
            SUMMARY.replace("{ext}", "csv"),
            caption="../report/caption.rst",
            category="Tables",
        ),
        md=SUMMARY.replace("{ext}", "md"),
    log:
        os.path.join(LOGS, "tables/{summary}.log"),
    conda:
        CONDA_ENV
    threads: 1
    params:
        caption=lambda wildcards: TABLES[wildcards.summary].caption,
    shell:
        "python -m bdsweep summary {wildcards.summary} --table {input} --csv {output.csv} --md {output.md} > {log} 2>&1"
