# Stage 2: what a data-poisoning attack's trigger needs, built once per dataset (BadNets' patch,
# Blended's image, SSBA's trained encoder) or per (dataset, architecture) against a clean model
# (LF's universal perturbation; {scope} is then the architecture). Two rules of one recipe, so that
# profiles give a GPU only to learned resources: attack_pattern makes the numpy-only ones
# (grid.PATTERN_RESOURCES: BadNets, Blended, SIG) on a CPU.


rule attack_resource:
    input:
        unpack(resource_inputs),
    output:
        RESOURCE,
    log:
        os.path.join(LOGS, "resources/{dataset}/{scope}/{attack}.log"),
    wildcard_constraints:
        attack=one_of(
            [name for name in ATTACKS_WITH_RESOURCES if grid.resource_needs_gpu(name)]
        ),
    conda:
        CONDA_ENV
    threads: 1
    params:
        attack=params_of("attacks"),
        clean_model=optional_flag("--clean-model", "clean_model"),
        target=CONFIG["target"],
        seed=CONFIG["seed"],
        # A pattern is numpy work: its job runs on a CPU whatever the configured device.
        device=lambda wildcards: (
            CONFIG["device"] if grid.resource_needs_gpu(wildcards.attack) else "cpu"
        ),
        directory=lambda wildcards, input: os.path.dirname(input.data),
    shell:
        "BDSWEEP_HISTORY={log}.history python -m bdsweep resource --data {params.directory} --attack {wildcards.attack}"
        " --params {params.attack:q} {params.clean_model} --target {params.target} --seed {params.seed}"
        " --device {params.device} --out {output} > {log} 2>&1"


use rule attack_resource as attack_pattern with:
    wildcard_constraints:
        attack=one_of(
            [
                name
                for name in ATTACKS_WITH_RESOURCES
                if not grid.resource_needs_gpu(name)
            ]
        ),
