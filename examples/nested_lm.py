"""A nested character-level Llama: train once, pick a sub-model by budget, export it, generate.

Runs on CPU in a few minutes, no downloads. A ``LlamaForCausalLM`` built from a
config (grouped-query attention) is nested over FFN width x attention heads x
depth with ``sn.from_transformers``, trained with sorted sandwich sampling on
Python's own documentation text (``pydoc_data.topics``), profiled (a budget
table: parameters, FLOPs, latency and held-out loss of every sub-model), and
the best sub-model within a parameter budget is exported as a stock
``LlamaForCausalLM`` (``save_pretrained`` -> ``from_pretrained``) that
generates text.

    PYTHONPATH=src python examples/nested_lm.py [--steps 300] [--budget 0.5]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pydoc_data.topics import topics

import torch

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as e:  # (an optional extra)
    raise SystemExit(f"this example needs transformers: pip install 'sortednet[transformers]' ({e})") from e

import sortednet as sn


def data(ctx: int, batch: int, steps: int, seed: int = 0):
    """Character ids of the pydoc text: ``steps`` training batches, 8 held-out batches, the vocabulary."""
    text = "\n".join(topics[k] for k in sorted(topics))
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([stoi[c] for c in text])
    cut = int(0.9 * len(ids))  # the last 10% is held out
    g = torch.Generator().manual_seed(seed)

    def draw(part: torch.Tensor, n: int) -> list[torch.Tensor]:
        starts = torch.randint(0, len(part) - ctx, (n, batch), generator=g)
        return [torch.stack([part[s:s + ctx] for s in row]) for row in starts]

    return draw(ids[:cut], steps), draw(ids[cut:], 8), stoi


@torch.no_grad()
def held_out(model: torch.nn.Module, val: list[torch.Tensor]) -> float:
    """Mean held-out loss (nats/char) of the active sub-model."""
    model.eval()
    loss = sum(model(input_ids=x, labels=x).loss.item() for x in val) / len(val)
    model.train()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--budget", type=float, default=0.5, help="parameter budget, fraction of the full model")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if not 0 < args.budget <= 1:
        ap.error(f"--budget is a fraction of the full model's parameters, in (0, 1]: got {args.budget}")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: more threads only add synchronisation
    train, val, stoi = data(ctx=64, batch=16, steps=args.steps)
    itos = {i: c for c, i in stoi.items()}
    cfg = LlamaConfig(vocab_size=len(stoi), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)  # characters only: no '\n' stops
    model = LlamaForCausalLM(cfg)

    # 1. nest: ffn {64, 128, 256} x query heads {2, 4} (whole key/value groups) x depth {2, 3, 4}
    nest = sn.from_transformers(model, ffn=[0.25, 0.5], heads=[0.5], depth=[2, 3])
    print(f"{len(nest.submodels)} sub-models, {nest.cost(nest.smallest):,} to {nest.cost(nest.largest):,} params")
    if args.budget * nest.cost(nest.largest) < nest.cost(nest.smallest):  # (said before training, not after it)
        share = math.ceil(1e4 * nest.cost(nest.smallest) / nest.cost(nest.largest)) / 1e4  # (rounded up: it fits)
        ap.error(f"--budget {args.budget} is below the smallest sub-model's share of the parameters: give at "
                 f"least {share}")

    # 2. sorted training: largest + smallest + 1 random sub-model per step, one backward each
    sampler = sn.Sampler(nest.submodels, k=3, strategy="sandwich", seed=0)
    opt = torch.optim.AdamW(nest.trainable_parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(  # short warmup, then cosine decay
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    t0 = time.perf_counter()
    for step, x in enumerate(train):
        sn.accumulate(nest, sampler.draw(step), lambda x=x: model(input_ids=x, labels=x).loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s")

    # 3. budget table: cost and held-out loss of every sub-model (kept on the nest for pick)
    # (latency: the median of 20 timed forwards each, on this machine as it is: on a busy machine, sub-models a few
    # per cent apart in size can swap places; pick by params or flops where that matters)
    prof = nest.profile(val[0][:1], score=lambda sub: -held_out(model, val), metrics=("params", "flops", "latency"),
                        progress=False)
    print("score = minus held-out loss (nats/char)")
    print(prof.to_markdown())

    # 4. the best-scoring sub-model within the parameter budget, exported as a stock LlamaForCausalLM
    sub = nest.pick(params=args.budget * nest.cost(nest.largest))
    with tempfile.TemporaryDirectory() as tmp:
        nest.export(sub).save_pretrained(tmp)  # a LlamaForCausalLM whose config has the smaller shapes
        small = LlamaForCausalLM.from_pretrained(tmp).eval()
    n = sum(p.numel() for p in small.parameters())
    print(f"picked {sub}: {n:,} params ({n / nest.cost(nest.largest):.0%} of the full model), "
          f"held-out loss {held_out(small, val):.3f} nats/char")
    prompt = torch.tensor([[stoi[c] for c in "The import statement"]])
    torch.manual_seed(0)  # sampled (greedy decoding of a tiny char model repeats itself)
    out = small.generate(prompt, max_new_tokens=120, do_sample=True, temperature=0.8, top_k=20)
    print("".join(itos[int(i)] for i in out[0]))


if __name__ == "__main__":
    main()
