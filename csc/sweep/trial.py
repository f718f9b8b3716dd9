"""One sweep trial: a Ray Tune function trainable that trains an SAE on the producer's shards.

Every `trainer.log_every` steps the trial reports the averages of the per-step metrics since its
previous report (REPORT_METRICS, plus step, tokens, lr, beta, gamma, tokens_per_s); every
`checkpoint_every` steps that report carries a checkpoint, from which Tune resumes a paused, retried or
interrupted trial at the same batch. After the last step it evaluates on held-out tokens (CE/KL in the
producer) and sends one final report with the held-out figures under `eval/` and a last checkpoint.
All trials read the same batches in the same order (the base spec's trainer.seed), so they differ only
by their hyperparameters.
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

from csc.sae.checkpoint import load_checkpoint, save_checkpoint
from csc.sae.export import export_saelens
from csc.sae.run import evaluate_run, training_stream
from csc.sae.trainer import Trainer
from csc.sweep.producer import RemoteActivations
from csc.sweep.spec import SweepSpec

EVAL_PREFIX = "eval/"


def run_trial(config: dict[str, Any], *, spec_json: str, sweep: str, threads: int) -> None:
    torch.set_num_threads(threads)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "Checkpoint successfully created" line per report
    base = SweepSpec.model_validate_json(spec_json)
    spec = base.trial(config)
    acts = RemoteActivations(spec, sweep)
    sae_cfg = spec.sae.model_copy(update={"d_in": acts.d_model})

    node_id = ray.get_runtime_context().get_node_id()
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            trainer = load_checkpoint(Path(d))
    else:
        trainer = Trainer(sae_cfg, spec.trainer)
    # The data order is the base spec's, whatever seed a trial searches, so trials compare fairly.
    stream = training_stream(acts, spec.trainer.batch_size, base.trainer.seed, start=trainer.batches_consumed)

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # per key: nce is absent while gamma is still 0 in its warm-up
    t0, tokens0 = time.perf_counter(), trainer.tokens
    # A trial restored from its final checkpoint (the driver died before Tune recorded it as done) trains no
    # step: its final report carries the checkpoint's last metrics, so it has what Optuna and ASHA read.
    report: dict[str, Any] = {**(trainer.last_metrics or {}), "step": float(trainer.step),
                              "tokens": float(trainer.tokens), "node_id": node_id}
    for batch in stream if not trainer.done else ():
        m = trainer.update(trainer.step, batch)
        for key in m:
            sums[key] = sums.get(key, 0.0) + m[key]
            counts[key] = counts.get(key, 0) + 1
        if trainer.step % spec.trainer.log_every == 0 or trainer.done:
            report = {k: v / counts[k] for k, v in sums.items()}
            report.update({k: m[k] for k in ("step", "tokens", "lr", "alpha", "beta", "gamma")})
            report["node_id"] = node_id  # which Ray node trained it (Tune's own node_ip is one per machine)
            report["tokens_per_s"] = (trainer.tokens - tokens0) / (time.perf_counter() - t0)
            sums, counts, t0, tokens0 = {}, {}, time.perf_counter(), trainer.tokens
            if trainer.done:
                break
            _report(report, trainer if trainer.step % spec.checkpoint_every == 0 else None, spec, acts.scale)

    # The final report: ASHA stops a trial once it reaches trainer.steps, so nothing may come after it.
    results, _ = evaluate_run(spec, trainer.model, acts, splice=acts.splice)
    report.update({EVAL_PREFIX + k: v for k, v in results.items()})
    _report(report, trainer, spec, acts.scale, results)


def _report(metrics: dict[str, float], trainer: Trainer | None, spec, scale: float,
            results: dict[str, float] | None = None) -> None:
    if trainer is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(trainer, Path(d))
        a = spec.activations
        export_saelens(trainer.model, Path(d) / "sae", model_name=spec.model.name,
                       hook_name=f"blocks.{a.layer}.hook_resid_post", hook_layer=a.layer, norm_scale=scale,
                       context_size=a.context_length, dataset_path=spec.corpus.source)
        if results is not None:
            (Path(d) / "eval.json").write_text(json.dumps(results, indent=1))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
