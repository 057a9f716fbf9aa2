"""bdsweep: benchmark backdoor-mitigation defenses for image classifiers at survey scale."""

__version__ = "0.1.0"
