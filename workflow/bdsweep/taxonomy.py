"""How the survey groups methods, for tables and figures (light: no torch, no plotting)."""

from __future__ import annotations

FAMILY_ORDER = {"none": 0, "pruning": 1, "fine-tuning": 2}  # the paper's order of defenses
BASELINES = {"pruning": "fp", "fine-tuning": "ft"}  # each family's 2018 baseline (section VI)
# Table III: trigger consistency of each attack (static: the same trigger on every image).
ATTACK_TYPES = {"badnets": "static", "blended": "static", "sig": "static", "lf": "static",
                "ssba": "dynamic", "iab": "dynamic", "bpp": "dynamic", "wanet": "dynamic", "lira": "dynamic"}
