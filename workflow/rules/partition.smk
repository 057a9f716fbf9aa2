# Stage 5: mitigation data. A pool per dataset that no attack poisons, and per (SPC, seed)
# partitions drawn from it, shared by every model of the dataset.


rule reserve_pool:
    input:
        data=lambda wildcards: data_files(wildcards.dataset),
    output:
        POOL,
    params:
        per_class=CONFIG["mitigation"]["pool_per_class"],
        seed=CONFIG["seed"],
        directory=lambda wildcards, input: os.path.dirname(input.data),
    log:
        os.path.join(LOGS, "partitions/{dataset}/pool.log"),
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "python -m bdsweep pool --data {params.directory} --per-class {params.per_class} --seed {params.seed}"
        " --out {output} > {log} 2>&1"


rule draw_partition:
    input:
        data=lambda wildcards: data_files(wildcards.dataset),
        pool=POOL,
    output:
        PARTITION,
    params:
        directory=lambda wildcards, input: os.path.dirname(input.data),
    log:
        os.path.join(LOGS, "partitions/{dataset}/spc{spc}-seed{seed}.log"),
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "python -m bdsweep partition --data {params.directory} --pool {input.pool} --spc {wildcards.spc}"
        " --seed {wildcards.seed} --out {output} > {log} 2>&1"
