"""Producer pool throughput: the LM tokens per second that N producer replicas make together, side by side in one run.

    python bench/producer_pool.py                        # embedded Gemma 3 270M, layer 12, N = 1 and 2, local Ray
    python bench/producer_pool.py --cluster              # the same on a two-node loopback cluster as well
    python bench/producer_pool.py --model tiny-gemma2    # the tiny random model: the code path in seconds

For each N: a fresh activation cache folder (the converted model reused, its conversion is not what is timed), a
pool of N replicas (csc.sweep.producer.start_pool) with one CPU each, so one torch thread each; every replica's LM
is loaded before the clock starts (and train shard 0, which the scale needs). Then one reader (RemoteActivations,
as a trial reads) asks for every training shard in order; each replica's prefetch keeps it busy with the next shards
it owns. Columns: LM tokens the pool made during the read per second of the read's wall time; the ratio to N = 1
next to its bound (the shards read over the largest share one replica makes: N when they divide evenly); and
LM busy, the replicas' summed LM seconds over the wall time (at most N).

Local Ray gets N CPUs. With --cluster, `ray start` makes a head and a worker node on 127.0.0.1 with one CPU and
one `lm_node` each (tests/test_sweep_cluster.py's way), this script runs again there with --address, and every
replica asks for an lm_node (resources.producer_custom), so N = 2 puts one replica on each node; the nodes are
stopped at the end. --address alone measures on a cluster of your own whose LM nodes offer one lm_node each.
N replicas only run side by side on N free cores: on a shared machine, other work's load shows in the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from csc.config import TrainRunSpec, default_cache_dir
from csc.spec_loader import load_spec
from csc.sweep.producer import RemoteActivations, pool_stats, start_pool
from csc.sweep.spec import SweepSpec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "sweeps" / "quickstart.yaml"


def fresh_cache(root: Path) -> Path:
    root.mkdir(parents=True)
    models = default_cache_dir() / "models"
    if models.is_dir():
        (root / "models").symlink_to(models)
    return root


def measure(base: TrainRunSpec, replicas: int, work: Path, store: str, prefetch: int, custom: dict[str, float]) -> dict:
    name = f"pool-bench-{replicas}"
    spec = base.model_copy(update={"activations": base.activations.model_copy(
        update={"cache_dir": fresh_cache(work / name)})})
    actors = start_pool(spec, name, replicas=replicas, store=store, cpus=1, gpus=0, memory_mb=4096,
                        prefetch=prefetch, max_restarts=0, custom=custom)
    try:
        # Every replica's LM loaded before the clock starts; the torch threads it runs with.
        threads = ray.get([a.__ray_call__.remote(lambda self: self._lm.submit(
            lambda: (self.acts.lm, torch.get_num_threads())[1]).result()) for a in actors])
        reader = RemoteActivations(spec, name)  # replica 0 computes train shard 0 for the scale
        before = pool_stats(actors)
        t0 = time.perf_counter()
        for i in range(reader.n_shards["train"]):
            reader.shard("train", i)
        wall = time.perf_counter() - t0
        after = pool_stats(actors)
    finally:
        for a in actors:
            ray.kill(a)
    made = after["lm_shards_computed"] - before["lm_shards_computed"]
    shares = [sum(1 for i in range(1, reader.n_shards["train"]) if i % replicas == r) for r in range(replicas)]
    return {"replicas": replicas, "threads": threads, "shards": made, "wall": wall,
            "tokens": after["lm_tokens"] - before["lm_tokens"],
            "lm_seconds": after["lm_seconds"] - before["lm_seconds"],
            "bound": sum(shares) / max(shares), "nodes": len(set(after["node_id"].split(",")))}


def run(base: TrainRunSpec, a: argparse.Namespace, work: Path) -> list[dict]:
    """Every N on local Ray (N CPUs) or, with --address, on that cluster (replicas ask for an lm_node)."""
    local = a.address is None
    ray.init(address="local" if local else a.address, num_cpus=max(a.replicas) if local else None,
             include_dashboard=False, log_to_driver=False)
    try:
        return [measure(base, n, work, a.store, a.prefetch, {} if local else {"lm_node": 1}) for n in a.replicas]
    finally:
        ray.shutdown()


def on_loopback_cluster(a: argparse.Namespace, layer: int, work: Path) -> list[dict]:
    """This script with --address on a two-node cluster made for it, in a process of its own: the one that presents
    the cluster's token (a driver keeps the token of its first Ray)."""
    sys.path.insert(0, str(ROOT))  # the test suite's loopback cluster
    from ray._private.utils import get_ray_address_file
    from tests.test_sweep_cluster import start_cluster

    address_file = Path(get_ray_address_file(None))  # `ray start --head` rewrites it: put back what was there
    recorded = address_file.read_text() if address_file.is_file() else None
    lm_node = '--resources={"lm_node": 1}'
    address, env, nodes, _ = start_cluster(work, ["--num-cpus=1", lm_node], ["--num-cpus=1", lm_node])
    try:
        args = ["--model", a.model, "--layer", str(layer), "--contexts-per-shard", str(a.contexts_per_shard),
                "--shards", str(a.shards), "--replicas", *map(str, a.replicas), "--store", a.store,
                "--prefetch", str(a.prefetch), "--address", address, "--json"]
        done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the run on the cluster failed:\n{done.stderr[-5000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for node in reversed(nodes):
            node.stop()
        if recorded is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(recorded)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded (Gemma 3 270M) or tiny-gemma2")
    p.add_argument("--layer", type=int, help="default: the quickstart's 12 (embedded), 2 (tiny-gemma2)")
    p.add_argument("--contexts-per-shard", type=int, default=8)
    p.add_argument("--shards", type=int, default=17,
                   help="training shards (the first makes the scale before the clock: 17 leaves 8 for each of 2)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--store", choices=["disk", "memory"], default="disk")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--cluster", action="store_true", help="also on a two-node loopback cluster")
    p.add_argument("--address", help="only on the Ray cluster at this address, whose nodes offer an lm_node each")
    p.add_argument("--json", action="store_true", help="print the rows as JSON, not the table")
    a = p.parse_args()
    layer = a.layer if a.layer is not None else (2 if a.model == "tiny-gemma2" else 12)
    base = load_spec(TrainRunSpec, SPEC, [f"model.name={a.model}", f"activations.layer={layer}",
                                          f"activations.contexts_per_shard={a.contexts_per_shard}"],
                     part_of=SweepSpec)
    tokens = a.shards * a.contexts_per_shard * base.activations.context_length
    base = base.model_copy(update={"activations": base.activations.model_copy(update={"train_tokens": tokens})})

    work = Path(tempfile.mkdtemp(prefix="csc-bench-pool-"))
    try:
        (work / "here").mkdir()
        rows = [("local Ray" if a.address is None else a.address, r) for r in run(base, a, work / "here")]
        if a.json:
            print(json.dumps([r for _, r in rows]))
            return
        if a.cluster:
            (work / "cluster").mkdir()
            rows += [("2-node loopback cluster", r) for r in on_loopback_cluster(a, layer, work / "cluster")]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{base.model.name} layer {layer}, {a.shards} shards of {a.contexts_per_shard} x "
          f"{base.activations.context_length} tokens ({a.shards - 1} read on the clock), store {a.store}, "
          f"prefetch {a.prefetch}, one CPU a replica, {os.cpu_count()} cores on this machine")
    print("| where | N | torch threads a replica | nodes | shards made | LM tokens | wall | LM tokens/s "
          "| ratio to N = 1 (bound) | LM busy (at most N) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    first: dict[str, float] = {}
    for where, r in rows:
        rate = r["tokens"] / r["wall"]
        first.setdefault(where, rate)
        print(f"| {where} | {r['replicas']} | {','.join(map(str, r['threads']))} | {r['nodes']} | {r['shards']} "
              f"| {r['tokens']:,} | {r['wall']:.1f} s | {rate:,.0f} | {rate / first[where]:.2f}x ({r['bound']:.2f}) "
              f"| {r['lm_seconds'] / r['wall']:.2f} |")


if __name__ == "__main__":
    main()
