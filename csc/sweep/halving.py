"""Asynchronous successive halving on one figure or several, its every decision kept as data (no Ray here: the Tune
scheduler in csc.sweep.scheduler and the replay benchmark in bench/ both drive this).

Rungs sit at grace_period * reduction_factor^k steps, below max_t (a trial's last step). A trial that reports at or
past a rung it has not been judged at is judged there, once, against the trials judged there before it:

1. The rung's trials (those recorded there and this one) are ordered by non-dominated sorting on the figures
   (each turned to "lower is better"): the first front is the trials no other trial of the rung dominates, the
   second those only the first front dominates, and so on. With one figure the fronts are the values in order.
2. Within a front, trials are ordered by the tie break: `crowding_distance` (NSGA-II, Deb et al. 2002: larger
   crowding distance first, the ends of every figure first of all, equal distances by the sum of the figures) or
   `epsilon_net` (Schmucker et al. 2021, MO-ASHA, after Clarkson 2006: the front's best trial in the first figure,
   then again and again the trial farthest from those already taken). Distances are taken on figures scaled to
   [0, 1] over the rung's trials; equal trials keep their order of arrival.
3. The trial continues if its place p (0-based) in that order is in the top 1 / reduction_factor of the n trials:
   p < n / reduction_factor. The first trial at a rung always continues, as in ASHA (Li et al. 2020), whose
   promotion rule this is, judged on arrival as Ray Tune's and syne-tune's asynchronous schedulers judge.

A decision stands: a trial judged at a rung is never judged there again (a resumed trial that trains through the
rung again gets the same decision), and a trial stopped at a rung stays stopped. The records (`log()`, JSON lines, one
per decision) are everything the scheduler knows, so a sweep resumed after its driver died goes on from them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

CONTINUE, STOP = "continue", "stop"
TieBreak = Literal["epsilon_net", "crowding_distance"]


@dataclass
class Record:
    """One trial judged at one rung."""

    rung: int
    """The rung's step."""
    trial: str
    """The trial's name (trial_NN: kept by a trial that Tune runs again from its start after a driver died, where
    its id is new)."""
    step: int
    """The step of the report it was judged on (at or past the rung)."""
    figures: dict[str, float]
    decision: str
    place: int
    """Its 0-based place among the rung's trials when it was judged."""
    of: int
    """How many trials the rung had then, itself included."""
    front: int
    """Its non-dominated front then (0: no trial of the rung dominated it)."""
    dominated_by: list[str] = field(default_factory=list)
    """The names of the rung's trials that dominated it then."""


def dominates(a: list[float], b: list[float]) -> bool:
    """a dominates b (lower is better): no worse in every figure, better in one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def fronts(points: list[list[float]]) -> list[list[int]]:
    """Indices of `points` by non-dominated front (lower is better), each front in index order."""
    left, out = list(range(len(points))), []
    while left:
        front = [i for i in left if not any(dominates(points[j], points[i]) for j in left if j != i)]
        out.append(front)
        left = [i for i in left if i not in front]
    return out


def scaled(points: list[list[float]]) -> list[list[float]]:
    """Each figure scaled to [0, 1] over `points` (0 where all are equal)."""
    cols = list(zip(*points))
    lo, hi = [min(c) for c in cols], [max(c) for c in cols]
    return [[(v - a) / (b - a) if b > a else 0.0 for v, a, b in zip(p, lo, hi)] for p in points]


def epsilon_net(points: list[list[float]], members: list[int]) -> list[int]:
    """`members` (indices of `points`) ordered as an epsilon-net: the best in the first figure (the earliest of
    equals), then repeatedly the member farthest (Euclidean) from every member taken; ties by index order."""
    order = [min(members, key=lambda i: (points[i][0], i))]
    left = [i for i in members if i != order[0]]
    while left:
        far = max(left, key=lambda i: (min(math.dist(points[i], points[j]) for j in order), -i))
        order.append(far)
        left.remove(far)
    return order


def crowding_distance(points: list[list[float]], members: list[int]) -> list[int]:
    """`members` ordered by NSGA-II's crowding distance within them, largest first. Ties (every end of a figure has
    an infinite distance, and with few trials every trial is an end) by the sum of the figures, lowest first, then
    by index: arrival order alone would stop every newcomer to a small front."""
    dist = {i: 0.0 for i in members}
    for f in range(len(points[0])):
        ranked = sorted(members, key=lambda i: (points[i][f], i))
        span = points[ranked[-1]][f] - points[ranked[0]][f]
        dist[ranked[0]] = dist[ranked[-1]] = math.inf
        for k in range(1, len(ranked) - 1):
            if span > 0:
                dist[ranked[k]] += (points[ranked[k + 1]][f] - points[ranked[k - 1]][f]) / span
    return sorted(members, key=lambda i: (-dist[i], sum(points[i]), i))


TIE_BREAKS = {"epsilon_net": epsilon_net, "crowding_distance": crowding_distance}


def rank(points: list[list[float]], tie_break: TieBreak = "crowding_distance") -> tuple[list[int], list[int]]:
    """(the order of `points`, lower is better: fronts in turn, each ordered by `tie_break` on the scaled figures;
    the front of each point)."""
    unit = scaled(points)
    order, front_of = [], [0] * len(points)
    for k, front in enumerate(fronts(points)):
        order += TIE_BREAKS[tie_break](unit, front)
        for i in front:
            front_of[i] = k
    return order, front_of


def milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The rungs' steps: grace_period * reduction_factor^k, rounded, below max_t (a rung at the last step would
    judge finished trials)."""
    out, k = [], 0
    while (m := round(grace_period * reduction_factor ** k)) < max_t:
        out.append(m)
        k += 1
    return out


class SuccessiveHalving:
    """Rungs on `figures` ((name, "min" | "max") pairs: one for ASHA, several for MO-ASHA), kept in Records."""

    def __init__(self, figures: list[tuple[str, str]], grace_period: int, reduction_factor: float, max_t: int,
                 tie_break: TieBreak = "crowding_distance"):
        self.figures, self.reduction_factor, self.tie_break = [tuple(f) for f in figures], reduction_factor, tie_break
        self.grace_period, self.max_t = grace_period, max_t
        self.rungs: dict[int, list[Record]] = {m: [] for m in milestones(grace_period, reduction_factor, max_t)}
        self.last: Record | None = None
        """The latest record made (by `judge`)."""

    def _sign(self, figures: dict[str, float]) -> list[float]:
        return [figures[name] if mode == "min" else -figures[name] for name, mode in self.figures]

    def judge(self, trial: str, step: int, result: dict[str, Any]) -> str:
        """CONTINUE or STOP for a trial that reported `result` at `step` (at its last step, max_t, there is nothing
        left to stop: it is not judged)."""
        stopped = self.record_of(trial)
        if stopped is not None and stopped.rung <= step:
            return STOP
        reached = [m for m in self.rungs if m <= step]
        if not reached or step >= self.max_t or any(r.trial == trial for r in self.rungs[reached[-1]]):
            return CONTINUE
        milestone = reached[-1]
        missing = [name for name, _ in self.figures if not isinstance(result.get(name), (int, float))]
        if missing:
            raise ValueError(f"{trial} reported no {', '.join(missing)} at step {step}: the scheduler ranks on it")
        figures = {name: float(result[name]) for name, _ in self.figures}
        records = self.rungs[milestone]
        points = [self._sign(r.figures) for r in records] + [self._sign(figures)]
        order, front_of = rank(points, self.tie_break)
        place, n = order.index(len(records)), len(points)
        decision = CONTINUE if place < n / self.reduction_factor else STOP
        by = [r.trial for r, p in zip(records, points) if dominates(p, points[-1])]
        self.last = Record(milestone, trial, step, figures, decision, place, n, front_of[-1], by)
        records.append(self.last)
        return decision

    @property
    def n_records(self) -> int:
        return sum(len(records) for records in self.rungs.values())

    def record_of(self, trial: str) -> Record | None:
        """The record of the rung where the trial was stopped, or None."""
        return next((r for rs in self.rungs.values() for r in rs if r.trial == trial and r.decision == STOP), None)

    def stop_reason(self, trial: str) -> str | None:
        """Why the trial was stopped, in one line (None if it was not)."""
        r = self.record_of(trial)
        if r is None:
            return None
        figs = ", ".join(f"{name} {r.figures[name]:.4g}" for name, _ in self.figures)
        kept = math.ceil(r.of / self.reduction_factor)
        if len(self.figures) == 1:
            why = f"behind {', '.join(r.dominated_by)}" if r.dominated_by else "tied with the trials before it"
        elif r.dominated_by:  # a front after the first: the trials of the rung's earlier fronts dominated it
            why = f"on front {r.front + 1}, dominated by {', '.join(r.dominated_by)}"
        else:
            why = f"on the first front, placed after the others there by the {self.tie_break.replace('_', ' ')}"
        return (f"stopped at the rung at step {r.rung} (reported at step {r.step}): {figs}; {why}; placed "
                f"{r.place + 1} of the {r.of} trials at that rung, and only the top 1/{self.reduction_factor:g} "
                f"({kept}) continue")

    def decisions(self) -> list[str]:
        """Every decision, rung by rung in the order made: a table for people (`csc report`)."""
        names = [name for name, _ in self.figures]
        lines = []
        for m, records in self.rungs.items():
            if not records:
                continue
            lines.append(f"rung at step {m}: " + ", ".join(f"{name} ({mode})" for name, mode in self.figures))
            width = max(len(r.trial) for r in records)
            for r in records:
                figs = "  ".join(f"{r.figures[name]:.4g}" for name in names)
                ahead = f"; behind {', '.join(r.dominated_by)}" if r.dominated_by else ""
                lines.append(f"  {r.trial:<{width}}  step {r.step:<5} {r.decision:<8}  place {r.place + 1} of {r.of}"
                             f"  [{figs}]{ahead}")
        return lines

    def header(self) -> str:
        """The first line of the decision log: the settings."""
        return json.dumps({"figures": [list(f) for f in self.figures], "grace_period": self.grace_period,
                           "reduction_factor": self.reduction_factor, "max_t": self.max_t,
                           "tie_break": self.tie_break})

    def log(self) -> str:
        """The whole decision log (JSON lines: the header, then one record per line, rung by rung)."""
        return "".join(line + "\n" for line in [self.header(), *(json.dumps(vars(r)) for rs in self.rungs.values()
                                                                  for r in rs)])

    @classmethod
    def from_log(cls, text: str) -> "SuccessiveHalving":
        """The scheduler a decision log describes. A last line cut short (the writer killed mid-line) is left out."""
        lines = [line for line in text.splitlines() if line.strip()]
        settings = json.loads(lines[0])
        out = cls([tuple(f) for f in settings["figures"]], settings["grace_period"], settings["reduction_factor"],
                  settings["max_t"], settings["tie_break"])
        for n, line in enumerate(lines[1:], start=2):
            try:
                record = Record(**json.loads(line))
            except ValueError:
                if n == len(lines):
                    break
                raise
            out.rungs[record.rung].append(record)
        return out
