"""csc's SAEBench-named figures against SAEBench 0.6.0's own functions, on the same SAE, model and tokens.

csc cannot depend on SAEBench (its pins, numpy<2 and TransformerLens among them, conflict with csc's), so this
script runs in a separate virtual environment and reaches csc only through a subprocess in csc's own venv:

    bash bench/saebench_env.sh                      # builds /tmp/saebench-venv (or: bash bench/saebench_env.sh DIR)
    csc train sweeps/quickstart.yaml --out runs/xcheck          # any csc run folder (exported SAE + spec.json)
    /tmp/saebench-venv/bin/python bench/saebench_crosscheck.py runs/xcheck

bench/saebench_env.sh is these commands (Python 3.11; verified on this machine, where pip resolved sae-lens 6.54.12,
transformer-lens 3.9.0, transformers 5.24.0, numpy 1.26.4, scikit-learn 1.9.1):

    python3 -m venv /tmp/saebench-venv
    /tmp/saebench-venv/bin/pip install --upgrade pip
    /tmp/saebench-venv/bin/pip install "sae-bench==0.6.0" "torch==2.13.0+cpu"
    /tmp/saebench-venv/bin/pip uninstall -y torchvision

torch 2.13.0+cpu comes from this machine's local wheel folder (pip's find-links); PyPI's torchvision 0.28.0 is built
against CUDA torch (its _C.so needs libc10_cuda.so), fails to register torchvision::nms on CPU torch and breaks
`import transformers` models; SAEBench lists it only for nnsight and none of the code used here imports it.
TransformerLens 3.9.0 knows google/gemma-3-270m (a hard-coded config, so no Hub access).

What runs where:
  1. csc side (`--role csc`, run by --csc-python, csc's venv; started by this script): loads the run's spec, its
     exported SAE (csc.sae.export.load_sae) and the activation cache, and computes csc's figures exactly as
     `csc train` / `csc eval` do (csc.pipeline.run.splice_run: CE/KL over the first --ce-contexts held-out
     contexts, SAEBench's sparsity/variance figures over every held-out context; csc.pipeline.probing's pooled
     features and one_vs_rest at --seeds seeds, the first being eval.probe_seed, which `csc train` reports).
     It writes csc.pt: those figures, the held-out tokens, the probing set (csc.activations.probe_labels:
     contexts, which tokens make each example, classes, fit/test), csc's cached resid_post of the first
     contexts (to compare with TransformerLens's), the LM's local folder, and exports probing's random-init
     floor SAE (SAELens format) beside it.
  2. SAEBench side (this venv): the LM as a HookedTransformer built from the same local weights
     (from_pretrained_no_processing with hf_model=, offline), the run's sae/ folder through SAELens's
     SAE.load_from_disk, and SAEBench 0.6.0's functions on csc's token sequences, fed through a stand-in for
     SAELens's ActivationsStore that hands out csc's held-out contexts in order:
       core      evals/core/main.py get_downstream_reconstruction_metrics (ignore_tokens = the tokenizer's
                 PAD/EOS/BOS, exclude_special_tokens_from_reconstruction=True, as its scripts run it) over the same
                 first --ce-contexts contexts; get_sparsity_and_variance_metrics over every held-out context in
                 batches of 16 (CoreEvalConfig.batch_size_prompts).
       probing   sae_bench_utils.activation_collection (get_llm_activations with BOS/PAD/EOS masked,
                 create_meaned_model_activations, get_sae_meaned_activations) on csc's probing examples: each
                 example's tokens, the rest zeroed (SAEBench's convention for "not pooled"); then
                 evals/sparse_probing/probe_training.train_probe_on_activations (prepare_probe_data's balanced
                 negatives, get_top_k_mean_diff_mask, LogisticRegression) per task, k and seed. The ceiling
                 both ways: sklearn on every dimension (csc's method) and SAEBench's own torch probe
                 (use_sklearn=False, batch 250, 100 epochs, lr 1e-2, early-stopped on its test set).
  Probing figures have randomness on both sides (negatives drawn per probe): each side is run at --seeds seeds;
  the table gives the mean and the max - min spread, so a difference can be judged against the noise.

Checks are functions in CHECKS, each returning table rows; an absorption check (csc's absorption against
SAEBench's evals/absorption) is meant to be added there as one more function.

--probe-acts lm (default) collects probing's activations with SAEBench's get_llm_activations through TransformerLens
(~70k tokens to layer 12: several minutes on 2 idle cores); --probe-acts cache feeds csc's cached activations (HF
eager, masked as get_llm_activations masks) to the same SAEBench pooling and probes: the check of the LM itself is
then the core check's resid_post comparison.

Subsampling: none by default. The core CE/KL figures use the run's eval.ce_contexts (override with
--ce-contexts; both sides then use the same first contexts); --probe-contexts N limits the probing to the
examples of the first N probing contexts on both sides (for a quick look; the table says so).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

CSC_PYTHON = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
REPO = Path(__file__).resolve().parent.parent
TL_MODEL_NAME = "google/gemma-3-270m"
"""The official name TransformerLens knows the embedded model's architecture by."""
SAEBENCH_BATCH_PROMPTS = 16
"""CoreEvalConfig.batch_size_prompts: explained_variance_legacy centres each token on its batch's mean."""
CE_BATCH_PROMPTS = 2
"""Contexts per SAEBench reconstruction batch here: its three [b, T, 262k] float32 logit tensors and the softmaxes
of its KL are ~1 GB per context; every CE/KL mean is pooled over tokens, so batching does not change them."""
PROBE_CHUNK = 4096
"""csc.pipeline.probing.probing_scores' chunk_tokens (its floor is started on the first chunk's activations)."""
CORE_FIGURES = ("ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_score",
                "kl_div_with_sae", "kl_div_with_ablation", "explained_variance_legacy", "saebench_l0", "saebench_l1")


# ---------------------------------------------------------------- the table (no SAEBench, no csc needed)

def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"


def format_table(rows: list[dict]) -> str:
    """rows: {figure, csc, saebench, csc_spread?, saebench_spread?, note?} -> one markdown table. difference is
    csc - SAEBench; a spread is max - min over seeds (probing), '-' where a side has no randomness."""
    lines = ["| figure | csc | SAEBench | difference | csc spread | SAEBench spread | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        c, s = r.get("csc"), r.get("saebench")
        diff = None if c is None or s is None else c - s
        lines.append(f"| {r['figure']} | {fmt(c)} | {fmt(s)} | {fmt(diff)} | {fmt(r.get('csc_spread'))} | "
                     f"{fmt(r.get('saebench_spread'))} | {r.get('note', '')} |")
    return "\n".join(lines)


def mean_spread(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), max(values) - min(values)


# ---------------------------------------------------------------- csc side (csc's venv)

def csc_side(args: argparse.Namespace) -> None:
    import torch

    from csc.activations.models import _pretrained_source
    from csc.activations.source import Activations
    from csc.config import TrainRunSpec
    from csc.pipeline.evaluate import special_token_ids
    from csc.pipeline.probing import (K_VALUES, held_out_labels, one_vs_rest, pooled_features, probing_tokens,
                                      random_floor)
    from csc.pipeline.run import SPEC_FILE, hook_info, splice_run
    from csc.sae.export import load_sae, save_sae

    run, work = Path(args.run), Path(args.work)
    spec = TrainRunSpec.model_validate_json((run / SPEC_FILE).read_text())
    if args.ce_contexts:
        spec = spec.model_copy(update={"eval": spec.eval.model_copy(update={"ce_contexts": args.ce_contexts})})
    sae, meta = load_sae(run / "sae")
    acts = Activations(spec)
    t0 = time.perf_counter()
    core = splice_run(spec, sae, acts)  # csc train's own call: CE/KL over ce_contexts, sparsity over all held out
    t_core = time.perf_counter() - t0

    S, T = spec.activations.contexts_per_shard, spec.activations.context_length
    n_eval = acts.n_shards["eval"] * S
    eval_tokens = torch.cat([acts.shard("eval", i).tokens for i in range(acts.n_shards["eval"])])
    n_ce = min(spec.eval.ce_contexts, n_eval)
    n_cmp = min(n_ce, S)
    resid = acts.shard("eval", 0).acts[:n_cmp].float()  # csc's cached raw resid_post, to compare with TL's

    t0 = time.perf_counter()
    labels = held_out_labels(spec, acts)
    probe_n = len(labels.seq_id) if not args.probe_contexts else min(args.probe_contexts, len(labels.seq_id))
    if probe_n < len(labels.seq_id):  # keep the examples of the first probe_n probing contexts only
        labels = _first_contexts(labels, probe_n)
    # probing_scores' own steps, split so that the floor can be exported and one_vs_rest rerun at more seeds
    _, first = next(probing_tokens(acts, labels))
    floor = random_floor(sae, first[:PROBE_CHUNK].to(sae.W_dec.device) * acts.scale, spec.eval.probe_seed)
    feats = pooled_features(sae, floor, acts, labels, PROBE_CHUNK)
    seeds = [spec.eval.probe_seed + i for i in range(args.seeds)]
    probing = {}
    for task, f in zip(labels.tasks, feats):
        probing[task.name] = [one_vs_rest(f, task.label, task.test, len(task.classes), s) for s in seeds]
    t_probe = time.perf_counter() - t0
    save_sae(floor, work / "floor_sae", hook_info(spec, acts.scale))
    # the raw cached activations of the probing contexts that hold an example (for --probe-acts cache)
    used = torch.stack([(t.example >= 0).any(dim=1) for t in labels.tasks]).any(dim=0)
    rows = labels.seq_id[used]
    probe_acts = torch.cat([acts.shard("eval", i).acts[(rows[rows // S == i] - i * S)].float()
                            for i in sorted(set((rows // S).tolist()))])

    tok = acts.tokenizer
    out = {
        "model_folder": _pretrained_source(spec.model, spec.activations.cache_root)[0],
        "model_name": spec.model.name, "layer": spec.activations.layer, "scale": acts.scale,
        "special_ids": sorted(special_token_ids(acts.lm)),
        "tokenizer_special": {"pad": tok.pad_token_id, "eos": tok.eos_token_id, "bos": tok.bos_token_id},
        "core": core, "n_ce": n_ce, "n_eval": n_eval, "eval_tokens": eval_tokens, "resid": resid,
        "probe_seeds": seeds, "k_values": list(K_VALUES), "probing": probing,
        "probe_contexts": len(labels.seq_id), "probe_tokens": labels.tokens,
        "probe_used": used, "probe_acts": probe_acts,
        "tasks": [{"name": t.name, "classes": list(t.classes), "example": t.example, "label": t.label, "test": t.test}
                  for t in labels.tasks],
        "seconds": {"core": t_core, "probing": t_probe},
    }
    eval_json = run / "eval.json"
    out["eval_json"] = json.loads(eval_json.read_text()) if eval_json.is_file() else {}
    torch.save(out, work / "csc.pt")


def _first_contexts(labels, n: int):
    """The probing set restricted to the examples lying wholly in its first n contexts (both sides use it)."""
    import dataclasses

    import torch

    tasks = []
    for t in labels.tasks:
        ex = t.example[:n]
        keep = torch.zeros(len(t.label), dtype=torch.bool)
        keep[ex[ex >= 0].unique()] = True
        keep[t.example[n:][t.example[n:] >= 0].unique()] = False
        new_id = torch.full((len(t.label),), -1, dtype=torch.int64)
        new_id[keep] = torch.arange(int(keep.sum()))
        ex = torch.where(ex >= 0, new_id[ex.clamp(min=0)], -1)
        tasks.append(dataclasses.replace(t, example=ex, label=t.label[keep], test=t.test[keep]))
    return dataclasses.replace(labels, seq_id=labels.seq_id[:n], tokens=labels.tokens[:n], tasks=tuple(tasks))


# ---------------------------------------------------------------- SAEBench side (this venv)

class TokenStore:
    """What SAEBench's core functions call on SAELens's ActivationsStore: csc's contexts, in order."""

    def __init__(self, tokens):
        self.tokens, self.i, self.context_size = tokens, 0, tokens.shape[1]

    def get_batch_tokens(self, n: int):
        batch = self.tokens[self.i:self.i + n]
        if batch.shape[0] != n:
            raise RuntimeError(f"TokenStore: asked for {n} contexts, {batch.shape[0]} left")
        self.i += n
        return batch


def load_hooked_model(folder: str, dtype):
    """HookedTransformer of the local weights, no Hub: the HF model and tokenizer from `folder`, handed to
    from_pretrained_no_processing under the official name that selects TransformerLens's Gemma 3 config."""
    import torch
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype)
    with torch.no_grad():
        model = HookedTransformer.from_pretrained_no_processing(TL_MODEL_NAME, hf_model=hf, tokenizer=tok,
                                                                device="cpu", dtype=dtype)
    del hf
    return model.eval()


def check_core(ctx: dict) -> list[dict]:
    import torch
    from sae_bench.evals.core.main import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics

    d, model, sae = ctx["csc"], ctx["model"], ctx["sae"]
    ignore = {v for v in d["tokenizer_special"].values()}
    tokens = d["eval_tokens"]
    rows = []
    # the model: TransformerLens's resid_post against csc's cached one (HF eager), same tokens
    n_cmp = d["resid"].shape[0]
    _, cache = model.run_with_cache(tokens[:n_cmp], names_filter=[ctx["hook"]], stop_at_layer=d["layer"] + 1)
    tl = cache[ctx["hook"]].float()
    gap = (tl - d["resid"]).norm(dim=-1) / d["resid"].norm(dim=-1)
    ctx["notes"].append(f"the LM: TransformerLens's blocks.{d['layer']}.hook_resid_post against csc's cached "
                        f"resid_post (HF eager) on the first {n_cmp} held-out contexts: ||TL - csc|| / ||csc|| median "
                        f"{gap.median().item():.2e}, max {gap.max().item():.2e} over {gap.numel()} tokens")
    t0 = time.perf_counter()
    n_ce = d["n_ce"]
    bs = CE_BATCH_PROMPTS if n_ce % CE_BATCH_PROMPTS == 0 else 1
    with torch.no_grad():
        rec = get_downstream_reconstruction_metrics(sae, model, TokenStore(tokens[:n_ce]), compute_kl=True,
                                                    compute_ce_loss=True, n_batches=n_ce // bs,
                                                    eval_batch_size_prompts=bs, ignore_tokens=ignore,
                                                    exclude_special_tokens_from_reconstruction=True)
    n_eval = tokens.shape[0] - tokens.shape[0] % SAEBENCH_BATCH_PROMPTS
    with torch.no_grad():
        spars, _ = get_sparsity_and_variance_metrics(sae, model, TokenStore(tokens[:n_eval]),
                                                     n_batches=n_eval // SAEBENCH_BATCH_PROMPTS,
                                                     compute_l2_norms=False, compute_sparsity_metrics=True,
                                                     compute_variance_metrics=True,
                                                     compute_featurewise_density_statistics=True,
                                                     eval_batch_size_prompts=SAEBENCH_BATCH_PROMPTS,
                                                     model_kwargs={}, ignore_tokens=ignore)
    ctx["seconds"]["saebench core"] = time.perf_counter() - t0
    sb = {**rec, "explained_variance_legacy": spars["explained_variance_legacy"], "saebench_l0": spars["l0"],
          "saebench_l1": spars["l1"]}
    where = {k: f"first {n_ce} held-out contexts" for k in CORE_FIGURES[:7]}
    where.update({k: f"all {n_eval} held-out contexts, batches of {SAEBENCH_BATCH_PROMPTS}" for k in CORE_FIGURES[7:]})
    for k in CORE_FIGURES:
        rows.append({"figure": k, "csc": d["core"][k], "saebench": sb[k], "note": where[k]})
    return rows


def _examples(acts_NTD, example_NT, n_examples: int):
    """[E, L, d]: example e's token activations in row e, zero-padded (SAEBench's "not pooled" convention)."""
    import torch

    rows, pos = (example_NT >= 0).nonzero(as_tuple=True)
    e = example_NT[rows, pos]
    order = torch.argsort(e, stable=True)
    rows, pos, e = rows[order], pos[order], e[order]
    counts = torch.bincount(e, minlength=n_examples)
    slot = torch.arange(len(e)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    out = torch.zeros(n_examples, int(counts.max()), acts_NTD.shape[-1], dtype=acts_NTD.dtype)
    out[e, slot] = acts_NTD[rows, pos]
    return out


def check_probing(ctx: dict) -> list[dict]:
    import random

    import torch
    from sae_bench.evals.sparse_probing import probe_training
    import warnings

    from sae_bench.sae_bench_utils import activation_collection as ac
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    d, model = ctx["csc"], ctx["model"]
    t0 = time.perf_counter()
    probe_tokens, used = d["probe_tokens"], d["probe_used"]
    acts = torch.zeros(*probe_tokens.shape, model.cfg.d_model)
    if ctx["probe_acts"] == "lm":  # SAEBench's collection: TransformerLens, BOS/PAD/EOS zeroed
        with contextlib.redirect_stderr(io.StringIO()):
            acts[used] = ac.get_llm_activations(probe_tokens[used], model, 16, d["layer"], ctx["hook"],
                                                mask_bos_pad_eos_tokens=True, show_progress=False).float()
        gap = (acts[used] - d["probe_acts"]).norm(dim=-1) / d["probe_acts"].norm(dim=-1)
        gap = gap[acts[used].abs().sum(dim=-1) > 0]
        ctx["notes"].append(f"probing activations: TransformerLens against csc's cache, relative difference median "
                            f"{gap.median().item():.2e}, max {gap.max().item():.2e} over {gap.numel()} tokens")
    else:  # csc's cached activations (HF eager), masked as SAEBench's get_llm_activations masks
        keep = ac.get_bos_pad_eos_mask(probe_tokens[used], model.tokenizer)
        acts[used] = d["probe_acts"] * keep[..., None]
    ctx["seconds"]["probing activations"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = []
    saes = {"sae": ctx["sae"], "random": ctx["floor"]}
    for task in d["tasks"]:
        ex = _examples(acts, task["example"], len(task["label"]))
        sets = {}
        for side, want in (("train", False), ("test", True)):
            per_class = {name: ex[(task["label"] == c) & (task["test"] == want)]
                         for c, name in enumerate(task["classes"])}
            sets[side] = {"llm": ac.create_meaned_model_activations(per_class),
                          **{n: ac.get_sae_meaned_activations(per_class, s, 125) for n, s in saes.items()}}
        del ex
        sb: dict[str, list[float]] = {}
        for seed in d["probe_seeds"]:
            random.seed(seed)
            torch.manual_seed(seed)
            with contextlib.redirect_stdout(io.StringIO()), threadpool_limits(limits=1), warnings.catch_warnings():
                # SAEBench's sklearn call: 'penalty' FutureWarnings on sklearn >= 1.8 and lbfgs ConvergenceWarnings
                # on raw activations, once per fit
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", ConvergenceWarning)

                def acc(name, **kw):
                    _, a = probe_training.train_probe_on_activations(sets["train"][name], sets["test"][name], **kw)
                    return sum(a.values()) / len(a)
                for name in saes:
                    for k in d["k_values"]:
                        sb.setdefault(f"{name}_top_{k}", []).append(acc(name, select_top_k=k))
                sb.setdefault("llm", []).append(acc("llm", select_top_k=None))
                sb.setdefault("llm_torch", []).append(acc("llm", select_top_k=None, use_sklearn=False,
                                                          batch_size=250, epochs=100, lr=1e-2))
        csc_runs = d["probing"][task["name"]]
        what = f"{task['name']} task, {len(task['classes'])} classes"
        for key in [*(f"sae_top_{k}" for k in d["k_values"]), "llm", *(f"random_top_{k}" for k in d["k_values"]),
                    "llm_torch"]:
            s_mean, s_spread = mean_spread(sb[key])
            if key == "llm_torch":
                row = {"figure": f"probe_{task['name']}_llm, SAEBench's torch probe", "saebench": s_mean,
                       "saebench_spread": s_spread,
                       "note": f"{what}; SAEBench's own ceiling method (llm_test_accuracy), no csc counterpart"}
            else:
                c_mean, c_spread = mean_spread([r[key] for r in csc_runs])
                row = {"figure": f"probe_{task['name']}_{key}", "csc": c_mean, "saebench": s_mean,
                       "csc_spread": c_spread, "saebench_spread": s_spread, "note": what}
            rows.append(row)
    ctx["seconds"]["saebench probing fits"] = time.perf_counter() - t0
    return rows


CHECKS = [check_core, check_probing]
"""Each takes the shared context (csc's data, the HookedTransformer, the SAELens SAEs) and returns table rows.
Absorption goes here as one more function (csc's figure from the csc side's csc.pt, SAEBench's evals/absorption)."""


def saebench_side(args: argparse.Namespace) -> None:
    os.environ.setdefault("JAXTYPING_DISABLE", "1")
    import torch

    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cmd = [str(args.csc_python), str(Path(__file__).resolve()), str(args.run), "--role", "csc", "--work", str(work),
           "--seeds", str(args.seeds), "--ce-contexts", str(args.ce_contexts),
           "--probe-contexts", str(args.probe_contexts)]
    if not args.reuse or not (work / "csc.pt").is_file():
        print("csc side:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        t_csc = time.perf_counter() - t0
    else:
        t_csc = 0.0
    d = torch.load(work / "csc.pt", weights_only=False)

    import warnings

    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
    from sae_lens import SAE

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = load_hooked_model(d["model_folder"], torch.float32)
    saes = {}
    for name, folder in (("csc", Path(args.run) / "sae"), ("random floor", work / "floor_sae")):
        # SAEBench's own path for a custom SAE object: it checks the decoder norms (a warning) and copies
        # SAELens 6's cfg.metadata fields (hook_name, hook_layer, ...) onto cfg, where its evals read them
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            saes[name] = load_and_format_sae(name, SAE.load_from_disk(str(folder), device="cpu"), "cpu")[1]
        for w in caught:
            if "Decoder weights" in str(w.message):
                print(f"SAEBench on the {name} SAE: {w.message}")
    sae, floor = saes["csc"], saes["random floor"]
    seconds = {"csc side (subprocess)": t_csc, "load TL model + SAEs": time.perf_counter() - t0}
    ctx = {"csc": d, "model": model, "sae": sae, "floor": floor, "hook": f"blocks.{d['layer']}.hook_resid_post",
           "seconds": seconds, "notes": [], "probe_acts": args.probe_acts}
    rows = []
    for check in CHECKS:
        rows += check(ctx)
        print(f"{check.__name__} done ({len(rows)} rows so far)", flush=True)
        (work / "table.json").write_text(json.dumps({"rows": rows, "notes": ctx["notes"]}, indent=1))
    print()
    print(f"SAE {args.run}/sae ({d['model_name']} layer {d['layer']}); csc from its own venv, SAEBench 0.6.0 here; "
          f"probing seeds {d['probe_seeds']} (each side), {d['probe_contexts']} probing contexts"
          + (" (subsampled: --probe-contexts)" if args.probe_contexts else "")
          + f"; probing activations from {'TransformerLens' if args.probe_acts == 'lm' else 'csc cache'}")
    print(format_table(rows))
    for note in ctx["notes"]:
        print(f"\n{note}")
    ej = d["eval_json"]
    if ej:  # csc's side at the run's settings is what `csc train` printed
        mine = {**d["core"], **{f"probe_{t}_{k}": v for t, runs in d["probing"].items() for k, v in runs[0].items()}}
        keys = [k for k in mine if k in ej and (k.startswith("probe_") or k in CORE_FIGURES)]
        off = [k for k in keys if abs(ej[k] - mine[k]) > 1e-6 * max(1.0, abs(ej[k]))]
        print(f"\ncsc's side reproduces the run's eval.json on {len(keys) - len(off)}/{len(keys)} figures"
              + (f" (not: {', '.join(off)}; --ce-contexts / --probe-contexts other than the run's change them, and "
                 f"so does a csc version other than the one that trained it)" if off else ""))
    seconds["total"] = time.perf_counter() - t_start
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    (work / "table.json").write_text(json.dumps({"rows": rows, "notes": ctx["notes"], "seconds": seconds}, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a csc run folder (sae/ export, spec.json, eval.json)")
    p.add_argument("--work", default="/tmp/xcheck/bench", help="scratch folder (csc.pt, floor_sae/, table.json)")
    p.add_argument("--csc-python", default=os.environ.get("CSC_PYTHON", str(CSC_PYTHON)),
                   help="python of csc's venv, which computes csc's side (default: the repo's .venv)")
    p.add_argument("--seeds", type=int, default=3, help="probing seeds per side (the first is eval.probe_seed)")
    p.add_argument("--ce-contexts", type=int, default=0, help="held-out contexts for CE/KL (0: the run's eval.ce_contexts)")
    p.add_argument("--probe-contexts", type=int, default=0, help="probe only the examples of the first N probing "
                                                                  "contexts (0: all)")
    p.add_argument("--probe-acts", choices=["lm", "cache"], default="lm",
                   help="probing's LM activations: lm = SAEBench's get_llm_activations through TransformerLens "
                        "(~90k tokens to the hooked layer: minutes on 2 cores), cache = csc's cached ones (seconds)")
    p.add_argument("--reuse", action="store_true", help="reuse WORK/csc.pt from an earlier csc side")
    p.add_argument("--role", choices=["saebench", "csc"], default="saebench", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    (csc_side if args.role == "csc" else saebench_side)(args)


if __name__ == "__main__":
    main()
