# Stage 1: canonical uint8 arrays per dataset, from its configured source.
from bdsweep.data.store import FILES


rule prepare_dataset:
    output:
        [os.path.join(DATA_DIR, name) for name in FILES],
    params:
        options=lambda wildcards: json.dumps(CONFIG["datasets"][wildcards.dataset], sort_keys=True),
        directory=DATA_DIR,
    log:
        os.path.join(LOGS, "data/{dataset}.log"),
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "python -m bdsweep prepare --name {wildcards.dataset} --options {params.options:q}"
        " --out {params.directory} > {log} 2>&1"
