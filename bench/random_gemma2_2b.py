"""A randomly initialised Gemma-2-2B-shaped model folder, for running the real sweep path on a GPU machine that
cannot download the weights (speed does not depend on them).

    python bench/random_gemma2_2b.py /tmp/gemma2-2b-random             # then --set model.name=/tmp/gemma2-2b-random

Gemma 2 2B's shape (d 2304, 26 layers, 8 heads, 4 KV heads, head dim 256, MLP 9216, attention soft-cap 50, so
csc runs it with eager attention in every layer), seed 0, saved in bf16 with the embedded model's tokenizer (Gemma
3's, no network needed). The vocabulary is that tokenizer's (262,144 rows, 2.4% more than Gemma 2's 256,000), so
its token ids fit the embedding; a forward stopped at layer 19 does not touch the unembedding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from csc.activations.models import embedded_model_folder
from csc.config import default_cache_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder to write (config.json, safetensors, tokenizer)")
    p.add_argument("--layers", type=int, default=26, help="decoder layers (26: Gemma 2 2B)")
    a = p.parse_args()
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_folder(default_cache_dir()))
    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(a.out)
    tokenizer.save_pretrained(a.out)
    print(f"wrote {a.out}: Gemma2ForCausalLM, {sum(t.numel() for t in model.parameters()) / 1e9:.2f}B parameters, "
          f"{a.layers} layers, vocabulary {len(tokenizer):,}")


if __name__ == "__main__":
    main()
