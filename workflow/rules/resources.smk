# Stage 2: what an attack's trigger needs, built once per dataset (BadNets: patch and mask).


rule attack_resource:
    input:
        data=lambda wildcards: data_files(wildcards.dataset),
    output:
        RESOURCE,
    params:
        attack=params_of("attacks"),
        directory=lambda wildcards, input: os.path.dirname(input.data),
    log:
        os.path.join(LOGS, "resources/{dataset}/{attack}.log"),
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "python -m bdsweep resource --data {params.directory} --attack {wildcards.attack}"
        " --params {params.attack:q} --out {output} > {log} 2>&1"
