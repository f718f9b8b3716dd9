"""The one training loop: `Trainer.fit(batches, hooks)`, used by `csc train`, sweep trials and the benchmarks.

Loss of step t: L = sum over the run's terms (csc.sae.losses.build_terms) of weight_t * value. Step 0 first
starts the SAE from the first batch (SparseAutoencoder.init_from_data, trainer.data_init). A term marked
optional (InfoNCE) is not computed at a step where its weight is 0, so gamma = 0 is exactly the plain SAE.
The model stays in fp32; with bf16 autocast only the SAE's forward matmuls run in bf16, the losses are
computed in fp32. After each optimiser step the architecture updates its own state (`after_step`).

Every `log_every` steps, and after the last, the hooks get a report: the mean of each per-step metric over
the steps since the previous report, with step, tokens, lr and the weights in force at the last step, and
the training throughput since the previous report (tokens_per_s). The running sums are part of the
trainer's state, so a resumed run reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from csc.errors import CscError, DivergenceError, SpecError
from csc.sae import metrics
from csc.sae.archs import ARCHITECTURES, build_sae, sae_class
from csc.sae.batch import ActivationBatch
from csc.sae.config import TrainerConfig
from csc.sae.dead import DeadLatentTracker
from csc.sae.losses import TERM_NAMES, StepInputs, build_terms
from csc.sae.model import BaseSaeConfig, ForwardOutput, SparseAutoencoder
from csc.sae.optim import ConstrainedAdam

Metrics = dict[str, float]

TRAINING_METRICS: tuple[str, ...] = ("loss", *TERM_NAMES, "l0", "ev", "dead_frac", "grad_norm", "nce_grad_share")
"""Per-step metrics, averaged in every report: the names a sweep may optimise or schedule on. nce_grad_share
(steps with InfoNCE only) is ||g_nce|| / (||g_nce|| + ||g_mse||), g the weighted terms' gradients on the
anchors' pre-activations: what share of the encoder's push from the anchors the contrastive term has. It is
measured at the last step of each report (at every step with trainer.balance, which steers by it), since it
costs two extra backward passes."""
LAST_VALUE = ("step", "tokens", "lr")
"""Report keys that carry their value at the report's last step (and the terms' weights)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(cfg: TrainerConfig, step: int) -> float:
    """Linear warm-up from lr_warmup_start (step 0) to lr (step lr_warmup_steps), lr until the decay, then a linear
    fall over the last lr_decay_steps steps towards lr_end, which it would reach at step `steps` (as
    dictionary_learning's schedule: the last step still moves, by lr_end + (lr - lr_end) / lr_decay_steps)."""
    warmup = cfg.warmup("lr_warmup_steps")
    if step < warmup:
        return cfg.lr_warmup_start + (cfg.lr - cfg.lr_warmup_start) * step / warmup
    if cfg.lr_decay_steps == 0 or step < cfg.steps - cfg.lr_decay_steps:
        return cfg.lr
    left = max(cfg.steps - step, 0) / cfg.lr_decay_steps
    return cfg.lr_end + (cfg.lr - cfg.lr_end) * left


class Hook:
    """Called by `Trainer.fit`; override what you need."""

    def on_step(self, trainer: "Trainer", metrics: Metrics) -> None:
        """After every optimiser step, with that step's metrics."""

    def on_report(self, trainer: "Trainer", report: Metrics) -> None:
        """Every `log_every` steps and after the last step, with the averaged report."""


class Trainer:
    """Trains one SAE. Pass `model` to start from given weights (they are checked, not copied)."""

    def __init__(self, sae_cfg: BaseSaeConfig, cfg: TrainerConfig, *, model: SparseAutoencoder | None = None):
        cls = sae_class(sae_cfg.architecture)
        if cfg.revival == "auxk" and not cls.supports_auxk:
            able = ", ".join(name for name, c in ARCHITECTURES.items() if c.supports_auxk)
            raise SpecError(f"trainer.revival 'auxk' needs an architecture with TopK codes ({able}), "
                            f"not {sae_cfg.architecture!r}: its dead latents have no positive pre-activation "
                            f"for AuxK to train")
        if cfg.target_l0 is not None and cls.sparsity_term is None:
            raise SpecError(f"trainer.target_l0 steers the sparsity penalty, which {sae_cfg.architecture!r} does "
                            f"not have: set sae.k instead")
        self.sae_cfg = sae_cfg
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        # bf16 only where the hardware has it; CPU autocast would be slow and change numerics.
        self.use_bf16 = (cfg.autocast == "bf16" and self.device.type == "cuda"
                         and torch.cuda.is_bf16_supported())
        torch.manual_seed(cfg.seed)
        self.model = model if model is not None else build_sae(sae_cfg, seed=cfg.seed)
        if self.model.cfg != sae_cfg:
            raise CscError("the model's SaeConfig differs from the one given to the Trainer")
        self.model.to(self.device).train()
        self.model.check_not_degenerate()
        self.optimizer = ConstrainedAdam(self.model.parameters(), [self.model.W_dec], lr=cfg.lr)
        self.terms = build_terms(self.model, cfg)
        self.dead = DeadLatentTracker(sae_cfg.dict_size, cfg.dead_window_tokens, self.device)
        self.step = 0
        """Optimiser steps taken so far; also the number of batches consumed."""
        self.tokens = 0
        """Anchor tokens trained on so far."""
        self.last_report: Metrics | None = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._clock = (time.perf_counter(), 0)  # (time, tokens) at the previous report

    @property
    def batches_consumed(self) -> int:
        """Data position: a resumed run must be fed the stream from this batch on."""
        return self.step

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.steps

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.encode(x)

    def update(self, step: int, batch: ActivationBatch) -> Metrics:
        """Take optimiser step `step` (0-based, must equal self.step) on one batch; returns its metrics."""
        if step != self.step:
            raise ValueError(f"update(step={step}) but the trainer is at step {self.step}")
        cfg, model = self.cfg, self.model
        batch = batch.to(self.device)
        x = batch.anchors.float()
        if step == 0 and cfg.data_init:
            model.init_from_data(x, cfg.start_l0(model.cfg.dict_size))
        lr = lr_at(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        with self._autocast():
            out = model(x)
        out32 = ForwardOutput(x=x, pre=out.pre, z=out.z.float(), x_hat=out.x_hat.float())
        inputs = StepInputs(batch, out32, model, self.dead.dead_mask, self._encode, step)
        weights = {t.weight_name: t.weight(step) for t in self.terms}
        values = {t.name: t(inputs) for t in self.terms if not (t.optional and weights[t.weight_name] == 0)}
        loss = sum(weights[t.weight_name] * values[t.name] for t in self.terms if t.name in values)
        terms = {**values, "loss": loss}
        self._check_finite(step, terms)

        self.optimizer.zero_grad(set_to_none=True)
        shares = self._observe_gradients(step, out32, values, weights)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise DivergenceError(f"step {step}: the gradient norm is {grad_norm.item()} "
                                  f"(loss terms were finite)")
        self.optimizer.step()
        model.after_step(out)
        for t in self.terms:
            t.after_step(step, out32)

        self.dead.update(out.z)
        self.step += 1
        self.tokens += len(batch)
        with torch.no_grad():
            names = ["loss", *values]
            stacked = torch.stack([terms[n].detach().float() for n in names] + [
                metrics.l0(out32.z), metrics.explained_variance(x, out32.x_hat),
                self.dead.dead_fraction(), grad_norm.float()]).tolist()
        result: Metrics = {"step": float(self.step), "tokens": float(self.tokens), "lr": lr, **weights}
        result.update(zip(names + ["l0", "ev", "dead_frac", "grad_norm"], stacked))
        result.update(shares)
        return result

    def _observe_gradients(self, step: int, out: ForwardOutput, values: dict[str, torch.Tensor],
                           weights: dict[str, float]) -> Metrics:
        """InfoNCE's share of the gradient on the anchors' pre-activations (and its balancing, if on), at the
        steps that need it: two extra backward passes (the decoder's and InfoNCE's) cost about half a step."""
        if "nce" not in values:
            return {}
        term = next(t for t in self.terms if t.name == "nce")
        if term.balance is None and not self._reported(step + 1):
            return {}
        g_rec = torch.autograd.grad(weights["alpha"] * values["mse"], out.pre, retain_graph=True)[0].float().norm()
        g_nce = torch.autograd.grad(values["nce"], out.pre, retain_graph=True)[0].float().norm()
        rec, nce = g_rec.item(), g_nce.item()
        if term.balance is not None:
            term.balance.observe(rec, nce)
        weighted = weights["gamma"] * nce
        return {"nce_grad_share": weighted / max(weighted + rec, 1e-30)}

    @staticmethod
    def _check_finite(step: int, terms: dict[str, torch.Tensor]) -> None:
        finite = torch.stack([torch.isfinite(t.detach()) for t in terms.values()])
        if bool(finite.all()):
            return
        for name, t in terms.items():
            if not torch.isfinite(t):
                raise DivergenceError(f"step {step}: loss term '{name}' is {t.item()}")

    def _reported(self, steps_taken: int) -> bool:
        """Whether a report follows the step that brings the trainer to `steps_taken` steps."""
        return steps_taken % self.cfg.log_every == 0 or steps_taken >= self.cfg.steps

    def _accumulate(self, m: Metrics) -> Metrics | None:
        """Add one step's metrics to the running sums; the report when one is due."""
        for key in TRAINING_METRICS:
            if key in m:  # a term absent at some steps (InfoNCE during its warm-up) averages over its own steps
                self._sums[key] = self._sums.get(key, 0.0) + m[key]
                self._counts[key] = self._counts.get(key, 0) + 1
        if not self._reported(self.step):
            return None
        report = {k: v / self._counts[k] for k, v in self._sums.items()}
        report.update({k: v for k, v in m.items() if k not in TRAINING_METRICS})
        t0, tokens0 = self._clock
        now = time.perf_counter()
        report["tokens_per_s"] = (self.tokens - tokens0) / max(now - t0, 1e-9)
        self._sums, self._counts, self._clock = {}, {}, (now, self.tokens)
        self.last_report = report
        return report

    def fit(self, batches: Iterable[ActivationBatch], hooks: Sequence[Hook] = ()) -> Metrics | None:
        """Train until cfg.steps or until `batches` runs out; return the last report (reports come every
        log_every steps and after step cfg.steps, so a stream that runs out earlier may leave steps unreported
        until a resumed fit continues them, and None before the first report).

        `batches` must start at `self.batches_consumed` (a fresh trainer: the start of the stream).
        Raises CscError if the trainer has still taken no step at all: a 0-step SAE has no result.
        """
        self._clock = (time.perf_counter(), self.tokens)
        for batch in batches:
            if self.done:
                break
            m = self.update(self.step, batch)
            report = self._accumulate(m)  # first, so that a checkpoint taken by on_step holds the sums
            for hook in hooks:
                hook.on_step(self, m)
            if report is not None:
                for hook in hooks:
                    hook.on_report(self, report)
        if self.step == 0:
            raise CscError("training ran 0 steps (the batch stream was empty): "
                           "refusing to report a result for an untrained SAE")
        return self.last_report

    # ------------------------------------------------------------------ state (csc.sae.checkpoint serialises it)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit: tensors and JSON-able values, nested."""
        opt = self.optimizer.state_dict()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = {str(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        return {
            "sae_config": self.sae_cfg.model_dump(),
            "trainer_config": self.cfg.model_dump(),
            "step": self.step,
            "tokens": self.tokens,
            "model": dict(self.model.state_dict()),
            "optimizer": {"state": {str(i): dict(s) for i, s in opt["state"].items()},
                          "param_groups": opt["param_groups"]},
            "terms": {t.name: t.state_dict() for t in self.terms},
            "dead": self.dead.tokens_since_fired,
            "rng": rng,
            "report": {"sums": self._sums, "counts": self._counts, "last": self.last_report},
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "state") -> None:
        self.model.load_tensors(state["model"], source)
        groups = [{**g, "betas": tuple(g["betas"])} for g in state["optimizer"]["param_groups"]]
        self.optimizer.load_state_dict({"state": {int(i): s for i, s in state["optimizer"]["state"].items()},
                                        "param_groups": groups})
        for t in self.terms:
            t.load_state_dict(state["terms"][t.name])
        self.dead.tokens_since_fired.copy_(state["dead"])
        self.step, self.tokens = state["step"], state["tokens"]
        report = state["report"]
        self._sums, self._counts, self.last_report = dict(report["sums"]), dict(report["counts"]), report["last"]
        torch.set_rng_state(state["rng"]["cpu"])
        cuda = state["rng"].get("cuda")
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([cuda[str(i)] for i in range(len(cuda))])
