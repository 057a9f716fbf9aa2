"""Configuration validation: the JSON schema (bdsweep/schemas/config.schema.yaml), then what a
schema cannot know: registered names, hyperparameter names and types,
dataset paths, and SPC against the reserved pool (mitigation.source: reserved_pool). Every error names
the offending key."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import jsonschema
import yaml

from .params import input_file_fields, resolve
from .recipe import Recipe
from .registry import ARCHITECTURES, ATTACKS, DEFENSES, SOURCES, UnknownNameError

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"  # package data


class ConfigError(ValueError):
    pass


def _key(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _with_defaults(validator_class):
    """A validator that also fills in the schema's defaults (as Snakemake's validate() does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def load_schema() -> dict:
    with open(SCHEMA_PATH) as handle:
        return yaml.safe_load(handle)


def check_schema(config: dict) -> None:
    validator = _with_defaults(jsonschema.Draft202012Validator)(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid configuration:\n" + "\n".join(
            f"  {_key(e.absolute_path)}: {e.message}" for e in errors))


def method_params(entry: dict | None, dataset: str, architecture: str | None = None) -> dict:
    """A method's overrides for one (dataset, architecture), most specific last: its general keys,
    by_architecture[architecture], by_dataset[dataset], and that dataset's own
    by_architecture[architecture] (FORK keeps one YAML per (dataset, model))."""
    entry = dict(entry or {})
    entry.pop("only_datasets", None)
    by_dataset = entry.pop("by_dataset", {}) or {}
    by_architecture = entry.pop("by_architecture", {}) or {}
    for_dataset = dict(by_dataset.get(dataset, {}) or {})
    for_dataset_architecture = for_dataset.pop("by_architecture", {}) or {}
    return {**entry, **by_architecture.get(architecture, {}), **for_dataset,
            **for_dataset_architecture.get(architecture, {})}


def applies_to(entry: dict | None, dataset: str) -> bool:
    """Whether a selected method runs on ``dataset`` (``only_datasets`` restricts it)."""
    only = (entry or {}).get("only_datasets")
    return only is None or dataset in only


def _check_name(registry, name: str, key: str) -> object:
    try:
        return registry.get(name)
    except UnknownNameError as error:
        raise ConfigError(f"{key}: {error}") from None


def _check_params(params_class, entry, datasets, architectures, key: str) -> None:
    for dataset, architecture in itertools.product(datasets, [None, *architectures]):
        try:
            resolve(params_class, method_params(entry, dataset, architecture), key)
        except (KeyError, TypeError) as error:
            raise ConfigError(str(error).strip('"')) from None
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None


def check_semantics(config: dict) -> None:
    datasets, architectures = list(config["datasets"]), list(config["architectures"])
    for name, options in config["datasets"].items():
        source = _check_name(SOURCES, options["source"], f"datasets.{name}.source")
        for option in options:
            if option not in (*source.options, "source", "mean", "std", "hflip"):
                raise ConfigError(f"datasets.{name}.{option}: not an option of source {options['source']!r} "
                                  f"(it takes: {', '.join(source.options) or 'none'})")
        for option in source.required:
            if option not in options:
                raise ConfigError(f"datasets.{name}.{option}: required by source {options['source']!r}")
            path = Path(options[option]).expanduser()
            if not path.exists() and not options.get("download", False):
                raise ConfigError(f"datasets.{name}.{option}: path does not exist: {path}")
    for architecture in config["architectures"]:
        _check_name(ARCHITECTURES, architecture, "architectures")
    for attack, entry in config["attacks"].items():
        _check_params(_check_name(ATTACKS, attack, "attacks").params, entry, datasets, architectures,
                      f"attacks.{attack}")
    for defense, entry in config["defenses"].items():
        _check_params(_check_name(DEFENSES, defense, "defenses").params, entry, datasets, architectures,
                      f"defenses.{defense}")
    if "only_datasets" in (config["training"] or {}):
        raise ConfigError("training.only_datasets: only attacks and defenses can be restricted to datasets")
    _check_params(Recipe, config["training"], datasets, architectures, "training")
    mitigation = config["mitigation"]
    # A partition draws SPC images per class and one more (FORK's extra validation draw; see
    # bdsweep.partition), so the reserved pool must hold more than the largest SPC.
    too_big = [spc for spc in mitigation["spc"] if spc >= mitigation["pool_per_class"]]
    if mitigation["source"] == "reserved_pool" and too_big:
        raise ConfigError(f"mitigation.spc: {too_big} reach mitigation.pool_per_class = "
                          f"{mitigation['pool_per_class']} (source reserved_pool: the pool must hold SPC + 1 "
                          "images per class)")


SELECTIONS = (("attacks", ATTACKS), ("defenses", DEFENSES), ("architectures", ARCHITECTURES))


def _override_levels(entry: dict):
    """Every dict of overrides in a method's entry: its own, by_architecture, by_dataset and each
    dataset's by_architecture (see :func:`method_params`)."""
    yield entry
    yield from (entry.get("by_architecture") or {}).values()
    for for_dataset in (entry.get("by_dataset") or {}).values():
        yield for_dataset or {}
        yield from ((for_dataset or {}).get("by_architecture") or {}).values()


def without_missing_input_files(config: dict) -> tuple[dict, list[str]]:
    """A copy of ``config`` in which every method hyperparameter declared an input file
    (``params.input_file``) that names a file not there is emptied (the method's built-in
    default, e.g. Blended's noise pattern), and what was emptied. For planning only: an input
    file changes no job and no pass count, so ``bdsweep cost`` prices a configuration before its
    files are in place; validation and the workflow still refuse a missing file."""
    config, emptied = copy.deepcopy(dict(config)), []
    for key, registry in (("attacks", ATTACKS), ("defenses", DEFENSES)):
        for name, entry in (config.get(key) or {}).items():
            if not isinstance(entry, dict) or name not in registry.names():
                continue  # validation reports it
            for level in _override_levels(entry):
                for field in input_file_fields(registry.get(name).params):
                    value = level.get(field) if isinstance(level, dict) else None
                    if isinstance(value, str) and value and not Path(value).expanduser().is_file():
                        emptied.append(f"{key}.{name}.{field} = {value}")
                        level[field] = ""
    return config, emptied


def validate_config(config: dict) -> dict:
    """Return a validated copy of ``config`` with defaults filled in, or raise ConfigError."""
    config = copy.deepcopy(dict(config))
    check_schema(config)
    check_semantics(config)
    return config


def read_config(path: str | Path) -> dict:
    """A configuration file as a plain (not yet validated) dict."""
    try:
        with open(path) as handle:
            return yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"configuration file {path} is not valid YAML: {error}") from None


def check_class_sizes(config: dict) -> None:
    """Refuse ``mitigation.pool_per_class`` above the size of a class of a dataset already
    prepared under the results directory (its training labels give the class sizes); a dataset not
    prepared yet is checked by its pool job. ``config`` is validated."""
    import numpy as np

    from .layout import DATA_DIR, under

    per_class = config["mitigation"]["pool_per_class"]
    for dataset in config["datasets"]:
        directory = Path(under(config["results"], DATA_DIR).format(dataset=dataset))
        if not (directory / "meta.json").exists():  # meta.json is written last: absent, not prepared
            continue
        try:
            num_classes = int(json.loads((directory / "meta.json").read_text())["num_classes"])
            labels = np.load(directory / "y_train.npy", mmap_mode="r", allow_pickle=False)
            counts = np.bincount(labels, minlength=num_classes)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged dataset is reported by the jobs that read it
        small = {label: int(count) for label, count in enumerate(counts) if count < per_class}
        if small:
            label, count = min(small.items(), key=lambda item: item[1])
            raise ConfigError(f"mitigation.pool_per_class = {per_class} exceeds the training images of "
                              f"{len(small)} class(es) of dataset {dataset!r} (prepared in {directory}); the "
                              f"smallest, class {label}, has {count}: set mitigation.pool_per_class to at most "
                              f"{int(counts.min())}")
