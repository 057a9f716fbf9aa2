# Stage 1: canonical uint8 arrays per dataset, from its configured source.
from bdsweep.data.store import FILES


rule prepare_dataset:
    output:
        [os.path.join(DATA_DIR, name) for name in FILES],
    log:
        os.path.join(LOGS, "data/{dataset}.log"),
    conda:
        CONDA_ENV
    threads: 1
    params:
        options=lambda wildcards: json.dumps(
            CONFIG["datasets"][wildcards.dataset], sort_keys=True
        ),
        directory=DATA_DIR,
    shell:
        "python -m bdsweep prepare --name {wildcards.dataset} --options {params.options:q}"
        " --out {params.directory} > {log} 2>&1"
