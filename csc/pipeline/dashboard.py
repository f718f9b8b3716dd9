"""Feature dashboards: what an SAE's latents respond to on held-out text, and what they write to the logits.

For the `eval.dashboard_frequent` latents that fire on the most held-out tokens, and `eval.dashboard_sampled` others
drawn at random (seed `eval.dashboard_seed`) among the live ones (those that fired at least once), the page
(csc.pipeline.dashboard_html) shows:
- top contexts: the `eval.dashboard_contexts` held-out contexts where the latent's largest activation is largest
  (one example per context), each cut to BEFORE tokens before and AFTER after that maximum, every token shaded by
  the latent's activation;
- its firing frequency and the histogram of its non-zero activations (csc.sae.latent_stats), beside the firing
  frequency histogram of every latent;
- logit tables: the LOGIT_TOKENS tokens whose logits its decoder direction raises and lowers most (`lm_tables`).
Codes are read at the held-out anchors (positions >= FIRST_ANCHOR), the tokens of every held-out figure; the
statistics stream over the held-out shards in bounded memory, then only the chosen latents' top contexts are
encoded again to cut their windows.

Where it runs: the statistics and the windows need only activations and the SAE (`build` runs in the sweep trial, or
in the process of `csc train` / `csc eval`); the logit tables and the token strings need the LM and its tokenizer,
so `build` asks for them through `tables` (`lm_tables` where the LM lives: the sweep's producer actor).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from csc.activations.capture import base_model
from csc.activations.models import LanguageModel
from csc.activations.pairing import FIRST_ANCHOR
from csc.activations.source import ShardSource
from csc.config import TrainRunSpec
from csc.errors import CscError
from csc.pipeline import dashboard_html as page
from csc.sae.latent_stats import LatentStats
from csc.sae.metrics import feature_density_histogram
from csc.sae.model import SparseAutoencoder

FILE = "dashboard.html"
BEFORE, AFTER = 10, 5
LOGIT_TOKENS = 10


@dataclass(frozen=True)
class LmTables:
    """What needs the LM and its tokenizer (made by `lm_tables`)."""

    raises: list[list[tuple[str, float]]]
    """Per direction, the LOGIT_TOKENS tokens whose logits it raises most (token text, logit change)."""
    lowers: list[list[tuple[str, float]]]
    """Per direction, those it lowers most, most negative first."""
    strings: dict[int, str]
    """The text of each token id asked for."""


def _final_norm(model: nn.Module) -> nn.Module:
    base = base_model(model)
    for name in ("norm", "ln_f"):  # Gemma/Llama/Mistral/Qwen, GPT-2 style
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    raise CscError(f"cannot find the final norm of {type(model).__name__} for the dashboard's logit tables")


@torch.inference_mode()
def lm_tables(lm: LanguageModel, directions: torch.Tensor, token_ids: list[int], k: int = LOGIT_TOKENS) -> LmTables:
    """The logit lens of each direction d [n, d_model] of the raw residual stream, and the text of `token_ids`:

        delta(d) = head(N(d)) - head(N(0))

    with N the LM's final norm and head its unembedding: the logits the LM's head gives when its last hidden state
    is d, less those it gives for 0 (a norm's or head's bias). For an RMSNorm with gain g (Gemma, Llama) and a
    unit-norm d this is W_U (g * d) sqrt(d_model): the direct effect of d on the logits at a token whose residual
    has unit RMS, with the norm's gain in, as TransformerLens's fold_ln folds it into the W_U that SAE dashboards
    multiply W_dec by. Left out: the layers after the SAE's (the logit lens skips them), the norm's dependence on
    the rest of the residual (a positive factor per token, which ranks the tokens the same) and Gemma 2's final
    soft-capping (monotone)."""
    model = lm.model
    p = next(model.parameters())
    d = torch.cat([directions.float(), directions.new_zeros(1, directions.shape[1])]).to(p.device, p.dtype)
    logits = model.get_output_embeddings()(_final_norm(model)(d)).float()
    delta = (logits[:-1] - logits[-1]).cpu()
    up, down = delta.topk(k, dim=1), delta.topk(k, dim=1, largest=False)
    ids = set(token_ids) | set(up.indices.flatten().tolist()) | set(down.indices.flatten().tolist())
    strings = {i: lm.tokenizer.decode([i]) for i in sorted(ids)}

    def table(top) -> list[list[tuple[str, float]]]:
        return [[(strings[i], v) for i, v in zip(row_i.tolist(), row_v.tolist())]
                for row_i, row_v in zip(top.indices, top.values)]

    return LmTables(raises=table(up), lowers=table(down), strings={i: strings[i] for i in token_ids})


def collect(sae: SparseAutoencoder, acts: ShardSource, contexts_per_batch: int, top_contexts: int) -> LatentStats:
    """Every latent's statistics over every held-out anchor, with its `top_contexts` top contexts,
    `contexts_per_batch` contexts at a time. Context c is row c % S of held-out shard c // S (S =
    contexts_per_shard)."""
    stats = LatentStats(sae.cfg.dict_size, top_contexts)
    S = acts.spec.activations.contexts_per_shard
    for i in range(acts.n_shards["eval"]):
        sh = acts.shard("eval", i)
        for s in range(0, sh.acts.shape[0], contexts_per_batch):
            x = sh.acts[s:s + contexts_per_batch, FIRST_ANCHOR:]
            stats.update(_codes(sae, x, acts.scale), torch.arange(s, s + x.shape[0]) + i * S)
    return stats


@torch.no_grad()
def _codes(sae: SparseAutoencoder, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Codes [n, T, dict] of raw shard activations x [n, T, d]."""
    n, T, d = x.shape
    return sae.encode((x.float() * scale).reshape(-1, d).to(sae.W_dec.device)).reshape(n, T, -1)


def choose_latents(stats: LatentStats, n_frequent: int, n_sampled: int, seed: int) -> list[tuple[int, str]]:
    """(latent, group): the n_frequent most frequent, then n_sampled random other live ones (drawn with `seed`), each
    group most frequent first."""
    order = sorted(range(stats.fires.numel()), key=lambda j: (-int(stats.fires[j]), j))
    live = [j for j in order if stats.fires[j] > 0]
    frequent, rest = live[:n_frequent], live[n_frequent:]
    gen = torch.Generator().manual_seed(seed)
    picked = {rest[i] for i in torch.randperm(len(rest), generator=gen)[:n_sampled].tolist()}
    return [(j, "frequent") for j in frequent] + [(j, "sampled") for j in rest if j in picked]


def _windows(sae: SparseAutoencoder, acts: ShardSource, stats: LatentStats, latents: list[int],
             contexts_per_batch: int) -> dict[int, list[tuple[list[int], list[float], int, int, int]]]:
    """Per latent, its top contexts as (token ids, activations, peak index, context, position), cut around the
    maximum: the contexts are read and encoded again, a batch at a time, only for those latents."""
    S = acts.spec.activations.contexts_per_shard
    wanted: dict[int, set[int]] = defaultdict(set)
    for j in latents:
        for _, c, _ in stats.top(j):
            wanted[c // S].add(c % S)
    col = {j: n for n, j in enumerate(latents)}
    rows_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # context -> (tokens [T], codes of `latents` [T, n])
    for i in sorted(wanted):
        sh = acts.shard("eval", i)
        rows = sorted(wanted[i])
        for s in range(0, len(rows), contexts_per_batch):
            r = torch.tensor(rows[s:s + contexts_per_batch])
            z = _codes(sae, sh.acts[r, FIRST_ANCHOR:], acts.scale)[..., latents].cpu()
            z = torch.cat([z.new_zeros(len(r), FIRST_ANCHOR, len(latents)), z], dim=1)  # no codes before the anchors
            for n, row in enumerate(r.tolist()):
                rows_of[i * S + row] = (sh.tokens[row], z[n])
    out = {}
    for j in latents:
        out[j] = []
        for _, c, pos in stats.top(j):
            tokens, z = rows_of[c]
            t = pos + FIRST_ANCHOR
            lo, hi = max(0, t - BEFORE), min(tokens.shape[0], t + AFTER + 1)
            out[j].append((tokens[lo:hi].tolist(), z[lo:hi, col[j]].tolist(), t - lo, c, t))
    return out


def build(spec: TrainRunSpec, sae: SparseAutoencoder, acts: ShardSource, results: dict[str, float],
          tables: Callable[[torch.Tensor, list[int]], LmTables] | None = None) -> str:
    """The dashboard page of `sae` on the held-out split of `acts`, with its held-out figures `results` in the
    header. `tables(directions, token_ids)` computes what needs the LM; by default `acts` holds it."""
    sae = sae.to("cpu").eval()
    a, e = spec.activations, spec.eval
    per_batch = max(1, spec.trainer.batch_size // (a.context_length - FIRST_ANCHOR))  # codes as large as training's
    stats = collect(sae, acts, per_batch, e.dashboard_contexts)
    chosen = choose_latents(stats, e.dashboard_frequent, e.dashboard_sampled, e.dashboard_seed)
    latents = [j for j, _ in chosen]
    windows = _windows(sae, acts, stats, latents, per_batch)
    ids = sorted({i for j in latents for tokens, *_ in windows[j] for i in tokens})
    lm = (tables or partial(lm_tables, acts.lm))(sae.W_dec[latents].detach().float(), ids)
    edges = stats.bin_edges.tolist()
    cards = []
    for n, (j, group) in enumerate(chosen):
        examples = [page.Example(tokens=[lm.strings[i] for i in tokens], acts=z, peak=peak, context=c, position=t)
                    for tokens, z, peak, c, t in windows[j]]
        cards.append(page.LatentCard(
            latent=j, group=group, frequency=int(stats.fires[j]) / stats.tokens,
            max_activation=max((ex.acts[ex.peak] for ex in examples), default=0.0),
            hist_edges=edges, hist_counts=stats.hist[j].tolist(), examples=examples,
            raises=lm.raises[n], lowers=lm.lowers[n]))
    n_contexts = stats.tokens // (a.context_length - FIRST_ANCHOR)
    return page.render(page.Dashboard(
        title=f"Feature dashboard: {spec.model.name} layer {a.layer}, {sae.cfg.architecture} SAE of "
              f"{sae.cfg.dict_size} latents",
        subtitle=f"{stats.tokens:,} held-out tokens (positions >= {FIRST_ANCHOR} of {n_contexts} contexts); "
                 f"{len(latents)} latents shown of {int((stats.fires > 0).sum())} live",
        figures=results, density=feature_density_histogram(stats.fires, stats.tokens), latents=cards,
        method=f"Latents: the {e.dashboard_frequent} that fire on the most held-out tokens, then {e.dashboard_sampled} "
               f"drawn at random (seed {e.dashboard_seed}) among the other live ones. Contexts: the "
               f"{e.dashboard_contexts} held-out contexts with the latent's largest activation (one per context), "
               f"{BEFORE} tokens before and "
               f"{AFTER} after its maximum (boxed); each token's shade is its activation over the latent's largest. "
               f"Histogram: the latent's non-zero activations on held-out tokens. Raises / lowers: the change in the "
               f"LM's logits when its last hidden state is the latent's decoder direction, through the LM's final "
               f"norm and unembedding (the logit lens: the layers after layer {a.layer} are skipped; no "
               f"soft-capping)."))
