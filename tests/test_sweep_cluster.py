"""A sweep on a real two-node Ray cluster on 127.0.0.1: `ray start --head` and `ray start --address` as
separate processes, one node advertising the custom resource that stands for the GPU node. The producer
must run there and the trials on the other node; results and checkpoints land in the sweep's storage
path; the sweep logs over HTTP to a real `mlflow server`. And a producer pool of two replicas on two such
nodes, one on each, each shard made once. Every process the test starts is stopped by its process group,
by PID."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from csc.activations.source import Activations
from csc.sweep.ui import MlflowServer, _group_alive, free_port
from tests.test_sweep import LM_SHARDS, child_runs, tiny_sweep
from tests.test_sweep_producer import train_spec

RAY = str(Path(sys.executable).with_name("ray"))


class RayNode:
    """`ray start --block ...` in a session of its own, so that stopping it ends exactly its processes."""

    def __init__(self, log: Path, env: dict[str, str], *args: str):
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self) -> None:
        # A head node takes ~33 s to end on SIGTERM (measured: Ray's graceful shutdown of its processes), and
        # the test keeps nothing of it: a few seconds' grace, then SIGKILL.
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            if not _group_alive(self.proc.pid):
                break
            os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (self.proc.poll() is None or _group_alive(self.proc.pid)):
                time.sleep(0.2)
        assert not _group_alive(self.proc.pid), f"processes of {self.log.name} outlived the test"


NODES = """
import json, ray
ray.init(address="{address}", include_dashboard=False, configure_logging=False, logging_level="ERROR")
print(json.dumps({{n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}))
"""


def wait_for_nodes(address: str, n: int, nodes: list[RayNode], env: dict[str, str],
                   timeout: float = 120) -> dict[str, dict]:
    """The cluster's alive nodes (id: resources), once there are n of them; asked by a client process
    of its own, as the sweep's driver will be."""
    deadline = time.monotonic() + timeout
    while True:
        for node in nodes:
            assert node.proc.poll() is None, f"ray start exited early:\n{node.log.read_text()[-3000:]}"
        got = subprocess.run([sys.executable, "-c", NODES.format(address=address)], env=env,
                             capture_output=True, text=True, timeout=60)
        if got.returncode == 0:
            alive = json.loads(got.stdout.strip().splitlines()[-1])
            if len(alive) >= n:
                return alive
        assert time.monotonic() < deadline, f"the cluster did not reach {n} nodes:\n{got.stderr[-3000:]}"
        time.sleep(1)


def start_cluster(tmp_path: Path, head: list[str], worker: list[str]) \
        -> tuple[str, dict[str, str], list[RayNode], dict[str, dict]]:
    """A head node and a worker node on 127.0.0.1 (`ray start` options of each): the address, the environment
    that admits a process to it, the nodes (stop them) and the alive nodes' resources by node id."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # A token of the test's own, made as the README says (in a home of the test's): the cluster admits only
    # processes that present it (Ray's token auth).
    made = subprocess.run([RAY, "get-auth-token", "--generate"], env={**os.environ, "HOME": str(tmp_path / "home")},
                          capture_output=True, text=True, timeout=60, check=True)
    assert (tmp_path / "home" / ".ray" / "auth_token").read_text().strip() == made.stdout.strip() != ""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": made.stdout.strip()}
    common = ["--node-ip-address=127.0.0.1", "--min-worker-port=0", "--max-worker-port=0", "--num-gpus=0"]
    nodes = [RayNode(tmp_path / "head.log", env, "--head", f"--port={port}", "--include-dashboard=false", *head,
                     *common)]
    try:
        wait_for_nodes(address, 1, nodes, env)
        nodes.append(RayNode(tmp_path / "worker.log", env, f"--address={address}", *worker, *common))
        alive = wait_for_nodes(address, 2, nodes, env)
    except BaseException:
        for node in reversed(nodes):
            node.stop()
        raise
    return address, env, nodes, alive


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for this module's tests (starting one costs seconds of each test): a head with 2 CPUs and a
    worker with 1, which alone offers lm_node (where a sweep pins its producer); both offer pool_node once (where a
    pool's replicas go, one on each). Yields the address, the environment that admits a process, and the alive
    nodes' resources by node id. `ray start --head` records its address in /tmp/ray/ray_current_cluster for later
    `ray.init()`s, and stopping the nodes leaves it behind, naming a dead cluster: what was there is put back."""
    from ray._private.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.is_file() else None
    address, env, nodes, alive = start_cluster(tmp_path_factory.mktemp("cluster"),
                                               ["--num-cpus=2", '--resources={"pool_node": 1}'],
                                               ["--num-cpus=1", '--resources={"lm_node": 1, "pool_node": 1}'])
    try:
        yield address, env, alive
    finally:
        for node in reversed(nodes):
            node.stop()
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(before)


@pytest.mark.slow
def test_sweep_on_a_two_node_cluster_with_an_mlflow_server(tmp_path, cache, cluster):
    address, env, alive = cluster
    lm_node = next(i for i, resources in alive.items() if resources.get("lm_node"))
    other = next(i for i in alive if i != lm_node)

    # A driver without the cluster's token: one line that says so and what to set, in seconds, nothing started
    spec = tiny_sweep(tmp_path, cache)
    sent = "the token this driver sent (RAY_AUTH_TOKEN, else ~/.ray/auth_token) is not the cluster's"
    for unset, extra, why in [("RAY_AUTH_TOKEN", {"RAY_AUTH_TOKEN": "0" * 64}, sent),
                              ("RAY_AUTH_MODE", {}, "this driver sent none: RAY_AUTH_MODE is not 'token' here")]:
        wrong = {**{k: v for k, v in env.items() if k != unset}, **extra}
        t0 = time.monotonic()
        refused = subprocess.run([sys.executable, "-m", "csc.cli", "sweep", str(spec), "--address", address,
                                  "--out", str(tmp_path / "refused")], cwd=tmp_path, env=wrong,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and time.monotonic() - t0 < 30, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines() == [
            f"csc: error: --address {address}: the Ray cluster refused this driver's authentication token "
            f"({why}); export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the token every node was started with> "
            f"(`ray get-auth-token` on the head node prints it)"], refused.stderr
        assert not (tmp_path / "refused").exists() and not (tmp_path / "mlflow.db").exists()

    with MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "server-artifacts")) as server:
        spec = tiny_sweep(tmp_path, cache, num_samples=2, max_concurrent=2,
                          resources={"trial_cpus": 1, "producer_cpus": 1, "producer_custom": {"lm_node": 1}},
                          tracking={"uri": server.url})
        out = tmp_path / "shared" / "runs"  # one folder both nodes see, as NFS would be on a real cluster
        done = subprocess.run([sys.executable, "-m", "csc.cli", "sweep", str(spec), "--out", str(out),
                               "--address", address, "--verbose", "0"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
        state = json.loads((out / "tiny" / "csc_sweep.json").read_text())
        client = MlflowClient(server.url)
        runs = child_runs(client, state["experiment_id"], state["parent_run_id"])
        parent = client.get_run(state["parent_run_id"])
        parent_artifacts = {a.path for a in client.list_artifacts(state["parent_run_id"])}

    assert state["producer"]["node_id"] == lm_node, "the producer runs on the node with the lm_node resource"
    assert state["producer"]["lm_shards_computed"] == LM_SHARDS
    assert parent.info.status == "FINISHED" and parent.data.tags["csc.producer_node"] == lm_node
    assert sorted(runs) == ["trial_01", "trial_02"]
    for name, run in runs.items():
        assert run.info.status in ("FINISHED", "KILLED")
        assert run.data.tags["csc.node_id"] == other, f"{name} trained on the node without lm_node"
        trial_dir = out / "tiny" / name
        results = [json.loads(x) for x in (trial_dir / "result.json").read_text().splitlines()]
        assert {r["node_id"] for r in results} == {other}
        assert any(p.name.startswith("checkpoint_") for p in trial_dir.iterdir()), f"{name}: no checkpoint"
    assert {"trials.csv", "pareto.png"} <= parent_artifacts


POOL = """
import hashlib, json, sys, ray
from csc.config import TrainRunSpec
from csc.sweep.producer import RemoteActivations, pool_stats, start_pool
ray.init(address=sys.argv[1], include_dashboard=False, configure_logging=False, logging_level="ERROR")
spec = TrainRunSpec.model_validate_json(open(sys.argv[2]).read())
actors = start_pool(spec, "cluster-pool", replicas=2, store="memory", cpus=1, gpus=0, memory_mb=64, prefetch=1,
                    max_restarts=0, custom={"pool_node": 1})
reader = RemoteActivations(spec, "cluster-pool")
sums = [hashlib.sha256(reader.shard("train", i).acts.numpy().tobytes()).hexdigest() for i in range(8)]
print(json.dumps({"stats": pool_stats(actors), "sums": sums}))
"""


@pytest.mark.slow
def test_a_pool_of_two_replicas_takes_one_node_each_and_makes_each_shard_once(tmp_path, cache, cluster):
    """Both nodes offer pool_node once: a replica on each, shards 0, 2, ... on one and 1, 3, ... on the other, as
    the LM makes them in this process."""
    address, env, alive = cluster
    spec = train_spec(cache, "activations.train_tokens=2048")  # 8 train shards
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    done = subprocess.run([sys.executable, "-c", POOL, address, str(tmp_path / "spec.json")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    each = got["stats"]["per_replica"]
    assert sorted(r["node_id"] for r in each) == sorted(alive), "one replica on each pool_node"
    assert [r["lm_shards_computed"] for r in each] == [4, 4] and got["stats"]["lm_shards_recomputed"] == 0
    ref = Activations(train_spec(tmp_path / "ref", "activations.train_tokens=2048"))
    assert got["sums"] == [hashlib.sha256(ref.shard("train", i).acts.numpy().tobytes()).hexdigest() for i in range(8)]
