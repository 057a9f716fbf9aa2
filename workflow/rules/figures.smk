# Stage 8: figures from the results table only, so redrawing never touches a model or a GPU.


rule figure:
    input:
        TABLE,
    output:
        png=FIGURE.replace("{ext}", "png"),
        pdf=FIGURE.replace("{ext}", "pdf"),
    log:
        os.path.join(LOGS, "figures/{figure}.log"),
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "python -m bdsweep figure {wildcards.figure} --table {input} --png {output.png} --pdf {output.pdf} > {log} 2>&1"
