"""What the committed profiles ask a cluster for, checked without one: every rule and every job
group fits a typical GPU node, only the rules that use a GPU ask for one, and docs/cluster.md
states the committed values (tests/end_to_end/test_slurm.py runs them on a real SLURM cluster)."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from conftest import REPO

PROFILES = REPO / "workflow" / "profiles"
SLURM = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
LOCAL = yaml.safe_load((PROFILES / "local" / "config.yaml").read_text())
# A typical GPU node's share for one GPU: what a cluster job of this workflow may ask for.
NODE = {"cpus": 8, "mem_mb": 64000, "runtime": 1440, "gpu": 1}
# Rules whose work is numpy, pandas or matplotlib on a CPU, and rules that run a model on a GPU.
CPU_RULES = {"prepare_dataset", "reserve_pool", "draw_partition", "attack_pattern", "poison_dataset",
             "aggregate_runs", "figure", "summary_table"}
GPU_RULES = {"attack_resource", "train_model", "train_model_poisoned_in_the_loop", "defend_model"}
TARGET_RULES = {"table", "all"}  # rules without a job of their own


def rule_names() -> set[str]:
    text = "\n".join(path.read_text() for path in [REPO / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")])
    return set(re.findall(r"^rule (\w+):", text, re.MULTILINE)) | set(
        re.findall(r"^use rule \w+ as (\w+)", text, re.MULTILINE))


def request(profile: dict, rule: str) -> dict:
    """What one job of ``rule`` asks for under ``profile``: default resources, the rule's own, its threads."""
    asked = {**profile.get("default-resources", {}), **profile.get("set-resources", {}).get(rule, {})}
    asked["cpus"] = profile.get("set-threads", {}).get(rule, 1)
    return asked


def test_every_rule_is_classified_and_every_profile_key_names_a_rule():
    assert rule_names() == CPU_RULES | GPU_RULES | TARGET_RULES  # a new rule must say whether it needs a GPU
    for profile in (SLURM, LOCAL):
        named = {*profile.get("set-resources", {}), *profile.get("set-threads", {}), *profile.get("groups", {})}
        assert named <= rule_names(), named - rule_names()


@pytest.mark.parametrize("rule", sorted(CPU_RULES | GPU_RULES))
def test_each_rule_asks_for_what_a_gpu_node_gives_and_only_gpu_rules_ask_for_a_gpu(rule):
    asked = request(SLURM, rule)
    assert asked["cpus"] <= SLURM["cores"] <= NODE["cpus"]  # cores caps threads; a larger set-threads is cut
    assert asked["mem_mb"] <= NODE["mem_mb"] and asked["runtime"] <= NODE["runtime"]
    for profile in (SLURM, LOCAL):
        gpus = profile.get("set-resources", {}).get(rule, {}).get("gpu", 0)
        assert gpus == (1 if rule in GPU_RULES else 0), (rule, gpus)
    if rule in CPU_RULES - {"prepare_dataset"}:  # numpy work: minutes (preparing may download)
        assert asked["runtime"] <= 20 and asked["mem_mb"] <= 4000


def test_each_group_is_bounded_to_what_a_gpu_node_gives():
    """A group job asks for its widest layer: members side by side, at most ``cores`` CPUs and the
    ``resources`` memory pool; all of its members one after another at the most."""
    pool = SLURM["resources"]["mem_mb"]
    assert pool <= NODE["mem_mb"] and SLURM["cores"] <= NODE["cpus"]
    for group in set(SLURM["groups"].values()):
        members = [rule for rule, name in SLURM["groups"].items() if name == group]
        assert not set(members) & GPU_RULES
        widest = max(request(SLURM, rule)["mem_mb"] for rule in members)
        assert min(pool, SLURM["cores"] * widest) <= NODE["mem_mb"]
    # The report group: 4 figure or table jobs at once, 8 GB; never one CPU per figure.
    assert SLURM["cores"] * request(SLURM, "figure")["mem_mb"] == 8000


def test_the_cluster_page_states_the_committed_requests():
    page = (REPO / "docs" / "cluster.md").read_text()
    for rule in sorted(CPU_RULES | GPU_RULES):
        asked = request(SLURM, rule)
        gpu = "1" if rule in GPU_RULES else "-"
        row = f"| `{rule}` | {gpu} | {asked['cpus']} | {asked['mem_mb'] // 1000} GB | {asked['runtime']} min |"
        if rule == "aggregate_runs":
            row = "| `aggregate_runs` | - | local |"
        assert row in page, row
    assert "docs/cluster.md" in (REPO / "README.md").read_text()


def profile_for_test_cluster(node_cpus: int, node_mem_mb: int) -> dict:
    """The project's SLURM profile as committed, changed only where the one-node test cluster
    forces it: GPU requests dropped (the node has none); CPUs (``cores``, the bound of every job's
    threads and of a group's width, and set-threads) and memory (each request and the group pool)
    capped to the node's. A request beyond the node waits forever (reason PartitionConfig), so an
    unbounded group width or a rule asking for more than a node fails this test by timing out."""
    profile = copy.deepcopy(SLURM)
    if "cores" in profile:
        profile["cores"] = min(profile["cores"], node_cpus)
    cap = profile.get("cores", node_cpus)
    profile["set-threads"] = {rule: min(threads, cap) for rule, threads in profile["set-threads"].items()}
    for resources in [profile["resources"], profile["default-resources"], *profile["set-resources"].values()]:
        for gpu_request in ("gpu", "gres", "gpu_model"):
            resources.pop(gpu_request, None)
        if "mem_mb" in resources:
            resources["mem_mb"] = min(resources["mem_mb"], node_mem_mb)
    return profile


def test_the_slurm_test_runs_the_committed_values_changed_only_where_its_node_forces_it():
    def without_gpus(profile):
        return {**profile, "set-resources": {rule: {key: value for key, value in asked.items() if key != "gpu"}
                                             for rule, asked in profile["set-resources"].items()}}

    assert profile_for_test_cluster(64, 10**6) == without_gpus(SLURM)  # a large node: only GPUs dropped
    small = profile_for_test_cluster(2, 3000)
    assert small["cores"] == 2 and small["set-threads"]["defend_model"] == 2 and small["resources"]["mem_mb"] == 3000
    assert small["set-resources"]["figure"] == SLURM["set-resources"]["figure"]  # fits: unchanged
