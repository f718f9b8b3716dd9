"""The sweep's searcher: Optuna behind Ray Tune, told once per configuration what its trials came to.

Ray Tune 2.60's OptunaSearch tells Optuna, when a trial ends, the objectives of the trial's last report whatever
ended it: a trial ASHA stopped early becomes a COMPLETE point carrying its rung's training figures, and an
objective only the final report carries (a held-out eval/ figure) fails Tune's check that every report holds the
searcher's metrics. Tune's Repeater (one configuration over several seeds) averages one metric only (a list of
objectives breaks its `metric not in result`), turns a stopped or failed repeat into NaN and averages the rest,
and saves none of its own state for --resume. ConfigSearch replaces both:

- each configuration Optuna suggests runs as `len(seeds)` consecutive trials, trainer.seed = seeds[i] (or once,
  as suggested, without seeds);
- when all of them have ended, Optuna is told one outcome: FAIL if one failed, PRUNED if one ended without its
  final report (the scheduler stopped it), else COMPLETE with each objective's mean over them;
- no intermediate values: the scheduler, not Optuna, stops trials, and an eval/ objective has none.
PRUNED is how Optuna learns from a stopped trial: its TPE sampler counts pruned trials as observations, among the
ones it models as worse than the best complete trials, and samples less where they were (bench/optuna_pruned.py
measures it: 0.4 of the later suggestions fall where trials are stopped when they are told FAIL, which TPE ignores,
and fewer when told PRUNED; bench/README.md section 10). That is what the scheduler found at its rung: trials of
the rung ranked ahead of it. Its rung figures cannot be told instead: a stopped trial has no final figures, and
Optuna refuses intermediate values (`Trial.report`) in a study of several objectives.
Its state (the groups and Optuna's study) is pickled with the searcher's, so --resume goes on with it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from csc.sweep.report import SEED
from csc.sweep.reported import EVAL_PREFIX
from csc.sweep.spec import SweepSpec

FAILED, PRUNED = "failed", "pruned"


@dataclass
class Suggestion:
    """One configuration Optuna suggested, and the outcome of each of its trials so far (by Tune trial id:
    FAILED, PRUNED or the objectives' values; None while it runs)."""

    params: dict[str, Any]
    trials: dict[str, Any] = field(default_factory=dict)


class ConfigSearch(OptunaSearch):
    """OptunaSearch over `space` (Optuna distributions by dotted field) for `objectives` ((metric, mode) pairs),
    each configuration run once per seed of `seeds` (None: once, trainer.seed as the spec has it); `kwargs` go to
    OptunaSearch (sampler, points_to_evaluate)."""

    def __init__(self, space: dict[str, Any], objectives: list[tuple[str, str]], seeds: list[int] | None,
                 **kwargs):
        metric, mode = [m for m, _ in objectives], [d for _, d in objectives]
        if len(objectives) == 1:
            metric, mode = metric[0], mode[0]
        super().__init__(space, metric=metric, mode=mode, **kwargs)
        self._objectives = [m for m, _ in objectives]
        self._seeds = seeds
        self._repeats = len(seeds) if seeds else 1
        self._configs: dict[str, Suggestion] = {}  # by the Tune trial id of its first trial (Optuna's trial)
        self._config_of: dict[str, str] = {}  # Tune trial id -> that key
        self._open: str | None = None  # the configuration still handing out seeds

    @property
    def metric(self) -> None:
        """None to Tune, which checks that every report carries the searcher's metrics: the held-out objectives
        come with the final report only. The spec's validation makes sure every trial's final report has them."""
        return None

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = self._configs.get(self._open)
        if config is None or len(config.trials) == self._repeats:
            params = super().suggest(trial_id)
            if params is None or params == Searcher.FINISHED:
                return params
            self._open, config = trial_id, Suggestion(params)
            self._configs[trial_id] = config
        self._config_of[trial_id] = self._open
        config.trials[trial_id] = None
        return config.params if self._seeds is None else {**config.params, SEED: self._seeds[len(config.trials) - 1]}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        """Accept Tune's param_space: it only names the columns of Tune's progress table (table_columns); the space
        is this searcher's own, and every suggestion replaces each of those placeholders."""
        return True

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Nothing: Optuna is told a configuration's outcome once, when its trials have ended."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self._config_of[trial_id]
        config = self._configs[key]
        if error:
            config.trials[trial_id] = FAILED
        elif not result or not any(k.startswith(EVAL_PREFIX) for k in result):
            config.trials[trial_id] = PRUNED  # ended before its final report (held-out figures)
        else:
            config.trials[trial_id] = [float(result[m]) for m in self._objectives]
        outcomes = list(config.trials.values())
        if key in self._completed_trials or len(outcomes) < self._repeats or None in outcomes:
            return
        if FAILED in outcomes or PRUNED in outcomes:
            state, values = (TrialState.FAIL if FAILED in outcomes else TrialState.PRUNED), None
        else:
            state, values = TrialState.COMPLETE, [statistics.fmean(v) for v in zip(*outcomes)]
        self._ot_study.tell(self._ot_trials[key], values, state=state)
        self._completed_trials.add(key)


def table_columns(spec: SweepSpec) -> dict[str, Any]:
    """The Tuner's param_space: Tune's progress table shows a trial's value of each key whose param_space value is a
    Tune search domain, and of no other. ConfigSearch samples, so these are placeholders, one per key its suggestions
    carry (the searched fields, and the seed with sweep.seeds > 1), each replaced by the suggestion's value."""
    keys = [*spec.sweep.search, *([SEED] if spec.sweep.seeds > 1 else [])]
    return {key: tune.choice([None]) for key in keys}


def searcher(spec: SweepSpec) -> ConfigSearch:
    """The spec's search: Optuna's TPE over `search` (a grid: every point enqueued, in order), each configuration
    run over `sweep.seeds` seeds."""
    space = {}
    for key, p in spec.sweep.search.items():
        if p.type == "choice":
            space[key] = CategoricalDistribution(p.values)
        elif p.type in ("int", "logint"):
            space[key] = IntDistribution(int(p.low), int(p.high), log=p.type == "logint")
        else:
            space[key] = FloatDistribution(p.low, p.high, log=p.type == "loguniform")
    n = spec.n_configs
    sampler = optuna.samplers.TPESampler(seed=spec.sweep.seed, n_startup_trials=min(10, max(2, n // 2)))
    # A grid is Optuna evaluating every point of it first, one trial each: the same machinery (and resume).
    points = spec.grid() if spec.sweep.method == "grid" else [dict(p) for p in spec.sweep.points_to_evaluate]
    first = spec.trainer.seed
    seeds = list(range(first, first + spec.sweep.seeds)) if spec.sweep.seeds > 1 else None
    return ConfigSearch(space, [(o.metric, o.mode) for o in spec.sweep.objectives], seeds, sampler=sampler,
                        points_to_evaluate=points or None)
