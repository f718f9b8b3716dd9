"""The activation pipeline on a tiny random Gemma2: hook, partners, early stop, cache, batches; and attention
(sdpa with eager probabilities at the hooked layer) on a tiny random Gemma 3 and the embedded one."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from csc.activations.cache import ShardCache
from csc.activations.capture import SDPA_EAGER_PROBS, decoder_layers, run_to_layer, use_attention
from csc.activations.pairing import attended_partners
from csc.activations.corpus import documents
from csc.activations.models import (ModelFacts, attention_for, build_tiny_gemma2, check_model_spec,
                                    load_language_model)
from csc.activations.source import Activations
from csc.config import ActivationsRunSpec, CorpusSpec, ModelSpec
from csc.spec_loader import load_spec
from csc.errors import InputError
from tests.conftest import tiny_spec


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny_gemma2(ModelSpec(name="tiny-gemma2"))
    return model.eval(), tok


def _ids(batch=3, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (batch, T), generator=g)
    ids[:, 0] = 2
    return ids


def test_hook_captures_exactly_resid_post(tiny):
    model, _ = tiny
    ids = _ids()
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    n = len(decoder_layers(model))
    for layer in range(n - 1):
        assert torch.equal(run_to_layer(model, ids, layer).resid, out.hidden_states[layer + 1]), layer
    # transformers applies the final norm to the last entry of hidden_states; our hook is before it.
    last = run_to_layer(model, ids, n - 1).resid
    assert torch.equal(model.model.norm(last), out.hidden_states[n])


def test_forward_stops_at_hooked_layer(tiny):
    model, _ = tiny
    layers = decoder_layers(model)
    calls = {i: 0 for i in range(len(layers))}
    calls["norm"] = 0
    handles = [layers[i].register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i in range(len(layers))]
    handles.append(model.model.norm.register_forward_hook(lambda *_: calls.__setitem__("norm", calls["norm"] + 1)))
    try:
        run_to_layer(model, _ids(), 1)
    finally:
        for h in handles:
            h.remove()
    assert calls == {0: 1, 1: 1, 2: 0, 3: 0, "norm": 0}


def test_partners_equal_attention_argmax_never_self_or_bos(tiny):
    model, _ = tiny
    ids = _ids(batch=4, T=40, seed=1)
    layer = 2
    with torch.no_grad():
        ref_attn = model(input_ids=ids, output_attentions=True).attentions[layer].mean(dim=1)
    cap = run_to_layer(model, ids, layer)
    torch.testing.assert_close(cap.attn, ref_attn.float())
    partner = attended_partners(cap.attn)
    for b in range(ids.shape[0]):
        assert partner[b, 0] == -1 and partner[b, 1] == -1
        for t in range(2, ids.shape[1]):
            cands = list(range(1, t))
            best = max(cands, key=lambda j: (ref_attn[b, t, j].item(), -j))
            assert partner[b, t].item() == best, (b, t)
            assert 1 <= partner[b, t] < t


# ---------------------------------------------------------------- attention: sdpa, eager probabilities at layer L

def tiny_gemma3(attention: str):
    """A random Gemma 3 (no attention soft-cap) of 4 layers, sliding and full; its window of 8 tokens is shorter
    than the test contexts, so the sliding layers' masks are materialised (not left to sdpa's is_causal)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           sliding_window=8, attn_implementation="eager", pad_token_id=0, eos_token_id=1,
                           bos_token_id=2, layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    use_attention(model, attention)
    return model


def _eager_calls(monkeypatch, model) -> list[int]:
    """Records the layer of every call of the model's eager attention function."""
    module = sys.modules[type(decoder_layers(model)[0].self_attn).__module__]
    eager, calls = module.eager_attention_forward, []

    def counted(mod, *args, **kwargs):
        calls.append(mod.layer_idx)
        return eager(mod, *args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", counted)
    return calls


def test_sdpa_with_eager_probabilities_matches_all_eager_on_gemma3(monkeypatch):
    fast, eager = tiny_gemma3(SDPA_EAGER_PROBS), tiny_gemma3("eager")
    assert fast.config._attn_implementation == SDPA_EAGER_PROBS and eager.config._attn_implementation == "eager"
    ids = _ids(batch=3, T=24)
    with torch.no_grad():
        sdpa_states = fast(input_ids=ids, output_hidden_states=True).hidden_states
    calls = _eager_calls(monkeypatch, fast)
    for layer in range(4):
        got = run_to_layer(fast, ids, layer)
        assert calls == [layer], "eager attention runs in the hooked layer only"
        want = run_to_layer(eager, ids, layer)
        assert calls == [layer, *range(layer + 1)]
        calls.clear()
        torch.testing.assert_close(got.attn, want.attn, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.resid, want.resid, atol=1e-5, rtol=1e-6)
        if layer < 3:  # the last entry of hidden_states has the final norm applied
            assert torch.equal(got.resid, sdpa_states[layer + 1]), "resid_post is the sdpa forward's, bit for bit"
    with torch.no_grad():
        fast(input_ids=ids)
    assert calls == [], "a forward that reads no probabilities is plain sdpa"


def test_a_soft_capped_model_or_one_without_sdpa_keeps_eager_in_every_layer():
    assert attention_for(attn_softcap=50.0, supports_sdpa=True) == "eager"  # sdpa cannot apply a soft-cap
    assert attention_for(attn_softcap=None, supports_sdpa=False) == "eager"
    assert attention_for(attn_softcap=None, supports_sdpa=True) == SDPA_EAGER_PROBS
    assert check_model_spec(ModelSpec(name="tiny-gemma2")).attention == "eager"  # Gemma 2: soft-cap 50, no sdpa
    assert load_language_model(ModelSpec(name="tiny-gemma2"), Path()).model.config._attn_implementation == "eager"
    assert ModelFacts.of(tiny_gemma3("eager").config).attention == SDPA_EAGER_PROBS
    assert check_model_spec(ModelSpec()).attention == SDPA_EAGER_PROBS  # the embedded Gemma 3: no soft-cap


def test_the_attention_implementation_is_part_of_the_cache_key(cache):
    acts = Activations(tiny_spec(cache))
    fields = acts.caches["train"].fields
    assert fields["attention"] == "eager"
    assert ShardCache(cache, {**fields, "attention": SDPA_EAGER_PROBS}).key != acts.caches["train"].key
    embedded = Activations(load_spec(ActivationsRunSpec, None, [f"activations.cache_dir={cache}"]))
    assert embedded.caches["train"].fields["attention"] == SDPA_EAGER_PROBS and embedded._lm is None


@pytest.mark.slow
def test_embedded_gemma3_sdpa_with_eager_probabilities_matches_all_eager(embedded_cache):
    lm = load_language_model(ModelSpec(), embedded_cache)
    assert lm.model.config._attn_implementation == SDPA_EAGER_PROBS
    text = next(documents(CorpusSpec(), "train"))
    ids = torch.tensor([[lm.bos_token_id, *lm.tokenizer(text, add_special_tokens=False)["input_ids"][:127]]])
    got = run_to_layer(lm.model, ids, 12)
    use_attention(lm.model, "eager")
    want = run_to_layer(lm.model, ids, 12)
    torch.testing.assert_close(got.attn, want.attn, atol=1e-5, rtol=0)
    scale = want.resid.norm(dim=-1, keepdim=True)  # BOS's norm is ~7x the rest: compare each token to its own
    assert ((got.resid - want.resid).norm(dim=-1, keepdim=True) / scale).max() < 1e-5


def test_cache_round_trips_bit_exactly_without_running_the_lm(cache):
    spec = tiny_spec(cache)
    first = Activations(spec)
    made = [first.shard("train", i) for i in range(first.n_shards["train"])]
    assert first.lm_shards_computed == first.n_shards["train"] == 2
    second = Activations(spec)
    for i, shard in enumerate(made):
        again = second.shard("train", i)
        for name in ("acts", "tokens", "seq_id"):
            assert torch.equal(getattr(again, name), getattr(shard, name)), name
        assert again.partners.keys() == shard.partners.keys()
        for rule in shard.partners:
            assert torch.equal(again.partners[rule], shard.partners[rule]), rule
    assert second.lm_shards_computed == 0
    assert second._lm is None, "a fully cached split must not even load the LM"
    assert second.scale == first.scale


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_checksum"])
def test_corrupt_shard_is_detected_and_regenerated(cache, damage, capsys):
    spec = tiny_spec(cache)
    original = Activations(spec).shard("train", 1)
    path = Activations(spec).caches["train"].dir / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        path.with_suffix(".sha256").unlink()
    fresh = Activations(spec)
    regenerated = fresh.shard("train", 1)
    assert fresh.lm_shards_computed == 1
    assert torch.equal(regenerated.acts, original.acts)
    assert "regenerating" in capsys.readouterr().out
    assert Activations(spec).caches["train"].load(1) is not None  # stored again, valid


def test_batches_mix_sequences_and_pair_partners_within_sequence(cache):
    spec = tiny_spec(cache, "activations.train_tokens=1024")
    acts = Activations(spec)
    shards = {i: acts.shard("train", i) for i in range(acts.n_shards["train"])}
    S = spec.activations.contexts_per_shard
    n = 0
    for batch in acts.batches("train", batch_size=64, seed=3):
        assert batch.seq_id.unique().numel() >= 6, "one batch must span many sequences"
        assert (batch.position >= 2).all()
        for k in range(len(batch)):
            sh = shards[int(batch.seq_id[k]) // S]
            row = int(batch.seq_id[k]) % S
            pos, par = int(batch.position[k]), int(sh.partners[spec.activations.pairing][row, batch.position[k]])
            assert 1 <= par < 32 and par != pos
            assert torch.equal(batch.anchors[k], sh.acts[row, pos].float() * acts.scale)
            assert torch.equal(batch.partners[k], sh.acts[row, par].float() * acts.scale)
        n += len(batch)
    assert n == (4 * S * (32 - 2)) // 64 * 64


def test_without_drop_last_every_anchor_comes_once_and_only_the_last_batch_is_short(cache):
    spec = tiny_spec(cache, "activations.train_tokens=1024")
    acts = Activations(spec)
    S, T = spec.activations.contexts_per_shard, spec.activations.context_length
    anchors = {(seq, pos) for seq in range(4 * S) for pos in range(2, T)}
    kept = list(acts.batches("train", batch_size=100, seed=0, drop_last=False))
    assert [len(b) for b in kept] == [100] * 9 + [60]
    seen = [(int(s), int(p)) for b in kept for s, p in zip(b.seq_id, b.position)]
    assert len(seen) == len(set(seen)) and set(seen) == anchors
    dropped = list(acts.batches("train", batch_size=100, seed=0))
    assert [len(b) for b in dropped] == [100] * 9
    assert all(torch.equal(a.anchors, b.anchors) for a, b in zip(dropped, kept))


def test_evaluation_sees_every_held_out_anchor(cache):
    from csc.config import TrainRunSpec
    from csc.pipeline.run import evaluate_run
    from csc.sae.archs import build_sae
    from csc.sae.config import parse_sae_config

    base = tiny_spec(cache, "activations.eval_tokens=512")  # 2 held-out shards of 8 contexts: 480 anchors
    spec = TrainRunSpec.model_validate({**base.model_dump(), "sae": {"dict_size": 32},
                                        "trainer": {"steps": 1, "batch_size": 100},
                                        "eval": {"ce_contexts": 1, "probe_examples_per_class": 8}})
    acts = Activations(spec)
    sae = build_sae(parse_sae_config({"architecture": "relu", "d_in": 64, "dict_size": 32}))
    results, _ = evaluate_run(spec, sae, acts)
    assert acts.n_shards["eval"] == 2
    assert results["tokens"] == 2 * 8 * (32 - 2)  # 480, not the 400 of four full training batches of 100


def test_scale_gives_mean_norm_sqrt_d(cache):
    acts = Activations(tiny_spec(cache))
    x = acts.shard("train", 0).acts[:, 1:].float() * acts.scale
    assert x.norm(dim=-1).mean().item() == pytest.approx(64 ** 0.5, rel=1e-4)
    manifest = json.loads((acts.caches["train"].dir / "manifest.json").read_text())
    assert manifest["scale"] == acts.scale


def test_heldout_documents_are_disjoint_from_training():
    spec = CorpusSpec(holdout_fraction=0.1)
    train, held = list(documents(spec, "train")), list(documents(spec, "eval"))
    assert len(held) == (len(train) + len(held)) // 10
    assert not set(train) & set(held)


def test_local_model_folder_and_jsonl_corpus_use_the_same_path(cache, tmp_path):
    model, tok = build_tiny_gemma2(ModelSpec(name="tiny-gemma2"))
    folder = tmp_path / "my-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    corpus = tmp_path / "docs.jsonl"
    lines = [json.dumps({"content": f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 3}) for i in range(40)]
    corpus.write_text("\n".join(lines) + "\n")
    common = [f"corpus.source={corpus}", "corpus.text_field=content"]
    by_path = Activations(tiny_spec(cache, f"model.name={folder}", *common))
    by_name = Activations(tiny_spec(cache, *common))
    assert by_path.caches["train"].key != by_name.caches["train"].key
    a, b = by_path.shard("train", 0), by_name.shard("train", 0)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.acts, b.acts)
    text = by_path.lm.tokenizer.decode(a.tokens[0, 1:])
    assert text.startswith("Document 0: the quick brown fox")


def test_plain_text_file_corpus(cache, tmp_path):
    corpus = tmp_path / "book.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}. " + "It was a bright cold day in April. " * 4 for i in range(30)))
    acts = Activations(tiny_spec(cache, f"corpus.source={corpus}"))
    assert acts.lm.tokenizer.decode(acts.shard("train", 0).tokens[0, 1:]).startswith("Paragraph 0. It was")


# ---------------------------------------------------------------- bad input: one clear error, nothing written

def _nothing_written(cache: Path) -> bool:
    return not (cache / "activations").exists()


def test_layer_out_of_range(cache):
    with pytest.raises(InputError, match=r"activations.layer 7 is out of range.*4 layers"):
        Activations(tiny_spec(cache, "activations.layer=7"))
    assert _nothing_written(cache)


def test_context_longer_than_model_maximum(cache):
    with pytest.raises(InputError, match=r"activations.context_length 1000 exceeds.*512"):
        Activations(tiny_spec(cache, "activations.context_length=1000"))
    assert _nothing_written(cache)


def test_empty_corpus(cache, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    acts = Activations(tiny_spec(cache, f"corpus.source={empty}"))
    with pytest.raises(InputError, match=r"empty.txt.*has no text"):
        acts.build("train")
    assert _nothing_written(cache)


def test_corpus_too_small_for_the_token_budget(cache, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"Short paragraph number {i}." for i in range(40)))
    acts = Activations(tiny_spec(cache, f"corpus.source={small}", "activations.train_tokens=100000"))
    with pytest.raises(InputError, match=r"small.txt.*holds only \d+ contexts"):
        acts.build("train")
    assert _nothing_written(cache)


def test_missing_or_unreadable_corpus_file(cache, tmp_path):
    from csc.errors import SpecError

    with pytest.raises(SpecError, match=r"corpus.source: corpus file .*nope.txt.* does not exist"):
        tiny_spec(cache, f"corpus.source={tmp_path / 'nope.txt'}")
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"text": "fine"}\n{not json at all\n')
    acts = Activations(tiny_spec(cache, f"corpus.source={broken}"))
    with pytest.raises(InputError, match=r"corpus.source .*broken.jsonl.*cannot be read"):
        acts.build("train")
    assert _nothing_written(cache)


def test_unknown_model_id_offline(cache, monkeypatch):
    from huggingface_hub import constants

    from csc.sweep.ui import free_port

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # a Hub that does not answer
    with pytest.raises(InputError, match=r"model.name 'no-such-org/no-such-model' \(Hugging Face model id\) is not in "
                                         r"the local Hugging Face cache, and the Hub cannot be reached"):
        Activations(tiny_spec(cache, "model.name=no-such-org/no-such-model"))
    assert _nothing_written(cache)


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "a closed endpoint"])
def test_a_hub_id_without_network_fails_in_seconds_with_the_command_that_fetches_it(offline, tmp_path):
    """huggingface_hub reads its environment when imported, so each case runs in a fresh interpreter, as a user's
    command would; the time is the check's own, imports left out."""
    import subprocess

    from csc.sweep.ui import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    port = free_port()  # nothing listens there
    env.update({"HF_HUB_OFFLINE": "1"} if offline == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    script = ("import time\nfrom csc.activations.models import check_model_spec\nfrom csc.config import ModelSpec\n"
              "from csc.errors import InputError\nimport transformers\nt = time.perf_counter()\ntry:\n"
              "    check_model_spec(ModelSpec(name='no-such-org/no-such-model'))\nexcept InputError as e:\n"
              "    print(f'{time.perf_counter() - t:.2f}'); print(e)\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120).stdout
    seconds, message = out.split("\n", 1)
    assert float(seconds) < 5, out
    assert "`hf download no-such-org/no-such-model --revision main`" in message
    assert ("HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else f"127.0.0.1:{port} does not answer") in message


def test_spec_errors_name_file_and_field(tmp_path):
    from csc.errors import SpecError

    f = tmp_path / "spec.yaml"
    f.write_text("activations:\n  layer: -1\n  contxt_length: 64\nmodel:\n  dtype: float8\n")
    with pytest.raises(SpecError) as e:
        load_spec(ActivationsRunSpec, f)
    msg = str(e.value)
    assert f"{f}: activations.layer: Input should be greater than or equal to 0" in msg
    assert f"{f}: activations.contxt_length: unknown field" in msg
    assert f"{f}: model.dtype:" in msg


def test_cli_builds_then_reuses_cache(cache, capsys, tmp_path):
    from csc.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {{name: tiny-gemma2}}\nactivations: {{layer: 1, context_length: 32, contexts_per_shard: 8,"
                    f" train_tokens: 512, eval_tokens: 256, cache_dir: {cache}}}\n")
    assert main(["activations", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "normalisation scale" in out
    assert main(["activations", str(spec)]) == 0
    assert "all shards came from the cache" in capsys.readouterr().out
    assert main(["activations", str(spec), "--set", "activations.layer=9"]) == 2
    assert "activations.layer 9 is out of range" in capsys.readouterr().err
