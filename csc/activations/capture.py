"""Run the LM up to layer L only; capture resid_post of layer L and its attention probabilities.

A forward hook on decoder layer L stores the layer's output and raises `_StopForward`, so the layers
above L, the final norm and the 262k-wide unembedding are never computed. A hook on the layer's
attention module stores its attention probabilities, averaged over heads: csc/activations/pairing.py
turns them into positive partners (every rule's, stored side by side in each shard).

Only layer L's probabilities are needed, and only eager attention returns any; sdpa is faster. So a
model runs one of two attention implementations (csc/activations/models.py picks one per model):
- `eager` in every layer: the attention module returns its probabilities as its second output.
- SDPA_EAGER_PROBS, registered with transformers here: sdpa in every layer, and in layer L of a
  `run_to_layer` call also the model's own eager attention function on the same queries, keys and mask,
  for its probabilities only (its output is dropped). resid_post of every layer is then exactly the
  sdpa forward's, which evaluation splices SAEs into; any other forward (splicing, absorption) is plain
  sdpa. The masks are sdpa's (None where sdpa's `is_causal` does, else boolean, sliding windows
  included); the eager call gets them as eager's additive masks.

`run_from_layer` resumes a forward from a stored resid_post of layer L: the layers up to L are not run (an SAE's
evaluation splices many SAEs into the same clean run, csc/pipeline/evaluate.py).

Every hook csc puts on the model acts only in the thread that put it (`thread_hook`), and what a running call reads
is per thread (context variables): a producer's evaluation and its shard production share one model.

`run_after_prefixes` reads resid_post of layer L at G tokens that each follow one shared P-token prefix, as if each
were alone after it, for P + G token positions instead of G (P + 1) (feature absorption's prompts,
csc/activations/spelling.py).
"""

from __future__ import annotations

import sys
import threading
from contextvars import ContextVar
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from csc.errors import InputError, first_line

SDPA_EAGER_PROBS = "sdpa+eager_probs@hooked"
"""csc's attention implementation (the module docstring); "sdpa" in the name makes transformers check that the
model supports sdpa."""

_probs_from: ContextVar[nn.Module | None] = ContextVar("csc_probs_from", default=None)
"""The attention module whose probabilities the running `run_to_layer` call reads (per thread, so concurrent
forwards of one model, e.g. a producer's, do not see each other's)."""


_resume_at: ContextVar[tuple[int, torch.Tensor] | None] = ContextVar("csc_resume_at", default=None)
"""(L, resid_post(L)) of the running `run_from_layer` call, per thread."""

_resumable_lock = threading.Lock()


class _StopForward(Exception):
    pass


def thread_hook(module: nn.Module, hook: Callable) -> torch.utils.hooks.RemovableHandle:
    """module.register_forward_hook(hook) for the calling thread only: a forward of `module` on another thread
    passes it untouched."""
    owner = threading.get_ident()

    def in_owner(mod, args, out):
        return hook(mod, args, out) if threading.get_ident() == owner else None

    return module.register_forward_hook(in_owner)


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


def use_attention(model: nn.Module, implementation: str) -> None:
    """Make `model` run `implementation` ("eager" or SDPA_EAGER_PROBS) in every layer."""
    if implementation == SDPA_EAGER_PROBS:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(SDPA_EAGER_PROBS, partial(_sdpa_eager_probs, sdpa_attention_forward))
        AttentionMaskInterface.register(SDPA_EAGER_PROBS, sdpa_mask)
    try:
        model.set_attn_implementation(implementation)
    except ValueError as e:  # e.g. a model class without sdpa support
        raise InputError(f"{type(model).__name__} cannot run attention {implementation!r}: {first_line(e)}") from None
    if model.config._attn_implementation != implementation:  # transformers only warns for a model it cannot switch
        raise InputError(f"{type(model).__name__} does not let its attention be switched to {implementation!r}")


def _sdpa_eager_probs(sdpa, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA_EAGER_PROBS: sdpa's output, with the eager attention probabilities where `run_to_layer` reads them."""
    out, _ = sdpa(module, query, key, value, attention_mask, **kwargs)
    if module is not _probs_from.get():
        return out, None
    # The attention module's own eager function (every transformers modeling file defines one), which the model's
    # eager implementation would run: the same softmax, scaling and masking.
    eager = sys.modules[type(module).__module__].eager_attention_forward
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    _, probs = eager(module, query, key, value, _additive_mask(attention_mask, query, key, causal), **kwargs)
    return out, probs


def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                   causal: bool) -> torch.Tensor | None:
    """sdpa's mask as eager's: None (sdpa's `is_causal` when `causal`: a causal mask, aligned to the last keys)
    and boolean masks (True: attend) become 0 / dtype-min additive masks, as transformers' eager_mask makes them;
    an additive mask stays as it is."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    if mask is None:
        if not causal:
            return None
        q, k = query.shape[-2], key.shape[-2]
        mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
    return torch.where(mask, torch.zeros((), dtype=query.dtype, device=query.device), torch.finfo(query.dtype).min)


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
            raise InputError("the attention module returned no probabilities: load the model with "
                             f"csc.activations.models.load_language_model (attention 'eager' or {SDPA_EAGER_PROBS!r})")
        store["attn"] = out[1].float().mean(dim=1)

    def on_layer(_mod, _args, out):
        store["resid"] = out[0] if isinstance(out, tuple) else out
        raise _StopForward

    attn_module = _attention_module(layers[layer])
    handles = [thread_hook(attn_module, on_attn)] if attention else []
    handles.append(thread_hook(layers[layer], on_layer))
    token = _probs_from.set(attn_module if attention else None)
    try:
        base_model(model)(use_cache=False, **inputs)
    except _StopForward:
        pass
    finally:
        _probs_from.reset(token)
        for h in handles:
            h.remove()
    if "resid" not in store:
        raise RuntimeError("the forward pass ended without reaching the hooked layer")
    return store


@torch.inference_mode()
def run_to_layer(model: nn.Module, input_ids: torch.Tensor, layer: int) -> Captured:
    # Contexts are never padded: no attention mask, so sdpa runs with is_causal instead of a materialised mask.
    store = _forward_to(model, layer, attention=True, input_ids=input_ids)
    return Captured(resid=store["resid"], attn=store["attn"])


def run_from_layer(model: nn.Module, input_ids: torch.Tensor, layer: int, resid: torch.Tensor) -> torch.Tensor:
    """Final hidden states [b, T, h] of `input_ids` [b, T] (attention mask all ones) when resid_post(layer) is `resid`
    [b, T, d]: the layers up to `layer` are skipped, the rest run as in a full forward. With the resid_post of a full
    forward of the same batch, the result is that forward's, bit for bit."""
    layers = decoder_layers(model)
    with _resumable_lock:
        for i, block in enumerate(layers):
            if not getattr(block, "_csc_resumable", False):
                block.forward = _resumable(block.forward, i)
                block._csc_resumable = True
    token = _resume_at.set((layer, resid))
    try:
        return base_model(model)(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 use_cache=False).last_hidden_state
    finally:
        _resume_at.reset(token)


def _resumable(forward: Callable, i: int) -> Callable:
    """Decoder layer i's forward, skipped inside a `run_from_layer` call of this thread that resumes at or after
    it (transformers 5's layers take and return the hidden states as a tensor)."""
    def resumable(*args, **kwargs):
        at = _resume_at.get()
        if at is None or i > at[0]:
            return forward(*args, **kwargs)
        return at[1] if i == at[0] else (args[0] if args else kwargs["hidden_states"])

    return resumable


def to_host(x: torch.Tensor, dtype: torch.dtype, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """`x` as `dtype` on the host. With a CUDA `stream`, the copy runs on that stream into pinned memory (torch pins
    the target of a non-blocking device-to-host copy) without the host waiting, so it overlaps what the device runs
    next on its own stream; the result is valid once `stream` is synchronised."""
    if stream is None:
        return x.to("cpu", dtype)
    stream.wait_stream(torch.cuda.current_stream(x.device))  # x is complete before the copy reads it
    x.record_stream(stream)  # x's memory is not reused before the copy has read it
    with torch.cuda.stream(stream):
        return x.to("cpu", dtype, non_blocking=True)


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
