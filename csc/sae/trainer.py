"""Training loop of the contrastive SAE: one `update` per batch, `train` over a batch stream.

Loss of step t, with the weights of csc.sae.weighting in force:

    L = alpha_t * mse + beta_t * l1 + gamma_t * info_nce + auxk_coef * auxk

info_nce is computed only when gamma_t > 0 (so gamma = 0 is exactly the plain SAE) and auxk only
when revival = "auxk" and some latent is dead. The model stays in fp32; with bf16 autocast only the
SAE's forward matmuls run in bf16, the losses are computed in fp32.
"""

from collections.abc import Callable, Iterable

import torch

from csc.activations.batch import ActivationBatch
from csc.errors import CscError, DivergenceError, SpecError
from csc.sae import metrics
from csc.sae.config import SaeConfig, TrainerConfig
from csc.sae.dead import DeadLatentTracker
from csc.sae.losses import auxk_loss, info_nce_loss, l1_loss, mse_loss
from csc.sae.model import SparseAutoencoder
from csc.sae.optim import ConstrainedAdam
from csc.sae.weighting import LossWeighting

Metrics = dict[str, float]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(cfg: TrainerConfig, step: int) -> float:
    """Linear warm-up from lr_warmup_start (step 0) to lr (step lr_warmup_steps and after)."""
    if step >= cfg.lr_warmup_steps:
        return cfg.lr
    return cfg.lr_warmup_start + (cfg.lr - cfg.lr_warmup_start) * step / cfg.lr_warmup_steps


class Trainer:
    """Trains one SAE. Pass `model` to start from given weights (they are checked, not copied)."""

    def __init__(self, sae_cfg: SaeConfig, cfg: TrainerConfig, *,
                 model: SparseAutoencoder | None = None):
        if cfg.revival == "auxk" and sae_cfg.architecture != "topk":
            raise SpecError("revival 'auxk' needs architecture 'topk': dead ReLU latents have "
                            "no positive pre-activation for AuxK to train")
        self.sae_cfg = sae_cfg
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        # bf16 only where the hardware has it; CPU autocast would be slow and change numerics.
        self.use_bf16 = (cfg.autocast == "bf16" and self.device.type == "cuda"
                         and torch.cuda.is_bf16_supported())
        torch.manual_seed(cfg.seed)
        self.model = model if model is not None else SparseAutoencoder(sae_cfg, seed=cfg.seed)
        if self.model.cfg != sae_cfg:
            raise CscError("the model's SaeConfig differs from the one given to the Trainer")
        self.model.to(self.device)
        self.model.check_not_degenerate()
        self.optimizer = ConstrainedAdam(self.model.parameters(), [self.model.W_dec], lr=cfg.lr)
        self.weighting = LossWeighting(cfg)
        self.dead = DeadLatentTracker(sae_cfg.dict_size, cfg.dead_window_tokens, self.device)
        self.step = 0
        """Optimiser steps taken so far; also the number of batches consumed."""
        self.tokens = 0
        """Anchor tokens trained on so far."""
        self.last_metrics: Metrics | None = None

    @property
    def batches_consumed(self) -> int:
        """Data position: a resumed run must be fed the stream from this batch on."""
        return self.step

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.steps

    def update(self, step: int, batch: ActivationBatch) -> Metrics:
        """Take optimiser step `step` (0-based, must equal self.step) on one batch."""
        if step != self.step:
            raise ValueError(f"update(step={step}) but the trainer is at step {self.step}")
        cfg, model = self.cfg, self.model
        batch = batch.to(self.device)
        x = batch.anchors.float()
        if step == 0 and cfg.init_b_dec:
            model.init_b_dec(x)
        w = self.weighting.at(step)
        lr = lr_at(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            pre = model.pre_activations(x)
            z = model.activate(pre)
            x_hat = model.decode(z)
            z_partner = model.encode(batch.partners.float()) if w.gamma > 0 else None
        z32, x_hat32 = z.float(), x_hat.float()

        terms = {"mse": mse_loss(x, x_hat32), "l1": l1_loss(z32)}
        loss = w.alpha * terms["mse"] + w.beta * terms["l1"]
        if z_partner is not None:
            terms["nce"] = info_nce_loss(z32, z_partner, batch.seq_id, cfg.temperature,
                                         cfg.hard_negatives)
            loss = loss + w.gamma * terms["nce"]
        if cfg.revival == "auxk":
            terms["auxk"] = auxk_loss(x, x_hat32, pre, model.W_dec, self.dead.dead_mask(), cfg.auxk_k)
            loss = loss + cfg.auxk_coef * terms["auxk"]
        terms["loss"] = loss
        self._check_finite(step, terms)

        self.optimizer.zero_grad(set_to_none=True)
        if cfg.balance and "nce" in terms:
            g_mse = torch.autograd.grad(w.alpha * terms["mse"], z, retain_graph=True)[0]
            g_nce = torch.autograd.grad(terms["nce"], z, retain_graph=True)[0]
            self.weighting.observe(g_mse.float().norm().item(), g_nce.float().norm().item())
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise DivergenceError(f"step {step}: the gradient norm is {grad_norm.item()} "
                                  f"(loss terms were finite)")
        self.optimizer.step()

        self.dead.update(z)
        self.step += 1
        self.tokens += len(batch)
        with torch.no_grad():
            names = list(terms)
            values = torch.stack([terms[n].detach().float() for n in names] + [
                metrics.l0(z32), metrics.explained_variance(x, x_hat32),
                self.dead.dead_fraction(), grad_norm.float()]).tolist()
        out: Metrics = {"step": float(self.step), "tokens": float(self.tokens), "lr": lr,
                        "alpha": w.alpha, "beta": w.beta, "gamma": w.gamma}
        out.update(zip(names + ["l0", "ev", "dead_frac", "grad_norm"], values))
        self.last_metrics = out
        return out

    @staticmethod
    def _check_finite(step: int, terms: dict[str, torch.Tensor]) -> None:
        finite = torch.stack([torch.isfinite(t.detach()) for t in terms.values()])
        if bool(finite.all()):
            return
        for name, t in terms.items():
            if not torch.isfinite(t):
                raise DivergenceError(f"step {step}: loss term '{name}' is {t.item()}")

    def train(self, batches: Iterable[ActivationBatch],
              callback: Callable[[Metrics], None] | None = None) -> Metrics:
        """Train until cfg.steps or until `batches` runs out; return the last step's metrics.

        `batches` must start at `self.batches_consumed` (a fresh trainer: the start of the stream).
        `callback` gets the metrics dict every cfg.log_every steps and after step cfg.steps.
        Raises CscError if the trainer has still taken no step at all: a 0-step SAE has no result.
        """
        for batch in batches:
            if self.done:
                break
            out = self.update(self.step, batch)
            if callback is not None and (self.step % self.cfg.log_every == 0 or self.done):
                callback(out)
        if self.step == 0:
            raise CscError("training ran 0 steps (the batch stream was empty): "
                           "refusing to report a result for an untrained SAE")
        return self.last_metrics
