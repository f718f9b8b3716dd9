"""Positive pairs for the contrastive term: for every anchor token, the token of its own context it is paired with.

Anchors are the same tokens under every rule: positions >= FIRST_ANCHOR (2) of every context. BOS (position
0) is never an anchor nor a partner; position 1 is no anchor because `attended` and `previous` have no
candidate for it but BOS. So rules compare at identical token budgets, and a shard stores every rule's
partners (`partner_<rule>`, -1 at positions 0 and 1) for one cache shared by all of them.

The rules, from the head-averaged attention probabilities p(t -> j) of the hooked layer ([B, T, T]):
- `similar_attention` (the paper's "activations from the same sequence that attend to similar tokens"):
  the partner of t is argmax over j >= 1, j != t of cos(q_t, q_j), where q_t is row t of the attention
  with the BOS column dropped and renormalised (zero beyond t, by causality). BOS is dropped because it
  takes most of the attention on Gemma 3 (58% at layer 12) and would make every row look alike. j may
  come after t: a context's activations are all computed and cached together, so a later token is as
  available as an earlier one, the paper names no direction, and a causal restriction would leave the
  anchor at position 2 one forced candidate and early anchors few. Cosine is symmetric, so "t's rows are
  alike" is one relation; a later j can still only match t on keys both see (row j's mass on keys
  after t lowers the cosine).
- `attended` (csc's first rule): argmax over 1 <= j < t of p(t -> j), never itself, never BOS.
- `previous` (control): t - 1.
- `random` (control): uniform over the same candidates as `similar_attention` (j >= 1, j != t), drawn
  from a generator seeded by the split and shard index, so a rebuilt cache holds the same pairs.
Ties go to the lowest j (torch.argmax). A row whose mass is all on BOS has cosine 0 with every row and
takes the lowest candidate.
"""

from __future__ import annotations

import hashlib
from typing import get_args

import torch
import torch.nn.functional as F

from csc.config import PairingRule

RULES: tuple[PairingRule, ...] = get_args(PairingRule)
FIRST_ANCHOR = 2
"""The first position that is an anchor (under every rule)."""


def tensor_name(rule: PairingRule) -> str:
    """The shard tensor that holds `rule`'s partners."""
    return f"partner_{rule}"


def shard_seed(split: str, index: int) -> int:
    """Seed of the `random` rule for one shard: a function of where the shard is, nothing else."""
    digest = hashlib.sha256(f"csc random partners {split} {index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _finish(partner: torch.Tensor) -> torch.Tensor:
    """Mark the non-anchor positions with -1."""
    partner[..., :FIRST_ANCHOR] = -1
    return partner


def attended_partners(attn: torch.Tensor) -> torch.Tensor:
    """[B, T, T] attention -> [B, T] int64: the earlier non-BOS key each token attends to most."""
    T = attn.shape[-1]
    t = torch.arange(T, device=attn.device)
    allowed = (t[None, :] < t[:, None]) & (t[None, :] >= 1)  # j < t (causal, not self) and j != BOS
    return _finish(attn.masked_fill(~allowed, float("-inf")).argmax(dim=-1))


def key_distributions(attn: torch.Tensor) -> torch.Tensor:
    """[B, T, T] attention rows with the BOS column zeroed and renormalised to sum 1 (all-zero if all was BOS)."""
    q = attn.float().clone()
    q[..., 0] = 0
    return q / q.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)


def similar_attention_partners(attn: torch.Tensor) -> torch.Tensor:
    """[B, T, T] attention -> [B, T] int64: the other non-BOS token whose attention row is most similar (cosine)."""
    T = attn.shape[-1]
    q = F.normalize(key_distributions(attn), dim=-1)
    sim = q @ q.transpose(-1, -2)  # [B, T, T] cosines of the rows
    t = torch.arange(T, device=attn.device)
    allowed = (t[None, :] != t[:, None]) & (t[None, :] >= 1)
    return _finish(sim.masked_fill(~allowed, float("-inf")).argmax(dim=-1))


def previous_partners(n: int, T: int) -> torch.Tensor:
    """[n, T] int64: t - 1."""
    return _finish(torch.arange(-1, T - 1).expand(n, T).clone())


def random_partners(n: int, T: int, seed: int) -> torch.Tensor:
    """[n, T] int64: uniform over {1..T-1} without t, drawn from `seed` (the same seed gives the same draws)."""
    r = torch.randint(0, T - 2, (n, T), generator=torch.Generator().manual_seed(seed))
    j = r + 1  # 1..T-2; shifting j >= t up by one skips t and reaches T-1
    return _finish(j + (j >= torch.arange(T)).long())


def attention_partners(attn: torch.Tensor) -> dict[PairingRule, torch.Tensor]:
    """The rules that read the attention, for one LM batch ([B, T, T] -> {rule: [B, T] int64})."""
    return {"similar_attention": similar_attention_partners(attn), "attended": attended_partners(attn)}


def position_partners(n: int, T: int, seed: int) -> dict[PairingRule, torch.Tensor]:
    """The rules that need positions only, drawn once per shard (so the draws do not depend on LM batching)."""
    return {"previous": previous_partners(n, T), "random": random_partners(n, T, seed)}


def all_partners(attn: torch.Tensor, seed: int) -> dict[PairingRule, torch.Tensor]:
    """Every rule's partners for the contexts of `attn` ([B, T, T]), in RULES order."""
    n, T = attn.shape[0], attn.shape[-1]
    found = {**attention_partners(attn), **position_partners(n, T, seed)}
    return {rule: found[rule] for rule in RULES}


def check_partners(partners: torch.Tensor) -> str | None:
    """Why `partners` ([n, T]) breaks the anchor contract (-1 before FIRST_ANCHOR, a real other token after),
    or None. A shard that breaks it would pair anchors with the wrong rows without any error."""
    T = partners.shape[-1]
    head, tail = partners[:, :FIRST_ANCHOR], partners[:, FIRST_ANCHOR:]
    if not (head == -1).all():
        return "positions 0 and 1 must have no partner (-1)"
    t = torch.arange(FIRST_ANCHOR, T)
    if not ((tail >= 1) & (tail < T) & (tail != t)).all():
        return "an anchor's partner is BOS, itself or outside the context"
    return None
