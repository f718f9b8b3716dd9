"""The sweep spec: a training spec (model, corpus, activations, sae, trainer, eval) plus a `sweep:` section.

Every searched value is a field of `sae` or `trainer`, named by its dotted path ("trainer.beta"), or
`activations.pairing` (the positive-pair rule: every shard holds all rules' partners, so trials with different
rules still share the base spec's producer and cache) or `activations.batching` (how batches are cut from the same
shards); no other activations field can be searched, since it would change the activations themselves. The whole
spec, including the ends of every search range and every point to evaluate, is validated here, before Ray starts,
so a typo never costs a cluster start-up.
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
from csc.spec_loader import did_you_mean
from csc.pipeline.absorption import ABSORPTION_METRICS
from csc.sweep.report import SEED
from csc.pipeline import rung as rung_figures
from csc.sweep.reported import EVAL_PREFIX, HELD_OUT, RUNG_OF, held_out, trial_metrics

REPORT_METRICS = TRAINING_METRICS
"""What every report of a trial carries (averages over the steps since the previous report; a term's metric only
where the trial has that term, csc.sweep.reported); only these can drive the scheduler, which ranks trials
before their last step. Objectives may also be held-out figures (HELD_OUT), which the final report adds."""

SEARCHABLE_ACTIVATIONS = ("activations.pairing", "activations.batching")
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


def _unknown(name: str) -> str:
    hint = f" (did you mean {EVAL_PREFIX + name!r}?)" if EVAL_PREFIX + name in HELD_OUT else ""
    return (f"{name!r} is not a metric trials report{hint}: a training metric ({', '.join(REPORT_METRICS)}) or a "
            f"held-out figure of the final evaluation ({', '.join(HELD_OUT)})")


class Objective(Spec):
    metric: str
    """What Optuna is told when a configuration's trials have ended: a training metric (REPORT_METRICS, as the
    final report has it: its average over the last `trainer.log_every` steps), or a held-out figure of the final
    evaluation (HELD_OUT: eval/ + a key of `csc eval`, e.g. eval/ce_loss_recovered, eval/delta_ce, eval/kl_spliced).
    Every trial of the sweep must report it (checked at load); a trial stopped early is told as pruned."""
    mode: Literal["min", "max"]
    """Whether lower or higher is better."""

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in REPORT_METRICS and v not in HELD_OUT:
            raise ValueError(_unknown(v))
        return v


class RungFigure(Spec):
    """One figure the scheduler's rungs rank trials on."""

    metric: str
    """A rung figure (heldout/ + a key of csc.pipeline.rung.FIGURES: measured on the held-out slice at every report)
    or a training metric that every trial has in every report (REPORT_METRICS: an average over the training batches
    since the previous report). Not a held-out eval/ figure: those are measured once, after a trial's last step."""
    mode: Literal["min", "max"] | None = None
    """Whether lower or higher is better; a rung figure's own by default (csc.pipeline.rung.FIGURES), needed for a
    training metric."""

    @field_validator("metric")
    @classmethod
    def _ranked_at_rungs(cls, v: str) -> str:
        return _rung_metric(v)

    @model_validator(mode="before")
    @classmethod
    def _direction(cls, data: Any) -> Any:
        return _with_mode(data)


def _rung_metric(v: str) -> str:
    """`v`, if the rungs can rank on it."""
    if v in HELD_OUT:
        own = RUNG_OF.get(v)
        raise ValueError(f"{v!r} is a held-out figure, measured once after a trial's last step; the rungs rank "
                         f"trials before that: give a rung figure" + (f" (its own is {own!r})" if own else "")
                         + f" or a training metric, and make {v!r} an objective")
    if v not in REPORT_METRICS and v not in rung_figures.NAMES:
        raise ValueError(f"{v!r} is neither a rung figure ({', '.join(rung_figures.NAMES)}) nor a training metric "
                         f"({', '.join(REPORT_METRICS)})")
    return v


def _with_mode(data: Any) -> Any:
    """Raw `data` with a rung figure's own direction as its mode where none is given; a training metric needs one."""
    if not isinstance(data, dict) or data.get("mode") is not None or not isinstance(data.get("metric"), str):
        return data
    if data["metric"] in rung_figures.NAMES:
        return {**data, "mode": rung_figures.FIGURES[data["metric"].removeprefix(rung_figures.PREFIX)]}
    if data["metric"] in REPORT_METRICS:
        raise ValueError(f"mode: give min or max for the training metric {data['metric']!r}")
    return data  # an unknown metric: the field's own check names it


class SchedulerSpec(Spec):
    """Asynchronous successive halving (csc.sweep.halving): rungs at grace_period * reduction_factor^k steps, below
    trainer.steps; a trial that reaches a rung is ranked against the trials that reached it before, and continues
    only if it is in the top 1/reduction_factor of them (itself included). Its decision at a rung stands, across a
    resume too (its decisions are kept in the sweep folder, scheduler.jsonl)."""

    type: Literal["mo-asha", "asha"] = "mo-asha"
    """mo-asha: the trials are ordered by non-dominated sorting on several figures (`figures`), ties within a front
    by `tie_break` (Schmucker et al. 2021); asha: by one figure (`metric`)."""
    metric: str | None = None
    """asha: the figure ranked at each rung (a rung figure or a training metric, as in `figures`)."""
    mode: Literal["min", "max"] | None = None
    """asha: whether lower or higher `metric` is better (a rung figure's own by default)."""
    figures: list[RungFigure] | None = None
    """mo-asha: the figures ranked at each rung. Default: each objective's rung figure (csc.sweep.reported.RUNG_OF:
    eval/delta_ce, eval/kl_spliced, eval/ce_loss_recovered and the reconstruction figures -> heldout/normalized_mse;
    eval/l0 -> heldout/l0; eval/nce -> heldout/nce; eval/context_locality -> heldout/context_locality; ...), each
    once."""
    tie_break: Literal["crowding_distance", "epsilon_net"] = "crowding_distance"
    """mo-asha: the order within a non-dominated front: crowding_distance (NSGA-II's; ties by the sum of the scaled
    figures) or epsilon_net (MO-ASHA's paper: seeded by the best in the first figure, then spread along the front).
    Replayed on full-budget sweeps (bench/README.md section 10), crowding distance kept 0.91 of the final front's
    hypervolume in 8-trial sweeps, the epsilon-net 0.74: at the small rungs of an asynchronous sweep the net's seed
    decides, so it ranks like single-figure ASHA on the first figure."""
    grace_period: int = Field(100, ge=1)
    """Steps every trial trains before it can be stopped (the first rung); after the warm-ups."""
    reduction_factor: float = Field(2.0, gt=1)
    """Rung spacing and the fraction kept: rungs at grace_period * rf^k steps, the top 1/rf continue."""

    @field_validator("metric")
    @classmethod
    def _ranked_at_rungs(cls, v: str | None) -> str | None:
        return None if v is None else _rung_metric(v)

    @model_validator(mode="before")
    @classmethod
    def _direction(cls, data: Any) -> Any:
        return _with_mode(data) if isinstance(data, dict) and data.get("type") == "asha" else data

    @model_validator(mode="after")
    def _one_kind(self) -> "SchedulerSpec":
        if self.type == "asha":
            if self.metric is None:
                raise ValueError("type asha ranks on one figure: give metric (e.g. heldout/explained_variance)")
            if self.figures is not None:
                raise ValueError("figures are mo-asha's; type asha ranks on metric alone")
        elif self.metric is not None or self.mode is not None:
            raise ValueError("metric and mode are ASHA's: set type: asha to rank on one figure, or give mo-asha's "
                             "figures (default: the objectives' rung figures)")
        return self

    def ranked(self, objectives: list["Objective"]) -> list[tuple[str, str]]:
        """(figure, mode) pairs the rungs rank on."""
        if self.type == "asha":
            return [(self.metric, self.mode)]
        if self.figures is not None:
            return [(f.metric, f.mode) for f in self.figures]
        names = list(dict.fromkeys(RUNG_OF[o.metric] for o in objectives))
        return [(name, rung_figures.FIGURES[name.removeprefix(rung_figures.PREFIX)]) for name in names]


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
    """The activation producer: a pool of `replicas` Ray actors, each with its own LM (csc.sweep.producer)."""

    replicas: int = Field(1, ge=1)
    """Producer actors, each taking resources.producer_cpus, producer_gpus and producer_custom (a custom resource
    that each GPU node offers once, e.g. {lm_node: 1}, puts one replica on each). Replica r owns the shards i with
    i % replicas == r and is the only one that loads or computes them, so each shard is still made once per sweep;
    replica 0 also makes what is made once (the scale, the probing set, absorption's LM part, CE/KL, logit tables)."""
    store: Literal["disk", "memory"] = "disk"
    """Where shards live. disk: also in the activation cache (activations.cache_dir), from which an evicted shard,
    a restarted replica and later sweeps and runs read them back. memory: only in the replicas' memory, never on
    disk: a shard asked for after its eviction is computed again (counted: lm_shards_recomputed), so the sweep's
    token budget is bounded by time rather than disk; the summary reports the LM tokens per trained token."""
    memory_mb: float = Field(2048, gt=0)
    """Shards each replica keeps in memory, at most this many MiB. When full, shards that every running trial has
    read go first (least recently used first), then the least recently used."""
    prefetch: int = Field(2, ge=0)
    """Shards each replica computes ahead of the furthest one asked of it (the next ones it owns)."""
    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts a replica if its process dies; trials' calls are retried meanwhile."""
    evaluators: int = Field(1, ge=1)
    """Threads of replica 0 that measure trials' SAEs with the LM (CE/KL, the dashboard's logit tables) at once,
    beside its shard production, on the replica's resources. More than one helps when trials wait on each other's
    evaluation while cores (or the GPU) have room; each evaluation runs the LM's torch threads."""


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
    """Configurations to run, including `points_to_evaluate`, each `seeds` times. Default: 8 (optuna), the grid's
    size (grid)."""
    seeds: int = Field(1, ge=1)
    """Runs of each configuration, with trainer.seed = the base's trainer.seed + 0, 1, ..., seeds - 1: the SAE's
    initialisation (the data order is the base spec's in every trial). Optuna is told one value per configuration,
    the mean over its seeds (failed if one seed failed); the reports show each configuration's mean and spread
    (configs.csv, error bars in pareto.png, `csc report`). Not with a searched trainer.seed (a grid over
    trainer.seed is reported the same way: its configurations are its points less the seed), nor with a
    scheduler: ASHA ranks trials one by one, so it would rank a configuration's seeds against each other."""
    max_concurrent: int = Field(2, ge=1)
    """Trials running at the same time."""
    seed: int = 0
    """Seed of the Optuna sampler."""
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(metric="ev", mode="max")], min_length=1)
    """What Optuna optimises: one objective, or several (a Pareto search, e.g. eval/ce_loss_recovered max and
    eval/l0 min)."""
    search: dict[str, SearchParam] = Field(default_factory=dict)
    """Searched fields by dotted path, e.g. trainer.beta, trainer.gamma, trainer.temperature, sae.dict_size,
    activations.pairing."""
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    """Trials to run first with these exact values (each names every searched field), e.g. a baseline."""
    scheduler: SchedulerSpec | None = SchedulerSpec()
    """Early stopping (MO-ASHA on the objectives' rung figures by default); null runs every trial to
    trainer.steps."""
    max_failures: int = Field(0, ge=0)
    """Times a failed trial is retried from its last checkpoint (a diverging trial fails again)."""
    resources: ResourcesSpec = ResourcesSpec()
    """Ray resources of trials and of the producer."""
    producer: ProducerSpec = ProducerSpec()
    """The shared activation producer: its replicas, where shards live, memory, prefetch, restarts."""
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
        if self.sweep.seeds > 1 and SEED in self.sweep.search:
            first = self.trainer.seed
            raise ValueError(f"sweep.seeds ({self.sweep.seeds}) runs each configuration with {SEED} {first}..."
                             f"{first + self.sweep.seeds - 1}, and sweep.search.{SEED} searches it too: give the seeds "
                             f"one way (drop sweep.search.{SEED}, or set sweep.seeds to 1)")
        if self.sweep.seeds > 1 and self.sweep.scheduler is not None:
            raise ValueError(f"sweep.seeds ({self.sweep.seeds}) needs sweep.scheduler: null: ASHA ranks trials one by "
                             f"one, so it would rank a configuration's seeds against each other and prune "
                             f"configurations for their seeds' noise (a second seed is stopped whenever it is below "
                             f"the first at the first rung); run the seeds without early stopping, or set "
                             f"sweep.seeds to 1")
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
        if len(self.sweep.points_to_evaluate) > self.n_configs:
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

    @model_validator(mode="after")
    def _check_metrics(self) -> "SweepSpec":
        """Every objective in every trial's final report, the scheduler's metric in every report of every trial:
        checked on the trials the search can make at the ends of its ranges and choices, and the points."""
        reports = []
        for params in self._bounding_params():
            try:
                trial = self.trial(params)
            except ValidationError:
                continue  # such a trial fails at its start and reports nothing
            reports.append((params, *trial_metrics(trial.sae, trial.trainer)))
        if not reports:
            raise ValueError("sweep.search: no trial at the ends of the searched ranges and choices is a valid spec, "
                             "so none would report anything")
        reported = held_out(self.corpus, self.eval)  # the corpus is the base's in every trial
        for n, objective in enumerate(self.sweep.objectives):
            if objective.metric in HELD_OUT and objective.metric not in reported and \
                    objective.metric in {EVAL_PREFIX + key for key, _ in ABSORPTION_METRICS}:
                raise ValueError(f"sweep.objectives[{n}].metric: {objective.metric!r} is a figure of feature "
                                 f"absorption, which eval.absorption false turns off: no trial would report it")
            if objective.metric in HELD_OUT and objective.metric not in reported:
                raise ValueError(
                    f"sweep.objectives[{n}].metric: {objective.metric!r} is a figure of sparse probing's sequence "
                    f"task, which needs labelled documents, and corpus.source {self.corpus.source!r} has none "
                    f"without corpus.label_field (a JSONL file's or Hub dataset's column of labels): no trial "
                    f"would report it")
            lacking = [(p, final) for p, _, final in reports if objective.metric not in final]
            if lacking and objective.metric not in HELD_OUT:  # the held-out figures: every finished trial's
                params, final = lacking[0]
                evaluated = EVAL_PREFIX + objective.metric
                raise ValueError(
                    f"sweep.objectives[{n}].metric: {_trials(params)} do not report {objective.metric!r} (a loss "
                    f"term's metric exists only where a trial has the term; they report "
                    f"{', '.join(sorted(m for m in final if m in REPORT_METRICS))}); "
                    f"Optuna needs every objective from every trial"
                    + (f": the held-out {evaluated!r} is measured for every trial" if evaluated in reported else ""))
        sched = self.sweep.scheduler
        if sched is None:
            return self
        if sched.type == "mo-asha" and sched.figures is None:
            for n, objective in enumerate(self.sweep.objectives):
                if objective.metric not in RUNG_OF:
                    raise ValueError(f"sweep.scheduler: objective {n}, {objective.metric!r}, has no rung figure to "
                                     f"stand for it at the rungs (csc.sweep.reported.RUNG_OF); name the figures the "
                                     f"rungs rank on in sweep.scheduler.figures (e.g. heldout/normalized_mse)")
        where = "sweep.scheduler.metric" if sched.type == "asha" else "sweep.scheduler.figures"
        always = set.intersection(*(set(e) for _, e, _ in reports))
        for metric, _ in sched.ranked(self.sweep.objectives):
            for params, every, final in reports:
                if metric not in every:
                    why = ("the trainer skips an optional term at the steps where its weight is 0, as at the start of "
                           "its warm-up" if metric in final else "they do not have that term")
                    raise ValueError(f"{where}: {metric!r} is not in every report of {_trials(params)} ({why}); the "
                                     f"rungs rank trials on it: give a rung figure ({', '.join(rung_figures.NAMES)}) "
                                     f"or one of {', '.join(m for m in REPORT_METRICS if m in always)}")
        return self

    def _bounding_params(self) -> list[dict[str, Any]]:
        """Searched values that bound what the trials can be: every combination of the ends of the searched ranges
        and of the choices (a grid's every point), and the points to evaluate."""
        keys = list(self.sweep.search)
        ends = [self.sweep.search[k].ends() for k in keys]
        return [dict(zip(keys, combo)) for combo in itertools.product(*ends)] + self.sweep.points_to_evaluate

    @property
    def n_configs(self) -> int:
        """How many configurations the sweep runs (each `sweep.seeds` times)."""
        if self.sweep.num_samples is not None:
            return self.sweep.num_samples
        return len(self.grid()) if self.sweep.method == "grid" else 8

    @property
    def n_trials(self) -> int:
        """How many trials the sweep runs: each configuration once per seed."""
        return self.n_configs * self.sweep.seeds

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the searched choices, the last field varying fastest (method grid)."""
        keys = list(self.sweep.search)
        values = [[_check_value(self, k, v, f"sweep.search.{k}") for v in self.sweep.search[k].values] for k in keys]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]

    def trial(self, params: dict[str, Any]) -> TrainRunSpec:
        """The training spec of one trial: the base with `params` (dotted paths) set."""
        return TrainRunSpec.model_validate(with_params(self, params))


def _trials(params: dict[str, Any]) -> str:
    """Who, in a message about the trials with these searched values."""
    return ("the trials with " + ", ".join(f"{k} {v!r}" for k, v in params.items())) if params else \
        "this sweep's trials"


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
        raise ValueError(f"{where}: searched fields are `sae.<field>`, `trainer.<field>`, "
                         f"{' or '.join(f'`{k}`' for k in SEARCHABLE_ACTIVATIONS)} (other activations fields would "
                         f"change the activations all trials share)")
    params = {key: value}
    if section == "trainer":
        if field not in TrainerConfig.model_fields:
            raise ValueError(f"{where}: TrainerConfig has no searchable field {field!r}"
                             f"{did_you_mean(field, list(TrainerConfig.model_fields))}")
    elif section == "sae" and field != "architecture":
        archs = [a for a in _architectures(spec) if a in ARCHITECTURES
                 and field in ARCHITECTURES[a].config_class.model_fields]
        if not archs or field == "d_in":
            known = [f for a in _architectures(spec) if a in ARCHITECTURES
                     for f in ARCHITECTURES[a].config_class.model_fields if f != "d_in"]
            raise ValueError(f"{where}: no architecture of this sweep ({', '.join(_architectures(spec))}) has a "
                             f"searchable field {field!r}{did_you_mean(field, known)}")
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
