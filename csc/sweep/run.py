"""`csc sweep`: start (or resume) a Ray Tune sweep whose trials share one activation producer.

The sweep folder <out>/<name>/ is Tune's experiment folder (experiment state; trial_NN/ with each
trial's result.json and checkpoints) plus:
    csc_sweep.json   the resolved spec, where the tracker records the sweep (read again by --resume) and,
                     at the end, the producer's counters (summed over its replicas; per_replica: each one's)
    trials.json, trials.csv, pareto.png, progression.png   the sweep's reports (also on the parent run), and
                     configs.json, configs.csv where configurations ran over several seeds
    trial_NN/sae/, curves.png, error.txt                   what each trial's MLflow run also holds
    scheduler.jsonl  every early-stopping decision (csc.sweep.scheduler), read back by --resume
    mlflow_unsent.json   only if MLflow still failed at the end: the records it never received
csc.sweep.outcomes writes those files, tracker or not; csc.sweep.tracking.mlflow makes the MLflow runs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from csc.activations.source import SPLITS, Activations
from csc.errors import CscError
from csc.pipeline.absorption import SAE_FIGURES
from csc.sweep import report
from csc.sweep.cluster import check_cluster
from csc.sweep.layout import STATE_FILE, TRIALS_FILE, trial_name
from csc.sweep.outcomes import CONFIGS_FILE, TrialRecords, error_reason
from csc.sweep.producer import NAMESPACE, pool_stats, start_pool
from csc.sweep.reported import EVAL_PREFIX, TIME_PREFIX, WALL_TIME
from csc.sweep.scheduler import load_halving, scheduler, scheduler_line
from csc.sweep.search import searcher, table_columns
from csc.sweep.spec import SweepSpec
from csc.sweep.tracking import Tracker, tracker_for
from csc.sweep.tracking.mlflow import check_server, tracking_of
from csc.sweep.trial import run_trial
from csc.sweep.ui import default_tracking, runs_page_url, sqlite_path, sweep_view


@dataclass
class SweepResult:
    name: str
    sweep_dir: Path
    tracking_uri: str | None  # None: an untracked sweep
    experiment_id: str | None
    parent_run_id: str | None
    rows: list[dict[str, Any]]
    producer: dict[str, Any]
    interrupted: bool


class _GoneCheckpoint(logging.Filter):
    """Tune, restored after a killed driver, deletes the checkpoints its saved state lists beyond
    CheckpointConfig.num_to_keep; one deleted before the kill is gone, and Tune logs the FileNotFoundError with a
    traceback ("Error handling checkpoint"). The new checkpoint is registered before the deletion fails; what the
    failure skips (the trial's saved state and checkpoint index are refreshed) happens again at its next checkpoint.
    One line says so instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, FileNotFoundError) or \
                not str(record.msg).startswith("Trial %s: Error handling checkpoint"):
            return True
        print(f"csc: {record.args[0]}: an old checkpoint Tune meant to delete was already gone (deleted before the "
              f"driver stopped): {error.filename or error}; its newer checkpoints are kept", flush=True)
        return False


def quiet_gone_checkpoints() -> None:
    """Install _GoneCheckpoint on Tune's controller logger (once per process)."""
    controller = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, _GoneCheckpoint) for f in controller.filters):
        controller.addFilter(_GoneCheckpoint())


def _start(spec: SweepSpec, name: str, sweep_dir: Path, spec_json: str, ids: dict[str, str],
           tracker: Tracker | None, state: dict[str, Any] | None, verbose: int, address: str | None):
    """Ray, the producer's replicas and the Tuner (new, or restored from the sweep folder)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / STATE_FILE).write_text(json.dumps({"spec": json.loads(spec_json), **ids}, indent=1))
    # Trials checkpoint more often than Tune expects of num_to_keep=2; the snapshots that forces are cheap here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    quiet_gone_checkpoints()
    if not ray.is_initialized():
        # An address (--address or RAY_ADDRESS, resolved by run_sweep) joins a cluster. Else a local one starts:
        # "local", because address=None would join whatever cluster `ray start` last recorded, dead or not.
        address = address or "local"
        try:
            ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=True,
                     configure_logging=False)
        except ConnectionError as e:
            raise CscError(f"--address {address}: cannot join the Ray cluster: "
                           f"{str(e).strip().splitlines()[0]}") from None
    res, p = spec.sweep.resources, spec.sweep.producer
    producers = start_pool(spec.trial({}), name, replicas=p.replicas, store=p.store, cpus=res.producer_cpus,
                           gpus=res.producer_gpus, memory_mb=p.memory_mb, prefetch=p.prefetch,
                           max_restarts=p.max_restarts, custom=res.producer_custom, evaluators=p.evaluators)
    producer = producers[0]  # replica 0 makes what is made once
    try:
        ray.get([a.info.remote() for a in producers])
    except ray.exceptions.RayError as e:
        raise CscError(f"the activation producer could not start: {error_reason(str(e))}") from None
    try:  # made once for every trial: a corpus that cannot be probed fails now, as `csc train` does, not each trial
        ray.get(producer.probe_labels.remote())
    except ray.exceptions.RayError as e:
        if isinstance(getattr(e, "cause", None), CscError):  # the error `csc train` gives, field named
            raise e.cause from None
        raise CscError(f"the sparse-probing set could not be made: {error_reason(str(e))}") from None
    if spec.eval.absorption:  # absorption's LM part, made once for every trial, as the probing set is
        try:
            absorption = ray.get(producer.absorption.remote())
        except ray.exceptions.RayError as e:
            raise CscError(f"feature absorption's prompts and LM probe could not be made: "
                           f"{error_reason(str(e))}") from None
        wanted = [o.metric for o in spec.sweep.objectives if o.metric.removeprefix(EVAL_PREFIX) in SAE_FIGURES]
        if wanted and absorption.reason is not None:  # else every trial would lack an objective
            raise CscError(f"sweep.objectives: {', '.join(wanted)} cannot be measured: {absorption.reason}")

    # On --resume Tune restores the callback it pickled at the start (with its tracker), not this one.
    records = TrialRecords(spec_json, str(sweep_dir), tracker)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_json=spec_json, sweep=name, threads=max(1, round(res.trial_cpus))),
        {"cpu": res.trial_cpus, "gpu": res.trial_gpus, **res.trial_custom})
    if state is not None:
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=False,
                                   param_space=table_columns(spec))
    else:
        # reuse_actors: the next trial runs in a finished trial's process, which has imported torch and csc
        # already (~7 s per trial on 2 cores); trials share no state but the global RNG, which Trainer seeds.
        tuner = tune.Tuner(
            trainable,
            param_space=table_columns(spec),
            tune_config=tune.TuneConfig(search_alg=searcher(spec), scheduler=scheduler(spec, sweep_dir),
                                        num_samples=spec.n_trials,
                                        max_concurrent_trials=spec.sweep.max_concurrent, reuse_actors=True,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=name, storage_path=str(sweep_dir.parent), callbacks=[records],
                                      failure_config=tune.FailureConfig(max_failures=spec.sweep.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=verbose))
    return tuner, producers


def sae_bytes(d_model: int, dict_size: int, batch_size: int) -> int:
    """Rough peak memory of one trial's SAE: fp32 weights, their gradients and Adam's two moments (4
    copies of 2 * d * dict), plus about 6 [batch, dict] activations (codes, pre-activations, their
    gradients, the partner's codes) and the [batch, batch] InfoNCE similarities."""
    return 4 * (4 * 2 * d_model * dict_size + 6 * batch_size * dict_size + 2 * batch_size * batch_size)


def _preflight(spec: SweepSpec, local: bool) -> Activations:
    """What only shows against the model, the corpus and this machine, checked before anything starts:
    the layer and context limits, text in both splits, and (on a local Ray) whether the largest
    dictionary the search can pick fits in memory max_concurrent times. Returns the base spec's activations."""
    acts = Activations(spec.trial({}))
    acts.check_corpus_has_text()
    if not local:
        return acts  # the cluster's nodes are not this machine
    sizes = [spec.sae.dict_size]
    if "sae.dict_size" in spec.sweep.search:
        sizes += [int(v) for v in spec.sweep.search["sae.dict_size"].ends()]
    need = sae_bytes(acts.d_model, max(sizes), spec.trainer.batch_size) * spec.sweep.max_concurrent
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        raise CscError(f"sae.dict_size up to {max(sizes)}: {spec.sweep.max_concurrent} trials at once need about "
                       f"{need / 2**30:.1f} GiB for their SAEs, more than this machine's {have / 2**30:.1f} GiB "
                       f"allows; lower the dictionary size, trainer.batch_size or sweep.max_concurrent")
    return acts


def _sweep_state(spec: SweepSpec, sweep_dir: Path, resume: bool) -> dict[str, Any] | None:
    """The state file of the sweep to resume (None for a new sweep), refusing a folder that does not fit."""
    state_path = sweep_dir / STATE_FILE
    if resume:
        if not state_path.is_file() or not tune.Tuner.can_restore(str(sweep_dir)):
            raise CscError(f"--resume: no sweep to resume in {sweep_dir} (run it once without --resume)")
        state = json.loads(state_path.read_text())
        if state["spec"] != json.loads(spec.model_dump_json()):
            raise CscError(f"--resume: {sweep_dir} was started with a different spec; resume with the same spec "
                           f"or start a new sweep (another --out or sweep.name)")
        return state
    if tune.Tuner.can_restore(str(sweep_dir)):
        raise CscError(f"sweep folder {sweep_dir} holds a sweep: pass --resume to continue it, "
                       f"or choose another --out or sweep.name")
    return None


def dry_run(spec: SweepSpec, name: str, out: Path, *, resume: bool = False, address: str | None = None) -> str:
    """`csc sweep --dry-run`: every check a real run makes before it starts (the sweep folder, the model's limits,
    the corpus, this machine's memory, the tracking server), then what the sweep would do, as text. Starts no Ray,
    no LM and no MLflow client, and writes nothing."""
    sweep_dir = (out / name).resolve()
    state = _sweep_state(spec, sweep_dir, resume)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_cluster(address)
    acts = _preflight(spec, local=not address)
    uri, _ = tracking_of(spec) if state is None else (state.get("tracking_uri"), None)
    if uri is not None and uri.startswith(("http://", "https://")):
        check_server(uri)
    sw, t = spec.sweep, spec.trainer
    lines = [f"dry run of sweep {name!r}: {'resumes' if state else 'would write'} {sweep_dir}"
             f"{'' if state or not sweep_dir.exists() else ' (the folder exists and holds no sweep)'}",
             f"search ({sw.method}, {spec.n_trials} trials"
             + (f": {spec.n_configs} configurations x {sw.seeds} seeds" if sw.seeds > 1 else "") + "):"]
    for key, p in sw.search.items():
        lines.append(f"  {key}: " + (f"one of {p.values}" if p.type == "choice" else f"{p.type} in [{p.low:g}, {p.high:g}]"))
    if not sw.search:
        lines.append("  (nothing searched: every trial is the base spec)")
    for point in sw.points_to_evaluate:
        lines.append(f"  first: {point}")
    lines.append("objectives: " + ", ".join(f"{o.metric} ({o.mode})" for o in sw.objectives)
                 + ("; no early stopping" if sw.scheduler is None else f"; {scheduler_line(spec)}"))
    r, pr = sw.resources, sw.producer
    lines.append(f"concurrency: {sw.max_concurrent} trials at once, each {r.trial_cpus:g} CPU, {r.trial_gpus:g} GPU"
                 + (f", {r.trial_custom}" if r.trial_custom else "")
                 + f"; {pr.replicas} producer(s), each {r.producer_cpus:g} CPU, {r.producer_gpus:g} GPU"
                 + (f", {r.producer_custom}" if r.producer_custom else "") + f", store {pr.store}"
                 + (f" ({pr.memory_mb:g} MB each)" if pr.store == "memory" else "")
                 + f", {pr.evaluators} evaluation thread{'s' if pr.evaluators > 1 else ''}"
                 + (f"; on the Ray cluster at {address}" if address else "; on a local Ray"))
    lines.append(f"tokens: {t.steps} steps x {t.batch_size} = {t.steps * t.batch_size:,} trained tokens per trial, "
                 f"{t.steps * t.batch_size * spec.n_trials:,} in all")
    for split in SPLITS:
        cache = acts.caches[split]
        have = sum(cache.has(i) for i in range(acts.n_shards[split]))
        lines.append(f"activations, {split}: {acts.n_shards[split]} shards in {cache.dir}, {have} there already")
    if uri is None:
        lines.append("MLflow: none (the sweep ran untracked)")
    else:
        where = uri
        path = sqlite_path(uri)
        if path is not None and not path.is_file():
            where += " (a new store)"
        experiment = (f"experiment {state['experiment_id']}, parent run {state['parent_run_id']}" if state
                      else f"experiment {sw.tracking.experiment or name!r}")
        lines.append(f"MLflow: {where}, {experiment}")
    return "\n".join(lines)


def run_sweep(spec: SweepSpec, name: str, out: Path, *, resume: bool = False, verbose: int = 1,
              address: str | None = None, tracked: bool = True) -> SweepResult:
    """Run (or resume) the sweep; `out` must be storage every node sees when `address` names a cluster.
    tracked=False: no tracker, the sweep folder alone (a resumed sweep keeps the choice it started with)."""
    sweep_dir = (out / name).resolve()
    state_path = sweep_dir / STATE_FILE
    spec_json = spec.model_dump_json()
    state = _sweep_state(spec, sweep_dir, resume)
    address = address or os.environ.get("RAY_ADDRESS")  # `ray job submit` sets it
    if address and not ray.is_initialized():
        check_cluster(address)
    _preflight(spec, local=not address)

    tracker = tracker_for(spec, state) if tracked or state is not None else None
    ids = tracker.start_sweep(name, str(sweep_dir), spec, state) if tracker is not None else {}
    try:
        tuner, producers = _start(spec, name, sweep_dir, spec_json, ids, tracker, state, verbose, address)
        tuner.fit()
    except BaseException as e:  # a sweep that never got going is recorded as such, not left RUNNING
        if tracker is not None:
            tracker.end_sweep("interrupted" if isinstance(e, KeyboardInterrupt) else "failed", {},
                              {"csc.failure_reason": f"{type(e).__name__}: {str(e).strip()[:1000]}"})
        raise

    stats = pool_stats(producers)
    rows = json.loads((sweep_dir / TRIALS_FILE).read_text()) if (sweep_dir / TRIALS_FILE).is_file() else []
    interrupted = len(rows) < spec.n_trials or any(r["outcome"] == "running" for r in rows)
    state_path.write_text(json.dumps({**json.loads(state_path.read_text()), "producer": stats,
                                      "interrupted": interrupted}, indent=1))
    if tracker is not None:
        try:
            tracker.end_sweep("interrupted" if interrupted else "finished",
                              {f"producer.{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))},
                              {"csc.producer_node": stats["node_id"], "csc.interrupted": str(interrupted).lower()})
        except Exception as e:  # the sweep itself is done: its folder has everything
            print(f"csc: could not record the end of the sweep in {tracker.name} ({type(e).__name__}: "
                  f"{str(e).strip()[:300]}); {state_path} has it", flush=True)
    return SweepResult(name, sweep_dir, ids.get("tracking_uri"), ids.get("experiment_id"), ids.get("parent_run_id"),
                       rows, stats, interrupted)


def sweep_summary(sweep_dir: Path) -> str:
    """What `csc sweep` prints at the end and `csc report` prints again: outcomes, the producer's work,
    the best trials by the sweep's objectives, and where the reports and the MLflow runs are."""
    state_path, rows_path = sweep_dir / STATE_FILE, sweep_dir / TRIALS_FILE
    if not state_path.is_file():
        raise CscError(f"{sweep_dir}: not a sweep folder (no {STATE_FILE})")
    state = json.loads(state_path.read_text())
    rows = json.loads(rows_path.read_text()) if rows_path.is_file() else []
    spec = SweepSpec.model_validate(state["spec"])
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("finished", "stopped_early", "failed", "running")}
    seeds = f" ({spec.n_configs} configurations x {spec.sweep.seeds} seeds)" if spec.sweep.seeds > 1 else ""
    lines = [f"sweep {sweep_dir.name!r}: {len(rows)} of {spec.n_trials} trials{seeds}: "
             + ", ".join(f"{n} {o.replace('_', ' ')}" for o, n in counts.items() if n)]
    if "producer" in state:
        st = state["producer"]
        replicas, recomputed = st.get("replicas", 1), st.get("lm_shards_recomputed", 0)
        trained = sum(r["metrics"].get("tokens", 0.0) for r in rows)  # each trial's last report
        lines.append(f"producer{f' ({replicas} replicas)' if replicas > 1 else ''}: the LM made "
                     f"{st['lm_shards_computed']:.0f} shards ({st['lm_tokens']:,.0f} tokens in {st['lm_seconds']:.1f} s"
                     + (f"; {recomputed:.0f} of them again, after their eviction" if recomputed else "")
                     + f") for {st['requests']:.0f} shard requests, {st['memory_hits']:.0f} of them from memory; "
                     f"{st['evaluations']:.0f} CE/KL evaluations"
                     + (f" ({st['evaluation_seconds']:.1f} s beside the shards, {st['clean_runs_seconds']:.1f} s of it "
                        f"the runs without an SAE, made once)" if st.get("evaluation_seconds") else "")
                     + (f"; {st['lm_tokens'] / trained:.3f} LM tokens per trained token" if trained else "")
                     + (f"; replicas restarted: {st['restarted']:.0f} (their counts start at the restart)"
                        if st.get("restarted") else ""))
    timed = [r["metrics"] for r in rows if TIME_PREFIX + "train" in r["metrics"]]
    if timed:
        lines.append(f"where the trials' time went (seconds, summed over the {len(timed)} that reported it): "
                     + ", ".join(f"{label} {sum(m.get(TIME_PREFIX + key, 0.0) for m in timed):.0f}"
                                 for key, label in WALL_TIME))
    objectives = [(o.metric, o.mode) for o in spec.sweep.objectives]
    configs = report.configurations(rows)
    by_config = report.repeated(configs)
    # Over seeds, only a configuration whose every seed finished has a mean: what Optuna was told.
    best = report.best_trials([c for c in configs if c["outcome"] == "finished"] if by_config else rows, objectives)
    if best:
        lines.append(f"best {'configurations' if by_config else 'trials'} ("
                     + ", ".join(f"{m} {mode}" for m, mode in objectives)
                     + ("; the Pareto set" if len(objectives) > 1 else "")
                     + ("; mean ± std over their seeds" if by_config else "") + "):")
        params = [p for p in spec.sweep.search if not (by_config and p == report.SEED)]
        lines.append(report.format_best(best, objectives, params))
    halving = load_halving(sweep_dir)
    if halving is not None and halving.n_records:
        lines.append(f"early stopping: {scheduler_line(spec)}; every decision:")
        lines += ["  " + line for line in halving.decisions()]
    reports = f"reports: {sweep_dir}/trials.csv, pareto.png, progression.png" + \
        (", configs.csv" if (sweep_dir / CONFIGS_FILE).is_file() else "")
    if "tracking_uri" not in state:  # an untracked sweep
        return "\n".join([*lines, reports])
    lines.append(f"{reports} (also on the MLflow parent run)")
    uri = state["tracking_uri"]
    ui = "csc ui" if uri == default_tracking()[0] else f"csc ui --uri {uri}"
    lines.append(f"MLflow: experiment {state['experiment_id']}, parent run {state['parent_run_id']}; "
                 f"open it with: {ui}; the sweep's view of the runs table (outcomes, searched values, figures): "
                 f"{runs_page_url('', state['experiment_id'], view=sweep_view(sweep_dir.name)).lstrip('/')}")
    return "\n".join(lines)
