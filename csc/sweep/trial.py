"""One sweep trial: a Ray Tune function trainable that trains an SAE on the producer's shards.

Every `trainer.log_every` steps the trial sends Tune the trainer's report (csc.sae.trainer: averages of the
per-step metrics since the previous report, step, tokens, lr, the weights in force, tokens_per_s) and the rung
figures of its SAE on a fixed held-out slice (csc.pipeline.rung: heldout/..., what the scheduler compares); every
`checkpoint_every` steps that report carries a checkpoint (trainer state and the SAE's export in sae/), from
which Tune resumes a paused, retried or interrupted trial at the same batch. After the last step it evaluates
on held-out tokens (CE/KL in the producer; sparse probing and feature absorption here, over the probing set and
the absorption prompts' activations and LM letter probe that the producer made) and sends one final report with
the held-out figures under `eval/`, where its wall time went under `time/` (csc.sweep.reported.WALL_TIME), and a
last checkpoint, which also holds
eval.json and the feature dashboard (dashboard.html: statistics and contexts computed here, logit tables and
token strings in the producer, so the trial never loads the LM).
All trials read the same batches in the same order (the base spec's trainer.seed), so they differ only
by their hyperparameters and, through their own trainer.seed (searched, or one of sweep.seeds), their SAE's
initialisation; a trial with its own `activations.pairing` reads the same anchors in the same
order from the same shards, with its rule's partners.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from csc.config import TrainRunSpec
from csc.pipeline import dashboard
from csc.pipeline.rung import HeldOutSlice
from csc.pipeline.run import evaluate_run, hook_info, training_stream
from csc.sae.checkpoint import load_checkpoint, save_checkpoint
from csc.sae.export import save_sae
from csc.sae.trainer import Hook, Metrics, Trainer
from csc.sweep.producer import RemoteActivations
from csc.sweep.reported import EVAL_PREFIX, TIME_PREFIX
from csc.sweep.spec import SweepSpec


DENSITY_FILE = "density.json"
"""A finished trial's feature-density histogram on held-out tokens, in its final checkpoint."""
SINCE = "since_step"
"""In every report: the step of the checkpoint the trial's process started from (0: from the start), so that the
tracker can tell a branch the SAE left (steps logged past it by an earlier process) from a repeated report."""
RESOLVED = "resolved"
"""In every report: what the trial settled where it runs, as JSON (a string, so no tracker takes it for a metric):
sae.d_in (the LM's width), trainer.device and trainer.autocast as used ("auto" and "bf16" in the spec)."""
RESOLVED_FIELDS = ("sae.d_in", "trainer.device", "trainer.autocast")
TABLE_FIRST = ("loss", "ev", "l0", "mse")
"""The metrics Tune's terminal table shows (it takes the first four of a trial's report)."""


class TuneReport(Hook):
    """Every report but the last goes to Tune (the last waits for the held-out figures), with the rung figures of
    `rungs` (csc.pipeline.rung); every `checkpoint_every` steps with a checkpoint."""

    def __init__(self, spec: TrainRunSpec, scale: float, node_id: str, since: int, trainer: Trainer,
                 rungs: HeldOutSlice):
        self.spec, self.scale, self.node_id, self.since, self.rungs = spec, scale, node_id, since, rungs
        self.resolved = json.dumps(dict(zip(RESOLVED_FIELDS, (trainer.model.cfg.d_in, str(trainer.device),
                                                              "bf16" if trainer.use_bf16 else "fp32"))))

    def on_report(self, trainer: Trainer, report: Metrics) -> None:
        if not trainer.done:
            due = trainer.step % self.spec.checkpoint_every == 0
            _report(self.tag(report, trainer), trainer if due else None, self.spec, self.scale)

    def tag(self, report: Metrics, trainer: Trainer) -> dict[str, Any]:
        """What Tune gets of a report: the trainer's figures, the rung figures of its SAE now, and bookkeeping."""
        # Tune's progress table shows a trial's first four metrics: these first
        first = {k: report[k] for k in TABLE_FIRST if k in report}
        # node_id: Tune's node_ip is one per machine
        return {**first, **report, **self.rungs.figures(trainer.model), "node_id": self.node_id, SINCE: self.since,
                RESOLVED: self.resolved}


def run_trial(config: dict[str, Any], *, spec_json: str, sweep: str, threads: int) -> None:
    started = time.perf_counter()
    torch.set_num_threads(threads)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "Checkpoint successfully created" line per report
    base = SweepSpec.model_validate_json(spec_json)
    spec = base.trial(config)
    acts = RemoteActivations(spec, sweep)
    try:
        _train_and_evaluate(base, spec, acts, started)
    finally:  # a trial killed outright never gets here: its reader's lease runs out instead
        acts.release()


def _train_and_evaluate(base: SweepSpec, spec: TrainRunSpec, acts: RemoteActivations, started: float) -> None:
    sae_cfg = spec.sae.model_copy(update={"d_in": acts.d_model})

    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            trainer = load_checkpoint(Path(d))
    else:
        trainer = Trainer(sae_cfg, spec.trainer)
    # The held-out slice is read before the first batch, so that its shards do not displace training's prefetch.
    hook = TuneReport(spec, acts.scale, ray.get_runtime_context().get_node_id(), trainer.step if restored else 0,
                      trainer, HeldOutSlice(spec, acts))
    seconds = {"startup": time.perf_counter() - started}
    # A trial restored from its final checkpoint (the driver died before Tune recorded it as done) trains no
    # step: its final report carries the checkpoint's last report, so it has what Optuna and ASHA read.
    start, waited = time.perf_counter(), acts.waited
    if not trainer.done:
        # The data order is the base spec's, whatever seed a trial searches, so trials compare fairly.
        trainer.fit(training_stream(acts, spec.trainer.batch_size, base.trainer.seed,
                                    start=trainer.batches_consumed), [hook])

    # The final report: ASHA stops a trial once it reaches trainer.steps, so nothing may come after it. Its rung
    # figures first: evaluate_run moves the SAE to the CPU for good.
    seconds.update(train=time.perf_counter() - start, shard_wait=acts.waited - waited)
    report = hook.tag(trainer.last_report, trainer)
    results, hist = evaluate_run(spec, trainer.model, acts, splice=acts.splice, labels=acts.probe_labels(),
                                 absorption=acts.absorption() if spec.eval.absorption else None, seconds=seconds)
    start = time.perf_counter()
    page = dashboard.build(spec, trainer.model, acts, results, tables=acts.logit_tables)
    seconds["dashboard"] = time.perf_counter() - start
    report.update({EVAL_PREFIX + k: v for k, v in results.items()})
    report.update({TIME_PREFIX + k: v for k, v in seconds.items()})
    # the density histogram as data: trial workers import no matplotlib, the driver draws it (csc.sweep.outcomes)
    _report(report, trainer, spec, acts.scale, {"eval.json": json.dumps(results, indent=1), dashboard.FILE: page,
                                                DENSITY_FILE: hist.to_json()})


def _report(metrics: dict[str, Any], trainer: Trainer | None, spec: TrainRunSpec, scale: float,
            files: dict[str, str] | None = None) -> None:
    """Report to Tune; with `trainer`, with a checkpoint that also holds the SAE's export (sae/) and `files`
    (name: text)."""
    if trainer is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(trainer, Path(d))
        save_sae(trainer.model, Path(d) / "sae", hook_info(spec, scale))
        for name, text in (files or {}).items():
            (Path(d) / name).write_text(text)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
