"""Producer throughput: csc's activation pipeline vs bare LM forwards, side by side in one run.

    python bench/producer_throughput.py                 # embedded Gemma 3 270M, layer 12, on this machine's device
    python bench/producer_throughput.py --model gemma2-2b-shape --layer 19   # random Gemma-2-2B-shaped, bf16 (GPU)

Rows (tokens/s, higher is better; each row's best of --rounds rounds, the rows taking turns in every round; ratios
to the bare sdpa forward to layer L and to the full eager forward):
  csc pipeline   run_to_layer (stops after layer L) + attention partners + copy to host (on CUDA: a side stream
                 into pinned memory, as Activations._compute does), with the attention csc picks for the model
                 (csc/activations/models.py: sdpa with eager probabilities at layer L, or eager in every layer
                 under an attention soft-cap), then with eager attention in every layer (csc before sdpa)
  to layer L     the model's own forward with the layers above L removed, no hooks (eager, then sdpa)
  full forward   the whole model with logits (eager, then sdpa)

With --cache (embedded model only), a second table times one whole activation shard of the quickstart spec
(64 contexts x 128 tokens) three ways, on an empty cache folder made for the run:
  from the LM          Activations.shard on a miss: tokenise, forward, partners, store (sha256 + safetensors)
  from the disk cache  a fresh Activations reading the stored shard back (checksum verified)
  producer memory      ActivationProducer.shard for a shard it already holds (what a second trial gets)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from csc.activations.capture import decoder_layers, run_to_layer, to_host, use_attention
from csc.activations.pairing import attention_partners
from csc.activations.models import ModelFacts, load_language_model, resolve_device
from csc.activations.source import Activations
from csc.config import ModelSpec, TrainRunSpec, default_cache_dir
from csc.spec_loader import load_spec
from csc.errors import InputError
from csc.sweep.producer import ActivationProducer
from csc.sweep.spec import SweepSpec

SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"


def cache_speedup(repeats: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="csc-bench-cache-"))
    try:
        (work / "models").symlink_to(default_cache_dir() / "models")  # the converted model, not what is timed
        spec = load_spec(TrainRunSpec, SPEC, [f"activations.cache_dir={work}"], part_of=SweepSpec)
        a = spec.activations
        tokens = a.contexts_per_shard * a.context_length
        acts = Activations(spec)
        acts.lm  # load the model before timing
        times = {"from the LM": [], "from the disk cache": [], "producer memory": []}
        for i in range(repeats):
            t = time.perf_counter()
            acts.shard("train", i)
            times["from the LM"].append(time.perf_counter() - t)
            t = time.perf_counter()
            Activations(spec).shard("train", i)
            times["from the disk cache"].append(time.perf_counter() - t)
        producer = ActivationProducer(spec.model_dump_json(), memory_mb=1024, prefetch=0)
        for i in range(repeats):
            producer.shard("train", i)
            t = time.perf_counter()
            producer.shard("train", i)
            times["producer memory"].append(time.perf_counter() - t)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lm = sum(times["from the LM"]) / repeats
    print(f"\none shard = {a.contexts_per_shard} x {a.context_length} tokens of layer {a.layer}, "
          f"stored as {a.store_dtype}; mean of {repeats} shards")
    print("| shard source | ms per shard | tokens/s | speed-up vs LM |")
    print("|---|---:|---:|---:|")
    for label, ts in times.items():
        m = sum(ts) / repeats
        print(f"| {label} | {m * 1e3:,.3f} | {tokens / m:,.0f} | {lm / m:,.0f}x |")


def gemma2_2b_shaped(device: torch.device):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                       attn_implementation="eager")
    torch.manual_seed(0)
    with device:
        return Gemma2ForCausalLM(cfg).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded | tiny-gemma2 | gemma2-2b-shape | a HF id/folder")
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--batch", type=int, default=16, help="contexts per forward")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--iters", type=int, default=3, help="forwards per timing")
    p.add_argument("--rounds", type=int, default=3, help="timings per row; the best counts")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", type=int, default=0, metavar="N",
                   help="also time N shards from the LM, the disk cache and the producer's memory (embedded)")
    args = p.parse_args()

    device = resolve_device(args.device)
    if args.model == "gemma2-2b-shape":
        model = gemma2_2b_shaped(device)
    else:
        model = load_language_model(ModelSpec(name=args.model, device=args.device), Path(default_cache_dir())).model
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(4, vocab, (args.batch, args.context), device=device, generator=None)
    ids[:, 0] = 2
    L = args.layer

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bench(fn) -> float:
        fn()  # warm-up
        sync()
        t = time.perf_counter()
        for _ in range(args.iters):
            fn()
        sync()
        return ids.numel() * args.iters / (time.perf_counter() - t)

    copies = torch.cuda.Stream(device) if device.type == "cuda" else None

    def pipeline():
        cap = run_to_layer(model, ids, L)
        return to_host(cap.resid, torch.float32, copies), {r: p.cpu() for r, p in attention_partners(cap.attn).items()}

    @torch.inference_mode()
    def to_layer():
        layers = decoder_layers(model)
        model.model.layers = layers[: L + 1]
        try:
            return model.model(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            model.model.layers = layers

    @torch.inference_mode()
    def full():
        return model(input_ids=ids, use_cache=False).logits

    csc_attention = ModelFacts.of(model.config).attention
    rows = {"csc pipeline, eager in every layer": ("eager", pipeline), "to layer L, eager": ("eager", to_layer),
            "full forward, eager": ("eager", full), "to layer L, sdpa": ("sdpa", to_layer),
            "full forward, sdpa": ("sdpa", full)}
    if csc_attention != "eager":
        rows = {"csc pipeline, sdpa + eager probabilities at L": (csc_attention, pipeline), **rows}
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for label, (attention, fn) in list(rows.items()):
            try:
                use_attention(model, attention)
                best[label] = max(best.get(label, 0.0), bench(fn))
            except (InputError, ValueError) as e:  # e.g. Gemma 2, which this transformers runs without sdpa
                print(f"{label} left out: {str(e).splitlines()[0]}")
                del rows[label]
    use_attention(model, csc_attention)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"model {args.model}, layer {L}, batch {args.batch}x{args.context}, {next(model.parameters()).dtype}, "
          f"{name}, csc attention {csc_attention!r}, best of {args.rounds} rounds of {args.iters} forwards")
    sdpa = best.get("to layer L, sdpa")
    print(f"{'':<48} {'tokens/s':>10} {'vs to L sdpa':>13} {'vs full eager':>14}")
    for label, v in best.items():
        vs_sdpa = f"{v / sdpa:>12.2f}x" if sdpa else f"{'-':>13}"
        print(f"{label:<48} {v:>10,.0f} {vs_sdpa} {v / best['full forward, eager']:>13.2f}x")
    if args.cache:
        cache_speedup(args.cache)


if __name__ == "__main__":
    main()
