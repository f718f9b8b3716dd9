"""The one SAE format (SAELens's layout): csc reads back what it wrote, and SAELens computes the same codes and
reconstruction on raw activations for every architecture, with and without the pre-encoder LayerNorm."""

import json

import pytest
import torch
from safetensors.torch import load_file

from csc.errors import CacheError
from csc.sae.archs import ARCHITECTURES, build_sae
from csc.sae.config import parse_sae_config
from csc.sae.export import HookInfo, load_sae, save_sae

HOOK = HookInfo(model_name="gemma-2-2b", hook_layer=19, norm_scale=0.037, context_size=128)
D, M = 16, 48
CASES = [(arch, ln) for arch in ARCHITECTURES for ln in (True, False)]


def trained_like(arch: str, layer_norm: bool, seed: int = 0):
    """An SAE with every tensor moved off its initial value, as training would (thresholds included)."""
    extra = {"k": 5} if "topk" in arch else {}
    sae = build_sae(parse_sae_config({"architecture": arch, "d_in": D, "dict_size": M, "layer_norm": layer_norm,
                                      **extra}), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(M, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=gen))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=gen) * 0.3)
        if hasattr(sae, "threshold_seen"):
            sae.threshold_seen.fill_(True)
    return sae.eval()


def raw_activations(n=64):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(7)) * 40 + 3  # raw LM scale, off-centre


@pytest.mark.parametrize("arch, layer_norm", CASES)
def test_round_trip_in_csc(tmp_path, arch, layer_norm):
    sae = trained_like(arch, layer_norm)
    meta = save_sae(sae, tmp_path / "e", HOOK)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    saved = json.loads((tmp_path / "e" / "cfg.json").read_text())
    assert saved == meta and saved["csc_sae_config"] == sae.cfg.model_dump()
    for key in ("d_in", "d_sae", "dtype", "device", "hook_name", "hook_layer", "model_name", "architecture",
                "apply_b_dec_to_input", "normalize_activations", "context_size", "prepend_bos", "csc_norm_scale"):
        assert key in saved, key
    assert saved["hook_name"] == "blocks.19.hook_resid_post"
    assert saved["normalize_activations"] == ("layer_norm" if layer_norm else "none")
    assert saved["architecture"] == type(sae).saelens_architecture
    weights = load_file(str(tmp_path / "e" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items() if k != "threshold"} == {
        "W_enc": (D, M), "b_enc": (M,), "W_dec": (M, D), "b_dec": (D,)}
    back, _ = load_sae(tmp_path / "e")
    assert back.cfg == sae.cfg and not back.training
    x = raw_activations() * HOOK.norm_scale
    ours, theirs = sae(x), back(x)
    assert torch.equal(ours.z != 0, theirs.z != 0)
    assert torch.allclose(theirs.z, ours.z, rtol=1e-5, atol=1e-5)
    assert torch.allclose(theirs.x_hat, ours.x_hat, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch, layer_norm", CASES)
def test_saelens_computes_what_csc_computes_on_raw_activations(tmp_path, arch, layer_norm):
    """What a user of the export gets in SAELens equals csc's pipeline: scale, SAE, unscale."""
    from sae_lens import SAE  # the interop extra, installed by scripts/setup.sh

    sae = trained_like(arch, layer_norm, seed=3)
    save_sae(sae, tmp_path / "e", HOOK)
    loaded = SAE.load_from_disk(str(tmp_path / "e"))
    x_raw = raw_activations()
    ours = sae(x_raw * HOOK.norm_scale)
    with torch.no_grad():
        z = loaded.encode(x_raw)
        x_hat = loaded.decode(z)
    assert torch.equal(z != 0, ours.z != 0), "the same latents fire"
    assert torch.allclose(z, ours.z, rtol=1e-4, atol=1e-4)
    assert torch.allclose(x_hat, ours.x_hat / HOOK.norm_scale, rtol=1e-4, atol=1e-3)
    assert (ours.z != 0).any() and not (ours.z != 0).all(), "a sparse code, so the comparison means something"


def test_foreign_or_broken_exports_are_refused(tmp_path):
    with pytest.raises(CacheError, match="not an exported SAE"):
        load_sae(tmp_path / "none")
    save_sae(trained_like("relu", False), tmp_path / "e", HOOK)
    cfg_path = tmp_path / "e" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "csc_sae_config"}))
    with pytest.raises(CacheError, match="not written by csc"):
        load_sae(tmp_path / "e")
    cfg["csc_sae_config"]["layer_norm"] = True  # an export of csc before the LayerNorm was SAELens's
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CacheError, match="normalize_activations 'none' does not match"):
        load_sae(tmp_path / "e")
    cfg["csc_sae_config"]["layer_norm"] = False
    cfg["csc_sae_config"]["architecture"] = "gated"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CacheError, match="csc_sae_config is invalid"):
        load_sae(tmp_path / "e")
    cfg["csc_sae_config"]["architecture"] = "jumprelu"  # no threshold tensor in the file
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CacheError, match="missing \\['threshold'\\]"):
        load_sae(tmp_path / "e")
