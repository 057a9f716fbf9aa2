# Stage 8: figures from the results table only, so redrawing never touches a model or a GPU.
# The `code` param fingerprints each figure's drawing code: editing one plotting function
# redraws only the figures that use it.
from bdsweep.figures import code_digest


rule figure:
    input:
        TABLE,
    output:
        png=FIGURE.replace("{ext}", "png"),
        pdf=FIGURE.replace("{ext}", "pdf"),
    params:
        code=lambda wildcards: code_digest(wildcards.figure),
    log:
        os.path.join(LOGS, "figures/{figure}.log"),
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "python -m bdsweep figure {wildcards.figure} --table {input} --png {output.png} --pdf {output.pdf} > {log} 2>&1"
