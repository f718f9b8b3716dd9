"""Sweep amortisation: K trials sharing one LM producer vs the same K trials each running the LM itself.

    python bench/sweep_amortisation.py                  # embedded model, K = 2, 4, 8, two trials at a time

Both arms run real Ray on this machine, from an empty activation cache, with the same trials (one pass over
the training tokens each, the base spec's batches, beta spread over the K trials) and the same concurrency:
  shared     csc's sweep path: one ActivationProducer actor owns the LM, every trial reads its shards through
             RemoteActivations (the next shard is fetched while the current one trains)
  own LM     each trial builds its own Activations on a private cache folder, so it loads and runs the LM itself
             (what you get by launching K independent `csc train` jobs on machines with no shared cache)
Columns: LM tokens forwarded per trained token (ideal for the shared arm: 1/K of the own-LM arm), wall time
from the first trial submitted to the last one done (the producer's start included), and the cost model's ideal
wall ratio K (L + S) / (L + K S): the work of K own-LM trials over the work of one LM pass and K trainings, with
L = an own-LM trial's LM seconds and S = the rest of its time (loading, batching, training), both measured in the
own-LM arm of the same run: what sharing would gain if every core were busy all the time in both arms. Tune,
checkpoints and MLflow are left out of both arms: they cost the same in each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch

from csc.activations.source import Activations
from csc.config import TrainRunSpec, default_cache_dir
from csc.spec_loader import load_spec
from csc.pipeline.run import training_stream
from csc.sae.trainer import Trainer
from csc.sweep.producer import RemoteActivations, start_producer
from csc.sweep.spec import SweepSpec

SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"


@ray.remote
def trial(spec_json: str, beta: float, sweep: str | None) -> dict[str, float]:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    spec = TrainRunSpec.model_validate_json(spec_json)
    spec = spec.model_copy(update={"trainer": spec.trainer.model_copy(update={"beta": beta})})
    acts = RemoteActivations(spec, sweep) if sweep else Activations(spec)
    trainer = Trainer(spec.sae.model_copy(update={"d_in": acts.d_model}), spec.trainer)
    trainer.fit(training_stream(acts, spec.trainer.batch_size, spec.trainer.seed))
    return {"trained_tokens": trainer.tokens, "lm_tokens": 0 if sweep else acts.lm_tokens,
            "lm_seconds": 0.0 if sweep else acts.lm_seconds, "seconds": time.perf_counter() - t0}


def fresh_cache(root: Path) -> Path:
    """An empty activation cache that reuses the converted model (its conversion is not what is measured)."""
    root.mkdir(parents=True)
    (root / "models").symlink_to(default_cache_dir() / "models")
    return root


def run_arm(base: TrainRunSpec, k: int, shared: bool, work: Path, trial_cpus: float, producer_cpus: float) -> dict:
    betas = [base.trainer.beta * 2 ** (i / max(k - 1, 1) * 2 - 1) for i in range(k)]  # beta/2 .. 2*beta
    tag = f"{'shared' if shared else 'own'}-{k}"

    def spec_for(cache: Path) -> str:
        return base.model_copy(update={"activations": base.activations.model_copy(
            update={"cache_dir": cache})}).model_dump_json()

    t0 = time.perf_counter()
    producer = None
    if shared:
        spec_json = spec_for(fresh_cache(work / tag))
        producer = start_producer(TrainRunSpec.model_validate_json(spec_json), tag, cpus=producer_cpus, gpus=0,
                                  memory_mb=4096, prefetch=2, max_restarts=0)
        ray.get(producer.info.remote())  # the actor exists before trials look it up by name
        refs = [trial.options(num_cpus=trial_cpus).remote(spec_json, b, tag) for b in betas]
    else:
        refs = [trial.options(num_cpus=trial_cpus).remote(spec_for(fresh_cache(work / f"{tag}-{i}")), b, None)
                for i, b in enumerate(betas)]
    results = ray.get(refs)
    wall = time.perf_counter() - t0
    lm_tokens = ray.get(producer.stats.remote())["lm_tokens"] if shared else sum(r["lm_tokens"] for r in results)
    if producer is not None:
        ray.kill(producer)
    trained = sum(r["trained_tokens"] for r in results)
    lm = sum(r["lm_seconds"] for r in results) / k  # own LM: one trial's LM time (its whole pass), else 0
    return {"wall": wall, "lm_tokens": lm_tokens, "trained": trained, "L": lm,
            "S": sum(r["seconds"] for r in results) / k - lm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="trials per sweep")
    p.add_argument("--train-tokens", type=int, default=16384, help="activation tokens per trial (2 shards)")
    p.add_argument("--concurrent", type=int, default=2, help="trials running at once (both arms)")
    p.add_argument("--gamma", type=float, default=0.1)
    a = p.parse_args()
    base = load_spec(TrainRunSpec, SPEC, [f"activations.train_tokens={a.train_tokens}", f"trainer.gamma={a.gamma}"],
                     part_of=SweepSpec)
    anchors = a.train_tokens // base.activations.context_length * (base.activations.context_length - 2)
    steps = anchors // base.trainer.batch_size  # one pass over the training tokens, as real training does
    warm = steps // 4  # the quickstart's warm-ups (40 steps) are longer than one pass here
    base = base.model_copy(update={"trainer": base.trainer.model_copy(update={
        "steps": steps, "lr_warmup_steps": warm, "beta_warmup_steps": warm, "gamma_warmup_steps": warm})})

    cpus = os.cpu_count() or 2
    # Same slots in both arms: `concurrent` trials; the shared arm's producer takes what the quickstart gives it.
    trial_cpus = cpus / a.concurrent
    producer_cpus = 0.5
    shared_trial_cpus = (cpus - producer_cpus) / a.concurrent
    ray.init(address="local", include_dashboard=False, num_cpus=cpus, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="csc-bench-amortise-"))
    rows = []
    try:
        for k in a.k:
            for shared in (True, False):
                r = run_arm(base, k, shared, work, shared_trial_cpus if shared else trial_cpus, producer_cpus)
                print(f"K={k} {'shared producer' if shared else 'own LM'}: {r['wall']:.1f} s, "
                      f"LM {r['lm_tokens']:,} tokens for {r['trained']:,} trained", flush=True)
                rows.append((k, shared, r))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{base.model.name} layer {base.activations.layer}, {a.train_tokens:,} activation tokens and {steps} steps "
          f"x batch {base.trainer.batch_size} per trial, gamma {a.gamma}, {a.concurrent} trials at a time on "
          f"{cpus} CPUs")
    print("| K | LM tokens / trained token, shared | own LM | ratio (ideal 1/K) | wall shared | wall own LM "
          "| wall ratio own/shared | cost-model ideal K(L+S)/(L+KS) | L, S (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    by = {(k, s): r for k, s, r in rows}
    for k in a.k:
        s, o = by[(k, True)], by[(k, False)]
        fs, fo = s["lm_tokens"] / s["trained"], o["lm_tokens"] / o["trained"]
        L, S = o["L"], o["S"]
        print(f"| {k} | {fs:.3f} | {fo:.3f} | {fs / fo:.3f} (1/{k} = {1 / k:.3f}) | {s['wall']:.0f} s "
              f"| {o['wall']:.0f} s | {o['wall'] / s['wall']:.2f}x | {k * (L + S) / (L + k * S):.2f}x "
              f"| {L:.0f}, {S:.0f} |")


if __name__ == "__main__":
    main()
