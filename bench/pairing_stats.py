"""Partner statistics of the four pairing rules on the same anchors: what each rule pairs a token with.

    python bench/pairing_stats.py                       # quickstart spec (embedded Gemma 3 270M, layer 12), 2 train shards
    python bench/pairing_stats.py --split eval --shards 1

The shards come from the activation cache (built on first need, as `csc activations` would); the attention
is recomputed with run_to_layer on the shards' contexts. Columns, over every anchor (positions >= 2) of the
shards read:
  |t-j| mean, median   distance between the anchor t and its partner j
  adjacent             share of partners next to the anchor (|t-j| = 1)
  > 5 back             share of partners more than 5 tokens before the anchor (t - j > 5)
  after t              share of partners after the anchor (only rules that allow it; - otherwise)
  punct/space          share of partners whose token decodes to punctuation and/or whitespace only
  same token           share of partners with the anchor's token id
  p(t->j)              the anchor's mean attention to its partner (head-averaged; 0 for a partner after t)
  of non-BOS           the same as a share of the anchor's attention to non-BOS tokens
  row cos              mean cosine of the anchor's and the partner's BOS-less attention rows (what
                       `similar_attention` maximises)
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F

from csc.activations.capture import run_to_layer
from csc.activations.pairing import FIRST_ANCHOR, RULES, key_distributions
from csc.activations.source import Activations, Shard
from csc.config import ActivationsRunSpec
from csc.spec_loader import load_spec
from csc.sweep.spec import SweepSpec

SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"
AFTER_ALLOWED = {"similar_attention", "random"}
"""The rules whose partner may come after the anchor."""


def is_punct_or_space(text: str) -> bool:
    """True for a non-empty string of punctuation and whitespace only (',', ' \\n', '.--')."""
    return bool(text) and all(c.isspace() or unicodedata.category(c).startswith("P") for c in text)


def punct_table(tokenizer, ids: torch.Tensor) -> dict[int, bool]:
    """is_punct_or_space of every distinct id in `ids`, decoding each token alone."""
    return {i: is_punct_or_space(tokenizer.decode([i])) for i in ids.unique().tolist()}


def attention(acts: Activations, sh: Shard) -> torch.Tensor:
    """[n, T, T] head-averaged attention of the hooked layer on the shard's contexts, recomputed."""
    a, lm = acts.spec.activations, acts.lm
    parts = [run_to_layer(lm.model, c.to(lm.device), a.layer).attn.cpu() for c in sh.tokens.split(a.lm_batch_size)]
    return torch.cat(parts)


def rule_stats(sh: Shard, attn: torch.Tensor, rule: str, punct: dict[int, bool]) -> dict[str, torch.Tensor]:
    """Per-anchor figures of one rule on one shard (flat tensors over the anchors)."""
    n, T = sh.tokens.shape
    t = torch.arange(FIRST_ANCHOR, T).expand(n, -1)
    j = sh.partners[rule][:, FIRST_ANCHOR:]
    rows = torch.arange(n)[:, None].expand_as(t)
    q = F.normalize(key_distributions(attn), dim=-1)
    p_tj = attn[rows, t, j]
    non_bos = (1 - attn[rows, t, 0]).clamp_min(1e-12)
    partner_ids = sh.tokens[rows, j]
    return {"dist": (t - j).abs().float().flatten(), "adjacent": ((t - j).abs() == 1).flatten(), "back5": ((t - j) > 5).flatten(), "after": (j > t).flatten(),
            "punct": torch.tensor([punct[i] for i in partner_ids.flatten().tolist()]),
            "same": (partner_ids == sh.tokens[rows, t]).flatten(), "p": p_tj.flatten(),
            "p_nonbos": (p_tj / non_bos).flatten(), "cos": (q[rows, t] * q[rows, j]).sum(-1).flatten()}


def machine() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads"
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {dev}; python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(SPEC), help="a spec with model, corpus and activations sections")
    p.add_argument("--split", default="train", choices=["train", "eval"])
    p.add_argument("--shards", type=int, default=2, help="the split's first N shards")
    args = p.parse_args()
    print(f"$ python {' '.join(shlex.quote(x) for x in sys.argv)}")
    print(f"machine: {machine()}")

    spec = load_spec(ActivationsRunSpec, args.spec, part_of=SweepSpec)
    acts = Activations(spec)
    n_shards = min(args.shards, acts.n_shards[args.split])
    t0 = time.perf_counter()
    figures: dict[str, list[dict[str, torch.Tensor]]] = {r: [] for r in RULES}
    bos, anchor_punct = [], []
    for i in range(n_shards):
        sh = acts.shard(args.split, i)
        attn = attention(acts, sh)
        punct = punct_table(acts.lm.tokenizer, sh.tokens)
        for rule in RULES:
            figures[rule].append(rule_stats(sh, attn, rule, punct))
        bos.append(attn[:, FIRST_ANCHOR:, 0].flatten())
        anchor_punct += [punct[i] for i in sh.tokens[:, FIRST_ANCHOR:].flatten().tolist()]
    a = spec.activations
    n_anchors = sum(len(f["dist"]) for f in figures[RULES[0]])
    print(f"model {spec.model.name}, layer {a.layer}, {args.split} shards 0..{n_shards - 1} "
          f"({n_shards * a.contexts_per_shard} contexts x {a.context_length} tokens), {n_anchors:,} anchors "
          f"(positions >= {FIRST_ANCHOR}); {time.perf_counter() - t0:.0f} s")
    print(f"anchors' mean attention to BOS: {torch.cat(bos).mean():.3f}; anchors that are punctuation/whitespace: "
          f"{sum(anchor_punct) / len(anchor_punct):.1%}\n")
    print("| rule | mean abs(t-j) | median abs(t-j) | adjacent | > 5 back | after t | punct/space | same token | "
          "p(t->j) | of non-BOS | row cos |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rule in RULES:
        f = {k: torch.cat([s[k] for s in figures[rule]]) for k in figures[rule][0]}
        after = f"{f['after'].float().mean():.1%}" if rule in AFTER_ALLOWED else "-"
        print(f"| {rule} | {f['dist'].mean():.1f} | {f['dist'].median():.0f} | {f['adjacent'].float().mean():.1%} | "
              f"{f['back5'].float().mean():.1%} | "
              f"{after} | {f['punct'].float().mean():.1%} | {f['same'].float().mean():.1%} | {f['p'].mean():.3f} | "
              f"{f['p_nonbos'].mean():.3f} | {f['cos'].mean():.3f} |")


if __name__ == "__main__":
    main()
