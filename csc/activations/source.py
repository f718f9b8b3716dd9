"""Activation shards of one spec, from the disk cache or from the LM, and SAE training batches from them.

`Activations` is what a trainer, the CLI and the sweep's producer actor use:
- `shard(split, i)` returns shard i: from the cache when it is there and passes its checksum,
  otherwise from the LM (loaded on first need), then stored.
- `scale` is the normalisation factor sqrt(d_model) / mean ||x|| estimated on train shard 0 (BOS
  excluded), so that scaled activations have average norm sqrt(d_model). It is part of the trained SAE.
- `batches(split, batch_size, seed)` yields `ActivationBatch`es of anchors and their partners under the
  spec's `activations.pairing` rule, shuffled within each shard so that one batch holds tokens of many
  sequences.

A shard holds the partners of every pairing rule (csc/activations/pairing.py), over the same anchors
(positions >= 2), so the pairing is chosen when batches are made, not when shards are: it is not part
of the cache key, and one cache (one producer in a sweep) serves every rule. Anchors and their order
are the same under every rule for one seed; only the partner rows differ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from tqdm.auto import tqdm

from csc.sae.batch import ActivationBatch
from csc.activations.cache import ShardCache
from csc.activations.capture import run_to_layer, to_host
from csc.activations.pairing import (FIRST_ANCHOR, RULES, attention_partners, check_partners, position_partners,
                                     shard_seed, tensor_name)
from csc.activations.contexts import ContextStream
from csc.activations.corpus import Split, corpus_identity, documents
from csc.activations.models import (LanguageModel, check_model_spec, load_language_model, load_tokenizer,
                                    model_identity)
from csc.config import ActivationsRunSpec, PairingRule
from csc.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLITS: tuple[Split, ...] = ("train", "eval")


@dataclass
class Shard:
    index: int
    acts: torch.Tensor
    """[n, T, d] resid_post of the hooked layer, unscaled, in the cache's store dtype."""
    partners: dict[PairingRule, torch.Tensor]
    """Per pairing rule, [n, T] int64 partner position of each token; -1 at positions 0 and 1 (no anchors)."""
    tokens: torch.Tensor
    """[n, T] int64 token ids (BOS first)."""
    seq_id: torch.Tensor
    """[n] int64 index of each context within its split."""


class Activations:
    def __init__(self, spec: ActivationsRunSpec, lm: LanguageModel | None = None):
        a = spec.activations
        facts = check_model_spec(spec.model)
        if a.layer >= facts.n_layers:
            raise InputError(f"activations.layer {a.layer} is out of range: {spec.model.name!r} has "
                             f"{facts.n_layers} layers (0..{facts.n_layers - 1})")
        if a.context_length > facts.max_context:
            raise InputError(f"activations.context_length {a.context_length} exceeds the maximum context "
                             f"of {spec.model.name!r} ({facts.max_context} tokens)")
        self.spec = spec
        self.d_model = facts.d_model
        self._lm = lm
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._streams: dict[Split, ContextStream] = {}
        ident = {"model": model_identity(spec.model), "layer": a.layer, "corpus": corpus_identity(spec.corpus),
                 "holdout_fraction": spec.corpus.holdout_fraction, "context_length": a.context_length,
                 "contexts_per_shard": a.contexts_per_shard, "store_dtype": a.store_dtype,
                 "hook": "resid_post", "attention": facts.attention}
        self.caches = {s: ShardCache(a.cache_root, {**ident, "split": s}) for s in SPLITS}
        shard_tokens = a.contexts_per_shard * a.context_length
        self.n_shards = {"train": math.ceil(a.train_tokens / shard_tokens),
                         "eval": math.ceil(a.eval_tokens / shard_tokens)}
        self.lm_shards_computed = 0
        """Shards this object had to run the LM for (the rest came from the cache)."""
        self.lm_tokens = 0
        self.lm_seconds = 0.0
        self._scale: float | None = None

    # ------------------------------------------------------------------ the LM, loaded on first need

    @property
    def lm(self) -> LanguageModel:
        if self._lm is None:
            self.check_corpus_has_text()
            self._lm = load_language_model(self.spec.model, self.spec.activations.cache_root)
        return self._lm

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The LM's tokenizer, without loading the LM when it is not loaded yet."""
        if self._lm is not None:
            return self._lm.tokenizer
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.spec.model, self.spec.activations.cache_root)
        return self._tokenizer

    def check_corpus_has_text(self) -> None:
        """Raise before any model is loaded when a split of the corpus has no document."""
        for split in SPLITS:
            if next(documents(self.spec.corpus, split), None) is None:
                raise InputError(f"corpus.source {self.spec.corpus.source!r} has no text in its {split} part "
                                 f"(no non-empty document{'' if split == 'train' else ' held out by corpus.holdout_fraction'})")

    def _stream(self, split: Split) -> ContextStream:
        if split not in self._streams:
            self._streams[split] = ContextStream(documents(self.spec.corpus, split), self.lm.tokenizer,
                                                 self.lm.bos_token_id, self.spec.activations.context_length,
                                                 what=f"corpus.source {self.spec.corpus.source!r} ({split} part)")
        return self._streams[split]

    def check_corpus_covers(self, split: Split, n_shards: int | None = None) -> None:
        """Raise before any LM work when the corpus cannot fill the requested shards of `split`."""
        n = (self.n_shards[split] if n_shards is None else n_shards) * self.spec.activations.contexts_per_shard
        self._stream(split).get(0, n)

    # ------------------------------------------------------------------ shards

    def shard(self, split: Split, i: int) -> Shard:
        cache = self.caches[split]
        tensors = cache.load(i)
        problem = None if tensors is None else shard_problem(tensors)
        if tensors is None or problem is not None:
            if problem is not None or i in cache.rejected:
                print(f"csc: activation shard {cache.dir}/shard_{i:05d} {problem or 'failed its checksum'}; "
                      f"regenerating it", flush=True)
            tensors = self._compute(split, i)
            cache.store(i, tensors)
        return Shard(index=i, acts=tensors["acts"],
                     partners={rule: tensors[tensor_name(rule)].long() for rule in RULES},
                     tokens=tensors["tokens"].long(), seq_id=tensors["seq_id"])

    def _compute(self, split: Split, i: int) -> dict[str, torch.Tensor]:
        a = self.spec.activations
        S = a.contexts_per_shard
        ids = self._stream(split).get(i * S, (i + 1) * S)
        store = getattr(torch, a.store_dtype)
        lm = self.lm
        acts, found = [], []
        # On CUDA the activations go to the host on a side stream, overlapping the next chunk's forward.
        copies = torch.cuda.Stream(lm.device) if lm.device.type == "cuda" else None
        t0 = time.perf_counter()
        for chunk in ids.split(a.lm_batch_size):
            cap = run_to_layer(lm.model, chunk.to(lm.device), a.layer)
            acts.append(to_host(cap.resid, store, copies))
            found.append({rule: p.cpu() for rule, p in attention_partners(cap.attn).items()})
        if copies is not None:
            copies.synchronize()  # every copy has landed before the shard is assembled and stored
        self.lm_seconds += time.perf_counter() - t0
        self.lm_tokens += ids.numel()
        self.lm_shards_computed += 1
        partners = {rule: torch.cat([f[rule] for f in found]) for rule in found[0]}
        partners.update(position_partners(*ids.shape, seed=shard_seed(split, i)))
        return {"acts": torch.cat(acts), **{tensor_name(r): partners[r].to(torch.int32) for r in RULES},
                "tokens": ids.to(torch.int32), "seq_id": torch.arange(i * S, (i + 1) * S, dtype=torch.int64)}

    @property
    def scale(self) -> float:
        if self._scale is None:
            cache = self.caches["train"]
            manifest = cache.read_manifest()
            if manifest is None:
                acts = self.shard("train", 0).acts[:, 1:].float()  # BOS excluded: on Gemma 3 its norm is ~7x the rest
                mean_norm = acts.norm(dim=-1).double().mean().item()
                manifest = {"scale": math.sqrt(self.d_model) / mean_norm, "mean_norm": mean_norm,
                            "d_model": self.d_model, "estimated_on_tokens": acts.shape[0] * acts.shape[1]}
                cache.write_manifest(manifest)
            self._scale = float(manifest["scale"])
        return self._scale

    def build(self, split: Split, progress: bool = True) -> None:
        """Make sure every shard of `split` is in the cache, running the LM only for the missing ones."""
        missing = [i for i in range(self.n_shards[split]) if self.caches[split].load(i) is None]
        if not missing:
            return
        self.check_corpus_covers(split)
        a = self.spec.activations
        shard_tokens = a.contexts_per_shard * a.context_length
        with tqdm(total=len(missing) * shard_tokens, desc=f"{split} activations", unit="tok", unit_scale=True,
                  disable=not progress) as bar:
            for i in missing:
                self.shard(split, i)
                bar.update(shard_tokens)

    # ------------------------------------------------------------------ batches

    def batches(self, split: Split, batch_size: int, seed: int = 0, device: str | torch.device = "cpu",
                n_shards: int | None = None, drop_last: bool = True) -> Iterator[ActivationBatch]:
        return shard_batches(self, split, batch_size, seed, device, n_shards, drop_last)


def shard_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    """Why stored tensors are not a shard of this layout (a missing tensor, partners that break the anchor
    contract), or None. Such a shard is regenerated, never read: a missing rule must not turn into another."""
    missing = [name for name in ("acts", "tokens", "seq_id", *map(tensor_name, RULES)) if name not in tensors]
    if missing:
        return f"lacks {', '.join(missing)}"
    for rule in RULES:
        problem = check_partners(tensors[tensor_name(rule)])
        if problem is not None:
            return f"has bad {tensor_name(rule)}: {problem}"
    return None


class ShardSource(Protocol):
    """What batches are made from: `Activations` here, or the sweep's client of the producer actor."""

    spec: ActivationsRunSpec
    n_shards: dict[Split, int]

    @property
    def scale(self) -> float: ...

    def shard(self, split: Split, i: int) -> Shard: ...


def shard_batches(source: ShardSource, split: Split, batch_size: int, seed: int = 0,
                  device: str | torch.device = "cpu", n_shards: int | None = None, drop_last: bool = True,
                  batching: Literal["contexts", "tokens"] = "tokens", window: int = 1) -> Iterator[ActivationBatch]:
    """One pass over the split's shards in order, `window` shards at a time, shuffled within each window (seeded).

    Anchors are the tokens at positions >= 2 of every context, paired under `source.spec.activations.pairing`;
    the anchors and their order depend on the seed, `batching` and `window` only, not on the rule. With `tokens`,
    a window's anchors are shuffled one by one and each batch carries its anchors' partner activations; with
    `contexts`, the window's contexts are shuffled and their anchors follow each other in position order, so each
    batch carries the row of each anchor's partner within it (-1 where the partner is not in the batch).
    Anchors left over at the end of a window start the next batch. The remainder after the last shard is dropped
    with `drop_last` (training: every batch full), else yielded as a last, smaller batch (evaluation: every
    held-out anchor counts). batching="tokens", window=1 is the held-out figures' order.
    """
    scale = source.scale
    rule = source.spec.activations.pairing
    gen = torch.Generator().manual_seed(seed)
    carry: list[torch.Tensor] | None = None
    stream = 0  # anchors of the pass before this window (contexts: the index of each anchor in the pass)
    total = source.n_shards[split] if n_shards is None else n_shards
    for first in range(0, total, window):
        shards = [source.shard(split, i) for i in range(first, min(first + window, total))]
        acts = shards[0].acts if len(shards) == 1 else torch.cat([sh.acts for sh in shards])
        partner = torch.cat([sh.partners[rule] for sh in shards])
        seq_id = torch.cat([sh.seq_id for sh in shards])
        n, T = partner.shape
        per_context = T - FIRST_ANCHOR
        if batching == "tokens":
            ctx = torch.arange(n).repeat_interleave(per_context)
            pos = torch.arange(FIRST_ANCHOR, T).repeat(n)
            perm = torch.randperm(ctx.numel(), generator=gen)
            ctx, pos = ctx[perm], pos[perm]
            parts = [acts[ctx, pos].float() * scale, acts[ctx, partner[ctx, pos]].float() * scale, seq_id[ctx], pos]
        else:
            ctx = torch.randperm(n, generator=gen).repeat_interleave(per_context)
            pos = torch.arange(FIRST_ANCHOR, T).repeat(n)
            index = stream + torch.arange(ctx.numel())
            q = partner[ctx, pos]  # the partner's position; its anchor sits q - pos rows away in the same context
            parts = [acts[ctx, pos].float() * scale, seq_id[ctx], pos,
                     torch.where(q >= FIRST_ANCHOR, index + q - pos, -1), index]
        stream += n * per_context
        if carry is not None:
            parts = [torch.cat([c, p]) for c, p in zip(carry, parts)]
        n_full = parts[0].shape[0] // batch_size * batch_size
        for s in range(0, n_full, batch_size):
            yield _batch(batching, [p[s:s + batch_size] for p in parts]).to(device)
        carry = [p[n_full:] for p in parts]
    if not drop_last and carry is not None and carry[0].shape[0] > 0:
        yield _batch(batching, carry).to(device)


def _batch(batching: str, parts: list[torch.Tensor]) -> ActivationBatch:
    if batching == "tokens":
        return ActivationBatch(*parts)
    anchors, seq_id, pos, partner_at, index = parts
    row = partner_at - index[0]  # the rows of a batch are consecutive anchors of the pass
    inside = (partner_at >= 0) & (row >= 0) & (row < len(index))
    return ActivationBatch(anchors, None, seq_id, pos, partner_index=torch.where(inside, row, -1))
