"""Sparse probing: known answers on synthetic codes, the probing set's split by context, the floor and ceiling
wiring, and a whole `csc train` / `csc eval` on the tiny model with a labelled JSONL corpus."""

import json

import pytest
import torch

from csc.activations.contexts import ContextStream
from csc.activations.models import byte_tokenizer
from csc.activations.probe_labels import LETTER, SEQ, letter_classes
from csc.activations.source import Activations
from csc.cli import main
from csc.config import CorpusSpec, TrainRunSpec
from csc.spec_loader import load_spec
from csc.errors import CscError, InputError, SpecError
from csc.pipeline.probing import (K_VALUES, PROBING_METRICS, balanced, held_out_labels, one_vs_rest,
                                  pooled_features, probing_scores, probing_tokens, random_floor)
from csc.pipeline.run import train_run
from csc.sae.archs import build_sae
from csc.sae.config import parse_sae_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["model.name=tiny-gemma2", "activations.layer=2", "activations.context_length=32",
        "activations.contexts_per_shard=8", "activations.train_tokens=1024", "activations.eval_tokens=256",
        "sae.dict_size=64", "trainer.steps=20", "trainer.batch_size=64", "trainer.lr_warmup_steps=5",
        "trainer.beta_warmup_steps=5", "trainer.gamma_warmup_steps=5", "trainer.log_every=5",
        "eval.ce_contexts=2", "eval.probe_examples_per_class=8", "eval.probe_test_fraction=0.25",
        "eval.probe_min_tokens=8"]
FOX = "the quick brown fox jumps over the lazy dog near the river bank. "
LOREM = "LOREM IPSUM DOLOR SIT AMET, CONSECTETUR ADIPISCING ELIT; SED DO EIUSMOD. "


def labelled_corpus(tmp_path):
    """Held-out documents (every 10th) alternate between two classes whose texts differ in every byte."""
    rows = [{"text": f"{i}: " + (FOX if (i // 10) % 2 else LOREM) * 2, "kind": "fox" if (i // 10) % 2 else "lorem"}
            for i in range(400)]
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec(cache, *extra) -> TrainRunSpec:
    return load_spec(TrainRunSpec, None, [*TINY, f"activations.cache_dir={cache}", *extra])


def synthetic(n_classes=4, fit=60, test=20, dims=50, seed=0):
    """Codes of examples in n_classes classes: latent c of 'planted' is 1 exactly on class c, the rest is noise."""
    gen = torch.Generator().manual_seed(seed)
    label = torch.arange(n_classes).repeat_interleave(fit + test)
    test_mask = torch.zeros(fit + test, dtype=torch.bool)
    test_mask[fit:] = True
    test_mask = test_mask.repeat(n_classes)
    noise = torch.rand(len(label), dims, generator=gen)
    planted = noise.clone()
    planted[:, :n_classes] = torch.nn.functional.one_hot(label, n_classes).float()
    return {"planted": planted, "noise": noise}, label, test_mask


def test_a_planted_latent_is_found_at_k_1_and_noise_stays_at_chance():
    features, label, test = synthetic()
    scores = one_vs_rest({"sae": features["planted"], "random": features["noise"], "llm": features["noise"]},
                         label, test, n_classes=4, seed=0)
    assert set(scores) == {*(f"sae_top_{k}" for k in K_VALUES), *(f"random_top_{k}" for k in K_VALUES), "llm"}
    assert all(scores[f"sae_top_{k}"] == 1.0 for k in K_VALUES)
    for key in ("random_top_1", "random_top_5", "llm"):
        assert 0.3 < scores[key] < 0.7, (key, scores[key])


def test_the_negatives_are_balanced_and_drawn_from_every_other_class():
    _, label, test = synthetic(n_classes=4, fit=30, test=9)
    gen = torch.Generator().manual_seed(1)
    idx, y = balanced(label, ~test, 2, 4, gen)
    assert int(y.sum()) == 30 and len(y) == 60 and len(set(idx.tolist())) == 60
    assert (label[idx[y == 1]] == 2).all()
    neg = label[idx[y == 0]]
    assert (neg != 2).all() and sorted(neg.unique().tolist()) == [0, 1, 3]
    assert not test[idx].any(), "probe-fit examples only"
    idx, y = balanced(label, test, 2, 4, gen)
    assert test[idx].all() and int(y.sum()) == 9 and len(y) == 18  # ceil(9 / 3) = 3 per other class


def test_every_token_is_traced_to_its_document():
    tok = byte_tokenizer()
    docs = ["short", "a somewhat longer document that spans contexts", "x", "the last one is here"]
    stream = ContextStream(iter(docs), tok, bos_id=2, context_length=9, what="test")
    n = stream.available(100)
    tokens, owner = stream.get(0, n), stream.documents_of(0, n)
    assert (owner[:, 0] == -1).all(), "BOS belongs to no document"
    assert set(tokens[:, 1:][owner[:, 1:] == -1].tolist()) == {tok.eos_token_id}, "nor do the EOS joiners"
    for k, doc in enumerate(docs):
        ids = tokens[owner == k].tolist()
        assert ids == tok(doc, add_special_tokens=False)["input_ids"][:len(ids)] and ids, k


def test_the_probing_set_splits_by_context_and_pools_one_document_per_example(cache, tmp_path):
    s = spec(cache, f"corpus.source={labelled_corpus(tmp_path)}", "corpus.label_field=kind")
    acts = Activations(s)
    labels = held_out_labels(s, acts)
    assert [t.name for t in labels.tasks] == [SEQ, LETTER]
    seq, letter = labels.tasks
    assert seq.classes == ("fox", "lorem")
    every = 4  # eval.probe_test_fraction 0.25
    test_ctx = labels.seq_id % every == every - 1
    for task in labels.tasks:
        # 8 examples per class: 2 probe-test, 6 probe-fit
        for c in range(len(task.classes)):
            assert int((task.label == c).sum()) == 8 and int(((task.label == c) & task.test).sum()) == 2
        ctx_of = torch.full((len(task.label),), -1)
        for r in range(len(labels.seq_id)):
            for e in task.example[r][task.example[r] >= 0].unique().tolist():
                assert ctx_of[e] == -1, "an example lies in one context"
                ctx_of[e] = r
        assert (ctx_of >= 0).all()
        assert torch.equal(task.test, test_ctx[ctx_of]), "an example is on its context's side"
    fit_ctx = {int(labels.seq_id[r]) for r in range(len(labels.seq_id))
               for task in labels.tasks if (task.example[r] >= 0).any() and not test_ctx[r]}
    test_ctx_ids = {int(labels.seq_id[r]) for r in range(len(labels.seq_id))
                    for task in labels.tasks if (task.example[r] >= 0).any() and test_ctx[r]}
    assert fit_ctx and test_ctx_ids and not fit_ctx & test_ctx_ids
    # A seq example pools the bytes of one document: all LOREM capitals or all FOX lower case (and digits).
    kind = {"fox": set(FOX), "lorem": set(LOREM)}
    tok = acts.tokenizer
    for e in range(len(seq.label)):
        text = tok.decode(labels.tokens[seq.example == e])
        assert len(labels.tokens[seq.example == e]) >= 8
        assert set(text) - set("0123456789: ") <= kind[seq.classes[seq.label[e]]], text
    # A letter example is one token whose text is its class's letter, in either case.
    for e in range(len(letter.label)):
        (t,) = labels.tokens[letter.example == e].tolist()
        assert tok.decode([t]).lower() == letter.classes[letter.label[e]]
    assert torch.equal(letter_classes(tok, torch.tensor([tok.convert_tokens_to_ids("Q")])), torch.tensor([16]))
    # The labels were made for exactly the tokens the shards hold.
    for i in labels.shards(8):
        rows = labels.seq_id // 8 == i
        assert torch.equal(acts.shard("eval", i).tokens[labels.seq_id[rows] - 8 * i], labels.tokens[rows])


def test_floor_is_the_seeded_random_sae_at_the_trained_l0_and_ceiling_reads_raw_activations(cache, tmp_path):
    s = spec(cache, f"corpus.source={labelled_corpus(tmp_path)}", "corpus.label_field=kind")
    acts = Activations(s)
    labels = held_out_labels(s, acts)
    cfg = parse_sae_config({"architecture": "relu", "d_in": 64, "dict_size": 64})
    trained_like = build_sae(cfg, seed=7)
    first = next(iter(labels.shards(8)))
    x = acts.shard("eval", first).acts.flatten(0, 1).float()
    trained_like.init_from_data(x * acts.scale, 6.0)  # sparser than the tied init's half of the dictionary
    _, first_tokens = next(probing_tokens(acts, labels))
    sample = first_tokens[:4096] * acts.scale  # as probing_scores starts its floor (chunk_tokens 4096)
    floor = random_floor(trained_like, sample, s.eval.probe_seed)
    a, b = probing_scores(s, trained_like, acts, labels), probing_scores(s, floor, acts, labels)
    assert set(a) == {key for key, _ in PROBING_METRICS}
    for task in (SEQ, LETTER):
        for k in K_VALUES:
            assert a[f"probe_{task}_random_top_{k}"] == b[f"probe_{task}_sae_top_{k}"]
        assert a[f"probe_{task}_llm"] == b[f"probe_{task}_llm"], "the ceiling does not depend on the SAE"
    # Pooling, against a direct mean over each example's tokens (codes on scaled, ceiling on raw activations).
    pooled = pooled_features(trained_like, floor, acts, labels, chunk_tokens=50)
    x = torch.cat([acts.shard("eval", i).acts for i in labels.shards(8)]).float()
    for task, feats in zip(labels.tasks, pooled):
        for e in (0, len(task.label) - 1):
            raw = x[task.example == e]
            torch.testing.assert_close(feats["llm"][e], raw.mean(dim=0))
            torch.testing.assert_close(feats["sae"][e], trained_like.encode(raw * acts.scale).mean(dim=0))
    # Distinct texts are separable from the raw activations (ceiling), even through a random model.
    assert a["probe_seq_llm"] == 1.0


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk", "topk"])
def test_the_floor_fires_as_often_as_the_sae_it_is_the_floor_of(arch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=gen) @ torch.randn(32, 32, generator=gen)
    extra = {"k": 8} if arch in ("topk", "batchtopk") else {}
    sae = build_sae(parse_sae_config({"architecture": arch, "d_in": 32, "dict_size": 128, **extra}), seed=1)
    sae.init_from_data(x, 10.0)
    sae.eval()
    l0 = (sae.encode(x) > 0).sum(dim=-1).float().mean().item()
    floor = random_floor(sae, x, seed=2)
    floor_l0 = (floor.encode(x) > 0).sum(dim=-1).float().mean().item()
    assert abs(floor_l0 - l0) <= 0.02 * l0, (arch, l0, floor_l0)
    assert not torch.equal(floor.W_enc, sae.W_enc), "the floor is a different random SAE"
    untouched = build_sae(sae.cfg, seed=2).eval()
    assert (untouched.encode(x) > 0).sum(dim=-1).float().mean().item() > 3 * l0 or arch == "topk", \
        "without matching, the random SAE would be much denser"


def test_train_and_eval_report_probing_on_a_labelled_jsonl_corpus(cache, tmp_path, capsys):
    out = tmp_path / "run"
    results = train_run(spec(cache, f"corpus.source={labelled_corpus(tmp_path)}", "corpus.label_field=kind"), out,
                        progress=False)
    saved = json.loads((out / "eval.json").read_text())
    for key, _ in PROBING_METRICS:
        assert 0.0 <= saved[key] <= (1.0 if not key.endswith("_classes") else 26), key
    assert saved["probe_seq_classes"] == 2 and saved == results
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    for key in ("probe_seq_sae_top_1", "probe_letter_llm", "probe_letter_random_top_20"):
        assert f"{results[key]:.6g}" in printed, key


def test_an_unlabelled_corpus_has_only_the_token_task(cache, tmp_path):
    s = spec(cache, f"corpus.source={labelled_corpus(tmp_path)}")
    assert [t.name for t in held_out_labels(s, Activations(s)).tasks] == [LETTER]


def test_label_field_errors_name_the_field(cache, tmp_path):
    corpus = labelled_corpus(tmp_path)
    s = spec(cache, f"corpus.source={corpus}", "corpus.label_field=genre")
    with pytest.raises(InputError, match=r"corpus.label_field 'genre' is not a column of .*labelled.jsonl.*kind"):
        train_run(s, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists(), "refused before training"
    with pytest.raises(SpecError, match=r"corpus.label_field: the embedded corpus has no label columns"):
        spec(cache, "corpus.label_field=kind")
    with pytest.raises(SpecError, match=r"corpus.label_field: 'text' is the text column"):
        spec(cache, f"corpus.source={corpus}", "corpus.label_field=text")
    book = tmp_path / "book.txt"
    book.write_text("Some text.\n\nMore text.")
    with pytest.raises(SpecError, match=r"corpus.label_field: a .txt corpus .* has no columns"):
        spec(cache, f"corpus.source={book}", "corpus.label_field=kind")
    assert CorpusSpec().label_field is None


def test_too_few_classes_is_an_error_naming_the_field(cache, tmp_path):
    s = spec(cache, f"corpus.source={labelled_corpus(tmp_path)}", "corpus.label_field=kind",
             "eval.probe_examples_per_class=500")
    with pytest.raises(CscError, match=r"task 'seq' \(corpus.label_field\): 0 class.*eval.probe_examples_per_class"):
        held_out_labels(s, Activations(s))
