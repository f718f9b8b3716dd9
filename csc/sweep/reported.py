"""What a trial reports, by name: what sweep objectives and the scheduler may read, checked at spec load.

A trial sends Tune the trainer's report every `trainer.log_every` steps (training metrics: averages over the
steps since the previous report, csc.sae.trainer.TRAINING_METRICS, and the rung figures of its SAE on a fixed
held-out slice, csc.pipeline.rung) and, after its last step, one final report
that adds the held-out figures of `csc eval` under `eval/`. Which training metrics a trial has depends on its
settings (a loss term's metric only where the trial has that term), so it is derived here from the terms the
trainer builds for them (csc.sae.losses.build_terms), never listed apart.
"""

from __future__ import annotations

from csc.config import CorpusSpec, EvalSpec
from csc.pipeline import rung
from csc.pipeline.absorption import ABSORPTION_METRICS
from csc.pipeline.probing import PROBING_METRICS, probing_keys
from csc.pipeline.run import METRIC_ORDER
from csc.sae.archs import build_sae
from csc.sae.config import TrainerConfig
from csc.sae.losses import TERM_NAMES, InfoNCE, build_terms
from csc.sae.model import BaseSaeConfig
from csc.sae.trainer import TRAINING_METRICS

EVAL_PREFIX = "eval/"
"""The final report's held-out figures are csc eval's keys with this prefix."""

HELD_OUT: tuple[str, ...] = tuple(EVAL_PREFIX + key for key, _ in METRIC_ORDER if not key.startswith("train_"))
"""The held-out figures a finished trial may report: csc eval's figures (csc.pipeline.run.METRIC_ORDER, the one
list of them) under eval/, less the training run's own (train_*: `csc train` adds them to eval.json; a trial's
training figures are its reports). Which of them it does report depends on its corpus (held_out)."""

RUNG_FIGURES: tuple[str, ...] = (*rung.NAMES, rung.SECONDS)
"""In every report of a sweep trial, beside the training metrics: its SAE's figures on the held-out slice
(csc.pipeline.rung), which the scheduler's rungs compare."""

_RECONSTRUCTION = ("explained_variance", "normalized_mse")
RUNG_OF: dict[str, str] = {
    **{EVAL_PREFIX + key: rung.PREFIX + "normalized_mse" for key in (
        "mse", "normalized_mse", "cosine_similarity", "explained_variance_legacy", "ce_spliced", "ce_loss_recovered",
        "delta_ce", "kl_spliced", "ce_loss_score", "ce_loss_with_sae", "kl_div_score", "kl_div_with_sae")},
    **{EVAL_PREFIX + key: rung.PREFIX + key for key in rung.FIGURES if key not in _RECONSTRUCTION},
    EVAL_PREFIX + "explained_variance": rung.PREFIX + "explained_variance",
    EVAL_PREFIX + "saebench_l0": rung.PREFIX + "l0",
    "ev": rung.PREFIX + "explained_variance", "mse": rung.PREFIX + "normalized_mse", "l0": rung.PREFIX + "l0",
    "dead_frac": rung.PREFIX + "dead_fraction", "nce": rung.PREFIX + "nce",
}
"""The rung figure that stands for an objective at the scheduler's rungs (MO-ASHA's default figures): what the
SAE costs the LM (delta CE, KL, CE loss recovered and SAEBench's) and every reconstruction figure by the held-out
normalised MSE, the closest figure without the LM (a loose one: across the quickstart's search space it does not
order delta CE, bench/README.md section 10); each other figure that the slice measures by itself. Sparse probing,
feature absorption and the other training metrics have none: a sweep that optimises them names its rung figures
(sweep.scheduler.figures)."""

TIME_PREFIX = "time/"
WALL_TIME: tuple[tuple[str, str], ...] = (
    ("startup", "start-up (the trainer, the producer's first answer, the rung slice)"),
    ("train", "training"), ("shard_wait", "waiting for shards, within training"),
    ("eval_held_out", "held-out figures"), ("eval_ce_kl", "CE/KL (in the producer, its queue included)"),
    ("eval_probing", "sparse probing"), ("eval_absorption", "feature absorption"), ("dashboard", "dashboard"))
"""Where a trial's wall time went, in seconds, in its final report under time/ (the sweep's summary adds them up
over the trials): the phases in order; waiting for shards is part of training."""

GRAD_SHARE = "nce_grad_share"
"""The trainer measures InfoNCE's share of the encoder's gradient at the steps where it computes InfoNCE."""


def held_out(corpus: CorpusSpec, evals: EvalSpec = EvalSpec()) -> frozenset[str]:
    """The held-out figures every finished trial of a sweep on this corpus, with these eval settings, reports:
    HELD_OUT less the probing figures of the tasks the corpus lacks (csc.pipeline.probing.probing_keys: no `seq`
    task without labels) and less absorption's without eval.absorption. Whether the LM probes enough letters for
    absorption's SAE figures is known once the producer has made its part: the sweep checks that at its start."""
    produced = probing_keys(corpus)
    lacking = {key for key, _ in PROBING_METRICS if key not in produced}
    if not evals.absorption:
        lacking |= {key for key, _ in ABSORPTION_METRICS}
    return frozenset(HELD_OUT) - {EVAL_PREFIX + key for key in lacking}


def trial_metrics(sae: BaseSaeConfig, trainer: TrainerConfig) -> tuple[frozenset[str], frozenset[str]]:
    """(the metrics in every report of a trial with these settings, those in its final report, held-out eval/
    figures aside): the trainer's and the rung figures.

    A term's metric is in the final report where the trial has the term; in every report only if the trainer
    computes it at every step: an optional term (InfoNCE) is skipped at steps where its weight is 0, as at
    the start of its warm-up, so a report of those steps alone lacks it."""
    # Which terms a trial has depends on its architecture and trainer settings, not on its sizes (Matryoshka has inner
    # prefixes at any dictionary of 2 latents or more, so as many here): a small SAE of width 1.
    small = sae.model_copy(update={"d_in": 1, "dict_size": min(sae.dict_size, 64)})
    terms = build_terms(build_sae(small), trainer)
    others = (frozenset(TRAINING_METRICS) - set(TERM_NAMES) - {GRAD_SHARE}) | set(RUNG_FIGURES)

    def named(names: set[str]) -> frozenset[str]:
        return others | names | ({GRAD_SHARE} if InfoNCE.name in names else set())

    return named({t.name for t in terms if not t.optional}), named({t.name for t in terms})
