"""Build a data-poisoning attack's resource for one dataset (BadNets: its patch; SSBA: a trained
encoder; LF: a perturbation against a clean model of one architecture)."""

from __future__ import annotations

import json

import torch

from ..atomic import write_npz
from ..attacks import DataPoisoningAttack, ResourceContext, meta_of
from ..data.store import PreparedDataset
from ..engine import select_device
from ..evaluate import normalisation_of
from ..model_file import load_model
from ..params import resolve
from ..registry import ATTACKS


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--attack", required=True)
    parser.add_argument("--params", default="{}", type=json.loads, help="attack hyperparameters, JSON")
    parser.add_argument("--clean-model", help="clean model file, for attacks computed against an architecture (LF)")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)


def main(args):
    attack = ATTACKS.get(args.attack)
    if not isinstance(attack, DataPoisoningAttack):
        raise ValueError(f"attack {args.attack!r} poisons during training and has no resource")
    if attack.per_architecture and not args.clean_model:
        raise ValueError(f"attack {args.attack!r} is computed against a clean model: pass --clean-model")
    params = resolve(attack.params, args.params, f"attack {args.attack!r}")
    data = PreparedDataset(args.data)
    torch.manual_seed(args.seed)
    context = ResourceContext(
        image_size=data.info.image_size, num_classes=data.info.num_classes, target=args.target, seed=args.seed,
        device=select_device(args.device), normalisation=normalisation_of(data), train_images=data.x_train,
        train_labels=data.y_train[:], clean_model=load_model(args.clean_model)[0] if args.clean_model else None,
    )
    resource = attack.make_resource(context, params)
    if meta_of(resource):
        print(json.dumps({"attack": args.attack, **meta_of(resource)}))
    write_npz(args.out, **resource)
