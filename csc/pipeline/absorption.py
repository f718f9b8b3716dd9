"""Feature absorption on the first-letter task, SAEBench 0.6.0's definition (evals/absorption: main.py,
k_sparse_probing.py, feature_absorption.py, feature_absorption_calculator.py, probing.py).

Data (the LM's part, `absorption_set`: made once per run, or once per sweep in the producer that holds the LM).
W = eval.absorption_words words of the tokenizer (csc.activations.spelling: tokens of ASCII letters), drawn at random;
the first 80% are train words, the rest test words (SAEBench's 80/20 split of its vocabulary). x_w = resid_post of the
spec's layer at word w of its first-letter prompt (in-context examples from w's own side of the split), raw.

    LM probe       26 one-vs-rest logistic probes on x (SAEBench's LinearProbe, train_multi_probe: BCE with
                   pos_weight = #negatives / #positives per letter, Adam lr 1e-2 decaying exponentially to 1e-5,
                   weight decay 1e-4, batches of 64, 50 epochs), fitted on the train words: weights P_c, bias q_c
    f1_c           F1 on the test words of "P_c . x_w + q_c > 0" for "w starts with c"
    letters L      {c : f1_c > 0.6} (min_GT_probe_f1); fewer than eval.absorption_min_letters: no figure but
                   absorption_letters (SAEBench's min_feats_for_eval check)
    TP_c           test words of letter c with P_c . x_w + q_c > 0 (the probe's true positives), each read again at
                   the word of a new prompt whose examples come from all W words: y_w

SAE figures (`absorption_scores`, each SAE; z(.) = the SAE's codes, u(.) = its input space, below):

    L1 probe       the same 26 probes on z(x) of the train words, with 0.01 * mean_c ||A_c||_1 added to the loss
                   (train_sparse_multi_probe: lr 1e-2 -> 1e-5, weight decay 1e-6, batches of 4096, 50 epochs of
                   ceil(0.8 V / 4096) batches, V = the tokenizer's words): A_c
    k-probe        for k = 1..10: S_c(k) = the k latents of largest A_c (signed), a logistic regression
                   (sklearn, max_iter 500, class_weight balanced) on z(x)[S_c(k)] of the train words; F_c(k) its
                   test F1 (prediction: decision > 0)
    split          S_c = S_c(k*): k rises from 1 while F_c(k) > F_c(k_prev) + 0.03; k* the last such k
                   (add_feature_splits_to_metrics_df)
    per word w in TP_c, p = P_c / ||P_c||, cos_j = cos(p, W_dec_j), a_j = z_j(y_w) cos_j, A = u(y_w) . p:
      M            sum_{j in S_c} a_j                            (the main latents' projection on the probe)
      T            sum of the <= 3 largest a_j > 0 over j not in S_c with cos_j >= 0.1   (absorbers)
      frac_w       0 if M >= A or T / A < 0.4;  else 1 if M <= 0;  else min(T, A - M) / (min(T, A - M) + M)
      full_w       every z_j(y_w), j in S_c, < 1e-8;  and for t = argmax_j a_j: cos_t >= 0.025, A >= 0, a_t / A >= 0.4

    absorption_fraction       = mean over c in L of  sum_{w in TP_c} frac_w / |TP_c|   (mean_absorption_fraction_score)
    absorption_full           = mean over c in L of  #{w in TP_c: full_w} / |TP_c|     (mean_full_absorption_score)
    absorption_split_features = mean over c in L of |S_c|                               (mean_num_split_features)
    absorption_letters        = |L|

Units. Codes are csc's on scaled activations (x * norm_scale), which equal the export's codes on raw ones. A and a_j
are both taken in the SAE's input space u = x * norm_scale, LayerNorm'd when sae.layer_norm (n in csc.sae.model),
where W_dec's rows have unit norm: a_j is latent j's part of the decoder output's projection on p, in the units of
A. SAEBench takes A on raw activations, which agrees for the SAELens SAEs it runs (raw inputs, unit decoder rows);
on a csc export raw x . p would be off by norm_scale (folded into W_dec) or by the token's standard deviation (the
LayerNorm). The LM probe, its F1 and its true positives read raw activations, as SAEBench's.

Where csc departs from SAEBench: W words instead of every word of the vocabulary and the prompts' shared in-context
examples (csc.activations.spelling), so that the LM's part takes minutes on 2 CPU cores (about 400 CPU-s for the
embedded model at W = 10,000; the whole vocabulary is 14 times as many words). SAEBench's epochs pass over the train
part of all V words. The L1 probe keeps SAEBench's number of optimiser steps: each of its epochs takes
ceil(0.8 V / 4096) batches (28 on Gemma 3's tokenizer: V = 139,533; SAEBench's list has 52 more entries, byte-fallback
tokens that duplicate a single letter's) of min(4096, 0.8 W) train words, since one or two passes over 0.8 W words per
epoch would leave it 50-100 steps, too few to move its weights past their initialisation. The LM probe's epochs are
passes over the 0.8 W train words (125 batches at W = 10,000, 1,745 in SAEBench's). A letter with no train word
gets pos_weight 1 (SAEBench's vocabulary has every letter, and would divide by zero); k-probes are fitted
only for letters in L and only up to the k where the split search stops (the figures use no other); A = 0 counts as
no absorption (SAEBench divides by it); SAEBench's standard deviations over letters are not reported.

Memory: W x (d + dict_size) floats for the words' activations and codes, and as many again at most for the true
positives' prompts (the embedded default, W = 10,000 at d 640 and dictionary 2,048: 108 MB, and 15 MB for its 1,413
true positives).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from csc.activations.probe_labels import LETTERS
from csc.activations.source import Activations
from csc.activations.spelling import FirstLetterPrompts, alpha_words, word_activations
from csc.config import TrainRunSpec
from csc.sae.model import SparseAutoencoder

TRAIN_FRACTION = 0.8
MIN_PROBE_F1 = 0.6
MAX_K = 10
F1_JUMP = 0.03
FULL_COS, FRACTION_COS, PROJECTION_SHARE, MAX_ABSORBERS = 0.025, 0.1, 0.4, 3
"""The calculator's thresholds (SAEBench's feature_absorption.py)."""
FIRED = 1e-8
"""A code below this did not fire (the calculator's EPS)."""

ABSORPTION_METRICS: list[tuple[str, str]] = [
    ("absorption_fraction", "absorption, mean absorption fraction"),
    ("absorption_full", "absorption, full-absorption rate"),
    ("absorption_split_features", "absorption, split latents per letter"),
    ("absorption_letters", "absorption, letters the LM probe finds (F1 > 0.6)")]
"""(key, label) of every figure absorption_scores may return, for csc eval's table (csc.pipeline.run.METRIC_ORDER)."""
SAE_FIGURES = frozenset(key for key, _ in ABSORPTION_METRICS) - {"absorption_letters"}
"""The figures left out when too few letters are probed (absorption_letters is always there)."""


@dataclass(frozen=True)
class AbsorptionSet:
    """The LM's part of absorption (module docstring), what a sweep's producer hands every trial."""

    words: torch.Tensor
    """[W] int64 token ids: the train words, then the test words."""
    letter: torch.Tensor
    """[W] int64 each word's first letter (index into LETTERS)."""
    n_train: int
    vocabulary: int
    """The tokenizer's words, of which `words` is a draw: SAEBench's probes train on 80% of all of them."""
    acts: torch.Tensor
    """[W, d] float32 raw activations at each word of its probe prompt."""
    probe_weight: torch.Tensor
    """[26, d] the LM probe's weights P."""
    probe_bias: torch.Tensor
    """[26] its biases q."""
    probe_f1: torch.Tensor
    """[26] its test F1 per letter."""
    letters: tuple[int, ...]
    """The letters with probe F1 > 0.6 (L), ascending."""
    prompt_word: torch.Tensor
    """[M] index into `words` of each true positive (TP) of a letter in L, read at its absorption prompt."""
    prompt_acts: torch.Tensor
    """[M, d] float32 raw activations at the word of its absorption prompt."""
    reason: str | None
    """Why the SAE figures cannot be measured (too few letters in L), or None."""


def absorption_set(spec: TrainRunSpec, acts: Activations) -> AbsorptionSet:
    """The LM's part of absorption for `spec` (module docstring); loads the LM."""
    e, lm = spec.eval, acts.lm
    ids, letters = alpha_words(lm.tokenizer)
    rng = random.Random(e.absorption_seed)
    chosen = rng.sample(range(len(ids)), min(e.absorption_words, len(ids)))
    words = [ids[i] for i in chosen]
    letter = torch.tensor([letters[i] for i in chosen], dtype=torch.int64)
    n_train = int(len(words) * TRAIN_FRACTION)
    prompts = FirstLetterPrompts(lm.tokenizer, lm.bos_token_id, dict(zip(ids, letters)))
    layer, batch = spec.activations.layer, spec.activations.lm_batch_size
    train, test = words[:n_train], words[n_train:]
    x = torch.cat([word_activations(lm, layer, prompts, side, side, rng, batch) for side in (train, test)])
    gen = torch.Generator().manual_seed(e.absorption_seed)
    weight, bias = train_probe(x[:n_train], letter[:n_train], gen, batch_size=64, steps=math.ceil(n_train / 64),
                               lr=1e-2, weight_decay=1e-4)
    hit = x[n_train:] @ weight.T + bias > 0  # [test words, 26]
    truth = letter[n_train:, None] == torch.arange(len(LETTERS))
    f1 = torch.tensor([f1_score(truth[:, c], hit[:, c]) for c in range(len(LETTERS))])
    trained = torch.isin(torch.arange(len(LETTERS)), letter[:n_train])  # a k-probe needs the letter's train words
    usable = tuple(c for c in range(len(LETTERS)) if f1[c] > MIN_PROBE_F1 and trained[c])
    reason = None
    if len(usable) < e.absorption_min_letters:
        reason = (f"the LM's first-letter probe reaches F1 > {MIN_PROBE_F1} on {len(usable)} letter(s) "
                  f"({''.join(LETTERS[c] for c in usable) or 'none'}) of {len(words)} words of the tokenizer at layer "
                  f"{layer}; eval.absorption_min_letters is {e.absorption_min_letters}: more words "
                  f"(eval.absorption_words) or a larger model may find more")
        usable_tp = torch.zeros(0, dtype=torch.int64)
    else:
        tp = hit.gather(1, letter[n_train:, None]).squeeze(1) & torch.isin(letter[n_train:], torch.tensor(usable))
        usable_tp = n_train + tp.nonzero().squeeze(1)
    prompt_acts = word_activations(lm, layer, prompts, [words[i] for i in usable_tp.tolist()], words, rng, batch)
    return AbsorptionSet(words=torch.tensor(words, dtype=torch.int64), letter=letter, n_train=n_train,
                         vocabulary=len(ids), acts=x, probe_weight=weight, probe_bias=bias, probe_f1=f1,
                         letters=usable, prompt_word=usable_tp, prompt_acts=prompt_acts, reason=reason)


@torch.no_grad()
def absorption_scores(sae: SparseAutoencoder, data: AbsorptionSet, scale: float, seed: int) -> dict[str, float]:
    """The module docstring's figures of `sae` (on activations scaled by `scale`); only absorption_letters, and the
    reason printed, when data.reason says they cannot be measured."""
    results = {"absorption_letters": float(len(data.letters))}
    if data.reason is not None:
        print(f"csc: feature absorption left out: {data.reason}", flush=True)
        return results
    sae = sae.cpu().eval()
    z = encode(sae, data.acts * scale)
    y, n = data.letter, data.n_train
    weight, _ = train_probe(z[:n], y[:n], torch.Generator().manual_seed(seed), batch_size=4096,
                            steps=epoch_steps(data.vocabulary, 4096), lr=1e-2, weight_decay=1e-6, l1=0.01)
    fractions, full, splits = [], [], []
    with threadpool_limits(limits=1):  # small fits: BLAS threads only wait on each other (csc.pipeline.probing)
        for c in data.letters:
            split = split_latents(z[:n], y[:n] == c, z[n:], y[n:] == c, weight[c])
            rows = y[data.prompt_word] == c
            frac, is_full = absorbed(sae, data.prompt_acts[rows] * scale, data.probe_weight[c], split)
            fractions.append(frac.mean().item())
            full.append(is_full.float().mean().item())
            splits.append(len(split))
    return {"absorption_fraction": sum(fractions) / len(fractions), "absorption_full": sum(full) / len(full),
            "absorption_split_features": sum(splits) / len(splits), **results}


def encode(sae: SparseAutoencoder, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([sae.encode(x[s:s + chunk]) for s in range(0, x.shape[0], chunk)])


def split_latents(z_fit: torch.Tensor, y_fit: torch.Tensor, z_test: torch.Tensor, y_test: torch.Tensor,
                  l1_weight: torch.Tensor) -> list[int]:
    """S_c (module docstring): the latents of the last k-probe whose test F1 beat the previous one's by > F1_JUMP.
    y_*: [n] bool, the letter's words; l1_weight: [dict_size] the letter's L1 probe."""
    best, split = -math.inf, []
    for k in range(1, min(MAX_K, l1_weight.numel()) + 1):
        latents = l1_weight.topk(k).indices  # the largest, not |.|: latents that predict the letter directly
        probe = LogisticRegression(max_iter=500, class_weight="balanced").fit(
            z_fit[:, latents].double().numpy(), y_fit.numpy())
        f1 = f1_score(y_test, torch.from_numpy(probe.decision_function(z_test[:, latents].double().numpy()) > 0))
        if f1 <= best + F1_JUMP:
            break
        best, split = f1, latents.tolist()
    return split


def absorbed(sae: SparseAutoencoder, x: torch.Tensor, probe: torch.Tensor, split: list[int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(frac_w [m], full_w [m] bool) of the module docstring for the m scaled activations `x` of one letter's true
    positives; probe: that letter's LM probe weights, split: its S_c."""
    p = probe / probe.norm()
    cos = sae.W_dec @ p / sae.W_dec.norm(dim=-1)
    z = encode(sae, x)
    a = z * cos  # [m, dict]
    A = sae.normalise(x)[0] @ p
    main = a[:, split].sum(dim=1)
    others = torch.ones_like(cos, dtype=torch.bool)
    others[split] = False
    candidates = torch.where(others & (cos >= FRACTION_COS) & (a > 0), a, 0.0)
    T = candidates.topk(min(MAX_ABSORBERS, candidates.shape[1]), dim=1).values.sum(dim=1)
    positive = A > 0
    share = torch.where(positive, T / A.where(positive, 1.0), 0.0)
    absorbing = torch.minimum(T, A - main)
    frac = torch.where(main <= 0, 1.0, (absorbing / (absorbing + main)).clamp(0.0, 1.0))
    frac = torch.where(~positive | (main >= A) | (share < PROJECTION_SHARE), 0.0, frac)
    top = a.argmax(dim=1)
    top_share = torch.where(positive, a.gather(1, top[:, None]).squeeze(1) / A.where(positive, 1.0), 0.0)
    full = ((z[:, split] < FIRED).all(dim=1) & (cos[top] >= FULL_COS) & positive & (top_share >= PROJECTION_SHARE))
    return frac, full


def epoch_steps(vocabulary: int, batch_size: int) -> int:
    """Batches per epoch of a probe: SAEBench's over the train part of the tokenizer's `vocabulary` words."""
    return math.ceil(TRAIN_FRACTION * vocabulary / batch_size)


def train_probe(x: torch.Tensor, label: torch.Tensor, gen: torch.Generator, *, batch_size: int, steps: int, lr: float,
                weight_decay: float, l1: float = 0.0, epochs: int = 50, end_lr: float = 1e-5
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [26, dim], biases [26]) of SAEBench's train_multi_probe: 26 one-vs-rest logistic probes, BCE with
    pos_weight = #negatives / #positives (1 for a letter without examples), plus l1 * mean_c ||w_c||_1; Adam,
    learning rate decaying exponentially from lr to end_lr over the epochs; torch.nn.Linear's initialisation. An
    epoch is `steps` batches of min(batch_size, n) rows from passes over x in random orders. Drawn from `gen`."""
    n, dim = x.shape
    size = min(batch_size, n)
    y = torch.nn.functional.one_hot(label, len(LETTERS)).float()
    pos = y.sum(dim=0)
    pos_weight = torch.where(pos > 0, (n - pos) / pos.clamp(min=1), 1.0)
    bound = 1 / math.sqrt(dim)
    w = ((torch.rand(len(LETTERS), dim, generator=gen) * 2 - 1) * bound).requires_grad_()
    b = ((torch.rand(len(LETTERS), generator=gen) * 2 - 1) * bound).requires_grad_()
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(steps * size / n))])
            for rows in order[:steps * size].split(size):
                opt.zero_grad()
                loss = loss_fn(x[rows] @ w.T + b, y[rows]) + l1 * w.abs().sum(dim=-1).mean()
                loss.backward()
                opt.step()
            decay.step()
    return w.detach(), b.detach()


def f1_score(truth: torch.Tensor, pred: torch.Tensor) -> float:
    """Binary F1 of bool tensors; 0 when neither has a positive (sklearn's zero_division)."""
    tp = (truth & pred).sum().item()
    denom = truth.sum().item() + pred.sum().item()
    return 2 * tp / denom if denom else 0.0
