# Stage 2: what a data-poisoning attack's trigger needs, built once per dataset (BadNets' patch,
# Blended's image, SSBA's trained encoder) or per (dataset, architecture) against a clean model
# (LF's universal perturbation; {scope} is then the architecture).


rule attack_resource:
    input:
        unpack(resource_inputs),
    output:
        RESOURCE,
    params:
        attack=params_of("attacks"),
        clean_model=optional_flag("--clean-model", "clean_model"),
        target=CONFIG["target"],
        seed=CONFIG["seed"],
        device=CONFIG["device"],
        directory=lambda wildcards, input: os.path.dirname(input.data),
    log:
        os.path.join(LOGS, "resources/{dataset}/{scope}/{attack}.log"),
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "BDSWEEP_HISTORY={log}.history python -m bdsweep resource --data {params.directory} --attack {wildcards.attack}"
        " --params {params.attack:q} {params.clean_model} --target {params.target} --seed {params.seed}"
        " --device {params.device} --out {output} > {log} 2>&1"
