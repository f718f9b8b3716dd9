"""The shared activation producer: one Ray actor owns the LM and serves shards to every trial.

A shard comes from the producer's memory, else from the disk cache, else from the LM, and the LM never
runs twice for one shard: requests for a shard already being made wait for it. All LM work (shards,
prefetch, CE/KL evaluation of a trial's SAE, its dashboard's logit tables and token strings) runs on one thread,
so the model is never used concurrently; so do the sparse-probing set (the tokenizer's one job) and feature
absorption's LM part (its prompts' activations and the LM's letter probe), each made once and handed to every
trial. Besides the spec's shards, it serves the held-out shards that the probing set reads.
After serving shard i the producer prefetches the next ones, since every trial reads them in order.

Trials use `RemoteActivations`, which looks like `csc.activations.source.Activations` to the training
loop and asks for the following shard while the trial trains on the current one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray
import torch

from csc.activations.probe_labels import ProbeLabels
from csc.activations.source import Activations, Shard, Split
from csc.config import TrainRunSpec
from csc.pipeline.absorption import AbsorptionSet, absorption_set
from csc.pipeline.dashboard import LmTables, lm_tables
from csc.pipeline.probing import held_out_labels
from csc.pipeline.run import splice_run
from csc.sae.archs import build_sae
from csc.sae.config import parse_sae_config
from csc.sae.model import SparseAutoencoder

NAMESPACE = "csc"


def producer_name(sweep: str) -> str:
    return f"csc-producer-{sweep}"


def _shard_bytes(sh: Shard) -> int:
    """What a shard holds in memory: activations, every pairing rule's partners, tokens and sequence ids."""
    return sum(t.numel() * t.element_size() for t in (sh.acts, *sh.partners.values(), sh.tokens, sh.seq_id))


class ActivationProducer:
    """Run as a Ray actor (see `start_producer`); the spec's sae/trainer parts are not used here."""

    def __init__(self, spec_json: str, memory_mb: int, prefetch: int):
        self.spec = TrainRunSpec.model_validate_json(spec_json)
        self.acts = Activations(self.spec)
        self.memory_bytes = memory_mb * 2**20
        self.prefetch = prefetch
        self._lm = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lm")
        self._lock = threading.RLock()  # re-entered when a future is already done as its callback is added
        self._memory: OrderedDict[tuple[Split, int], Shard] = OrderedDict()
        self._held = 0
        self._pending: dict[tuple[Split, int], Future] = {}
        self._once: dict[str, Future] = {}  # what is made once for every trial, by name
        self.counts = {"requests": 0, "memory_hits": 0, "waited_on_pending": 0, "evaluations": 0}

    def info(self) -> dict[str, Any]:
        return {"d_model": self.acts.d_model, "n_shards": dict(self.acts.n_shards),
                "scale": self._lm.submit(lambda: self.acts.scale).result()}

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

    def shard(self, split: Split, i: int) -> Shard:
        # Beyond the spec's shards only the held-out ones that probing reads: any other index is a bug.
        if not (0 <= i < self.acts.n_shards[split] or split == "eval" and i in self._probing_shards()):
            raise IndexError(f"{split} shard {i} does not exist: the spec's token budget makes "
                             f"{self.acts.n_shards[split]} shards"
                             + (", and sparse probing does not read it" if split == "eval" else ""))
        key = (split, i)
        with self._lock:
            self.counts["requests"] += 1
            if key in self._memory:
                self.counts["memory_hits"] += 1
                self._memory.move_to_end(key)
                hit = self._memory[key]
            else:
                hit = None
                if key in self._pending:
                    self.counts["waited_on_pending"] += 1
                fut = self._submit(key)
        for j in range(i + 1, i + 1 + self.prefetch):
            if j < self.acts.n_shards[split]:
                with self._lock:
                    if (split, j) not in self._memory:
                        self._submit((split, j))
        return hit if hit is not None else fut.result()

    def _probing_shards(self) -> list[int]:
        return self.probe_labels().shards(self.spec.activations.contexts_per_shard)

    def _submit(self, key: tuple[Split, int]) -> Future:
        """The one future that makes shard `key` (caller holds the lock)."""
        if key in self._pending:
            return self._pending[key]
        fut = self._lm.submit(self.acts.shard, *key)
        self._pending[key] = fut
        fut.add_done_callback(lambda f, key=key: self._keep(key, f))  # may run here and then, if it is done
        return fut

    def _keep(self, key: tuple[Split, int], fut: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if fut.exception() is not None:
                return
            sh = fut.result()
            self._memory[key] = sh
            self._held += _shard_bytes(sh)
            while self._held > self.memory_bytes and len(self._memory) > 1:
                _, old = self._memory.popitem(last=False)
                self._held -= _shard_bytes(old)

    def splice(self, sae_cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, float]:
        """CE/KL on held-out contexts with a trial's SAE spliced into the LM."""
        sae = build_sae(parse_sae_config(sae_cfg)).load_tensors(state, "a trial's SAE").eval()
        with self._lock:  # trials call in parallel (max_concurrency)
            self.counts["evaluations"] += 1
        return self._lm.submit(splice_run, self.spec, sae, self.acts).result()

    def logit_tables(self, directions: torch.Tensor, token_ids: list[int]) -> LmTables:
        """A trial's dashboard: the logit lens of its latents' decoder directions and the text of its tokens."""
        return self._lm.submit(lambda: lm_tables(self.acts.lm, directions, token_ids)).result()

    def stats(self) -> dict[str, float | str]:
        with self._lock:
            # The Ray node it runs on; none when used in-process (asking would start a local Ray).
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
            return {**self.counts, "node_id": node,
                    "lm_shards_computed": self.acts.lm_shards_computed,
                    "lm_tokens": self.acts.lm_tokens, "lm_seconds": self.acts.lm_seconds,
                    "memory_shards": len(self._memory), "memory_mb": self._held / 2**20}


def start_producer(spec: TrainRunSpec, sweep: str, *, cpus: float, gpus: float, memory_mb: int, prefetch: int,
                   max_restarts: int, custom: dict[str, float] | None = None):
    """Create the named producer actor (or attach to a live one of the same sweep)."""
    actor_cls = ray.remote(ActivationProducer)
    return actor_cls.options(
        name=producer_name(sweep), namespace=NAMESPACE, get_if_exists=True, num_cpus=cpus, num_gpus=gpus,
        resources=custom or None,
        max_restarts=max_restarts, max_task_retries=-1,  # calls in flight when it dies are retried on the restart
        max_concurrency=16,  # trials wait on shards in parallel; LM work is serialised inside
    ).remote(spec.model_dump_json(), memory_mb, prefetch)


class RemoteActivations:
    """A trial's view of the producer: the `ShardSource` that training and evaluation read from."""

    def __init__(self, spec: TrainRunSpec, sweep: str):
        self.spec = spec
        self.actor = ray.get_actor(producer_name(sweep), namespace=NAMESPACE)
        info = ray.get(self.actor.info.remote())
        self.d_model: int = info["d_model"]
        self.n_shards: dict[Split, int] = info["n_shards"]
        self.scale: float = info["scale"]
        self._next: tuple[tuple[Split, int], ray.ObjectRef] | None = None

    def shard(self, split: Split, i: int) -> Shard:
        if self._next is not None and self._next[0] == (split, i):
            ref = self._next[1]
        else:
            ref = self.actor.shard.remote(split, i)
        self._next = None
        if i < self.n_shards[split]:  # beyond, a probing shard: which one follows is probing's to know
            nxt = (i + 1) % self.n_shards[split]  # a training pass wraps around to shard 0
            self._next = ((split, nxt), self.actor.shard.remote(split, nxt))
        return ray.get(ref)

    def probe_labels(self) -> ProbeLabels:
        return ray.get(self.actor.probe_labels.remote())

    def absorption(self) -> AbsorptionSet:
        return ray.get(self.actor.absorption.remote())

    def splice(self, sae: SparseAutoencoder) -> dict[str, float]:
        state = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
        return ray.get(self.actor.splice.remote(sae.cfg.model_dump(), state))

    def logit_tables(self, directions: torch.Tensor, token_ids: list[int]) -> LmTables:
        return ray.get(self.actor.logit_tables.remote(directions.detach().cpu(), token_ids))
