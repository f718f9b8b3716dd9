"""Which early stopping serves a sweep's question: schedulers replayed on full-budget sweeps.

    csc sweep sweeps/scheduler-replay.yaml
    python bench/scheduler_replay.py runs/sweeps/scheduler-replay [--orders 50] [--subset 8] [--plot out.png]

Input: sweep folders whose every trial ran to its last step (scheduler: null) and reported its rung figures
(heldout/...) at every report. Each scheduler is replayed on the trials' logged reports over `--orders` random trial
orders (seed 0): `--workers` trials run at once, a trial starts when a worker is free (in the order drawn), each of
its reports arrives when its own measured time says (Tune's time_total_s: its training, rung figures and, for the
last report, its final evaluation, as the full-budget sweep measured them), and at each report the scheduler
(csc.sweep.halving, as the sweep runs it) sees that report and may stop the trial. With `--subset K`, each order
draws K of the trials (a sweep of K trials, the quickstart's size) and is measured against those K. Schedulers (rungs at grace_period * rf^k, `--grace`, `--rf`):

    none           every trial to its last step
    ASHA, ev       one figure: the training EV (the average over the training batches since the last report)
    ASHA, held-out one figure: the held-out EV on the rung slice
    MO-ASHA, eps   non-dominated sorting on each objective's rung figure (csc.sweep.reported.RUNG_OF), epsilon-net
    MO-ASHA, crowd the same, crowding distance
    random         the same rule on a random number drawn per trial and rung: stopping at ASHA's compute, blind

For each: the hypervolume of the Pareto front of the trials that finished over that of all the trials (objectives:
the sweep's, each scaled to [0, 1] over all the trials, reference point 1.1 in every one), the share of the
all-trials Pareto set that finished, the shares of the trial-steps and of the trial time (seconds, the finished
trials' final evaluations included) of `none` spent, and the share of the contrastive
trials (gamma > 0) that finished; mean and sample standard deviation over the orders, and the worst order's
hypervolume. Last column: how many trials finish in some orders and are stopped in others (asynchronous successive
halving compares a trial with those that reached the rung before it, so the arrival order alone decides them).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from csc.sweep.halving import STOP, SuccessiveHalving, fronts, scaled
from csc.sweep.layout import STATE_FILE
from csc.pipeline.rung import FIGURES, PREFIX
from csc.sweep.reported import RUNG_OF


def load_trials(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int]:
    """(every trial of the sweep that finished: name, params, its reports by step, its final figures; the sweep's
    objectives; the trials' last step), from Tune's result.json in each trial folder (a trial finished when its last
    report has the held-out objectives), so a sweep still running can be replayed on what has finished."""
    state = json.loads((sweep_dir / STATE_FILE).read_text())
    objectives = [(o["metric"], o["mode"]) for o in state["spec"]["sweep"]["objectives"]]
    trials = []
    for path in sorted(sweep_dir.glob("trial_*/result.json")):
        reports = {}
        for line in path.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                reports[int(result["step"])] = result
        last = reports[max(reports)] if reports else {}
        if all(m in last for m, _ in objectives):
            trials.append({"name": f"{sweep_dir.name}/{path.parent.name}", "params": last.get("config", {}),
                           "reports": reports, "final": {m: last[m] for m, _ in objectives}})
    return trials, objectives, state["spec"]["trainer"]["steps"]


def hypervolume(points: list[list[float]], ref: list[float]) -> float:
    """The volume dominated by `points` (lower is better) and bounded by `ref`, exactly, by slicing on the last
    figure (fine for the few dozen points of a sweep)."""
    points = [p for p in points if all(x < r for x, r in zip(p, ref))]
    if not points:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in points)
    levels = sorted({p[-1] for p in points})
    total = 0.0
    for k, z in enumerate(levels):
        top = levels[k + 1] if k + 1 < len(levels) else ref[-1]
        total += (top - z) * hypervolume([p[:-1] for p in points if p[-1] <= z], ref[:-1])
    return total


def objective_points(trials: list[dict], objectives: list[tuple[str, str]]) -> dict[str, list[float]]:
    """Each trial's objectives, lower is better, scaled to [0, 1] over `trials` (as the rungs scale theirs)."""
    signed = [[t["final"][m] if mode == "min" else -t["final"][m] for m, mode in objectives] for t in trials]
    return dict(zip((t["name"] for t in trials), scaled(signed)))


def replay(trials: list[dict], make: Callable[[], SuccessiveHalving | None], workers: int, rng: random.Random
           ) -> tuple[set[str], int, float]:
    """(the trials that finished, the trial-steps spent, the trial-seconds spent) with `trials` started in their
    given order, each report arriving when the trial's own measured time (Tune's time_total_s) says."""
    halving, queue, events, steps, seconds, done = make(), list(trials), [], 0, 0.0, set()
    started = 0

    def push(t: dict, step: int, order: int, began: float) -> None:
        heapq.heappush(events, (began + t["reports"][step]["time_total_s"], order, step, t, began))

    def start(now: float) -> None:
        nonlocal started
        t = queue.pop(0)
        push(t, min(t["reports"]), started, now)
        started += 1

    for _ in range(min(workers, len(queue))):
        start(0.0)
    while events:
        clock, order, step, t, began = heapq.heappop(events)
        last = max(t["reports"])
        stop = step < last and halving is not None and \
            halving.judge(t["name"], step, {**t["reports"][step], "random": rng.random()}) == STOP
        if step == last or stop:
            steps += step
            seconds += clock - began
            if not stop:
                done.add(t["name"])
            if queue:
                start(clock)
            continue
        push(t, min(s for s in t["reports"] if s > step), order, began)
    return done, steps, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", type=Path, nargs="+")
    ap.add_argument("--orders", type=int, default=50)
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--grace", type=int, default=60)
    ap.add_argument("--rf", type=float, default=3.0)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    trials, objectives, max_t = [], None, None
    for d in args.sweeps:
        got, objectives, max_t = load_trials(d)
        trials += got
    rung = list(dict.fromkeys(RUNG_OF[m] for m, _ in objectives))

    def halving(figures: list[tuple[str, str]], tie_break: str = "epsilon_net") -> Callable:
        return lambda: SuccessiveHalving(figures, args.grace, args.rf, max_t, tie_break)

    mo = [(f, FIGURES[f.removeprefix(PREFIX)]) for f in rung]
    schedulers = {"none": lambda: None, "ASHA, training ev": halving([("ev", "max")]),
                  "ASHA, held-out ev": halving([(PREFIX + "explained_variance", "max")]),
                  "MO-ASHA, epsilon-net": halving(mo), "MO-ASHA, crowding": halving(mo, "crowding_distance"),
                  "random": halving([("random", "max")])}
    rng = random.Random(0)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in schedulers}
    for _ in range(args.orders):
        pool = rng.sample(trials, args.subset) if args.subset else rng.sample(trials, len(trials))
        points = objective_points(pool, objectives)
        ref = [1.1] * len(objectives)
        full = hypervolume(list(points.values()), ref)
        front = {list(points)[i] for i in fronts(list(points.values()))[0]}
        contrastive = {t["name"] for t in pool if t["params"].get("trainer.gamma", 0) > 0}
        seed = rng.random()
        for name, make in schedulers.items():
            done, spent, secs = replay(pool, make, args.workers, random.Random(seed))
            runs[name].append({"hv": hypervolume([points[n] for n in done], ref) / full,
                               "pool": [t["name"] for t in pool], "done": sorted(done),
                               "front": len(front & done) / len(front),
                               "contrastive": len(contrastive & done) / len(contrastive) if contrastive else 1.0,
                               "steps": spent, "seconds": secs})
    base = statistics.fmean(r["steps"] for r in runs["none"])
    base_s = statistics.fmean(r["seconds"] for r in runs["none"])
    for rs in runs.values():
        for r in rs:
            r["compute"], r["time"] = r["steps"] / base, r["seconds"] / base_s
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))

    def ms(values: list[float]) -> str:
        return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"

    size = f"{args.subset} of {len(trials)}" if args.subset else f"all {len(trials)}"
    print(f"{args.orders} orders of {size} trials, {args.workers} at once; rungs at grace {args.grace}, rf "
          f"{args.rf:g}, last step {max_t}; objectives: {', '.join(f'{m} ({d})' for m, d in objectives)}; MO-ASHA on "
          f"{', '.join(f'{f} ({d})' for f, d in mo)}\n")
    print("| scheduler | hypervolume share | worst order | Pareto set kept | trial-steps | trial time | "
          "contrastive trials kept | fate set by the order |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        # a trial whose fate (finished or stopped) differs between the orders it was replayed in
        seen: dict[str, set[bool]] = {}
        for r in rs:
            for t in r["pool"]:
                seen.setdefault(t, set()).add(t in r["done"])
        mixed = sum(len(v) == 2 for v in seen.values())
        print(f"| {name} | {ms([r['hv'] for r in rs])} | {min(r['hv'] for r in rs):.3f} | "
              f"{ms([r['front'] for r in rs])} | {ms([r['compute'] for r in rs])} | {ms([r['time'] for r in rs])} | "
              f"{ms([r['contrastive'] for r in rs])} | {mixed} of {len(seen)} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7.2, 4.8))
        for (name, rs), marker in zip(runs.items(), "os^DvP"):
            xs, ys = [r["time"] for r in rs], [r["hv"] for r in rs]
            dots = ax.scatter(xs, ys, s=8, alpha=0.25, marker=marker)
            ax.errorbar(statistics.fmean(xs), statistics.fmean(ys), xerr=statistics.pstdev(xs),
                        yerr=statistics.pstdev(ys), fmt=marker, ms=9, mec="k", capsize=3, label=name,
                        color=dots.get_facecolor()[0][:3])
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("trial time (share of that without early stopping)")
        ax.set_ylabel("hypervolume share of the final front")
        ax.set_title(f"{args.orders} trial orders, {size} trials: each order a dot, mean ± sd a marker",
                     fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
