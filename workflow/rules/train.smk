# Stage 4: a model per (dataset, architecture, attack, ratio), with its pre-defense metrics
# (flagged when under the sanity gates) and training curve. Data-poisoning attacks train on their
# poison file; attack "clean" (ratio 0) is the clean model; training-time attacks poison inside
# the training loop and write their backdoor test set beside the model.


rule train_model:
    input:
        unpack(train_inputs),
    output:
        model=MODEL,
        metrics=MODEL_METRICS,
        curve=MODEL_CURVE,
    log:
        os.path.join(LOGS, "models/{dataset}/{architecture}/{attack}/{ratio}.log"),
    wildcard_constraints:
        attack=one_of(DATA_POISONING_ATTACKS),
    conda:
        CONDA_ENV
    threads: 1
    params:
        attack_inputs=optional_flag("--poison", "poison"),
        recipe=params_of("training"),
        engine=json.dumps(CONFIG["engine"], sort_keys=True),
        sanity=json.dumps(CONFIG["sanity"]),
        coordinates=model_coordinates,
        target=CONFIG["target"],
        seed=CONFIG["seed"],
        device=CONFIG["device"],
        directory=lambda wildcards, input: os.path.dirname(input.data),
    shell:
        "BDSWEEP_HISTORY={log}.history python -m bdsweep train --data {params.directory} --attack {wildcards.attack} {params.attack_inputs}"
        " --architecture {wildcards.architecture} --recipe {params.recipe:q} --engine {params.engine:q}"
        " --sanity {params.sanity:q}"
        " --coordinates {params.coordinates:q} --target {params.target} --seed {params.seed}"
        " --device {params.device} --out-model {output.model} --out-metrics {output.metrics}"
        " --out-curve {output.curve} > {log} 2>&1"


use rule train_model as train_model_poisoned_in_the_loop with:
    input:
        unpack(dataset_and_pool),
    output:
        model=MODEL,
        metrics=MODEL_METRICS,
        curve=MODEL_CURVE,
        backdoor=MODEL_BACKDOOR,
    wildcard_constraints:
        attack=one_of(TRAINING_TIME_ATTACKS),
    params:
        attack_inputs=lambda wildcards, input, output: (
            f"--attack-params {shlex.quote(grid.params_json(CONFIG, 'attacks', wildcards.attack, wildcards.dataset, wildcards.architecture))}"
            f" --ratio {wildcards.ratio} --out-backdoor {output.backdoor}"
            + (f" --pool {shlex.quote(input.pool)}" if "pool" in input.keys() else "")
        ),
