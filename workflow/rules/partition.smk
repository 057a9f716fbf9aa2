# Stage 5: mitigation data. Per (SPC, seed) a partition shared by every model of the dataset,
# drawn from the whole training set (mitigation.source: train, the default, as the survey's code),
# or from a per-dataset pool that no attack poisons (reserved_pool; only then is the pool built).


rule reserve_pool:
    input:
        data=lambda wildcards: data_files(wildcards.dataset),
    output:
        POOL,
    log:
        os.path.join(LOGS, "partitions/{dataset}/pool.log"),
    conda:
        CONDA_ENV
    threads: 1
    params:
        per_class=CONFIG["mitigation"]["pool_per_class"],
        seed=CONFIG["seed"],
        directory=lambda wildcards, input: os.path.dirname(input.data),
    shell:
        "python -m bdsweep pool --data {params.directory} --per-class {params.per_class} --seed {params.seed}"
        " --out {output} > {log} 2>&1"


rule draw_partition:
    input:
        unpack(dataset_and_pool),
    output:
        PARTITION,
    log:
        os.path.join(LOGS, "partitions/{dataset}/spc{spc}-seed{seed}.log"),
    conda:
        CONDA_ENV
    threads: 1
    params:
        pool=optional_flag("--pool", "pool"),
        directory=lambda wildcards, input: os.path.dirname(input.data),
    shell:
        "python -m bdsweep partition --data {params.directory} {params.pool} --spc {wildcards.spc}"
        " --seed {wildcards.seed} --out {output} > {log} 2>&1"
