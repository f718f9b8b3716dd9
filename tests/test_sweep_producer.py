"""The shared producer: one LM run per shard however many readers and replicas, prefetch, bounded memory that
evicts spent shards first, the memory store (no shard on disk, evicted shards computed again), and (as real Ray
actors) restart after a replica's process dies, identical batches for every reader, and a sweep on the memory
store."""

import dataclasses
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from pydantic import ValidationError

from csc.activations.pairing import RULES
from csc.activations.probe_labels import LETTER, SEQ
from csc.activations.source import Activations, shard_batches
from csc.config import TrainRunSpec
from csc.spec_loader import load_spec
from csc.pipeline.probing import held_out_labels
from csc.pipeline.run import splice_run, training_stream
from csc.sae.archs import build_sae
from csc.sweep import producer as producer_module
from csc.sweep.producer import ActivationProducer, RemoteActivations, _shard_bytes, pool_stats, start_pool
from csc.sweep.run import STATE_FILE, run_sweep, sweep_summary
from csc.sweep.spec import ProducerSpec, SweepSpec
from tests.conftest import sae_config, tiny_spec
from tests.test_sweep import LM_SHARDS, tiny_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_spec(cache, *extra) -> TrainRunSpec:
    return TrainRunSpec.model_validate({**tiny_spec(cache, *extra).model_dump(), "sae": {"dict_size": 64},
                                        "trainer": {"steps": 1}})


def producer(cache, memory_mb=64, prefetch=0, *extra, **kwargs) -> ActivationProducer:
    return ActivationProducer(train_spec(cache, *extra).model_dump_json(), memory_mb, prefetch, **kwargs)


def shard_files(cache) -> list:
    return list(cache.rglob("shard_*"))


def same_shard(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("acts", "tokens", "seq_id")) and \
        sorted(a.partners) == sorted(b.partners) and all(torch.equal(a.partners[r], b.partners[r]) for r in RULES)


def same_batches(got, want) -> bool:
    """Every tensor of every batch equal (a field absent in one is absent in the other)."""
    pairs = [(getattr(g, f.name), getattr(w, f.name)) for g, w in zip(got, want) for f in dataclasses.fields(g)]
    return len(got) == len(want) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in pairs)


def test_concurrent_readers_share_one_lm_run_per_shard(cache):
    p = producer(cache)
    results = []
    threads = [threading.Thread(target=lambda: results.append(p.shard("train", 1))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.stats()["lm_shards_computed"] == 1
    assert all(torch.equal(r.acts, results[0].acts) for r in results)
    assert torch.equal(results[0].acts, Activations(tiny_spec(cache)).shard("train", 1).acts)  # as stored


def test_evaluation_does_not_hold_up_shards_and_measures_every_sae_against_one_clean_run(cache):
    p = producer(cache, evaluators=2)
    gate = threading.Event()
    for _ in range(2):  # both evaluation threads busy (trials' SAEs being measured, held here)
        p._eval.submit(gate.wait, 120)
    try:
        shard = p.shard("train", 1)  # made by the LM meanwhile
    finally:
        gate.set()
    spec = train_spec(cache)
    assert same_shard(shard, Activations(spec).shard("train", 1))
    saes = [build_sae(sae_config("relu", 64, 32)).eval() for _ in range(3)]
    with ThreadPoolExecutor(3) as trials:  # measured two at a time, against the clean runs the first one makes
        got = list(trials.map(lambda sae: p.splice(sae.cfg.model_dump(), sae.state_dict()), saes))
    assert got == [splice_run(spec, sae, Activations(spec)) for sae in saes]
    st = p.stats()
    assert st["evaluations"] == 3 and st["evaluation_seconds"] > st["clean_runs_seconds"] > 0
    assert st["clean_runs_mb"] > 0


def test_prefetch_makes_the_next_shards_before_they_are_asked_for(cache):
    p = producer(cache, 64, 2, "activations.train_tokens=1024")  # 4 shards
    p.shard("train", 0)
    p._lm.submit(lambda: None).result()  # the LM thread has drained its queue
    assert p.stats()["lm_shards_computed"] == 3
    p.shard("train", 1)
    p.shard("train", 2)
    p._lm.submit(lambda: None).result()
    st = p.stats()
    assert st["memory_hits"] == 2 and st["lm_shards_computed"] == 4  # shard 3 prefetched; 4 shards in all


def test_memory_is_bounded_least_recently_used_first(cache):
    p = producer(cache, 1, 0, "activations.train_tokens=4096")  # 16 shards, 64 KiB of activations each
    shard_mb = _shard_bytes(p.shard("train", 0)) / 2**20  # acts, every rule's partners, tokens, seq ids
    for i in range(16):
        p.shard("train", i)
    st = p.stats()
    assert st["memory_mb"] <= 1 and st["memory_shards"] < 16
    assert st["memory_shards"] >= int(1 / shard_mb) - 1
    hits = st["memory_hits"]  # 1: shard 0, asked for twice
    p.shard("train", 15)
    assert p.stats()["memory_hits"] == hits + 1  # the newest shard stayed...
    p.shard("train", 0)
    assert p.stats()["memory_hits"] == hits + 1  # ...the least recently used went


def test_memory_counts_every_rules_partners(cache):
    p = producer(cache)
    sh = p.shard("train", 0)
    n, T = sh.tokens.shape
    assert sorted(sh.partners) == sorted(RULES)
    expected = sh.acts.numel() * sh.acts.element_size() + len(RULES) * n * T * 8 + n * T * 8 + n * 8
    assert p.stats()["memory_mb"] * 2**20 == expected


def test_a_bad_shard_request_fails_the_caller_only(cache):
    p = producer(cache)
    with pytest.raises(IndexError, match="train shard 2 does not exist: the spec's token budget makes 2 shards"):
        p.shard("train", 2)
    assert len(p.shard("train", 0).seq_id) == 8


def test_the_probing_set_is_made_once_and_the_shards_it_reads_are_served(cache):
    spec = TrainRunSpec.model_validate({**train_spec(cache).model_dump(), "eval": {"probe_examples_per_class": 16}})
    p = ActivationProducer(spec.model_dump_json(), 64, 0)
    labels = p.probe_labels()
    assert p.probe_labels() is labels, "made once"
    want = held_out_labels(spec, Activations(spec))
    assert torch.equal(labels.seq_id, want.seq_id) and [t.name for t in labels.tasks] == [SEQ, LETTER]
    shards = labels.shards(8)
    beyond = [i for i in shards if i >= p.acts.n_shards["eval"]]
    assert beyond, "the seq task's examples lie beyond the evaluation's one shard"
    assert torch.equal(p.shard("eval", beyond[-1]).seq_id, torch.arange(beyond[-1] * 8, (beyond[-1] + 1) * 8))
    unread = next(i for i in range(1, beyond[-1]) if i not in shards)
    with pytest.raises(IndexError, match=f"eval shard {unread} does not exist: the spec's token budget makes 1 shards, "
                                         f"and sparse probing does not read it"):
        p.shard("eval", unread)


def test_the_producer_section_takes_replicas_and_a_store():
    assert ProducerSpec().replicas == 1 and ProducerSpec().store == "disk"
    assert ProducerSpec(replicas=4, store="memory", memory_mb=0.5).memory_mb == 0.5
    for bad in ({"replicas": 0}, {"store": "tape"}, {"memory_mb": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            ProducerSpec.model_validate(bad)


def test_a_replica_serves_the_shards_it_owns_and_prefetches_its_next_ones(cache):
    p = producer(cache, 64, 2, "activations.train_tokens=2048", replica=1, replicas=2)  # 8 shards: 1, 3, 5, 7 its own
    p.shard("train", 1)
    p._lm.submit(lambda: None).result()  # the LM thread has drained its queue
    assert p.stats()["lm_shards_computed"] == 3  # shard 1, then 3 and 5 prefetched
    p.shard("train", 5)
    p.shard("train", 7)
    assert p.stats()["lm_shards_computed"] == 4 and p.stats()["memory_hits"] == 1
    with pytest.raises(ValueError, match="train shard 2 is replica 0's, not replica 1's"):
        p.shard("train", 2)
    assert same_shard(p.shard("train", 3), Activations(tiny_spec(cache)).shard("train", 3))  # as stored


def shard_mb(tmp_path) -> float:
    """What one tiny shard takes in memory."""
    return _shard_bytes(Activations(tiny_spec(tmp_path / "size")).shard("train", 0)) / 2**20


def test_the_memory_store_writes_no_shard_and_computes_evicted_shards_again(cache, tmp_path):
    extra = "activations.train_tokens=4096"  # 16 shards
    want = [Activations(tiny_spec(tmp_path / "ref", extra)).shard("train", i) for i in range(16)]
    p = producer(cache, 3.5 * shard_mb(tmp_path), 0, extra, store="memory")  # room for 3 shards
    for reader in ("early", "late"):  # a trial, then one that starts once the first has read every shard
        for i in range(16):
            assert same_shard(p.shard("train", i, reader), want[i])
    st = p.stats()
    # The late reader found the 3 shards that it alone had not read (the early reader's spent ones went first)
    # and made the other 13 again.
    assert st["memory_hits"] == 3 and st["lm_shards_recomputed"] == 13 and st["lm_shards_computed"] == 16 + 13
    assert st["memory_shards"] == 3 and st["evicted"] == 13 + 13
    assert not shard_files(cache), "the memory store writes no shard"


@pytest.mark.parametrize("slow_reader", ["running", "released", "expired"])
def test_spent_shards_go_first_while_every_reader_that_has_not_read_them_runs(cache, tmp_path, monkeypatch,
                                                                              slow_reader):
    """Room for 3 shards: 0, 1 and 2 read by a fast reader, 2 by a slow one too. Making shard 3 evicts 2 (spent)
    while the slow reader runs, so 0 stays for it; once it is released or its lease has run out, 0 (the least
    recently used)."""
    p = producer(cache, 3.5 * shard_mb(tmp_path), 0, "activations.train_tokens=2048")
    for i in range(3):
        p.shard("train", i, "fast")
    p.shard("train", 2, "slow")
    if slow_reader == "released":
        p.release("slow")
    if slow_reader == "expired":
        monkeypatch.setattr(producer_module, "READER_LEASE_S", 0.0)
    p.shard("train", 3, "fast")
    hits = p.stats()["memory_hits"]
    p.shard("train", 0)
    assert p.stats()["memory_hits"] == hits + (slow_reader == "running")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="csc-test")
    yield
    ray.shutdown()


@pytest.fixture
def pool(local_ray):
    """start_pool(spec, sweep, replicas, **options) for the test, half a CPU a replica; its replicas are killed
    after it, so that every test has the module's 2 CPUs."""
    started = []

    def start(spec, sweep, replicas=1, **options):
        actors = start_pool(spec, sweep, replicas=replicas, **{
            "cpus": 0.5, "gpus": 0, "memory_mb": 64, "prefetch": 0, "max_restarts": 0, **options})
        started.extend(actors)
        return actors
    yield start
    for actor in started:
        ray.kill(actor)


def test_actor_restarts_after_its_process_dies_and_readers_carry_on(cache, pool):
    spec = train_spec(cache)
    [actor] = pool(spec, "restart-test", prefetch=1, max_restarts=2)
    reader = RemoteActivations(spec, "restart-test")
    before = reader.shard("train", 0)
    reader.shard("train", 1)
    reader.shard("eval", 0)  # every shard is on disk before the kill; the reader's prefetch is eval 0

    def pid():
        return ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))

    old = pid()
    ray.kill(actor, no_restart=False)  # the process dies as it would on an OOM kill
    deadline = time.monotonic() + 60
    while pid() == old:  # calls made while it restarts are retried, not failed
        assert time.monotonic() < deadline, "the producer was not restarted"
        time.sleep(0.2)
    after = reader.shard("train", 0)  # the same reader, on the restarted actor
    assert torch.equal(before.acts, after.acts)
    stats = ray.get(actor.stats.remote())
    assert stats["lm_shards_computed"] == 0, "the restarted producer reads the disk cache"


def test_one_producer_from_the_base_spec_serves_trials_of_every_pairing_rule(cache, pool):
    base = train_spec(cache)
    [actor] = pool(base, "pairing-test")
    runs = {}
    for rule in RULES:
        trial = base.model_copy(update={"activations": base.activations.model_copy(update={"pairing": rule})})
        runs[rule] = list(shard_batches(RemoteActivations(trial, "pairing-test"), "train", 48, seed=1))
        local = list(Activations(trial).batches("train", 48, seed=1))  # the same cache, read in this process
        assert len(runs[rule]) == len(local) == 2 * 8 * 30 // 48
        for got, want in zip(runs[rule], local):
            assert torch.equal(got.partners, want.partners) and torch.equal(got.anchors, want.anchors), rule
    assert ray.get(actor.stats.remote())["lm_shards_computed"] == 2, "every rule from the same two shards"
    assert not torch.equal(runs["previous"][0].partners, runs["random"][0].partners)
    assert all(torch.equal(b[0].anchors, runs["previous"][0].anchors) for b in runs.values())


@pytest.mark.parametrize("store", ["disk", "memory"])
def test_two_replicas_make_each_shard_once_and_every_reader_gets_the_same_batches(tmp_path, cache, pool, store):
    extra = ("activations.train_tokens=2048", "activations.eval_tokens=512")  # 8 train shards, 2 eval shards
    spec, ref = train_spec(cache, *extra), train_spec(tmp_path / "ref", *extra)
    # Room for 2.5 shards a replica: the readers' two passes evict and come back.
    actors = pool(spec, f"pool-{store}", replicas=2, store=store, memory_mb=2.5 * shard_mb(tmp_path), prefetch=1)
    n = 2 * 8 * 8 * 30 // 48  # two passes of batch 48
    want = list(itertools.islice(training_stream(Activations(ref), 48, 0), n))
    for _ in range(2):  # a trial, then one that starts when the first is done
        reader = RemoteActivations(spec, f"pool-{store}")
        assert same_batches(list(itertools.islice(training_stream(reader, 48, 0), n)), want)
        ray.get(reader.release())
    sae = build_sae(sae_config("relu", 64, 32))
    # Replica 0 splices; the held-out contexts it reads include eval shard 1, replica 1's.
    assert reader.splice(sae) == pytest.approx(splice_run(ref, sae, Activations(ref)), rel=1e-6)

    st = pool_stats(actors)
    each = st["per_replica"]
    assert st["replicas"] == 2 and st["lm_shards_computed"] == sum(r["lm_shards_computed"] for r in each)
    assert [r["lm_shards_computed"] - r["lm_shards_recomputed"] for r in each] == [5, 5], "4 train + 1 eval each, once"
    if store == "disk":
        assert st["lm_shards_recomputed"] == 0 and st["evicted"] > 0, "evicted shards come back from the disk"
        assert len(shard_files(cache)) == 2 * 10  # each with its checksum
    else:
        assert st["lm_shards_recomputed"] > 0 and not shard_files(cache)


def test_a_killed_replica_is_restarted_and_nothing_is_lost(tmp_path, cache, pool):
    extra = "activations.train_tokens=4096"  # 16 train shards, 8 a replica
    spec = train_spec(cache, extra)
    want = Activations(train_spec(tmp_path / "ref", extra))
    actors = pool(spec, "kill-test", replicas=2, store="memory", prefetch=1, max_restarts=2)
    reader = RemoteActivations(spec, "kill-test")
    got = [reader.shard("train", i) for i in range(5)]  # the reader has asked for shard 5, replica 1's
    ray.kill(actors[1], no_restart=False)  # its process dies as it would on an OOM kill
    got += [reader.shard("train", i) for i in range(5, 16)]  # calls made while it restarts are retried
    assert all(same_shard(g, want.shard("train", i)) for i, g in enumerate(got))
    survivor, restarted = ray.get([a.stats.remote() for a in actors])
    assert restarted["restarted"] == 1 and survivor["restarted"] == 0
    assert survivor["lm_shards_computed"] == 8 and survivor["lm_shards_recomputed"] == 0, "its 8 shards, once"
    assert restarted["lm_shards_computed"] <= 8 and not shard_files(cache)


@pytest.mark.slow  # a minute on 2 cores: Tune, two replicas and two trials
def test_a_sweep_on_the_memory_store_keeps_no_shard_on_disk_and_counts_what_it_made_again(
        tmp_path, cache, local_ray, monkeypatch):
    """Two replicas with room for about 2 tiny shards each, for a sweep that reads 8 (LM_SHARDS) over and over."""
    monkeypatch.chdir(tmp_path)
    mb = 2.2 * shard_mb(tmp_path)
    spec = load_spec(SweepSpec, tiny_sweep(tmp_path, cache, num_samples=2, scheduler=None,
                                           producer={"replicas": 2, "store": "memory", "memory_mb": mb}))
    result = run_sweep(spec, "memory", tmp_path / "runs", verbose=0, tracked=False)  # its replicas end with it
    assert [r["outcome"] for r in result.rows] == ["finished", "finished"]
    assert not shard_files(cache), "the sweep's shards lived in the replicas' memory only"
    st = json.loads((result.sweep_dir / STATE_FILE).read_text())["producer"]
    assert st == json.loads(json.dumps(result.producer)) and st["replicas"] == 2
    assert st["lm_shards_recomputed"] > 0
    assert st["lm_shards_computed"] == LM_SHARDS + st["lm_shards_recomputed"], "each shard made once, then again"
    trained = sum(r["metrics"]["tokens"] for r in result.rows)
    summary = sweep_summary(result.sweep_dir)
    assert f"producer (2 replicas): the LM made {st['lm_shards_computed']} shards" in summary
    assert f"{st['lm_shards_recomputed']} of them again, after their eviction" in summary
    assert f"; {st['lm_tokens'] / trained:.3f} LM tokens per trained token" in summary
