"""The shared activation producer: a pool of Ray actors (replicas) that own the LM and serve shards to every trial.

Shards are shared out by index: of `replicas` replicas, replica r owns the shards i with i % replicas == r, of
every split, and only the owner loads or computes a shard, so each shard is still made once per sweep however many
replicas and readers there are. A shard comes from its owner's memory, else (store `disk`) from the disk cache,
else from the LM, and the LM never runs twice at once for one shard: requests for a shard being made wait for it.
After serving shard i a replica prefetches the next ones it owns (i + replicas, ...), since every trial reads in order.

What is made once is replica 0's: the normalisation scale (from train shard 0, which it owns), the sparse-probing
set (the tokenizer's one job), feature absorption's LM part (its prompts' activations and the LM's letter probe),
and the CE/KL evaluation's runs without an SAE (csc.pipeline.evaluate.CleanRuns). Replica 0 also measures each
trial's SAE by CE/KL and makes its dashboard's logit tables and token strings. The shards that this work reads and
another replica owns come from their owner. A replica's shard production runs on one thread (`lm`) and the
evaluation on others (`eval`, `evaluators` of them: trials measured at once), so measuring a trial's SAE does not
hold up the shards the other trials wait for; the threads share the model, whose hooks and skipped layers are per
thread (csc.activations.capture). Besides the spec's shards, the pool serves the held-out shards that the probing
set reads.

Memory: each replica holds at most `memory_mb` of shards. Readers (trials) name themselves in their requests; a
shard that every live reader has asked for in its current pass is spent. When the bound is reached, spent shards
go first, least recently used first, then the least recently used of the rest; memory that no reader needs yet is
not freed early, so a trial that starts late still finds what fits. The store decides what an evicted shard costs:
`disk` reads it back from the cache; `memory` never writes a shard to disk (only the scale's manifest) and runs
the LM again (lm_shards_recomputed), so a sweep's token budget is bounded by time rather than disk.

A replica whose process dies is restarted by Ray, and the calls in flight are retried on it: the shards it had
written are read back (store `disk`) or computed again (store `memory`); nothing is lost, and the other replicas
compute nothing twice. Counters are those of each replica's current process.

Trials use `RemoteActivations`, which looks like `csc.activations.source.Activations` to the training loop, asks
each shard of its owner, and asks for the following shard while the trial trains on the current one.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
import torch

from csc.activations.cache import ShardCache
from csc.activations.probe_labels import ProbeLabels
from csc.activations.source import Activations, Shard, Split
from csc.config import TrainRunSpec
from csc.pipeline.absorption import AbsorptionSet, absorption_set
from csc.pipeline.dashboard import LmTables, lm_tables
from csc.pipeline.probing import held_out_labels
from csc.pipeline.evaluate import CleanRuns
from csc.pipeline.run import clean_runs_of, splice_run
from csc.sae.archs import build_sae
from csc.sae.config import parse_sae_config
from csc.sae.model import SparseAutoencoder

NAMESPACE = "csc"

Store = Literal["disk", "memory"]

READER_LEASE_S = 600.0
"""A reader not heard from for this long no longer keeps shards it has not read yet from being spent: a trial
killed without releasing its reader (ASHA's stop, a dead worker) must not steer eviction for ever."""


def producer_name(sweep: str, replica: int = 0) -> str:
    """The Ray name of a sweep's replica (`#` cannot occur in a sweep name, so names never collide)."""
    return f"csc-producer-{sweep}" + (f"#{replica}" if replica else "")


def _shard_bytes(sh: Shard) -> int:
    """What a shard holds in memory: activations, every pairing rule's partners, tokens and sequence ids."""
    return sum(t.numel() * t.element_size() for t in (sh.acts, *sh.partners.values(), sh.tokens, sh.seq_id))


class _NoShardFiles(ShardCache):
    """The memory store's cache folder: the manifest (the scale) as with the disk store, never a shard."""

    def __init__(self, cache: ShardCache):
        super().__init__(cache.dir.parents[1], cache.fields)

    def load(self, i: int) -> None:
        return None

    def store(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        pass


class _ReplicaActivations(Activations):
    """A replica's `Activations`: `make` loads or computes a shard (Activations.shard); `shard`, what the LM work
    made here reads (the scale, CE/KL splicing), goes through the pool, so that work computes nothing twice."""

    def __init__(self, spec: TrainRunSpec, store: Store, read: Callable[[Split, int], Shard]):
        super().__init__(spec)
        if store == "memory":
            self.caches = {split: _NoShardFiles(cache) for split, cache in self.caches.items()}
        self._read = read

    def make(self, split: Split, i: int) -> Shard:
        return super().shard(split, i)

    def shard(self, split: Split, i: int) -> Shard:
        return self._read(split, i)


@dataclass
class _Reader:
    seen: float
    """time.monotonic() of its last request."""
    read: dict[str, set[int]] = field(default_factory=dict)
    """Per split, the shards it asked for in its current pass over the split."""


class ActivationProducer:
    """One replica of the pool, run as a Ray actor (see `start_pool`); the spec's sae/trainer parts are not used.

    `sweep` names the pool (how replicas find each other); replicas other than 0 and replica 0's reads of
    shards it does not own need Ray."""

    def __init__(self, spec_json: str, memory_mb: float, prefetch: int, store: Store = "disk", replica: int = 0,
                 replicas: int = 1, sweep: str = "", evaluators: int = 1):
        self.spec = TrainRunSpec.model_validate_json(spec_json)
        self.replica, self.replicas, self.sweep = replica, replicas, sweep
        self.acts = _ReplicaActivations(self.spec, store, self._read)
        self.memory_bytes = memory_mb * 2**20
        self.prefetch = prefetch
        self._lm = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lm")
        self._lm_thread = self._lm.submit(threading.current_thread).result()
        self._eval = ThreadPoolExecutor(max_workers=evaluators, thread_name_prefix="eval")
        self._clean_lock = threading.Lock()  # the first evaluation makes the clean runs; the others wait for them
        self._lock = threading.RLock()  # re-entered when a future is already done as its callback is added
        self._memory: OrderedDict[tuple[Split, int], Shard] = OrderedDict()
        self._held = 0
        self._pending: dict[tuple[Split, int], Future] = {}
        self._made: set[tuple[Split, int]] = set()  # every shard this process has loaded or computed
        self._readers: dict[str, _Reader] = {}
        self._handles: dict[int, Any] = {}  # the other replicas' actor handles, by replica
        self._probing: list[int] | None = None
        self._once: dict[str, Future] = {}  # what is made once for every trial, by name
        self.counts = {"requests": 0, "memory_hits": 0, "waited_on_pending": 0, "evaluations": 0,
                       "evaluation_seconds": 0.0, "clean_runs_seconds": 0.0, "lm_shards_recomputed": 0, "evicted": 0}
        self._clean: CleanRuns | None = None  # made by the first evaluation
        self._restarted = _restarted_actor()

    def info(self) -> dict[str, Any]:
        """What readers need to know of the pool; every replica answers with replica 0's scale."""
        scale = self._lm.submit(lambda: self.acts.scale).result() if self.replica == 0 else \
            ray.get(self._replica(0).info.remote())["scale"]
        return {"d_model": self.acts.d_model, "n_shards": dict(self.acts.n_shards), "replicas": self.replicas,
                "scale": scale}

    def probe_labels(self) -> ProbeLabels:
        """The sparse-probing set (csc.pipeline.probing.held_out_labels), made once; its error, if it has one,
        again on every call."""
        return self._made_once("probe_labels", held_out_labels)

    def absorption(self) -> AbsorptionSet:
        """Feature absorption's LM part (csc.pipeline.absorption.absorption_set, with the sweep's eval settings),
        made once; its error, if it has one, again on every call."""
        return self._made_once("absorption", absorption_set)

    def _made_once(self, name: str, make: Callable[[TrainRunSpec, Activations], Any]) -> Any:
        """make(spec, acts) on the LM's thread, the first time `name` is asked for; its result (or its error) after."""
        with self._lock:
            if name not in self._once:
                self._once[name] = self._lm.submit(make, self.spec, self.acts)
        return self._once[name].result()

    def probing_shards(self) -> list[int]:
        """The held-out shards sparse probing reads (from replica 0's probing set)."""
        if self._probing is None:
            self._probing = self.probe_labels().shards(self.spec.activations.contexts_per_shard) \
                if self.replica == 0 else ray.get(self._replica(0).probing_shards.remote())
        return self._probing

    def shard(self, split: Split, i: int, reader: str | None = None) -> Shard:
        """Shard i of `split`, which this replica owns; `reader` (a trial's name) steers eviction (module docstring)."""
        if i % self.replicas != self.replica:
            raise ValueError(f"{split} shard {i} is replica {i % self.replicas}'s, not replica {self.replica}'s "
                             f"(of {self.replicas})")
        # Beyond the spec's shards only the held-out ones that probing reads: any other index is a bug.
        if not (0 <= i < self.acts.n_shards[split] or split == "eval" and i in self.probing_shards()):
            raise IndexError(f"{split} shard {i} does not exist: the spec's token budget makes "
                             f"{self.acts.n_shards[split]} shards"
                             + (", and sparse probing does not read it" if split == "eval" else ""))
        key = (split, i)
        with self._lock:
            self.counts["requests"] += 1
            if reader is not None:
                self._note(reader, key)
            if key in self._memory:
                self.counts["memory_hits"] += 1
                self._memory.move_to_end(key)
                hit = self._memory[key]
            else:
                hit = None
                if key in self._pending:
                    self.counts["waited_on_pending"] += 1
                fut = self._submit(key)
        for j in range(i + self.replicas, i + self.replicas * self.prefetch + 1, self.replicas):
            if j < self.acts.n_shards[split]:
                with self._lock:
                    if (split, j) not in self._memory:
                        self._submit((split, j))
        return hit if hit is not None else fut.result()

    def release(self, reader: str) -> None:
        """The reader is done: what it has not read no longer needs to stay."""
        with self._lock:
            self._readers.pop(reader, None)

    def _note(self, reader: str, key: tuple[Split, int]) -> None:
        """Record a reader's request (caller holds the lock)."""
        r = self._readers.setdefault(reader, _Reader(time.monotonic()))
        r.seen = time.monotonic()
        read = r.read.setdefault(key[0], set())
        if key[1] in read:  # asked again: another pass over the split, whose shards it will want again
            read.clear()
        read.add(key[1])

    def _read(self, split: Split, i: int) -> Shard:
        """A shard that the work made here reads: its owner's; or this replica's own, made right here on the LM
        thread (a request queued behind this work then finds it in memory), or asked of the LM thread from the
        evaluation's."""
        if i % self.replicas != self.replica:
            return ray.get(self._replica(i % self.replicas).shard.remote(split, i))
        if threading.current_thread() is self._lm_thread:
            return self._make((split, i))
        return self.shard(split, i)

    def _replica(self, r: int):
        if r not in self._handles:
            self._handles[r] = ray.get_actor(producer_name(self.sweep, r), namespace=NAMESPACE)
        return self._handles[r]

    def _submit(self, key: tuple[Split, int]) -> Future:
        """The one future that makes shard `key` (caller holds the lock)."""
        if key in self._pending:
            return self._pending[key]
        fut = self._lm.submit(self._make, key)
        self._pending[key] = fut
        fut.add_done_callback(lambda f, key=key: self._done(key, f))  # may run here and then, if it is done
        return fut

    def _done(self, key: tuple[Split, int], fut: Future) -> None:
        with self._lock:
            if self._pending.get(key) is fut:
                del self._pending[key]

    def _make(self, key: tuple[Split, int]) -> Shard:
        """Load or compute shard `key` and keep it in memory (on the LM thread)."""
        with self._lock:
            if key in self._memory:  # the LM work made it while this call waited in the queue
                return self._memory[key]
        computed = self.acts.lm_shards_computed
        sh = self.acts.make(*key)
        with self._lock:
            if self.acts.lm_shards_computed > computed and key in self._made:
                self.counts["lm_shards_recomputed"] += 1
            self._made.add(key)
            self._memory[key] = sh
            self._held += _shard_bytes(sh)
            self._evict()
        return sh

    def _evict(self) -> None:
        """Bring memory under its bound, spent shards first (caller holds the lock); one shard always stays."""
        now = time.monotonic()
        for name in [n for n, r in self._readers.items() if now - r.seen > READER_LEASE_S]:
            del self._readers[name]
        while self._held > self.memory_bytes and len(self._memory) > 1:
            spent = (k for k in self._memory if all(k[1] in r.read.get(k[0], ()) for r in self._readers.values()))
            key = next(spent, next(iter(self._memory)))
            self._held -= _shard_bytes(self._memory.pop(key))
            self.counts["evicted"] += 1

    def splice(self, sae_cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, float]:
        """CE/KL on held-out contexts with a trial's SAE spliced into the LM, on an evaluation thread, against the
        runs without an SAE that the first call makes."""
        sae = build_sae(parse_sae_config(sae_cfg)).load_tensors(state, "a trial's SAE").eval()
        with self._lock:  # trials call in parallel (max_concurrency)
            self.counts["evaluations"] += 1
        return self._eval.submit(self._timed, "evaluation_seconds", self._splice, sae).result()

    def _splice(self, sae: SparseAutoencoder) -> dict[str, float]:
        with self._clean_lock:
            if self._clean is None:
                self._clean = self._timed("clean_runs_seconds", clean_runs_of, self.spec, self.acts)
        return splice_run(self.spec, sae, self.acts, self._clean)

    def _timed(self, counter: str, fn: Callable[..., Any], *args) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.counts[counter] += time.perf_counter() - t0

    def logit_tables(self, directions: torch.Tensor, token_ids: list[int]) -> LmTables:
        """A trial's dashboard: the logit lens of its latents' decoder directions and the text of its tokens."""
        return self._eval.submit(lambda: lm_tables(self.acts.lm, directions, token_ids)).result()

    def stats(self) -> dict[str, float | str]:
        """This replica's counters, since its process started:
            requests              calls of `shard`: readers' requests (their look-ahead ones too) and replica 0's
                                  reads for its LM work
            memory_hits           those answered from memory
            waited_on_pending     those that found their shard being made and waited for it
            evaluations           CE/KL evaluations of a trial's SAE
            evaluation_seconds    the seconds they took on the evaluation threads (summed over the threads),
                                  clean_runs_seconds among them
            clean_runs_seconds    the seconds the runs without an SAE took (once)
            clean_runs_mb         the memory those runs hold (csc.pipeline.evaluate.CleanRuns)
            lm_shards_computed    LM runs, one per shard made (the rest were read from the disk cache)
            lm_shards_recomputed  those of them for a shard this process had made before (evicted, store memory)
            lm_tokens, lm_seconds tokens the LM forwarded for those shards, and the seconds it took
            evicted               shards dropped from memory to keep it under memory_mb
            memory_shards, memory_mb   what memory holds now
            restarted             1 when Ray restarted this replica after its process died
            node_id               the Ray node it runs on"""
        with self._lock:
            # The Ray node it runs on; none when used in-process (asking would start a local Ray).
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
            return {**self.counts, "node_id": node,
                    "lm_shards_computed": self.acts.lm_shards_computed,
                    "lm_tokens": self.acts.lm_tokens, "lm_seconds": self.acts.lm_seconds,
                    "memory_shards": len(self._memory), "memory_mb": self._held / 2**20,
                    "clean_runs_mb": self._clean.nbytes / 2**20 if self._clean is not None else 0.0,
                    "restarted": int(self._restarted)}


def _restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray restarted; False in-process."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # Ray's own property reads its deprecated `actor_id`
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def start_producer(spec: TrainRunSpec, sweep: str, *, cpus: float, gpus: float, memory_mb: float, prefetch: int,
                   max_restarts: int, custom: dict[str, float] | None = None, store: Store = "disk",
                   replica: int = 0, replicas: int = 1, evaluators: int = 1):
    """Create replica `replica` of the sweep's pool of `replicas` (or attach to a live one of the same name); one
    replica alone is the whole pool. `evaluators`: the evaluation threads of replica 0 (ProducerSpec.evaluators)."""
    actor_cls = ray.remote(ActivationProducer)
    return actor_cls.options(
        name=producer_name(sweep, replica), namespace=NAMESPACE, get_if_exists=True, num_cpus=cpus, num_gpus=gpus,
        resources=custom or None,
        max_restarts=max_restarts, max_task_retries=-1,  # calls in flight when it dies are retried on the restart
        max_concurrency=16,  # trials wait on shards in parallel; shard production is serialised inside
    ).remote(spec.model_dump_json(), memory_mb, prefetch, store, replica, replicas, sweep, evaluators)


def start_pool(spec: TrainRunSpec, sweep: str, *, replicas: int, **kwargs) -> list:
    """Every replica of the sweep's pool (see start_producer for the rest), replica 0 first; each takes the
    resources given (a custom resource that one node offers once pins one replica per such node)."""
    return [start_producer(spec, sweep, replica=r, replicas=replicas, **kwargs) for r in range(replicas)]


def pool_stats(actors: list) -> dict[str, Any]:
    """The pool's counters (ActivationProducer.stats): every number summed over the replicas, node_id their nodes
    (replica order, comma-separated), replicas their number, per_replica each replica's own."""
    each = ray.get([a.stats.remote() for a in actors])
    total: dict[str, Any] = {k: sum(s[k] for s in each) for k, v in each[0].items() if isinstance(v, (int, float))}
    return {**total, "node_id": ",".join(s["node_id"] for s in each), "replicas": len(each), "per_replica": each}


class RemoteActivations:
    """A trial's view of the pool: the `ShardSource` that training and evaluation read from. `reader` names it
    to the replicas (a fresh name by default); `release` when done."""

    def __init__(self, spec: TrainRunSpec, sweep: str, reader: str | None = None):
        self.spec = spec
        self.actor = ray.get_actor(producer_name(sweep), namespace=NAMESPACE)  # replica 0: what is made once
        info = ray.get(self.actor.info.remote())
        self.replicas = [self.actor] + [ray.get_actor(producer_name(sweep, r), namespace=NAMESPACE)
                                        for r in range(1, info["replicas"])]
        self.reader = reader or uuid.uuid4().hex
        self.d_model: int = info["d_model"]
        self.n_shards: dict[Split, int] = info["n_shards"]
        self.scale: float = info["scale"]
        self._next: tuple[tuple[Split, int], ray.ObjectRef] | None = None
        self.waited = 0.0  # seconds spent waiting for shards

    def _ask(self, split: Split, i: int) -> ray.ObjectRef:
        return self.replicas[i % len(self.replicas)].shard.remote(split, i, self.reader)

    def shard(self, split: Split, i: int) -> Shard:
        if self._next is not None and self._next[0] == (split, i):
            ref = self._next[1]
        else:
            ref = self._ask(split, i)
        self._next = None
        if i < self.n_shards[split]:  # beyond, a probing shard: which one follows is probing's to know
            nxt = (i + 1) % self.n_shards[split]  # a training pass wraps around to shard 0
            self._next = ((split, nxt), self._ask(split, nxt))
        start = time.perf_counter()
        try:
            return ray.get(ref)
        finally:
            self.waited += time.perf_counter() - start

    def release(self) -> list[ray.ObjectRef]:
        """Tell every replica this reader is done; not waited for (a dead replica must not fail the caller)."""
        return [a.release.remote(self.reader) for a in self.replicas]

    def probe_labels(self) -> ProbeLabels:
        return ray.get(self.actor.probe_labels.remote())

    def absorption(self) -> AbsorptionSet:
        return ray.get(self.actor.absorption.remote())

    def splice(self, sae: SparseAutoencoder) -> dict[str, float]:
        state = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
        return ray.get(self.actor.splice.remote(sae.cfg.model_dump(), state))

    def logit_tables(self, directions: torch.Tensor, token_ids: list[int]) -> LmTables:
        return ray.get(self.actor.logit_tables.remote(directions.detach().cpu(), token_ids))
