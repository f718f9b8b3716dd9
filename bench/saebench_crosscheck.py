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
     Absorption: csc.pipeline.absorption.absorption_set (the LM part) and absorption_scores at eval.absorption_seed
     (the SAE part), the calls and spec fields `csc train` uses (--absorption-words overrides
     eval.absorption_words), wrapped by recorders that change nothing computed. csc.pt["absorption"] holds: the
     words (token ids), their letters, the train/test split (the first n_train train), the raw resid_post at each
     word of its probe prompt (AbsorptionSet.acts: raw, the space SAEBench's probes read and the SAELens export
     encodes, its scale folded into its weights or removed by its LayerNorm), each test word's calculator prompt
     as token ids (csc's own for its true positives; for the other test words a fresh draw by the same
     word_activations, so that the SAEBench side's own LM probe finds prompts for its true positives) and csc's
     activation at its word; and per seed csc's intermediates: the LM probe (P, q, test F1), the letters L, the
     true positives, the L1 probe, each k-probe's test F1, the split latents, the per-word fractions and full
     flags, the figures. Seeds after the first (--absorption-seeds) redraw the LM probe (absorption_set's own
     train_probe call and F1 cut, repeated here) and the L1 probe (absorption_scores at that seed) on the same
     words and prompts: csc's own noise.
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
       absorption  evals/absorption's own functions (AbsorptionEvalConfig's defaults: template, token position
                 -6, thresholds, k up to 10, the 0.03 F1 jump) on csc's words (their texts by its vocab.py, their
                 classes by its first_letter formatter), csc's word activations and split:
                 k_sparse_probing.train_k_sparse_probes (precalc_sae_acts=True), eval_probe_and_sae_k_sparse_raw_
                 scores, sae_k_sparse_metadata, build_metrics_df, add_feature_splits_to_metrics_df;
                 feature_absorption.get_stats_and_likely_false_negative_tokens and calculate_projection_and_cos_sims
                 with its FeatureAbsorptionCalculator; main.py's _aggregate_results_df and its letter filter
                 (f1_probe > min_GT_probe_f1) and means. Twice:
                   on csc's probes: csc's LM and L1 probes (first seed) loaded into SAEBench's LinearProbe, no
                     randomness left: every intermediate should agree exactly (sklearn's k-probe fits aside).
                   own probes: SAEBench's train_linear_probe_for_task (common.train_and_save_probes' batch 64, 50
                     epochs, lr 1e-2) and train_sparse_multi_probe, at torch seeds 42, 43, ... Its L1 probe's 50
                     epochs are ceil(0.8 V / 4096) batches each (V = get_alpha_tokens' count), over csc's train
                     words' codes tiled to that many rows: its full-vocabulary step count, which csc keeps too
                     (csc.pipeline.absorption's docstring); SAEBench's own epochs over only 0.8 W words would be
                     2 batches.
                 The calculator runs the LM itself (TransformerLens, on prompt strings with its own random
                 examples). Here it gets PromptActs, a stand-in for its HookedTransformer that answers
                 run_with_cache with the activation at the word of csc's prompt for that word: TransformerLens's
                 run of csc's prompt token ids (--absorption-acts lm: one whole prompt per word) or csc's cached
                 one (cache: HF, the prefix read once for 64 words; TransformerLens then reads 128 of them, a
                 spot check of csc's prompt-sharing read). Units: SAEBench takes A = x . p on the
                 activations it is handed and a_j = z_j cos_j, which is in the SAE's input units; on a csc export
                 (LayerNorm'd, or scale folded) raw A is ~1/s times larger (csc's documented departure). So the
                 calculator is handed u = csc's normalise(x * s) with an SAE whose encode(u) gives the raw x's
                 codes (InputSpaceSAE): SAEBench's arithmetic in csc's units; on csc's probes it also runs
                 literally (raw x), which the table shows as its own rows. It runs on the letters in L only
                 (main.py runs every letter, then keeps those: the same figures). The probes read csc's cached
                 word activations (HF; ~10,000 prompts of ~95 tokens through TransformerLens would take the best
                 part of an hour on 2 cores; the core check compares the LM itself). Where an LM probe passes
                 fewer than min_feats_for_eval (20) letters, main.py reports nothing; here the figures are
                 computed on the letters there are all the same, and a note says so.
  Probing figures have randomness on both sides (negatives drawn per probe): each side is run at --seeds seeds;
  the table gives the mean and the max - min spread, so a difference can be judged against the noise.
  Absorption's figures carry the LM probe's and the L1 probe's random draws (initialisation and batch order) on
  both sides (csc: torch Generators from eval.absorption_seed; SAEBench: torch's global RNG): the plain rows are
  means over --absorption-seeds seeds with spreads; the "on csc's probes" rows and the agreement rows locate a
  difference (csc's first seed against its second is csc's own noise, against SAEBench's 42 the two codes').

Checks are functions in CHECKS, each returning table rows; --checks runs some (the csc side then computes only
what they read; with --reuse it reruns only for the checks whose part WORK/csc.pt lacks, merging them in).

--probe-acts lm (default) collects probing's activations with SAEBench's get_llm_activations through TransformerLens
(~70k tokens to layer 12: several minutes on 2 idle cores); --probe-acts cache feeds csc's cached activations (HF
eager, masked as get_llm_activations masks) to the same SAEBench pooling and probes: the check of the LM itself is
then the core check's resid_post comparison.

Subsampling: none by default. The core CE/KL figures use the run's eval.ce_contexts (override with
--ce-contexts; both sides then use the same first contexts); --probe-contexts N limits the probing to the
examples of the first N probing contexts on both sides (for a quick look; the table says so); --absorption-words N
draws N words instead of eval.absorption_words, on both sides (the absorption rows' header says so).
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
    from csc.pipeline.run import SPEC_FILE
    from csc.sae.export import load_sae

    run, work = Path(args.run), Path(args.work)
    spec = TrainRunSpec.model_validate_json((run / SPEC_FILE).read_text())
    if args.ce_contexts:
        spec = spec.model_copy(update={"eval": spec.eval.model_copy(update={"ce_contexts": args.ce_contexts})})
    sae, meta = load_sae(run / "sae")
    acts = Activations(spec)
    tok = acts.tokenizer
    out = torch.load(work / "csc.pt", weights_only=False) if args.merge and (work / "csc.pt").is_file() else {}
    out.update({
        "model_folder": _pretrained_source(spec.model, spec.activations.cache_root)[0],
        "model_name": spec.model.name, "layer": spec.activations.layer, "scale": acts.scale,
        "special_ids": sorted(special_token_ids(acts.lm)),
        "tokenizer_special": {"pad": tok.pad_token_id, "eos": tok.eos_token_id, "bos": tok.bos_token_id}})
    out.setdefault("seconds", {})
    parts = {"core": lambda: _csc_core(spec, sae, acts), "probing": lambda: _csc_probing(spec, sae, acts, args),
             "absorption": lambda: _csc_absorption(spec, sae, acts, args)}
    for name in args.checks:
        part, seconds = parts[name]()
        out.update(part)
        out["seconds"].update(seconds)
    eval_json = run / "eval.json"
    out["eval_json"] = json.loads(eval_json.read_text()) if eval_json.is_file() else {}
    torch.save(out, work / "csc.pt")


def _csc_core(spec, sae, acts) -> tuple[dict, dict]:
    import torch

    from csc.pipeline.run import splice_run

    t0 = time.perf_counter()
    core = splice_run(spec, sae, acts)  # csc train's own call: CE/KL over ce_contexts, sparsity over all held out
    t_core = time.perf_counter() - t0
    S = spec.activations.contexts_per_shard
    n_eval = acts.n_shards["eval"] * S
    eval_tokens = torch.cat([acts.shard("eval", i).tokens for i in range(acts.n_shards["eval"])])
    n_ce = min(spec.eval.ce_contexts, n_eval)
    n_cmp = min(n_ce, S)
    resid = acts.shard("eval", 0).acts[:n_cmp].float()  # csc's cached raw resid_post, to compare with TL's
    return {"core": core, "n_ce": n_ce, "n_eval": n_eval, "eval_tokens": eval_tokens, "resid": resid}, \
        {"csc core": t_core}


def _csc_probing(spec, sae, acts, args) -> tuple[dict, dict]:
    import torch

    from csc.pipeline.probing import (K_VALUES, held_out_labels, one_vs_rest, pooled_features, probing_tokens,
                                      random_floor)
    from csc.pipeline.run import hook_info
    from csc.sae.export import save_sae

    work = Path(args.work)
    S = spec.activations.contexts_per_shard
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
    return {"probe_seeds": seeds, "k_values": list(K_VALUES), "probing": probing,
            "probe_contexts": len(labels.seq_id), "probe_tokens": labels.tokens,
            "probe_used": used, "probe_acts": probe_acts,
            "tasks": [{"name": t.name, "classes": list(t.classes), "example": t.example, "label": t.label,
                       "test": t.test} for t in labels.tasks]}, {"csc probing": t_probe}


def _csc_absorption(spec, sae, acts, args) -> tuple[dict, dict]:
    """csc's absorption (csc.pipeline.absorption) as `csc train` runs it (absorption_set, then absorption_scores
    at eval.absorption_seed), with recording wrappers that change nothing computed: each prompt's token ids, the L1
    probe, the k-probes' test F1s, the split latents and the per-word results. Then, for the SAEBench side's own
    LM probe (whose true positives differ), prompts for the other test words (csc's word_activations, a fresh
    draw), and csc's SAE part at --absorption-seeds - 1 more seeds (the LM probe and the L1 probe redrawn)."""
    import dataclasses
    import random

    import torch

    from csc.activations import spelling
    from csc.activations.probe_labels import LETTERS
    from csc.pipeline import absorption as ab

    if args.absorption_words:
        spec = spec.model_copy(update={"eval": spec.eval.model_copy(
            update={"absorption_words": args.absorption_words})})
    e, layer, batch = spec.eval, spec.activations.layer, spec.activations.lm_batch_size
    prefixes, calls = [], []
    orig = {"prefix": spelling.FirstLetterPrompts.prefix, "word_activations": ab.word_activations,
            "train_probe": ab.train_probe, "split_latents": ab.split_latents, "absorbed": ab.absorbed,
            "f1_score": ab.f1_score}

    def prefix(self, examples):
        prefixes.append(orig["prefix"](self, examples))
        return prefixes[-1]

    def word_activations(lm, layer_, prompts, words, pool, rng, lm_batch_size):
        start = len(prefixes)
        x = orig["word_activations"](lm, layer_, prompts, words, pool, rng, lm_batch_size)
        size = min(spelling.PROMPTS_PER_PREFIX, max(1, len(pool) - spelling.ICL_EXAMPLES))
        mine = prefixes[start:]
        assert len(mine) == math.ceil(len(words) / size), "word_activations' groups changed: update the recorder"
        calls.append([mine[i // size] + [w] for i, w in enumerate(words)])  # each word's whole prompt
        return x

    rec: dict = {}

    def train_probe(*a, **kw):
        w, b = orig["train_probe"](*a, **kw)
        rec["l1_weight"] = w.clone()
        return w, b

    def split_latents(*a, **kw):
        f1s = []

        def f1_score(truth, pred):
            f1s.append(orig["f1_score"](truth, pred))
            return f1s[-1]
        ab.f1_score = f1_score
        try:
            split = orig["split_latents"](*a, **kw)
        finally:
            ab.f1_score = orig["f1_score"]
        rec["split"].append(list(split))
        rec["k_f1"].append(f1s)
        return split

    def absorbed(*a, **kw):
        frac, full = orig["absorbed"](*a, **kw)
        rec["frac"].append(frac.clone())
        rec["full"].append(full.clone())
        return frac, full

    def scores(data, seed):
        rec.clear()
        rec.update({"l1_weight": None, "split": [], "k_f1": [], "frac": [], "full": []})
        t0, c0 = time.perf_counter(), time.process_time()
        figures = ab.absorption_scores(sae, data, acts.scale, seed)
        return {"seed": seed, "figures": figures, "seconds": (time.perf_counter() - t0, time.process_time() - c0),
                "probe_weight": data.probe_weight, "probe_bias": data.probe_bias, "probe_f1": data.probe_f1,
                "letters": list(data.letters), "prompt_word": data.prompt_word, "reason": data.reason, **rec}

    spelling.FirstLetterPrompts.prefix = prefix
    ab.word_activations, ab.train_probe, ab.split_latents, ab.absorbed = (word_activations, train_probe,
                                                                          split_latents, absorbed)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        data = ab.absorption_set(spec, acts)  # csc train's own calls, in its order
        t_lm = (time.perf_counter() - t0, time.process_time() - c0)
        runs = [scores(data, e.absorption_seed)]
        # prompts for the test words that are not csc's true positives (the SAEBench side's LM probe finds others)
        words, n = data.words.tolist(), data.n_train
        ids, letters = spelling.alpha_words(acts.lm.tokenizer)
        prompts = spelling.FirstLetterPrompts(acts.lm.tokenizer, acts.lm.bos_token_id, dict(zip(ids, letters)))
        tp = set(data.prompt_word.tolist())
        others = [i for i in range(n, len(words)) if i not in tp]
        t0, c0 = time.perf_counter(), time.process_time()
        other_acts = ab.word_activations(acts.lm, layer, prompts, [words[i] for i in others], words,
                                         random.Random(e.absorption_seed + 1), batch)
        t_more = (time.perf_counter() - t0, time.process_time() - c0)
    finally:
        spelling.FirstLetterPrompts.prefix = orig["prefix"]
        ab.word_activations, ab.train_probe, ab.split_latents, ab.absorbed = (
            orig["word_activations"], orig["train_probe"], orig["split_latents"], orig["absorbed"])
    n_test = len(words) - n
    calc_acts = torch.empty(n_test, data.acts.shape[1])
    calc_prompt: list[list[int]] = [[] for _ in range(n_test)]
    from_csc = torch.zeros(n_test, dtype=torch.bool)
    for i, x, p in zip(data.prompt_word.tolist(), data.prompt_acts, calls[2]):
        calc_acts[i - n], calc_prompt[i - n], from_csc[i - n] = x, p, True
    for i, x, p in zip(others, other_acts, calls[3]):
        calc_acts[i - n], calc_prompt[i - n] = x, p
    # csc's SAE part at more seeds: the LM probe (absorption_set's train_probe call and its F1 cut, as there) and
    # the L1 probe redrawn; true positives read at the prompts above (csc's own where it had them)
    ab.train_probe, ab.split_latents, ab.absorbed = train_probe, split_latents, absorbed
    try:
        for seed in range(e.absorption_seed + 1, e.absorption_seed + args.absorption_seeds):
            w, b = orig["train_probe"](data.acts[:n], data.letter[:n], torch.Generator().manual_seed(seed),
                                       batch_size=64, steps=math.ceil(n / 64), lr=1e-2, weight_decay=1e-4)
            hit = data.acts[n:] @ w.T + b > 0
            truth = data.letter[n:, None] == torch.arange(len(LETTERS))
            f1 = torch.tensor([ab.f1_score(truth[:, c], hit[:, c]) for c in range(len(LETTERS))])
            trained = torch.isin(torch.arange(len(LETTERS)), data.letter[:n])
            usable = tuple(c for c in range(len(LETTERS)) if f1[c] > ab.MIN_PROBE_F1 and trained[c])
            tp_mask = hit.gather(1, data.letter[n:, None]).squeeze(1) & torch.isin(data.letter[n:],
                                                                                   torch.tensor(usable))
            word = n + tp_mask.nonzero().squeeze(1)
            reason = None if len(usable) >= e.absorption_min_letters else f"{len(usable)} letters"
            runs.append(scores(dataclasses.replace(data, probe_weight=w, probe_bias=b, probe_f1=f1, letters=usable,
                                                   prompt_word=word, prompt_acts=calc_acts[word - n],
                                                   reason=reason), seed))
    finally:
        ab.train_probe, ab.split_latents, ab.absorbed = orig["train_probe"], orig["split_latents"], orig["absorbed"]
    part = {"words": data.words, "letter": data.letter, "n_train": n, "vocabulary": data.vocabulary, "vocab_ids": ids,
            "acts": data.acts, "calc_acts": calc_acts, "calc_prompt": calc_prompt, "calc_from_csc": from_csc,
            "min_letters": e.absorption_min_letters, "layer_norm": sae.cfg.layer_norm, "runs": runs}
    seconds = {"csc absorption LM part (absorption_set)": t_lm,
               "csc absorption SAE part (absorption_scores, 1st seed)": runs[0]["seconds"],
               "csc absorption prompts of the other test words": t_more,
               "csc absorption SAE part, other seeds": tuple(sum(r["seconds"][i] for r in runs[1:]) for i in (0, 1))}
    return {"absorption": part}, seconds


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


class PromptActs:
    """What SAEBench's FeatureAbsorptionCalculator calls on its HookedTransformer (to_tokens, run_with_cache,
    tokenizer), answered from activations already read at the word of csc's prompt for each word: `lookup` maps
    the words (the calculator's prompts end with "{word} has the first letter:") to [b, d] activations, which
    run_with_cache hands out at the calculator's word_token_pos. The calculator's own prompt texts (its random
    in-context examples) are parsed for the word only."""

    def __init__(self, tokenizer, hook: str, template: str, token_pos: int, lookup):
        if not template.startswith("{word}"):
            raise ValueError(f"PromptActs parses prompts of templates starting with the word, not {template!r}")
        self.tokenizer, self.hook, self.token_pos, self.lookup = tokenizer, hook, token_pos, lookup
        self.tail = template.format(word="")

    def to_tokens(self, text: str):
        import torch
        return torch.zeros(1, -self.token_pos, dtype=torch.long)  # every prompt "has the same length"

    def run_with_cache(self, texts: list[str], names_filter=None):
        import torch
        x = self.lookup([t.rsplit("\n", 1)[-1][:-len(self.tail)] for t in texts])
        out = torch.zeros(len(texts), -self.token_pos, x.shape[1], dtype=x.dtype)
        out[:, self.token_pos] = x
        return None, {self.hook: out}


class InputSpaceSAE:
    """The SAELens export as the calculator sees it when handed u, an activation in the SAE's input space (csc's
    units: u = LayerNorm(x) with the LayerNorm, else x * s): encode(u) = the export's codes of the raw x (the
    LayerNorm is idempotent, to its epsilon; without it u / s = x). W_dec's directions are the export's."""

    def __init__(self, sae, scale: float, layer_norm: bool):
        self.sae, self.scale, self.layer_norm = sae, scale, layer_norm
        self.W_dec, self.device, self.dtype, self.cfg = sae.W_dec, sae.device, sae.dtype, sae.cfg

    def encode(self, u):
        return self.sae.encode(u if self.layer_norm else u / self.scale)


def input_space(x, scale: float, layer_norm: bool):
    """u = csc's SparseAutoencoder.normalise(x * s): the space csc's absorbed() takes A = u . p in."""
    x = x * scale
    if not layer_norm:
        return x
    c = x - x.mean(dim=-1, keepdim=True)
    return c / (c.std(dim=-1, keepdim=True) + 1e-5)


class _OneClassSafeMetrics:
    """sklearn.metrics for SAEBench's build_metrics_df, with roc_auc_score nan where a letter has no test word (a
    small --absorption-words; SAEBench's whole vocabulary always has some). The AUCs feed no figure."""

    def __getattr__(self, name):
        from sklearn import metrics
        return getattr(metrics, name)

    @staticmethod
    def roc_auc_score(y, score):
        from sklearn import metrics
        return metrics.roc_auc_score(y, score) if 0 < int(sum(y)) < len(y) else float("nan")


ABSORPTION_TL_SPOT = 128
"""With --absorption-acts cache, TransformerLens still reads the prompts of csc's first this many true positives (two
prefix groups), to compare with csc's activations there."""
ABSORPTION_FIGURES = ("absorption_fraction", "absorption_full", "absorption_split_features", "absorption_letters")


def check_absorption(ctx: dict) -> list[dict]:
    """csc's absorption (the csc side's csc.pt "absorption") against SAEBench 0.6.0's evals/absorption on csc's
    words, LM activations and prompts; the module docstring says what runs where."""
    import random
    import statistics
    import warnings

    import numpy as np
    import pandas as pd
    import torch
    from sae_bench.evals.absorption import feature_absorption as fa
    from sae_bench.evals.absorption import k_sparse_probing as ksp
    from sae_bench.evals.absorption import probing as sbp
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
    from sae_bench.evals.absorption.main import _aggregate_results_df
    from sae_bench.evals.absorption.prompting import first_letter_formatter
    from sae_bench.evals.absorption.vocab import LETTERS, convert_tokens_to_string, get_alpha_tokens
    from threadpoolctl import threadpool_limits

    d, model, sae, hook = ctx["csc"], ctx["model"], ctx["sae"], ctx["hook"]
    a, layer, tok = d["absorption"], d["layer"], ctx["model"].tokenizer
    cfg = AbsorptionEvalConfig(model_name=TL_MODEL_NAME)  # SAEBench's defaults: template, thresholds, probe settings
    t0 = time.perf_counter()
    words, n, x = a["words"].tolist(), a["n_train"], a["acts"]
    n_test = len(words) - n
    text = [convert_tokens_to_string(t, tok) for t in tok.convert_ids_to_tokens(words)]
    letter = [LETTERS.index(first_letter_formatter()(w).strip().lower()) for w in text]  # SAEBench's answer_class
    index = {w: i for i, w in enumerate(text[n:])}
    if len(index) != n_test:
        raise RuntimeError("two test words decode to the same text: the calculator's adapter keys words by text")
    vocab = get_alpha_tokens(tok)
    csc_vocab = {convert_tokens_to_string(t, tok) for t in tok.convert_ids_to_tokens(a["vocab_ids"])}
    ctx["notes"].append(
        f"absorption's words: csc draws {len(words)} of its {len(a['vocab_ids'])} words (csc.activations.spelling."
        f"alpha_words), {n} train / {n_test} test; SAEBench's get_alpha_tokens lists {len(vocab)} entries, "
        f"{len(set(vocab))} distinct texts, {len(set(vocab) - csc_vocab)} of them not csc's and "
        f"{len(csc_vocab - set(vocab))} "
        f"of csc's not SAEBench's (its extra entries are byte-fallback tokens decoding to a letter, duplicates of the "
        f"letter's own token); SAEBench's first letter of csc's words agrees with csc's on "
        f"{int((torch.tensor(letter) == a['letter']).sum())}/{len(words)}")
    train_labels = list(zip(text[:n], letter[:n]))
    eval_labels = list(zip(text[n:], letter[n:]))
    scale, layer_norm = d["scale"], a["layer_norm"]
    steps = math.ceil(0.8 * len(vocab) / cfg.k_sparse_probe_batch_size)  # SAEBench's batches per L1-probe epoch

    # the activations the calculator reads at each test word of csc's prompts: csc's (HF, a prefix read once for 64
    # words) or TransformerLens's run of the same token ids, one whole prompt per word
    tl: dict[int, torch.Tensor] = {}

    def ensure_tl(ii: list[int]) -> None:
        groups: dict[tuple, list[int]] = {}
        for i in ii:
            if i not in tl:
                groups.setdefault(tuple(a["calc_prompt"][i][:-1]), []).append(i)
        for group in groups.values():
            for s in range(0, len(group), 64):
                rows = group[s:s + 64]
                _, cache = model.run_with_cache(torch.tensor([a["calc_prompt"][i] for i in rows]),
                                                names_filter=[hook], stop_at_layer=layer + 1)
                for i, v in zip(rows, cache[hook][:, -1].float()):
                    tl[i] = v

    def lookup(ws: list[str], space: str):
        ii = [index[w] for w in ws]
        if ctx["absorption_acts"] == "lm":
            ensure_tl(ii)
            v = torch.stack([tl[i] for i in ii])
        else:
            v = a["calc_acts"][ii]
        return input_space(v, scale, layer_norm) if space == "input" else v

    def saebench(lm_probe, l1_weight, tag: str, spaces: tuple[str, ...]) -> dict:
        """SAEBench's k-sparse probing and absorption calculator downstream of `lm_probe`; the L1 probe csc's
        (l1_weight) or SAEBench's own train_sparse_multi_probe, its epochs SAEBench's `steps` batches of 4096 rows
        drawn from csc's train words (the codes tiled; csc's choice of step count, csc.pipeline.absorption)."""
        train_l1 = ksp.train_sparse_multi_probe

        def own(x_train, y_train, **kw):
            size = min(kw["batch_size"], len(x_train))
            rows = torch.arange(steps * size) % len(x_train)
            codes = x_train
            kw.update(batch_size=size, map_acts=lambda r: codes[r[:, 0].long()], probe_dim=codes.shape[1])
            with torch.enable_grad(), contextlib.redirect_stderr(io.StringIO()):
                return train_l1(rows.float()[:, None], y_train[rows], **kw)

        def given(x_train, y_train, **kw):
            probe = sbp.LinearProbe(l1_weight.shape[1], l1_weight.shape[0])
            probe.fc.weight.copy_(l1_weight)
            probe.fc.bias.zero_()
            return probe

        ksp.train_sparse_multi_probe, metrics = (own if l1_weight is None else given), ksp.metrics
        ksp.metrics = _OneClassSafeMetrics()
        try:
            with threadpool_limits(limits=1), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                k_probes = ksp.train_k_sparse_probes(sae, train_labels, x[:n], ks=list(range(1, cfg.max_k_value + 1)),
                                                     l1_decay=cfg.k_sparse_probe_l1_decay,
                                                     batch_size=cfg.k_sparse_probe_batch_size,
                                                     num_epochs=cfg.k_sparse_probe_num_epochs, precalc_sae_acts=True)
                raw = ksp.eval_probe_and_sae_k_sparse_raw_scores(sae, lm_probe, k_probes, eval_labels, x[n:],
                                                                 eval_batch_size=cfg.eval_k_sparse_probe_batch_size)
                meta = ksp.sae_k_sparse_metadata(sae, lm_probe, k_probes, sae_name=tag, layer=layer)
                metrics_df = ksp.build_metrics_df(raw, meta, max_k_value=cfg.max_k_value)
        finally:
            ksp.train_sparse_multi_probe, ksp.metrics = train_l1, metrics
        ksp.add_feature_splits_to_metrics_df(metrics_df, max_k_value=cfg.max_k_value,
                                             f1_jump_threshold=cfg.f1_jump_threshold)
        folder = Path(ctx["work"]) / "absorption" / tag
        folder.mkdir(parents=True, exist_ok=True)
        raw.to_parquet(folder / ksp.get_sparse_probing_raw_results_filename(tag, layer), index=False)
        likely = fa.get_stats_and_likely_false_negative_tokens(metrics_df, tag, layer, folder)
        by = metrics_df.set_index("letter")
        f1 = [float(by.loc[c, "f1_probe"]) for c in LETTERS]
        L = [i for i, c in enumerate(LETTERS) if f1[i] > cfg.min_GT_probe_f1]
        out = {"f1": torch.tensor(f1), "letters": L, "P": lm_probe.weights.detach().float().clone(),
               "top1": {i: int(by.loc[LETTERS[i], "sparse_sae_k_1_feats"][0]) for i in L},
               "split": {i: [int(j) for j in likely[LETTERS[i]].split_feats] for i in L},
               "k_f1": {i: [float(by.loc[LETTERS[i], f"f1_sparse_sae_{k}"]) for k in range(1, cfg.max_k_value + 1)]
                        for i in L},
               "tp": {i: {n + index[w] for w in likely[LETTERS[i]].potential_false_negatives} for i in L},
               "figures": {}, "letter_fraction": {}}
        out["below_min"] = len(L) < min(a["min_letters"], cfg.min_feats_for_eval)  # main.py's min_feats_for_eval
        if not L:  # (main.py reports nothing below it; the figures are computed anyway, to compare, and noted)
            out["figures"] = {s: {"absorption_letters": 0.0} for s in spaces}
            return out
        if ctx["absorption_acts"] == "lm":
            ensure_tl([index[w] for i in L for w in likely[LETTERS[i]].potential_false_negatives])
        for space in spaces:
            calc = FeatureAbsorptionCalculator(
                model=PromptActs(tok, hook, cfg.prompt_template, cfg.prompt_token_pos,
                                 lambda ws, space=space: lookup(ws, space)),
                icl_word_list=vocab, max_icl_examples=10, base_template=cfg.prompt_template,
                answer_formatter=first_letter_formatter(), word_token_pos=cfg.prompt_token_pos,
                full_absorption_probe_cos_sim_threshold=fa.FULL_ABSORPTION_PROBE_COS_THRESHOLD,
                absorption_fraction_probe_cos_sim_threshold=fa.ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
                probe_projection_proportion_threshold=fa.ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
                absorption_fraction_max_absorbing_latents=fa.ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
                batch_size=cfg.llm_batch_size)
            target = InputSpaceSAE(sae, scale, layer_norm) if space == "input" else sae
            # main.py runs the calculator on every letter and keeps those with f1_probe > min_GT_probe_f1: the
            # others are left out here before it runs (the same figures)
            with contextlib.redirect_stderr(io.StringIO()):
                df = fa.calculate_projection_and_cos_sims(calc, target, lm_probe, layer,
                                                          {LETTERS[i]: likely[LETTERS[i]] for i in L})
            agg = _aggregate_results_df(df)
            keep = agg[agg["letter"].map(lambda c: f1[LETTERS.index(c)] > cfg.min_GT_probe_f1)]
            out["figures"][space] = {
                "absorption_fraction": statistics.mean(keep["mean_absorption_fraction"]),
                "absorption_full": statistics.mean(keep["full_absorption_rate"]),
                "absorption_split_features": statistics.mean(keep["num_split_feats"]),
                "absorption_letters": float(len(L))}
            out["letter_fraction"][space] = dict(zip(keep["letter"].map(LETTERS.index),
                                                     keep["mean_absorption_fraction"]))
        return out

    def from_csc(r: dict) -> dict:
        L = list(r["letters"])
        tp: dict[int, set] = {c: set() for c in L}
        for w in r["prompt_word"].tolist():
            tp[int(a["letter"][w])].add(w)
        has = r["l1_weight"] is not None
        return {"f1": r["probe_f1"], "letters": L, "P": r["probe_weight"],
                "top1": {c: int(r["l1_weight"][c].argmax()) for c in L} if has else {},
                "split": dict(zip(L, r["split"])), "k_f1": dict(zip(L, r["k_f1"])), "tp": tp,
                "figures": {"input": r["figures"]},
                "letter_fraction": {"input": {c: f.mean().item() for c, f in zip(L, r["frac"])}}}

    def agree(p: dict, q: dict) -> dict:
        """Agreement of two runs: letter sets (Jaccard), and over the letters in both: the LM probes' cosine, the
        L1 probes' top latent, the split latents and the true positives (Jaccard)."""
        both = sorted(set(p["letters"]) & set(q["letters"]))
        union = set(p["letters"]) | set(q["letters"])

        def mean(v):
            v = list(v)
            return sum(v) / len(v) if v else None

        def jac(s, t):
            return len(set(s) & set(t)) / len(set(s) | set(t)) if set(s) | set(t) else 1.0
        return {"letters": len(both) / len(union) if union else 1.0,
                "probe_cos": mean(torch.nn.functional.cosine_similarity(p["P"][c], q["P"][c], dim=0).item()
                                  for c in both),
                "top1": mean(float(p["top1"][c] == q["top1"][c]) for c in both if c in p["top1"] and c in q["top1"]),
                "split": mean(jac(p["split"][c], q["split"][c]) for c in both if c in p["split"] and c in q["split"]),
                "tp": mean(jac(p["tp"][c], q["tp"][c]) for c in both)}

    ctx["seconds"]["saebench absorption setup"] = time.perf_counter() - t0
    rows: list[dict] = []
    csc_runs = [from_csc(r) for r in a["runs"]]
    c0 = csc_runs[0]
    seeds_csc = [r["seed"] for r in a["runs"]]
    where = "TransformerLens on csc's prompts" if ctx["absorption_acts"] == "lm" else "csc's cached prompt activations"

    # 1. SAEBench's pieces downstream of csc's own LM probe and L1 probe (no randomness left): exact agreement
    # is expected; the calculator in csc's units (u) and literally (A on raw resid_post)
    t0 = time.perf_counter()
    r0 = a["runs"][0]
    if r0["l1_weight"] is None:  # csc left its SAE part out (too few letters): nothing to load
        ctx["notes"].append(f"absorption: csc left its SAE figures out ({r0['reason']}); no run on csc's probes")
    else:
        lm_probe = sbp.LinearProbe(x.shape[1], len(LETTERS))
        lm_probe.fc.weight.copy_(r0["probe_weight"])
        lm_probe.fc.bias.copy_(r0["probe_bias"])
        fixed = saebench(lm_probe, r0["l1_weight"], "csc_probes", ("input", "raw"))
        ctx["seconds"]["saebench absorption on csc's probes"] = time.perf_counter() - t0
        what = (f"seed {seeds_csc[0]} (csc train's); SAEBench's k-probes, split, calculator, aggregation on csc's LM "
                f"and L1 probes")
        for k in ABSORPTION_FIGURES:
            rows.append({"figure": f"{k}, on csc's probes", "csc": c0["figures"]["input"].get(k),
                         "saebench": fixed["figures"].get("input", {}).get(k), "note": what})
        for k in ABSORPTION_FIGURES[:2]:
            rows.append({"figure": f"{k}, on csc's probes, SAEBench's A on raw resid_post",
                         "csc": c0["figures"]["input"].get(k),
                         "saebench": fixed["figures"].get("raw", {}).get(k),
                         "note": "the calculator as SAEBench runs it on this export: A = x . p on raw x, a_j in the "
                                 "SAE's (LayerNorm'd / scaled) units"})
        both = sorted(set(c0["letters"]) & set(fixed["letters"]))
        rows.append({"figure": "absorption: LM-probe test F1, largest |csc - SAEBench| over 26 letters, "
                               "on csc's probes",
                     "saebench": (c0["f1"] - fixed["f1"]).abs().max().item(), "note": "0: same F1 cut"})
        rows.append({"figure": "absorption: probe true positives over the letters, on csc's probes",
                     "csc": float(sum(len(c0["tp"][c]) for c in c0["letters"])),
                     "saebench": float(sum(len(fixed["tp"][c]) for c in fixed["letters"])),
                     "note": f"identical sets for {sum(c0['tp'][c] == fixed['tp'][c] for c in both)}/{len(both)} "
                             f"letters"})
        kd = [abs(u - v) for c in both if c in c0["k_f1"] for u, v in zip(c0["k_f1"][c], fixed["k_f1"][c])]
        rows.append({"figure": "absorption: k-probe test F1, largest |csc - SAEBench|, on csc's probes",
                     "saebench": max(kd) if kd else None,
                     "note": f"{len(kd)} (letter, k) pairs csc fitted (k up to where its split search stopped)"})
        same = [c for c in both if c in c0["split"] and sorted(c0["split"][c]) == sorted(fixed["split"][c])]
        rows.append({"figure": "absorption: letters with identical split latents, on csc's probes",
                     "csc": float(len(both)), "saebench": float(len(same)),
                     "note": "csc: letters in both L; differing: " + (", ".join(
                         f"{LETTERS[c]} csc {c0['split'][c]} SAEBench {fixed['split'][c]}"
                         for c in both if c not in same and c in c0["split"]) or "none")})
        fl = fixed["letter_fraction"].get("input", {})
        cl = c0["letter_fraction"]["input"]
        lf = [abs(cl[c] - fl[c]) for c in both if c in fl and c in cl]
        rows.append({"figure": "absorption: per-letter mean absorption fraction, largest |csc - SAEBench|, "
                               "on csc's probes",
                     "saebench": max(lf) if lf else None, "note": f"{len(lf)} letters"})

    # 2. SAEBench end to end on csc's words and activations: its own LM probe and L1 probe (torch's RNG seeded)
    t0 = time.perf_counter()
    own_runs = []
    for s in range(cfg.random_seed, cfg.random_seed + ctx["absorption_seeds"]):
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        frame = {"train": pd.DataFrame({"answer_class": letter[:n]}),
                 "test": pd.DataFrame({"answer_class": letter[n:]})}
        with torch.enable_grad(), contextlib.redirect_stderr(io.StringIO()):
            probe, _ = sbp.train_linear_probe_for_task(frame["train"], frame["test"], "cpu", x[:n].numpy(),
                                                       x[n:].numpy(), num_classes=len(LETTERS), batch_size=64,
                                                       num_epochs=50, lr=1e-2)  # common.train_and_save_probes' settings
        own_runs.append(saebench(probe, None, f"own_{s}", ("input",)))
    ctx["seconds"]["saebench absorption, own probes"] = time.perf_counter() - t0
    seeds_sb = list(range(cfg.random_seed, cfg.random_seed + ctx["absorption_seeds"]))
    what = (f"csc at seeds {seeds_csc} (the first csc train's), SAEBench's own LM and L1 probes at torch seeds "
            f"{seeds_sb}; mean, spread max - min")
    for k in ABSORPTION_FIGURES:
        cv = [r["figures"]["input"].get(k) for r in csc_runs]
        sv = [r["figures"]["input"].get(k) for r in own_runs]
        row = {"figure": k, "note": what}
        if None not in cv:
            row["csc"], row["csc_spread"] = mean_spread(cv)
        if None not in sv:
            row["saebench"], row["saebench_spread"] = mean_spread(sv)
        rows.append(row)
    f1c, f1s = [r["f1"].mean().item() for r in csc_runs], [r["f1"].mean().item() for r in own_runs]
    (cm, cs), (sm, ss) = mean_spread(f1c), mean_spread(f1s)
    rows.append({"figure": "absorption: LM-probe test F1, mean over 26 letters", "csc": cm, "csc_spread": cs,
                 "saebench": sm, "saebench_spread": ss, "note": what})
    own_agree = agree(c0, own_runs[0])
    csc_agree = agree(c0, csc_runs[1]) if len(csc_runs) > 1 else {}
    labels = {"letters": "letters in L, Jaccard of the two sets",
              "probe_cos": "LM probes' cosine, mean over the letters in both L",
              "top1": "L1 probe's top latent the same, share of the letters in both L",
              "split": "split latents, Jaccard, mean over the letters in both L",
              "tp": "probe true positives, Jaccard, mean over the letters in both L"}
    for k, label in labels.items():
        rows.append({"figure": f"absorption agreement: {label}", "csc": csc_agree.get(k), "saebench": own_agree.get(k),
                     "note": f"csc: csc seed {seeds_csc[0]} vs csc seed {seeds_csc[1]} (csc's own noise); SAEBench: "
                             f"csc seed {seeds_csc[0]} vs SAEBench seed {seeds_sb[0]}" if len(csc_runs) > 1 else
                             f"SAEBench: csc seed {seeds_csc[0]} vs SAEBench seed {seeds_sb[0]}"})
    only = [(LETTERS[c], side) for side, run in (("csc", c0), ("SAEBench", own_runs[0]))
            for c in run["letters"] if c not in (own_runs[0] if side == "csc" else c0)["letters"]]
    ctx["notes"].append(
        f"absorption: letters with LM-probe F1 > {cfg.min_GT_probe_f1}: csc seed {seeds_csc[0]} "
        f"{''.join(LETTERS[c] for c in c0['letters'])}, SAEBench seed {seeds_sb[0]} "
        f"{''.join(LETTERS[c] for c in own_runs[0]['letters'])}"
        + (f" (on one side only: {', '.join(f'{l} ({s})' for l, s in only)})" if only else "")
        + f". Per seed, csc: " + "; ".join(
            f"{r['seed']}: " + ", ".join(f"{k} {fmt(r['figures'].get(k))}" for k in ABSORPTION_FIGURES)
            for r in a["runs"])
        + ". SAEBench own: " + "; ".join(f"{s}: " + ", ".join(f"{k} {fmt(r['figures']['input'].get(k))}"
                                                                for k in ABSORPTION_FIGURES)
                                         for s, r in zip(seeds_sb, own_runs)))
    ctx["notes"].append(
        f"absorption's calculator reads {where}: the true positives' prompts are csc's (examples from the "
        f"{len(words)} words, 64 words sharing one draw), {int(a['calc_from_csc'].sum())} of the {n_test} test words "
        f"from csc's own absorption_set, the others drawn for the SAEBench side's other true positives "
        f"(csc.activations.spelling.word_activations, seed + 1). The probes read csc's cached word activations.")
    low = [s for s, r in zip(seeds_sb, own_runs) if r.get("below_min")]
    if low:
        ctx["notes"].append(f"absorption: SAEBench's own LM probe at seed(s) {low} passes fewer than "
                            f"min_feats_for_eval = {cfg.min_feats_for_eval} letters, where its main.py reports no "
                            f"figures; they are computed here all the same, on the letters it has")
    if ctx["absorption_acts"] == "cache":  # a spot check of csc's prompt activations all the same
        ensure_tl(a["calc_from_csc"].nonzero().squeeze(1).tolist()[:ABSORPTION_TL_SPOT])
    if tl:
        ii = sorted(tl)
        gap = (torch.stack([tl[i] for i in ii]) - a["calc_acts"][ii]).norm(dim=-1) / a["calc_acts"][ii].norm(dim=-1)
        ctx["notes"].append(f"absorption prompts: TransformerLens on each whole prompt against csc's activation (a "
                            f"prefix read once for up to 64 words, HF eager): ||TL - csc|| / ||csc|| median "
                            f"{gap.median().item():.2e}, max {gap.max().item():.2e} over {len(ii)} words"
                            + (" (a spot check: the calculator read csc's)" if ctx["absorption_acts"] == "cache"
                               else ""))
    return rows


CHECKS = [check_core, check_probing, check_absorption]
"""Each takes the shared context (csc's data, the HookedTransformer, the SAELens SAEs) and returns table rows;
--checks picks them by name (check_NAME), and the csc side computes only what the picked ones read."""
CSC_PARTS = {"core": "core", "probing": "probing", "absorption": "absorption"}
"""The key of csc.pt each check reads (--reuse reruns the csc side for the checks whose key is missing)."""


def saebench_side(args: argparse.Namespace) -> None:
    os.environ.setdefault("JAXTYPING_DISABLE", "1")
    import resource

    import torch

    t_start, c_start = time.perf_counter(), time.process_time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    have = set()
    if args.reuse and (work / "csc.pt").is_file():
        have = {name for name, key in CSC_PARTS.items() if key in torch.load(work / "csc.pt", weights_only=False)}
    missing = [name for name in args.checks if name not in have]
    seconds = {}
    if missing:
        cmd = [str(args.csc_python), str(Path(__file__).resolve()), str(args.run), "--role", "csc", "--work",
               str(work), "--seeds", str(args.seeds), "--ce-contexts", str(args.ce_contexts),
               "--probe-contexts", str(args.probe_contexts), "--absorption-words", str(args.absorption_words),
               "--absorption-seeds", str(args.absorption_seeds), "--checks", *missing] + (["--merge"] if have else [])
        print("csc side:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds["csc side (subprocess)"] = (time.perf_counter() - t0, child.ru_utime + child.ru_stime)
    d = torch.load(work / "csc.pt", weights_only=False)
    # the csc side's own timings (this call's or --reuse's earlier one), (wall, CPU) where it has both
    seconds.update({f"  {k}": v for k, v in d["seconds"].items() if any(k.startswith(f"csc {m}") for m in args.checks)})

    import warnings

    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
    from sae_lens import SAE

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = load_hooked_model(d["model_folder"], torch.float32)
    saes = {}
    folders = [("csc", Path(args.run) / "sae")] + ([("random floor", work / "floor_sae")]
                                                   if "probing" in args.checks else [])
    for name, folder in folders:
        # SAEBench's own path for a custom SAE object: it checks the decoder norms (a warning) and copies
        # SAELens 6's cfg.metadata fields (hook_name, hook_layer, ...) onto cfg, where its evals read them
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            saes[name] = load_and_format_sae(name, SAE.load_from_disk(str(folder), device="cpu"), "cpu")[1]
        for w in caught:
            if "Decoder weights" in str(w.message):
                print(f"SAEBench on the {name} SAE: {w.message}")
    seconds["load TL model + SAEs"] = time.perf_counter() - t0
    ctx = {"csc": d, "model": model, "sae": saes["csc"], "floor": saes.get("random floor"),
           "hook": f"blocks.{d['layer']}.hook_resid_post", "seconds": seconds, "notes": [],
           "probe_acts": args.probe_acts, "absorption_acts": args.absorption_acts,
           "absorption_seeds": args.absorption_seeds, "work": work}
    rows = []
    for check in CHECKS:
        if check.__name__.removeprefix("check_") not in args.checks:
            continue
        rows += check(ctx)
        print(f"{check.__name__} done ({len(rows)} rows so far)", flush=True)
        (work / "table.json").write_text(json.dumps({"rows": rows, "notes": ctx["notes"]}, indent=1))
    print()
    what = [f"SAE {args.run}/sae ({d['model_name']} layer {d['layer']}); csc from its own venv, SAEBench 0.6.0 here; "
            f"checks {', '.join(args.checks)}"]
    if "probing" in args.checks:
        what.append(f"probing seeds {d['probe_seeds']} (each side), {d['probe_contexts']} probing contexts"
                    + (" (subsampled: --probe-contexts)" if args.probe_contexts else "")
                    + f"; probing activations from {'TransformerLens' if args.probe_acts == 'lm' else 'csc cache'}")
    if "absorption" in args.checks:
        a = d["absorption"]
        what.append(f"absorption on {len(a['words'])} words" + (" (--absorption-words)" if args.absorption_words else
                                                                " (the run's eval.absorption_words)")
                    + f", calculator activations from "
                    + ("TransformerLens" if args.absorption_acts == "lm" else "csc cache"))
    print("; ".join(what))
    print(format_table(rows))
    for note in ctx["notes"]:
        print(f"\n{note}")
    ej = d["eval_json"]
    if ej:  # csc's side at the run's settings is what `csc train` printed
        mine = {**d.get("core", {}),
                **{f"probe_{t}_{k}": v for t, runs in d.get("probing", {}).items() for k, v in runs[0].items()},
                **(d["absorption"]["runs"][0]["figures"] if "absorption" in d else {})}
        keys = [k for k in mine if k in ej and (k.startswith(("probe_", "absorption_")) or k in CORE_FIGURES)]
        off = [k for k in keys if abs(ej[k] - mine[k]) > 1e-6 * max(1.0, abs(ej[k]))]
        if keys:
            print(f"\ncsc's side reproduces the run's eval.json on {len(keys) - len(off)}/{len(keys)} figures"
                  + (f" (not: {', '.join(off)}; --ce-contexts / --probe-contexts / --absorption-words other than "
                     f"the run's change them, and so does a csc version other than the one that trained it)"
                     if off else ""))
    seconds["total"] = (time.perf_counter() - t_start, time.process_time() - c_start
                        + seconds.get("csc side (subprocess)", (0, 0))[1])
    print("seconds (wall, or wall/CPU): " + ", ".join(
        f"{k} {v[0]:.0f}/{v[1]:.0f}" if isinstance(v, (tuple, list)) else f"{k} {v:.0f}" for k, v in seconds.items()))
    (work / "table.json").write_text(json.dumps({"rows": rows, "notes": ctx["notes"], "seconds": seconds}, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a csc run folder (sae/ export, spec.json, eval.json)")
    p.add_argument("--work", default="/tmp/xcheck/bench", help="scratch folder (csc.pt, floor_sae/, table.json)")
    p.add_argument("--csc-python", default=os.environ.get("CSC_PYTHON", str(CSC_PYTHON)),
                   help="python of csc's venv, which computes csc's side (default: the repo's .venv)")
    p.add_argument("--checks", nargs="+", choices=list(CSC_PARTS), default=list(CSC_PARTS),
                   help="which checks to run (default: all); the csc side computes only what they read")
    p.add_argument("--seeds", type=int, default=3, help="probing seeds per side (the first is eval.probe_seed)")
    p.add_argument("--ce-contexts", type=int, default=0, help="held-out contexts for CE/KL (0: the run's eval.ce_contexts)")
    p.add_argument("--probe-contexts", type=int, default=0, help="probe only the examples of the first N probing "
                                                                  "contexts (0: all)")
    p.add_argument("--probe-acts", choices=["lm", "cache"], default="lm",
                   help="probing's LM activations: lm = SAEBench's get_llm_activations through TransformerLens "
                        "(~90k tokens to the hooked layer: minutes on 2 cores), cache = csc's cached ones (seconds)")
    p.add_argument("--absorption-words", type=int, default=0,
                   help="absorption's words, on both sides (0: the run's eval.absorption_words)")
    p.add_argument("--absorption-seeds", type=int, default=3,
                   help="absorption seeds per side (csc's first is eval.absorption_seed; SAEBench's from its 42)")
    p.add_argument("--absorption-acts", choices=["lm", "cache"], default="lm",
                   help="the activations SAEBench's absorption calculator reads at each true positive's prompt: lm = "
                        "TransformerLens on csc's prompts (~100 tokens per word: minutes), cache = csc's own")
    p.add_argument("--reuse", action="store_true", help="reuse WORK/csc.pt from an earlier csc side (the csc side "
                                                        "reruns for the checks whose part it lacks)")
    p.add_argument("--merge", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--role", choices=["saebench", "csc"], default="saebench", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    (csc_side if args.role == "csc" else saebench_side)(args)


if __name__ == "__main__":
    main()
