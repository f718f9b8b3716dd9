"""Does Optuna's multi-objective TPE learn from the trials a scheduler stops, as csc tells them (pruned)?

    python bench/optuna_pruned.py [--seeds 20] [--trials 40]

csc tells Optuna a configuration whose trial the scheduler stopped as PRUNED, without values (csc.sweep.search).
Optuna 5.1's TPESampler counts pruned trials as observations and puts them among the trials it models as the worse
ones (samplers/_tpe/sampler.py, _split_trials: below = the best COMPLETE trials, above = the rest with every
PRUNED one), so that it samples less where they were; a FAIL trial it ignores. Rung figures as intermediate values
are not an option for several objectives: `Trial.report` raises NotImplementedError in a multi-objective study.

The measurement: a two-parameter space (a, b in [0, 1]) whose two objectives depend on b alone (f1 = b, f2 = 1 - b,
plus noise), and a scheduler that stops every trial with a > 0.6 (40% of the space): Optuna's TPE (csc's settings:
multivariate off, n_startup_trials 10) is told such a trial as PRUNED, or as FAIL (nothing learnt: the control).
Printed: the share of the suggestions after the startup trials that fall where
trials are stopped (0.4 for a sampler that does not learn it), mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import warnings

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

SPACE = {"a": FloatDistribution(0, 1), "b": FloatDistribution(0, 1)}


def share_stopped(tell: str, seed: int, trials: int, startup: int) -> float:
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup))
    noise, late = random.Random(seed), []
    for n in range(trials):
        t = study.ask(SPACE)
        a, b = t.params["a"], t.params["b"]
        if n >= startup:
            late.append(a > 0.6)
        if a > 0.6:
            study.tell(t, state=TrialState.PRUNED if tell == "pruned" else TrialState.FAIL)
        else:
            study.tell(t, [b + noise.gauss(0, 0.05), 1 - b + noise.gauss(0, 0.05)])
    return sum(late) / len(late)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--startup", type=int, default=10)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"optuna {optuna.__version__}; {args.trials} trials, {args.startup} of them random; {args.seeds} seeds\n")
    print("| stopped trials told as | share of later suggestions where trials are stopped (uniform: 0.4) |")
    print("|---|---:|")
    for tell in ("pruned", "failed"):
        shares = [share_stopped(tell, s, args.trials, args.startup) for s in range(args.seeds)]
        print(f"| {tell} | {statistics.fmean(shares):.3f} ± {statistics.stdev(shares):.3f} |")


if __name__ == "__main__":
    main()
