"""Self-speculative decoding: a SoFT-trained model drafts with its own shallow exits.

A small character-level Llama-family model (grouped-query attention) is
trained for a short while with SoFT (all depth exits in one pass) on Python's
own documentation text, then decodes greedily with each of its exits as the
draft (sharing the KV cache), with a cascade of two exits, and with an
adaptive draft length. Every output equals plain greedy decoding; the table
shows the speed-up (against greedy ``generate`` of the full model exported as a
stock ``LlamaForCausalLM``) and the acceptance. A model trained this briefly
repeats itself, and repetitive text is easy to draft: the shorter the training
(``--steps``), the higher the acceptance, and a better-trained model accepts
less and gains less (benchmarks/results/speculative.md measures that). No
downloads; a few minutes on a CPU.

    PYTHONPATH=src python examples/speculative.py [--steps 300]
"""

from __future__ import annotations

import argparse
import time
from pydoc_data.topics import topics

import torch

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as e:  # (an optional extra)
    raise SystemExit(f"this example needs transformers: pip install 'sortednet[transformers]' ({e})") from e

import sortednet as sn
from sortednet.integrations import soft_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    if args.steps < 0 or args.new < 1:
        ap.error(f"--steps must be at least 0 and --new at least 1, got {args.steps} and {args.new}")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    text = "\n".join(topics[k] for k in sorted(topics))
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    itos = {i: c for c, i in stoi.items()}
    data = torch.tensor([stoi[c] for c in text])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(stoi), hidden_size=128, intermediate_size=344,
                                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=None))
    nest = sn.from_transformers(model, depth=[1, 2, 3, 4])

    # SoFT: the loss of every exit (depth 1, 2, 3, 4 and 6) from one forward pass
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        starts = torch.randint(0, int(0.9 * len(data)) - 65, (16,), generator=g)
        x = torch.stack([data[s:s + 64] for s in starts])
        out = soft_loss(nest, x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  " + "  ".join(f"exit {e}: {v.item():.2f}" for e, v in out.losses.items()))
    model.eval()

    prompt = torch.tensor([[stoi[c] for c in "The import statement"]])

    def timed(fn, repeat=3):
        fn()  # warm-up
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t)
        return res, min(times)

    stock = nest.export(nest.largest).eval()  # the baseline: a plain model, no wrapper in its forward
    plain, t_plain = timed(lambda: stock.generate(prompt, max_new_tokens=args.new, do_sample=False))
    print("plain greedy:", repr("".join(itos[int(i)] for i in plain[0])))
    print(f"\n{'draft':38s} {'speed-up':>8s} {'passes/token':>12s} {'accepted':>9s} {'mean acc.':>9s}  same")
    runs = {f"depth={d} (shared cache)": dict(draft=f"depth={d}") for d in (1, 2, 3, 4)}
    runs["depth=2 (separate caches)"] = dict(draft="depth=2", share_cache=False)
    runs["cascade depth 1 -> 3, threshold 0.6"] = dict(draft=nest, exits=["depth=1", "depth=3"],
                                                      thresholds=[0.6, 0])
    runs["depth=2, num_draft_tokens='auto'"] = dict(draft="depth=2", num_draft_tokens="auto")
    for name, kw in runs.items():
        out, t = timed(lambda kw=kw: sn.speculative_generate(nest, prompt, max_new_tokens=args.new, **kw))
        s = out.stats
        print(f"{name:38s} {t_plain / t:7.2f}x {s.target_forwards / s.new_tokens:12.3f} "
              f"{s.acceptance_rate:9.2f} {s.mean_accepted:9.2f}  {torch.equal(out.sequences, plain)}")
    per_exit = sn.speculative_generate(nest, prompt, max_new_tokens=args.new, **runs[
        "cascade depth 1 -> 3, threshold 0.6"]).stats.exits
    print("\ncascade, per exit:", {k: f"{e.accepted}/{e.drafted} accepted" for k, e in per_exit.items()})


if __name__ == "__main__":
    main()
