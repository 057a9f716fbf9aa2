"""How the survey groups methods, for tables and figures (light: no torch, no plotting)."""

from __future__ import annotations

FAMILY_ORDER = {"none": 0, "pruning": 1, "fine-tuning": 2}  # the paper's order of defenses
BASELINES = {"pruning": "fp", "fine-tuning": "ft"}  # each family's 2018 baseline (section VI)
# Each attack's trigger type (the survey's Table III) is declared in its registration and travels in
# the model's record and every run file as the `attack_type` column.
