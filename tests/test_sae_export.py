import json

import pytest
import torch

from csc.errors import CacheError, CscError
from csc.sae.config import SaeConfig
from csc.sae.export import export_saelens, load_exported
from csc.sae.model import SparseAutoencoder
from safetensors.torch import load_file


def trained_like(cfg, seed=0):
    sae = SparseAutoencoder(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(cfg.dict_size, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(cfg.d_in, generator=gen))
    return sae


META = dict(model_name="gemma-2-2b", hook_name="blocks.19.hook_resid_post", hook_layer=19,
            norm_scale=0.37, context_size=128)


@pytest.mark.parametrize("cfg", [
    SaeConfig(d_in=16, dict_size=48),
    SaeConfig(d_in=16, dict_size=48, architecture="topk", k=5, layer_norm=False),
])
def test_round_trip_and_saelens_layout(tmp_path, cfg):
    sae = trained_like(cfg)
    export_saelens(sae, tmp_path / "e", **META)
    weights = load_file(str(tmp_path / "e" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (16, 48), "b_enc": (48,), "W_dec": (48, 16), "b_dec": (16,)}
    saved = json.loads((tmp_path / "e" / "cfg.json").read_text())
    for key in ("d_in", "d_sae", "dtype", "device", "hook_name", "hook_layer", "model_name",
                "architecture", "apply_b_dec_to_input", "normalize_activations", "context_size",
                "prepend_bos", "activation_fn_str", "csc_norm_scale", "csc_layer_norm"):
        assert key in saved, key
    assert saved["d_sae"] == 48 and saved["hook_layer"] == 19 and saved["csc_norm_scale"] == 0.37
    if cfg.architecture == "topk":
        assert saved["architecture"] == "topk" and saved["k"] == 5
        assert saved["activation_fn_kwargs"] == {"k": 5}
    else:
        assert saved["architecture"] == "standard" and saved["activation_fn_str"] == "relu"

    back, meta = load_exported(tmp_path / "e")
    assert back.cfg == cfg and meta == saved
    x = torch.randn(10, 16)
    assert torch.equal(back(x)[0], sae(x)[0])


def test_folded_scale_reads_raw_activations(tmp_path):
    cfg = SaeConfig(d_in=16, dict_size=48, architecture="topk", k=6, layer_norm=False)
    sae = trained_like(cfg, seed=3)
    s = 0.05
    export_saelens(sae, tmp_path / "f", **{**META, "norm_scale": s}, fold_norm_scale=True)
    folded, meta = load_exported(tmp_path / "f")
    assert meta["csc_norm_scale_folded"] is True
    x_raw = torch.randn(12, 16) * 40
    x_hat_scaled, z = sae(x_raw * s)
    x_hat_raw, z_raw = folded(x_raw)
    assert torch.allclose(z_raw, z, rtol=1e-4, atol=1e-5)
    assert torch.allclose(x_hat_raw, x_hat_scaled / s, rtol=1e-4, atol=1e-3)


def test_folding_with_layer_norm_is_refused(tmp_path):
    with pytest.raises(CscError, match="layer_norm"):
        export_saelens(trained_like(SaeConfig(d_in=16, dict_size=48)), tmp_path / "x", **META,
                       fold_norm_scale=True)


def test_foreign_or_missing_exports_are_refused(tmp_path):
    with pytest.raises(CacheError):
        load_exported(tmp_path / "none")
    export_saelens(trained_like(SaeConfig(d_in=16, dict_size=48)), tmp_path / "e", **META)
    cfg = json.loads((tmp_path / "e" / "cfg.json").read_text())
    cfg["architecture"] = "jumprelu"
    (tmp_path / "e" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CacheError, match="jumprelu"):
        load_exported(tmp_path / "e")
