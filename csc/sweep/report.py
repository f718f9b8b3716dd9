"""Sweep summaries from plain trial rows: CSV table, Pareto and progression figures, best trials.

Pure stdlib + matplotlib, imported when a figure is drawn (never imports Ray or MLflow), so reports can be redrawn
from saved rows anywhere.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import statistics
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

from csc.headless import pyplot

if TYPE_CHECKING:
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

CE_HEADLINE = ["eval/ce_loss_recovered", "eval/delta_ce", "eval/kl_spliced"]
"""CE loss recovered with its scale beside it wherever it is shown: a ratio alone hides how much the SAE costs the
LM ("0.89 recovered" can be +1.8 nats), delta CE (nats) and KL(clean || SAE) do not."""
EVAL_SHOWN = ["eval/explained_variance", *CE_HEADLINE]
OUTCOMES = {"finished": "tab:green", "stopped_early": "tab:orange", "failed": "tab:red", "running": "tab:blue"}
GAMMA = "trainer.gamma"
SEED = "trainer.seed"
"""The searched field that tells a configuration's runs apart (sweep.seeds sets it; a grid may search it)."""


def _is_num(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _num(v: Any) -> float | None:
    """v as a finite float; None when missing, non-numeric or not finite."""
    return float(v) if _is_num(v) and math.isfinite(v) else None


def _raw(row: dict, key: str) -> Any:
    """A trial's value by name: its last reported metrics first, then the row itself (steps_done, dict_size)."""
    m = row.get("metrics") or {}
    return m[key] if key in m else row.get(key)


def _params(rows: list[dict]) -> list[str]:
    return sorted({k for r in rows for k in (r.get("params") or {})})


def _short(name: str) -> str:
    """'trial_00003' -> '3', so annotations stay small; other names are kept whole."""
    m = re.search(r"(\d+)$", name)
    return str(int(m.group(1))) if m else name


def _spans_decade(values: list[float]) -> bool:
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


def metric_columns(rows: list[dict]) -> list[str]:
    """Every metric any trial has, in order of first appearance: training figures, then the held-out ones (eval/),
    with the CE_HEADLINE figures together where the first of them appears."""
    keys = list(dict.fromkeys(k for r in rows for k in (r.get("metrics") or {})))
    held_out = [k for k in keys if k.startswith("eval/")]
    head = [k for k in CE_HEADLINE if k in held_out]
    at = min((held_out.index(k) for k in head), default=0)
    rest = [k for k in held_out if k not in head]
    return [k for k in keys if not k.startswith("eval/")] + rest[:at] + head + rest[at:]


def write_trials_table(rows: list[dict], path_csv: str | Path) -> None:
    """One CSV row per trial: name, its configuration where rows name one (configs.csv's), outcome, steps, searched
    params (sorted union), last metrics, failure reason."""
    params, metrics = _params(rows), metric_columns(rows)
    linked = ["config"] if any("config" in r for r in rows) else []
    with open(path_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", *linked, "outcome", "steps_done", "steps_total", *params, *metrics, "reason"])
        for r in rows:
            p, m = r.get("params") or {}, r.get("metrics") or {}
            w.writerow([r.get("trial"), *(r.get(k) for k in linked), r.get("outcome"), r.get("steps_done"),
                        r.get("steps_total"), *(p.get(k) for k in params), *(m.get(k) for k in metrics),
                        r.get("reason")])


def configuration_key(params: dict) -> str:
    """A trial's configuration as one comparable string: its searched values less the seed."""
    return json.dumps({k: v for k, v in params.items() if k != SEED}, sort_keys=True, default=str)


def configurations(rows: list[dict]) -> list[dict]:
    """One row per configuration (the trials whose searched values, trainer.seed aside, are equal), in the order
    of their first trial:
        config        config_NN, NN counting the configurations from 1
        trials, seeds its trials' names and their trainer.seed (None where the seed is not searched)
        outcome       finished when all its trials finished; else running if one is, else failed if one failed,
                      else stopped_early
        params        its searched values less the seed; dict_size, steps_total; steps_done: its trials' least
        n             how many of its trials finished
        metrics       the mean over its finished trials of each figure all of them have
        spread        their sample standard deviation (n - 1 in the denominator), where n >= 2
    """
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(configuration_key(r.get("params") or {}), []).append(r)
    configs = []
    for i, trials in enumerate(groups.values(), 1):
        outcomes = {t.get("outcome") for t in trials}
        done = [t.get("metrics") or {} for t in trials if t.get("outcome") == "finished"]
        keys = [k for k in done[0] if all(_num(d.get(k)) is not None for d in done)] if done else []
        configs.append({
            "config": f"config_{i:02d}", "trials": [t.get("trial") for t in trials],
            "seeds": [(t.get("params") or {}).get(SEED) for t in trials],
            "outcome": "finished" if outcomes == {"finished"} else next(
                o for o in ("running", "failed", "stopped_early", "finished") if o in outcomes),
            "params": {k: v for k, v in (trials[0].get("params") or {}).items() if k != SEED},
            "dict_size": trials[0].get("dict_size"), "steps_total": trials[0].get("steps_total"),
            "steps_done": min(t.get("steps_done") or 0 for t in trials), "n": len(done),
            "metrics": {k: statistics.fmean(d[k] for d in done) for k in keys},
            "spread": {k: statistics.stdev(d[k] for d in done) for k in keys} if len(done) > 1 else {}})
    return configs


def repeated(configs: list[dict]) -> bool:
    """Whether some configuration ran more than once (over seeds): the reports then show configurations."""
    return any(len(c["trials"]) > 1 for c in configs)


def write_configs_table(configs: list[dict], path_csv: str | Path) -> None:
    """One CSV row per configuration: name, outcome, seeds run and finished, its trials, searched params less the
    seed, then per metric its mean and sample standard deviation over the finished seeds."""
    params, metrics = _params(configs), metric_columns(configs)
    with open(path_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "outcome", "seeds", "finished", "trials", *params,
                    *(f"{m} {stat}" for m in metrics for stat in ("mean", "std"))])
        for c in configs:
            w.writerow([c["config"], c["outcome"], len(c["trials"]), c["n"], " ".join(map(str, c["trials"])),
                        *(c["params"].get(k) for k in params),
                        *(v for m in metrics for v in (c["metrics"].get(m), c["spread"].get(m)))])


def pareto_front(points: list[tuple[float, float]], minimize_x: bool = True, maximize_y: bool = True) -> list[int]:
    """Indices of the non-dominated (x, y) points, best x first; j dominates i when j is no worse on both and
    strictly better on one, so exact duplicates stay on the front together; points with a NaN never are."""
    sx, sy = (1 if minimize_x else -1), (-1 if maximize_y else 1)  # both axes to "lower is better"
    pts = sorted((sx * x, sy * y, i) for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y)))
    front, best = [], math.inf  # best: lowest y among points with strictly better x
    for _, group in itertools.groupby(pts, key=lambda p: p[0]):
        group = list(group)
        lowest = group[0][1]  # sorted by y within equal x
        front += [i for _, y, i in group if y == lowest and y < best]
        best = min(best, lowest)
    return front


def _gamma_scale(rows: list[dict]) -> ScalarMappable | None:
    """One colour scale over these trials' gamma (log when all positive and spanning >10x); None when not searched."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize

    g = [v for r in rows if (v := _num((r.get("params") or {}).get(GAMMA))) is not None]
    if not g:
        return None
    return ScalarMappable((LogNorm if _spans_decade(g) else Normalize)(min(g), max(g)), "viridis")


def pareto_plot(rows: list[dict], path_png: str | Path, objectives: list[tuple[str, str]] | None = None) -> None:
    """pareto_figure(rows, objectives), as a PNG."""
    fig = pareto_figure(rows, objectives)
    fig.savefig(path_png, dpi=90)
    pyplot().close(fig)


_L0_PANELS = ("eval/l0", "eval/explained_variance", "eval/ce_loss_recovered", "eval/delta_ce", "eval/kl_spliced")


def pareto_figure(rows: list[dict], objectives: list[tuple[str, str]] | None = None) -> Figure:
    """L0 vs (a) explained variance, (b) CE loss recovered, and its scale: (c) delta CE in nats, (d) KL(clean || SAE);
    front of the finished trials (low L0; high y for (a), (b), low y for (c), (d)). With the sweep's `objectives`,
    one more panel for each (at most two) that those four do not show, against delta CE (e.g. context locality: what
    the SAE buys against what it costs the LM), and the sweep's Pareto set in all its objectives ringed in every
    panel. Where configurations ran over several seeds (`repeated`), a finished point is a configuration all of whose
    seeds finished: the mean over them, with error bars of one standard deviation each way."""

    def colour(r: dict, default: str) -> Any:
        g = _num((r.get("params") or {}).get(GAMMA))
        return default if sm is None else "0.5" if g is None else sm.to_rgba(g)

    def xy(points: list[dict], xkey: str, ykey: str) -> list[tuple[float, float, dict, float, float]]:
        pts = [(_num(_raw(r, xkey)), _num(_raw(r, ykey)), r, (r.get("spread") or {}).get(xkey, 0.0),
                (r.get("spread") or {}).get(ykey, 0.0)) for r in points]
        return [p for p in pts if p[0] is not None and p[1] is not None]

    configs = configurations(rows)
    by_config = repeated(configs)
    finished = [c for c in configs if c["outcome"] == "finished"] if by_config else \
        [r for r in rows if r.get("outcome") == "finished"]
    # Held-out figures for finished trials; stopped-early trials have those of their last report only, on the rung
    # slice (sweeps before rung figures: the training-batch averages), so they are drawn apart, out of the front.
    early = [r for r in rows if r.get("outcome") == "stopped_early"]
    rung = bool(early) and all(_raw(r, "heldout/explained_variance") is not None for r in early)
    early_label = "stopped early (held-out rung figures, last report)" if rung else \
        "stopped early (training batch figures)"
    l0 = "L0 (active latents per token)"
    panels = [("(a) explained variance", xy(finished, "eval/l0", "eval/explained_variance"),
               xy(early, "heldout/l0", "heldout/explained_variance") if rung else xy(early, "l0", "ev"), True, l0),
              ("(b) CE loss recovered", xy(finished, "eval/l0", "eval/ce_loss_recovered"), [], True, l0),
              ("(c) delta CE (nats)", xy(finished, "eval/l0", "eval/delta_ce"), [], False, l0),
              ("(d) KL(clean || SAE)", xy(finished, "eval/l0", "eval/kl_spliced"), [], False, l0)]
    extra = [(m, mode) for m, mode in objectives or [] if m not in _L0_PANELS][:2]
    for letter, (metric, mode) in zip("ef", extra):
        panels.append((f"({letter}) {metric.removeprefix('eval/')}", xy(finished, "eval/delta_ce", metric), [],
                       mode == "max", "delta CE (nats)"))
    chosen = {id(r) for r in best_trials(finished, objectives)} if objectives and len(objectives) > 1 else set()
    # Scaled on the trials drawn, so a failed trial's extreme gamma does not squeeze the colours.
    sm = _gamma_scale([p[2] for _, fin, early, _, _ in panels for p in fin + early])
    from matplotlib.lines import Line2D

    fig, axes = pyplot().subplots(2, 3 if extra else 2, figsize=(19 if extra else 13, 10), layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for ax, (label, fin, early, higher_better, xlabel) in zip(axes.flat, panels):
        handles = []
        if fin:
            ax.scatter([p[0] for p in fin], [p[1] for p in fin], c=[colour(p[2], "tab:green") for p in fin],
                       edgecolors="k", linewidths=0.5, s=45, zorder=3)
            if by_config:
                ax.errorbar([p[0] for p in fin], [p[1] for p in fin], xerr=[p[3] for p in fin],
                            yerr=[p[4] for p in fin], fmt="none", ecolor="0.35", elinewidth=0.8, capsize=2, zorder=2)
            front = [fin[i] for i in pareto_front([p[:2] for p in fin], maximize_y=higher_better)]
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, zorder=2)
            handles += [Line2D([], [], ls="", marker="o", mfc=colour({}, "tab:green"), mec="k",
                               label="finished configuration (c<n>): mean ± std over its seeds, held-out eval"
                               if by_config else "finished (held-out eval)"),
                        Line2D([], [], color="k", lw=1, label="Pareto front of this panel (finished)")]
            ringed = [p for p in fin if id(p[2]) in chosen]
            if ringed:
                ax.scatter([p[0] for p in ringed], [p[1] for p in ringed], s=170, facecolors="none",
                           edgecolors="tab:red", linewidths=1.4, zorder=4)
                handles.append(Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec="tab:red",
                                      label="the sweep's Pareto set (all its objectives)"))
        else:
            ax.text(0.5, 0.95, "no finished trial reports it", transform=ax.transAxes, ha="center", va="top",
                    color="0.4")
        if early:
            ax.scatter([p[0] for p in early], [p[1] for p in early], marker="s", s=45, linewidths=1.3, zorder=3,
                       facecolors="none", edgecolors=[colour(p[2], "tab:orange") for p in early])
            handles.append(Line2D([], [], ls="", marker="s", mfc="none", mec=colour({}, "tab:orange"),
                                  label=early_label))
        for x, y, r, _, _ in fin + early:
            name = _short(str(r["trial"])) if "trial" in r else "c" + _short(str(r["config"]))
            ax.annotate(name, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
        if _spans_decade([p[0] for p in fin + early]):
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=label[4:], title=f"{label} vs {'L0' if xlabel == l0 else 'delta CE'}")
        ax.grid(alpha=0.3)
        if handles:
            ax.legend(handles=handles, fontsize=8, loc="best")
    if sm is not None:
        fig.colorbar(sm, ax=axes, label="trainer.gamma", shrink=0.9)
    return fig


def progression_plot(rows: list[dict], path_png: str | Path) -> None:
    """One column per trial (row order): steps done vs total by outcome, final loss, MSE, dict size, each param."""
    params = [p for p in _params(rows) if p != "sae.dict_size"]  # the dictionary-size panel already shows it
    panels = [("loss", "final loss"), ("mse", "final MSE"), ("dict_size", "dict size"), *((p, p) for p in params)]
    xs, colours = list(range(len(rows))), [OUTCOMES.get(r.get("outcome"), "0.5") for r in rows]
    from matplotlib.patches import Patch
    from matplotlib.ticker import NullFormatter

    plt = pyplot()
    fig, axes = plt.subplots(len(panels) + 1, 1, sharex=True, squeeze=False, layout="constrained",
                             figsize=(max(8.0, 0.45 * len(rows) + 4), 1.4 * len(panels) + 3.2))
    axes = axes[:, 0]
    ax = axes[0]
    ax.bar(xs, [r.get("steps_done") or 0 for r in rows], width=0.7, color=colours)
    ax.bar(xs, [r.get("steps_total") or 0 for r in rows], width=0.7, fill=False, ls="--", lw=0.8, edgecolor="k")
    # A failure at step 0 has no bar; the cross still shows where it stopped.
    fails = [(x, r.get("steps_done") or 0) for x, r in zip(xs, rows) if r.get("outcome") == "failed"]
    ax.scatter([f[0] for f in fails], [f[1] for f in fails], marker="x", color=OUTCOMES["failed"], zorder=3)
    handles = [Patch(color=c, label=o.replace("_", " ")) for o, c in OUTCOMES.items()
               if any(r.get("outcome") == o for r in rows)]
    ax.legend(handles=[*handles, Patch(fill=False, ls="--", edgecolor="k", label="steps total")], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside, so no bar is hidden
    ax.set_ylabel("steps")
    for ax, (key, label) in zip(axes[1:], panels):
        vals = [_raw(r, key) if key in ("loss", "mse", "dict_size") else (r.get("params") or {}).get(key) for r in rows]
        present = [v for v in vals if v is not None]
        if all(_is_num(v) for v in present):
            ys = [_num(v) if _num(v) is not None else math.nan for v in vals]  # missing: a gap in the line
            if _spans_decade([y for y in ys if not math.isnan(y)]):
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())  # minor labels crowd these short panels
        else:  # categorical param: one tick per distinct value
            cats = sorted({str(v) for v in present})
            ys = [math.nan if v is None else cats.index(str(v)) for v in vals]
            ax.set_yticks(range(len(cats)), cats)
        if all(math.isnan(y) for y in ys):
            ax.text(0.5, 0.5, "no value", transform=ax.transAxes, ha="center", va="center", color="0.4")
            ax.set_yticks([])
        ax.plot(xs, ys, "-", color="0.75", lw=0.8, zorder=1)
        ax.scatter(xs, ys, c=colours, s=25, zorder=2)
    for ax, label in zip(axes, ["steps", *(p[1] for p in panels)]):
        ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(xs, [str(r.get("trial", i)) for i, r in enumerate(rows)], rotation=90, fontsize=7)
    counts = {o: sum(r.get("outcome") == o for r in rows) for o in OUTCOMES}
    fig.suptitle(", ".join([f"{len(rows)} trials", *(f"{n} {o.replace('_', ' ')}" for o, n in counts.items() if n)]))
    fig.savefig(path_png, dpi=90, bbox_inches="tight")  # constrained layout alone clips the rotated trial names
    plt.close(fig)


def best_trials(rows: list[dict], objectives: list[tuple[str, str]], n: int = 5) -> list[dict]:
    """Non-failed rows (trials, or configurations: see `configurations`) having every objective metric: the n best
    on a single objective, else the Pareto set (no other row at least as good on all objectives and better on one,
    all of it, n unused), by the first objective."""
    if not objectives or any(mode not in ("min", "max") for _, mode in objectives):
        raise ValueError(f"objectives must be (metric, 'min' | 'max') pairs, got {objectives!r}")
    cand = []
    for r in rows:
        v = [_num(_raw(r, k)) for k, _ in objectives]
        if r.get("outcome") != "failed" and None not in v:
            cand.append((tuple(x if mode == "min" else -x for x, (_, mode) in zip(v, objectives)), r))  # lower=better
    cand.sort(key=lambda c: c[0][0])  # stable: row order breaks ties
    if len(objectives) == 1:
        return [r for _, r in cand[:n]]
    return [r for v, r in cand if not any(w != v and all(p <= q for p, q in zip(w, v)) for w, _ in cand)]


def format_best(rows_best: list[dict], objectives: list[tuple[str, str]], params: list[str]) -> str:
    """Fixed-width table: trial (or configuration and its number of seeds), outcome, steps done/total, params,
    objectives, held-out EV and CE recovered with delta CE and KL (EVAL_SHOWN); a configuration's figures are
    `mean ± std` over its seeds."""
    keys = [k for k, _ in objectives]
    extra = [k for k in EVAL_SHOWN if k not in keys and any(k in (r.get("metrics") or {}) for r in rows_best)]
    by_config = any("trials" in r for r in rows_best)

    def cell(v: Any) -> str:
        return "-" if v is None else str(v) if isinstance(v, (int, str)) else f"{v:.4g}" if _is_num(v) else str(v)

    def figure(r: dict, key: str) -> str:
        std = (r.get("spread") or {}).get(key)
        return cell(_raw(r, key)) + ("" if std is None else f" ± {std:.2g}")

    header = ["configuration", "seeds"] if by_config else ["trial"]
    header += ["outcome", "steps", *params, *(f"{k} ({m})" for k, m in objectives), *extra]
    body = [[*([cell(r.get("config")), str(len(r.get("trials") or []))] if by_config else [cell(r.get("trial"))]),
             cell(r.get("outcome")), f"{cell(r.get('steps_done'))}/{cell(r.get('steps_total'))}",
             *(cell((r.get("params") or {}).get(p)) for p in params), *(figure(r, k) for k in keys + extra)]
            for r in rows_best]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
