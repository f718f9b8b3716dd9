"""The sweep spec: a training spec (model, corpus, activations, sae, trainer, eval) plus a `sweep:` section.

Every searched value is a field of `sae` or `trainer`, named by its dotted path ("trainer.beta"), or
`activations.pairing` (the positive-pair rule: every shard holds all rules' partners, so trials with different
rules still share the base spec's producer and cache; no other activations field can be searched, since it
would change the activations themselves). The whole spec, including the ends of every search range and every
point to evaluate, is validated here, before Ray starts, so a typo never costs a cluster start-up.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from csc.config import Spec, TrainRunSpec
from csc.sae.config import WARMUPS, TrainerConfig
from csc.errors import SpecError
from csc.sae.archs import ARCHITECTURES
from csc.sae.trainer import TRAINING_METRICS

REPORT_METRICS = TRAINING_METRICS
"""What the reports of a trial carry (averages over the steps since the previous report; a term's metric only
where the trial has that term); only these can drive the search and the scheduler, because a trial stopped
early never reaches the held-out eval."""

SEARCHABLE_ACTIVATIONS = ("activations.pairing",)
"""The activations fields a sweep may search: they choose among what every shard holds, so one producer and one
cache still serve every trial. Any other activations field would change the shards the trials share."""


class SearchParam(Spec):
    """The range of one searched field."""

    type: Literal["loguniform", "uniform", "int", "logint", "choice"]
    """loguniform/uniform: a float in [low, high]; int/logint: an integer in [low, high] (logint on a
    log scale); choice: one of `values`."""
    low: float | None = None
    """Lower end (all types but choice)."""
    high: float | None = None
    """Upper end, inclusive (all types but choice)."""
    values: list[Any] | None = None
    """The candidates of a choice."""

    @model_validator(mode="after")
    def _check(self) -> "SearchParam":
        if self.type == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("a choice needs a non-empty `values` list and no low/high")
            return self
        if self.low is None or self.high is None or self.values is not None:
            raise ValueError(f"a {self.type} range needs `low` and `high` (and no `values`)")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type in ("loguniform", "logint") and self.low <= 0:
            raise ValueError(f"a {self.type} range needs low > 0")
        if self.type in ("int", "logint") and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("an int range needs integer low and high")
        return self

    def ends(self) -> list[Any]:
        """The values that bound the range: checking these against the field checks every sample."""
        if self.type == "choice":
            return list(self.values)
        if self.type in ("int", "logint"):
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class Objective(Spec):
    metric: Literal[REPORT_METRICS]
    """A per-report training metric (see REPORT_METRICS)."""
    mode: Literal["min", "max"]
    """Whether lower or higher is better."""


class AshaSpec(Spec):
    """Asynchronous successive halving: at each rung a trial continues only if it is in the top
    1/reduction_factor of the trials that reached that rung."""

    metric: Literal[REPORT_METRICS] = "ev"
    """Training metric the rungs compare."""
    mode: Literal["min", "max"] = "max"
    """Whether lower or higher is better."""
    grace_period: int = Field(100, ge=1)
    """Steps every trial trains before it can be stopped (the first rung)."""
    reduction_factor: float = Field(2.0, gt=1)
    """Rung spacing and the fraction kept: rungs at grace_period * rf^k steps."""


class ResourcesSpec(Spec):
    trial_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per trial (torch in the trial uses this many threads)."""
    trial_gpus: float = Field(0.0, ge=0)
    """GPUs per trial; fractions share one GPU between trials."""
    producer_cpus: float = Field(1.0, gt=0)
    """CPUs reserved for the activation producer actor."""
    producer_gpus: float = Field(0.0, ge=0)
    """GPUs for the producer (the LM); a fraction leaves room for trials on the same GPU."""
    producer_custom: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources the producer needs, e.g. {lm_node: 1} to place it on the node started with
    `ray start --resources='{"lm_node": 1}'`."""
    trial_custom: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources every trial needs (places trials on the nodes that advertise them)."""

    @field_validator("producer_custom", "trial_custom")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if amount <= 0 or name in ("CPU", "GPU", "memory"):
                raise ValueError(f"{name}: give a custom resource with a positive amount "
                                 f"(CPUs and GPUs have their own fields)")
        return v


class ProducerSpec(Spec):
    memory_mb: int = Field(2048, ge=1)
    """Shards the producer keeps in memory, at most this many MiB (least recently used go first)."""
    prefetch: int = Field(2, ge=0)
    """Shards the producer computes ahead of the furthest one asked for."""
    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts the producer if its process dies; trials' calls are retried meanwhile."""


class TrackingSpec(Spec):
    uri: str | None = None
    """MLflow tracking URI: `sqlite:///path.db`, or an `http://host:port` server. Default:
    sqlite:///mlflow.db in the working directory, artifacts in ./mlartifacts."""
    artifact_root: str | None = None
    """Where a new experiment keeps its artifacts (a SQLite store has no default). Default: ./mlartifacts."""
    experiment: str | None = None
    """MLflow experiment name. Default: the sweep's name."""


SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
"""A sweep name is a folder name under --out: no separators, no leading dot, so it cannot leave it."""


class SweepSection(Spec):
    name: str | None = Field(None, pattern=SAFE_NAME)
    """Sweep name: the output folder and the MLflow parent run. Default: the spec file's stem.
    Letters, digits, '.', '_' and '-', not starting with '.' or '-'."""
    method: Literal["optuna", "grid"] = "optuna"
    """optuna: Optuna's TPE samples `search` (one or several objectives); grid: every combination of the
    `search` choices runs once, in order (all must be `choice`; e.g. gamma x tau x pairing x trainer.seed)."""
    num_samples: int | None = Field(None, ge=1)
    """Trials to run, including `points_to_evaluate`. Default: 8 (optuna), the grid's size (grid)."""
    max_concurrent: int = Field(2, ge=1)
    """Trials running at the same time."""
    seed: int = 0
    """Seed of the Optuna sampler."""
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(metric="ev", mode="max")], min_length=1)
    """What Optuna optimises: one objective, or several (a Pareto search, e.g. ev max and l0 min)."""
    search: dict[str, SearchParam] = Field(default_factory=dict)
    """Searched fields by dotted path, e.g. trainer.beta, trainer.gamma, trainer.temperature, sae.dict_size,
    activations.pairing."""
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    """Trials to run first with these exact values (each names every searched field), e.g. a baseline."""
    scheduler: AshaSpec | None = AshaSpec()
    """Early stopping; null runs every trial to trainer.steps."""
    max_failures: int = Field(0, ge=0)
    """Times a failed trial is retried from its last checkpoint (a diverging trial fails again)."""
    resources: ResourcesSpec = ResourcesSpec()
    """Ray resources of trials and of the producer."""
    producer: ProducerSpec = ProducerSpec()
    """The shared activation producer."""
    tracking: TrackingSpec = TrackingSpec()
    """Where MLflow records the sweep."""


class SweepSpec(TrainRunSpec):
    """What `csc sweep SPEC.yaml` reads: a training spec whose sae/trainer fields are the base of every
    trial, plus the `sweep` section."""

    sweep: SweepSection = SweepSection()
    """The search, the scheduler, resources and tracking."""

    @model_validator(mode="after")
    def _check_search(self) -> "SweepSpec":
        for key, param in self.sweep.search.items():
            for value in param.ends():
                _check_value(self, key, value, f"sweep.search.{key}")
        if self.sweep.method == "grid":
            ranged = [k for k, p in self.sweep.search.items() if p.type != "choice"]
            if ranged or not self.sweep.search:
                raise ValueError(f"sweep.method grid needs `choice` values for every searched field"
                                 + (f" ({', '.join(ranged)} is a range)" if ranged else " (sweep.search is empty)"))
            if self.sweep.points_to_evaluate:
                raise ValueError("sweep.points_to_evaluate: a grid runs every point already; drop it or use optuna")
            size = len(self.grid())
            if self.sweep.num_samples not in (None, size):
                raise ValueError(f"sweep.num_samples ({self.sweep.num_samples}) must be the grid's size, {size}, "
                                 f"or unset")
        for n, point in enumerate(self.sweep.points_to_evaluate):
            if set(point) != set(self.sweep.search):
                raise ValueError(f"sweep.points_to_evaluate[{n}] must give exactly the searched fields "
                                 f"{sorted(self.sweep.search)}, got {sorted(point)}")
            for key, value in point.items():
                point[key] = _check_value(self, key, value, f"sweep.points_to_evaluate[{n}].{key}")
        if len(self.sweep.points_to_evaluate) > self.n_trials:
            raise ValueError("sweep.points_to_evaluate has more points than sweep.num_samples")
        asha = self.sweep.scheduler
        if asha is not None and asha.grace_period >= self.trainer.steps:
            raise ValueError(f"sweep.scheduler.grace_period ({asha.grace_period}) must be below trainer.steps "
                             f"({self.trainer.steps}), or no trial can be stopped early")
        if asha is not None:
            name, warm = max(((w, self.trainer.warmup(w)) for w in WARMUPS), key=lambda nw: nw[1])
            if asha.grace_period <= warm:
                raise ValueError(f"sweep.scheduler.grace_period ({asha.grace_period}) must come after the warm-ups "
                                 f"(trainer.{name}: {warm} steps): the first rung would rank trials before their "
                                 f"loss weights reach their values (a trial with a large gamma then looks frozen)")
        return self

    @property
    def n_trials(self) -> int:
        """How many trials the sweep runs."""
        if self.sweep.num_samples is not None:
            return self.sweep.num_samples
        return len(self.grid()) if self.sweep.method == "grid" else 8

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the searched choices, the last field varying fastest (method grid)."""
        keys = list(self.sweep.search)
        values = [[_check_value(self, k, v, f"sweep.search.{k}") for v in self.sweep.search[k].values] for k in keys]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]

    def trial(self, params: dict[str, Any]) -> TrainRunSpec:
        """The training spec of one trial: the base with `params` (dotted paths) set."""
        return TrainRunSpec.model_validate(with_params(self, params))


def with_params(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The base spec (without `sweep`) with `params` set. A trial whose architecture differs from the base's
    keeps the base's common sae fields, its own take their defaults, and a searched sae field that its
    architecture lacks (e.g. sae.k for a relu trial) is left out."""
    data = spec.model_dump(exclude={"sweep"})
    arch = params.get("sae.architecture", spec.sae.architecture)
    fields = ARCHITECTURES[arch].config_class.model_fields if arch in ARCHITECTURES else {}
    if arch != spec.sae.architecture:
        data["sae"] = {k: v for k, v in data["sae"].items() if k in fields}
    for key, value in params.items():
        section, field = key.split(".", 1)
        if section == "sae" and fields and field not in fields:
            continue
        data[section][field] = value
    return data


def _architectures(spec: SweepSpec) -> list[str]:
    """The architectures this sweep's trials can have: the base's and those searched."""
    searched = spec.sweep.search.get("sae.architecture")
    return list(dict.fromkeys([spec.sae.architecture, *(searched.ends() if searched else [])]))


def _check_value(spec: SweepSpec, key: str, value: Any, where: str) -> Any:
    """`value` as the field holds it (YAML reads 1.0e20 as a string; the field makes it a float)."""
    section, _, field = key.partition(".")
    if (section not in ("sae", "trainer") or not field or "." in field) and key not in SEARCHABLE_ACTIVATIONS:
        raise ValueError(f"{where}: searched fields are `sae.<field>`, `trainer.<field>` or "
                         f"{', '.join(f'`{k}`' for k in SEARCHABLE_ACTIVATIONS)} (other activations fields would "
                         f"change the activations all trials share)")
    params = {key: value}
    if section == "trainer":
        if field not in TrainerConfig.model_fields:
            raise ValueError(f"{where}: TrainerConfig has no searchable field {field!r}")
    elif section == "sae" and field != "architecture":
        archs = [a for a in _architectures(spec) if a in ARCHITECTURES
                 and field in ARCHITECTURES[a].config_class.model_fields]
        if not archs or field == "d_in":
            raise ValueError(f"{where}: no architecture of this sweep ({', '.join(_architectures(spec))}) has a "
                             f"searchable field {field!r}")
        params["sae.architecture"] = archs[0]
    try:
        checked = TrainRunSpec.model_validate(with_params(spec, params))
    except ValidationError as e:
        reason = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"{where}: value {value!r} is invalid: {reason}") from None
    return getattr(getattr(checked, section), field)


def sweep_name(spec: SweepSpec, path: str | Path | None) -> str:
    name = spec.sweep.name or (Path(path).stem if path else "sweep")
    if not re.match(SAFE_NAME, name):
        raise SpecError(f"{path}: the sweep is named after the file, and {name!r} is not a plain folder name: "
                        f"set sweep.name (letters, digits, '.', '_', '-')")
    return name
