"""Sparse probing, SAEBench 0.6.0's method (evals/sparse_probing) on csc's held-out tasks.

The tasks and their examples are csc.activations.probe_labels': `seq` (which class of text a context's document
comes from: the genre of an embedded work, else corpus.label_field) and `letter` (a token's first letter). For
one task with classes 1..C, examples e with tokens t(e), and features f (SAE codes, or raw activations):

    x_e        = mean over t in t(e) of f(t)        (mean-pooling over an example's non-special tokens)
    one class c against the rest, on the probe-fit examples and again on the probe-test ones:
      P        = the examples of class c;  N = ceil(|P| / (C - 1)) random examples of each other class, then |P|
                 of those at random (balanced negatives, SAEBench's prepare_probe_data)
    top-k      = the k features with the largest |mean_{e in P} x_e - mean_{e in N} x_e| on the probe-fit examples
    probe      = sklearn LogisticRegression(C=1, max_iter=1000) fitted on the probe-fit examples' top-k features
    acc_c(k)   = the share of probe-test examples (|P| + |N|) the probe classifies right

    probe_<task>_sae_top_<k>     = mean over c of acc_c(k), f = the SAE's codes, k in K_VALUES
    probe_<task>_random_top_<k>  = the same for the floor: a random-init SAE of the same config (seed eval.probe_seed)
                                   started as csc starts training (SparseAutoencoder.init_from_data) at the L0 the
                                   trained SAE has on the first probing tokens (up to chunk_tokens of them), so the
                                   floor differs from the SAE by training alone, not by density
    probe_<task>_llm             = the same probe on every dimension of the raw activations (no top-k): the ceiling
    probe_<task>_classes         = C

Codes are csc's on scaled activations, which equal the export's codes on raw ones; the ceiling reads the raw
(unscaled) activations, as SAEBench's does. Where csc differs from SAEBench: the negatives are drawn once per class
and shared by every k and every feature set (SAEBench redraws them for each probe), so the SAE, its floor and its
ceiling are compared on the same examples; the ceiling is this probe (SAEBench fits llm_test_accuracy with a torch
probe early-stopped on its test set); k = 20 is added to SAEBench's {1, 2, 5}.

Memory: the pooled features, sum over tasks of E x (d + 2 dict_size) floats (E = classes x
eval.probe_examples_per_class: 3,584 examples, 68 MB on the embedded default at dictionary 2048), plus one held-out
shard and the codes of `chunk_tokens` tokens at a time.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterator

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from csc.activations.models import start_token_id
from csc.activations.probe_labels import TASKS, ProbeLabels, probe_labels, special_ids, task_names
from csc.activations.source import Activations, ShardSource
from csc.config import CorpusSpec, TrainRunSpec
from csc.errors import CscError
from csc.sae.archs import build_sae
from csc.sae.model import SparseAutoencoder

K_VALUES = (1, 2, 5, 20)
"""Latents per sparse probe: SAEBench's {1, 2, 5}, and 20 (issue 14)."""


def _task_metrics(task: str, what: str) -> list[tuple[str, str]]:
    """(key, label) of the figures of one task."""
    return [(f"probe_{task}_{key}", f"sparse probing, {what}: {name}") for key, name in (
        *((f"sae_top_{k}", f"SAE top-{k}") for k in K_VALUES), ("llm", "raw activations (ceiling)"),
        *((f"random_top_{k}", f"random SAE top-{k} (floor)") for k in K_VALUES), ("classes", "classes"))]


PROBING_METRICS: list[tuple[str, str]] = [m for task, what in TASKS for m in _task_metrics(task, what)]
"""(key, label) of every figure probing_scores may return, for csc eval's table (csc.pipeline.run.METRIC_ORDER)."""


def probing_keys(corpus: CorpusSpec) -> frozenset[str]:
    """The keys of PROBING_METRICS that probing_scores returns for a spec with this corpus: a task's figures where
    the corpus has that task (no `seq` task without document labels)."""
    tasks = task_names(corpus)
    return frozenset(key for task, what in TASKS if task in tasks for key, _ in _task_metrics(task, what))


def held_out_labels(spec: TrainRunSpec, acts: Activations) -> ProbeLabels:
    """The probing set of `spec` (csc.activations.probe_labels), with the tokenizer only (no LM): what the sweep's
    producer computes once and hands to every trial."""
    tok = acts.tokenizer
    start = start_token_id(tok, spec.model)
    return probe_labels(spec, spec.eval, acts.n_shards["eval"], tok, start, special_ids(tok, start))


def probing_scores(spec: TrainRunSpec, sae: SparseAutoencoder, acts: ShardSource, labels: ProbeLabels,
                   chunk_tokens: int = 4096) -> dict[str, float]:
    """The module docstring's figures for every task of `labels`."""
    _, first = next(probing_tokens(acts, labels))
    floor = random_floor(sae, first[:chunk_tokens].to(sae.W_dec.device) * acts.scale, spec.eval.probe_seed)
    results: dict[str, float] = {}
    for task, features in zip(labels.tasks, pooled_features(sae, floor, acts, labels, chunk_tokens)):
        scores = one_vs_rest(features, task.label, task.test, len(task.classes), spec.eval.probe_seed)
        results.update({f"probe_{task.name}_{key}": value for key, value in scores.items()})
        results[f"probe_{task.name}_classes"] = float(len(task.classes))
    return results


@torch.no_grad()
def random_floor(sae: SparseAutoencoder, sample: torch.Tensor, seed: int) -> SparseAutoencoder:
    """The probing floor: a seeded random-init SAE of sae's config, started from `sample` (scaled activations) at
    the L0 `sae` has on it. A floor at the tied init's density (half the dictionary firing) probes better than a
    trained SAE at L0 70 from sheer density; matched, the two differ by training alone."""
    floor = build_sae(sae.cfg, seed=seed, device=str(sample.device))
    floor.init_from_data(sample, (sae.encode(sample) > 0).sum(dim=-1).float().mean().item())
    return floor.eval()


def probing_tokens(acts: ShardSource, labels: ProbeLabels) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per probing shard: ([tasks, n] the example each of its n pooled tokens belongs to, -1 for none; [n, d] those
    tokens' raw activations)."""
    S = acts.spec.activations.contexts_per_shard
    for i in labels.shards(S):
        sh = acts.shard("eval", i)
        rows = (labels.seq_id // S == i).nonzero().squeeze(1)
        local = labels.seq_id[rows] - i * S
        if not torch.equal(sh.tokens[local], labels.tokens[rows]):
            raise CscError(f"sparse probing: held-out shard {i} does not hold the tokens its labels were made for: the "
                           f"corpus, the tokenizer or the context construction changed since the shard was cached")
        example = torch.stack([task.example[rows] for task in labels.tasks])  # [tasks, m, T]
        used = (example >= 0).any(dim=0)
        yield example[:, used], sh.acts[local][used].float()


@torch.no_grad()
def pooled_features(sae: SparseAutoencoder, floor: SparseAutoencoder, acts: ShardSource, labels: ProbeLabels,
                    chunk_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Per task, {feature set: [E, dim] mean over each example's tokens}, reading each probing shard once."""
    device = sae.W_dec.device
    sums, counts = [], []
    for task in labels.tasks:
        E = len(task.label)
        sums.append({"sae": torch.zeros(E, sae.cfg.dict_size), "random": torch.zeros(E, floor.cfg.dict_size),
                     "llm": torch.zeros(E, sae.cfg.d_in)})
        counts.append(torch.zeros(E))
    for example, x in probing_tokens(acts, labels):
        for s in range(0, x.shape[0], chunk_tokens):
            raw = x[s:s + chunk_tokens]
            scaled = raw.to(device) * acts.scale
            feats = {"sae": sae.encode(scaled).cpu(), "random": floor.encode(scaled.to(floor.W_dec.device)).cpu(),
                     "llm": raw}
            for j, e in enumerate(example[:, s:s + chunk_tokens]):
                keep = e >= 0
                for name, f in feats.items():
                    sums[j][name].index_add_(0, e[keep], f[keep])
                counts[j].index_add_(0, e[keep], torch.ones(int(keep.sum())))
    return [{name: s / c[:, None] for name, s in task_sums.items()} for task_sums, c in zip(sums, counts)]


def one_vs_rest(features: dict[str, torch.Tensor], label: torch.Tensor, test: torch.Tensor, n_classes: int,
                seed: int) -> dict[str, float]:
    """Mean over classes of the probe-test accuracy of each probe (module docstring): `sae_top_<k>`,
    `random_top_<k>`, `llm`. features: {set: [E, dim]}; label [E] class; test [E] probe-test example."""
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, list[float]] = defaultdict(list)
    # The fits are small: BLAS threads only wait on each other (12x slower on 2 busy cores than one thread).
    with threadpool_limits(limits=1):
        for c in range(n_classes):
            fit = balanced(label, ~test, c, n_classes, gen)
            held = balanced(label, test, c, n_classes, gen)
            for name, x in features.items():
                for k in (None,) if name == "llm" else K_VALUES:
                    acc[name if k is None else f"{name}_top_{k}"].append(probe_accuracy(x, fit, held, k))
    return {key: sum(v) / len(v) for key, v in acc.items()}


def balanced(label: torch.Tensor, part: torch.Tensor, c: int, n_classes: int, gen: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(example indices, 1 for class c / 0) of `part`: every example of class c and as many negatives, drawn
    evenly from the other classes (SAEBench's prepare_probe_data)."""
    pos = (part & (label == c)).nonzero().squeeze(1)
    per = math.ceil(len(pos) / (n_classes - 1))
    pools = [(part & (label == o)).nonzero().squeeze(1) for o in range(n_classes) if o != c]
    neg = torch.cat([p[torch.randperm(len(p), generator=gen)[:per]] for p in pools])
    neg = neg[torch.randperm(len(neg), generator=gen)[:len(pos)]]
    if len(neg) < len(pos):
        raise CscError(f"sparse probing: class {c} has {len(pos)} examples but the others only {len(neg)}")
    return torch.cat([pos, neg]), torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()


def probe_accuracy(x: torch.Tensor, fit: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                   k: int | None) -> float:
    """Fit LogisticRegression(C=1, max_iter=1000) on the `fit` examples' top-k features by |mean difference| (all
    features when k is None); its accuracy on the `test` examples."""
    (fi, fy), (ti, ty) = fit, test
    xf, xt = x[fi], x[ti]
    if k is not None:
        diff = (xf[fy == 1].mean(dim=0) - xf[fy == 0].mean(dim=0)).abs()
        cols = diff.argsort(descending=True, stable=True)[:k]
        xf, xt = xf[:, cols], xt[:, cols]
    with warnings.catch_warnings():
        # SAEBench's settings; lbfgs may stop at max_iter on unscaled activations, as it does there.
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = LogisticRegression(C=1.0, max_iter=1000).fit(xf.double().numpy(), fy.numpy())
    return float((probe.predict(xt.double().numpy()) == ty.numpy()).mean())
