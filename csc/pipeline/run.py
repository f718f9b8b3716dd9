"""Train one SAE from a spec, end to end: activations, trainer, checkpoints, evaluation, export.

A run folder holds:
    spec.json          the resolved spec (what `csc eval` rebuilds the held-out data from)
    metrics.jsonl      one line of training metrics per report
    checkpoint/        resumable trainer state (safetensors + JSON), every `checkpoint_every` steps
    sae/               the exported SAE: sae_weights.safetensors + cfg.json (SAELens layout)
    eval.json          held-out metrics of the exported SAE
    curves.png         training curves; density.png: feature-density histogram on held-out tokens
    dashboard.html     feature dashboard of the exported SAE (csc.pipeline.dashboard), one self-contained file
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from csc.activations.pairing import FIRST_ANCHOR
from csc.activations.probe_labels import ProbeLabels
from csc.activations.source import Activations, ShardSource, shard_batches
from csc.config import TrainRunSpec
from csc.errors import CscError, InputError
from csc.pipeline import dashboard, plots
from csc.pipeline.absorption import ABSORPTION_METRICS, AbsorptionSet, absorption_scores, absorption_set
from csc.pipeline.evaluate import (SAEBENCH_BATCH_PROMPTS, CleanRuns, clean_runs, locality_scores,
                                   reconstruction_scores, saebench_sparsity_scores, special_token_ids, splice_scores,
                                   spliced_scores)
from csc.pipeline.probing import PROBING_METRICS, held_out_labels, probing_scores
from csc.sae.batch import ActivationBatch
from csc.sae.checkpoint import load_checkpoint, save_checkpoint
from csc.sae.export import HookInfo, load_sae, save_sae
from csc.sae import metrics
from csc.sae.metrics import DensityHistogram
from csc.sae.saelens_folder import load_saelens_sae, read_saelens_folder
from csc.sae.model import SparseAutoencoder
from csc.sae.trainer import Hook, Metrics, Trainer

SPEC_FILE = "spec.json"


def training_stream(acts: ShardSource, batch_size: int, seed: int, start: int = 0) -> Iterator[ActivationBatch]:
    """Endless batches, cut as `activations.batching` says from windows of `activations.shuffle_shards` shards:
    pass e over the training shards is shuffled with seed + e. Starts at batch `start`, so a resumed trainer sees
    exactly the batches it would have seen."""
    a = acts.spec.activations
    per_pass = acts.n_shards["train"] * a.contexts_per_shard * (a.context_length - FIRST_ANCHOR) // batch_size
    if per_pass == 0:
        raise CscError(f"trainer.batch_size {batch_size} is larger than the {acts.spec.activations.train_tokens} "
                       f"training tokens: raise activations.train_tokens or lower the batch size")
    epoch, skip = divmod(start, per_pass)
    for e in itertools.count(epoch):
        passes = shard_batches(acts, "train", batch_size, seed=seed + e, batching=a.batching, window=a.shuffle_shards)
        yield from itertools.islice(passes, skip, None)
        skip = 0


def hook_info(spec: TrainRunSpec, norm_scale: float) -> HookInfo:
    """Where the SAEs of this spec read, for their exports."""
    a = spec.activations
    return HookInfo(model_name=spec.model.name, hook_layer=a.layer, norm_scale=norm_scale,
                    context_size=a.context_length, dataset_path=spec.corpus.source)


class RunLog(Hook):
    """`csc train`'s hook: a progress bar, one metrics.jsonl line per report, a checkpoint every
    `checkpoint_every` steps (the last one is saved after training)."""

    def __init__(self, spec: TrainRunSpec, out: Path, trainer: Trainer, progress: bool,
                 callback: Callable[[Metrics], None] | None):
        self.spec, self.ckpt, self.callback = spec, out / "checkpoint", callback
        log_path = out / "metrics.jsonl"
        if log_path.exists():  # resumed: drop reports of steps after the checkpoint, they are trained again
            kept = [x for x in log_path.read_text().splitlines() if json.loads(x)["step"] <= trainer.step]
            log_path.write_text("".join(x + "\n" for x in kept))
        self.log = log_path.open("a")
        self.bar = tqdm(total=spec.trainer.steps, initial=trainer.step, desc="train", unit="step",
                        disable=not progress)

    def on_step(self, trainer: Trainer, metrics: Metrics) -> None:
        self.bar.update(1)
        if trainer.step % self.spec.checkpoint_every == 0 and not trainer.done:
            save_checkpoint(trainer, self.ckpt)

    def on_report(self, trainer: Trainer, report: Metrics) -> None:
        self.log.write(json.dumps(report) + "\n")
        self.log.flush()
        self.bar.set_postfix(loss=f"{report['loss']:.3g}", ev=f"{report['ev']:.3f}", l0=f"{report['l0']:.0f}")
        if self.callback is not None:
            self.callback(report)

    def close(self) -> None:
        self.bar.close()
        self.log.close()


def train_run(spec: TrainRunSpec, out: Path, *, resume: bool = False, acts: Activations | None = None,
              callback: Callable[[Metrics], None] | None = None, progress: bool = True) -> dict[str, float]:
    """Train, checkpoint, export and evaluate; returns the held-out metrics."""
    acts = acts or Activations(spec)
    labels = held_out_labels(spec, acts)  # before training: a corpus that cannot be probed fails now
    sae_cfg = spec.sae.model_copy(update={"d_in": acts.d_model})
    ckpt = out / "checkpoint"
    if resume and (ckpt / "trainer_state.json").is_file():
        trainer = load_checkpoint(ckpt)
        if trainer.sae_cfg != sae_cfg or trainer.cfg != spec.trainer:
            raise CscError(f"{ckpt}: the checkpoint was made with a different sae/trainer spec; "
                           f"use another output folder or drop --resume")
    else:
        if out.exists() and any(out.iterdir()) and not resume:
            raise CscError(f"output folder {out} is not empty: pass --resume to continue it, or choose another")
        trainer = Trainer(sae_cfg, spec.trainer)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).write_text(spec.model_dump_json(indent=1))

    t0, tokens0 = time.perf_counter(), trainer.tokens
    log = RunLog(spec, out, trainer, progress, callback)
    try:
        if not trainer.done:
            trainer.fit(training_stream(acts, spec.trainer.batch_size, spec.trainer.seed,
                                        start=trainer.batches_consumed), [log])
        save_checkpoint(trainer, ckpt)
    finally:
        log.close()
    train_seconds = time.perf_counter() - t0
    save_sae(trainer.model, out / "sae", hook_info(spec, acts.scale))
    results, hist = evaluate_run(spec, trainer.model, acts, labels=labels)
    a = spec.activations
    plots.training_curves([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()],
                          out / "curves.png", title=f"{spec.model.name} layer {a.layer}, {trainer.sae_cfg.architecture}, "
                                                    f"gamma {spec.trainer.gamma}")
    plots.density_histogram(hist, out / "density.png", title=f"dictionary {trainer.sae_cfg.dict_size}")
    results["train_steps"] = float(trainer.step)
    results["train_tokens"] = float(trainer.tokens)
    if trainer.tokens > tokens0:
        results["train_tokens_per_s"] = (trainer.tokens - tokens0) / train_seconds
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    (out / dashboard.FILE).write_text(dashboard.build(spec, trainer.model, acts, results))
    return results


def evaluate_run(spec: TrainRunSpec, sae: SparseAutoencoder, acts: ShardSource,
                 splice: Callable[[SparseAutoencoder], dict[str, float]] | None = None,
                 labels: ProbeLabels | None = None, absorption: AbsorptionSet | None = None,
                 seconds: dict[str, float] | None = None) -> tuple[dict[str, float], DensityHistogram]:
    """Held-out reconstruction and contrastive metrics over every eval token, context locality over every eval
    context, and CE/KL (with SAEBench's figures) over `eval.ce_contexts` contexts. Held-out batches have the
    training batch size (capped to the held-out anchors), so held-out nce has the training nce's negatives per
    anchor and the same chance level.

    Locality needs each context's tokens in order, which the held-out batches shuffle and spread over several
    batches: it reads the shards again, whole contexts of anchors (positions >= FIRST_ANCHOR, the tokens of every
    held-out figure), about a training batch of anchors at a time so that the codes fit where training's did.
    `splice` measures what needs the LM or its tokenizer where the LM lives (the sweep's producer actor); by
    default `acts` holds it. Sparse probing (csc.pipeline.probing) pools codes over `labels`, the probing set that
    the tokenizer's holder derives (held_out_labels); by default from `acts`. Feature absorption
    (csc.pipeline.absorption, with eval.absorption) reads `absorption`, the LM's part that the LM's holder makes
    (absorption_set); by default from `acts`. `seconds` gets what each part took: eval_held_out, eval_ce_kl,
    eval_probing, eval_absorption (csc.sweep.reported.WALL_TIME)."""
    seconds = {} if seconds is None else seconds
    sae = sae.to("cpu").eval()
    with _timed(seconds, "eval_held_out"):
        results, hist = held_out_scores(spec, sae, acts)
        results["decoder_mean_max_cos"] = metrics.decoder_max_cosine(sae.W_dec)
    with _timed(seconds, "eval_ce_kl"):
        results.update(splice(sae) if splice is not None else splice_run(spec, sae, acts))
    with _timed(seconds, "eval_probing"):
        results.update(probing_scores(spec, sae, acts, labels if labels is not None else held_out_labels(spec, acts)))
    if spec.eval.absorption:
        with _timed(seconds, "eval_absorption"):
            data = absorption if absorption is not None else absorption_set(spec, acts)
            results.update(absorption_scores(sae, data, acts.scale, spec.eval.absorption_seed))
    return results, hist


@contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = time.perf_counter() - start


@torch.no_grad()
def held_out_scores(spec: TrainRunSpec, sae: SparseAutoencoder, acts: ShardSource
                    ) -> tuple[dict[str, float], DensityHistogram]:
    """What needs no LM: reconstruction and contrastive figures over every held-out anchor of `acts`
    (csc.pipeline.evaluate.reconstruction_scores), in batches of the training batch size (capped to the held-out
    anchors), and context locality over every held-out context, on `sae` as it is (train or eval mode, its device)."""
    size = min(spec.trainer.batch_size, _eval_anchors(acts))
    batches = shard_batches(acts, "eval", size, device=sae.W_dec.device, drop_last=False)
    results, hist = reconstruction_scores(sae, batches, temperature=spec.trainer.temperature,
                                          hard_negatives=spec.trainer.hard_negatives,
                                          latents=spec.trainer.nce_latent_count(sae.cfg.dict_size))
    per_batch = max(1, size // (spec.activations.context_length - FIRST_ANCHOR))
    results.update(locality_scores(sae, (x[:, FIRST_ANCHOR:] for x, _ in _held_out_contexts(acts, per_batch))))
    return results, hist


def _ce_contexts(spec: TrainRunSpec, acts: Activations) -> torch.Tensor:
    """The first `eval.ce_contexts` held-out contexts [n, T], which CE and KL are measured over."""
    S = spec.activations.contexts_per_shard
    n_ctx = min(spec.eval.ce_contexts, acts.n_shards["eval"] * S)
    return torch.cat([acts.shard("eval", i).tokens for i in range(-(-n_ctx // S))])[:n_ctx]


def clean_runs_of(spec: TrainRunSpec, acts: Activations) -> CleanRuns:
    """The CE/KL evaluation's runs without an SAE over the first `eval.ce_contexts` held-out contexts."""
    e = spec.eval
    return clean_runs(acts.lm.model, _ce_contexts(spec, acts), spec.activations.layer, special_token_ids(acts.lm),
                      lm_batch_size=e.lm_batch_size, chunk_tokens=e.chunk_tokens)


def splice_run(spec: TrainRunSpec, sae: SparseAutoencoder, acts: Activations,
               clean: CleanRuns | None = None) -> dict[str, float]:
    """What needs the LM or its tokenizer: CE/KL with `sae` spliced into the LM over the first `eval.ce_contexts`
    held-out contexts (csc's and SAEBench's; against `clean`, clean_runs_of(spec, acts), where a sweep keeps it,
    else in one pass), and SAEBench's sparsity and legacy variance figures over every held-out context (they drop
    the tokenizer's BOS/EOS/PAD tokens)."""
    e, special = spec.eval, special_token_ids(acts.lm)
    if clean is not None:
        results = spliced_scores(acts.lm.model, sae, clean, acts.scale, e.chunk_tokens)
    else:
        results = splice_scores(acts.lm.model, sae, _ce_contexts(spec, acts), spec.activations.layer, acts.scale,
                                special, lm_batch_size=e.lm_batch_size, chunk_tokens=e.chunk_tokens)
    results.update(saebench_sparsity_scores(sae, _held_out_contexts(acts, SAEBENCH_BATCH_PROMPTS), special))
    return results


def _held_out_contexts(acts: ShardSource, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every held-out context in order, up to `size` of one shard at a time: (scaled activations [n, T, d],
    tokens [n, T])."""
    for i in range(acts.n_shards["eval"]):
        sh = acts.shard("eval", i)
        for s in range(0, sh.tokens.shape[0], size):
            yield sh.acts[s:s + size].float() * acts.scale, sh.tokens[s:s + size]


def _eval_anchors(acts: ShardSource) -> int:
    a = acts.spec.activations
    return acts.n_shards["eval"] * a.contexts_per_shard * (a.context_length - 2)


def train_run_spec(run_dir: Path) -> tuple[TrainRunSpec, Path] | None:
    """The spec and the exported SAE folder of a run folder that `csc train` wrote (or of its sae/ subfolder);
    None when `run_dir` is not one."""
    sae_dir = run_dir / "sae" if (run_dir / "sae").is_dir() else run_dir
    spec_path = sae_dir.parent / SPEC_FILE
    if not (spec_path.is_file() and (sae_dir / "cfg.json").is_file()):
        return None
    return TrainRunSpec.model_validate_json(spec_path.read_text()), sae_dir


def evaluate_saved(spec: TrainRunSpec, sae_dir: Path, dashboard_file: Path, trained_on_spec: bool) -> dict[str, float]:
    """`csc eval`: reload an SAE folder, measure it on the held-out data of `spec` and write its feature dashboard to
    `dashboard_file`. `trained_on_spec`: csc trained it on `spec`'s activations (its export must carry the scale
    they give); else it is read as SAELens reads it, on raw activations (SAELens's own folders, or a csc export
    measured with another spec), and this cache's scale is unfolded from it."""
    if trained_on_spec:
        sae, meta = load_sae(sae_dir)
        acts = Activations(spec)
        if abs(meta["csc_norm_scale"] - acts.scale) > 1e-6 * acts.scale:
            raise CscError(f"{sae_dir}: the SAE was trained with normalisation scale {meta['csc_norm_scale']}, "
                           f"the activation cache now gives {acts.scale}")
    else:
        folder = read_saelens_folder(sae_dir)
        acts = Activations(spec)
        if folder.sae_config["d_in"] != acts.d_model:
            raise InputError(f"{sae_dir / 'cfg.json'}: d_in {folder.sae_config['d_in']}, but {spec.model.name!r} "
                             f"layer {spec.activations.layer} has width {acts.d_model}")
        sae = load_saelens_sae(folder, acts.scale)
    results = evaluate_run(spec, sae, acts)[0]
    dashboard_file.write_text(dashboard.build(spec, sae, acts, results))
    return results


METRIC_ORDER = [
    ("explained_variance", "explained variance (centred)"), ("mse", "MSE"), ("normalized_mse", "normalised MSE"),
    ("cosine_similarity", "cosine(x, x_hat)"), ("l0", "L0"), ("l1", "L1"), ("dead_fraction", "dead fraction"),
    ("ce_clean", "CE clean"), ("ce_spliced", "CE with SAE"), ("ce_ablated", "CE zero-ablated"),
    ("ce_loss_recovered", "CE loss recovered"), ("delta_ce", "delta CE (nats)"), ("kl_spliced", "KL(clean || SAE)"),
    ("kl_ablated", "KL(clean || ablated)"), ("decoder_mean_max_cos", "decoder mean max |cos|"),
    ("nce", "InfoNCE (held out)"), ("nce_chance", "InfoNCE at chance"),
    ("code_sim_positive", "code cos, positive pairs"), ("code_sim_negative", "code cos, other sequences"),
    ("context_locality", "context locality, median latent"),
    ("context_locality_weighted", "context locality, firing-weighted"),
    ("ce_loss_score", "SAEBench ce_loss_score"), ("ce_loss_with_sae", "SAEBench ce_loss_with_sae"),
    ("ce_loss_without_sae", "SAEBench ce_loss_without_sae"),
    ("ce_loss_with_ablation", "SAEBench ce_loss_with_ablation"),
    ("kl_div_score", "SAEBench kl_div_score"), ("kl_div_with_sae", "SAEBench kl_div_with_sae"),
    ("kl_div_with_ablation", "SAEBench kl_div_with_ablation"),
    ("explained_variance_legacy", "SAEBench explained_variance_legacy"), ("saebench_l0", "SAEBench l0"),
    ("saebench_l1", "SAEBench l1"),
    *PROBING_METRICS, *ABSORPTION_METRICS,
    ("tokens", "held-out tokens"), ("ce_tokens", "CE tokens"),
    ("train_steps", "training steps"), ("train_tokens", "training tokens"), ("train_tokens_per_s", "training tokens/s"),
]


def format_metrics(results: dict[str, float]) -> str:
    rows = [(label, results[key]) for key, label in METRIC_ORDER if key in results]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value:>12.6g}" for label, value in rows)
