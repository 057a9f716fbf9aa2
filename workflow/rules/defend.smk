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
    log:
        os.path.join(LOGS, "runs/{dataset}/{architecture}/{attack}/{ratio}.log"),
    # A run out of GPU memory is retried in the job at half its batch sizes, twice, each time
    # recorded beside its run file (<run>.oom); then the job exits with code 75 and this retry (the
    # same command: other runs keep their full batch sizes) goes on from the recorded size.
    retries: 2
    conda:
        CONDA_ENV
    # Runs at once in this job, one torch thread each (profiles raise it: several runs per GPU).
    threads: 1
    params:
        defenses=lambda wildcards: defense_plan(
            wildcards.dataset, wildcards.architecture
        ),
        coordinates=model_coordinates,
        partitions=lambda wildcards: PARTITION.format(
            dataset=wildcards.dataset, spc="{spc}", seed="{seed}"
        ),
        runs=lambda wildcards: RUN.format(
            **wildcards, defense="{defense}", mitigation="{mitigation}"
        ),
        backdoor=optional_flag("--backdoor", "backdoor"),
        device=CONFIG["device"],
        precision=CONFIG["engine"]["precision"],
        directory=lambda wildcards, input: os.path.dirname(input.data),
    shell:
        "BDSWEEP_HISTORY={log}.history python -m bdsweep defend-model --model {input.model} --model-metrics {input.metrics}"
        " --data {params.directory} {params.backdoor} --defenses {params.defenses:q}"
        " --coordinates {params.coordinates:q} --partitions {params.partitions:q} --runs {params.runs:q}"
        " --workers {threads} --device {params.device} --precision {params.precision}"
        " --out {output} > {log} 2>&1"
