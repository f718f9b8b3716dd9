"""The table of one or several contrastive grids (sweeps/contrastive-grid.yaml, sweeps/contrastive-strength.yaml,
sweeps/contrastive-balance.yaml): what the contrastive term does to the held-out figures, and what it costs,
against its gamma = 0 twin.

    csc sweep sweeps/contrastive-grid.yaml
    python bench/contrastive_grid.py runs/sweeps/contrastive-grid [more sweep directories] [--absorption]

Reads each sweep's trials.json and its spec (csc_sweep.json). A cell is a setting of the fields that vary between
the trials read (trainer.seed aside). Table 1: per cell, the mean and the sample standard deviation over seeds of
every held-out figure. Table 2: paired differences from the gamma = 0 trial of the same seed and the same other
fields (same initialisation, same batches, same held-out yardstick), mean +/- standard deviation over seeds: the
term's effect with the seed-to-seed variation of both arms removed. The twin may come from another directory. Both
tables twice: for reconstruction and the term's own figures (FIGURES), then for the figures of features
(FEATURE_FIGURES), whose twin may have another pairing rule or temperature (YARDSTICK).

--against FIELD=VALUE pairs with the trial where FIELD has VALUE instead (same seed, same other fields), e.g.
`--against activations.store_dtype=float32` for the bfloat16 store; --inert FIELD (repeatable) leaves a field that
differs between the arms without changing what is compared out of the matching (e.g. eval.probe_examples_per_class
for the reconstruction figures).

--absorption: feature absorption (csc/pipeline/absorption.py) for the finished trials whose trials.json lacks it (sweeps
that ran before csc measured it), computed post hoc as a trial at the current code would (posthoc_absorption): cached
beside the sweep in absorption_posthoc.json, marked † in the Features tables.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

FIGURES = (("eval/l0", "L0", 1), ("eval/explained_variance", "EV", 3), ("eval/delta_ce", "delta CE (nats)", 3),
           ("eval/kl_spliced", "KL", 3), ("eval/ce_loss_recovered", "CE rec.", 3), ("eval/nce", "held-out nce", 3),
           ("eval/code_sim_positive", "code cos +", 3), ("eval/code_sim_negative", "code cos -", 3),
           ("nce_grad_share", "nce grad share", 2))
"""(metric key in trials.json, column, decimals): reconstruction and the contrastive term's own figures."""

FEATURE_FIGURES = (("eval/l0", "L0", 1), ("eval/probe_seq_sae_top_1", "genre top-1", 3),
                   ("eval/probe_seq_sae_top_5", "genre top-5", 3), ("eval/probe_seq_random_top_5", "floor", 3),
                   ("eval/probe_letter_sae_top_1", "letter top-1", 3), ("eval/probe_letter_sae_top_5", "letter top-5", 3),
                   ("eval/probe_letter_random_top_5", "floor", 3), ("eval/context_locality", "locality", 2),
                   ("eval/context_locality_weighted", "locality (weighted)", 2),
                   ("eval/absorption_fraction", "absorption", 3), ("eval/absorption_full", "full abs.", 3),
                   ("eval/absorption_split_features", "split latents", 2),
                   ("eval/absorption_letters", "abs. letters", 1))
"""The same for the figures of features (README, Metrics): sparse probing with its floor, locality, absorption."""
ABSORPTION = ("eval/absorption_fraction", "eval/absorption_full", "eval/absorption_split_features",
              "eval/absorption_letters")
"""Feature absorption's figures (csc.pipeline.absorption.ABSORPTION_METRICS under eval/): absorption_letters is
there whenever absorption was measured, the others only where the LM's probe found enough letters."""
POSTHOC_FILE = "absorption_posthoc.json"
"""The post-hoc absorption figures of a sweep's trials, in the sweep folder (posthoc_absorption)."""
REPO = Path(__file__).resolve().parent.parent

GAMMA, SEED = "trainer.gamma", "trainer.seed"
INERT_WITHOUT_TERM = ("trainer.balance", "trainer.balance_share", "trainer.nce_latents")
"""Fields that change nothing at gamma = 0: a twin is matched without them."""
YARDSTICK = ("activations.pairing", "trainer.temperature")
"""Fields that change nothing a gamma = 0 SAE learns, only its held-out InfoNCE and code cosines (measured with them):
a twin for the feature figures is matched without them as well."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def load(sweep_dir: Path) -> list[tuple[dict[str, Any], dict[str, float], dict[str, Any]]]:
    """(the trial's full setting, its metrics, its trials.json row) for every finished trial of one sweep."""
    base = flatten(json.loads((sweep_dir / "csc_sweep.json").read_text())["spec"])
    base = {k: v for k, v in base.items() if not k.startswith("sweep.")}
    rows = json.loads((sweep_dir / "trials.json").read_text())
    return [({**base, **r["params"]}, r["metrics"], r) for r in rows if r["outcome"] == "finished"]


def code_version() -> dict[str, Any]:
    """The commit of the code that computes post-hoc figures, and whether csc/ differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "csc_modified": bool(git("status", "--porcelain", "--", "csc"))}


def absorption_fields(spec: Any) -> dict[str, Any]:
    """What absorption's LM part (absorption_set) depends on: trials with the same share one."""
    return json.loads(json.dumps({
        "model": spec.model.model_dump(), "corpus": spec.corpus.model_dump(), "layer": spec.activations.layer,
        "lm_batch_size": spec.activations.lm_batch_size,
        **{f"eval.{k}": v for k, v in spec.eval.model_dump().items() if k.startswith("absorption")}}))


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()


def posthoc_absorption(sweep_dir: Path, trials: list[tuple[dict[str, Any], dict[str, float], dict[str, Any]]],
                       lm_parts: dict[str, Any], version: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Feature absorption for every finished trial of `sweep_dir` whose row lacks it, as a trial at the current code
    measures it (csc.sweep.trial: evaluate_run's absorption_scores on the producer's absorption_set): the trial's
    spec is the sweep's (csc_sweep.json) with its searched values, and the current defaults of the fields the sweep
    predates (eval.absorption_words, absorption_min_letters, absorption_seed; computed whatever eval.absorption
    says: the option asks for them); its SAE is its export (trial_NN/sae), at the normalisation scale it was trained
    with (the export's csc_norm_scale, the trial's acts.scale), on as many torch threads as csc.sweep.run gives a
    trial (the SAE part) and its producer (the LM part): max(1, round(cpus)). The figures go into the trials'
    metrics (eval/...) and into sweep_dir/absorption_posthoc.json, keyed by trial, with the fields used, the SAE's
    digest and the code's commit; an entry whose fields and digest still match is reused (from any commit: the file
    says which).
    `lm_parts` holds the LM parts made so far, by absorption_fields (shared across sweeps). Returns, per trial
    without figures in trials.json, its cache entry ("computed_now" added when computed here), or {"missing": why}
    without an exported SAE."""
    from csc.activations.source import Activations
    from csc.pipeline.absorption import absorption_scores, absorption_set
    from csc.sae.export import load_sae
    from csc.sweep.spec import SweepSpec

    path = sweep_dir / POSTHOC_FILE
    cache = json.loads(path.read_text()) if path.is_file() else {}
    entries = cache.setdefault("trials", {})
    sweep = SweepSpec.model_validate(json.loads((sweep_dir / "csc_sweep.json").read_text())["spec"])
    res = sweep.sweep.resources
    trial_threads, producer_threads = max(1, round(res.trial_cpus)), max(1, round(res.producer_cpus))
    used: dict[str, dict[str, Any]] = {}
    for _, metrics, row in trials:
        if ABSORPTION[-1] in metrics:
            continue  # measured when it trained
        name, sae_dir = row["trial"], sweep_dir / row["trial"] / "sae"
        files = [sae_dir / "sae_weights.safetensors", sae_dir / "cfg.json"]
        if not all(f.is_file() for f in files):
            used[name] = {"missing": f"no exported SAE in {sae_dir}"}
            print(f"absorption post hoc: {sweep_dir.name}/{name}: no exported SAE in {sae_dir}, left out",
                  file=sys.stderr, flush=True)
            continue
        spec = sweep.trial(row["params"])
        lm_fields = absorption_fields(spec)
        fields = {**lm_fields, "sae_sha256": file_digest(*files)}
        entry = entries.get(name)
        if entry is None or entry.get("fields") != fields:
            key = json.dumps(lm_fields, sort_keys=True)
            if key not in lm_parts:
                print(f"absorption post hoc: LM part ({spec.model.name}, layer {spec.activations.layer}, "
                      f"{spec.eval.absorption_words} words, seed {spec.eval.absorption_seed}) ...",
                      file=sys.stderr, flush=True)
                wall, cpu = time.perf_counter(), time.process_time()
                with contextlib.redirect_stdout(sys.stderr), torch_threads(producer_threads):
                    lm_parts[key] = absorption_set(spec, Activations(spec))
                print(f"absorption post hoc: LM part done: {time.perf_counter() - wall:.0f} s wall, "
                      f"{time.process_time() - cpu:.0f} CPU-s; letters {len(lm_parts[key].letters)}",
                      file=sys.stderr, flush=True)
            data = lm_parts[key]
            print(f"absorption post hoc: {sweep_dir.name}/{name} ...", file=sys.stderr, flush=True)
            wall, cpu = time.perf_counter(), time.process_time()
            sae, meta = load_sae(sae_dir)
            # absorption_scores prints why figures are left out
            with contextlib.redirect_stdout(sys.stderr), torch_threads(trial_threads):
                figures = absorption_scores(sae, data, float(meta["csc_norm_scale"]), spec.eval.absorption_seed)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"absorption post hoc: {sweep_dir.name}/{name}: {wall:.0f} s wall, {cpu:.0f} CPU-s",
                  file=sys.stderr, flush=True)
            entry = {"figures": {f"eval/{k}": v for k, v in figures.items()}, "reason": data.reason,
                     "fields": fields, **version, "threads": trial_threads, "seconds": round(wall, 1),
                     "cpu_seconds": round(cpu, 1)}
            entries[name] = entry
            path.write_text(json.dumps(cache, indent=1))  # after each trial: an interrupted run keeps the rest
            entry = {**entry, "computed_now": True}
        metrics.update(entry["figures"])
        used[name] = entry
    return used


def posthoc_notes(used: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """What the Features section says about the post-hoc absorption figures (`used`: sweep -> trial -> entry of
    posthoc_absorption); the first note starts with † when there are any."""
    notes, reasons = [], defaultdict(list)
    given = {sweep: {t: e for t, e in trials.items() if "figures" in e} for sweep, trials in used.items()}
    if any(given.values()):
        entries = [e for trials in given.values() for e in trials.values()]
        versions = {e["commit"][:12] + (" with csc/ modified" if e["csc_modified"] else "") for e in entries}
        fields = {json.dumps({k: v for k, v in e["fields"].items() if k.startswith("eval.")}) for e in entries}
        notes.append(f"† absorption figures computed post hoc (trials.json has none) from each trial's exported SAE, "
                     f"as a trial at csc commit {', '.join(sorted(versions))} measures them, with "
                     f"{'; '.join(sorted(fields))}:")
        for sweep, trials in given.items():
            if trials:
                now = sum(1 for e in trials.values() if e.get("computed_now"))
                notes.append(f"  {sweep}: {', '.join(trials)} ({now} computed now, {len(trials) - now} read from "
                             f"its {POSTHOC_FILE})")
    for sweep, trials in used.items():
        for t, e in trials.items():
            reason = e.get("missing") or e.get("reason")
            if reason:
                reasons[reason].append(f"{Path(sweep).name}/{t}")
    for reason, who in reasons.items():
        notes.append(f"absorption's SAE figures left out for {', '.join(who)}: {reason}")
    return notes


def cell(values: list[float], decimals: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{decimals}f} ± {spread:.{decimals}f}"


def label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dirs", type=Path, nargs="+")
    p.add_argument("--absorption", action="store_true",
                   help=f"compute feature absorption post hoc for the finished trials without it (cached in each "
                        f"sweep folder's {POSTHOC_FILE}; the LM part takes minutes on CPUs, each SAE about one)")
    p.add_argument("--against", default=f"{GAMMA}=0", metavar="FIELD=VALUE",
                   help=f"the twin each trial is paired with: the trial where FIELD has VALUE (default: {GAMMA}=0)")
    p.add_argument("--inert", action="append", default=[], metavar="FIELD",
                   help="a field left out of the matching of twins (repeatable)")
    a = p.parse_args(argv)
    base_field, _, raw = a.against.partition("=")
    base = (base_field, yaml.safe_load(raw))
    loaded = {d: load(d) for d in a.sweep_dirs}
    used: dict[str, dict[str, dict[str, Any]]] = {}
    if a.absorption:
        lm_parts: dict[str, Any] = {}
        version = code_version()
        used = {str(d): posthoc_absorption(d, rows, lm_parts, version) for d, rows in loaded.items()}
    trials = [(setting, metrics) for rows in loaded.values() for setting, metrics, _ in rows]
    if not trials:
        raise SystemExit(f"no finished trials in {', '.join(map(str, a.sweep_dirs))}")
    flag = " --absorption" if a.absorption else ""
    print(f"$ python bench/contrastive_grid.py {' '.join(map(str, a.sweep_dirs))}{flag}\n"
          f"{len(trials)} finished trials\n")
    fields = [GAMMA] + [k for k in trials[0][0]
                        if k not in (GAMMA, SEED) and len({repr(s.get(k)) for s, _ in trials}) > 1]
    if base[0] not in fields:
        raise SystemExit(f"--against {a.against}: {base[0]} does not vary between the trials read")
    inert = set(a.inert) | (set(INERT_WITHOUT_TERM) if base[0] == GAMMA else set())
    twin_fields = [k for k in fields if k != base[0] and k not in inert]
    by_cell: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for setting, metrics in trials:
        by_cell[tuple(setting.get(k) for k in fields)][setting[SEED]] = metrics
    order = sorted(by_cell, key=lambda c: tuple((0, v) if isinstance(v, (int, float)) else (1, repr(v)) for v in c))
    chance = statistics.fmean(m["eval/nce_chance"] for _, m in trials)
    print(f"held-out InfoNCE at chance (codes without information): {chance:.3f}\n")
    feature_twin_fields = [k for k in twin_fields if k not in YARDSTICK or base[0] != GAMMA]
    notes = posthoc_notes(used)
    posthoc = bool(notes) and notes[0].startswith("†")
    marked = tuple((k, f"{c}†" if posthoc and k in ABSORPTION else c, d) for k, c, d in FEATURE_FIGURES)
    for title, figures, paired, matched in (
            ("Reconstruction and the term's own figures", FIGURES, FIGURES[:-1], twin_fields),
            ("Features", marked, marked, feature_twin_fields)):
        print(f"## {title}\n")
        if figures is marked and notes:
            print("\n".join(notes) + "\n")
        twins: dict[tuple, dict[int, dict]] = defaultdict(dict)
        for setting, metrics in trials:
            if setting.get(base[0]) == base[1]:
                twins[tuple(setting.get(k) for k in matched)].setdefault(setting[SEED], metrics)
        tables(fields, order, by_cell, twins, matched, figures, paired, base)


def tables(fields: list[str], order: list[tuple], by_cell: dict[tuple, dict[int, dict]],
           twins: dict[tuple, dict[int, dict]], twin_fields: list[str], figures: tuple, paired: tuple,
           base: tuple[str, Any]) -> None:
    """Per cell the mean ± spread over seeds of `figures`; then the paired differences from the twin of `paired`."""
    head = " | ".join(k.rsplit(".", 1)[-1] for k in fields)
    print(f"| {head} | seeds | " + " | ".join(c for _, c, _ in figures) + " |")
    print("|---" * len(fields) + "|---|" + "---|" * len(figures))
    for key in order:
        seeds = by_cell[key]
        values = [cell([m[k] for m in seeds.values() if k in m], d) for k, _, d in figures]
        print("| " + " | ".join(label(v) for v in key) + f" | {len(seeds)} | " + " | ".join(values) + " |")
    print(f"\nPaired differences from the {base[0].rsplit('.', 1)[-1]} = {label(base[1])} twin (same seed, same "
          f"other fields):\n")
    print(f"| {head} | pairs | " + " | ".join(f"Δ {c}" for _, c, _ in paired) + " |")
    print("|---" * len(fields) + "|---|" + "---|" * len(paired))
    for key in order:
        setting = dict(zip(fields, key))
        if setting[base[0]] == base[1]:
            continue
        twin = twins.get(tuple(setting[k] for k in twin_fields), {})
        pairs = [(m, twin[s]) for s, m in by_cell[key].items() if s in twin]
        values = [cell([m[k] - t[k] for m, t in pairs if k in m and k in t], d) for k, _, d in paired]
        print("| " + " | ".join(label(v) for v in key) + f" | {len(pairs)} | " + " | ".join(values) + " |")
    print()

if __name__ == "__main__":
    main()
