# Stage 3: poisoned training images and the backdoor test set per (dataset, attack, ratio) of a
# data-poisoning attack ({scope}: see the resources stage). Training-time attacks have no poison
# file: they poison inside the training loop (train.smk).


rule poison_dataset:
    input:
        unpack(dataset_and_pool),
        resource=RESOURCE,
    output:
        POISON,
    log:
        os.path.join(LOGS, "poison/{dataset}/{scope}/{attack}/{ratio}.log"),
    conda:
        CONDA_ENV
    threads: 1
    params:
        attack=params_of("attacks"),
        pool=optional_flag("--pool", "pool"),
        target=CONFIG["target"],
        seed=CONFIG["seed"],
        directory=lambda wildcards, input: os.path.dirname(input.data),
    shell:
        "python -m bdsweep poison --data {params.directory} {params.pool} --resource {input.resource}"
        " --attack {wildcards.attack} --params {params.attack:q} --ratio {wildcards.ratio}"
        " --target {params.target} --seed {params.seed} --out {output} > {log} 2>&1"
