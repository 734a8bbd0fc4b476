"""Nested Llama-family LM over FFN width x attention heads x depth vs its twins trained alone.

A character-level Llama decoder (``transformers.LlamaForCausalLM`` from a
config, grouped-query attention) learns Python's bundled documentation text
(``pydoc_data.topics``; the last 10% is held out). ``sn.from_transformers``
nests it over ffn {1/4, 1/2, 1} x query heads {1/2, 1} (whole key/value
groups) x depth {3, 4, 6}: 18 sub-models. Every method runs the same number of
optimizer steps on the same batches (AdamW, warmup + cosine, clip 1.0):

  (a) sortednet: ``sn.Sampler`` + ``sn.accumulate`` (sandwich / uniform, k = 4;
      a SoFT variant that reads the three depth exits in one pass; in-place
      distillation; loss weights per sub-model ``Sampler(loss_weights="cost")``);
  (b) twins: 6 sub-models (smallest to largest, all three dimensions) trained alone from scratch;
  (c) the full model trained alone, then sliced (it is also the largest twin);
  (d) MatFormer: nested FFN only, all granularities every step.

Compute is counted in forward FLOPs of the passes each method ran (training ~
3x forward for all alike) relative to training the largest model once.
Writes benchmarks/results/nested_lm.{md,json,png} (``--quick``: under /tmp).

    nice -n 10 .venv/bin/python benchmarks/nested_lm.py --jobs 2     # 300 steps: ~55 min on 2 cores at load ~11
    nice -n 10 .venv/bin/python benchmarks/nested_lm.py --methods "(a) sorted uniform k=4"  # one method -> /tmp
    .venv/bin/python benchmarks/nested_lm.py --quick --jobs 2        # smoke run, ~1 min
    .venv/bin/python benchmarks/nested_lm.py --render                # rewrite .md/.png from the .json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nested_lm_report as report  # noqa: E402
from common import RESULTS  # noqa: E402
from soft_lm import batches, load_text  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import sortednet as sn  # noqa: E402
from sortednet.integrations import soft_loss  # noqa: E402

FFN, HEADS, DEPTH = (0.25, 0.5), (0.5,), (3, 4)  # the full size is added by from_transformers
K = 4
TWINS = ("ffn=128,heads=2,depth=3", "ffn=256,heads=2,depth=3", "ffn=128,heads=4,depth=4",
         "ffn=512,heads=2,depth=4", "ffn=256,heads=4,depth=6", "ffn=512,heads=4,depth=6")
FULL = "(c) full alone, then sliced"
METHODS: dict[str, dict[str, Any]] = {
    "(a) sorted sandwich k=4 + SoFT depth": {"strategy": "sandwich", "k": K, "soft": True},
    "(a) sorted sandwich k=4 + SoFT depth, small first": {"strategy": "sandwich", "k": K, "soft": True,
                                                          "small_first": 1 / 3},
    "(a) sorted sandwich k=4 + SoFT depth, loss weights small": {"strategy": "sandwich", "k": K, "soft": True,
                                                                 "loss_weights": "small"},
    "(a) sorted sandwich k=4, small first, loss weights small": {"strategy": "sandwich", "k": K,
                                                                 "small_first": 1 / 3, "loss_weights": "small"},
    "(a) sorted sandwich k=4": {"strategy": "sandwich", "k": K},
    "(a) sorted sandwich k=4 + distill": {"strategy": "sandwich", "k": K, "distill": True},
    "(a) sorted uniform k=4": {"strategy": "uniform", "k": K},
    "(a) sorted sandwich k=4, loss weights ∝ params": {"strategy": "sandwich", "k": K, "loss_weights": "cost"},
    "(d) MatFormer (FFN only, all 3 every step)": {"strategy": "all", "matformer": True},
    FULL: {"twin": "largest"},
    **{f"(b) twin {t}": {"twin": t} for t in reversed(TWINS[:-1])},  # most expensive first
}


def llama(vocab: int, a: argparse.Namespace, *, ffn: int | None = None, heads: int | None = None,
          depth: int | None = None) -> LlamaForCausalLM:
    """The full model, or a smaller standalone one of one sub-model's shapes (same head size)."""
    h = heads or a.heads
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=ffn or 4 * a.hidden,
                      num_hidden_layers=depth or a.layers, num_attention_heads=h,
                      num_key_value_heads=h * a.kv_heads // a.heads, head_dim=a.hidden // a.heads,
                      max_position_embeddings=a.ctx, attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg)


def shape_of(sub: str) -> dict[str, int]:
    """``"ffn=128,heads=2,depth=3"`` -> keyword arguments of :func:`llama`."""
    return {k: int(v) for k, v in (p.split("=") for p in sub.split(","))}


def nest_of(model: LlamaForCausalLM) -> sn.Nest:
    return sn.from_transformers(model, ffn=list(FFN), heads=list(HEADS), depth=list(DEPTH))


def schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def sampler_for(nest: sn.Nest, spec: dict[str, Any], seed: int, steps: int) -> tuple[sn.Sampler, list[int] | None]:
    """The method's sampler and, for SoFT, the depth exits read in each pass."""
    full_depth = [s for s in nest.submodels if s["depth"] == nest.largest["depth"]]
    if spec.get("matformer"):
        subs = [s for s in full_depth if s["heads"] == nest.largest["heads"]]
        return sn.Sampler(subs, strategy="all", seed=seed), None
    kw = {k: v for k, v in spec.items() if k in ("k", "weights", "loss_weights")}
    if "small_first" in spec:  # a fraction of the run
        kw["small_first"] = int(spec["small_first"] * steps)
    if spec.get("soft"):
        exits = sorted({s["depth"] for s in nest.submodels})
        kw["k"] = min(spec["k"], len(full_depth))
        return sn.Sampler(full_depth, strategy=spec["strategy"], seed=seed, **kw), exits
    return sn.Sampler(nest, strategy=spec["strategy"], seed=seed, **kw), None


@torch.no_grad()
def held_out(model: LlamaForCausalLM, val: list[torch.Tensor], nest: sn.Nest | None = None) -> dict[str, float]:
    """Mean held-out loss (nats/char) of every sub-model of ``nest`` (or of the plain model)."""
    model.eval()
    out = {}
    for s in nest.submodels if nest is not None else [None]:
        if s is None:
            out["model"] = sum(model(input_ids=x, labels=x).loss.item() for x in val) / len(val)
            continue
        with nest.use(s):
            out[str(s)] = sum(model(input_ids=x, labels=x).loss.item() for x in val) / len(val)
    model.train()
    return out


def run(name: str, a: argparse.Namespace) -> dict[str, Any]:
    """Train one method from its fixed initialisation; held-out losses, passes run, seconds."""
    torch.set_num_threads(1)
    train_ids, val_ids, vocab = load_text()
    tr = batches(train_ids, a.steps, a.batch, a.ctx, a.seed)
    va = batches(val_ids, a.val_batches, a.batch, a.ctx, a.seed + 1)
    spec = METHODS[name]
    torch.manual_seed(a.seed)
    twin = spec.get("twin")
    if twin and twin != "largest":
        model = llama(vocab, a, **shape_of(twin))
    else:
        model = llama(vocab, a)
    nest = None if twin else nest_of(model)
    opt = torch.optim.AdamW(model.parameters() if nest is None else nest.trainable_parameters(), lr=a.lr,
                            weight_decay=0.01)
    sched = schedule(opt, a.steps)
    passes: dict[str, int] = {}
    sampler, exits = sampler_for(nest, spec, a.seed, a.steps) if nest is not None else (None, None)
    distill = sn.Distill(temperature=1.0, alpha=a.distill_alpha) if spec.get("distill") else None
    extra = {k: spec[k] for k in ("loss_weights",) if k in spec}
    model.train()
    t0 = time.perf_counter()
    for step, x in enumerate(tr):
        if nest is None:
            model(input_ids=x, labels=x).loss.backward()
            key = twin if twin != "largest" else TWINS[-1]
            passes[key] = passes.get(key, 0) + 1
        else:
            subs = sampler.draw(step)
            if exits:
                def closure(x: torch.Tensor = x) -> torch.Tensor:
                    return soft_loss(nest, x, exits=exits).loss
            else:
                def closure(x: torch.Tensor = x) -> Any:
                    out = model(input_ids=x, labels=x)
                    return (out.loss, out.logits) if distill else out.loss
            sn.accumulate(nest, subs, closure, distill=distill,
                          **({"weights": sampler.loss_weights_for(subs)} if extra else {}))
            for s in subs:
                key = str(s) + (" +exits" if exits else "")
                passes[key] = passes.get(key, 0) + 1
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if a.verbose and step % 100 == 0:
            print(f"  {name} step {step}", flush=True)
    sec = time.perf_counter() - t0
    if twin == "largest":
        nest = nest_of(model)
    losses = held_out(model, va, nest)
    if twin and twin != "largest":
        losses = {twin: losses["model"]}
    shown = TWINS[-1] if TWINS[-1] in losses else next(iter(losses))  # (a twin holds its own loss alone)
    print(f"{name}: {sec:.0f} s, held-out loss of {shown} {losses[shown]:.4f}", flush=True)
    return {"name": name, "sec": sec, "passes": passes, "loss": losses}


def flops_table(a: argparse.Namespace) -> tuple[dict[str, float], dict[str, int]]:
    """Forward FLOPs of one batch for every sub-model (plain and with SoFT exits) and parameter counts."""
    _, _, vocab = load_text()
    torch.manual_seed(a.seed)
    model = llama(vocab, a)
    nest = nest_of(model)
    x = torch.zeros(a.batch, a.ctx, dtype=torch.long)
    exits = sorted({s["depth"] for s in nest.submodels})
    fl, params = {}, {}
    # attention on the math kernel: its score matmuls are plain bmm calls that FlopCounterMode counts (the
    # CPU's fused attention kernel has no formula in its table and would count as zero)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for s in nest.submodels:
            params[str(s)] = int(nest.cost(s, "params"))
            with nest.use(s), FlopCounterMode(display=False) as fc:
                model(input_ids=x, labels=x)
            fl[str(s)] = float(fc.get_total_flops())
            if s["depth"] == nest.largest["depth"]:
                with nest.use(s), FlopCounterMode(display=False) as fc:
                    soft_loss(nest, x, exits=exits)
                fl[str(s) + " +exits"] = float(fc.get_total_flops())
    return fl, params


def check_twins(a: argparse.Namespace, params: dict[str, int]) -> None:
    """Each twin has exactly the parameter count of its sub-model in the nest (same shapes)."""
    _, _, vocab = load_text()
    for t in TWINS:
        n = sum(p.numel() for p in llama(vocab, a, **shape_of(t)).parameters())
        if n != params[t]:
            raise SystemExit(f"twin {t} has {n} parameters, its sub-model {params[t]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--distill-alpha", type=float, default=0.5)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one method each, 1 thread each)")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of methods (default all)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, results under /tmp")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--render", action="store_true", help="rewrite nested_lm.md / .png from nested_lm.json")
    ap.add_argument("--json", default=None, help="write the results to this JSON file instead (no report)")
    ap.add_argument("--recount-flops", action="store_true",
                    help="count the FLOPs table of nested_lm.json again (same config, no training) and re-render")
    ap.add_argument("--merge", nargs="*", default=None,
                    help="add the methods of these JSON files (same config) to nested_lm.json and re-render")
    a = ap.parse_args()
    out_dir = tempfile.mkdtemp(prefix="nested_lm_") if a.quick else RESULTS
    if a.recount_flops:  # the FLOPs of each sub-model depend on the config alone, never on the training
        path = os.path.join(RESULTS, "nested_lm.json")
        res = report.load(path)
        cfg = argparse.Namespace(**{**vars(a), **res["meta"]["cfg"]})
        torch.set_num_threads(1)
        res["meta"]["flops"], _ = flops_table(cfg)
        res["meta"]["flops_counted"] = "attention on the math kernel (score matmuls counted)"
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        return report.render(res, RESULTS)
    if a.render or a.merge:
        res = report.load(os.path.join(RESULTS, "nested_lm.json"))
        for path in a.merge or ():
            other = report.load(path)
            same = [k for k in res["meta"]["cfg"] if k not in ("jobs", "json", "merge", "render", "recount_flops")]
            differ = {k: (other["meta"]["cfg"].get(k), res["meta"]["cfg"][k]) for k in same
                      if other["meta"]["cfg"].get(k) != res["meta"]["cfg"][k]}
            if differ:  # (anything that changes what a method trains on, or how)
                raise SystemExit(f"{path} ran another configuration than the results: {differ} (its, theirs)")
            res["methods"].update(other["methods"])
            res["meta"].setdefault("merged", []).append({"file": os.path.basename(path),
                                                         "methods": list(other["methods"]),
                                                         "wall_s": other["meta"]["wall_s"]})
        if a.merge:
            with open(os.path.join(RESULTS, "nested_lm.json"), "w") as f:
                json.dump(res, f, indent=1)
        return report.render(res, RESULTS)
    if a.quick:
        a.steps, a.val_batches = min(a.steps, 20), min(a.val_batches, 2)
    if a.methods and not a.json:  # a subset never overwrites the full results: merge it with --merge
        a.json = os.path.join(tempfile.mkdtemp(prefix="nested_lm_"), "nested_lm.json")
    torch.set_num_threads(1)
    fl, params = flops_table(a)
    check_twins(a, params)
    names = a.methods or list(METHODS)
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {list(METHODS)}")
    t0 = time.perf_counter()
    if a.jobs > 1:
        with mp.get_context("spawn").Pool(a.jobs) as pool:
            results = pool.starmap(run, [(n, a) for n in names], chunksize=1)
    else:
        results = [run(n, a) for n in names]
    wall = time.perf_counter() - t0
    cfg = {k: v for k, v in vars(a).items() if k not in ("quick", "verbose", "render", "methods")}
    res = {"meta": {"cfg": cfg, "wall_s": wall, "threads_per_job": 1, "k": K, "twins": list(TWINS),
                    "command": "python " + " ".join(sys.argv),
                    "full": FULL, "flops": fl, "params": params, "quick": a.quick},
           "methods": {r["name"]: r for r in results}}
    with open(a.json or os.path.join(out_dir, "nested_lm.json"), "w") as f:
        json.dump(res, f, indent=1)
    if a.json:
        return print(f"wall {wall:.0f} s; written to {a.json}")
    report.render(res, out_dir)
    print(f"wall {wall:.0f} s; written under {out_dir}")


if __name__ == "__main__":
    main()
