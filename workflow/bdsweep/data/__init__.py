"""Datasets: sources that read raw data, and the canonical array store every stage reads."""
