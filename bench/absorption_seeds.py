"""How much of an absorption figure is the probes' own noise? Feature absorption (csc/pipeline/absorption.py) of the
same SAEs at several probe seeds (eval.absorption_seed: the vocabulary draw, its train/test split, the prompts'
examples, the LM probe's and the L1 probe's initialisation and batches), beside the spread over the SAEs' own seeds
(trainer.seed). Averaging over enough probe seeds makes a figure's probe noise small against that spread (one SAE's
absorption_fraction moves by ±0.018 sd with the probe seed alone: bench/README.md, section 9).

    python bench/absorption_seeds.py runs/sweeps/embedded-scale [--paired runs/sweeps/embedded-scale-contrastive ...]
        [--seeds 0 1 2 3]

Each path is what `csc eval` reads (a sweep folder: its finished trials; a trial; a `csc train` run folder). The
positional ones hold seeds of one setting (e.g. the gamma = 0 twins); each SAE under --paired is paired with the twin
of its trainer.seed (as bench/eval_noise.py pairs them). Per probe seed s, the LM part (absorption_set) is made once
for every group of SAEs with the same absorption fields (bench/contrastive_grid.py's absorption_fields) at
eval.absorption_seed = s, then every SAE's part (absorption_scores, seed s) on it, at the normalisation scale the SAE
was trained with (its export's csc_norm_scale), whatever eval.absorption says. Progress goes to stderr.

Printed, for F = absorption_fraction and absorption_full (n probe seeds, m pairs, k twins):

    LM parts           per probe seed: the letters its LM probe finds and the true positives absorption is measured on;
                       a part with fewer than eval.absorption_min_letters letters gives no F ("-")
    v(i, s)            F of SAE i at probe seed s
    Table "F per SAE"  v(i, s) per s; mean ± sample sd over s
    d(p, s)            v(paired, s) - v(twin, s) of pair p: the same probes for both SAEs
    Table "F, paired"  d(p, s) per s; mean ± sample sd over s (with --paired)
    Verdict, over the probe seeds at which every SAE has F ("complete"; n counts only those):
      (a)   probe-seed sd of one SAE's F: sqrt(mean over SAEs i of var_s v(i, s)) (pooled sample variances)
      (a')  its spread over the SAE seeds: sd over the twins of mean_s v(i, s), against (a) / sqrt(n) (the probes'
            standard error of that mean)
      (b)   probe-seed sd of a paired difference: sqrt(mean over pairs of var_s d(p, s)), beside (a) * sqrt(2), what
            it would be if the two SAEs' probe noise were independent (the shared probes cancel the rest)
      (c)   the probes' standard error of the study's mean paired difference D = mean over p and s of d(p, s):
            sd_s(D(s)) / sqrt(n), D(s) = mean_p d(p, s) (measured over the probe seeds, so whatever the pairs' shared
            probes correlate is in it); beside (b) / sqrt(n), one pair's
      (d)   spread of the paired difference over the SAE seeds: sd over pairs of mean_s d(p, s). Each mean still
            carries probe variance (b)^2 / n; the SAE seeds' own part is sqrt(max(0, (d)^2 - (b)^2 / n)) (a lower
            bound where the pairs share probe noise, which the spread between pairs does not hold), and its standard
            error of D is that / sqrt(m)
      verdict: (c) against the SAE seeds' standard error of D: the larger dominates; the probe seeds that would bring
            (c) to a third of it: ceil(n * (3 (c) / SE)^2), as (c) falls with sqrt(n)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from csc.activations.probe_labels import LETTERS
from csc.activations.source import Activations
from csc.config import TrainRunSpec
from csc.pipeline.absorption import MIN_PROBE_F1, AbsorptionSet, absorption_scores, absorption_set
from csc.sae.export import load_sae
from csc.sae.model import SparseAutoencoder
from csc.sweep.saved import SavedSae, saved_saes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contrastive_grid import absorption_fields  # noqa: E402

FIGURES = ("absorption_fraction", "absorption_full")
DECIMALS = 4


@dataclass
class Measured:
    """One SAE and its figures per probe seed."""

    saved: SavedSae
    sae: SparseAutoencoder
    scale: float
    """The normalisation scale it was trained with (its export's csc_norm_scale)."""
    twin: bool
    """Given positionally (a twin), else under --paired."""
    figures: dict[int, dict[str, float]]
    """probe seed -> absorption_scores' figures."""

    @property
    def seed(self) -> int:
        return self.saved.spec.trainer.seed


def with_probe_seed(spec: TrainRunSpec, seed: int) -> TrainRunSpec:
    return spec.model_copy(update={"eval": spec.eval.model_copy(update={"absorption_seed": seed})})


def progress(message: str) -> None:
    print(f"absorption seeds: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(what: str):
    """Says what is computed, then how long it took, on stderr; its stdout (absorption's notes) goes there too."""
    progress(f"{what} ...")
    wall, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(sys.stderr):
        yield
    progress(f"{what}: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} CPU-s")


def lm_part_line(seed: int, spec: TrainRunSpec, data: AbsorptionSet) -> str:
    letters = "".join(LETTERS[c] for c in data.letters) or "none"
    left_out = f"; fewer than eval.absorption_min_letters ({spec.eval.absorption_min_letters}): no figures" \
        if data.reason else ""
    return (f"probe seed {seed}: LM part of {spec.model.name} layer {spec.activations.layer}, {len(data.words)} words: "
            f"letters with probe F1 > {MIN_PROBE_F1}: {len(data.letters)} ({letters}), true positives: "
            f"{data.prompt_word.numel()}{left_out}")


def measure(saes: list[Measured], seeds: list[int]) -> list[str]:
    """Fills each SAE's figures per probe seed; one LM part per probe seed and group of equal absorption fields (made
    when its seed's turn comes, dropped after: one seed's parts in memory). Returns the LM parts' lines."""
    lines = []
    for seed in seeds:
        parts: dict[str, AbsorptionSet] = {}
        for m in saes:
            spec = with_probe_seed(m.saved.spec, seed)
            key = json.dumps(absorption_fields(spec), sort_keys=True)
            if key not in parts:
                with timed(f"LM part ({spec.model.name}, layer {spec.activations.layer}, "
                           f"{spec.eval.absorption_words} words, probe seed {seed})"):
                    parts[key] = absorption_set(spec, Activations(spec))
                lines.append(lm_part_line(seed, spec, parts[key]))
            with timed(f"{m.saved.name} (trainer.seed {m.seed}), probe seed {seed}"):
                m.figures[seed] = absorption_scores(m.sae, parts[key], m.scale, seed)
    return lines


def load(twins: list[Path], paired: list[Path]) -> list[Measured]:
    out = []
    for paths, is_twin in ((twins, True), (paired, False)):
        for d in paths:
            for saved in saved_saes(d):
                sae, meta = load_sae(saved.sae_dir)
                out.append(Measured(saved, sae.eval(), float(meta["csc_norm_scale"]), is_twin, {}))
    return out


def pairs_of(saes: list[Measured]) -> list[tuple[Measured, Measured]]:
    """(paired SAE, the twin of its trainer.seed); the first twin of a seed is the one used."""
    twins: dict[int, Measured] = {}
    for m in saes:
        if m.twin:
            twins.setdefault(m.seed, m)
    missing = [m.saved.name for m in saes if not m.twin and m.seed not in twins]
    if missing:
        print(f"no twin with their trainer.seed, left unpaired: {', '.join(missing)}\n")
    return [(m, twins[m.seed]) for m in saes if not m.twin and m.seed in twins]


def number(x: float | None) -> str:
    return "-" if x is None else f"{x:.{DECIMALS}f}"


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    return f"{statistics.fmean(values):.{DECIMALS}f} ± {statistics.stdev(values):.{DECIMALS}f}"


def difference(pair: tuple[Measured, Measured], figure: str, seed: int) -> float | None:
    a, b = (m.figures[seed].get(figure) for m in pair)
    return None if a is None or b is None else a - b


def table(title: str, head: list[str], seeds: list[int], rows: list[tuple[list[str], list[float | None]]]) -> None:
    print(f"### {title}\n")
    print("| " + " | ".join(head) + " | " + " | ".join(f"probe seed {s}" for s in seeds) + " | mean ± sd |")
    print("|---" * (len(head) + len(seeds) + 1) + "|")
    for labels, values in rows:
        given = [v for v in values if v is not None]
        print("| " + " | ".join([*labels, *map(number, values), mean_sd(given)]) + " |")
    print()


def pooled_sd(rows: list[list[float]]) -> float:
    """sqrt of the mean of the rows' sample variances."""
    return math.sqrt(statistics.fmean(statistics.variance(r) for r in rows))


def verdict(figure: str, saes: list[Measured], pairs: list[tuple[Measured, Measured]], seeds: list[int]) -> None:
    """The module docstring's (a) to (d) and the verdict, over the complete probe seeds."""
    complete = [s for s in seeds if all(figure in m.figures[s] for m in saes)]
    left_out = ", ".join(str(s) for s in seeds if s not in complete)
    print(f"Verdict for {figure}, over the {len(complete)} probe seeds at which every SAE has it"
          + (f" (left out: probe seed {left_out})" if left_out else "") + ":")
    if len(complete) < 2:
        print("  fewer than 2 complete probe seeds: no probe-seed spread\n")
        return
    a = one_sae_verdict(figure, saes, complete)
    if not pairs:
        print("  no pairs (--paired): no paired difference\n")
        return
    paired_verdict(figure, pairs, complete, a)
    print()


def one_sae_verdict(figure: str, saes: list[Measured], seeds: list[int]) -> float:
    """Prints (a) and (a'); returns (a)."""
    n = len(seeds)
    a = pooled_sd([[x.figures[s][figure] for s in seeds] for x in saes])
    print(f"  (a)  probe-seed sd of one SAE's figure (pooled over {len(saes)} SAEs): {a:.4f}")
    twin_means = [statistics.fmean(x.figures[s][figure] for s in seeds) for x in saes if x.twin]
    if len(twin_means) >= 2:
        print(f"  (a') its spread over the SAE seeds (sd over {len(twin_means)} twins of their means over the probe "
              f"seeds): {statistics.stdev(twin_means):.4f}, against the probes' standard error of such a mean "
              f"(a) / sqrt({n}) = {a / math.sqrt(n):.4f}")
    return a


def paired_verdict(figure: str, pairs: list[tuple[Measured, Measured]], seeds: list[int], a: float) -> None:
    """Prints (b), (c), (d) and the verdict."""
    n, m = len(seeds), len(pairs)
    d = [[difference(p, figure, s) for s in seeds] for p in pairs]
    b = pooled_sd(d)
    print(f"  (b)  probe-seed sd of a paired difference (pooled over {m} pairs): {b:.4f}; with independent probe noise "
          f"it would be (a) * sqrt(2) = {a * math.sqrt(2):.4f}")
    per_seed = [statistics.fmean(col) for col in zip(*d)]
    c = statistics.stdev(per_seed) / math.sqrt(n)
    print(f"  (c)  the probes' standard error of the study's mean paired difference "
          f"({statistics.fmean(per_seed):+.4f}) at {n} probe seeds: sd over the probe seeds of the mean over pairs, "
          f"{statistics.stdev(per_seed):.4f}, / sqrt({n}) = {c:.4f}; one pair's: (b) / sqrt({n}) = "
          f"{b / math.sqrt(n):.4f}")
    if m < 2:
        print("  (d)  one pair: no spread over the SAE seeds")
        return
    spread = statistics.stdev(statistics.fmean(r) for r in d)
    own_variance = spread ** 2 - b ** 2 / n
    own = math.sqrt(own_variance) if own_variance > 1e-9 * spread ** 2 else 0.0  # 0, not rounding error, at equality
    se = own / math.sqrt(m)
    print(f"  (d)  spread of the paired difference over the SAE seeds (sd over {m} pairs of their means over the probe "
          f"seeds): {spread:.4f}; less the probe variance each mean carries, sqrt(max(0, {spread:.4f}^2 - "
          f"{b:.4f}^2 / {n})) = {own:.4f}; its standard error of the study's mean: / sqrt({m}) = {se:.4f}")
    print(f"  verdict: {dominance(c, se, n)}")


def dominance(probes: float, seeds_se: float, n: int) -> str:
    """Which standard error of the study's mean paired difference is larger, and the probe seeds that bring the
    probes' to a third of the SAE seeds' (it falls with sqrt(n))."""
    if seeds_se > 0:
        enough = f"from {max(2, math.ceil(n * (3 * probes / seeds_se) ** 2))} probe seeds"
    else:
        enough = "at no number of probe seeds (the SAE seeds' is 0)"
    if seeds_se == probes == 0:
        return "neither the probes nor the SAE seeds move it"
    if seeds_se > probes:
        who = f"the SAE seeds dominate: {seeds_se:.4f} against the probes' {probes:.4f}"
    else:
        who = f"the probes dominate: {probes:.4f} against the SAE seeds' {seeds_se:.4f}"
    return f"{who}; the probes' is a third of the SAE seeds' or less {enough}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("twins", type=Path, nargs="+", help="SAEs of one setting, one per seed (e.g. the gamma = 0 twins)")
    p.add_argument("--paired", type=Path, nargs="*", default=[],
                   help="SAEs each paired with the twin of its trainer.seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="probe seeds (eval.absorption_seed values; default 0 1 2 3)")
    a = p.parse_args(argv)
    seeds = list(dict.fromkeys(a.seeds))
    if len(seeds) < 2:
        p.error("--seeds: give at least 2 distinct probe seeds (a spread needs 2)")
    paired = f" --paired {' '.join(map(str, a.paired))}" if a.paired else ""
    print(f"$ python bench/absorption_seeds.py {' '.join(map(str, a.twins))}{paired} "
          f"--seeds {' '.join(map(str, seeds))}\n")
    with torch.no_grad():  # a context, not the global switch: the tests run main() in their own process
        saes = load(a.twins, a.paired)
        print("\n".join(measure(saes, seeds)) + "\n")
    pairs = pairs_of(saes)
    for figure in FIGURES:
        table(f"{figure} per SAE", ["SAE", "trainer.seed", "arm"], seeds,
              [([x.saved.name, str(x.seed), "twin" if x.twin else "paired"], [x.figures[s].get(figure) for s in seeds])
               for x in saes])
        if pairs:
            table(f"{figure}, paired: SAE minus the twin of its trainer.seed", ["SAE", "twin", "trainer.seed"], seeds,
                  [([x.saved.name, t.saved.name, str(x.seed)], [difference((x, t), figure, s) for s in seeds])
                   for x, t in pairs])
        verdict(figure, saes, pairs, seeds)


if __name__ == "__main__":
    main()
