"""Rank nesting on a pretrained-like MLP (sklearn digits) and latency of factored export.

    python benchmarks/rank.py            # 3 seeds (~1-3 min on 2 busy cores)
    python benchmarks/rank.py --quick    # smoke test: 1 seed, few epochs, writes under /tmp
    python benchmarks/rank.py --render   # re-render rank.md and docs/rank.md from rank.json

An MLP 64 -> 128 -> 128 -> 10 is first trained normally ("pretrained"). Then,
per rank r of fc1 and fc2 (one Rank dimension over both):

(a) plain truncated SVD, no training (``Rank(mode="svd")`` as wrapped);
(b) the same SVD initialisation after sorted rank training: each step
    accumulates the gradients of the smallest, the largest and one random
    rank (a local loop of ``nest.use`` + ``backward``);
(b0) control: SVD initialisation trained at the largest rank only, evaluated
    truncated (what nested training buys);
(c) DyLoRA: the pretrained model adapted to left-right mirrored digits with
    nested-rank LoRA adapters on fc1/fc2 (base frozen, ranks sampled as in b);
(c0) control: LoRA trained at the largest rank only, evaluated truncated.

Latency: one 1024 x 1024 Linear exported at rank r (two plain Linears) vs the
dense layer, batch 64 and batch 1, one thread, round-robin medians.
Writes benchmarks/results/rank.md and rank.json, and the accuracy tables into
docs/rank.md between the ``rank`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, interleaved, table  # noqa: E402

import sortednet as sn  # noqa: E402

RANKS = [1, 2, 4, 8, 16, 32, 64]
LORA_RANKS = [1, 2, 4, 8, 16]


def data(seed: int, mirror: bool = False):
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    if mirror:
        X = X.view(-1, 8, 8).flip(-1).reshape(-1, 64)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(1000 + seed))
    tr, te = perm[: 1347], perm[1347:]
    return X[tr], y[tr], X[te], y[te]


class MLP(nn.Module):
    def __init__(self, h: int = 128) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, h), nn.Linear(h, h), nn.Linear(h, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def batches(n: int, bs: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    return [perm[i:i + bs] for i in range(0, n, bs)]


def train(model: nn.Module, params, X, y, epochs: int, seed: int, lr: float, nest=None, ranks=None, dim="rank"):
    """Adam; with ``nest`` each step accumulates smallest + largest + one random rank
    (or only ``ranks`` when it has one entry)."""
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(batches(len(X), 64, g)))
    for _ in range(epochs):
        for idx in batches(len(X), 64, g):
            if nest is None:
                F.cross_entropy(model(X[idx]), y[idx]).backward()
            else:
                pick = ranks if len(ranks) == 1 else sorted({ranks[0], ranks[-1],
                                                              ranks[int(torch.randint(len(ranks), (1,), generator=g))]})
                for r in pick:
                    with nest.use({dim: r}):
                        (F.cross_entropy(model(X[idx]), y[idx]) / len(pick)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()


@torch.no_grad()
def accuracy(model, X, y) -> float:
    return (model(X).argmax(-1) == y).float().mean().item()


def per_rank(nest, model, X, y, ranks, dim="rank") -> list[float]:
    out = []
    for r in ranks:
        with nest.use({dim: r}):
            out.append(accuracy(model, X, y))
    return out


def one_seed(seed: int, quick: bool) -> dict:
    ep_pre, ep_ft = (8, 4) if quick else (60, 30)
    torch.manual_seed(seed)
    Xtr, ytr, Xte, yte = data(seed)
    pre = MLP()
    t0 = time.perf_counter()
    train(pre, pre.parameters(), Xtr, ytr, ep_pre, seed, 3e-3)
    res = {"dense": accuracy(pre, Xte, yte), "time_pretrain_s": time.perf_counter() - t0}

    def svd_nest():
        model = MLP()
        model.load_state_dict(pre.state_dict())
        return model, sn.wrap(model, sn.Rank("rank", RANKS, targets=["fc1", "fc2"]))

    model, nest = svd_nest()
    res["svd_params"] = [nest.cost({"rank": r}) for r in RANKS]
    res["a_truncated_svd"] = per_rank(nest, model, Xte, yte, RANKS)
    t0 = time.perf_counter()
    train(model, nest.trainable_parameters(), Xtr, ytr, ep_ft, seed, 1e-3, nest, RANKS)
    res["time_sorted_s"] = time.perf_counter() - t0
    res["b_sorted_rank"] = per_rank(nest, model, Xte, yte, RANKS)
    model, nest = svd_nest()
    train(model, nest.trainable_parameters(), Xtr, ytr, ep_ft, seed, 1e-3, nest, [RANKS[-1]])
    res["b0_largest_only"] = per_rank(nest, model, Xte, yte, RANKS)

    Mtr, mtr, Mte, mte = data(seed, mirror=True)
    res["mirrored_pretrained"] = accuracy(pre, Mte, mte)
    for key, ranks in (("c_dylora", LORA_RANKS), ("c0_lora_largest_only", [LORA_RANKS[-1]])):
        torch.manual_seed(seed)
        model = MLP()
        model.load_state_dict(pre.state_dict())
        nest = sn.wrap(model, sn.Rank("rank", LORA_RANKS, targets=["fc1", "fc2"], mode="lora"))
        trainable = nest.trainable_parameters()
        res[f"{key}_trainable"] = sum(p.numel() for p in trainable)
        t0 = time.perf_counter()
        train(model, trainable, Mtr, mtr, ep_ft, seed, 3e-3, nest, ranks)
        res[f"time_{key}_s"] = time.perf_counter() - t0
        res[key] = per_rank(nest, model, Mte, mte, LORA_RANKS)
        frozen = [m._parameters["weight"] for m in (model.fc1, model.fc2)]
        res[f"{key}_base_unchanged"] = all(torch.equal(w, pre.get_parameter(n)) for w, n in
                                           zip(frozen, ("fc1.weight", "fc2.weight")))
    return res


def latency(quick: bool) -> list[list]:
    torch.manual_seed(0)
    d = 1024
    layer = nn.Linear(d, d)
    ranks = [16, 64, 128, 256, 384, 512]
    nest = sn.wrap(nn.Linear(d, d), sn.Rank("r", ranks, targets="", export="factored"))
    exported = {r: nest.export({"r": r}) for r in ranks}
    rows = []
    for bs in (64, 1):
        x = torch.randn(bs, d)
        fns = {"dense": lambda: layer(x), **{r: (lambda e=e: e(x)) for r, e in exported.items()}}
        with torch.no_grad():
            t = interleaved(fns, repeat=15 if quick else 60, inner=5 if bs == 64 else 50, clock=time.thread_time)
        for r in ranks:
            rows.append([bs, r, nest.cost({"r": r}), round(nest.cost({"r": r}) / (d * d + d), 3),
                         t[r] * 1e6, t["dense"] * 1e6, round(t["dense"] / t[r], 2)])
    return rows


def mean_std(runs: list[dict], key: str) -> list[str]:
    cols = list(zip(*(r[key] for r in runs)))
    if len(runs) == 1:
        return [f"{100 * c[0]:.1f}" for c in cols]
    return [f"{100 * statistics.mean(c):.1f} ± {100 * statistics.stdev(c):.1f}" for c in cols]


def report(runs: list[dict], lat: list[list], args) -> str:
    n = len(runs)
    frozen = all(r["c_dylora_base_unchanged"] and r["c0_lora_largest_only_base_unchanged"] for r in runs)
    mean = lambda k: statistics.mean(r[k] for r in runs)  # noqa: E731
    svd = [["(a) truncated SVD, no training", *mean_std(runs, "a_truncated_svd")],
           ["(b) SVD init + sorted rank training", *mean_std(runs, "b_sorted_rank")],
           ["(b0) SVD init + training at rank 64 only", *mean_std(runs, "b0_largest_only")]]
    lora = [["(c) DyLoRA (nested ranks sampled)", *mean_std(runs, "c_dylora")],
            ["(c0) LoRA trained at rank 16 only", *mean_std(runs, "c0_lora_largest_only")]]
    return "\n\n".join([
        "# Rank nesting: ordered low-rank factorisation and DyLoRA on sklearn digits",
        f"Command: `python benchmarks/rank.py{' --quick' if args.quick else ''}`; torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} thread(s); {n} seed(s), mean ± std of test accuracy (%).",
        f"Pretrained MLP 64-128-128-10 (dense, {mean('time_pretrain_s'):.1f} s): "
        f"{100 * mean('dense'):.1f} % test accuracy. `Rank` targets fc1 and fc2 (one dimension).",
        "## (a, b) svd mode: accuracy per rank",
        table(["method", *[f"r={r}" for r in RANKS]], [
            ["params (exported, `nest.cost`)", *runs[0]["svd_params"]], *svd]),
        f"Sorted rank training: {mean('time_sorted_s'):.1f} s per seed (3 ranks accumulated per step).",
        "## (c) lora mode: adapting to mirrored digits",
        f"Pretrained model on mirrored digits, no adapter: {100 * mean('mirrored_pretrained'):.1f} %. "
        f"Trainable (adapter) parameters: {runs[0]['c_dylora_trainable']}; base weights bit-identical after "
        f"training in every run: {frozen}.",
        table(["method", *[f"r={r}" for r in LORA_RANKS]], lora),
        "## Latency: exported factored 1024 x 1024 Linear vs dense",
        "One thread, `torch.no_grad()`, the calling thread's CPU time (`time.thread_time`: time preempted by other "
        "processes left out), median of round-robin repeats; exported with `Rank(..., export=\"factored\")`"
        + (f"; re-timed on its own by `python benchmarks/rank.py --latency` ({args.latency_date})."
           if getattr(args, "latency_date", None) else "."),
        table(["batch", "rank", "params", "params / dense", "factored µs", "dense µs", "speed-up"], lat),
    ]) + "\n"


BEGIN, END = "<!-- rank:begin -->", "<!-- rank:end -->"
DOC = os.path.join(os.path.dirname(RESULTS), "..", "docs", "rank.md")


def render_docs(text: str) -> None:
    """Copy the accuracy tables of the report into docs/rank.md between the rank markers."""
    if not os.path.exists(DOC):
        return
    body = text.split("## Latency")[0].split("\n\n", 1)[1].strip()
    with open(DOC) as f:
        doc = f.read()
    if BEGIN in doc and END in doc:
        block = f"{BEGIN}\n<!-- rendered from benchmarks/results/rank.json by benchmarks/rank.py -->\n\n{body}\n\n{END}"
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
        with open(DOC, "w") as f:
            f.write(doc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--render", action="store_true", help="re-render rank.md and the docs block from rank.json")
    ap.add_argument("--latency", action="store_true",
                    help="time the exported layers again and re-render, keeping the accuracy runs of rank.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = "/tmp" if args.quick else RESULTS
    if args.render or args.latency:
        with open(os.path.join(out, "rank.json")) as f:
            saved = json.load(f)
        runs, lat = saved["runs"], saved["latency"]
        args.latency_date = saved.get("latency_date")
        if args.latency:
            lat, args.latency_date = latency(args.quick), time.strftime("%Y-%m-%d")
    else:
        runs = [one_seed(s, args.quick) for s in range(1 if args.quick else args.seeds)]
        lat = latency(args.quick)
    text = report(runs, lat, args)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "rank.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "rank.json"), "w") as f:
        json.dump({"runs": runs, "latency": lat, "latency_date": getattr(args, "latency_date", None)}, f, indent=1)
    if not args.quick:
        render_docs(text)
    print(text)


if __name__ == "__main__":
    main()
