"""The rung figures (csc.pipeline.rung) on the tiny model's held-out activations: equal to the figures' formulas
computed anchor by anchor on the same slice, equal to the final evaluation's where the slice is every held-out
context, measured in inference mode, and invisible to training."""

import math

import pytest
import torch

from csc.activations.pairing import FIRST_ANCHOR
from csc.activations.source import Activations
from csc.config import TrainRunSpec
from csc.pipeline.rung import FIGURES, PREFIX, SECONDS, HeldOutSlice
from csc.pipeline.run import held_out_scores, training_stream
from csc.sae.trainer import Trainer
from csc.spec_loader import load_spec
from tests.conftest import fit, without_clock

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["model.name=tiny-gemma2", "activations.layer=2", "activations.context_length=32",
        "activations.contexts_per_shard=8", "activations.lm_batch_size=4", "activations.train_tokens=512",
        "activations.eval_tokens=512", "sae.dict_size=64", "trainer.steps=12", "trainer.batch_size=128",
        "trainer.log_every=4", "trainer.gamma=0.1", "trainer.temperature=0.5", "activations.pairing=previous"]


def _spec(cache, *more: str) -> TrainRunSpec:
    return load_spec(TrainRunSpec, None, [*TINY, f"activations.cache_dir={cache}", *more])


def _trained(spec: TrainRunSpec, acts: Activations) -> Trainer:
    trainer = Trainer(spec.sae.model_copy(update={"d_in": acts.d_model}), spec.trainer)
    trainer.fit(training_stream(acts, spec.trainer.batch_size, spec.trainer.seed))
    return trainer


def _slow(spec: TrainRunSpec, acts: Activations, sae, contexts: int) -> dict[str, float]:
    """Every rung figure by its definition (README's metrics table), anchor by anchor over the first `contexts`
    held-out contexts, in float64; the slice fits one batch, so every other-sequence anchor is a negative."""
    sh = acts.shard("eval", 0)
    x = sh.acts[:contexts].double() * acts.scale
    partner = sh.partners[spec.activations.pairing][:contexts]
    sae = sae.double().eval()
    with torch.no_grad():
        z_all = torch.stack([sae(x[c]).z for c in range(contexts)])  # [C, T, dict], every position
    anchors = [(c, t) for c in range(contexts) for t in range(FIRST_ANCHOR, x.shape[1])]
    xa = torch.stack([x[c, t] for c, t in anchors])
    with torch.no_grad():
        out = sae(xa)
    err = (xa - out.x_hat).pow(2).sum()
    za = out.z
    zp = torch.stack([z_all[c, partner[c, t]] for c, t in anchors])
    tau = spec.trainer.temperature
    cos = torch.nn.functional.cosine_similarity
    losses, pos, neg = [], [], []
    for i, (c, _) in enumerate(anchors):
        p = cos(za[i], zp[i], dim=0, eps=1e-8).item()
        negs = [cos(za[i], za[j], dim=0, eps=1e-8).item() for j, (d, _) in enumerate(anchors) if d != c]
        pos.append(p)
        neg += negs
        losses.append(math.log(sum(math.exp(v / tau) for v in [p, *negs])) - p / tau)
    fired = z_all[:, FIRST_ANCHOR:] != 0  # [C, T', dict]: locality over the anchors of each context, in order
    n_tok = fired.shape[0] * fired.shape[1]
    ratios, weights = [], []
    for j in range(fired.shape[2]):
        f = fired[..., j]
        seen = torch.zeros_like(f)
        for t in range(1, f.shape[1]):
            seen[:, t] = seen[:, t - 1] | f[:, t - 1]
        if seen.sum() > 0:
            ratios.append(((f & seen).sum() / seen.sum() / (f.sum() / n_tok)).item())
            weights.append(f.sum().item())
    return {"explained_variance": 1 - (err / (xa - xa.mean(0)).pow(2).sum()).item(),
            "normalized_mse": (err / xa.pow(2).sum()).item(), "l0": (za != 0).sum(1).double().mean().item(),
            "dead_fraction": ((za != 0).sum(0) == 0).double().mean().item(), "nce": sum(losses) / len(losses),
            "code_sim_positive": sum(pos) / len(pos), "code_sim_negative": sum(neg) / len(neg),
            "context_locality": torch.tensor(ratios).quantile(0.5).item(),
            "context_locality_weighted": sum(w * r for w, r in zip(weights, ratios)) / sum(weights)}


@pytest.mark.parametrize("arch", ["relu", "batchtopk"])
def test_rung_figures_equal_the_formulas_on_the_same_slice(cache, arch):
    spec = _spec(cache, f"sae.architecture={arch}", "eval.rung_contexts=4")
    acts = Activations(spec)
    sae = _trained(spec, acts).model
    sae.train()
    figures = HeldOutSlice(spec, acts).figures(sae)
    assert sae.training, "the SAE goes back to training mode"
    assert set(figures) == {PREFIX + k for k in FIGURES} | {SECONDS} and figures[SECONDS] > 0
    # batchtopk codes by its threshold at inference, by the batch's top k in training: the figures are inference's
    slow = _slow(spec, acts, sae, contexts=4)
    for key in FIGURES:
        assert figures[PREFIX + key] == pytest.approx(slow[key], rel=1e-4, abs=1e-6), key


def test_the_whole_held_out_set_as_slice_gives_the_final_figures(cache):
    # more contexts than there are: all 16, in one shard as the held-out set here (InfoNCE's batches mix the
    # anchors of one shard at a time, so the same shards make the same batches)
    spec = _spec(cache, "eval.rung_contexts=1000", "activations.contexts_per_shard=16")
    acts = Activations(spec)
    sae = _trained(spec, acts).model.eval()
    rung = HeldOutSlice(spec, acts)
    assert rung.contexts == 16
    final, _ = held_out_scores(spec, sae, acts)
    figures = rung.figures(sae)
    for key in FIGURES:
        assert figures[PREFIX + key] == pytest.approx(final[key], rel=1e-6), key


def test_measuring_the_rung_figures_leaves_training_bit_for_bit_alike(cache):
    """A trial measures its SAE at every report; its training must not notice (the RNG, the mode, the weights)."""
    spec = _spec(cache, "sae.architecture=batchtopk", "eval.rung_contexts=8")
    acts = Activations(spec)
    rung = HeldOutSlice(spec, acts)

    class Measure:
        def on_step(self, trainer, metrics):
            pass

        def on_report(self, trainer, report):
            rung.figures(trainer.model)

    def run(hooks):
        trainer = Trainer(spec.sae.model_copy(update={"d_in": acts.d_model}), spec.trainer)
        rec = fit(trainer, training_stream(acts, spec.trainer.batch_size, spec.trainer.seed)) if not hooks else None
        if hooks:
            trainer.fit(training_stream(acts, spec.trainer.batch_size, spec.trainer.seed), hooks)
        return trainer, rec

    plain, rec = run([])
    measured, _ = run([Measure()])
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, measured.model.state_dict()[name]), name
    assert without_clock([plain.last_report]) == without_clock([measured.last_report])
    assert len(rec.reports) == 3
