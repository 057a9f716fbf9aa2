# Stage 6: one result file per run (model, defense, SPC, seed), the unit of caching and resume.


rule defend:
    input:
        unpack(defend_inputs),
    output:
        RUN,
    params:
        defense=params_of("defenses"),
        coordinates=run_coordinates,
        partition=optional_flag("--partition", "partition"),
        backdoor=optional_flag("--backdoor", "backdoor"),
        device=CONFIG["device"],
        directory=lambda wildcards, input: os.path.dirname(input.data),
    log:
        os.path.join(LOGS, "runs/{dataset}/{architecture}/{attack}/{ratio}/{defense}/{mitigation}.log"),
    threads: 1
    # Out of GPU memory, the stage exits (code 75) without a run file; each retry halves the batches.
    retries: 2
    resources:
        batch_percent=lambda wildcards, attempt: grid.batch_percent(attempt),
    conda:
        CONDA_ENV
    shell:
        "python -m bdsweep defend --model {input.model} --model-metrics {input.metrics} --data {params.directory}"
        " {params.partition} {params.backdoor} --defense {wildcards.defense}"
        " --params {params.defense:q} --coordinates {params.coordinates:q} --device {params.device}"
        " --batch-percent {resources.batch_percent}"
        " --out {output} > {log} 2>&1"
