"""The exceptions that end a job with a particular exit code, so that Snakemake (and SLURM) can tell a
preemption or a retryable failure from a defect: ``bdsweep.cli`` maps each to its code."""

from __future__ import annotations

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a job killed by SIGTERM would report


class Preempted(Exception):
    """SIGTERM arrived during training or a defense; the checkpoint holds the state to resume from."""


RETRY_EXIT_CODE = 75  # EX_TEMPFAIL: the job failed for a reason its retry can avoid


class RetryWithLess(Exception):
    """The device ran out of memory: no result was written; a retry with smaller batches may pass."""
