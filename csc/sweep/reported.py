"""What a trial reports, by name: what sweep objectives and the scheduler may read, checked at spec load.

A trial sends Tune the trainer's report every `trainer.log_every` steps (training metrics: averages over the
steps since the previous report, csc.sae.trainer.TRAINING_METRICS) and, after its last step, one final report
that adds the held-out figures of `csc eval` under `eval/`. Which training metrics a trial has depends on its
settings (a loss term's metric only where the trial has that term), so it is derived here from the terms the
trainer builds for them (csc.sae.losses.build_terms), never listed apart.
"""

from __future__ import annotations

from csc.config import CorpusSpec, EvalSpec
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
    """(the training metrics in every report of a trial with these settings, those in its final report).

    A term's metric is in the final report where the trial has the term; in every report only if the trainer
    computes it at every step: an optional term (InfoNCE) is skipped at steps where its weight is 0, as at
    the start of its warm-up, so a report of those steps alone lacks it."""
    # Which terms a trial has depends on its architecture and trainer settings, not on its sizes: a 1 x 1 SAE.
    terms = build_terms(build_sae(sae.model_copy(update={"d_in": 1, "dict_size": 1})), trainer)
    others = frozenset(TRAINING_METRICS) - set(TERM_NAMES) - {GRAD_SHARE}

    def named(names: set[str]) -> frozenset[str]:
        return others | names | ({GRAD_SHARE} if InfoNCE.name in names else set())

    return named({t.name for t in terms if not t.optional}), named({t.name for t in terms})
