"""Quality at a matched token budget: csc (gamma > 0), csc (gamma = 0), TopK, BatchTopK, Matryoshka BatchTopK,
JumpReLU and SAELens's standard SAE, each over a small sparsity sweep, trained on the same cached activations in the
same order and scored by the same evaluation (held-out explained variance and L0, CE loss recovered with delta CE and
KL with the SAE spliced in).

    python bench/quality.py                  # embedded model, the quickstart's layer; writes bench/quality_pareto.png
    python bench/quality.py --only TopK SAELens --ks 8 16   # part of it

Methods (every one: dictionary 2048, batch 512, the same `--steps`, lr 3e-4 with the spec's warm-up):
  csc contrastive   pre-encoder LayerNorm, ReLU, constrained Adam, L1 (beta steered to each --l0s target) +
                    gamma * InfoNCE(tau)
  csc gamma=0       the same without the InfoNCE term
  csc gamma=0, no LayerNorm   the same without the pre-encoder LayerNorm (what the LayerNorm itself does)
  TopK              csc's TopK architecture (k swept), no LayerNorm, no L1: Gao et al.'s recipe
  BatchTopK         csc's BatchTopK (k swept; Bussmann et al.), no LayerNorm; scored at inference, with its
                    learned global threshold
  Matryoshka BatchTopK   csc's matryoshka_batchtopk (k swept; Bussmann et al. 2025), no LayerNorm, the default
                    nested prefixes (128, 256, 512, 1024 and 2048 latents each trained to reconstruct)
  JumpReLU          csc's JumpReLU (Rajamanoharan et al., Gemma Scope), no LayerNorm, its L0 weight steered to
                    each --l0s target
  SAELens standard  sae_lens.SAETrainer on StandardTrainingSAE (L1 weighted by decoder norms, swept), fed the
                    same scaled activations; its weights are loaded into csc's SAE for scoring (the forward is
                    checked to match) - needs `pip install -e '.[bench]'`
  SAELens, b_dec at the data mean   the same with b_dec started where csc starts it (SAELens starts it at 0)
"code cos +/-" is the mean cosine of held-out codes of attention-partner pairs / of tokens of other sequences:
the structure InfoNCE trains for. "Matched L0" rows interpolate each method's sweep (linear in log L0) at
the L0s of the contrastive points.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from csc.activations.source import Activations  # noqa: E402
from csc.config import TrainRunSpec  # noqa: E402
from csc.spec_loader import load_spec  # noqa: E402
from csc.pipeline.probing import held_out_labels  # noqa: E402
from csc.pipeline.run import evaluate_run, training_stream  # noqa: E402
from csc.sae.archs import build_sae  # noqa: E402
from csc.sae.archs.relu import ReluConfig  # noqa: E402
from csc.sae.config import parse_sae_config  # noqa: E402
from csc.sae.model import SparseAutoencoder  # noqa: E402
from csc.sae.trainer import Trainer  # noqa: E402
from csc.sweep.spec import SweepSpec  # noqa: E402

SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"
# One per method; gamma > 0 and gamma = 0 often coincide, so the second is dashed to keep both visible.
STYLES = ("o-", "x--", "s-", "^-", "D-", "v-", "*-", "P-", "h-")
EV_FLOOR = -0.5
METRICS = ("explained_variance", "l0", "ce_loss_recovered", "delta_ce", "kl_spliced", "dead_fraction",
           "code_sim_positive", "code_sim_negative")


def train_csc(spec: TrainRunSpec, acts: Activations, architecture: str, layer_norm: bool = True,
              sae: dict | None = None, **trainer) -> SparseAutoencoder:
    cfg = parse_sae_config({"architecture": architecture, "dict_size": spec.sae.dict_size, "d_in": acts.d_model,
                            "layer_norm": layer_norm, **(sae or {})})
    t = Trainer(cfg, spec.trainer.model_copy(update=trainer))
    t.fit(training_stream(acts, spec.trainer.batch_size, spec.trainer.seed))
    return t.model


def train_saelens(spec: TrainRunSpec, acts: Activations, l1: float, mean_init: bool = False) -> SparseAutoencoder:
    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    tr = spec.trainer
    torch.manual_seed(tr.seed)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=acts.d_model, d_sae=spec.sae.dict_size,
                                                        l1_coefficient=l1, l1_warm_up_steps=tr.beta_warmup_steps))
    cfg = SAETrainerConfig(total_training_samples=tr.steps * tr.batch_size, train_batch_size_samples=tr.batch_size,
                           lr=tr.lr, lr_end=tr.lr, lr_warm_up_steps=tr.lr_warmup_steps, device="cpu")
    batches = (b.anchors for b in training_stream(acts, tr.batch_size, tr.seed))
    if mean_init:  # as csc's init_b_dec: b_dec starts at the mean of the first batch
        with torch.no_grad():
            sae.b_dec.copy_(next(training_stream(acts, tr.batch_size, tr.seed)).anchors.mean(dim=0))
    SAETrainer(cfg, sae, data_provider=batches).fit()
    sd = {k: v.detach() for k, v in sae.state_dict().items()}
    ours = build_sae(ReluConfig(d_in=acts.d_model, dict_size=spec.sae.dict_size, layer_norm=False)).load_tensors(
        {n: sd[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}, "SAELens")
    x = next(training_stream(acts, tr.batch_size, tr.seed + 1)).anchors
    with torch.no_grad():
        if not torch.allclose(sae(x), ours(x).x_hat, atol=1e-3, rtol=1e-4):
            raise RuntimeError("SAELens's forward and csc's forward with its weights differ: scores would be wrong")
    return ours


def interpolate(points: list[dict], l0: float, key: str) -> float | None:
    """`key` at `l0` on a method's curve, linear in log L0 between its two nearest sweep points (of those that have
    `key`: points saved before delta CE was measured lack it)."""
    pts = sorted((p["l0"], p[key]) for p in points if key in p)
    for (l_lo, v_lo), (l_hi, v_hi) in zip(pts, pts[1:]):
        if l_lo <= l0 <= l_hi and l_hi > l_lo:
            w = (math.log(l0) - math.log(l_lo)) / (math.log(l_hi) - math.log(l_lo))
            return v_lo + w * (v_hi - v_lo)
    return next((v for l, v in pts if l == l0), None)


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    for ax, (key, label) in zip(axes, [("explained_variance", "explained variance (held out)"),
                                       ("ce_loss_recovered", "CE loss recovered"), ("delta_ce", "delta CE (nats)"),
                                       ("kl_spliced", "KL(clean || SAE)")]):
        for (name, pts), style in zip(results.items(), STYLES):
            pts = sorted((p for p in pts if key in p), key=lambda p: p["l0"])
            ax.plot([p["l0"] for p in pts], [p[key] for p in pts], style, label=name, alpha=0.8, markersize=7)
        if key == "explained_variance" and ax.get_ylim()[0] < EV_FLOOR:
            ax.set_ylim(bottom=EV_FLOOR)  # a diverged point would squash every other curve
            ax.set_ylabel(f"{label}; axis cut at {EV_FLOOR}")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (held out)")
        if not ax.get_ylabel():
            ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)  # below the panels: no curve hidden
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps of batch 512 for every SAE")
    p.add_argument("--train-tokens", type=int, default=98304,
                   help="activation tokens to train on (the quickstart caches 49,152; the rest is made here)")
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--l0s", type=float, nargs="+", default=[32, 64, 128, 256],
                   help="trainer.target_l0 of the ReLU and JumpReLU SAEs (their beta is steered to it)")
    p.add_argument("--ks", type=int, nargs="+", default=[32, 64, 128, 256], help="TopK and BatchTopK sweep")
    p.add_argument("--jump-beta", type=float, default=0.01, help="JumpReLU's starting L0 weight")
    p.add_argument("--l1s", type=float, nargs="+", default=[4.0, 8.0, 16.0, 32.0], help="SAELens l1_coefficient sweep")
    p.add_argument("--ce-contexts", type=int, default=16, help="held-out contexts for CE/KL")
    p.add_argument("--plot", type=Path, default=Path("bench/quality_pareto.png"))
    p.add_argument("--json", type=Path, default=None, help="also write every point here")
    p.add_argument("--replot", type=Path, nargs="+", default=None, metavar="JSON",
                   help="print the tables and redraw the plot from --json files (merged), training nothing")
    p.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                   help="run only the methods whose name starts with one of these (e.g. TopK SAELens)")
    a = p.parse_args()
    if a.replot:
        saved = [json.loads(f.read_text()) for f in a.replot]
        report({m: pts for s in saved for m, pts in s["results"].items()}, saved[0]["title"], a.plot)
        return
    spec = load_spec(TrainRunSpec, SPEC, [f"trainer.steps={a.steps}", f"eval.ce_contexts={a.ce_contexts}",
                                          f"activations.train_tokens={a.train_tokens}",
                                          "trainer.device=cpu"], part_of=SweepSpec)
    acts = Activations(spec)
    for split in ("train", "eval"):
        acts.build(split)
    labels = held_out_labels(spec, acts)  # the same probing set for every SAE: made once
    runs: dict[str, list[tuple[str, object]]] = {
        f"csc contrastive (gamma {a.gamma:g}, tau {a.temperature:g})": [
            (f"target L0 {t:g}", lambda t=t: train_csc(spec, acts, "relu", target_l0=t, gamma=a.gamma,
                                                        temperature=a.temperature)) for t in a.l0s],
        "csc gamma=0": [(f"target L0 {t:g}", lambda t=t: train_csc(spec, acts, "relu", target_l0=t, gamma=0.0))
                        for t in a.l0s],
        "csc gamma=0, no LayerNorm": [(f"target L0 {t:g}", lambda t=t: train_csc(
            spec, acts, "relu", layer_norm=False, target_l0=t, gamma=0.0)) for t in a.l0s],
        **{name: [(f"k {k}", lambda k=k, arch=arch: train_csc(spec, acts, arch, layer_norm=False, sae={"k": k},
                                                              beta=0.0, gamma=0.0)) for k in a.ks]
           for name, arch in (("TopK", "topk"), ("BatchTopK", "batchtopk"), ("Matryoshka BatchTopK", "matryoshka_batchtopk"))},
        f"JumpReLU (beta {a.jump_beta:g})": [
            (f"target L0 {t:g}", lambda t=t: train_csc(spec, acts, "jumprelu", layer_norm=False, target_l0=t,
                                                        beta=a.jump_beta, gamma=0.0)) for t in a.l0s],
    }
    if importlib.util.find_spec("sae_lens") is not None:
        runs["SAELens standard"] = [(f"l1 {c:g}", lambda c=c: train_saelens(spec, acts, c)) for c in a.l1s]
        runs["SAELens, b_dec at the data mean"] = [
            (f"l1 {c:g}", lambda c=c: train_saelens(spec, acts, c, mean_init=True)) for c in a.l1s]
    else:
        print("SAELens is not installed (pip install -e '.[bench]'): its sweep is left out")

    if a.only:
        runs = {m: pts for m, pts in runs.items() if any(m.startswith(o) for o in a.only)}
        if not runs:
            p.error(f"--only {' '.join(a.only)} matches no method")
    results: dict[str, list[dict]] = {}
    for method, points in runs.items():
        for setting, train in points:
            t0 = time.perf_counter()
            sae = train()
            seconds = time.perf_counter() - t0
            scores, _ = evaluate_run(spec, sae, acts, labels=labels)
            row = {"setting": setting, "train_s": seconds, **{k: scores[k] for k in METRICS}}
            results.setdefault(method, []).append(row)
            print(f"{method}, {setting}: EV {row['explained_variance']:.4f}, L0 {row['l0']:.1f}, "
                  f"CE recovered {row['ce_loss_recovered']:.4f}, delta CE {row['delta_ce']:.4f} nats, "
                  f"KL {row['kl_spliced']:.4f} ({seconds:.0f} s)",
                  flush=True)

    tr = spec.trainer
    title = (f"{spec.model.name} layer {spec.activations.layer}, dictionary {spec.sae.dict_size}, "
             f"{tr.steps} steps x {tr.batch_size} = {tr.steps * tr.batch_size:,} tokens each; held out: "
             f"{spec.activations.eval_tokens:,} tokens, CE/KL over {a.ce_contexts} contexts")
    if a.json is not None:
        a.json.write_text(json.dumps({"title": title, "results": results}, indent=1))
    report(results, title, a.plot)


def report(results: dict[str, list[dict]], title: str, plot_path: Path) -> None:
    print(f"\n{title}")
    print("| method | setting | L0 | EV | CE recovered | delta CE | KL | dead | code cos +/- | train s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, rows in results.items():
        for r in sorted(rows, key=lambda r: r["l0"]):
            delta = f"{r['delta_ce']:.4f}" if "delta_ce" in r else "-"
            print(f"| {method} | {r['setting']} | {r['l0']:.1f} | {r['explained_variance']:.4f} | "
                  f"{r['ce_loss_recovered']:.4f} | {delta} | {r['kl_spliced']:.4f} | {r['dead_fraction']:.3f} | "
                  f"{r['code_sim_positive']:.3f} / {r['code_sim_negative']:.3f} | {r['train_s']:.0f} |")

    anchor = next(iter(results))
    print("\nAt matched L0 (each method's sweep interpolated in log L0; - where the L0 is outside its sweep):")
    names = list(results)
    print("| L0 | metric | " + " | ".join(names) + " |")
    print("|---:|---|" + "---:|" * len(names))
    for ref in sorted(results[anchor], key=lambda r: r["l0"]):
        for key, label in (("explained_variance", "EV"), ("ce_loss_recovered", "CE recovered"),
                           ("delta_ce", "delta CE"), ("kl_spliced", "KL")):
            vals = [interpolate(results[n], ref["l0"], key) for n in names]
            print(f"| {ref['l0']:.1f} | {label} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    plot(results, plot_path, title.split(";")[0])
    print(f"\nPareto plot: {plot_path}")


if __name__ == "__main__":
    main()
