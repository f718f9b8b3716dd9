"""The loss terms. Each is one class: a name (its metric name), a weight schedule and how it is computed
from the step's forward output; the trainer sums weight * value over `build_terms`. Conventions match
csc.sae.metrics:

    mse        mean_{i,d} (x_id - x_hat_id)^2                            weight alpha
    prefix_mse sum_w mean_{i,d} (x_id - x_hat^w_id)^2 over inner prefixes weight alpha (matryoshka_batchtopk)
    l1         mean_i sum_j |z_ij| / sqrt(d)     (relu)                 weight beta (warm-up, target L0)
    l0_penalty mean_i sum_j H(pre_ij - theta_j)  (jumprelu)             weight beta (warm-up, target L0)
    nce        InfoNCE over codes, see info_nce_loss                     weight gamma (warm-up, balance)
    auxk       AuxK of Gao et al., see auxk_loss (trainer.revival auxk)  weight auxk_coef

Scales. Activations are normalised to norm ~sqrt(d), so mse (per dimension) is ~1 for a reconstruction by
zero and l1 (in units of the input's norm) grows like sqrt(L0), so beta's useful range should not depend on
d (the paper's 0.04 gives L0 ~70 on the embedded model, bench/README.md section 7), and InfoNCE (O(1),
chance ln B) is on the reconstruction's scale: at gamma 0.1 it has about half of the encoder's gradient from
the anchors. Summing mse over d instead gave it 0.1% (59-2000x less gradient on W_enc than the
reconstruction's), and the contrastive term did nothing.

The sparsity term is the architecture's own (SparseAutoencoder.sparsity_loss). Adding a term: a class here,
its name in TERM_NAMES and a line in build_terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from csc.sae.archs import ARCHITECTURES
from csc.sae.batch import ActivationBatch
from csc.sae.config import TrainerConfig
from csc.sae.metrics import l0, mse
from csc.sae.model import ForwardOutput, SparseAutoencoder
from csc.sae.similarity import CosineColumns, CosineGram, RowCosine
from csc.sae.weighting import GradientBalance, L0Controller, ramp

NEG_INF = float("-inf")


def info_nce_loss(z_anchor: torch.Tensor, z_partner: torch.Tensor | None, seq_id: torch.Tensor,
                  temperature: float, hard_negatives: int = 0, *, negatives: torch.Tensor | None = None,
                  partner_index: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE over SAE codes with cosine similarity.

    With a_i, p_i the unit-norm codes of anchor i and its partner (all-zero codes stay zero, so
    their cosines are 0 rather than NaN) and tau the temperature:

        pos_i  = (a_i . p_i) / tau
        neg_ij = (a_i . a_j) / tau   for anchors j in N (every anchor, or the rows `negatives` names)
                                     with seq_id[j] != seq_id[i] (same-sequence anchors, i itself
                                     included, are masked out)
        loss_i = logsumexp([pos_i, neg_i*]) - pos_i

    The partner's code is z_partner[i], or, with `partner_index` ([B] int64) instead, the anchor
    z_anchor[partner_index[i]] (then pos_i is read off the similarity matrix when it holds that column);
    anchors with partner_index -1 have no partner and no loss_i.
    hard_negatives = m > 0 keeps only the m largest neg_ij of each anchor (fewer if it has fewer).
    The result is the mean of loss_i over anchors with at least one negative and a partner. An anchor
    without negatives has no contrastive task (its loss_i would be exactly 0 with zero gradient), so it
    is left out of the mean rather than diluting it; a batch where no anchor counts returns 0.
    """
    z = z_anchor.float()
    if negatives is None:
        valid = seq_id[:, None] != seq_id[None, :]
        sim = CosineGram.apply(z)
    else:
        valid = seq_id[:, None] != seq_id[negatives][None, :]
        sim = CosineColumns.apply(z, negatives)
    counted = valid.any(dim=1)
    if partner_index is None:
        pos = RowCosine.apply(z, z_partner.float())
    else:
        counted &= partner_index >= 0
        rows = partner_index.clamp(min=0)
        pos = sim.gather(1, rows[:, None])[:, 0] if negatives is None else RowCosine.apply(z, z[rows])
    pos = pos / temperature
    neg = (sim / temperature).masked_fill_(~valid, NEG_INF)
    if 0 < hard_negatives < neg.shape[1]:
        neg = neg.topk(hard_negatives, dim=1).values
    per_anchor = torch.logaddexp(pos, torch.logsumexp(neg, dim=1)) - pos
    if not counted.any():
        return pos.sum() * 0.0 + 0.0  # keeps the graph; "+ 0.0" turns -0.0 into 0.0
    return per_anchor[counted].mean()


def auxk_loss(x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, W_dec: torch.Tensor,
              dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024): let dead latents reconstruct what the live ones miss.

    e = x - x_hat (detached: only dead latents learn from this term). Among dead latents take the
    k_aux largest pre-activations per token, ReLU them, decode without bias to e_hat, and return
    sum ||e - e_hat||^2 / sum ||e - mean(e)||^2. With TopK, dead latents still have positive
    pre-activations that merely lose the top-k race, so they receive gradient here.
    Returns 0 when no latent is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.sum() * 0.0 + 0.0
    e = (x - x_hat).detach().float()
    masked = pre.float().masked_fill(~dead, NEG_INF)
    values, idx = masked.topk(min(k_aux, n_dead), dim=-1)
    e_hat = torch.zeros_like(pre, dtype=torch.float32).scatter(-1, idx, values.relu()) @ W_dec.float()
    total = (e - e.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    return (e - e_hat).pow(2).sum() / total


@dataclass
class StepInputs:
    """What a term may read at one step. `out` holds fp32 codes and reconstruction of the anchors."""

    batch: ActivationBatch
    out: ForwardOutput
    model: SparseAutoencoder
    dead: Callable[[], torch.Tensor]
    """The dead-latent mask [dict_size] before this step."""
    encode: Callable[[torch.Tensor], torch.Tensor]
    """The model's encoder under the trainer's autocast (for partner codes of a batch of tokens)."""
    step: int = 0
    """The optimiser step (0-based)."""


class LossTerm:
    name: str
    """Metric name of the term's value (also in TERM_NAMES)."""
    weight_name: str
    """Metric name of its weight in force."""
    optional: bool = False
    """Not computed at all at a step where its weight is 0 (its cost matters, and weight 0 must be exactly
    the model without it)."""

    def weight(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int, out: ForwardOutput) -> None:
        """Update the weight schedule's state from step `step`'s forward output (nothing by default)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Reconstruction(LossTerm):
    name, weight_name = "mse", "alpha"

    def __init__(self, cfg: TrainerConfig):
        self.alpha = cfg.alpha

    def weight(self, step: int) -> float:
        return self.alpha

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        return mse(inputs.out.x, inputs.out.x_hat)


class PrefixReconstruction(LossTerm):
    """Matryoshka's nested losses: the MSE of the reconstruction from each inner prefix of the dictionary
    (SparseAutoencoder.prefix_widths, decode_prefixes), summed, at the reconstruction's weight alpha (SAELens adds
    each inner_mse_loss to the loss with weight 1, as it does the full MSE)."""

    name, weight_name = "prefix_mse", "alpha"

    def __init__(self, cfg: TrainerConfig, widths: list[int]):
        self.alpha, self.widths = cfg.alpha, widths

    def weight(self, step: int) -> float:
        return self.alpha

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        out = inputs.out
        return sum(mse(out.x, r) for r in inputs.model.decode_prefixes(out.z, out.x, self.widths))


class Sparsity(LossTerm):
    """The architecture's sparsity penalty (its name: the architecture's `sparsity_term`). beta warms up; with
    trainer.target_l0 it then follows csc.sae.weighting.L0Controller."""

    weight_name = "beta"

    def __init__(self, name: str, cfg: TrainerConfig):
        self.name = name
        self.beta, self.warmup = cfg.beta, cfg.warmup("beta_warmup_steps")
        self.control = L0Controller(cfg.target_l0, cfg.target_l0_rate) if cfg.target_l0 is not None else None

    def weight(self, step: int) -> float:
        scale = 1.0 if self.control is None else self.control.multiplier
        return self.beta * scale * ramp(step, self.warmup)

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        return inputs.model.sparsity_loss(inputs.out)

    def after_step(self, step: int, out: ForwardOutput) -> None:
        if self.control is not None and step >= self.warmup:  # during the warm-up beta is not yet what acts
            self.control.observe(l0(out.z).item())

    def state_dict(self) -> dict:
        return self.control.state_dict() if self.control is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.control is not None:
            self.control.load_state_dict(state)


class InfoNCE(LossTerm):
    """gamma * info_nce_loss over the codes of anchors and partners, restricted to the first
    round(nce_latents * dict_size) latents (Temporal SAEs' "high-level" share; all of them by default); gamma
    warms up and, with trainer.balance, follows csc.sae.weighting.GradientBalance."""

    name, weight_name, optional = "nce", "gamma", True

    def __init__(self, cfg: TrainerConfig, dict_size: int):
        self.cfg = cfg
        self.latents = cfg.nce_latent_count(dict_size)
        self.warmup = cfg.warmup("gamma_warmup_steps")
        self.balance = GradientBalance(cfg.balance_share, cfg.balance_ema) if cfg.balance else None

    def weight(self, step: int) -> float:
        g = self.cfg.gamma if self.balance is None else self.balance.weight(self.cfg.gamma)
        return g * ramp(step, self.warmup)

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        m, batch, cfg = self.latents, inputs.batch, self.cfg
        z = inputs.out.z[:, :m]
        # Partners in the batch are anchors whose codes the step has computed; otherwise they are encoded here.
        z_partner = None if batch.partner_index is not None else inputs.encode(batch.partners.float())[:, :m]
        return info_nce_loss(z, z_partner, batch.seq_id, cfg.temperature, cfg.hard_negatives,
                             negatives=self.negatives(len(batch), inputs.step, z.device),
                             partner_index=batch.partner_index)

    def negatives(self, batch_size: int, step: int, device: torch.device) -> torch.Tensor | None:
        """The rows every anchor is compared with at `step` (trainer.negatives of them, drawn from the seed and the
        step alone, so a resumed run draws the same), or None for all of them."""
        n = self.cfg.negatives
        if n == 0 or n >= batch_size:
            return None
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        return torch.randperm(batch_size, generator=gen)[:n].to(device)

    def state_dict(self) -> dict:
        return self.balance.state_dict() if self.balance is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.balance is not None:
            self.balance.load_state_dict(state)


class AuxK(LossTerm):
    name, weight_name = "auxk", "auxk_coef"

    def __init__(self, cfg: TrainerConfig):
        self.coef, self.k = cfg.auxk_coef, cfg.auxk_k

    def weight(self, step: int) -> float:
        return self.coef

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        out = inputs.out
        return auxk_loss(out.x, out.x_hat, out.pre, inputs.model.W_dec, inputs.dead(), self.k)


TERM_NAMES: tuple[str, ...] = (
    Reconstruction.name, PrefixReconstruction.name,
    *dict.fromkeys(a.sparsity_term for a in ARCHITECTURES.values() if a.sparsity_term),
    InfoNCE.name, AuxK.name,
)
"""Every term's metric name: the single list that reports, plots and sweep objectives draw on."""
WEIGHT_NAMES: tuple[str, ...] = (Reconstruction.weight_name, Sparsity.weight_name, InfoNCE.weight_name,
                                 AuxK.weight_name)
"""The metric names of the terms' weights in force."""


def build_terms(model: SparseAutoencoder, cfg: TrainerConfig) -> list[LossTerm]:
    """The terms of one training run, in the order they are summed and logged."""
    terms: list[LossTerm] = [Reconstruction(cfg)]
    if widths := model.prefix_widths():
        terms.append(PrefixReconstruction(cfg, widths))
    if model.sparsity_term is not None:
        terms.append(Sparsity(model.sparsity_term, cfg))
    if cfg.gamma > 0:
        terms.append(InfoNCE(cfg, model.cfg.dict_size))
    if cfg.revival == "auxk":
        terms.append(AuxK(cfg))
    return terms
