"""Run the LM up to layer L only; capture resid_post of layer L and its attention probabilities.

A forward hook on decoder layer L stores the layer's output and raises `_StopForward`, so the layers
above L, the final norm and the 262k-wide unembedding are never computed. A hook on the layer's
attention module stores its attention probabilities (eager attention returns them as the module's
second output), averaged over heads: csc/activations/pairing.py turns them into positive partners
(every rule's, stored side by side in each shard).

`run_after_prefixes` reads resid_post of layer L at G tokens that each follow one shared P-token prefix, as if each
were alone after it, for P + G token positions instead of G (P + 1) (feature absorption's prompts,
csc/activations/spelling.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from csc.errors import InputError


class _StopForward(Exception):
    pass


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (running it skips the unembedding)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (Gemma/Llama/Mistral/Qwen style, or GPT-2 style)."""
    base = base_model(model)
    for name in ("layers", "h"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise InputError(f"cannot find the decoder layers of {type(model).__name__}")


def _attention_module(layer: nn.Module) -> nn.Module:
    for name in ("self_attn", "attn", "attention"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise InputError(f"cannot find the attention module of {type(layer).__name__}")


@dataclass
class Captured:
    resid: torch.Tensor
    """[B, T, d] residual stream after layer L, in the model's dtype."""
    attn: torch.Tensor
    """[B, T, T] attention probabilities of layer L, averaged over heads (float32)."""


def _forward_to(model: nn.Module, layer: int, attention: bool, **inputs) -> dict[str, torch.Tensor]:
    """Run `model` on `inputs` only until decoder layer `layer` has run: {"resid": its output [B, T, d], and with
    `attention` "attn": its attention probabilities averaged over heads [B, T, T]}."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise InputError(f"activations.layer {layer} is out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    store: dict[str, torch.Tensor] = {}

    def on_attn(_mod, _args, out):
        if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
            raise InputError("the attention module returned no probabilities; load the model with attn_implementation='eager'")
        store["attn"] = out[1].float().mean(dim=1)

    def on_layer(_mod, _args, out):
        store["resid"] = out[0] if isinstance(out, tuple) else out
        raise _StopForward

    handles = [_attention_module(layers[layer]).register_forward_hook(on_attn)] if attention else []
    handles.append(layers[layer].register_forward_hook(on_layer))
    try:
        base_model(model)(use_cache=False, **inputs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if "resid" not in store:
        raise RuntimeError("the forward pass ended without reaching the hooked layer")
    return store


@torch.inference_mode()
def run_to_layer(model: nn.Module, input_ids: torch.Tensor, layer: int) -> Captured:
    store = _forward_to(model, layer, attention=True, input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return Captured(resid=store["resid"], attn=store["attn"])


@torch.inference_mode()
def run_after_prefixes(model: nn.Module, prefixes: torch.Tensor, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """resid_post of `layer` [B, G, d] at each of tokens[b] [B, G] appended alone to prefixes[b] [B, P]: what
    run_to_layer gives at the last position of the B * G sequences prefixes[b] + tokens[b, g]. One pass over rows
    prefixes[b] + tokens[b] [B, P + G]: every token at position P, attending to the prefix and to itself only (a
    4D attention mask, which the model's mask builder takes as it is)."""
    (B, P), G = prefixes.shape, tokens.shape[1]
    T = P + G
    allowed = torch.ones(T, T, dtype=torch.bool, device=prefixes.device).tril()
    allowed[P:, P:] = torch.eye(G, dtype=torch.bool, device=prefixes.device)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(T, T, dtype=dtype, device=prefixes.device).masked_fill(~allowed, torch.finfo(dtype).min)
    positions = torch.cat([torch.arange(P), torch.full((G,), P)]).to(prefixes.device)
    inputs = torch.cat([prefixes, tokens], dim=1)
    resid = _forward_to(model, layer, attention=False, input_ids=inputs, attention_mask=mask.expand(B, 1, T, T),
                        position_ids=positions.expand(B, T))["resid"]
    return resid[:, P:]
