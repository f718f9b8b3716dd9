"""`csc sweep`: start (or resume) a Ray Tune sweep whose trials share one activation producer.

The sweep folder <out>/<name>/ is Tune's experiment folder (experiment state; trial_NN/ with each
trial's result.json and checkpoints) plus:
    csc_sweep.json   the resolved spec, where MLflow records the sweep (read again by --resume) and,
                     at the end, the producer's counters
    trials.json, trials.csv, pareto.png, progression.png   the sweep's reports (also on the parent run)
    trial_NN/sae/, curves.png, error.txt                   what each trial's MLflow run also holds
    mlflow_unsent.json   only if MLflow still failed at the end: the records it never received
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from csc.activations.source import Activations
from csc.errors import CscError
from csc.sweep import report
from csc.sweep.producer import NAMESPACE, start_producer
from csc.sweep.spec import SweepSpec
from csc.sweep.tracking import TRIALS_FILE, MlflowTrials, error_reason, flat_params, trial_name
from csc.sweep.trial import run_trial
from csc.sweep.ui import default_tracking

STATE_FILE = "csc_sweep.json"


@dataclass
class SweepResult:
    name: str
    sweep_dir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    producer: dict[str, float]
    interrupted: bool


def tracking_of(spec: SweepSpec) -> tuple[str, str | None]:
    """The tracking URI and the artifact root for new experiments (a server picks its own by default)."""
    t = spec.sweep.tracking
    uri, root = default_tracking()
    uri = t.uri or uri
    return uri, t.artifact_root or (root if uri.startswith("sqlite:") else None)


def _check_server(uri: str) -> None:
    """Fail in seconds, before any compute: MLflow's client would retry an absent server for minutes."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
            if r.status == 200:
                return
            reason = f"HTTP {r.status}"
    except (OSError, ValueError) as e:
        reason = str(getattr(e, "reason", e))
    raise CscError(f"sweep.tracking.uri {uri}: no MLflow server answers there ({reason}); start one "
                   f"(`csc ui --uri sqlite:///mlflow.db`, or deploy/mlflow) or fix the URI")


def _open_tracking(spec: SweepSpec, name: str, sweep_dir: Path, state: dict[str, Any] | None):
    from mlflow.tracking import MlflowClient

    uri, root = tracking_of(spec) if state is None else (state["tracking_uri"], None)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        if state is not None:
            client.update_run(state["parent_run_id"], status="RUNNING")
            return client, uri, state["experiment_id"], state["parent_run_id"]
        exp_name = spec.sweep.tracking.experiment or name
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            exp_name, artifact_location=Path(root).resolve().as_uri() if root else None)
        parent = client.create_run(exp_id, run_name=name, tags={"csc.sweep_dir": str(sweep_dir), "csc.role": "sweep"})
    except Exception as e:  # MLflow raises many kinds (connection, SQL, REST): all mean the same to the user
        raise CscError(f"sweep.tracking: cannot use MLflow at {uri}: {str(e).strip().splitlines()[0]}") from None
    items = list(flat_params(spec.model_dump(exclude={"sweep"})).items()) + \
        list(flat_params(spec.sweep.model_dump(exclude={"search", "points_to_evaluate"}), "sweep.").items())
    items.append(("sweep.search", json.dumps(spec.sweep.model_dump()["search"])[:500]))
    from mlflow.entities import Param

    for s in range(0, len(items), 100):
        client.log_batch(parent.info.run_id, params=[Param(k, v) for k, v in items[s:s + 100]])
    return client, uri, exp_id, parent.info.run_id


def _searcher(spec: SweepSpec):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from ray.tune.search.optuna import OptunaSearch

    space = {}
    for key, p in spec.sweep.search.items():
        if p.type == "choice":
            space[key] = CategoricalDistribution(p.values)
        elif p.type in ("int", "logint"):
            space[key] = IntDistribution(int(p.low), int(p.high), log=p.type == "logint")
        else:
            space[key] = FloatDistribution(p.low, p.high, log=p.type == "loguniform")
    objectives = spec.sweep.objectives
    n = spec.sweep.num_samples
    sampler = optuna.samplers.TPESampler(seed=spec.sweep.seed, n_startup_trials=min(10, max(2, n // 2)))
    if len(objectives) == 1:
        metric, mode = objectives[0].metric, objectives[0].mode
    else:
        metric, mode = [o.metric for o in objectives], [o.mode for o in objectives]
    return OptunaSearch(space, metric=metric, mode=mode, sampler=sampler,
                        points_to_evaluate=[dict(p) for p in spec.sweep.points_to_evaluate] or None)


def _scheduler(spec: SweepSpec, sweep_dir: Path):
    from ray.tune.schedulers import FIFOScheduler

    from csc.sweep.tracking import STOPPED_FILE, RecordingASHA

    a = spec.sweep.scheduler
    if a is None:
        return FIFOScheduler()
    return RecordingASHA(str(sweep_dir / STOPPED_FILE), time_attr="step", metric=a.metric, mode=a.mode,
                         max_t=spec.trainer.steps, grace_period=a.grace_period, reduction_factor=a.reduction_factor)


def _start(spec: SweepSpec, name: str, sweep_dir: Path, spec_json: str, uri: str, exp_id: str, parent_id: str,
           state: dict[str, Any] | None, verbose: int, address: str | None):
    """Ray, the producer and the Tuner (new, or restored from the sweep folder)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / STATE_FILE).write_text(json.dumps({"spec": json.loads(spec_json), "tracking_uri": uri,
                                                    "experiment_id": exp_id, "parent_run_id": parent_id}, indent=1))
    # An absent tracking server fails a call in seconds instead of minutes of retries: the tracker keeps
    # what could not be sent and sends it when the server answers again.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Trials checkpoint more often than Tune expects of num_to_keep=2; the snapshots that forces are cheap here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
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
    producer = start_producer(spec.trial({}), name, cpus=res.producer_cpus, gpus=res.producer_gpus,
                              memory_mb=p.memory_mb, prefetch=p.prefetch, max_restarts=p.max_restarts,
                              custom=res.producer_custom)
    try:
        info = ray.get(producer.info.remote())
    except ray.exceptions.RayError as e:
        raise CscError(f"the activation producer could not start: {error_reason(str(e))}") from None

    tracker = MlflowTrials(uri, exp_id, parent_id, spec_json, str(sweep_dir), info["scale"])
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_json=spec_json, sweep=name, threads=max(1, round(res.trial_cpus))),
        {"cpu": res.trial_cpus, "gpu": res.trial_gpus, **res.trial_custom})
    if state is not None:
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=_searcher(spec), scheduler=_scheduler(spec, sweep_dir),
                                        num_samples=spec.sweep.num_samples,
                                        max_concurrent_trials=spec.sweep.max_concurrent,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=name, storage_path=str(sweep_dir.parent), callbacks=[tracker],
                                      failure_config=tune.FailureConfig(max_failures=spec.sweep.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=verbose))
    return tuner, producer


def sae_bytes(d_model: int, dict_size: int, batch_size: int) -> int:
    """Rough peak memory of one trial's SAE: fp32 weights, their gradients and Adam's two moments (4
    copies of 2 * d * dict), plus about 6 [batch, dict] activations (codes, pre-activations, their
    gradients, the partner's codes) and the [batch, batch] InfoNCE similarities."""
    return 4 * (4 * 2 * d_model * dict_size + 6 * batch_size * dict_size + 2 * batch_size * batch_size)


def _preflight(spec: SweepSpec, local: bool) -> None:
    """What only shows against the model, the corpus and this machine, checked before anything starts:
    the layer and context limits, text in both splits, and (on a local Ray) whether the largest
    dictionary the search can pick fits in memory max_concurrent times."""
    acts = Activations(spec.trial({}))
    acts.check_corpus_has_text()
    if not local:
        return  # the cluster's nodes are not this machine
    sizes = [spec.sae.dict_size]
    if "sae.dict_size" in spec.sweep.search:
        sizes += [int(v) for v in spec.sweep.search["sae.dict_size"].ends()]
    need = sae_bytes(acts.d_model, max(sizes), spec.trainer.batch_size) * spec.sweep.max_concurrent
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        raise CscError(f"sae.dict_size up to {max(sizes)}: {spec.sweep.max_concurrent} trials at once need about "
                       f"{need / 2**30:.1f} GiB for their SAEs, more than this machine's {have / 2**30:.1f} GiB "
                       f"allows; lower the dictionary size, trainer.batch_size or sweep.max_concurrent")


def run_sweep(spec: SweepSpec, name: str, out: Path, *, resume: bool = False, verbose: int = 1,
              address: str | None = None) -> SweepResult:
    """Run (or resume) the sweep; `out` must be storage every node sees when `address` names a cluster."""
    sweep_dir = (out / name).resolve()
    state_path = sweep_dir / STATE_FILE
    spec_json = spec.model_dump_json()
    state = None
    if resume:
        if not state_path.is_file() or not tune.Tuner.can_restore(str(sweep_dir)):
            raise CscError(f"--resume: no sweep to resume in {sweep_dir} (run it once without --resume)")
        state = json.loads(state_path.read_text())
        if state["spec"] != json.loads(spec_json):
            raise CscError(f"--resume: {sweep_dir} was started with a different spec; resume with the same spec "
                           f"or start a new sweep (another --out or sweep.name)")
    elif tune.Tuner.can_restore(str(sweep_dir)):
        raise CscError(f"sweep folder {sweep_dir} holds a sweep: pass --resume to continue it, "
                       f"or choose another --out or sweep.name")
    address = address or os.environ.get("RAY_ADDRESS")  # `ray job submit` sets it
    _preflight(spec, local=not address)

    client, uri, exp_id, parent_id = _open_tracking(spec, name, sweep_dir, state)
    try:
        tuner, producer = _start(spec, name, sweep_dir, spec_json, uri, exp_id, parent_id, state, verbose, address)
        tuner.fit()
    except BaseException as e:  # a sweep that never got going is recorded as such, not left RUNNING
        client.set_tag(parent_id, "csc.failure_reason", f"{type(e).__name__}: {str(e).strip()[:1000]}")
        client.set_terminated(parent_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise

    stats = ray.get(producer.stats.remote())
    rows = json.loads((sweep_dir / TRIALS_FILE).read_text()) if (sweep_dir / TRIALS_FILE).is_file() else []
    interrupted = len(rows) < spec.sweep.num_samples or any(r["outcome"] == "running" for r in rows)
    from mlflow.entities import Metric, RunTag

    state_path.write_text(json.dumps({**json.loads(state_path.read_text()), "producer": stats,
                                      "interrupted": interrupted}, indent=1))
    for attempt in range(3):  # a pooled connection to a server that restarted fails once, then works
        try:
            client.log_batch(parent_id, metrics=[Metric(f"producer.{k}", float(v), 0, 0) for k, v in stats.items()
                                                 if isinstance(v, (int, float))],
                             tags=[RunTag("csc.producer_node", stats["node_id"]),
                                   RunTag("csc.interrupted", str(interrupted).lower())])
            client.set_terminated(parent_id, "KILLED" if interrupted else "FINISHED")
            break
        except Exception as e:  # the sweep itself is done: its folder has everything
            if attempt == 2:
                print(f"csc: could not record the end of the sweep in MLflow ({type(e).__name__}: "
                      f"{str(e).strip()[:300]}); {state_path} has it", flush=True)
            time.sleep(2)
    return SweepResult(name, sweep_dir, uri, exp_id, parent_id, rows, stats, interrupted)


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
    lines = [f"sweep {sweep_dir.name!r}: {len(rows)} of {spec.sweep.num_samples} trials: "
             + ", ".join(f"{n} {o.replace('_', ' ')}" for o, n in counts.items() if n)]
    if "producer" in state:
        st = state["producer"]
        lines.append(f"producer: the LM made {st['lm_shards_computed']:.0f} shards ({st['lm_tokens']:,.0f} tokens "
                     f"in {st['lm_seconds']:.1f} s) for {st['requests']:.0f} shard requests, {st['memory_hits']:.0f} "
                     f"of them from memory; {st['evaluations']:.0f} CE/KL evaluations")
    objectives = [(o.metric, o.mode) for o in spec.sweep.objectives]
    best = report.best_trials(rows, objectives)
    if best:
        lines.append("best trials (" + ", ".join(f"{m} {mode}" for m, mode in objectives)
                     + ("; the Pareto set" if len(objectives) > 1 else "") + "):")
        lines.append(report.format_best(best, objectives, list(spec.sweep.search)))
    lines.append(f"reports: {sweep_dir}/trials.csv, pareto.png, progression.png (also on the MLflow parent run)")
    uri = state["tracking_uri"]
    ui = "csc ui" if uri == default_tracking()[0] else f"csc ui --uri {uri}"
    lines.append(f"MLflow: experiment {state['experiment_id']}, parent run {state['parent_run_id']}; "
                 f"open it with: {ui}")
    return "\n".join(lines)
