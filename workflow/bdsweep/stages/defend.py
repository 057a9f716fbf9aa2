"""``bdsweep defend``: one defense run on one model and one mitigation partition, written to its
run file (the workflow runs :mod:`bdsweep.stages.defend_model` instead; this is for one run by hand).
The run itself is :func:`bdsweep.runs.defend`."""

from __future__ import annotations

import json

from ..engine import select_device
from ..runs import ModelFiles, RunSpec, defend, file_digest, inputs_fingerprint, model_digests


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="backdoored model file")
    parser.add_argument("--model-metrics", required=True, help="the model's pre-defense metrics file")
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--partition", help="mitigation partition file (bdsweep.partition); omit for defenses that "
                        "use no data")
    parser.add_argument("--backdoor", help="the backdoor test set (a poison file, or a training-time attack's "
                        "backdoor_test.npz); omit for a clean model")
    parser.add_argument("--defense", required=True)
    parser.add_argument("--params", default="{}", type=json.loads, help="defense hyperparameters, JSON")
    parser.add_argument("--coordinates", default="{}", type=json.loads, help="grid coordinates to record")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-percent", type=int, default=100, choices=range(1, 101), metavar="1..100",
                        help="scale the defense's batch sizes to this percentage (by hand, after a GPU "
                        "out-of-memory error; the workflow's defend-model job does this per run itself)")
    parser.add_argument("--out", required=True)


def main(args):
    files = ModelFiles(args.model, args.model_metrics, args.data, args.backdoor)
    run = RunSpec(args.defense, args.params, args.coordinates, args.partition, args.out)
    fingerprint = inputs_fingerprint(run, {**model_digests(files), run.partition: file_digest(run.partition)},
                                     args.batch_percent)
    defend(run, files, select_device(args.device), fingerprint, args.batch_percent)
