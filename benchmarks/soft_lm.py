"""SoFT vs standard training + early exit vs separately trained shallow models.

A small GPT-2 (transformers' GPT2LMHeadModel) learns a character-level LM of
Python's bundled documentation text (``pydoc_data.topics``); the last 10% of
the text is held out. Every run sees the same batches for the same number of
optimizer steps (fixed compute budget in steps and tokens):

  (a) standard: train the full model, then read every exit through the shared
      final norm + LM head (what early exit gives without SoFT);
  (b) SoFT: ``soft_loss`` over exits at every 2 layers, one forward per step;
  (c) separate: one model per exit depth, each trained alone.

Writes benchmarks/results/soft_lm.md, soft_lm.json and soft_lm.png.

    PYTHONPATH=src python benchmarks/soft_lm.py            # about 20 minutes on one CPU core
    PYTHONPATH=src python benchmarks/soft_lm.py --steps 20 --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, interleaved, table, write  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import sortednet as sn  # noqa: E402
from sortednet.integrations import soft_loss  # noqa: E402


def load_text() -> tuple[torch.Tensor, torch.Tensor, int]:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(stoi)


def batches(data: torch.Tensor, n: int, batch: int, ctx: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - ctx - 1, (n, batch), generator=g)
    return [torch.stack([data[s:s + ctx] for s in row]) for row in starts]


def make_model(vocab: int, layers: int, args: argparse.Namespace) -> GPT2LMHeadModel:
    torch.manual_seed(args.seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=args.width, n_layer=layers, n_head=args.heads, n_positions=args.ctx,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


class Run:
    """One training run: AdamW with warmup + cosine decay; ``exits``: SoFT loss, else standard."""

    def __init__(self, model: GPT2LMHeadModel, args: argparse.Namespace, exits: list[int] | None,
                 steps: int) -> None:
        self.model, self.exits = model, exits
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        warm = max(1, steps // 20)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        self.nest = sn.from_transformers(model, depth=exits) if exits else None
        model.train()

    def step(self, x: torch.Tensor) -> float:
        m = self.model
        loss = soft_loss(self.nest, x, exits=self.exits).loss if self.nest else m(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def train(model: GPT2LMHeadModel, train_batches: list[torch.Tensor], args: argparse.Namespace,
          exits: list[int] | None) -> float:
    """Train for len(train_batches) steps; returns mean seconds per step."""
    run = Run(model, args, exits, len(train_batches))
    t0 = time.perf_counter()
    for i, x in enumerate(train_batches):
        loss = run.step(x)
        if args.verbose and i % 100 == 0:
            print(f"  step {i} loss {loss:.3f}", flush=True)
    sec = (time.perf_counter() - t0) / len(train_batches)
    if run.nest is not None:
        run.nest.unwrap()
    return sec


def step_timing(vocab: int, batch: list[torch.Tensor], exits: list[int], args: argparse.Namespace) -> dict:
    """Median ms per training step (forward, backward, AdamW) of each run, timed round-robin
    so that load from other processes hits every run alike."""
    runs = {"standard": (args.layers, None), "soft": (args.layers, exits),
            **{f"separate_{d}": (d, None) for d in exits[:-1]}}
    fns = {}
    for name, (layers, soft) in runs.items():
        model = make_model(vocab, layers, args)
        fns[name] = (lambda r: lambda: r.step(batch[0]))(Run(model, args, soft, 10**6))
    return {k: round(v * 1e3, 1) for k, v in interleaved(fns, repeat=args.timing_repeat, warmup=2).items()}


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, val_batches: list[torch.Tensor], exits: list[int]) -> dict[int, float]:
    """Validation loss at each exit (final norm + shared LM head after block e)."""
    model.eval()
    tot = {e: 0.0 for e in exits}
    for x in val_batches:
        for e, v in soft_loss(model, x, exits=exits).losses.items():
            tot[e] += v.item()
    return {e: tot[e] / len(val_batches) for e in exits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 2000; --quick: 20)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-batches", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timing-repeat", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="smoke run (20 steps unless --steps): do not write results")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--replot", action="store_true", help="rewrite the .md and .png from results/soft_lm.json")
    args = ap.parse_args()
    args.steps = args.steps if args.steps is not None else 20 if args.quick else 2000
    if args.replot:
        with open(os.path.join(RESULTS, "soft_lm.json")) as f:
            return report(json.load(f))
    torch.set_num_threads(args.threads)
    train_ids, val_ids, vocab = load_text()
    tr = batches(train_ids, args.steps, args.batch, args.ctx, args.seed)
    va = batches(val_ids, args.val_batches, args.batch, args.ctx, args.seed + 1)
    exits = list(range(2, args.layers + 1, 2))
    every = list(range(1, args.layers + 1))
    res: dict[str, dict] = {}
    print(f"chars: train {len(train_ids)}, val {len(val_ids)}, vocab {vocab}; exits {exits}", flush=True)
    for name, layers, soft in [("standard", args.layers, None), ("soft", args.layers, exits)] + \
            [(f"separate_{d}", d, None) for d in exits[:-1]]:
        model = make_model(vocab, layers, args)
        sec = train(model, tr, args, soft)
        losses = evaluate(model, va, every if layers == args.layers else [layers])
        res[name] = {"sec_per_step": sec, "val_loss": losses}
        print(f"{name}: {sec * 1e3:.0f} ms/step, val loss {losses}", flush=True)
    res["timing_ms"] = step_timing(vocab, tr[:1], exits, args)
    print(f"interleaved ms/step: {res['timing_ms']}", flush=True)
    res["separate_" + str(args.layers)] = {"sec_per_step": res["standard"]["sec_per_step"],
                                           "val_loss": {args.layers: res["standard"]["val_loss"][args.layers]}}
    if args.quick:
        print("quick run: nothing written (drop --quick for the results file)")
        return
    cfg = {k: v for k, v in vars(args).items() if k not in ("quick", "verbose", "replot")}
    res["meta"] = {"cfg": cfg, "exits": exits, "vocab": vocab, "n_train": len(train_ids), "n_val": len(val_ids)}
    write("soft_lm.json", json.dumps(res, indent=1))
    report(res)


def report(res: dict) -> None:
    """Write soft_lm.md and soft_lm.png from the results (also ``--replot`` from soft_lm.json)."""
    meta = res["meta"]
    cfg, exits, vocab, n_train, n_val = meta["cfg"], meta["exits"], meta["vocab"], meta["n_train"], meta["n_val"]
    every = list(range(1, cfg["layers"] + 1))
    res = {k: v if k in ("meta", "timing_ms") else {**v, "val_loss": {int(e): x for e, x in v["val_loss"].items()}}
           for k, v in res.items()}
    std, soft = res["standard"]["val_loss"], res["soft"]["val_loss"]
    rows = []
    for e in every:
        sep = res.get(f"separate_{e}", {}).get("val_loss", {}).get(e)
        rows.append([e, std[e], math.exp(std[e]), soft[e], math.exp(soft[e]),
                     "-" if sep is None else sep, "-" if sep is None else math.exp(sep),
                     "-" if sep is None else f"{100 * (soft[e] / sep - 1):+.1f}%",
                     f"{100 * (soft[e] / std[e] - 1):+.1f}%"])
    head = ["exit (blocks)", "(a) standard loss", "(a) ppl", "(b) SoFT loss", "(b) ppl", "(c) separate loss",
            "(c) ppl", "SoFT vs separate", "SoFT vs standard"]
    times = [[k, f"{res[k]['sec_per_step'] * 1e3:.0f}", f"{v:.1f}"] for k, v in res["timing_ms"].items()]
    sep_d = [e for e in every if f"separate_{e}" in res]
    text = (f"# SoFT vs standard training + early exit vs separate shallow models\n\n"
            f"Written by `benchmarks/soft_lm.py` (character-level GPT-2 on `pydoc_data.topics`, vocab {vocab}, "
            f"{n_train} train / {n_val} held-out characters). Config: `{json.dumps(cfg)}`. Every run: the same "
            f"{cfg['steps']} steps x {cfg['batch']} x {cfg['ctx']} tokens. SoFT exits: {exits}. Validation loss "
            f"(nats/char) over {cfg['val_batches']} held-out batches; every exit is read through the model's own "
            f"final LayerNorm and shared LM head. Exits not trained by SoFT (odd depths) are shown for reference.\n\n"
            + table(head, rows) + "\n\nTraining time per step (forward + backward + AdamW; CPU, "
            f"{cfg['threads']} thread, on a machine shared with other jobs). The wall-clock mean over the run is "
            "noisy; the interleaved median (all runs timed round-robin on one batch) is the fair comparison:\n\n"
            + table(["run", "mean ms/step during training", "interleaved median ms/step"], times)
            + "\n\n![val loss per exit](soft_lm.png)\n")
    write("soft_lm.md", text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(every, [std[e] for e in every], "o-", label="(a) standard + early exit")
    ax.plot(every, [soft[e] for e in every], "s-", label="(b) SoFT")
    ax.plot(sep_d, [res[f"separate_{e}"]["val_loss"][e] for e in sep_d], "^--", label="(c) separate models")
    ax.set_xlabel("exit depth (blocks)")
    ax.set_ylabel("held-out loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("char-level GPT-2 on pydoc_data.topics")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "soft_lm.png"), dpi=120)
    print(open(os.path.join(RESULTS, "soft_lm.md")).read())


if __name__ == "__main__":
    main()
