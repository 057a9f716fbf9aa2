# Stage 4: a backdoored model per (dataset, architecture, attack, ratio), with its pre-defense
# metrics (flagged when under the sanity gates) and training curve.


rule train_model:
    input:
        data=lambda wildcards: data_files(wildcards.dataset),
        poison=POISON,
    output:
        model=MODEL,
        metrics=MODEL_METRICS,
        curve=MODEL_CURVE,
    params:
        recipe=params_of("training"),
        sanity=json.dumps(CONFIG["sanity"]),
        coordinates=model_coordinates,
        target=CONFIG["target"],
        seed=CONFIG["seed"],
        device=CONFIG["device"],
        directory=lambda wildcards, input: os.path.dirname(input.data),
    log:
        os.path.join(LOGS, "models/{dataset}/{architecture}/{attack}/{ratio}.log"),
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "python -m bdsweep train --data {params.directory} --poison {input.poison}"
        " --architecture {wildcards.architecture} --recipe {params.recipe:q} --sanity {params.sanity:q}"
        " --coordinates {params.coordinates:q} --target {params.target} --seed {params.seed}"
        " --device {params.device} --out-model {output.model} --out-metrics {output.metrics}"
        " --out-curve {output.curve} > {log} 2>&1"
