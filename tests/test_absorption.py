"""Feature absorption (csc.pipeline.absorption, SAEBench's first-letter eval): the calculator's figures by hand on
an SAE whose latents are set, the k-sparse probes' split detection on planted latents, the prompts and their
cached-prefix activations, and the figures reaching `csc train`'s results (real ones on the embedded model)."""

import math

import pytest
import torch
import yaml

from csc.activations.capture import run_after_prefixes, run_to_layer
from csc.activations.models import build_tiny_gemma2, byte_tokenizer
from csc.activations.probe_labels import LETTERS
from csc.activations.spelling import ICL_EXAMPLES, TEMPLATE_TAIL, FirstLetterPrompts, alpha_words
from csc.config import CorpusSpec, EvalSpec, ModelSpec, TrainRunSpec
from csc.spec_loader import load_spec
from csc.pipeline.absorption import (AbsorptionSet, absorbed, absorption_scores, absorption_set, split_latents,
                                     train_probe)
from csc.sae.archs import build_sae
from csc.sweep.reported import HELD_OUT, held_out
from csc.sweep.spec import SweepSpec
from tests.conftest import sae_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A, B = LETTERS.index("a"), LETTERS.index("b")
D = 8
# Latents 0..3 read coordinates 0..3 (z_j = relu(x_j)); their decoder rows point at coordinate 7 (letter a's probe
# direction) with cosines 1, 0.6 and 0.05, and at coordinate 4 (letter b's) for latent 3.
COS_A = (1.0, 0.6, 0.05, 0.0)


def planted_sae():
    sae = build_sae(sae_config("relu", D, 4, layer_norm=False))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:4, :4] = torch.eye(4)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.zero_()
        for j, (c, rest) in enumerate(zip(COS_A[:3], (6, 6, 5))):
            sae.W_dec[j, 7] = c
            sae.W_dec[j, rest] = math.sqrt(1 - c * c)  # the rest of the unit row, away from both probes
        sae.W_dec[3, 4] = 1.0
    return sae


def word(codes: tuple[float, float, float, float], a_proj: float = 0.0, b_proj: float = 0.0) -> torch.Tensor:
    """An activation with these codes and these projections on letter a's and b's probe directions."""
    x = torch.zeros(D)
    x[:4] = torch.tensor(codes)
    x[7], x[4] = a_proj, b_proj
    return x


# Letter a's true positives, with the main latent 0 (S_a = [0]), by hand (module docstring of absorption.py):
#   codes           A     a_j = z_j cos_j     M    T     frac                     full
#   (0, 2, 0, 0)    1.5   (0, 1.2, 0, 0)      0    1.2   1 (T/A 0.8, M <= 0)      yes: top 1, cos .6, 1.2/1.5 >= .4
#   (1, 1, 0, 0)    2.0   (1, .6, 0, 0)       1    .6    0 (T/A 0.3 < 0.4)        no: the main latent fired
#   (.5, 2, 0, 0)   2.0   (.5, 1.2, 0, 0)     .5   1.2   1.2 / (1.2 + .5)         no
#   (0, 0, 10, 0)   1.0   (0, 0, .5, 0)       0    0     0 (cos .05 < .1: no absorber)  yes: cos .05 >= .025, .5/1 >= .4
#   (3, 0, 0, 0)    3.0   (3, 0, 0, 0)        3    0     0 (M >= A)               no
ABSORBED_A = [word((0, 2, 0, 0), 1.5), word((1, 1, 0, 0), 2.0), word((0.5, 2, 0, 0), 2.0), word((0, 0, 10, 0), 1.0),
              word((3, 0, 0, 0), 3.0)]
FRAC_A = [1.0, 0.0, 1.2 / 1.7, 0.0, 0.0]
FULL_A = [True, False, False, True, False]


def probe_weights() -> torch.Tensor:
    w = torch.zeros(len(LETTERS), D)
    w[A, 7], w[B, 4] = 5.0, 3.0  # only directions count
    return w


def test_the_calculator_by_hand():
    frac, full = absorbed(planted_sae(), torch.stack(ABSORBED_A), probe_weights()[A], [0])
    assert frac.tolist() == pytest.approx(FRAC_A)
    assert full.tolist() == FULL_A
    # A main latent that carries all of the probe's projection absorbs nothing
    frac, full = absorbed(planted_sae(), torch.stack([word((a, 0, 0, 0), a) for a in (0.5, 1.0, 4.0)]),
                          probe_weights()[A], [0])
    assert frac.tolist() == [0.0, 0.0, 0.0] and not full.any()


def planted_set(prompts: list[torch.Tensor], prompt_letters: list[int], n_words: int = 200) -> AbsorptionSet:
    """Words of letters a and b whose activations fire their main latent (0 for a, 3 for b)."""
    gen = torch.Generator().manual_seed(0)
    letter = torch.tensor([A, B] * (n_words // 2))
    acts = torch.stack([word((1, 0, 0, 0), 1.0) if c == A else word((0, 0, 0, 1), b_proj=1.0) for c in letter.tolist()])
    acts += 0.01 * torch.randn(acts.shape, generator=gen).abs()
    n_train = int(0.8 * n_words)
    test = torch.arange(n_train, n_words)
    tp = torch.cat([test[letter[test] == c][:sum(1 for p in prompt_letters if p == c)] for c in (A, B)])
    return AbsorptionSet(words=torch.arange(n_words), letter=letter, n_train=n_train, vocabulary=20_000, acts=acts,
                         probe_weight=probe_weights(), probe_bias=torch.zeros(len(LETTERS)),
                         probe_f1=torch.zeros(len(LETTERS)), letters=(A, B), prompt_word=tp,
                         prompt_acts=torch.stack(prompts), reason=None)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_absorption_scores_by_hand_and_in_the_saes_units(scale):
    """The k-sparse probes find latent 0 for a and 3 for b; a's true positives absorb as computed by hand, b's not.
    Codes and projections are both taken on the SAE's (scaled) input: at another normalisation scale the codes and
    the probe's projection scale alike (unit decoder rows) and the figures stay."""
    b_words = [word((0, 0, 0, 2), b_proj=2.0), word((0, 0, 0, 1), b_proj=1.0)]
    data = planted_set([*ABSORBED_A, *b_words], [A] * 5 + [B] * 2)
    got = absorption_scores(planted_sae(), data, scale, seed=0)
    assert got["absorption_letters"] == 2 and got["absorption_split_features"] == 1
    assert got["absorption_fraction"] == pytest.approx((sum(FRAC_A) / 5 + 0) / 2)
    assert got["absorption_full"] == pytest.approx((2 / 5 + 0) / 2)


def test_no_absorption_gives_zero():
    prompts = [word((a, 0, 0, 0), a) for a in (0.5, 1.0, 2.0)] + [word((0, 0, 0, 1), b_proj=1.0)]
    got = absorption_scores(planted_sae(), planted_set(prompts, [A, A, A, B]), 1.0, seed=0)
    assert got["absorption_fraction"] == 0.0 and got["absorption_full"] == 0.0


def test_too_few_letters_leave_the_figures_out_with_the_reason(capsys):
    data = planted_set([word((1, 0, 0, 0), 1.0)], [A])
    data = AbsorptionSet(**{**data.__dict__, "letters": (A,), "reason": "1 letter"})
    assert absorption_scores(planted_sae(), data, 1.0, seed=0) == {"absorption_letters": 1.0}
    assert "feature absorption left out: 1 letter" in capsys.readouterr().out


def test_the_split_search_takes_k_while_f1_jumps():
    """Letter a's words fire latent 0 or latent 1 (a feature split in two); latent 2 is noise. k = 1 finds half of
    them (F1 2/3), k = 2 all (F1 1), k = 3 adds nothing: S = the top-2 latents of the L1 probe."""
    gen = torch.Generator().manual_seed(0)
    n = 400
    y = torch.arange(n) % 4 == 0  # a quarter of the words are a's
    z = torch.zeros(n, 5)
    z[y & (torch.arange(n) % 8 == 0), 0] = 1.0
    z[y & (torch.arange(n) % 8 == 4), 1] = 1.0
    z[:, 2] = torch.rand(n, generator=gen)
    z[~y, 3] = 1.0
    fit, test = slice(0, 320), slice(320, n)
    assert split_latents(z[fit], y[fit], z[test], y[test], torch.tensor([3.0, 2.0, 1.0, -1.0, 0.0])) == [0, 1]
    # one latent for the whole letter: no split
    z[y, 0] = 1.0
    assert split_latents(z[fit], y[fit], z[test], y[test], torch.tensor([3.0, 2.0, 1.0, -1.0, 0.0])) == [0]


def test_the_l1_probe_ranks_the_planted_latent_first():
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (600,), generator=gen)
    z = torch.rand(600, 32, generator=gen) * 0.1
    z[torch.arange(600), 10 + label] += 1.0  # letter c fires latent 10 + c
    w, _ = train_probe(z, label, torch.Generator().manual_seed(1), batch_size=4096, steps=5, lr=1e-2,
                       weight_decay=1e-6, l1=0.01)
    assert w[:3].argmax(dim=1).tolist() == [10, 11, 12]


def test_words_and_prompts_follow_saebench():
    tok = byte_tokenizer()
    ids, letters = alpha_words(tok)
    assert sorted(tok.convert_ids_to_tokens(ids)) == sorted(LETTERS + LETTERS.upper())
    assert all(LETTERS[c] == tok.convert_ids_to_tokens(i).lower() for i, c in zip(ids, letters))
    prompts = FirstLetterPrompts(tok, 2, dict(zip(ids, letters)))
    cat, dog = (tok.convert_tokens_to_ids(t) for t in "cD")
    ids = prompts.prefix([cat, dog]) + [tok.convert_tokens_to_ids("e")] + tok.encode(TEMPLATE_TAIL)
    text = "\nc has the first letter: C\nD has the first letter: D\ne has the first letter:"
    assert ids == [2, *tok.encode(text)]  # SAEBench's prompt, BOS first
    assert ICL_EXAMPLES == 10


def test_activations_after_a_shared_prefix_equal_whole_prompts():
    model, _ = build_tiny_gemma2(ModelSpec(name="tiny-gemma2"))
    gen = torch.Generator().manual_seed(0)
    prefixes, tokens = torch.randint(4, 260, (3, 20), generator=gen), torch.randint(4, 260, (3, 5), generator=gen)
    got = run_after_prefixes(model, prefixes, tokens, layer=2)
    whole = torch.cat([prefixes.repeat_interleave(5, dim=0), tokens.reshape(-1, 1)], dim=1)
    want = run_to_layer(model, whole, 2).resid[:, -1].reshape(3, 5, -1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


TINY = ["model.name=tiny-gemma2", "activations.layer=2", "activations.context_length=32",
        "activations.contexts_per_shard=8", "activations.train_tokens=512", "activations.eval_tokens=256",
        "activations.lm_batch_size=4", "sae.dict_size=64", "trainer.steps=1"]


def test_the_tiny_model_cannot_support_absorption_and_says_why(cache, capsys):
    """52 one-letter words and a random LM: no letter reaches F1 0.6, so only absorption_letters is reported, with
    the reason printed (test_train_run checks that `csc train` reports the same)."""
    from csc.activations.source import Activations

    spec = load_spec(TrainRunSpec, None, [*TINY, f"activations.cache_dir={cache}"])
    acts = Activations(spec)
    data = absorption_set(spec, acts)
    assert len(data.words) == 52 == data.vocabulary and data.n_train == 41 and data.acts.shape == (52, 64)
    assert data.reason is not None and len(data.letters) < 20 and len(data.prompt_word) == 0
    sae = build_sae(spec.sae.model_copy(update={"d_in": 64}))
    assert absorption_scores(sae, data, acts.scale, 0) == {"absorption_letters": len(data.letters)}
    printed = capsys.readouterr().out
    assert "csc: feature absorption left out: the LM's first-letter probe reaches F1 > 0.6 on" in printed


def test_the_producer_makes_the_lm_part_once(cache):
    from csc.sweep.producer import ActivationProducer

    spec = load_spec(TrainRunSpec, None, [*TINY, f"activations.cache_dir={cache}"])
    p = ActivationProducer(spec.model_dump_json(), 64, 0)
    data = p.absorption()
    assert p.absorption() is data and len(data.words) == 52


def test_absorption_figures_are_objectives_only_where_measured(tmp_path):
    keys = {f"eval/absorption_{k}" for k in ("fraction", "full", "split_features", "letters")}
    assert keys <= set(HELD_OUT) and keys <= held_out(CorpusSpec())
    assert keys.isdisjoint(held_out(CorpusSpec(), EvalSpec(absorption=False)))
    data = {"model": {"name": "tiny-gemma2"}, "sae": {"dict_size": 64}, "trainer": {"steps": 200},
            # absorption has no rung figure: the rungs rank on one the spec names
            "sweep": {"objectives": [{"metric": "eval/absorption_fraction", "mode": "min"}],
                      "scheduler": {"figures": [{"metric": "heldout/normalized_mse"}]}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_spec(SweepSpec, path).sweep.objectives[0].metric == "eval/absorption_fraction"
    with pytest.raises(Exception, match="'eval/absorption_fraction' is a figure of feature absorption, which "
                                        "eval.absorption false turns off"):
        load_spec(SweepSpec, path, ["eval.absorption=false"])


@pytest.mark.slow
def test_real_figures_on_the_embedded_model(embedded_cache):
    """Gemma 3 270M, layer 12: its letter probe finds letters (4 of 26 at 2,000 words, measured), and a random
    SAE's figures are real numbers."""
    from csc.activations.source import Activations

    spec = load_spec(TrainRunSpec, None, [f"activations.cache_dir={embedded_cache}", "sae.dict_size=512",
                                          "trainer.steps=1", "eval.absorption_words=2000",
                                          "eval.absorption_min_letters=2"])
    data = absorption_set(spec, Activations(spec))  # the LM only: no activation shard
    assert len(data.words) == 2000 and data.reason is None and len(data.letters) >= 2
    sae = build_sae(spec.sae.model_copy(update={"d_in": 640}))
    assert sae.cfg.layer_norm  # its codes and projections ignore the normalisation scale: 1 stands for any
    got = absorption_scores(sae, data, 1.0, spec.eval.absorption_seed)
    assert 0 <= got["absorption_fraction"] <= 1 and 0 <= got["absorption_full"] <= 1
    assert 1 <= got["absorption_split_features"] <= 10 and got["absorption_letters"] == len(data.letters)
