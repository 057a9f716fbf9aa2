"""Cost model: jobs per stage and estimated GPU hours of a configuration, without Snakemake.

Counts come from the grid functions and the same dependencies the rule files encode (a run needs
its model, data and partition; a data-poisoning model its poison file, which needs the attack's
resource and the pool; LF's resource needs the clean model of its architecture), so they are
instant at the full grid's size.

Hours are work divided by throughput. Work is counted in **passes**: one image through the model
forward and backward, the unit of a training step. A forward pass alone counts 1/3 of a pass (the
backward costs about twice the forward). Throughput is images per second of training steps, per
(architecture, image size), from a throughput file (``throughput.yaml`` beside this module, or
one written by ``benchmarks/stage_costs.py``). Deliberate simplifications, each an upper or a
typical bound rather than a measurement:

- a defense is priced at its resolved hyperparameters' full schedule: RNP's early stop, NC's
  early stop per class and NC's unlearning (run only when a class is flagged: counted) are taken
  at their maximum;
- second-order work (i-BAU's hypergradient) counts 2 passes per vector-Jacobian product;
- small batches (SPC 2: a 20-image batch on CIFAR-10) run below full-batch throughput, above all
  on a GPU, so small-SPC runs take longer than estimated; the per-job start-up (Python, model
  loading) is not counted;
- stages that run on the CPU (data, pools, partitions, poisoning, tables, figures) count no GPU
  hours; the SSBA encoder's training (resources) is not modelled (FORK's StegaStamp generator: 20 epochs
  over the training set at about 1/8 of a PreAct-ResNet18 pass per image, no throughput measured).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import grid
from .config import method_params
from .data.sources import Sizes as DatasetFacts
from .layout import CLEAN, CLEAN_RATIO, NO_DATA, SHARED_SCOPE, parse_mitigation
from .params import resolve
from .passes import FORWARD, MitigationSize
from .recipe import Recipe
from .registry import ARCHITECTURES, ATTACKS, DEFENSES, SOURCES

DEFAULT_THROUGHPUT = Path(__file__).with_name("throughput.yaml")
FALLBACK_EPOCHS = 100  # an unknown defense is priced as this many fine-tuning epochs (or its own `epochs`)


class ThroughputError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


# ---------------------------------------------------------------------------------------------- datasets


def dataset_facts(options: dict) -> DatasetFacts:
    """A configured dataset's sizes, as its source declares them (``Source.sizes``)."""
    name = options["source"]
    source = SOURCES.get(name)
    if source.sizes is None:
        raise ValueError(f"cost: dataset source {name!r} declares no sizes; give its registration "
                         "`sizes=` (a function of the dataset's options, see bdsweep.data.sources.Sizes)")
    return source.sizes(options)


# ---------------------------------------------------------------------------------------------- defenses


def defense_passes(name: str, params, mitigation: MitigationSize, warned: set[str] | None = None) -> float:
    """Passes of one run, as the defense declares them (``@defense(..., passes=...)``). One that
    declares none is priced as fine-tuning for its own ``epochs`` (else FALLBACK_EPOCHS) over its
    data, with a warning (once per name)."""
    declared = DEFENSES.get(name).passes
    if declared is not None:
        return declared(params, mitigation)
    epochs = getattr(params, "epochs", FALLBACK_EPOCHS)
    if warned is None or name not in warned:
        warnings.warn(f"cost: defense {name!r} declares no passes: priced as {epochs} fine-tuning epochs over its "
                      "mitigation data (give its @defense registration passes=, see bdsweep.passes)", stacklevel=2)
        if warned is not None:
            warned.add(name)
    return epochs * mitigation.images


# ---------------------------------------------------------------------------------------------- counts


@dataclass
class Plan:
    """What a configuration asks Snakemake to build (every target file, hence every job)."""

    datasets: set = field(default_factory=set)
    pools: set = field(default_factory=set)
    partitions: set = field(default_factory=set)
    resources: set = field(default_factory=set)
    poison_files: set = field(default_factory=set)
    data_poisoning_models: set = field(default_factory=set)  # and clean models: rule train_model
    training_time_models: set = field(default_factory=set)
    models_with_runs: set = field(default_factory=set)
    runs: list = field(default_factory=list)


def plan(config: dict) -> Plan:
    """Walk the dependencies of every run as the rule files state them."""
    result = Plan(runs=grid.runs(config))
    for run in result.runs:
        model = grid.ModelKey(run["dataset"], run["architecture"], run["attack"], run["ratio"])
        result.models_with_runs.add(model)
        if run["mitigation"] != NO_DATA:
            result.partitions.add((run["dataset"], run["mitigation"]))
    for model in result.models_with_runs:
        _add_model(result, model)
    result.pools |= {dataset for dataset, _ in result.partitions}
    if config["mitigation"].get("source") != "reserved_pool":
        result.pools.clear()  # by default no job reads a reserved pool, so none is built
    return result


def _add_model(result: Plan, model: grid.ModelKey) -> None:
    result.datasets.add(model.dataset)
    if model.attack == CLEAN:
        result.data_poisoning_models.add(model)
    elif grid.is_training_time(model.attack):
        result.training_time_models.add(model)
        result.pools.add(model.dataset)
    else:
        result.data_poisoning_models.add(model)
        scope = grid.resource_scope(model.attack, model.architecture)
        result.poison_files.add((model.dataset, scope, model.attack, model.ratio))
        result.resources.add((model.dataset, scope, model.attack))
        result.pools.add(model.dataset)
        if scope != SHARED_SCOPE:  # fitted on the clean model of that architecture
            _add_model(result, grid.ModelKey(model.dataset, scope, CLEAN, CLEAN_RATIO))


def job_counts(config: dict, built: Plan | None = None) -> dict[str, int]:
    """Jobs per rule, keyed by rule name, plus ``runs`` (defense runs; today one ``defend`` job each)."""
    from .figures import FIGURES
    from .tables import TABLES

    built = built or plan(config)
    return {
        "prepare_dataset": len(built.datasets),
        **({"reserve_pool": len(built.pools)} if built.pools else {}),  # mitigation.source reserved_pool only
        "draw_partition": len(built.partitions),
        "attack_resource": sum(grid.resource_needs_gpu(attack) for _, _, attack in built.resources),
        "attack_pattern": sum(not grid.resource_needs_gpu(attack) for _, _, attack in built.resources),
        "poison_dataset": len(built.poison_files),
        "train_model": len(built.data_poisoning_models),
        "train_model_poisoned_in_the_loop": len(built.training_time_models),
        "defend_model": len(built.models_with_runs),
        "runs": len(built.runs),
        "aggregate_runs": 1,
        "figure": len(FIGURES),
        "summary_table": len(TABLES),
    }


# ---------------------------------------------------------------------------------------------- throughput


def read_throughput(path: str | Path | None = None) -> dict:
    path = Path(path) if path else DEFAULT_THROUGHPUT
    try:
        with open(path) as handle:
            content = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"throughput file not found: {path}") from None
    if not isinstance(content.get("devices"), dict):
        raise ValueError(f"throughput file {path}: expected a top-level 'devices' mapping")
    return {"path": str(path), **content}


class Throughput:
    """Training images per second of one device, per (architecture, image size)."""

    def __init__(self, table: dict, device: str):
        devices = table["devices"]
        if device not in devices:
            raise ThroughputError(f"throughput file {table['path']} has no device {device!r} "
                                  f"(it has: {', '.join(devices)})")
        self.device, self.path, self.entry = device, table["path"], devices[device]
        self.estimated: set[tuple[str, int]] = set()

    def images_per_s(self, architecture: str, size: int) -> float:
        """The measured (or shipped) rate; for an architecture the file lacks, an estimate from the
        architecture's registered ``forward_gflops`` and the listed architecture closest to it in
        GFLOPs at that size (with a warning, once), else an error saying how to measure it."""
        rates = self.entry.get("images_per_s", {})
        rate = (rates.get(architecture) or {}).get(size)
        if rate:
            return float(rate)
        estimate = self._from_flops(architecture, size, rates)
        if estimate is None:
            raise ThroughputError(
                f"no throughput for (architecture {architecture!r}, {size} px) on device {self.device!r} in "
                f"{self.path}, nor a forward_gflops registered for it and for a listed one to estimate it "
                f"from; measure it: python benchmarks/stage_costs.py --device "
                f"{'cpu' if self.device == 'cpu' else 'cuda'} --architectures "
                f"{architecture} --sizes {size} --name {self.device} --out {self.path}")
        return estimate

    def _from_flops(self, architecture: str, size: int, rates: dict) -> float | None:
        def gflops(name: str, at: int) -> float | None:
            try:
                return ARCHITECTURES.entry(name).facts.get("forward_gflops", {}).get(at)
            except KeyError:
                return None

        own = gflops(architecture, size)
        listed = {(name, at): (float(rate), gflops(name, at)) for name, by_size in rates.items()
                  for at, rate in (by_size or {}).items() if rate and gflops(name, at)}
        if not own or not listed:
            return None
        # the listed (architecture, size) nearest in GFLOPs, preferring the same size
        reference = min(listed, key=lambda key: (key[1] != size, abs(math.log(listed[key][1] / own))))
        rate, reference_gflops = listed[reference]
        if (architecture, size) not in self.estimated:
            self.estimated.add((architecture, size))
            warnings.warn(f"cost: no throughput for {architecture!r} at {size} px on {self.device!r} in {self.path}: "
                          f"estimated from {reference[0]!r} at {reference[1]} px by forward GFLOPs "
                          f"({reference_gflops} vs {own})", stacklevel=3)
        return rate * reference_gflops / own

    def hours(self, passes: float, architecture: str, size: int) -> float:
        return passes / self.images_per_s(architecture, size) / 3600 if passes else 0.0


# ---------------------------------------------------------------------------------------------- hours


def _evaluation_passes(facts: DatasetFacts, backdoored: bool) -> float:
    """The clean test set and (backdoored models) the backdoor test set, forward once."""
    backdoor = facts.test * (facts.classes - 1) / facts.classes if backdoored else 0
    return (facts.test + backdoor) * FORWARD


def training_passes(config: dict, model: grid.ModelKey, facts: DatasetFacts) -> float:
    recipe = resolve(Recipe, method_params(config["training"], model.dataset, model.architecture), "training")
    passes = recipe.epochs * facts.train
    if model.attack == "iab":  # its pattern generator trains in every step; its mask generator first
        overrides = method_params(config["attacks"]["iab"], model.dataset, model.architecture)
        iab = resolve(ATTACKS.get("iab").params, overrides, "attacks.iab")
        passes = 2 * passes + iab.mask_epochs * facts.train
    return passes + _evaluation_passes(facts, model.attack != CLEAN)


def resource_passes(config: dict, dataset: str, scope: str, attack: str) -> float | None:
    """The work of an attack's resource, as its registration declares it (``resource_passes``): e.g.
    LF's search through the clean model; None where it is not priced in classifier passes (SSBA's
    encoder and decoder), 0 for patterns, patches and signals (no GPU)."""
    architecture = None if scope == SHARED_SCOPE else scope
    overrides = method_params(config["attacks"][attack], dataset, architecture)
    entry = ATTACKS.entry(attack)
    return entry.facts["resource_passes"](resolve(entry.obj.params, overrides, f"attacks.{attack}"))


@dataclass
class Stage:
    stage: str
    rule: str
    jobs: int
    units: float | None = None
    unit: str = ""
    gpu_hours: float | None = 0.0  # None: a count within the row above (defense runs)


@dataclass
class Estimate:
    device: str
    throughput_file: str
    throughput_note: str
    stages: list[Stage]
    defenses: dict[str, dict]
    total_gpu_hours: float
    warnings: list[str]

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "stages": [dataclasses.asdict(s) for s in self.stages]}


def estimate(config: dict, throughput: Throughput) -> Estimate:
    built = plan(config)
    counts = job_counts(config, built)
    facts = {name: dataset_facts(options) for name, options in config["datasets"].items()}
    warned: set[str] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def train_hours(models):
            passes = {m: training_passes(config, m, facts[m.dataset]) for m in models}
            return (sum(passes.values()),
                    sum(throughput.hours(p, m.architecture, facts[m.dataset].size) for m, p in passes.items()))

        data_units, data_hours = train_hours(built.data_poisoning_models)
        time_units, time_hours = train_hours(built.training_time_models)
        resource = [(r, resource_passes(config, *r)) for r in built.resources]
        unmodelled = [r for r, p in resource if p is None]
        resource_hours = sum(throughput.hours(p, r[1], facts[r[0]].size) for r, p in resource if p)
        defenses: dict[str, dict] = {}
        # A run's cost depends only on these, so each distinct combination is priced once.
        kinds = Counter((run["defense"], run["dataset"], run["architecture"], run["attack"] == CLEAN,
                         parse_mitigation(run["mitigation"])[0]) for run in built.runs)
        for (name, dataset, architecture, clean, spc), runs in sorted(kinds.items(), key=str):
            params = resolve(DEFENSES.get(name).params, method_params(config["defenses"][name], dataset, architecture),
                             f"defenses.{name}")
            size = MitigationSize((spc or 0) * facts[dataset].classes, facts[dataset].classes)
            passes = runs * (defense_passes(name, params, size, warned)
                             + _evaluation_passes(facts[dataset], backdoored=not clean))
            row = defenses.setdefault(name, {"runs": 0, "passes": 0.0, "gpu_hours": 0.0})
            row["runs"] += runs
            row["passes"] += passes
            row["gpu_hours"] += throughput.hours(passes, architecture, facts[dataset].size)
    defend_hours = sum(row["gpu_hours"] for row in defenses.values())
    stages = [
        Stage("data preparation", "prepare_dataset", counts["prepare_dataset"]),
        *([Stage("mitigation pools", "reserve_pool", counts["reserve_pool"])] if "reserve_pool" in counts else []),
        Stage("mitigation partitions", "draw_partition", counts["draw_partition"]),
        Stage("attack patterns (numpy)", "attack_pattern", counts["attack_pattern"]),
        Stage("attack resources", "attack_resource", counts["attack_resource"],
              sum(p for _, p in resource if p), "passes", resource_hours),
        Stage("poison files", "poison_dataset", counts["poison_dataset"]),
        Stage("models, data poisoning + clean", "train_model", counts["train_model"], data_units, "passes",
              data_hours),
        Stage("models, training-time attacks", "train_model_poisoned_in_the_loop",
              counts["train_model_poisoned_in_the_loop"], time_units, "passes", time_hours),
        Stage("defend (one job per model)", "defend_model", counts["defend_model"],
              sum(row["passes"] for row in defenses.values()), "passes", defend_hours),
        Stage("  defense runs", "runs", counts["runs"], counts["runs"], "runs", None),
        Stage("aggregate", "aggregate_runs", counts["aggregate_runs"]),
        Stage("figures", "figure", counts["figure"]),
        Stage("summary tables", "summary_table", counts["summary_table"]),
    ]
    notes = [str(w.message) for w in caught]
    if unmodelled:
        notes.append("not modelled (excluded from resources and the total): the SSBA encoder's training, "
                     f"{len(unmodelled)} resource job(s); 20 epochs of a StegaStamp encoder each by default, a GPU job")
    total = resource_hours + data_hours + time_hours + defend_hours
    return Estimate(throughput.device, throughput.path, throughput.entry.get("note", ""), stages, defenses, total,
                    notes)


# ---------------------------------------------------------------------------------------------- output


def _hours(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2g}" if value else "0"


def _units(value: float | None, unit: str) -> str:
    if not unit:
        return ""
    return f"{value:,.0f} runs" if unit == "runs" else f"{value:.2e} {unit}"


def format_estimate(result: Estimate) -> str:
    lines = [f"device {result.device!r} from {result.throughput_file}",
             *([f"  ({result.throughput_note.strip()})"] if result.throughput_note else []), "",
             f"{'stage':34} {'rule':34} {'jobs':>9} {'work':>20} {'GPU hours':>10}"]
    for s in result.stages:
        hours = "" if s.unit == "runs" else _hours(s.gpu_hours)
        lines.append(f"{s.stage:34} {s.rule:34} {s.jobs:>9,} {_units(s.units, s.unit):>20} {hours:>10}")
    lines += [f"{'total':34} {'':34} {'':>9} {'':>20} {_hours(result.total_gpu_hours):>10}", "",
              f"{'defense':10} {'runs':>9} {'passes':>10} {'GPU hours':>10}"]
    for name, row in sorted(result.defenses.items(), key=lambda item: -item[1]["gpu_hours"]):
        lines.append(f"{name:10} {row['runs']:>9,} {row['passes']:>10.2e} {_hours(row['gpu_hours']):>10}")
    lines += ["", "passes: images through the model forward and backward (a forward alone = 1/3); "
              "hours = passes / the device's training images per second", *(f"note: {w}" for w in result.warnings)]
    return "\n".join(lines)
