"""The shared producer: one LM run per shard however many readers, prefetch, bounded memory, and (as a
real Ray actor) restart after its process dies."""

import threading
import time

import pytest
import ray
import torch

from csc.activations.pairing import RULES
from csc.activations.probe_labels import LETTER, SEQ
from csc.activations.source import Activations, shard_batches
from csc.config import TrainRunSpec
from csc.pipeline.probing import held_out_labels
from csc.sweep.producer import ActivationProducer, RemoteActivations, _shard_bytes, start_producer
from tests.conftest import tiny_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_spec(cache, *extra) -> TrainRunSpec:
    return TrainRunSpec.model_validate({**tiny_spec(cache, *extra).model_dump(), "sae": {"dict_size": 64},
                                        "trainer": {"steps": 1}})


def producer(cache, memory_mb=64, prefetch=0, *extra) -> ActivationProducer:
    return ActivationProducer(train_spec(cache, *extra).model_dump_json(), memory_mb, prefetch)


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


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="csc-test")
    yield
    ray.shutdown()


def test_actor_restarts_after_its_process_dies_and_readers_carry_on(cache, local_ray):
    spec = train_spec(cache)
    actor = start_producer(spec, "restart-test", cpus=0.5, gpus=0, memory_mb=64, prefetch=1, max_restarts=2)
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


def test_one_producer_from_the_base_spec_serves_trials_of_every_pairing_rule(cache, local_ray):
    base = train_spec(cache)
    actor = start_producer(base, "pairing-test", cpus=0.5, gpus=0, memory_mb=64, prefetch=0, max_restarts=0)
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
