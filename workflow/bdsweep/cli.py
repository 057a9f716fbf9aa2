"""The ``bdsweep`` command: ``bdsweep list``, ``bdsweep validate CONFIG``, ``bdsweep cost CONFIG`` and
one subcommand per stage (what the Snakemake rules call)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .checkpoints import trace
from .errors import PREEMPTED_EXIT_CODE, RETRY_EXIT_CODE, Preempted, RetryWithLess
from .stages import STAGES


def list_methods(args) -> None:
    from .registry import ARCHITECTURES, ATTACKS, DEFENSES, SOURCES

    kinds = (("attacks", ATTACKS), ("architectures", ARCHITECTURES), ("defenses", DEFENSES),
             ("dataset sources", SOURCES))
    for title, registry in kinds:
        print(f"{title}:")
        for entry in registry.entries():
            print(f"  {entry.name:<20} {entry.description}")


def validate(args) -> None:
    from .config import check_class_sizes, read_config, validate_config
    from .grid import models, runs
    from .layout import CLEAN

    raw = read_config(args.config)
    config = validate_config(raw)
    check_class_sizes(config)
    grid_models = models(config)
    clean = sum(model.attack == CLEAN for model in grid_models)
    print(f"{args.config}: valid; {len(grid_models) - clean} backdoored + {clean} clean models, "
          f"{len(runs(config)):,} runs")


def cost(args) -> None:
    import json

    from .config import read_config, validate_config, without_missing_input_files
    from .cost import Throughput, estimate, format_estimate, read_throughput

    config, emptied = without_missing_input_files(read_config(args.config))
    for setting in emptied:  # on stderr: --json output stays parseable
        print(f"bdsweep cost: {setting} is not there yet; priced as if it were (an input file changes no job "
              "and no pass count); `bdsweep validate` and the workflow need it", file=sys.stderr)
    result = estimate(validate_config(config), Throughput(read_throughput(args.throughput),
                                                                            args.device))
    print(json.dumps(result.as_dict(), indent=1) if args.json else format_estimate(result))


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``stage``'s module is imported, to describe its arguments."""
    parser = argparse.ArgumentParser(prog="bdsweep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="registered attacks, architectures, defenses and dataset sources"
                        ).set_defaults(handler=list_methods)
    check = commands.add_parser("validate", help="validate a configuration file and count its grid")
    check.add_argument("config")
    check.set_defaults(handler=validate)
    plan = commands.add_parser("cost", help="jobs per stage and estimated GPU hours of a configuration")
    plan.add_argument("config")
    plan.add_argument("--device", default="h100", help="a device of the throughput file (default: h100)")
    plan.add_argument("--throughput", help="throughput YAML (default: the shipped bdsweep/throughput.yaml)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(handler=cost)
    importlib.import_module(".gpucheck", __package__).add_parser(commands)  # imports no torch
    for name, summary in STAGES.items():
        sub = commands.add_parser(name, help=summary)
        if name == stage:
            module = importlib.import_module(f".stages.{name.replace('-', '_')}", __package__)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.main)
    return parser


def job_header(command: str) -> str:
    """The first line a stage writes to its log: when and where it started, and on SLURM which job
    and how often it was requeued, so a preempted and resumed job leaves a trace."""
    import datetime
    import os
    import socket

    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    slurm = ""
    if "SLURM_JOB_ID" in os.environ:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        slurm = f", SLURM job {os.environ['SLURM_JOB_ID']}" + (f", requeued {restarts} time(s)" if restarts else "")
    return f"bdsweep {command}: started {started} on {socket.gethostname()}{slurm}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in STAGES else None).parse_args(argv)
    if args.command in STAGES:
        trace(job_header(args.command))
    try:
        args.handler(args)
    except Preempted as stop:
        trace(f"bdsweep {args.command}: {stop}")
        return PREEMPTED_EXIT_CODE
    except RetryWithLess as failure:
        trace(f"bdsweep {args.command}: {failure}")
        return RETRY_EXIT_CODE
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except (ValueError, KeyError, FileNotFoundError, TypeError) as error:
        print(f"bdsweep {args.command}: error: {str(error).strip(chr(34))}", file=sys.stderr)
        return 1
    return 0
