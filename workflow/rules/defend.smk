# Stage 6: one job per model runs every defense run of that model (stages/defend_model.py). Each
# run is still its own result file, recomputed only when missing or stale, so the top-level DAG
# stays a few hundred jobs for the paper's grid while runs remain the unit of caching and resume.
# A changed hyperparameter, a new defense or a new seed changes `params.defenses`, so the model's
# job reruns and computes only the runs it concerns.


rule defend_model:
    input:
        unpack(defend_model_inputs),
    output:
        MANIFEST,
    params:
        defenses=lambda wildcards: defense_plan(wildcards.dataset, wildcards.architecture),
        coordinates=model_coordinates,
        partitions=lambda wildcards: PARTITION.format(dataset=wildcards.dataset, spc="{spc}", seed="{seed}"),
        runs=lambda wildcards: RUN.format(**wildcards, defense="{defense}", mitigation="{mitigation}"),
        backdoor=optional_flag("--backdoor", "backdoor"),
        device=CONFIG["device"],
        precision=CONFIG["engine"]["precision"],
        directory=lambda wildcards, input: os.path.dirname(input.data),
    log:
        os.path.join(LOGS, "runs/{dataset}/{architecture}/{attack}/{ratio}.log"),
    # Runs at once in this job, one torch thread each (profiles raise it: several runs per GPU).
    threads: 1
    # Out of GPU memory twice within the job (it halves the batches itself), it exits with code 75;
    # each retry starts from half the batch sizes again.
    retries: 2
    resources:
        batch_percent=lambda wildcards, attempt: grid.batch_percent(attempt),
    conda:
        CONDA_ENV
    shell:
        "python -m bdsweep defend-model --model {input.model} --model-metrics {input.metrics}"
        " --data {params.directory} {params.backdoor} --defenses {params.defenses:q}"
        " --coordinates {params.coordinates:q} --partitions {params.partitions:q} --runs {params.runs:q}"
        " --workers {threads} --device {params.device} --batch-percent {resources.batch_percent}"
        " --precision {params.precision}"
        " --out {output} > {log} 2>&1"
