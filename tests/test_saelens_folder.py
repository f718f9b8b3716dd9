"""SAEs that SAELens itself wrote (its own `save_model`): csc reads the hook point and builds the SAE that computes
SAELens's codes and reconstruction, on csc's scaled activations; what it cannot compute the same way it refuses."""

import json

import pytest
import torch
from sae_lens import (JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE,  # the interop extra
                      TopKSAEConfig)
from sae_lens.saes.sae import SAEMetadata

from csc.errors import CacheError
from csc.sae.export import HookInfo, save_sae
from csc.sae.saelens_folder import load_saelens_sae, read_saelens_folder
from tests.test_sae_export import trained_like

D, M, SCALE = 16, 48, 0.037
KINDS = {"standard": (StandardSAE, StandardSAEConfig, {}), "topk": (TopKSAE, TopKSAEConfig, {"k": 5}),
         "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {})}


def saelens_sae(kind: str, layer_norm: bool, b_dec_in: bool, hook: str = "blocks.3.hook_resid_post"):
    cls, cfg_cls, extra = KINDS[kind]
    cfg = cfg_cls(d_in=D, d_sae=M, apply_b_dec_to_input=b_dec_in,
                  normalize_activations="layer_norm" if layer_norm else "none",
                  metadata=SAEMetadata(model_name="tiny-gemma2", hook_name=hook), **extra)
    sae = cls(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every tensor off its initial value, decoder rows not unit norm, some thresholds < 0
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name in ("b_enc", "threshold") else 1.0))
    return sae


def raw_activations(n=64):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(7)) * 40 + 3  # raw LM scale, off-centre


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("b_dec_in", [True, False])
def test_csc_computes_what_saelens_computes(tmp_path, kind, layer_norm, b_dec_in):
    theirs = saelens_sae(kind, layer_norm, b_dec_in)
    theirs.save_model(str(tmp_path / "s"))
    folder = read_saelens_folder(tmp_path / "s")
    assert (folder.model_name, folder.hook_name, folder.layer) == ("tiny-gemma2", "blocks.3.hook_resid_post", 3)
    ours = load_saelens_sae(folder, SCALE)
    x = raw_activations()
    with torch.no_grad():
        z = theirs.encode(x)
        x_hat = theirs.decode(z)
        out = ours(x * SCALE)
    assert (z != 0).any() and not (z != 0).all(), "a sparse code, so the comparison means something"
    assert torch.equal(out.z != 0, z != 0), "the same latents fire"
    assert torch.allclose(out.z, z, rtol=1e-4, atol=1e-4)
    # float32 rounding of sums of terms up to ~1e3 (random weights): tolerance relative to the largest value
    torch.testing.assert_close(out.x_hat / SCALE, x_hat, rtol=1e-4, atol=1e-5 * x_hat.abs().max().item())


def test_hook_points_and_older_layouts(tmp_path):
    saelens_sae("standard", False, True, hook="blocks.4.hook_resid_pre").save_model(str(tmp_path / "pre"))
    assert read_saelens_folder(tmp_path / "pre").layer == 3, "the stream into block 4 is the one after block 3"
    saelens_sae("standard", False, True, hook="blocks.0.hook_resid_pre").save_model(str(tmp_path / "emb"))
    assert read_saelens_folder(tmp_path / "emb").layer is None, "the embeddings are no block's output"
    saelens_sae("standard", False, True, hook="blocks.2.attn.hook_z").save_model(str(tmp_path / "z"))
    assert read_saelens_folder(tmp_path / "z").layer is None
    # csc's own export is the pre-6.0 flat layout (TopK as architecture "topk" with activation_fn_kwargs): it reads
    sae = trained_like("topk", False)
    save_sae(sae, tmp_path / "csc", HookInfo("tiny-gemma2", 2, SCALE, 32))
    folder = read_saelens_folder(tmp_path / "csc")
    assert folder.layer == 2 and folder.sae_config["k"] == 5
    x = raw_activations() * SCALE
    assert torch.allclose(load_saelens_sae(folder, SCALE)(x).x_hat, sae(x).x_hat, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field, value, message", [
    ("architecture", "gated", "architecture 'gated': csc measures SAELens's standard, topk and jumprelu"),
    ("normalize_activations", "expected_average_only_in", "fold_activation_norm_scaling_factor"),
    ("reshape_activations", "hook_z", "reshape_activations 'hook_z'"),
    ("d_sae", "many", "d_in and d_sae must be integers"),
])
def test_what_csc_would_compute_differently_is_refused(tmp_path, field, value, message):
    saelens_sae("standard", False, True).save_model(str(tmp_path / "s"))
    cfg_path = tmp_path / "s" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CacheError, match=message) as e:
        read_saelens_folder(tmp_path / "s")
    assert str(cfg_path) in str(e.value)


def test_rescaled_topk_and_missing_files_are_refused(tmp_path):
    saelens_sae("topk", False, True).save_model(str(tmp_path / "t"))
    cfg_path = tmp_path / "t" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "rescale_acts_by_decoder_norm": True}))
    with pytest.raises(CacheError, match="rescale_acts_by_decoder_norm True"):
        read_saelens_folder(tmp_path / "t")
    with pytest.raises(CacheError, match="is not an SAE folder"):
        read_saelens_folder(tmp_path)
